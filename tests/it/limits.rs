//! Metrics and limits through a real `strata serve`: the metrics endpoint's output is
//! valid Prometheus text whose counters follow real I/O (on `--metrics` and on the
//! control API's `/v1/metrics`); `--max-connections-per-client` refuses the surplus
//! connections of one address only; `--idle-timeout` disconnects idle clients and
//! clients stalled mid-request, not busy ones; `--max-in-flight-total` bounds what all
//! connections together hold.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::client::{Client, Mode, SIMPLE, STRUCTURED};
use crate::support::control::http;
use crate::support::spec::*;
use crate::support::wire::request;
use crate::support::*;

/// Upper bound on waits for the server to act (close a connection, update a gauge).
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// A strict reader of the Prometheus text format (version 0.0.4)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next().ok_or("unterminated label value")?;
            match c {
                '"' => break i,
                '\\' => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => return Err(format!("bad escape \\{other}")),
                },
                '\n' => return Err("newline in a label value".into()),
                c => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by commas".into());
        }
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|_| format!("bad value {v:?}")),
    }
}

/// Parses the whole exposition and checks what the format and the naming conventions
/// require: every sample belongs to a family declared with HELP and TYPE before it,
/// counters end in `_total`, histogram buckets are cumulative with `+Inf` equal to
/// `_count`, no family is declared twice, no sample is repeated.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if !text.ends_with('\n') {
        return Err("the text must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text".into()))?;
            if helps.insert(name.to_owned(), help.to_owned()).is_some() {
                return Err(at(format!("HELP for {name} twice")));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            if !valid_metric_name(name) || !name.starts_with("strata_") {
                return Err(at(format!("bad family name {name}")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at(format!("counter {name} does not end in _total")));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(at(format!("TYPE for {name} twice")));
            }
            if !helps.contains_key(name) {
                return Err(at(format!("TYPE for {name} before its HELP")));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("stray comment or empty line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = parse_value(
            rest.strip_prefix(' ')
                .ok_or_else(|| at("no space before the value".into()))?,
        )
        .map_err(at)?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        let Some(kind) = types.get(family) else {
            return Err(at(format!("{name} has no TYPE before it")));
        };
        if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("a bucket without le".into()));
        }
        if !seen.insert((name.to_owned(), format!("{labels:?}"))) {
            return Err(at("a sample repeated".into()));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    check_histograms(&samples)?;
    Ok(samples)
}

fn check_histograms(samples: &[Sample]) -> Result<(), String> {
    let mut series: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in samples {
        let mut others = s.labels.clone();
        if let Some(base) = s.name.strip_suffix("_bucket") {
            let le = parse_value(&others.remove("le").unwrap())?;
            series
                .entry((base.to_owned(), format!("{others:?}")))
                .or_default()
                .push((le, s.value));
        } else if let Some(base) = s.name.strip_suffix("_count") {
            counts.insert((base.to_owned(), format!("{others:?}")), s.value);
        }
    }
    for (key, buckets) in &series {
        let mut last = (f64::NEG_INFINITY, 0.0);
        for &(le, n) in buckets {
            if le <= last.0 || n < last.1 {
                return Err(format!("{key:?}: buckets not increasing at le={le}"));
            }
            last = (le, n);
        }
        if last.0 != f64::INFINITY {
            return Err(format!("{key:?}: no +Inf bucket"));
        }
        if counts.get(key) != Some(&last.1) {
            return Err(format!("{key:?}: +Inf bucket differs from _count"));
        }
    }
    Ok(())
}

/// Asserts that the sample `name` with `labels` has the value `want`.
#[track_caller]
fn assert_value(samples: &[Sample], name: &str, labels: &[(&str, &str)], want: f64) {
    let got = value(samples, name, labels);
    assert_eq!(got, want, "{name}{labels:?}");
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

fn scrape_unix(path: &Path, route: &str) -> Vec<Sample> {
    let s = UnixStream::connect(path).expect("connect to the metrics socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let r = http(s, "GET", route, &[], None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(r.body).expect("UTF-8");
    parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A metrics endpoint on a Unix socket in a scratch directory.
struct Metrics {
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Metrics {
    fn new() -> Metrics {
        let (dir, socket) = scratch("metrics.sock");
        Metrics { dir, socket }
    }

    /// `--metrics unix:SOCKET`, for the server.
    fn args(&self) -> [String; 2] {
        [
            "--metrics".to_owned(),
            format!("unix:{}", self.socket.display()),
        ]
    }

    /// A server of a `size`-byte memory disk listening on `transport`, with `flag` and
    /// this metrics endpoint.
    fn serve(&self, size: u64, transport: Transport, flag: [&str; 2]) -> Server {
        memory(size)
            .listen(transport)
            .args(flag)
            .args(self.args())
            .start()
    }

    /// What the endpoint serves now.
    fn scrape(&self) -> Vec<Sample> {
        scrape_unix(&self.socket, "/metrics")
    }
}

/// A connection past the handshake to the default export.
fn connected(server: &Server, mode: Mode) -> Client {
    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake_bare("", mode).unwrap();
    c
}

#[test]
fn the_metrics_parser_rejects_what_prometheus_would() {
    let ok =
        "# HELP strata_x_total X.\n# TYPE strata_x_total counter\nstrata_x_total{a=\"q\\\"\"} 1\n";
    assert!(parse_exposition(ok).is_ok());
    for bad in [
        "# HELP strata_x X.\n# TYPE strata_x counter\nstrata_x 1\n",
        "# TYPE strata_x_total counter\nstrata_x_total 1\n",
        "# HELP strata_x_total X.\n# TYPE strata_x_total counter\nstrata_x_total{a=\"q\"\"} 1\n",
        "# HELP strata_x_total X.\n# TYPE strata_x_total counter\nstrata_y_total 1\n",
        "# HELP strata_h H.\n# TYPE strata_h histogram\nstrata_h_bucket{le=\"1\"} 2\nstrata_h_bucket{le=\"+Inf\"} 1\nstrata_h_count 1\n",
        "# HELP strata_x_total X.\n# TYPE strata_x_total counter\nstrata_x_total one\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn metrics_are_prometheus_text_and_follow_real_io() {
    if !strata_only("the metrics endpoint") {
        return;
    }
    let metrics = Metrics::new();
    let control = metrics.dir.path().join("control.sock");
    let server = memory(16 * MIB)
        .listen(Transport::Unix)
        // Every character an export name may hold besides letters and digits. (A `"`,
        // which a label must escape, is no export name; the metrics module's unit tests
        // cover escaping.)
        .name("vm_1.a-b@x")
        .args(metrics.args())
        .args(["--control".as_ref(), control.as_os_str()])
        .start();
    let before = metrics.scrape();
    assert_value(&before, "strata_build_info", &[], 1.0);
    let export = [("export", "vm_1.a-b@x")];
    assert_value(
        &before,
        "strata_export_requests_total",
        &[export[0], ("op", "write")],
        0.0,
    );

    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake("vm_1.a-b@x", STRUCTURED).unwrap();
    for i in 0..10u64 {
        c.write(0, i * 4096, &[i as u8; 4096]).unwrap().unwrap();
    }
    for i in 0..5u64 {
        c.read(0, i * 8192, 8192).unwrap().unwrap();
    }
    c.flush().unwrap().unwrap();
    let refused = c.outcome(0, 99, 0, 0, &[]).unwrap();
    assert!(refused.is_err());
    let past_end = c.write(0, 16 * MIB, &[0; 512]).unwrap();
    assert!(past_end.is_err());

    let after = metrics.scrape();
    let op = |name| [export[0], ("op", name)];
    assert_value(&after, "strata_export_requests_total", &op("write"), 10.0);
    assert_value(&after, "strata_export_requests_total", &op("read"), 5.0);
    assert_value(&after, "strata_export_requests_total", &op("flush"), 1.0);
    assert_value(
        &after,
        "strata_export_written_bytes_total",
        &export,
        40960.0,
    );
    assert_value(&after, "strata_export_read_bytes_total", &export, 40960.0);
    assert_value(
        &after,
        "strata_export_errors_total",
        &[export[0], ("errno", "EINVAL")],
        1.0,
    );
    assert_value(
        &after,
        "strata_export_errors_total",
        &[export[0], ("errno", "ENOSPC")],
        1.0,
    );
    let latency = "strata_export_request_duration_seconds";
    assert_value(&after, &format!("{latency}_count"), &op("write"), 10.0);
    assert_value(&after, &format!("{latency}_count"), &op("read"), 5.0);
    assert_value(
        &after,
        &format!("{latency}_bucket"),
        &[export[0], ("op", "read"), ("le", "+Inf")],
        5.0,
    );
    assert!(value(&after, &format!("{latency}_sum"), &op("write")) > 0.0);
    assert_value(&after, "strata_export_connections", &export, 1.0);
    assert!(value(&after, "strata_connections", &[]) >= 1.0);
    assert!(value(&after, "strata_connections_accepted_total", &[]) >= 2.0);
    assert!(
        value(&after, "strata_uptime_seconds", &[]) >= value(&before, "strata_uptime_seconds", &[])
    );

    // A failed handshake is counted.
    let mut bad = Client::connect(server.endpoint()).unwrap();
    bad.greeting().unwrap();
    bad.send(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(bad.stream.closed_by_server(WAIT));
    let through_control = scrape_unix(&control, "/v1/metrics");
    assert_value(
        &through_control,
        "strata_handshakes_failed_total",
        &[("reason", "protocol")],
        1.0,
    );
    assert_eq!(
        value(
            &through_control,
            "strata_export_requests_total",
            &op("write")
        ),
        10.0,
        "the control API serves the same counters"
    );
    c.disconnect().unwrap();
    // Other routes are refused.
    let s = UnixStream::connect(&metrics.socket).unwrap();
    assert_eq!(http(s, "GET", "/v1/exports", &[], None).status, 404);
}

#[test]
fn metrics_show_the_history_of_a_volume() {
    if !strata_only("the metrics endpoint") {
        return;
    }
    let metrics = Metrics::new();
    let dir = metrics.dir.path();
    strata_at_ok(
        dir,
        &[
            "create",
            "vol",
            "--size",
            "16M",
            "--history",
            "1h",
            "--history-max-bytes",
            "256K",
        ],
    );
    let vol = dir.join("vol");
    let server = file(&vol)
        .name("vol")
        .listen(Transport::Unix)
        .args(metrics.args())
        .start();
    let export = [("export", "vol")];
    let points = "strata_export_history_points";
    let age = "strata_export_history_oldest_point_age_seconds";
    let bytes = "strata_export_history_bytes";
    let reclaimed = "strata_export_history_reclaimed_bytes_total";
    let dropped = "strata_export_history_points_dropped_for_space_total";
    let before = metrics.scrape();
    assert_value(&before, points, &export, 0.0);
    assert!(
        !before.iter().any(|s| s.name == age),
        "an age before the first point"
    );
    assert_value(&before, bytes, &export, 0.0);
    assert_value(&before, reclaimed, &export, 0.0);
    assert_value(&before, dropped, &export, 0.0);

    // Rounds over the same 64 KiB, each flushed: a point per round, and each round
    // leaves the one before as history.
    let started = Instant::now();
    let mut c = Client::connect(server.endpoint()).unwrap();
    c.handshake("vol", STRUCTURED).unwrap();
    let round = |c: &mut Client, n: u8| {
        for i in 0..16u64 {
            c.write(0, i * 4096, &[n; 4096]).unwrap().unwrap();
        }
        c.flush().unwrap().unwrap();
    };
    for n in 1..=3 {
        round(&mut c, n);
    }
    let after = metrics.scrape();
    assert_value(&after, points, &export, 3.0);
    let oldest = value(&after, age, &export);
    assert!(
        (0.0..=started.elapsed().as_secs_f64()).contains(&oldest),
        "oldest point {oldest} s old"
    );
    let history = value(&after, bytes, &export);
    assert!(
        (2.0 * 65536.0..3.0 * 65536.0).contains(&history),
        "two rounds of history and their records' headers, not {history}"
    );
    {
        let _guard = images_open();
        let seen = strata::history::History::inspect(&vol).unwrap();
        assert_eq!(history, seen.history_bytes() as f64, "the engine's figure");
        assert_eq!(seen.points().len(), 3);
    }
    assert_value(&after, dropped, &export, 0.0);

    // Past the cap, retention drops the oldest points inside the window; what is kept
    // and what was dropped add up to every point made (the window keeps them all).
    for n in 4..=7 {
        round(&mut c, n);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metrics.scrape();
        let (kept, gone) = (value(&now, points, &export), value(&now, dropped, &export));
        if gone > 0.0 && kept + gone == 7.0 {
            assert!(kept >= 1.0, "the newest point is always kept");
            assert_value(&now, reclaimed, &export, 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no points dropped for space: {kept} kept, {gone} dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.disconnect().unwrap();
}

fn tcp_from(source: &str, to: SocketAddr) -> io::Result<TcpStream> {
    // Bind the client end to a chosen loopback address, to play several clients.
    let s = socket2_connect(SocketAddr::new(source.parse().unwrap(), 0), to)?;
    s.set_read_timeout(Some(WAIT))?;
    Ok(s)
}

/// Connects from `local` (an address of this machine) to `to`.
fn socket2_connect(local: SocketAddr, to: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(local) = local else {
        unreachable!()
    };
    let SocketAddr::V4(to) = to else {
        unreachable!()
    };
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket is created, bound and connected with sockaddr_in values that
    // live across each call; on success the descriptor is handed to a TcpStream that owns
    // it, on failure it is closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let l = sockaddr(local);
        let t = sockaddr(to);
        if libc::bind(fd, (&raw const l).cast(), len) != 0
            || libc::connect(fd, (&raw const t).cast(), len) != 0
        {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// A handshake from `source`: Ok if the server served it, Err if it closed the
/// connection first.
fn try_client(source: &str, to: SocketAddr) -> io::Result<Client> {
    let mut c = Client::new(tcp_from(source, to)?);
    c.handshake_bare("", SIMPLE)?;
    Ok(c)
}

#[test]
fn per_client_caps_refuse_only_that_clients_surplus() {
    if !strata_only("--max-connections-per-client") {
        return;
    }
    let metrics = Metrics::new();
    let server = metrics.serve(MIB, Transport::Tcp, ["--max-connections-per-client", "2"]);
    let Endpoint::Tcp(addr) = server.endpoint().clone() else {
        unreachable!()
    };
    let a1 = try_client("127.0.0.1", addr).expect("first connection");
    let a2 = try_client("127.0.0.1", addr).expect("second connection");
    assert!(
        try_client("127.0.0.1", addr).is_err(),
        "a third connection from one address was served"
    );
    // Another address is another client.
    let mut b = try_client("127.0.0.2", addr).expect("another client's connection");
    b.write(0, 0, &[1; 512]).unwrap().unwrap();
    assert_value(
        &metrics.scrape(),
        "strata_connections_refused_total",
        &[("reason", "per_client")],
        1.0,
    );
    assert!(
        server.log().contains("connections per client reached"),
        "{}",
        server.log()
    );
    // A closed connection gives its place back.
    drop(a1);
    let again = poll(WAIT, || try_client("127.0.0.1", addr).ok());
    let again = again.expect("the place of a closed connection was given back");
    drop((a2, again, b));
}

#[test]
fn idle_timeout_ends_idle_and_stalled_clients_only() {
    if !strata_only("--idle-timeout") {
        return;
    }
    let metrics = Metrics::new();
    let server = metrics.serve(16 * MIB, Transport::Unix, ["--idle-timeout", "1"]);
    let connect = || connected(&server, STRUCTURED);
    let mut idle = connect();
    // Stalled in the middle of a write's payload: a transmission-phase slowloris.
    let mut stalled = connect();
    let mut m = request(false, 0, CMD_WRITE, 1, 0, MIB);
    m.extend_from_slice(&[0; 1000]);
    stalled.send(&m).unwrap();
    // Busy: a request every 100 ms, for 3 s, three times the timeout.
    let mut busy = connect();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        busy.read(0, 0, 4096).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    for (c, who) in [
        (&mut idle, "an idle client"),
        (&mut stalled, "a client stalled mid-payload"),
    ] {
        assert!(c.stream.closed_by_server(WAIT), "{who} was kept");
    }
    busy.read(0, 0, 4096)
        .expect("a busy client was disconnected")
        .unwrap();
    let m = metrics.scrape();
    assert!(value(&m, "strata_idle_disconnects_total", &[]) >= 2.0);
    assert!(
        server.log().contains("client idle for too long"),
        "{}",
        server.log()
    );
}

fn rss_kib(server: &Server) -> u64 {
    let pid = server.pid().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn the_total_in_flight_budget_bounds_all_connections_together() {
    if !strata_only("--max-in-flight-total") {
        return;
    }
    const LIMIT: u64 = 48 * MIB;
    let metrics = Metrics::new();
    let server = metrics.serve(256 * MIB, Transport::Unix, ["--max-in-flight-total", "48M"]);
    // Fill the disk, so reads allocate their data.
    let mut writer = connected(&server, SIMPLE);
    for i in 0..64u64 {
        writer
            .write(0, i * 4 * MIB, &pattern(i, 4 * MIB as usize))
            .unwrap()
            .unwrap();
    }
    let rss_before = rss_kib(&server);
    // Four clients each ask for 64 MiB of reads (256 MiB in all) and read nothing.
    let mut hogs = Vec::new();
    for h in 0..4u64 {
        let mut c = connected(&server, SIMPLE);
        for i in 0..16u64 {
            c.request(0, CMD_READ, ((h * 16 + i) % 64) * 4 * MIB, 4 * MIB, &[])
                .unwrap();
        }
        hogs.push(c);
    }
    // The budget fills up (the server reads requests until it is spent)...
    let deadline = Instant::now() + WAIT;
    let mut peak = 0.0f64;
    loop {
        let m = metrics.scrape();
        let in_flight = value(&m, "strata_in_flight_bytes", &[]);
        assert_value(&m, "strata_in_flight_limit_bytes", &[], LIMIT as f64);
        assert!(
            in_flight <= LIMIT as f64,
            "{in_flight} bytes in flight over the limit"
        );
        peak = peak.max(in_flight);
        if in_flight >= (LIMIT - 4 * MIB) as f64 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak >= (LIMIT - 4 * MIB) as f64,
        "the budget never filled: {peak}"
    );
    let rss_held = rss_kib(&server);
    eprintln!(
        "in flight: peak {peak} bytes of {LIMIT}; VmRSS {rss_before} KiB -> {rss_held} KiB with 256 MiB asked for"
    );
    // What is held is the budget's worth of read buffers, not the 256 MiB asked for.
    assert!(
        rss_held <= rss_before + (LIMIT / 1024) + 32 * 1024,
        "VmRSS grew by {} KiB",
        rss_held - rss_before
    );
    // Once the hogs read their replies, everyone's requests complete.
    for (h, c) in hogs.iter_mut().enumerate() {
        for i in 0..16u64 {
            let r = c.reply(4 * MIB as usize).unwrap();
            assert_eq!(r.error(), None, "hog {h} read {i}");
        }
    }
    writer.read(0, 0, 4096).unwrap().unwrap();
    drop(hogs);
    let returned = poll(WAIT, || {
        let m = metrics.scrape();
        (value(&m, "strata_in_flight_bytes", &[]) == 0.0).then_some(())
    });
    assert!(returned.is_some(), "idle connections kept their leases");
}
