//! Prometheus metrics: latency histograms, server-wide counters, and the text format.
//!
//! Everything a request touches is a relaxed atomic: a histogram costs one bucket search
//! over a fixed table and two `fetch_add`s per request, no lock and no allocation. The
//! text is built only when a scraper asks for it ([`render`]), from a sample of every
//! export's counters ([`ExportSample`], which the exports take of their own counters) and
//! the server's ([`ServerStats`]). This module knows nothing of exports beyond those
//! samples.
//!
//! Names follow Prometheus conventions: a `strata_` prefix, `_total` on counters, base
//! units (`_seconds`, `_bytes`), histograms as cumulative `_bucket{le=...}` series with
//! `_sum` and `_count`, and a `# HELP` and `# TYPE` line per family.
//!
//! The text format is written here rather than by a metrics crate on purpose: the crates
//! (`prometheus`, `metrics` with an exporter) keep their own registries of boxed,
//! label-keyed series behind locks or hash maps, which would put a lookup on the request
//! path or a second copy of every counter beside the export's own atomics. What is
//! rendered is a few dozen families of a fixed shape, and the format (one line per
//! sample, three characters escaped in label values) is small and pinned by tests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::proto::Command;
use crate::proto::consts::errno;

/// Upper bounds of the latency buckets, in nanoseconds: 25 µs to 10 s, roughly 1-2.5-5
/// per decade, which covers requests served from memory as well as a flush to a disk.
pub const LATENCY_BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets stored: one per bound, and one for slower requests (`+Inf`).
const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A latency histogram with fixed buckets. Each bucket counts its own requests (not
/// cumulatively), so recording touches one bucket; the count is the buckets' sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// A copy of a [`Histogram`], cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Requests at or below each bound of [`LATENCY_BOUNDS_NS`], then all of them.
    pub cumulative: [u64; BUCKETS],
    /// Total time of all requests, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.cumulative[BUCKETS - 1]
    }
}

impl Histogram {
    /// Records one request that took `elapsed`.
    #[inline]
    pub fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Most requests land in the first few buckets, so a forward scan beats a binary
        // search here.
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The buckets, made cumulative.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; BUCKETS];
        let mut running = 0u64;
        for (out, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            running = running.wrapping_add(bucket.load(Ordering::Relaxed));
            *out = running;
        }
        HistogramSnapshot {
            cumulative,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The kinds of request with a latency histogram and a request counter, in the order
/// [`op_index`] numbers them.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

/// The position of `command` in [`OPS`], if it is a kind of request that runs.
#[inline]
pub fn op_index(command: Command) -> Option<usize> {
    Some(match command {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::BlockStatus => 5,
        Command::Cache => 6,
        Command::Disconnect | Command::Resize | Command::Unknown(_) => return None,
    })
}

/// The errnos sent to clients, with their names, in the order errors are counted;
/// anything else is counted as the last, `other`.
pub const ERRNOS: [(u32, &str); 9] = [
    (errno::EPERM, "EPERM"),
    (errno::EIO, "EIO"),
    (errno::ENOMEM, "ENOMEM"),
    (errno::EINVAL, "EINVAL"),
    (errno::ENOSPC, "ENOSPC"),
    (errno::EOVERFLOW, "EOVERFLOW"),
    (errno::ENOTSUP, "ENOTSUP"),
    (errno::ESHUTDOWN, "ESHUTDOWN"),
    (0, "other"),
];

/// The position of `code` in [`ERRNOS`].
#[inline]
pub fn errno_index(code: u32) -> usize {
    ERRNOS
        .iter()
        .position(|&(e, _)| e == code)
        .unwrap_or(ERRNOS.len() - 1)
}

/// Why a handshake ended without a session, as counted by
/// `strata_handshakes_failed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The handshake deadline passed.
    Timeout,
    /// The client broke the protocol.
    Protocol,
    /// The TLS handshake failed.
    Tls,
    /// The client went away (closed, reset) before choosing an export.
    Disconnected,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Protocol,
        HandshakeFailure::Tls,
        HandshakeFailure::Disconnected,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Disconnected => "disconnected",
        }
    }
}

