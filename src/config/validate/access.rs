//! Access rules, in `[access]` (the defaults, and the rules of exports added through the
//! control API) and in each export; and the rules that only work with TLS settings.

use toml::Spanned;

use crate::access::{Access, NetworkRule};
use crate::config::error::{Location, Problems};
use crate::config::file::{Source, Str};
use crate::config::model::{ExportDef, TlsConfig, TlsMode};

/// Reads allow lists and `require_tls`, wherever they appear (`[access]` or an export).
/// Returns the rules, whether the export set each part itself, and reports bad values.
pub(super) fn rules(
    allow: Option<&Spanned<Vec<Str>>>,
    allow_identity: Option<&Spanned<Vec<Str>>>,
    require_tls: Option<&Spanned<bool>>,
    prefix: &str,
    source: &Source<'_>,
    problems: &mut Problems,
) -> (Access, [bool; 3]) {
    let mut networks = Vec::new();
    for (i, entry) in allow
        .map(|l| l.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match entry.get_ref().parse::<NetworkRule>() {
            Ok(rule) => networks.push(rule),
            Err(e) => problems.add(
                source.at_of(entry),
                format!("{prefix}.allow[{i}]"),
                e.to_string(),
            ),
        }
    }
    let mut identities = Vec::new();
    for (i, entry) in allow_identity
        .map(|l| l.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if entry.get_ref().trim().is_empty() {
            problems.add(
                source.at_of(entry),
                format!("{prefix}.allow_identity[{i}]"),
                "is empty",
            );
        } else {
            identities.push(entry.get_ref().clone());
        }
    }
    let tls = require_tls.is_some_and(|r| *r.get_ref());
    (
        Access::new(networks, identities).with_tls_required(tls),
        [
            allow.is_some(),
            allow_identity.is_some(),
            require_tls.is_some(),
        ],
    )
}

/// Rules that need TLS settings: `require_tls` needs TLS on, identities need a client CA.
pub(super) fn check_rules_tls(
    require_tls: Option<Location>,
    allow_identity: Option<Location>,
    prefix: &str,
    tls: &TlsConfig,
    problems: &mut Problems,
) {
    if let Some(at) = require_tls {
        if tls.mode == TlsMode::Off {
            problems.add(
                Some(at),
                format!("{prefix}.require_tls"),
                "needs TLS on the server: set tls.cert and tls.key",
            );
        }
    }
    if let Some(at) = allow_identity {
        if tls.client_ca.is_none() {
            problems.add(
                Some(at),
                format!("{prefix}.allow_identity"),
                "needs tls.client_ca: identities come from verified client certificates",
            );
        }
    }
}

pub(in crate::config) fn check_exports_tls(
    exports: &[ExportDef],
    tls: &TlsConfig,
    problems: &mut Problems,
) {
    for e in exports {
        check_rules_tls(
            e.at.require_tls.clone(),
            e.at.allow_identity.clone(),
            &e.at.field,
            tls,
            problems,
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::*;

    #[test]
    fn rules_that_need_tls_are_refused_without_it() {
        let text = format!("{EXPORT}require_tls = true\n");
        fails(
            &text,
            "/etc/strata/strata.toml:4:15: exports[0].require_tls: needs TLS on the server: set tls.cert and tls.key",
        );
        let text =
            format!("[tls]\ncert = \"c\"\nkey = \"k\"\n{EXPORT}allow_identity = [\"vmhost1\"]\n");
        fails(
            &text,
            "/etc/strata/strata.toml:7:18: exports[0].allow_identity: needs tls.client_ca: \
             identities come from verified client certificates",
        );
        fails(
            "[access]\nrequire_tls = true\n",
            "/etc/strata/strata.toml:2:15: access.require_tls: needs TLS on the server: set tls.cert and tls.key",
        );
    }
}
