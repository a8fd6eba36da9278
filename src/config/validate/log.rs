//! `[log]`, `-v` and `--log-format`.

use crate::config::error::Problems;
use crate::config::file::{RawLog, Source};
use crate::config::model::{DEFAULT_LOG_LEVEL, LogSettings};
use crate::config::overrides::{Overrides, pick};

pub(super) fn log_settings(
    raw: Option<&RawLog>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> LogSettings {
    let empty = RawLog::default();
    let raw = raw.unwrap_or(&empty);
    let level = pick(
        flags.log_level.clone(),
        "-v",
        raw.level.as_ref(),
        "log.level",
        source,
        |l| l,
    );
    let format = pick(
        flags.log_format,
        "--log-format",
        raw.format.as_ref(),
        "log.format",
        source,
        |f| f,
    );
    let text = level
        .value
        .clone()
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    if let Err(why) = check_log_filter(&text) {
        problems.add(level.at.clone(), level.name.clone(), why);
    }
    LogSettings {
        level: text,
        format: format.value.unwrap_or_default(),
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Accepts what `RUST_LOG` takes in practice: a level, or comma-separated directives
/// `LEVEL` or `TARGET=LEVEL`. A bare word that is not a level would be taken by the
/// logging library as a target to enable, which silences everything else: a typo such
/// as `verbose` must be an error instead.
fn check_log_filter(text: &str) -> Result<(), String> {
    let bad = |d: &str| {
        format!(
            "{d:?} is not a level: use off, error, warn, info, debug or trace, or \
             directives such as \"info,strata::server=debug\""
        )
    };
    if text.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    for directive in text.split(',') {
        let directive = directive.trim();
        let level = match directive.split_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(bad(directive)),
            None => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(bad(directive));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn bad_levels_name_the_field() {
        fails(
            "[log]\nlevel = \"verbose\"\n",
            "/etc/strata/strata.toml:2:9: log.level: \"verbose\" is not a level: use off, error, \
             warn, info, debug or trace, or directives such as \"info,strata::server=debug\"",
        );
        assert!(check_log_filter("warn,strata=trace, hyper=off").is_ok());
        assert!(check_log_filter("=debug").is_err());
        assert!(check_log_filter("strata=loud").is_err());
    }
}
