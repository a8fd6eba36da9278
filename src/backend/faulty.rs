//! A layer that injects errors, for testing how clients and guests cope with a failing
//! disk.
//!
//! [`Faulty`] wraps any backend and fails the requests its [`FaultRule`]s select, before
//! they reach the backend (so a failed write changes nothing, and everything acknowledged
//! earlier stays where it was). A rule picks operations, an error, and conditions:
//!
//! ```text
//! OPS:ERROR[:CONDITION,...]
//!
//! OPS        read, write, flush, trim, zero, block-status, cache, or all; several
//!            joined by commas (read,write)
//! ERROR      EIO, ENOSPC, EPERM, EINVAL, ENOMEM, ENOTSUP, EOVERFLOW or ESHUTDOWN
//! CONDITION  offset=SIZE   only requests touching bytes from SIZE on ...
//!            length=SIZE   ... up to offset+SIZE (default: the end of the disk);
//!                          flush has no range and ignores both
//!            after=N       let the first N matching requests through
//!            count=N       fail at most N requests, then none
//!            probability=P fail each matching request with probability P (0 to 1) ...
//!            seed=N        ... drawn from a generator seeded with N (default 0), so a run
//!                          with the same requests fails the same ones
//! ```
//!
//! For example `write:EIO:offset=1M,length=64K` fails every write touching the 64 KiB at
//! 1 MiB, `flush:EIO:after=10,count=1` fails the eleventh flush only, and
//! `read,write:ENOSPC:probability=0.01,seed=7` one request in a hundred. Rules are
//! tried in order and the first that fires decides. [`parse_rule`] reads the syntax.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{Backend, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::{Error, ErrorKind, Result};

/// Kinds of request a rule can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads (sparse or not).
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Trims.
    Trim,
    /// Zeroing.
    Zero,
    /// Block status, of any metadata context.
    BlockStatus,
    /// Cache (prefetch) hints.
    Cache,
}

impl FaultOp {
    const ALL: [FaultOp; 7] = [
        FaultOp::Read,
        FaultOp::Write,
        FaultOp::Flush,
        FaultOp::Trim,
        FaultOp::Zero,
        FaultOp::BlockStatus,
        FaultOp::Cache,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn name(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
            FaultOp::Trim => "trim",
            FaultOp::Zero => "zero",
            FaultOp::BlockStatus => "block-status",
            FaultOp::Cache => "cache",
        }
    }
}

/// The errors a rule can inject, by the errno name clients see, and the error kind
/// that [`crate::proto::errno_for`] maps to it.
const ERRORS: [(&str, ErrorKind); 8] = [
    ("EIO", ErrorKind::Io),
    ("ENOSPC", ErrorKind::NoSpace),
    ("EPERM", ErrorKind::ReadOnly),
    ("EINVAL", ErrorKind::InvalidInput),
    ("ENOMEM", ErrorKind::NoMemory),
    ("ENOTSUP", ErrorKind::NotSupported),
    ("EOVERFLOW", ErrorKind::Overflow),
    ("ESHUTDOWN", ErrorKind::Shutdown),
];

/// One rule: which requests fail, and with what. Its counters (`after`, `count`, the
/// generator) live in it, so each export is given rules of its own.
#[derive(Debug)]
pub struct FaultRule {
    text: String,
    ops: u8,
    kind: ErrorKind,
    errno_name: &'static str,
    range: Option<(u64, u64)>,
    after: u64,
    count: u64,
    /// Probability scaled to `u64::MAX`; `None` fails every matching request.
    threshold: Option<u64>,
    /// Matching requests seen.
    seen: AtomicU64,
    /// Requests failed.
    fired: AtomicU64,
    /// The generator's state (SplitMix64, advanced atomically).
    rng: AtomicU64,
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Clone for FaultRule {
    /// A rule with the same conditions and fresh counters.
    fn clone(&self) -> Self {
        parse_rule(&self.text).expect("a parsed rule parses again")
    }
}

impl FaultRule {
    /// The error kind it injects.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Requests this rule failed so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    fn matches(&self, op: FaultOp, range: Option<(u64, u64)>) -> bool {
        if self.ops & op.bit() == 0 {
            return false;
        }
        match (self.range, range) {
            (Some((start, end)), Some((offset, len))) => {
                let last = offset.saturating_add(len.max(1));
                offset < end && last > start
            }
            _ => true,
        }
    }