/// Why a connection was closed on accept, as counted by
/// `strata_connections_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `--max-connections` connections.
    MaxConnections,
    /// The client's address holds `--max-connections-per-client` connections.
    PerClient,
}

/// Server-wide counters, shared by the accept loops and connections. Events are rare
/// (one per connection at most), but they are relaxed atomics all the same.
#[derive(Debug)]
pub struct ServerStats {
    started: Instant,
    accepted: AtomicU64,
    refused: [AtomicU64; 2],
    handshakes_failed: [AtomicU64; 4],
    idle_closed: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            started: Instant::now(),
            accepted: AtomicU64::new(0),
            refused: Default::default(),
            handshakes_failed: Default::default(),
            idle_closed: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    /// Counts a connection that was accepted and given a slot.
    pub fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed on accept.
    pub fn count_refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a handshake that ended without a session.
    pub fn count_handshake_failure(&self, why: HandshakeFailure) {
        self.handshakes_failed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session closed by the idle timeout.
    pub fn count_idle_closed(&self) {
        self.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed on accept for `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Handshakes that failed for `why`.
    pub fn handshakes_failed(&self, why: HandshakeFailure) -> u64 {
        self.handshakes_failed[why as usize].load(Ordering::Relaxed)
    }

    /// Sessions closed by the idle timeout.
    pub fn idle_closed(&self) -> u64 {
        self.idle_closed.load(Ordering::Relaxed)
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Server-wide gauges read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Connections open now (handshake or transmission).
    pub connections: u64,
    /// `--max-connections`.
    pub max_connections: u64,
    /// Bytes of request and reply data in flight on all connections.
    pub in_flight_bytes: u64,
    /// The server-wide in-flight budget, when there is one.
    pub in_flight_limit: Option<u64>,
}

/// One export's counters, read at scrape time for [`render`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSample {
    /// The export's name.
    pub name: String,
    /// Clients in the transmission phase now.
    pub connections: u64,
    /// Clients that reached the transmission phase.
    pub total_connections: u64,
    /// Bytes asked for by the reads executed.
    pub bytes_read: u64,
    /// Bytes carried by the writes executed.
    pub bytes_written: u64,
    /// Requests executed, by kind, in the order of [`OPS`].
    pub requests: [u64; OPS.len()],
    /// Requests answered with an error, by errno, in the order of [`ERRNOS`].
    pub errors: [u64; ERRNOS.len()],
    /// Latency by kind of request, in the order of [`OPS`].
    pub latency: [HistogramSnapshot; OPS.len()],
    /// The restore points and space of the volume with history the export serves, if
    /// it serves one.
    pub history: Option<HistorySample>,
}

/// The state of a volume with history, read at scrape time for [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySample {
    /// Restore points kept.
    pub points: u64,
    /// How old the oldest point kept is; `None` before the first point.
    pub oldest_point_age: Option<Duration>,
    /// Bytes of log holding no current version: history, and garbage not yet reclaimed.
    pub history_bytes: u64,
    /// Bytes the reclaimer copied since the volume was opened.
    pub reclaimed_bytes: u64,
    /// Points dropped inside the window because the history was over its byte cap, since
    /// the volume was opened.
    pub dropped_for_space: u64,
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a Prometheus float: integers without a fraction, `+Inf` for infinity.
fn float(out: &mut String, v: f64) {
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(exports: &[ExportSample], server: &ServerStats, gauges: Gauges) -> String {
    let mut out = String::with_capacity(4096 + exports.len() * 16 * 1024);
    render_server(&mut out, server, gauges);
    render_exports(&mut out, exports);
    out
}

fn render_server(out: &mut String, server: &ServerStats, g: Gauges) {
    family(
        out,
        "strata_build_info",
        "gauge",
        "Strata's version; always 1.",
    );
    let _ = writeln!(
        out,
        "strata_build_info{{version=\"{}\"}} 1",
        escape_label(env!("CARGO_PKG_VERSION"))
    );
    family(
        out,
        "strata_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    out.push_str("strata_uptime_seconds ");
    float(out, server.uptime().as_secs_f64());
    out.push('\n');
    family(
        out,
        "strata_connections",
        "gauge",
        "Connections open now, in the handshake or in transmission.",
    );
    let _ = writeln!(out, "strata_connections {}", g.connections);
    family(
        out,
        "strata_connections_limit",
        "gauge",
        "Connections served at once at most (--max-connections).",
    );
    let _ = writeln!(out, "strata_connections_limit {}", g.max_connections);
    family(
        out,
        "strata_connections_accepted_total",
        "counter",
        "Connections accepted and given a slot.",
    );
    let _ = writeln!(
        out,
        "strata_connections_accepted_total {}",
        server.accepted()
    );
    family(
        out,
        "strata_connections_refused_total",
        "counter",
        "Connections closed on accept by a limit.",
    );
    for (why, label) in [
        (Refusal::MaxConnections, "max_connections"),
        (Refusal::PerClient, "per_client"),
    ] {
        let _ = writeln!(
            out,
            "strata_connections_refused_total{{reason=\"{label}\"}} {}",
            server.refused(why)
        );
    }
    family(
        out,
        "strata_handshakes_failed_total",
        "counter",
        "Handshakes that ended without a session, by reason.",
    );
    for why in HandshakeFailure::ALL {
        let _ = writeln!(
            out,
            "strata_handshakes_failed_total{{reason=\"{}\"}} {}",
            why.label(),
            server.handshakes_failed(why)
        );
    }
    family(
        out,
        "strata_idle_disconnects_total",
        "counter",
        "Sessions closed by the idle timeout.",
    );
    let _ = writeln!(
        out,
        "strata_idle_disconnects_total {}",
        server.idle_closed()
    );
    family(
        out,
        "strata_in_flight_bytes",
        "gauge",
        "Bytes of request and reply data charged to the in-flight budgets now.",
    );
    let _ = writeln!(out, "strata_in_flight_bytes {}", g.in_flight_bytes);
    if let Some(limit) = g.in_flight_limit {
        family(
            out,
            "strata_in_flight_limit_bytes",
            "gauge",
            "The server-wide in-flight budget (--max-in-flight-total).",
        );
        let _ = writeln!(out, "strata_in_flight_limit_bytes {limit}");
    }
}

/// A family with one integer sample per export, given as (escaped name, value).
fn per_export<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a String, u64)>,
) {
    family(out, name, kind, help);
    for (export, v) in rows {
        let _ = writeln!(out, "{name}{{export=\"{export}\"}} {v}");
    }
}

fn render_exports(out: &mut String, exports: &[ExportSample]) {
    let labels: Vec<String> = exports.iter().map(|e| escape_label(&e.name)).collect();
    let samples = || labels.iter().zip(exports);
    let simple =
        |out: &mut String, name: &str, kind: &str, help: &str, get: fn(&ExportSample) -> u64| {
            per_export(out, name, kind, help, samples().map(|(e, s)| (e, get(s))));
        };
    simple(
        out,
        "strata_export_connections",
        "gauge",
        "Clients in the transmission phase now.",
        |e| e.connections,
    );
    simple(
        out,
        "strata_export_connections_total",
        "counter",
        "Clients that reached the transmission phase.",
        |e| e.total_connections,
    );
    simple(
        out,
        "strata_export_read_bytes_total",
        "counter",
        "Bytes asked for by the reads executed.",
        |e| e.bytes_read,
    );
    simple(
        out,
        "strata_export_written_bytes_total",
        "counter",
        "Bytes carried by the writes executed.",
        |e| e.bytes_written,
    );
    family(
        out,
        "strata_export_requests_total",
        "counter",
        "Requests executed, by operation.",
    );
    for (export, sample) in samples() {
        for (name, n) in OPS.iter().zip(&sample.requests) {
            let _ = writeln!(
                out,
                "strata_export_requests_total{{export=\"{export}\",op=\"{name}\"}} {n}"
            );
        }
    }
    family(
        out,
        "strata_export_errors_total",
        "counter",
        "Requests answered with an error (refused ones included), by errno.",
    );
    for (export, sample) in samples() {
        for ((_, name), n) in ERRNOS.iter().zip(&sample.errors) {
            let _ = writeln!(
                out,
                "strata_export_errors_total{{export=\"{export}\",errno=\"{name}\"}} {n}"
            );
        }
    }
    let name = "strata_export_request_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "Time from a request's dispatch to its encoded reply, by operation.",
    );
    for (export, sample) in samples() {
        for (op_name, h) in OPS.iter().zip(&sample.latency) {
            let labels = format!("export=\"{export}\",op=\"{op_name}\"");
            for (bound, n) in LATENCY_BOUNDS_NS.iter().zip(&h.cumulative) {
                let _ = write!(out, "{name}_bucket{{{labels},le=\"");
                float(out, *bound as f64 / 1e9);
                let _ = writeln!(out, "\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count());
            let _ = write!(out, "{name}_sum{{{labels}}} ");
            float(out, h.sum_ns as f64 / 1e9);
            out.push('\n');
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
        }
    }
    render_history(out, &labels, exports);
}

/// The families of volumes with history, rendered only when an export serves one.
fn render_history(out: &mut String, labels: &[String], exports: &[ExportSample]) {
    let with_history: Vec<(&String, HistorySample)> = labels
        .iter()
        .zip(exports)
        .filter_map(|(label, e)| Some((label, e.history?)))
        .collect();
    if with_history.is_empty() {
        return;
    }
    let simple =
        |out: &mut String, name: &str, kind: &str, help: &str, get: fn(&HistorySample) -> u64| {
            let rows = with_history.iter().map(|(e, s)| (*e, get(s)));
            per_export(out, name, kind, help, rows);
        };
    simple(
        out,
        "strata_export_history_points",
        "gauge",
        "Restore points kept by the volume with history the export serves.",
        |h| h.points,
    );
    let name = "strata_export_history_oldest_point_age_seconds";
    family(
        out,
        name,
        "gauge",
        "Age of the oldest restore point kept (absent before the first point).",
    );
    for (export, sample) in &with_history {
        if let Some(age) = sample.oldest_point_age {
            let _ = write!(out, "{name}{{export=\"{export}\"}} ");
            float(out, age.as_secs_f64());
            out.push('\n');
        }
    }
    simple(
        out,
        "strata_export_history_bytes",
        "gauge",
        "Bytes of the volume's log holding no current version: history and garbage.",
        |h| h.history_bytes,
    );
    simple(
        out,
        "strata_export_history_reclaimed_bytes_total",
        "counter",
        "Bytes copied out of mostly-unread segments to free them, since the volume was opened.",
        |h| h.reclaimed_bytes,
    );
    simple(
        out,
        "strata_export_history_points_dropped_for_space_total",
        "counter",
        "Restore points dropped inside the window because the history was over its byte cap, since the volume was opened.",
        |h| h.dropped_for_space,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(25));
        h.record(Duration::from_micros(26));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2, "<= 25 µs");
        assert_eq!(s.cumulative[1], 3, "<= 50 µs");
        assert_eq!(s.cumulative[6], 3, "<= 2.5 ms");
        assert_eq!(s.cumulative[7], 4, "<= 5 ms");
        assert_eq!(s.cumulative[BUCKETS - 2], 4, "<= 10 s");
        assert_eq!(s.count(), 5);
        assert_eq!(
            s.sum_ns,
            10_000 + 25_000 + 26_000 + 3_000_000 + 60_000_000_000
        );
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("plain-name_1"), "plain-name_1");
    }

    #[test]
    fn errnos_have_indexes() {
        assert_eq!(ERRNOS[errno_index(errno::EIO)].1, "EIO");
        assert_eq!(ERRNOS[errno_index(errno::ENOSPC)].1, "ENOSPC");
        assert_eq!(ERRNOS[errno_index(12345)].1, "other");
    }

    #[test]
    fn renders_every_family_once_with_help_and_type() {
        let read = Histogram::default();
        read.record(Duration::from_micros(30));
        let none = Histogram::default().snapshot();
        let mut latency = [(); OPS.len()].map(|()| none.clone());
        latency[op_index(Command::Read).unwrap()] = read.snapshot();
        let mut requests = [0; OPS.len()];
        requests[op_index(Command::Read).unwrap()] = 1;
        let mut errors = [0; ERRNOS.len()];
        errors[errno_index(errno::EIO)] = 1;
        let export = ExportSample {
            name: "d\"isk".to_owned(),
            connections: 0,
            total_connections: 0,
            bytes_read: 4096,
            bytes_written: 0,
            requests,
            errors,
            latency,
            history: None,
        };
        let server = ServerStats::default();
        server.count_accepted();
        server.count_refused(Refusal::PerClient);
        server.count_handshake_failure(HandshakeFailure::Timeout);
        let text = render(
            &[export],
            &server,
            Gauges {
                connections: 1,
                max_connections: 10,
                in_flight_bytes: 0,
                in_flight_limit: Some(1 << 30),
            },
        );
        let mut families = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(families.insert(name.to_owned()), "{name} twice");
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
            }
        }
        assert!(families.len() >= 15, "{families:?}");
        for expected in [
            "strata_connections_accepted_total 1",
            "strata_connections_refused_total{reason=\"per_client\"} 1",
            "strata_handshakes_failed_total{reason=\"timeout\"} 1",
            "strata_export_requests_total{export=\"d\\\"isk\",op=\"read\"} 1",
            "strata_export_read_bytes_total{export=\"d\\\"isk\"} 4096",
            "strata_export_errors_total{export=\"d\\\"isk\",errno=\"EIO\"} 1",
            "strata_export_request_duration_seconds_bucket{export=\"d\\\"isk\",op=\"read\",le=\"0.000025\"} 0",
            "strata_export_request_duration_seconds_bucket{export=\"d\\\"isk\",op=\"read\",le=\"0.00005\"} 1",
            "strata_export_request_duration_seconds_bucket{export=\"d\\\"isk\",op=\"read\",le=\"+Inf\"} 1",
            "strata_export_request_duration_seconds_count{export=\"d\\\"isk\",op=\"read\"} 1",
            "strata_in_flight_limit_bytes 1073741824",
            "strata_build_info{version=\"",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("strata_export_history_"),
            "history families without a volume with history"
        );
    }

    fn empty_sample(name: &str) -> ExportSample {
        let none = Histogram::default().snapshot();
        ExportSample {
            name: name.to_owned(),
            connections: 0,
            total_connections: 0,
            bytes_read: 0,
            bytes_written: 0,
            requests: [0; OPS.len()],
            errors: [0; ERRNOS.len()],
            latency: [(); OPS.len()].map(|()| none.clone()),
            history: None,
        }
    }

    #[test]
    fn history_series_belong_to_exports_with_history() {
        let plain = empty_sample("plain");
        let fresh = ExportSample {
            history: Some(HistorySample {
                points: 0,
                oldest_point_age: None,
                history_bytes: 0,
                reclaimed_bytes: 0,
                dropped_for_space: 0,
            }),
            ..empty_sample("fresh")
        };
        let busy = ExportSample {
            history: Some(HistorySample {
                points: 12,
                oldest_point_age: Some(Duration::from_millis(61_500)),
                history_bytes: 1 << 20,
                reclaimed_bytes: 65536,
                dropped_for_space: 3,
            }),
            ..empty_sample("busy")
        };
        let text = render(
            &[plain, fresh, busy],
            &ServerStats::default(),
            Gauges::default(),
        );
        for expected in [
            "# TYPE strata_export_history_points gauge",
            "# TYPE strata_export_history_oldest_point_age_seconds gauge",
            "# TYPE strata_export_history_bytes gauge",
            "# TYPE strata_export_history_reclaimed_bytes_total counter",
            "# TYPE strata_export_history_points_dropped_for_space_total counter",
            "strata_export_history_points{export=\"fresh\"} 0",
            "strata_export_history_points{export=\"busy\"} 12",
            "strata_export_history_oldest_point_age_seconds{export=\"busy\"} 61.5",
            "strata_export_history_bytes{export=\"busy\"} 1048576",
            "strata_export_history_reclaimed_bytes_total{export=\"busy\"} 65536",
            "strata_export_history_points_dropped_for_space_total{export=\"busy\"} 3",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("strata_export_history_points{export=\"plain\"}"));
        assert!(
            !text.contains("strata_export_history_oldest_point_age_seconds{export=\"fresh\"}"),
            "no age before the first point"
        );
    }
}
