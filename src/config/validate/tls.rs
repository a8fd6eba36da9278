//! `[tls]` and the TLS flags: the policy, and the certificate, key and client CA it
//! needs, which must agree with each other.

use super::files::{Files, check_regular_file};
use crate::config::error::Problems;
use crate::config::file::{RawTls, Source};
use crate::config::model::{TlsConfig, TlsMode};
use crate::config::overrides::{Overrides, pick, pick_path};

pub(super) fn tls_settings(
    raw: Option<&RawTls>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) -> TlsConfig {
    let empty = RawTls::default();
    let raw = raw.unwrap_or(&empty);
    let mode = pick(
        flags.tls_mode,
        "--tls",
        raw.mode.as_ref(),
        "tls.mode",
        source,
        |m| m,
    );
    let cert = pick_path(
        flags.tls_cert.as_ref(),
        "--tls-cert",
        raw.cert.as_ref(),
        "tls.cert",
        source,
    );
    let key = pick_path(
        flags.tls_key.as_ref(),
        "--tls-key",
        raw.key.as_ref(),
        "tls.key",
        source,
    );
    let client_ca = pick_path(
        flags.tls_client_ca.as_ref(),
        "--tls-client-ca",
        raw.client_ca.as_ref(),
        "tls.client_ca",
        source,
    );
    for setting in [&cert, &key, &client_ca] {
        check_regular_file(setting, files, problems);
    }
    match (&cert.value, &key.value) {
        (Some(_), None) => problems.add(
            cert.at.clone(),
            cert.name.clone(),
            format!("needs {} too", key.name),
        ),
        (None, Some(_)) => problems.add(
            key.at.clone(),
            key.name.clone(),
            format!("needs {} too", cert.name),
        ),
        _ => {}
    }
    if client_ca.value.is_some() && cert.value.is_none() {
        problems.add(
            client_ca.at.clone(),
            client_ca.name.clone(),
            format!(
                "needs a server certificate ({} and {})",
                cert.name, key.name
            ),
        );
    }
    let has_cert = cert.value.is_some() && key.value.is_some();
    let resolved = mode.value.unwrap_or(if cert.value.is_some() {
        TlsMode::Optional
    } else {
        TlsMode::Off
    });
    match (mode.value, has_cert) {
        (Some(m @ (TlsMode::Optional | TlsMode::Require)), false) if cert.value.is_none() => {
            problems.add(
                mode.at.clone(),
                mode.name.clone(),
                format!(
                    "{} needs {} and {}",
                    mode.with_value(m.word()),
                    cert.name,
                    key.name
                ),
            );
        }
        (Some(TlsMode::Off), _) if cert.value.is_some() => problems.add(
            mode.at.clone(),
            mode.name.clone(),
            format!(
                "{} contradicts {}: drop one of them",
                mode.with_value("off"),
                cert.name
            ),
        ),
        _ => {}
    }
    TlsConfig {
        mode: resolved,
        cert: cert.value,
        key: key.value,
        client_ca: client_ca.value,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn tls_contradictions_are_refused() {
        fails(
            "[tls]\nmode = \"require\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: tls.mode = \"require\" needs tls.cert and tls.key",
        );
        fails(
            "[tls]\nmode = \"off\"\ncert = \"c\"\nkey = \"k\"\n",
            "/etc/strata/strata.toml:2:8: tls.mode: tls.mode = \"off\" contradicts tls.cert: drop one of them",
        );
        fails(
            "[tls]\ncert = \"c\"\n",
            "/etc/strata/strata.toml:2:8: tls.cert: needs tls.key too",
        );
        fails(
            "[tls]\nclient_ca = \"ca\"\n",
            "/etc/strata/strata.toml:2:13: tls.client_ca: needs a server certificate (tls.cert and tls.key)",
        );
    }
}