    /// Decides whether this request fails; counts it either way.
    fn fires(&self, op: FaultOp, range: Option<(u64, u64)>) -> bool {
        if !self.matches(op, range) {
            return false;
        }
        let seen = self.seen.fetch_add(1, Ordering::Relaxed);
        if seen < self.after {
            return false;
        }
        if let Some(threshold) = self.threshold {
            if self.draw() > threshold {
                return false;
            }
        }
        // Claim one of the `count` failures; racing requests cannot exceed it.
        self.fired
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.count).then_some(n + 1)
            })
            .is_ok()
    }

    fn draw(&self) -> u64 {
        const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut z = self
            .rng
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn error(&self, op: FaultOp, range: Option<(u64, u64)>) -> Error {
        let mut e = Error::msg(
            self.kind,
            format!("injected {} (rule {:?})", self.errno_name, self.text),
        )
        .with_op(op.name());
        if let Some((offset, len)) = range {
            e = e.with_range(offset, len);
        }
        e
    }
}

fn bad_rule(text: &str, why: impl fmt::Display) -> Error {
    Error::msg(
        ErrorKind::InvalidInput,
        format!(
            "invalid fault rule {text:?}: {why} (expected OPS:ERROR[:CONDITION,...], \
             e.g. write:EIO:offset=1M,length=64K)"
        ),
    )
}

/// Parses a rule (see the [module documentation](self) for the syntax).
pub fn parse_rule(text: &str) -> Result<FaultRule> {
    let mut fields = text.splitn(3, ':');
    let ops_text = fields.next().unwrap_or_default();
    let Some(error_text) = fields.next() else {
        return Err(bad_rule(text, "no error"));
    };
    let conditions = fields.next().unwrap_or_default();

    let mut ops = 0u8;
    for name in ops_text.split(',') {
        let name = name.trim().to_ascii_lowercase();
        if name == "all" {
            ops = FaultOp::ALL.iter().fold(0, |acc, op| acc | op.bit());
            continue;
        }
        let Some(op) = FaultOp::ALL.iter().find(|op| op.name() == name) else {
            return Err(bad_rule(text, format!("unknown operation {name:?}")));
        };
        ops |= op.bit();
    }
    let error_upper = error_text.trim().to_ascii_uppercase();
    let Some(&(errno_name, kind)) = ERRORS.iter().find(|(name, _)| *name == error_upper) else {
        let known: Vec<&str> = ERRORS.iter().map(|(name, _)| *name).collect();
        return Err(bad_rule(
            text,
            format!("unknown error {error_text:?}; one of {}", known.join(", ")),
        ));
    };

    let mut offset = None;
    let mut length = None;
    let mut after = 0;
    let mut count = u64::MAX;
    let mut probability = None;
    let mut seed = 0u64;
    for condition in conditions.split(',').filter(|c| !c.trim().is_empty()) {
        let Some((key, value)) = condition.split_once('=') else {
            return Err(bad_rule(
                text,
                format!("condition {condition:?} is not KEY=VALUE"),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| bad_rule(text, format!("{key}={value:?} is not a number")))
        };
        let size = || {
            crate::size::parse_size(value)
                .map_err(|_| bad_rule(text, format!("{key}={value:?} is not a size")))
        };
        match key {
            "offset" => offset = Some(size()?),
            "length" => length = Some(size()?),
            "after" => after = number()?,
            "count" => count = number()?,
            "seed" => seed = number()?,
            "probability" => {
                let p: f64 = value.parse().map_err(|_| {
                    bad_rule(text, format!("probability={value:?} is not a number"))
                })?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(bad_rule(text, "probability must be between 0 and 1"));
                }
                probability = Some(p);
            }
            _ => return Err(bad_rule(text, format!("unknown condition {key:?}"))),
        }
    }
    if length == Some(0) {
        return Err(bad_rule(text, "length=0 selects nothing"));
    }
    let range = match (offset, length) {
        (None, None) => None,
        (start, len) => {
            let start = start.unwrap_or(0);
            Some((start, len.map_or(u64::MAX, |l| start.saturating_add(l))))
        }
    };
    // A probability of 1 is "always"; the scaled threshold of anything less is exact
    // enough for a test.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let threshold = probability.map(|p| {
        if p >= 1.0 {
            u64::MAX
        } else {
            (p * u64::MAX as f64) as u64
        }
    });
    Ok(FaultRule {
        text: text.to_owned(),
        ops,
        kind,
        errno_name,
        range,
        after,
        count,
        threshold,
        seen: AtomicU64::new(0),
        fired: AtomicU64::new(0),
        rng: AtomicU64::new(seed),
    })
}

