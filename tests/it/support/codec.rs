//! For the codec tests: hex literals, a tiny export catalog, and a driver around the
//! sans-IO `ServerHandshake` that feeds it bytes and collects what it sends. The messages
//! themselves are built and parsed by `wire`, from the protocol's field layout.

use bytes::BytesMut;
use strata::proto::consts::{BASE_ALLOCATION, transmission_flags as tf};
use strata::proto::{
    BlockSizes, ExportCatalog, ExportInfo, ExportSummary, HandshakeConfig, Negotiated, Progress,
    ProtocolError, ServerHandshake, TlsPolicy,
};

use super::spec::{
    C_FIXED, OPT_GO, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
};
use super::wire::{OptReply, info_data, meta_data, opt};

/// Parses hex digits, ignoring whitespace and `_`, into bytes.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'_')
        .collect();
    assert!(digits.len() % 2 == 0, "odd number of hex digits in {s:?}");
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).unwrap();
            u8::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex {s:?}"))
        })
        .collect()
}

/// Size of the `disk` export.
pub const DISK_SIZE: u64 = 0x10_0000;
/// Flags of the `disk` export as the catalog reports them.
pub const DISK_FLAGS: u16 =
    tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;
/// Size of the read-only `ro` export.
pub const RO_SIZE: u64 = 0x2000;
/// Flags of the `ro` export.
pub const RO_FLAGS: u16 = tf::HAS_FLAGS | tf::READ_ONLY | tf::SEND_FLUSH;

/// Name of qemu's allocation-depth metadata context, spelled out here rather than taken
/// from the crate.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Two listed exports: `disk` (also the default export, "") offering `base:allocation`
/// and `qemu:allocation-depth` (ids 1 and 2, as every Strata export), and the read-only
/// `ro` (which has no description) offering only `base:allocation`; plus unlisted exports
/// named by any run of `x`.
pub struct TestCatalog;

impl ExportCatalog for TestCatalog {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "disk" | "" => Some(ExportInfo {
                name: "disk".into(),
                description: "Test disk".into(),
                size: DISK_SIZE,
                flags: DISK_FLAGS,
                block_sizes: BlockSizes {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 32 << 20,
                },
                meta_contexts: vec![BASE_ALLOCATION.into(), QEMU_ALLOCATION_DEPTH.into()],
            }),
            "ro" => Some(ExportInfo {
                name: "ro".into(),
                description: String::new(),
                size: RO_SIZE,
                flags: RO_FLAGS,
                block_sizes: BlockSizes {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 20,
                },
                meta_contexts: vec![BASE_ALLOCATION.into()],
            }),
            // Names made only of 'x' exist, whatever their length: for name-length tests.
            n if !n.is_empty() && n.bytes().all(|b| b == b'x') => Some(ExportInfo {
                name: n.into(),
                description: String::new(),
                size: 4096,
                flags: tf::HAS_FLAGS,
                block_sizes: BlockSizes {
                    minimum: 1,
                    preferred: 4096,
                    maximum: 4096,
                },
                meta_contexts: vec![BASE_ALLOCATION.into()],
            }),
            _ => None,
        }
    }

    fn list(&self) -> Vec<ExportSummary> {
        vec![
            ExportSummary {
                name: "disk".into(),
                description: "Test disk".into(),
            },
            ExportSummary {
                name: "ro".into(),
                description: String::new(),
            },
        ]
    }
}

/// Transmission flags of a writable export that advertises every optional command.
pub const EVERY_OPTIONAL_FLAG: u16 = tf::HAS_FLAGS
    | tf::SEND_FLUSH
    | tf::SEND_FUA
    | tf::SEND_TRIM
    | tf::SEND_WRITE_ZEROES
    | tf::SEND_CACHE
    | tf::SEND_FAST_ZERO
    | tf::SEND_DF;

/// Splits `bytes` into option replies; returns them and whatever does not start with a
/// whole option reply.
pub fn parse_replies(mut bytes: &[u8]) -> (Vec<OptReply>, Vec<u8>) {
    let mut out = Vec::new();
    while let Some((reply, len)) = OptReply::decode(bytes) {
        out.push(reply);
        bytes = &bytes[len..];
    }
    (out, bytes.to_vec())
}

/// How a batch of input ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was consumed; the machine wants more.
    NeedInput,
    /// `Progress::StartTls` (the caller decides whether to complete the upgrade).
    StartTls,
    Abort,
    Done(Box<Negotiated>),
    Err(ProtocolError),
}

