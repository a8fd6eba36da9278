//! Checks of values, one file per section of `strata.toml`; the top-level keys (listen
//! addresses, the handshake timeout, the connection cap, the pid file, metrics) are
//! checked here. Each check reports every problem it finds and goes on, so one run lists
//! them all.

use std::time::Duration;

use super::error::{Location, Problems};
use super::file::{RawConfig, Source};
use super::model::{DEFAULT_LISTEN, MAX_CONNECTIONS_LIMIT, ServerSettings};
use super::overrides::{Overrides, pick, pick_path};
use crate::access::Access;
use crate::server::{DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, ListenAddr};

mod access;
mod control;
mod exports;
mod files;
mod limits;
mod log;
mod tls;

pub(in crate::config) use access::check_exports_tls;
pub(in crate::config) use exports::exports;
pub use files::{FileKind, Files, SystemFiles};

use access::{check_rules_tls, rules};
use control::control_settings;
use log::log_settings;
use tls::tls_settings;

pub(in crate::config) fn server_settings(
    raw: &RawConfig,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> Option<ServerSettings> {
    let errors_before = problems.0.len();
    let listen = listen_addrs(raw, source, flags, problems);

    let handshake_timeout = pick(
        flags
            .handshake_timeout
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        "--handshake-timeout",
        raw.handshake_timeout.as_ref(),
        "handshake_timeout",
        source,
        |v| v,
    );
    let timeout = match handshake_timeout.value {
        None => DEFAULT_HANDSHAKE_TIMEOUT,
        Some(s) if s >= 1 => Duration::from_secs(s.unsigned_abs()),
        Some(_) => {
            problems.add(
                handshake_timeout.at.clone(),
                handshake_timeout.name.clone(),
                "must be at least 1 second",
            );
            DEFAULT_HANDSHAKE_TIMEOUT
        }
    };

    let max_connections = pick(
        flags
            .max_connections
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        "--max-connections",
        raw.max_connections.as_ref(),
        "max_connections",
        source,
        |v| v,
    );
    let max = match max_connections.value {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if n >= 1 && n.unsigned_abs() <= MAX_CONNECTIONS_LIMIT as u64 => {
            usize::try_from(n).unwrap_or(DEFAULT_MAX_CONNECTIONS)
        }
        Some(_) => {
            problems.add(
                max_connections.at.clone(),
                max_connections.name.clone(),
                format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
            );
            DEFAULT_MAX_CONNECTIONS
        }
    };

    let tls = tls_settings(raw.tls.as_ref(), source, flags, files, problems);
    let control = control_settings(raw.control.as_ref(), source, flags, files, problems);
    let log = log_settings(raw.log.as_ref(), source, flags, problems);
    let pid_file = pick_path(
        flags.pid_file.as_ref(),
        "--pid-file",
        raw.pid_file.as_ref(),
        "pid_file",
        source,
    );
    if pid_file
        .value
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add(pid_file.at.clone(), pid_file.name.clone(), "is empty");
    }
    let api_access = match (&raw.access, source) {
        (Some(a), Some(s)) => {
            rules(
                a.allow.as_ref(),
                a.allow_identity.as_ref(),
                a.require_tls.as_ref(),
                "access",
                s,
                problems,
            )
            .0
        }
        _ => Access::open(),
    };
    if let (Some(a), Some(s)) = (&raw.access, source) {
        check_rules_tls(
            a.require_tls
                .as_ref()
                .filter(|r| *r.get_ref())
                .map(|r| s.at(r.span())),
            a.allow_identity
                .as_ref()
                .filter(|l| !l.get_ref().is_empty())
                .map(|l| s.at(l.span())),
            "access",
            &tls,
            problems,
        );
    }
    let limits = limits::limits(raw.limits.as_ref(), source, flags, problems);
    let metrics = match (&flags.metrics, &raw.metrics) {
        (Some(addr), _) => Some(addr.clone()),
        (None, Some(text)) => match text.get_ref().parse::<ListenAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.add(source.and_then(|s| s.at_of(text)), "metrics", e.to_string());
                None
            }
        },
        (None, None) => None,
    };
    if problems.0.len() > errors_before {
        return None;
    }
    Some(ServerSettings {
        listen,
        handshake_timeout: timeout,
        max_connections: max,
        tls,
        control,
        log,
        pid_file: pid_file.value,
        api_access,
        limits,
        metrics,
    })
}

fn listen_addrs(
    raw: &RawConfig,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> Vec<ListenAddr> {
    if !flags.listen.is_empty() {
        return flags.listen.clone();
    }
    let (Some(list), Some(source)) = (&raw.listen, source) else {
        return vec![DEFAULT_LISTEN];
    };
    if list.get_ref().is_empty() {
        problems.add(
            source.at_of(list),
            "listen",
            "is empty: give at least one address (HOST:PORT, [V6]:PORT or unix:PATH)",
        );
    }
    let mut out: Vec<ListenAddr> = Vec::new();
    for (i, entry) in list.get_ref().iter().enumerate() {
        let field = format!("listen[{i}]");
        match entry.get_ref().parse::<ListenAddr>() {
            Ok(ListenAddr::Unix(p)) => {
                let addr = ListenAddr::Unix(source.path(&p.display().to_string()));
                push_unique(&mut out, addr, source.at_of(entry), field, problems);
            }
            Ok(addr) => push_unique(&mut out, addr, source.at_of(entry), field, problems),
            Err(e) => problems.add(source.at_of(entry), field, e.to_string()),
        }
    }
    out
}

fn push_unique(
    out: &mut Vec<ListenAddr>,
    addr: ListenAddr,
    at: Option<Location>,
    field: String,
    problems: &mut Problems,
) {
    if let Some(first) = out.iter().position(|a| *a == addr) {
        problems.add(
            at,
            field,
            format!("{addr} is listed already, as listen[{first}]"),
        );
    } else {
        out.push(addr);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn bad_values_name_the_field() {
        fails(
            "handshake_timeout = 0\n",
            "/etc/strata/strata.toml:1:21: handshake_timeout: must be at least 1 second",
        );
        fails(
            "handshake_timeout = -3\n",
            "/etc/strata/strata.toml:1:21: handshake_timeout: must be at least 1 second",
        );
        fails(
            "max_connections = 0\n",
            "/etc/strata/strata.toml:1:19: max_connections: must be between 1 and 1048576",
        );
        fails(
            "listen = []\n",
            "/etc/strata/strata.toml:1:10: listen: is empty: give at least one address \
             (HOST:PORT, [V6]:PORT or unix:PATH)",
        );
        let e = errors("listen = [\"127.0.0.1:1\", \"nowhere\"]\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "/etc/strata/strata.toml:1:26: listen[1]: invalid listen address \"nowhere\""
            ),
            "{e:?}"
        );
        fails(
            "listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
            "/etc/strata/strata.toml:1:26: listen[1]: 127.0.0.1:1 is listed already, as listen[0]",
        );
    }
}
