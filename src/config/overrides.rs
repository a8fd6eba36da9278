//! The command line's server-wide flags, which win over the file. Validation sees each
//! setting as one [`Setting`] that remembers whether a flag or the file gave it, so that
//! a message quotes it the way the user wrote it (`--tls off` or `tls.mode = "off"`).

use std::path::PathBuf;

use toml::Spanned;

use super::error::Location;
use super::file::{Source, Str};
use super::model::{LogFormat, TlsMode};
use crate::server::ListenAddr;

/// Server-wide settings given as flags; each one set wins over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`, repeated: replaces the file's `listen`.
    pub listen: Vec<ListenAddr>,
    /// `--handshake-timeout SECS`.
    pub handshake_timeout: Option<u64>,
    /// `--max-connections N`.
    pub max_connections: Option<usize>,
    /// `--tls MODE`.
    pub tls_mode: Option<TlsMode>,
    /// `--tls-cert FILE`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key FILE`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca FILE`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--control PATH`.
    pub control_socket: Option<PathBuf>,
    /// `--control-listen HOST:PORT`.
    pub control_listen: Option<ListenAddr>,
    /// `--control-token-file FILE`.
    pub control_token_file: Option<PathBuf>,
    /// `-v` (debug) or `-vv` (trace).
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--pid-file PATH`.
    pub pid_file: Option<PathBuf>,
    /// `--max-connections-per-client N`.
    pub max_connections_per_client: Option<usize>,
    /// `--idle-timeout SECS` (0: never).
    pub idle_timeout: Option<u64>,
    /// `--max-in-flight SIZE`.
    pub max_in_flight: Option<u64>,
    /// `--max-in-flight-total SIZE` (0: no server-wide limit).
    pub max_in_flight_total: Option<u64>,
    /// `--metrics ADDR`.
    pub metrics: Option<ListenAddr>,
}

/// One setting as the validation sees it: its value, the name to report (a flag or a
/// field of the file) and where it is written.
pub(super) struct Setting<T> {
    pub(super) value: T,
    pub(super) name: String,
    pub(super) at: Option<Location>,
    pub(super) from_flag: bool,
}

impl<T> Setting<T> {
    /// How to quote the setting with a value in a message: `--tls off` for a flag,
    /// `tls.mode = "off"` for the file.
    pub(super) fn with_value(&self, value: &str) -> String {
        if self.from_flag {
            format!("{} {value}", self.name)
        } else {
            format!("{} = {value:?}", self.name)
        }
    }
}

/// The flag's value if it was given, else the file's.
pub(super) fn pick<F, T: Clone>(
    flag: Option<F>,
    flag_name: &str,
    file: Option<&Spanned<T>>,
    file_name: &str,
    source: Option<&Source<'_>>,
    convert: impl FnOnce(F) -> T,
) -> Setting<Option<T>> {
    match (flag, file) {
        (Some(v), _) => Setting {
            value: Some(convert(v)),
            name: flag_name.to_owned(),
            at: None,
            from_flag: true,
        },
        (None, Some(v)) => Setting {
            value: Some(v.get_ref().clone()),
            name: file_name.to_owned(),
            at: source.and_then(|s| s.at_of(v)),
            from_flag: false,
        },
        // Unset: name it as the user would set it, in the file if there is one.
        (None, None) => Setting {
            value: None,
            name: if source.is_some() {
                file_name
            } else {
                flag_name
            }
            .to_owned(),
            at: None,
            from_flag: source.is_none(),
        },
    }
}

/// A path setting: the flag's path as given, or the file's resolved against its
/// directory.
pub(super) fn pick_path(
    flag: Option<&PathBuf>,
    flag_name: &str,
    file: Option<&Str>,
    file_name: &str,
    source: Option<&Source<'_>>,
) -> Setting<Option<PathBuf>> {
    let mut setting = pick(flag.cloned(), flag_name, file, file_name, source, |p| {
        p.display().to_string()
    });
    let value = setting.value.take();
    let resolved = match (&value, setting.from_flag, source) {
        (Some(v), false, Some(s)) => Some(s.path(v)),
        (Some(v), _, _) => Some(PathBuf::from(v)),
        (None, _, _) => None,
    };
    Setting {
        value: resolved,
        name: setting.name,
        at: setting.at,
        from_flag: setting.from_flag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Access;
    use crate::config::testing::*;

    #[test]
    fn flags_win_over_the_file() {
        let text = "listen = [\"0.0.0.0:10809\"]\nhandshake_timeout = 5\n\
                    [log]\nformat = \"json\"\nlevel = \"warn\"\n\
                    [tls]\nmode = \"require\"\ncert = \"c\"\nkey = \"k\"\n";
        let flags = Overrides {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            handshake_timeout: Some(30),
            tls_mode: Some(TlsMode::Optional),
            log_level: Some("debug".into()),
            log_format: Some(LogFormat::Text),
            tls_key: Some("/other/key.pem".into()),
            ..Overrides::default()
        };
        let c = load(text, Path::new(FILE), &flags, &Fake(vec![])).unwrap();
        assert_eq!(c.server.listen, flags.listen);
        assert_eq!(c.server.handshake_timeout, Duration::from_secs(30));
        assert_eq!(c.server.tls.mode, TlsMode::Optional);
        assert_eq!(
            c.server.tls.cert.as_deref(),
            Some(Path::new("/etc/strata/c"))
        );
        assert_eq!(
            c.server.tls.key.as_deref(),
            Some(Path::new("/other/key.pem"))
        );
        assert_eq!(c.server.log.level, "debug");
        assert_eq!(c.server.log.format, LogFormat::Text);

        // A flag that contradicts the file is refused, naming both.
        let flags = Overrides {
            tls_mode: Some(TlsMode::Off),
            ..Overrides::default()
        };
        let e = errors_with(text, &flags, &Fake(vec![]));
        assert_eq!(
            e,
            vec!["--tls: --tls off contradicts tls.cert: drop one of them"]
        );
        let flags = Overrides {
            handshake_timeout: Some(0),
            ..Overrides::default()
        };
        let e = errors_with("", &flags, &Fake(vec![]));
        assert_eq!(e, vec!["--handshake-timeout: must be at least 1 second"]);
        // A token from the file completes a TCP listener from the flags.
        let flags = Overrides {
            control_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let c = load(
            "[control]\ntoken_file = \"t\"\n",
            Path::new(FILE),
            &flags,
            &Fake(vec![]),
        );
        assert_eq!(
            c.unwrap().server.control.token_file.as_deref(),
            Some(Path::new("/etc/strata/t"))
        );
    }

    #[test]
    fn flags_alone_make_a_configuration() {
        let flags = Overrides {
            tls_mode: Some(TlsMode::Require),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(e, "--tls: --tls require needs --tls-cert and --tls-key");
        let flags = Overrides {
            tls_cert: Some("c".into()),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(e, "--tls-cert: needs --tls-key too");
        let flags = Overrides {
            control_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        };
        let e = from_flags(&flags, vec![]).unwrap_err().to_string();
        assert_eq!(
            e,
            "--control-listen: the control API on TCP needs a bearer token: set --control-token-file"
        );
        let disk = |name: &str| ExportDef::new(name, "memory:1M", false, None, "", Access::open());
        let e = from_flags(&Overrides::default(), vec![disk("a"), disk("a")]).unwrap_err();
        assert!(e.to_string().contains("two exports are named \"a\""), "{e}");
        let c = from_flags(&Overrides::default(), vec![disk("a"), disk("b")]).unwrap();
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.file, None);
    }
}
