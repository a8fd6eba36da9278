//! The server side of the fixed-newstyle handshake, as a state machine without I/O.
//!
//! The driver feeds received bytes to [`ServerHandshake::handle_input`], sends whatever
//! [`ServerHandshake::poll_transmit`] yields, and acts on the returned [`Progress`]. Export
//! information comes from an [`ExportCatalog`], so the machine never touches storage.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::ProtocolError;
use super::consts::{
    BASE_ALLOCATION, IHAVEOPT, MAX_STRING, NBDMAGIC, OPTION_REPLY_MAGIC, QEMU_ALLOCATION_DEPTH,
    client_flags, handshake_flags, info, opt, rep, transmission_flags,
};

/// Whether and how the server offers TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// No TLS: `STARTTLS` is answered with `NBD_REP_ERR_UNSUP`.
    #[default]
    Disabled,
    /// Clients may upgrade with `STARTTLS`.
    Allowed,
    /// Clients must upgrade before anything else is revealed.
    Required,
}

/// Tunables of the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// TLS policy.
    pub tls: TlsPolicy,
    /// Largest option payload accepted; larger ones are skipped and refused with
    /// `NBD_REP_ERR_TOO_BIG`.
    pub max_option_len: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            tls: TlsPolicy::Disabled,
            max_option_len: 64 * 1024,
        }
    }
}

/// Block size constraints as sent in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without `SEND_DF` (added when structured replies are on).
    pub flags: u16,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
    /// Metadata contexts this export can report; their context ids are their position in
    /// this list plus one.
    pub meta_contexts: Vec<String>,
}

/// One entry of an export listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

