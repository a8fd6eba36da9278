//! `[limits]` and the limit flags: connections per client, the idle timeout, the
//! in-flight budgets.

use std::time::Duration;

use crate::backend::BlockSize;
use crate::config::error::Problems;
use crate::config::file::{RawLimits, Source, Str};
use crate::config::model::{Limits, MAX_CONNECTIONS_LIMIT};
use crate::config::overrides::{Overrides, pick};

/// `[limits]` and the limit flags.
pub(super) fn limits(
    raw: Option<&RawLimits>,
    source: Option<&Source<'_>>,
    flags: &Overrides,
    problems: &mut Problems,
) -> Limits {
    let empty = RawLimits::default();
    let raw = raw.unwrap_or(&empty);
    let mut out = Limits::default();
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let per_client = pick(
        flags.max_connections_per_client.map(|n| count(n as u64)),
        "--max-connections-per-client",
        raw.max_connections_per_client.as_ref(),
        "limits.max_connections_per_client",
        source,
        |v| v,
    );
    match per_client.value {
        None => {}
        Some(n) if (0..=MAX_CONNECTIONS_LIMIT as i64).contains(&n) => {
            out.max_connections_per_client = n.unsigned_abs() as usize;
        }
        Some(_) => problems.add(
            per_client.at,
            per_client.name,
            format!("must be between 0 (no limit) and {MAX_CONNECTIONS_LIMIT}"),
        ),
    }
    let idle = pick(
        flags.idle_timeout.map(count),
        "--idle-timeout",
        raw.idle_timeout.as_ref(),
        "limits.idle_timeout",
        source,
        |v| v,
    );
    match idle.value {
        None | Some(0) => {}
        Some(n) if n > 0 => out.idle_timeout = Some(Duration::from_secs(n.unsigned_abs())),
        Some(_) => problems.add(
            idle.at,
            idle.name,
            "must be 0 (never) or a number of seconds",
        ),
    }
    let size = |flag: Option<u64>, flag_name: &str, file: Option<&Str>, file_name: &str| {
        let setting = pick(
            flag.map(|n| n.to_string()),
            flag_name,
            file,
            file_name,
            source,
            |v| v,
        );
        let value = setting.value.as_deref().map(crate::size::parse_size);
        (setting, value)
    };
    // A budget must hold the largest request, or that request could never run.
    let largest_request = u64::from(BlockSize::MAX_PAYLOAD);
    let largest_request_text = format!("{}M", largest_request >> 20);
    let (setting, value) = size(
        flags.max_in_flight,
        "--max-in-flight",
        raw.max_in_flight.as_ref(),
        "limits.max_in_flight",
    );
    match value {
        None => {}
        Some(Ok(n)) if n >= largest_request => {
            out.max_in_flight = n;
        }
        Some(Ok(_)) => problems.add(
            setting.at,
            setting.name,
            format!("must be at least {largest_request_text}, the largest request"),
        ),
        Some(Err(e)) => problems.add(setting.at, setting.name, e.to_string()),
    }
    let (setting, value) = size(
        flags.max_in_flight_total,
        "--max-in-flight-total",
        raw.max_in_flight_total.as_ref(),
        "limits.max_in_flight_total",
    );
    match value {
        None => {}
        Some(Ok(0)) => out.max_in_flight_total = None,
        // Below max_in_flight, it caps each connection too.
        Some(Ok(n)) if n >= largest_request => {
            out.max_in_flight_total = Some(n);
        }
        Some(Ok(_)) => problems.add(
            setting.at,
            setting.name,
            format!("must be 0 (no limit) or at least {largest_request_text}, the largest request"),
        ),
        Some(Err(e)) => problems.add(setting.at, setting.name, e.to_string()),
    }
    out
}
