//! The configuration of `strata serve`: a TOML file (`--config FILE`) and the command
//! line's flags, turned into one validated [`Config`].
//!
//! Everything here is a pure function of its inputs: the text of the file, the flags
//! ([`Overrides`]) and, for the checks that files exist, a [`Files`] that answers what
//! is at a path ([`SystemFiles`] asks the file system; tests give a fixed answer). Nothing
//! is opened or bound; the server does that with the result.
//!
//! Every problem is reported, not only the first, each naming where it is and which
//! field it concerns:
//!
//! ```text
//! strata.toml:12:9: exports[1].image: file /tank/vms/vm2.strata does not exist
//! strata.toml:3:15: tls.mode: "require" needs tls.cert and tls.key
//! --handshake-timeout: must be at least 1 second
//! ```
//!
//! Indices count from 0, as the file's order does. A malformed file (bad TOML, an
//! unknown key, a value of the wrong type) stops at its first problem, since what
//! follows cannot be read reliably; checks of values then report every problem found.
//!
//! Flags given on the command line win over the file's value of the same setting;
//! flags that describe exports (`IMAGE`, `--export`, `--name`, `--read-only`, ...) cannot
//! be combined with a file, which describes its exports itself (see `docs/deploy.md`).
//!
//! The work is split the way a configuration is read: `file` reads the TOML and keeps
//! the place of every value, `overrides` lets the flags win and remembers which setting
//! came from where, `validate` checks each section of the file into the types of
//! `model`, and `error` collects what is wrong. Only the types, [`load`] and
//! [`from_flags`] are public.

use std::collections::BTreeMap;
use std::path::Path;

mod error;
mod file;
mod model;
mod overrides;
#[cfg(test)]
mod testing;
mod validate;

pub use error::{ConfigError, ConfigErrors, Location};
pub use model::{
    Config, ControlSettings, DEFAULT_LISTEN, DEFAULT_LOG_LEVEL, ExportDef, Limits, LogFormat,
    LogSettings, MAX_CONNECTIONS_LIMIT, ServerSettings, TlsConfig, TlsMode,
};
pub use overrides::Overrides;
pub use validate::{FileKind, Files, SystemFiles};

use error::Problems;
use file::{RawConfig, Source, read_raw};
use validate::{check_exports_tls, exports, server_settings};

/// Reads the configuration file `file` whose text is `text`, with the command line's
/// `flags` winning over it, and validates the result. Image, TLS and token files must
/// exist, as `files` says.
pub fn load(
    text: &str,
    file: &Path,
    flags: &Overrides,
    files: &dyn Files,
) -> Result<Config, ConfigErrors> {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let source = Source { file, text, dir };
    let raw = read_raw(&source)?;
    let mut problems = Problems::default();
    let server = server_settings(&raw, Some(&source), flags, Some(files), &mut problems);
    let exports = exports(&raw, &source, server.as_ref(), files, &mut problems);
    if let Some(server) = &server {
        check_exports_tls(&exports, &server.tls, &mut problems);
    }
    let server = match server {
        Some(server) => server,
        None => return Err(ConfigErrors(problems.0)),
    };
    problems.finish(Config {
        file: Some(file.to_path_buf()),
        server,
        exports,
    })
}