/// Wraps a backend and fails the requests its rules select. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    rules: Vec<FaultRule>,
}

impl<B> Faulty<B> {
    /// Wraps `inner` with `rules`, tried in order.
    pub fn new(inner: B, rules: Vec<FaultRule>) -> Self {
        Faulty { inner, rules }
    }

    /// The rules, with their counters.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    fn check(&self, op: FaultOp, range: Option<(u64, u64)>) -> Result<()> {
        match self.rules.iter().find(|r| r.fires(op, range)) {
            Some(rule) => Err(rule.error(op, range)),
            None => Ok(()),
        }
    }
}

impl<B: Backend> super::Filter for Faulty<B> {
    type Inner = B;

    fn inner(&self) -> &B {
        &self.inner
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(FaultOp::Read, Some((offset, len as u64)))?;
        self.inner.read(offset, len).await
    }

    async fn read_sparse(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.check(FaultOp::Read, Some((offset, len as u64)))?;
        self.inner.read_sparse(offset, len).await
    }

    async fn read_for_kernel(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(FaultOp::Read, Some((offset, len as u64)))?;
        self.inner.read_for_kernel(offset, len).await
    }

    async fn read_sparse_for_kernel(&self, offset: u64, len: usize) -> Result<Vec<ReadChunk>> {
        self.check(FaultOp::Read, Some((offset, len as u64)))?;
        self.inner.read_sparse_for_kernel(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check(FaultOp::Write, Some((offset, data.len() as u64)))?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<()> {
        self.check(FaultOp::Flush, None)?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(FaultOp::Trim, Some((offset, len)))?;
        self.inner.trim(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(FaultOp::Zero, Some((offset, len)))?;
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(FaultOp::BlockStatus, Some((offset, len)))?;
        self.inner.block_status(offset, len).await
    }

    async fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        self.check(FaultOp::BlockStatus, Some((offset, len)))?;
        self.inner.allocation_depth(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(FaultOp::Cache, Some((offset, len)))?;
        self.inner.cache(offset, len).await
    }

    async fn dirty_status(
        &self,
        bitmap: String,
        offset: u64,
        len: u64,
    ) -> Result<Vec<DirtyExtent>> {
        self.check(FaultOp::BlockStatus, Some((offset, len)))?;
        self.inner.dirty_status(bitmap, offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::proto::consts::errno;
    use crate::proto::errno_for;

    #[test]
    fn parses_the_documented_examples() {
        let r = parse_rule("write:EIO:offset=1M,length=64K").unwrap();
        assert_eq!(r.kind(), ErrorKind::Io);
        assert_eq!(r.ops, FaultOp::Write.bit());
        assert_eq!(r.range, Some((1 << 20, (1 << 20) + (64 << 10))));
        assert_eq!((r.after, r.count, r.threshold), (0, u64::MAX, None));

        let r = parse_rule("flush:EIO:after=10,count=1").unwrap();
        assert_eq!((r.after, r.count, r.range), (10, 1, None));

        let r = parse_rule("read,write:enospc:probability=0.01,seed=7").unwrap();
        assert_eq!(r.kind(), ErrorKind::NoSpace);
        assert_eq!(r.ops, FaultOp::Read.bit() | FaultOp::Write.bit());
        assert!(r.threshold.is_some());

        let r = parse_rule("all:ESHUTDOWN").unwrap();
        assert_eq!(r.ops, 0x7f);
        let r = parse_rule("trim:EPERM:offset=4096").unwrap();
        assert_eq!(r.range, Some((4096, u64::MAX)));
    }

    #[test]
    fn refuses_malformed_rules_with_a_reason() {
        for (text, why) in [
            ("write", "no error"),
            ("wrte:EIO", "unknown operation"),
            ("write:EBADF", "unknown error"),
            ("write:EIO:offset", "not KEY=VALUE"),
            ("write:EIO:offset=1Q", "not a size"),
            ("write:EIO:after=-1", "not a number"),
            ("write:EIO:probability=2", "between 0 and 1"),
            ("write:EIO:colour=red", "unknown condition"),
            ("write:EIO:length=0", "selects nothing"),
        ] {
            let e = parse_rule(text).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn every_error_reaches_the_wire_as_its_errno() {
        for (name, code) in [
            ("EIO", errno::EIO),
            ("ENOSPC", errno::ENOSPC),
            ("EPERM", errno::EPERM),
            ("EINVAL", errno::EINVAL),
            ("ENOMEM", errno::ENOMEM),
            ("ENOTSUP", errno::ENOTSUP),
            ("EOVERFLOW", errno::EOVERFLOW),
            ("ESHUTDOWN", errno::ESHUTDOWN),
        ] {
            let r = parse_rule(&format!("read:{name}")).unwrap();
            assert_eq!(errno_for(r.kind()), code, "{name}");
        }
    }

    fn disk(rules: &[&str]) -> Faulty<MemoryBackend> {
        Faulty::new(
            MemoryBackend::new(4 << 20),
            rules.iter().map(|r| parse_rule(r).unwrap()).collect(),
        )
    }

    #[tokio::test]
    async fn ranges_select_overlapping_requests_only() {
        let d = disk(&["write:ENOSPC:offset=1M,length=64K"]);
        let data = Bytes::from(vec![7u8; 4096]);
        d.write(0, data.clone(), false).await.unwrap();
        d.write((1 << 20) - 4096, data.clone(), false)
            .await
            .unwrap();
        let e = d
            .write((1 << 20) - 1, data.clone(), false)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert!(e.to_string().contains("injected ENOSPC"), "{e}");
        d.write((1 << 20) + (64 << 10), data.clone(), false)
            .await
            .unwrap();
        // Other operations on the range pass, and the failed write changed nothing.
        assert_eq!(d.read(1 << 20, 4096).await.unwrap(), vec![0u8; 4096]);
        d.flush().await.unwrap();
    }

    #[tokio::test]
    async fn after_and_count_pick_which_requests_fail() {
        let d = disk(&["flush:EIO:after=2,count=2"]);
        let mut results = Vec::new();
        for _ in 0..6 {
            results.push(d.flush().await.is_ok());
        }
        assert_eq!(results, [true, true, false, false, true, true]);
        assert_eq!(d.rules()[0].fired(), 2);
    }

    #[tokio::test]
    async fn probabilities_are_reproducible_from_the_seed() {
        async fn pattern(seed: u64) -> Vec<bool> {
            let d = disk(&[&format!("read:EIO:probability=0.3,seed={seed}")]);
            let mut out = Vec::new();
            for i in 0..200 {
                out.push(d.read(i * 512, 512).await.is_err());
            }
            out
        }
        let a = pattern(1).await;
        assert_eq!(a, pattern(1).await, "the same seed fails the same requests");
        assert_ne!(a, pattern(2).await, "another seed fails others");
        let failed = a.iter().filter(|&&f| f).count();
        assert!((30..=90).contains(&failed), "{failed} of 200 at p=0.3");
        let never = disk(&["read:EIO:probability=0"]);
        assert!(never.read(0, 1).await.is_ok());
        let always = disk(&["read:EIO:probability=1"]);
        assert!(always.read(0, 1).await.is_err());
    }
}