/// What a handshake negotiated; panics unless it finished.
#[track_caller]
pub fn done(outcome: Outcome) -> Box<Negotiated> {
    match outcome {
        Outcome::Done(n) => n,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// A `ServerHandshake` plus the bytes it has sent.
pub struct Driver {
    pub hs: ServerHandshake,
    pub input: BytesMut,
    /// Everything sent so far, including the greeting.
    pub sent: Vec<u8>,
    /// Bytes of `sent` already returned by `take_replies`/`take_sent`.
    pub seen: usize,
    /// Complete the TLS upgrade automatically on `StartTls`.
    pub auto_tls: bool,
}

impl Driver {
    pub fn new(config: HandshakeConfig) -> Self {
        let mut d = Driver {
            hs: ServerHandshake::new(config),
            input: BytesMut::new(),
            sent: Vec::new(),
            seen: 0,
            auto_tls: false,
        };
        d.flush();
        d
    }

    pub fn with_tls(tls: TlsPolicy) -> Self {
        Driver::new(HandshakeConfig {
            tls,
            ..HandshakeConfig::default()
        })
    }

    /// A driver past the greeting and client flags.
    pub fn started(tls: TlsPolicy, client_flags: u32) -> Self {
        Driver::with_tls(tls).past_flags(client_flags)
    }

    /// A driver past the greeting and `C_FIXED`, whose server accepts options of at most
    /// `max_option_len` bytes.
    pub fn limited(tls: TlsPolicy, max_option_len: u32) -> Self {
        Driver::new(HandshakeConfig {
            tls,
            max_option_len,
        })
        .past_flags(C_FIXED)
    }

    /// A driver without TLS past the client flags that has negotiated structured replies.
    pub fn structured(client_flags: u32) -> Self {
        let mut d = Driver::started(TlsPolicy::Disabled, client_flags);
        d.expect_single(OPT_STRUCTURED_REPLY, &[], REP_ACK);
        d
    }

    fn past_flags(mut self, client_flags: u32) -> Self {
        assert_eq!(self.feed(&client_flags.to_be_bytes()), Outcome::NeedInput);
        self.take_sent();
        self
    }

    fn flush(&mut self) {
        while let Some(b) = self.hs.poll_transmit() {
            self.sent.extend_from_slice(&b);
        }
    }

    /// Appends `bytes` to the input and runs the machine until it needs more input or
    /// reaches a terminal state (or `StartTls` without `auto_tls`).
    pub fn feed(&mut self, bytes: &[u8]) -> Outcome {
        self.input.extend_from_slice(bytes);
        self.run()
    }

    pub fn run(&mut self) -> Outcome {
        loop {
            let r = self.hs.handle_input(&mut self.input, &TestCatalog);
            self.flush();
            match r {
                Ok(Progress::Continue) => continue,
                Ok(Progress::NeedInput) => return Outcome::NeedInput,
                Ok(Progress::StartTls) if self.auto_tls => {
                    self.hs.tls_established();
                    continue;
                }
                Ok(Progress::StartTls) => return Outcome::StartTls,
                Ok(Progress::Abort) => return Outcome::Abort,
                Ok(Progress::Done(n)) => return Outcome::Done(n),
                Err(e) => return Outcome::Err(e),
            }
        }
    }

    /// Bytes sent since the last call.
    pub fn take_sent(&mut self) -> Vec<u8> {
        let v = self.sent[self.seen..].to_vec();
        self.seen = self.sent.len();
        v
    }

    /// Option replies sent since the last call; panics on trailing bytes.
    pub fn take_replies(&mut self) -> Vec<OptReply> {
        let sent = self.take_sent();
        let (replies, rest) = parse_replies(&sent);
        assert!(
            rest.is_empty(),
            "trailing bytes after option replies: {rest:02x?}"
        );
        replies
    }

    /// Sends one option and returns its replies; the machine must want more input after.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        let outcome = self.feed(&opt(option, data));
        assert_eq!(outcome, Outcome::NeedInput, "option {option}");
        self.take_replies()
    }

    /// Sends one option and expects exactly one reply of type `ty`.
    #[track_caller]
    pub fn expect_single(&mut self, option: u32, data: &[u8], ty: u32) -> OptReply {
        let replies = self.option(option, data);
        assert_eq!(replies.len(), 1, "replies to option {option}: {replies:?}");
        assert_eq!(replies[0].option, option);
        assert_eq!(
            replies[0].ty,
            ty,
            "reply type {:#x} (message {:?})",
            replies[0].ty,
            String::from_utf8_lossy(&replies[0].data)
        );
        replies[0].clone()
    }

    /// Sends one option and expects exactly one error reply of type `ty`, well formed.
    #[track_caller]
    pub fn expect_error(&mut self, option: u32, data: &[u8], ty: u32) -> OptReply {
        let r = self.expect_single(option, data, ty);
        assert_error_reply(&r, option, ty);
        r
    }

    /// `SET_META_CONTEXT` of `queries` on `export`; returns its replies.
    pub fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<OptReply> {
        self.option(OPT_SET_META_CONTEXT, &meta_data(export, queries))
    }

    /// `GO` to `export` without information requests; returns what was negotiated.
    #[track_caller]
    pub fn go(&mut self, export: &str) -> Box<Negotiated> {
        done(self.feed(&opt(OPT_GO, &info_data(export, &[]))))
    }

    /// Sends `STARTTLS`, which must stop the machine for the upgrade, and completes the
    /// upgrade; returns the replies sent before it.
    #[track_caller]
    pub fn starttls(&mut self) -> Vec<OptReply> {
        assert_eq!(self.feed(&opt(OPT_STARTTLS, &[])), Outcome::StartTls);
        let replies = self.take_replies();
        assert!(!self.hs.tls_active(), "TLS active before the upgrade");
        self.hs.tls_established();
        assert!(self.hs.tls_active(), "TLS inactive after the upgrade");
        replies
    }
}

/// Checks the shape of an error reply: free-form UTF-8 message no longer than 4096 bytes.
#[track_caller]
pub fn assert_error_reply(r: &OptReply, option: u32, ty: u32) {
    assert_eq!(r.option, option);
    assert_eq!(r.ty, ty, "message {:?}", String::from_utf8_lossy(&r.data));
    assert!(std::str::from_utf8(&r.data).is_ok());
    assert!(r.data.len() <= 4096);
}
