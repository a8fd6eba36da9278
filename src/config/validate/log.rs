//! `[log]`, `-v` and `--log-format`. The filter is checked here, at start-up and at
//! every reload, because the logger itself only warns about a directive it cannot read
//! and then drops it.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Directive;

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
    let text = level.value.as_deref().unwrap_or(DEFAULT_LOG_LEVEL);
    let filter = match log_filter(text) {
        Ok(filter) => filter,
        Err(why) => {
            problems.add(level.at.clone(), level.name.clone(), why);
            text.to_owned()
        }
    };
    LogSettings {
        level: filter,
        format: format.value.unwrap_or_default(),
    }
}

/// Checks a filter as `RUST_LOG` takes it and returns it as the logger must receive it.
///
/// Each directive (`info`, `strata::server=debug`, `strata[conn{peer}]=trace`) is
/// parsed by the logging library's own parser, so whatever it accepts is accepted here
/// and its error says what it refuses. Two things are added to it. Spaces around
/// directives are dropped, as people write `info, hyper=off`, which the library would
/// misread. And a bare word must be a level: the library takes any other word as a
/// target to enable, which silences everything else, so a typo such as `verbose` is an
/// error instead.
fn log_filter(text: &str) -> Result<String, String> {
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("is empty".to_owned());
    }
    for directive in &directives {
        let bare_word = !directive.contains(['=', '[']);
        if bare_word && directive.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} is not a level: use off, error, warn, info, debug or trace, or \
                 directives such as \"info,strata::server=debug\""
            ));
        }
        if let Err(e) = directive.parse::<Directive>() {
            return Err(format!(
                "{directive:?} is not a valid directive ({e}): write LEVEL, TARGET=LEVEL or \
                 TARGET[SPAN{{FIELD}}]=LEVEL, such as \"strata::server=debug\""
            ));
        }
    }
    Ok(directives.join(","))
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
        assert!(log_filter("warn,strata=trace, hyper=off").is_ok());
        assert!(log_filter("=debug").is_err());
        assert!(log_filter("strata=loud").is_err());
    }

    #[test]
    fn filters_are_read_as_the_logger_reads_them() {
        // Spans and fields, which the logger understands, are accepted.
        for good in [
            "strata[conn]=debug",
            "info,strata::server[session{peer}]=trace",
            "[handshake]=debug",
            "WARN",
        ] {
            assert_eq!(log_filter(good).as_deref(), Ok(good), "{good}");
        }
        // The logger gets the directives without the spaces it would misread.
        assert_eq!(
            log_filter(" warn,strata=trace, hyper=off ").as_deref(),
            Ok("warn,strata=trace,hyper=off")
        );
        let c = parse_ok("[log]\nlevel = \"info, strata[conn]=debug\"\n");
        assert_eq!(c.server.log.level, "info,strata[conn]=debug");
        // What the logger cannot read is refused, with its reason.
        fails(
            "[log]\nlevel = \"info,strata[conn=debug\"\n",
            "/etc/strata/strata.toml:2:9: log.level: \"strata[conn=debug\" is not a valid \
             directive (invalid filter directive): write LEVEL, TARGET=LEVEL or \
             TARGET[SPAN{FIELD}]=LEVEL, such as \"strata::server=debug\"",
        );
        let e = log_filter("strata=loud").unwrap_err();
        assert!(
            e.starts_with("\"strata=loud\" is not a valid directive (error parsing level filter"),
            "{e}"
        );
        assert_eq!(log_filter(" , ").unwrap_err(), "is empty");
    }
}
