//! `[control]` and the control API's flags: a Unix socket, or TCP, which is only ever
//! served with a bearer token.

use super::files::{Files, check_regular_file};
use crate::config::error::Problems;
use crate::config::file::{RawControl, Source};
use crate::config::model::ControlSettings;
use crate::config::overrides::{Overrides, Setting, pick_path};
use crate::server::ListenAddr;

pub(super) fn control_settings(
    raw: Option<&RawControl>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> ControlSettings {
    let empty = RawControl::default();
    let raw = raw.unwrap_or(&empty);
    let socket = pick_path(
        flags.control_socket.as_ref(),
        "--control",
        raw.socket.as_ref(),
        "control.socket",
        source,
    );
    let token = pick_path(
        flags.control_token_file.as_ref(),
        "--control-token-file",
        raw.token_file.as_ref(),
        "control.token_file",
        source,
    );
    let listen_setting = match (&flags.control_listen, &raw.listen) {
        (Some(addr), _) => Setting {
            value: Some(Ok(addr.clone())),
            name: "--control-listen".to_owned(),
            at: None,
            from_flag: true,
        },
        (None, Some(text)) => Setting {
            value: Some(text.get_ref().parse::<ListenAddr>()),
            name: "control.listen".to_owned(),
            at: source.and_then(|s| s.at_of(text)),
            from_flag: false,
        },
        (None, None) => Setting {
            value: None,
            name: if source.is_some() {
                "control.listen"
            } else {
                "--control-listen"
            }
            .to_owned(),
            at: None,
            from_flag: source.is_none(),
        },
    };
    let listen = match &listen_setting.value {
        None => None,
        Some(Ok(ListenAddr::Tcp(addr))) => Some(*addr),
        Some(Ok(ListenAddr::Unix(_))) => {
            let socket_name = if listen_setting.from_flag {
                "--control PATH"
            } else {
                "control.socket"
            };
            problems.add(
                listen_setting.at.clone(),
                listen_setting.name.clone(),
                format!("takes HOST:PORT; use {socket_name} for a Unix socket"),
            );
            None
        }
        Some(Err(e)) => {
            problems.add(
                listen_setting.at.clone(),
                listen_setting.name.clone(),
                e.to_string(),
            );
            None
        }
    };
    if listen_setting.value.is_some() && token.value.is_none() {
        problems.add(
            listen_setting.at.clone(),
            listen_setting.name.clone(),
            format!(
                "the control API on TCP needs a bearer token: set {}",
                token.name
            ),
        );
    }
    if token.value.is_some() && listen_setting.value.is_none() {
        problems.add(
            token.at.clone(),
            token.name.clone(),
            format!(
                "is only used by a TCP control listener, and {} is not set",
                listen_setting.name
            ),
        );
    }
    if socket
        .value
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add(socket.at.clone(), socket.name.clone(), "is empty");
    }
    check_regular_file(&token, files, problems);
    ControlSettings {
        socket: socket.value,
        listen,
        token_file: token.value,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn control_contradictions_are_refused() {
        fails(
            "[control]\nlisten = \"127.0.0.1:10810\"\n",
            "/etc/strata/strata.toml:2:10: control.listen: the control API on TCP needs a bearer \
             token: set control.token_file",
        );
        fails(
            "[control]\nlisten = \"unix:/run/c.sock\"\ntoken_file = \"t\"\n",
            "/etc/strata/strata.toml:2:10: control.listen: takes HOST:PORT; use control.socket for a Unix socket",
        );
        fails(
            "[control]\ntoken_file = \"t\"\n",
            "/etc/strata/strata.toml:2:14: control.token_file: is only used by a TCP control \
             listener, and control.listen is not set",
        );
    }
}