/// The server's exports, as seen by the handshake.
pub trait ExportCatalog {
    /// Looks up an export by the name a client sent ("" is the default export).
    fn export(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportSummary>;
}

/// A metadata context selected for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Id used in block-status replies.
    pub id: u32,
    /// Full name, e.g. `base:allocation`.
    pub name: String,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export chosen.
    pub export: ExportInfo,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    /// Structured replies are on.
    pub structured: bool,
    /// Extended headers are on (implies structured replies).
    pub extended: bool,
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More input is needed before anything else can happen.
    NeedInput,
    /// A message was handled; call again.
    Continue,
    /// Send pending output, then upgrade the connection to TLS and call
    /// [`ServerHandshake::tls_established`].
    StartTls,
    /// The client aborted: send pending output and close.
    Abort,
    /// Negotiation finished: send pending output and enter transmission.
    Done(Box<Negotiated>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Discard { option: u32, remaining: u64 },
    Finished,
}

/// The server's handshake state machine.
#[derive(Debug)]
pub struct ServerHandshake {
    config: HandshakeConfig,
    /// The TLS policy for this connection: the configured one, or `Disabled` for a client
    /// without fixed newstyle, with which TLS cannot be negotiated.
    tls: TlsPolicy,
    phase: Phase,
    out: BytesMut,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    tls_active: bool,
    /// Contexts chosen by the last `SET_META_CONTEXT`, with the canonical export name they
    /// were chosen for; a `GO` for another export drops them.
    selected: Option<(String, Vec<MetaContext>)>,
}

/// An option reply error: the code and the message shown to the user.
type Refusal = (u32, String);

fn invalid(message: impl Into<String>) -> Refusal {
    (rep::ERR_INVALID, message.into())
}

/// Reads a 32-bit length-prefixed UTF-8 string, as option payloads use for names.
fn take_string(data: &mut &[u8], what: &str) -> Result<String, Refusal> {
    if data.len() < 4 {
        return Err(invalid(format!("option too short for the {what} length")));
    }
    let len = data.get_u32() as usize;
    if len > MAX_STRING {
        return Err(invalid(format!("{what} longer than {MAX_STRING} bytes")));
    }
    if data.len() < len {
        return Err(invalid(format!("{what} runs past the end of the option")));
    }
    let (s, rest) = data.split_at(len);
    *data = rest;
    parse_name(s, what)
}

fn parse_name(bytes: &[u8], what: &str) -> Result<String, Refusal> {
    if bytes.len() > MAX_STRING {
        return Err(invalid(format!("{what} longer than {MAX_STRING} bytes")));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| invalid(format!("{what} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(invalid(format!("{what} contains NUL")));
    }
    Ok(s.to_owned())
}

impl ServerHandshake {
    /// Starts a handshake; the greeting is queued for [`Self::poll_transmit`] at once.
    pub fn new(config: HandshakeConfig) -> Self {
        let mut out = BytesMut::with_capacity(256);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        ServerHandshake {
            tls: config.tls,
            config,
            phase: Phase::ClientFlags,
            out,
            no_zeroes: false,
            structured: false,
            extended: false,
            tls_active: false,
            selected: None,
        }
    }

    /// Takes the bytes waiting to be sent, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// True once the client has upgraded to TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Tells the machine the TLS upgrade it asked for has completed.
    pub fn tls_established(&mut self) {
        self.tls_active = true;
    }

    /// Consumes input from `input` and advances by at most one message.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        match self.phase {
            Phase::ClientFlags => self.handle_client_flags(input),
            Phase::Options => self.handle_option(input, catalog),
            Phase::Discard { option, remaining } => Ok(self.discard(input, option, remaining)),
            Phase::Finished => Err(ProtocolError::HandshakeFinished),
        }
    }

    fn handle_client_flags(&mut self, input: &mut BytesMut) -> Result<Progress, ProtocolError> {
        if input.len() < 4 {
            return Ok(Progress::NeedInput);
        }
        let flags = input.get_u32();
        if flags & !client_flags::KNOWN != 0 {
            return Err(ProtocolError::BadClientFlags(flags));
        }
        // Clients without FIXED_NEWSTYLE can still pick an export with EXPORT_NAME; every
        // other option is answered as fixed newstyle requires, which such clients never send.
        // TLS needs fixed newstyle: without it the server must not offer TLS, so a server
        // that requires TLS has nothing to offer such a client.
        if flags & client_flags::FIXED_NEWSTYLE == 0 {
            if self.tls == TlsPolicy::Required {
                return Err(ProtocolError::TlsNeedsFixedNewstyle);
            }
            self.tls = TlsPolicy::Disabled;
        }
        self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
        self.phase = Phase::Options;
        Ok(Progress::Continue)
    }

    fn discard(&mut self, input: &mut BytesMut, option: u32, remaining: u64) -> Progress {
        let n = remaining.min(input.len() as u64);
        input.advance(n as usize);
        let remaining = remaining - n;
        if remaining > 0 {
            self.phase = Phase::Discard { option, remaining };
            return Progress::NeedInput;
        }
        self.phase = Phase::Options;
        // Under FORCEDTLS every option but STARTTLS and ABORT must get ERR_TLS_REQD before
        // the upgrade, oversized or not.
        let tls_pending = self.tls == TlsPolicy::Required && !self.tls_active;
        if tls_pending && option != opt::STARTTLS && option != opt::ABORT {
            self.reply(option, rep::ERR_TLS_REQD, b"TLS is required on this server");
            return Progress::Continue;
        }
        self.reply(
            option,
            rep::ERR_TOO_BIG,
            format!(
                "option data longer than {} bytes",
                self.config.max_option_len
            )
            .as_bytes(),
        );
        Progress::Continue
    }

    fn handle_option(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        if input.len() < 16 {
            return Ok(Progress::NeedInput);
        }
        let magic = u64::from_be_bytes(input[..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic));
        }
        let option = u32::from_be_bytes(input[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(input[12..16].try_into().expect("4 bytes"));
        if len > self.config.max_option_len {
            if option == opt::EXPORT_NAME {
                // No error reply exists for EXPORT_NAME; the session must end.
                return Err(ProtocolError::OptionTooLarge(len));
            }
            input.advance(16);
            self.phase = Phase::Discard {
                option,
                remaining: u64::from(len),
            };
            return Ok(Progress::Continue);
        }
        let total = 16 + len as usize;
        if input.len() < total {
            input.reserve(total - input.len());
            return Ok(Progress::NeedInput);
        }
        input.advance(16);
        let data = input.split_to(len as usize).freeze();
        let progress = self.dispatch_option(option, &data, catalog)?;
        if progress == Progress::StartTls && !input.is_empty() {
            // Bytes sent before the TLS handshake would otherwise be taken as options
            // from inside the encrypted session (the STARTTLS injection attack).
            return Err(ProtocolError::DataAfterStartTls);
        }
        Ok(progress)
    }

    fn dispatch_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        let tls_pending = self.tls == TlsPolicy::Required && !self.tls_active;
        match option {
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                self.phase = Phase::Finished;
                return Ok(Progress::Abort);
            }
            opt::STARTTLS => return Ok(self.handle_starttls(data)),
            opt::EXPORT_NAME if tls_pending => return Err(ProtocolError::TlsRequired),
            opt::EXPORT_NAME => return self.handle_export_name(data, catalog),
            _ if tls_pending => {
                self.reply(option, rep::ERR_TLS_REQD, b"TLS is required on this server");
                return Ok(Progress::Continue);
            }
            _ => {}
        }
        let result = match option {
            opt::LIST => self.handle_list(data, catalog),
            opt::INFO | opt::GO => self.handle_info(option, data, catalog),
            opt::STRUCTURED_REPLY => self.handle_structured(data),
            opt::EXTENDED_HEADERS => self.handle_extended(data),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.handle_meta_context(option, data, catalog)
            }
            other => Err((rep::ERR_UNSUP, format!("option {other} is not supported"))),
        };
        match result {
            Ok(progress) => Ok(progress),
            Err((code, message)) => {
                self.reply(option, code, message.as_bytes());
                Ok(Progress::Continue)
            }
        }
    }

    fn handle_starttls(&mut self, data: &[u8]) -> Progress {
        let refusal = if self.tls == TlsPolicy::Disabled {
            Some((rep::ERR_UNSUP, "TLS is not configured on this server"))
        } else if !data.is_empty() {
            Some((rep::ERR_INVALID, "STARTTLS takes no data"))
        } else if self.tls_active {
            Some((rep::ERR_INVALID, "TLS is already active"))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.reply(opt::STARTTLS, code, message.as_bytes());
            return Progress::Continue;
        }
        self.reply(opt::STARTTLS, rep::ACK, &[]);
        // Nothing negotiated in plaintext may survive the upgrade.
        self.structured = false;
        self.extended = false;
        self.selected = None;
        Progress::StartTls
    }

    fn handle_export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        let name = parse_name(data, "export name").map_err(|(_, m)| ProtocolError::BadOption(m))?;
        let export = catalog
            .export(&name)
            .ok_or_else(|| ProtocolError::UnknownExport(name.clone()))?;
        let negotiated = self.finish(export);
        self.out.put_u64(negotiated.export.size);
        self.out.put_u16(negotiated.flags);
        if !self.no_zeroes {
            self.out.put_bytes(0, 124);
        }
        Ok(Progress::Done(Box::new(negotiated)))
    }

    fn handle_list(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, Refusal> {
        if !data.is_empty() {
            return Err(invalid("LIST takes no data"));
        }
        for entry in catalog.list() {
            let mut payload =
                BytesMut::with_capacity(4 + entry.name.len() + entry.description.len());
            payload.put_u32(entry.name.len() as u32);
            payload.put_slice(entry.name.as_bytes());
            payload.put_slice(entry.description.as_bytes());
            self.reply(opt::LIST, rep::SERVER, &payload);
        }
        self.reply(opt::LIST, rep::ACK, &[]);
        Ok(Progress::Continue)
    }

    fn handle_info(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, Refusal> {
        let mut rest = data;
        let name = take_string(&mut rest, "export name")?;
        if rest.len() < 2 {
            return Err(invalid(
                "option too short for the information request count",
            ));
        }
        let count = rest.get_u16() as usize;
        if rest.len() != count * 2 {
            return Err(invalid(
                "information request count does not match the option length",
            ));
        }
        let requests: Vec<u16> = (0..count).map(|_| rest.get_u16()).collect();
        let export = catalog
            .export(&name)
            .ok_or_else(|| (rep::ERR_UNKNOWN, format!("no export named {name:?}")))?;

        let flags = self.transmission_flags(&export);
        if requests.contains(&info::NAME) {
            let mut p = BytesMut::new();
            p.put_u16(info::NAME);
            p.put_slice(export.name.as_bytes());
            self.reply(option, rep::INFO, &p);
        }
        if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
            let mut p = BytesMut::new();
            p.put_u16(info::DESCRIPTION);
            p.put_slice(export.description.as_bytes());
            self.reply(option, rep::INFO, &p);
        }
        // Block sizes are always announced: clients that did not ask may ignore them, and
        // the values never require more of a client than the defaults do.
        let mut p = BytesMut::new();
        p.put_u16(info::BLOCK_SIZE);
        p.put_u32(export.block_sizes.minimum);
        p.put_u32(export.block_sizes.preferred);
        p.put_u32(export.block_sizes.maximum);
        self.reply(option, rep::INFO, &p);

        let mut p = BytesMut::new();
        p.put_u16(info::EXPORT);
        p.put_u64(export.size);
        p.put_u16(flags);
        self.reply(option, rep::INFO, &p);
        self.reply(option, rep::ACK, &[]);

        if option == opt::INFO {
            return Ok(Progress::Continue);
        }
        let negotiated = self.finish(export);
        Ok(Progress::Done(Box::new(negotiated)))
    }

    fn handle_structured(&mut self, data: &[u8]) -> Result<Progress, Refusal> {
        if !data.is_empty() {
            return Err(invalid("STRUCTURED_REPLY takes no data"));
        }
        if self.extended {
            return Err((
                rep::ERR_EXT_HEADER_REQD,
                "extended headers are already negotiated".into(),
            ));
        }
        if self.structured {
            return Err(invalid("structured replies are already negotiated"));
        }
        self.structured = true;
        self.reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
        Ok(Progress::Continue)
    }

    fn handle_extended(&mut self, data: &[u8]) -> Result<Progress, Refusal> {
        if !data.is_empty() {
            return Err(invalid("EXTENDED_HEADERS takes no data"));
        }
        if self.extended {
            return Err(invalid("extended headers are already negotiated"));
        }
        self.extended = true;
        self.structured = true;
        self.reply(opt::EXTENDED_HEADERS, rep::ACK, &[]);
        Ok(Progress::Continue)
    }

    fn handle_meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, Refusal> {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // SET_META_CONTEXT replaces the previous selection even when it fails.
            self.selected = None;
        }
        if set && !self.structured {
            return Err(invalid("structured replies must be negotiated first"));
        }
        let mut rest = data;
        let name = take_string(&mut rest, "export name")?;
        if rest.len() < 4 {
            return Err(invalid("option too short for the query count"));
        }
        let count = rest.get_u32();
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(take_string(&mut rest, "query")?);
        }
        if !rest.is_empty() {
            return Err(invalid("trailing data after the queries"));
        }
        let export = catalog
            .export(&name)
            .ok_or_else(|| (rep::ERR_UNKNOWN, format!("no export named {name:?}")))?;

        let mut chosen: Vec<MetaContext> = Vec::new();
        for (i, context) in export.meta_contexts.iter().enumerate() {
            let matches = if queries.is_empty() {
                !set
            } else {
                queries.iter().any(|q| query_matches(q, context, set))
            };
            if matches {
                chosen.push(MetaContext {
                    id: i as u32 + 1,
                    name: context.clone(),
                });
            }
        }
        for ctx in &chosen {
            let mut p = BytesMut::new();
            // Ids in LIST replies are meaningless; the spec asks for zero.
            p.put_u32(if set { ctx.id } else { 0 });
            p.put_slice(ctx.name.as_bytes());
            self.reply(option, rep::META_CONTEXT, &p);
        }
        if set {
            self.selected = Some((export.name.clone(), chosen));
        }
        self.reply(option, rep::ACK, &[]);
        Ok(Progress::Continue)
    }

    fn transmission_flags(&self, export: &ExportInfo) -> u16 {
        let mut flags = export.flags | transmission_flags::HAS_FLAGS;
        flags &= !transmission_flags::SEND_DF;
        if self.structured {
            flags |= transmission_flags::SEND_DF;
        }
        flags
    }

    fn finish(&mut self, export: ExportInfo) -> Negotiated {
        self.phase = Phase::Finished;
        let contexts = match self.selected.take() {
            Some((name, contexts)) if name == export.name && self.structured => contexts,
            _ => Vec::new(),
        };
        Negotiated {
            flags: self.transmission_flags(&export),
            export,
            structured: self.structured,
            extended: self.extended,
            contexts,
        }
    }

    fn reply(&mut self, option: u32, ty: u32, data: &[u8]) {
        self.out.put_u64(OPTION_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(ty);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }
}

/// Does `query` select `context`? An exact name always does; in a listing, a bare
/// namespace (`base:`, `qemu:`) selects everything in it.
fn query_matches(query: &str, context: &str, set: bool) -> bool {
    if query == context {
        return true;
    }
    !set && query.ends_with(':') && context.starts_with(query)
}

/// The contexts every export offers. A context's id is its position here plus one, so
/// new contexts go at the end: `base:allocation` is 1 and `qemu:allocation-depth` 2.
pub fn default_meta_contexts() -> Vec<String> {
    vec![BASE_ALLOCATION.to_owned(), QEMU_ALLOCATION_DEPTH.to_owned()]
}
