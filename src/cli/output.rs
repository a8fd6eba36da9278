//! How the command line prints: JSON for scripts, and for people aligned tables,
//! `key: value` lists, dates and durations. Every subcommand prints through these, so
//! the same kind of answer looks the same everywhere.

use std::fmt::Write as _;

use serde::Serialize;

/// Prints `value` as pretty JSON on standard output.
pub(crate) fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("strata: cannot encode JSON: {e}"),
    }
}

/// Columns padded to their widest cell; numbers right-aligned.
pub(crate) struct Table {
    pub(crate) headers: &'static [&'static str],
    pub(crate) numeric: &'static [bool],
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    /// The table as lines of text, the header first.
    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.numeric.get(i).copied().unwrap_or(false) {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned.
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{:<width$}  {v}", format!("{k}:"));
    }
    out
}

/// A length of time in seconds, in its two or three largest units (`3h 2m 5s`).
pub(crate) fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = Table {
            headers: &["NAME", "N"],
            numeric: &[false, true],
            rows: vec![
                vec!["a".into(), "100".into()],
                vec!["longer".into(), "2".into()],
            ],
        };
        assert_eq!(t.render(), "NAME      N\na       100\nlonger    2\n");
    }
}
