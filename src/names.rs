//! The rules for names that users choose: export names, snapshot names, VM and
//! checkpoint names.
//!
//! Each of these names ends up somewhere a stray character is dangerous: in a file name
//! next to an image (`disk.strata@monday`), in a directory of VM bundles, in a URL path,
//! on a command line. So every rule is the same shape, a plain name: 1 to N ASCII
//! letters, digits, `.`, `_` and `-`, not starting with `.` or `-`, which is never a path
//! and never an option. Export names may also hold `@`, because a served snapshot is
//! exported as `EXPORT@SNAPSHOT`.
//!
//! The configuration file, the command line and the control API all check export names
//! with [`EXPORT`], so a name one of them accepts is accepted by the others; snapshots,
//! VMs and checkpoints use [`SNAPSHOT`], [`VM`] and [`CHECKPOINT`]. The messages are made
//! here from the rule, so they always say what the rule is.

use crate::error::{Error, ErrorKind, Result};

/// A rule for one kind of name: what it names, how long it may be, and whether `@` is
/// allowed besides the plain characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRule {
    /// What the name names, for messages: `export`, `snapshot`, ...
    what: &'static str,
    /// The most bytes (and so characters) a name may have.
    max_len: usize,
    /// Whether `@` may appear.
    at_sign: bool,
}

/// Export names, wherever they are given: 1 to 64 plain characters or `@`.
pub const EXPORT: NameRule = NameRule {
    what: "export",
    max_len: 64,
    at_sign: true,
};

/// Snapshot names: 1 to 64 plain characters. A snapshot's file is the live image's name,
/// `@` and this name, so the name can never reach another directory.
pub const SNAPSHOT: NameRule = NameRule::plain("snapshot", 64);

/// VM names: 1 to 60 plain characters, as for [`CHECKPOINT`]s. A VM's bundle is a
/// directory of that name.
pub const VM: NameRule = NameRule::plain("VM", 60);

/// Checkpoint names: 1 to 60 plain characters. A checkpoint's disk snapshot is named
/// `vm.NAME`, which must stay a valid [`SNAPSHOT`] name.
pub const CHECKPOINT: NameRule = NameRule::plain("checkpoint", 60);

impl NameRule {
    /// A plain name of 1 to `max_len` characters, naming a `what`.
    pub const fn plain(what: &'static str, max_len: usize) -> Self {
        NameRule {
            what,
            max_len,
            at_sign: false,
        }
    }

    /// The most bytes a name may have.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Does `name` follow the rule?
    pub fn accepts(&self, name: &str) -> bool {
        let allowed =
            |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b) || (self.at_sign && b == b'@');
        !name.is_empty()
            && name.len() <= self.max_len
            && !name.starts_with(['.', '-'])
            && name.bytes().all(allowed)
    }

    /// What the rule asks for, as a message says it: `use 1 to 64 ASCII letters, ...`.
    pub fn describe(&self) -> String {
        let chars = if self.at_sign {
            "'.', '_', '-' and '@'"
        } else {
            "'.', '_' and '-'"
        };
        format!(
            "use 1 to {} ASCII letters, digits, {chars}, not starting with '.' or '-'",
            self.max_len
        )
    }

    /// `Ok` if `name` follows the rule, else an `InvalidInput` error naming the name and
    /// the rule: `invalid export name "a/b": use 1 to 64 ...`.
    pub fn check(&self, name: &str) -> Result<()> {
        if self.accepts(name) {
            return Ok(());
        }
        Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("invalid {} name {name:?}: {}", self.what, self.describe()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_cannot_leave_the_directory() {
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "-x", "a b", "x\0", "a@b", "é",
        ] {
            assert!(!SNAPSHOT.accepts(bad), "{bad:?}");
            assert!(!VM.accepts(bad), "{bad:?}");
        }
        for good in ["monday", "2026-12-01T10.00", "a_b", "A9", "web_2.test-a"] {
            assert!(SNAPSHOT.accepts(good), "{good:?}");
            assert!(VM.accepts(good), "{good:?}");
        }
    }

    #[test]
    fn the_length_bound_is_the_rule_s() {
        assert!(SNAPSHOT.accepts(&"a".repeat(64)));
        assert!(!SNAPSHOT.accepts(&"a".repeat(65)));
        assert!(VM.accepts(&"a".repeat(60)));
        assert!(!VM.accepts(&"a".repeat(61)));
        assert!(!CHECKPOINT.accepts(&"a".repeat(61)));
        // A checkpoint's disk snapshot `vm.NAME` is a snapshot name.
        assert!(SNAPSHOT.accepts(&format!("vm.{}", "a".repeat(CHECKPOINT.max_len()))));
    }

    #[test]
    fn export_names_may_hold_at_signs() {
        for good in ["vm1", "vm1@monday", "a@b@c", "A.b_c-d"] {
            assert!(EXPORT.accepts(good), "{good:?}");
        }
        for bad in ["", ".x", "-x", "bad/name", "a b", "é"] {
            assert!(!EXPORT.accepts(bad), "{bad:?}");
        }
        assert!(!EXPORT.accepts(&"a".repeat(65)));
    }

    #[test]
    fn messages_say_the_rule() {
        let e = EXPORT.check("bad/name").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            "invalid export name \"bad/name\": use 1 to 64 ASCII letters, digits, '.', '_', \
             '-' and '@', not starting with '.' or '-'"
        );
        assert_eq!(
            VM.check("a b").unwrap_err().to_string(),
            "invalid VM name \"a b\": use 1 to 60 ASCII letters, digits, '.', '_' and '-', \
             not starting with '.' or '-'"
        );
        assert!(SNAPSHOT.check("monday").is_ok());
    }
}
