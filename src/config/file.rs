//! Reading `strata.toml` into its raw shape. Every value keeps its span, so that checks
//! made later can name the line and column of what they refuse; serde refuses what
//! cannot be read reliably (bad TOML, unknown keys, wrong types) at the first problem.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigErrors, Location};
use super::model::{LogFormat, TlsMode};
use crate::image::FormatChoice;

pub(super) type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Spanned<Vec<Str>>>,
    pub(super) handshake_timeout: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) pid_file: Option<Str>,
    pub(super) tls: Option<RawTls>,
    pub(super) control: Option<RawControl>,
    pub(super) log: Option<RawLog>,
    pub(super) access: Option<RawAccess>,
    pub(super) limits: Option<RawLimits>,
    pub(super) metrics: Option<Str>,
    #[serde(default)]
    pub(super) exports: Vec<Spanned<RawExport>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections_per_client: Option<Spanned<i64>>,
    pub(super) idle_timeout: Option<Spanned<i64>>,
    pub(super) max_in_flight: Option<Str>,
    pub(super) max_in_flight_total: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) mode: Option<Spanned<TlsMode>>,
    pub(super) cert: Option<Str>,
    pub(super) key: Option<Str>,
    pub(super) client_ca: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) socket: Option<Str>,
    pub(super) listen: Option<Str>,
    pub(super) token_file: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<Str>,
    pub(super) format: Option<Spanned<LogFormat>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    pub(super) allow: Option<Spanned<Vec<Str>>>,
    pub(super) allow_identity: Option<Spanned<Vec<Str>>>,
    pub(super) require_tls: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExport {
    pub(super) name: Str,
    pub(super) image: Str,
    #[serde(default)]
    pub(super) read_only: bool,
    pub(super) format: Option<Spanned<FormatChoice>>,
    #[serde(default)]
    pub(super) description: String,
    pub(super) allow: Option<Spanned<Vec<Str>>>,
    pub(super) allow_identity: Option<Spanned<Vec<Str>>>,
    pub(super) require_tls: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) inject_errors: Vec<Str>,
}

/// The text being read, to turn byte spans into lines and columns.
pub(super) struct Source<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    /// Relative paths in the file are relative to this directory.
    pub(super) dir: PathBuf,
}

impl Source<'_> {
    pub(super) fn at(&self, span: Range<usize>) -> Location {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            file: self.file.to_path_buf(),
            line,
            column,
        }
    }

    pub(super) fn at_of<T>(&self, value: &Spanned<T>) -> Option<Location> {
        Some(self.at(value.span()))
    }

    pub(super) fn path(&self, value: &str) -> PathBuf {
        self.dir.join(value)
    }
}

/// Reads the TOML and its shape: syntax, unknown keys, types. Stops at the first problem.
pub(super) fn read_raw(source: &Source<'_>) -> Result<RawConfig, ConfigErrors> {
    let deserializer = toml::Deserializer::parse(source.text).map_err(|e| {
        let at = e.span().map(|s| source.at(s));
        ConfigErrors::one(at, "", e.message().trim_end().to_owned())
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = field_path(&e.path().to_string());
        let inner = e.into_inner();
        let at = inner
            .span()
            .map(|s| source.at(s))
            .or_else(|| Some(source.at(0..0)));
        ConfigErrors::one(at, field, inner.message().trim_end().to_owned())
    })
}

/// A serde path without the segments `toml::Spanned` adds, and `.` for the root.
fn field_path(path: &str) -> String {
    let cleaned: Vec<&str> = path
        .split('.')
        .filter(|segment| !segment.starts_with("$__serde_spanned_private"))
        .collect();
    let joined = cleaned.join(".");
    // A segment such as `exports[1].$__...` leaves `exports[1]`; a root error leaves "".
    if joined == "." { String::new() } else { joined }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn malformed_toml_names_line_and_column() {
        fails(
            "listen = [\"127.0.0.1:1\"\n",
            "/etc/strata/strata.toml:1:24: unclosed array, expected `]`",
        );
        fails(
            "max_connections = 4\nmax_connections = 5\n",
            "/etc/strata/strata.toml:2:1: duplicate key",
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        fails(
            "listen = []\nlisten_on = 1\n",
            "/etc/strata/strata.toml:2:1: listen_on: unknown field `listen_on`, expected one of \
             `listen`, `handshake_timeout`, `max_connections`, `pid_file`, `tls`, `control`, \
             `log`, `access`, `limits`, `metrics`, `exports`",
        );
        let text = format!("{EXPORT}readonly = true\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:1: exports[0].readonly: unknown field `readonly`"
            ),
            "{e:?}"
        );
        let e = errors("[tls]\nmode = \"off\"\ncertificate = \"x\"\n");
        assert!(
            e[0].starts_with("/etc/strata/strata.toml:3:1: tls.certificate: unknown field"),
            "{e:?}"
        );
        // A misspelt table is an unknown key too, not a silently ignored section.
        let e = errors("[[export]]\nname = \"a\"\n");
        assert!(e[0].contains("export: unknown field `export`"), "{e:?}");
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_field() {
        let text = format!("{EXPORT}[[exports]]\nname = \"vm2\"\nimage = 5\n");
        fails(
            &text,
            "/etc/strata/strata.toml:6:9: exports[1].image: invalid type: integer `5`, expected a string",
        );
        let text = format!("{EXPORT}read_only = \"yes\"\n");
        fails(
            &text,
            "/etc/strata/strata.toml:4:13: exports[0].read_only: invalid type: string \"yes\", expected a boolean",
        );
        fails(
            "listen = \"127.0.0.1:10809\"\n",
            "/etc/strata/strata.toml:1:10: listen: invalid type: string \"127.0.0.1:10809\", expected a sequence",
        );
        let e = errors("[[exports]]\nname = \"vm1\"\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("/etc/strata/strata.toml:1:1: exports[0]: missing field `image`"),
            "{e:?}"
        );
        fails(
            "[tls]\nmode = \"maybe\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: unknown variant `maybe`, expected one of `off`, `optional`, `require`",
        );
        fails(
            "[log]\nformat = \"xml\"\n",
            "/etc/strata/strata.toml:2:10: log.format: unknown variant `xml`, expected `text` or `json`",
        );
        let text = format!("{EXPORT}format = \"qcow2\"\n");
        let e = errors(&text);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:4:10: exports[0].format: unknown variant `qcow2`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn field_paths_drop_the_span_wrappers() {
        assert_eq!(
            field_path(
                "exports[1].$__serde_spanned_private_value.image.$__serde_spanned_private_value"
            ),
            "exports[1].image"
        );
        assert_eq!(field_path("."), "");
        assert_eq!(field_path("listen"), "listen");
    }
}