/// A configuration from flags alone: the exports of the command line and its settings.
/// Files are not checked here; opening them reports what is wrong.
pub fn from_flags(flags: &Overrides, exports: Vec<ExportDef>) -> Result<Config, ConfigErrors> {
    let mut problems = Problems::default();
    let server = server_settings(&RawConfig::default(), None, flags, None, &mut problems);
    let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
    for e in &exports {
        if seen.insert(&e.name, ()).is_some() {
            problems.add(
                None,
                "",
                format!(
                    "two exports are named {:?}; name them with --export NAME=IMAGE",
                    e.name
                ),
            );
        }
    }
    match server {
        Some(server) => problems.finish(Config {
            file: None,
            server,
            exports,
        }),
        None => Err(ConfigErrors(problems.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Access, NetworkRule};
    use crate::config::testing::*;
    use crate::image::Format;
    use crate::server::{DEFAULT_MAX_CONNECTIONS, ListenAddr};

    #[test]
    fn an_empty_file_means_the_defaults() {
        let c = parse_ok("");
        assert_eq!(c.server.listen, vec!["127.0.0.1:10809".parse().unwrap()]);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.server.tls.mode, TlsMode::Off);
        assert_eq!(c.server.control, ControlSettings::default());
        assert_eq!(c.server.log.level, "info");
        assert_eq!(c.server.log.format, LogFormat::Text);
        assert!(c.server.api_access.is_open());
        assert!(c.exports.is_empty());
        assert_eq!(c.file.as_deref(), Some(Path::new(FILE)));
    }

    #[test]
    fn reads_every_setting() {
        let c = parse_ok(
            r#"
listen = ["0.0.0.0:10809", "[::1]:10810", "unix:nbd.sock"]
handshake_timeout = 5
max_connections = 64
pid_file = "/run/strata/strata.pid"

[tls]
mode = "optional"
cert = "tls/cert.pem"
key = "/etc/strata/tls/key.pem"
client_ca = "tls/ca.pem"

[control]
socket = "/run/strata/control.sock"
listen = "127.0.0.1:10810"
token_file = "token"

[log]
level = "info,strata::server=debug"
format = "json"

[access]
allow = ["10.20.0.0/24", "unix"]

[[exports]]
name = "vm1"
image = "vm1.strata"
description = "web server"
require_tls = true

[[exports]]
name = "golden"
image = "/tank/golden.raw"
read_only = true
format = "raw"
allow = ["192.0.2.7"]
allow_identity = ["vmhost1"]

[[exports]]
name = "scratch"
image = "memory:1G"
"#,
        );
        let s = &c.server;
        assert_eq!(
            s.listen,
            vec![
                "0.0.0.0:10809".parse().unwrap(),
                "[::1]:10810".parse().unwrap(),
                ListenAddr::Unix("/etc/strata/nbd.sock".into()),
            ]
        );
        assert_eq!(s.handshake_timeout, Duration::from_secs(5));
        assert_eq!(s.max_connections, 64);
        assert_eq!(
            s.pid_file.as_deref(),
            Some(Path::new("/run/strata/strata.pid"))
        );
        assert_eq!(
            s.tls,
            TlsConfig {
                mode: TlsMode::Optional,
                cert: Some("/etc/strata/tls/cert.pem".into()),
                key: Some("/etc/strata/tls/key.pem".into()),
                client_ca: Some("/etc/strata/tls/ca.pem".into()),
            }
        );
        assert_eq!(
            s.control,
            ControlSettings {
                socket: Some("/run/strata/control.sock".into()),
                listen: Some("127.0.0.1:10810".parse().unwrap()),
                token_file: Some("/etc/strata/token".into()),
            }
        );
        assert_eq!(s.log.level, "info,strata::server=debug");
        assert_eq!(s.log.format, LogFormat::Json);
        let lan = Access::new(
            vec!["10.20.0.0/24".parse().unwrap(), NetworkRule::Unix],
            vec![],
        );
        assert_eq!(s.api_access, lan);

        let [vm1, golden, scratch] = &c.exports[..] else {
            panic!("three exports: {:?}", c.exports)
        };
        assert_eq!(vm1.name, "vm1");
        assert_eq!(vm1.image, "/etc/strata/vm1.strata");
        assert!(!vm1.read_only);
        assert_eq!(vm1.format, None);
        assert_eq!(vm1.description, "web server");
        assert_eq!(vm1.access, lan.clone().with_tls_required(true));
        assert_eq!(golden.image, "/tank/golden.raw");
        assert!(golden.read_only);
        assert_eq!(golden.format, Some(Format::Raw));
        assert_eq!(
            golden.access,
            Access::new(vec!["192.0.2.7".parse().unwrap()], vec!["vmhost1".into()]),
            "the export's own lists replace those of [access]"
        );
        assert_eq!(scratch.image, "memory:1G");
        assert_eq!(scratch.access, lan);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "handshake_timeout = 0\nmax_connections = 0\n[[exports]]\nname = \"a\"\nimage = \"memory:x\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("handshake_timeout"));
        assert!(e[1].contains("max_connections"));
        assert!(e[2].contains("exports[0].image"));
    }
}
