//! Feeds arbitrary bytes, in chunk sizes taken from the input, to `ServerHandshake`.
//!
//! Input layout:
//! - byte 0: configuration. Bits 0-1: TLS policy (0 disabled, 1 allowed, 2-3 required);
//!   bits 2-3: `max_option_len` (64 KiB, 0, 16, 128).
//! - byte 1: how many chunk-size bytes follow (mod 16); 0 feeds the stream at once.
//! - that many bytes: chunk sizes (each `b + 1`), used in a cycle.
//! - the rest: the client's byte stream (client flags, then options).
//!
//! Checks: no panic; every `Continue` consumed input; everything sent is a greeting
//! followed by well-formed option replies (and, after `EXPORT_NAME`, the export reply);
//! under `TlsPolicy::Required` nothing about exports is sent before TLS and transmission
//! is never entered without it.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use strata::proto::consts::{OPTION_REPLY_MAGIC, opt, rep, transmission_flags as tf};
use strata::proto::{
    BlockSizes, ExportCatalog, ExportInfo, ExportSummary, HandshakeConfig, Progress,
    ServerHandshake, TlsPolicy,
};

struct Catalog;

impl ExportCatalog for Catalog {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        let (name, flags) = match name {
            "" | "disk" => ("disk", tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_TRIM),
            "ro" => ("ro", tf::HAS_FLAGS | tf::READ_ONLY),
            _ => return None,
        };
        Some(ExportInfo {
            name: name.into(),
            description: format!("{name} export"),
            size: 1 << 20,
            flags,
            block_sizes: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 20,
            },
            meta_contexts: {
                // As an image export with one snapshot offers them.
                let mut contexts = strata::proto::handshake::default_meta_contexts();
                contexts.push("qemu:dirty-bitmap:monday".into());
                contexts
            },
        })
    }

    fn list(&self) -> Vec<ExportSummary> {
        ["disk", "ro"]
            .iter()
            .map(|n| ExportSummary {
                name: (*n).into(),
                description: String::new(),
            })
            .collect()
    }
}

/// Output checker: the greeting, then option replies, with the TLS state at the time each
/// byte was produced.
struct Sent {
    bytes: Vec<u8>,
    /// TLS was active when `bytes[i]` was sent, for each i.
    tls: Vec<bool>,
}

impl Sent {
    fn drain(&mut self, hs: &mut ServerHandshake) {
        while let Some(b) = hs.poll_transmit() {
            self.bytes.extend_from_slice(&b);
            self.tls.resize(self.bytes.len(), hs.tls_active());
        }
    }

    /// `tail`: length of the `EXPORT_NAME` reply ending the output, if any.
    fn check(&self, policy: TlsPolicy, tail: usize, no_zeroes: bool) {
        assert!(self.bytes.len() >= 18, "greeting always sent");
        assert_eq!(&self.bytes[..8], b"NBDMAGIC");
        assert_eq!(&self.bytes[8..16], b"IHAVEOPT");
        assert_eq!(&self.bytes[16..18], &[0, 3]);
        let mut at = 18;
        let end = self.bytes.len() - tail;
        while at < end {
            let b = &self.bytes[at..end];
            assert!(b.len() >= 20, "truncated option reply");
            assert_eq!(
                u64::from_be_bytes(b[..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            assert!(
                b.len() >= 20 + len,
                "option reply longer than what was sent"
            );
            if ty & (1 << 31) != 0 {
                assert!(
                    std::str::from_utf8(&b[20..20 + len]).is_ok(),
                    "error text is UTF-8"
                );
            }
            if policy == TlsPolicy::Required && !self.tls[at] {
                // Before TLS only refusals, and ACKs to STARTTLS or ABORT.
                let ok = ty & (1 << 31) != 0
                    || (ty == rep::ACK && (option == opt::STARTTLS || option == opt::ABORT));
                assert!(ok, "option {option} got reply type {ty:#x} before TLS");
            }
            at += 20 + len;
        }
        if tail > 0 {
            let t = &self.bytes[end..];
            assert_eq!(t.len(), if no_zeroes { 10 } else { 134 });
            assert_eq!(u64::from_be_bytes(t[..8].try_into().unwrap()), 1 << 20);
            assert!(t[10..].iter().all(|&z| z == 0));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let policy = match data[0] & 3 {
        0 => TlsPolicy::Disabled,
        1 => TlsPolicy::Allowed,
        _ => TlsPolicy::Required,
    };
    let max_option_len = match (data[0] >> 2) & 3 {
        0 => 64 * 1024,
        1 => 0,
        2 => 16,
        _ => 128,
    };
    let n_sizes = usize::from(data[1] % 16).min(data.len() - 2);
    let sizes: Vec<usize> = data[2..2 + n_sizes]
        .iter()
        .map(|&b| usize::from(b) + 1)
        .collect();
    let stream = &data[2 + n_sizes..];

    let mut hs = ServerHandshake::new(HandshakeConfig {
        tls: policy,
        max_option_len,
    });
    let mut sent = Sent {
        bytes: Vec::new(),
        tls: Vec::new(),
    };
    sent.drain(&mut hs);

    let mut input = BytesMut::new();
    let mut fed = 0usize;
    let mut continues = 0usize;
    // The client flags are the stream's first four bytes.
    let no_zeroes = stream.len() >= 4 && stream[3] & 2 != 0;
    let mut ended = false;
    let mut tail = 0;
    let mut i = 0;
    'feed: while fed < stream.len() {
        let size = if sizes.is_empty() {
            stream.len()
        } else {
            sizes[i % sizes.len()]
        };
        i += 1;
        let chunk = &stream[fed..(fed + size).min(stream.len())];
        fed += chunk.len();
        input.extend_from_slice(chunk);
        loop {
            let before = input.len();
            let sent_before = sent.bytes.len();
            let r = hs.handle_input(&mut input, &Catalog);
            sent.drain(&mut hs);
            match r {
                Ok(Progress::Continue) => {
                    continues += 1;
                    assert!(continues <= fed, "Continue without consuming input");
                    assert!(input.len() <= before);
                }
                Ok(Progress::NeedInput) => break,
                Ok(Progress::StartTls) => {
                    assert_ne!(policy, TlsPolicy::Disabled);
                    assert!(!hs.tls_active());
                    hs.tls_established();
                }
                Ok(Progress::Abort) => {
                    ended = true;
                    break 'feed;
                }
                Ok(Progress::Done(n)) => {
                    assert!(policy != TlsPolicy::Required || hs.tls_active());
                    assert_ne!(n.flags & tf::HAS_FLAGS, 0);
                    assert!(!n.extended || n.structured);
                    assert!(n.contexts.is_empty() || n.structured);
                    assert_eq!(n.flags & tf::SEND_DF != 0, n.structured);
                    // GO answers with option replies (ending in ACK); EXPORT_NAME with
                    // the bare export reply.
                    let new = &sent.bytes[sent_before..];
                    if new[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
                        assert_eq!(new[new.len() - 8..new.len() - 4], rep::ACK.to_be_bytes());
                    } else {
                        tail = new.len();
                    }
                    ended = true;
                    break 'feed;
                }
                Err(_) => {
                    ended = true;
                    break 'feed;
                }
            }
        }
    }
    // After the end, more input is an error, never a panic.
    if ended {
        let _ = hs.handle_input(&mut BytesMut::from(&b"IHAVEOPT"[..]), &Catalog);
    }
    sent.check(policy, tail, no_zeroes);
});
