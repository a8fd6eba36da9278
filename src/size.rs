//! Human-friendly sizes: `512`, `64K`, `1G`, `2TiB`.
//!
//! Written here rather than taken from a size-parsing crate, because the rules are the
//! project's own and small: every suffix is a power of 1024 whether it is written `G`,
//! `GB` or `GiB` (as disk tools mean them, where the crates read `G`/`GB` as powers of
//! 1000 or need configuring), only whole numbers are taken, so a size is always exact
//! (no `1.5G` rounded through a float), a size past `u64` is refused rather than
//! wrapped, and the messages are the ones the configuration and the command line
//! report and their tests pin (`invalid size "lots": expected a number with an optional
//! K/M/G/T suffix`).

use crate::error::{Error, ErrorKind, Result};

/// Parses a byte count with an optional binary suffix (K, M, G, T, P, E; with or without
/// `iB`/`B`). Suffixes are powers of 1024, as disk tools use them.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let bad = || {
        Error::msg(
            ErrorKind::InvalidInput,
            format!("invalid size {text:?}: expected a number with an optional K/M/G/T suffix"),
        )
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| {
        Error::msg(
            ErrorKind::InvalidInput,
            format!("size {text:?} is too large"),
        )
    })
}

/// Formats a byte count for people: `512 B`, `64 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::{format_size, parse_size};

    #[test]
    fn formatting() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("3m").unwrap(), 3 << 20);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
