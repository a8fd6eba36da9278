//! The control API through the real HTTP stack: a `strata serve` child with a control
//! socket (and, for some tests, a TCP control listener with a token), driven by a small
//! HTTP/1.1 client written here from the protocol's text format, by `strata ctl`, and by
//! NBD clients whose I/O the counters must show.
//!
//! Here: what the API itself promises around snapshots (which exports have them, name
//! checks, unknown exports). Snapshots themselves, through the API and `strata ctl`, are
//! tested in snapshot_online.rs.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::client::{Client, STRUCTURED, Stream};
use crate::support::control::{Response, Running, TOKEN, http};
use crate::support::daemon::WAIT;
use crate::support::spec::*;
use crate::support::wire::info_data;
use crate::support::{run_ok, scratch, strata};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn raw_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn strata_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    run_ok(strata().args(["create", "--size", size]).arg(&path));
    path
}

fn export_arg(name: &str, image: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(format!("{name}="));
    arg.push(image);
    arg
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn exports_are_listed_with_counters_that_follow_nbd_io() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "disk.img", 1 << 20);
    let server = Running::serve(&[
        OsStr::new("--export"),
        export_arg("disk", &raw).as_os_str(),
        OsStr::new("--export"),
        OsStr::new("mem=memory:2M"),
        OsStr::new("--description"),
        OsStr::new("test disks"),
    ]);
    let list = server.get("/v1/exports");
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "mem"]);
    let disk = &exports[0];
    assert_eq!(disk["kind"], "raw");
    assert_eq!(disk["size"], 1 << 20);
    assert_eq!(disk["read_only"], false);
    assert_eq!(disk["image"], raw.to_str().unwrap());
    assert_eq!(disk["description"], "test disks");
    assert_eq!(exports[1]["kind"], "memory");
    assert_eq!(exports[1]["image"], Value::Null);
    assert_eq!(exports[1]["size"], 2 << 20);
    for e in exports {
        for (counter, value) in e["stats"].as_object().unwrap() {
            assert_eq!(value, 0, "{} {counter} before any client", e["name"]);
        }
    }

    let mut c = server.connect("disk");
    let data = crate::support::pattern(7, 4096);
    assert_eq!(c.command(0, CMD_WRITE, 8192, 4096, &data).unwrap(), 0);
    assert_eq!(c.read(0, 8192, 4096).unwrap().unwrap(), data);
    assert_eq!(c.read(0, 0, 512).unwrap().unwrap(), vec![0; 512]);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096, &[]).unwrap(), 0);
    // Refused at validation: counted as an error, not as a read.
    assert_eq!(c.read(0, 1 << 20, 512).unwrap(), Err(EINVAL));

    let disk = server.export("disk");
    let stats = &disk["stats"];
    assert_eq!(stats["connections"], 1, "{disk}");
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["reads"], 2);
    assert_eq!(stats["bytes_read"], 4096 + 512);
    assert_eq!(stats["writes"], 1);
    assert_eq!(stats["bytes_written"], 4096);
    assert_eq!(stats["flushes"], 1);
    assert_eq!(stats["trims"], 1);
    assert_eq!(stats["errors"], 1);
    let server_view = server.get("/v1/server").json();
    assert_eq!(server_view["connections"], 1, "{server_view}");

    let mut zero = Client::tcp(server.nbd).unwrap();
    zero.handshake("mem", STRUCTURED).unwrap();
    assert_eq!(zero.command(0, CMD_WRITE_ZEROES, 0, 65536, &[]).unwrap(), 0);
    let bs = zero.block_status(0, 0, 65536).unwrap();
    assert!(!bs.is_empty());
    drop(zero);

    c.disconnect().unwrap();
    drop(c);
    let disk = server.wait_connections("disk", 0);
    assert_eq!(disk["stats"]["total_connections"], 1);
    let mem = server.wait_connections("mem", 0);
    let stats = &mem["stats"];
    assert_eq!(stats["zeroes"], 1, "{mem}");
    assert_eq!(stats["block_status"], 1);
    assert_eq!(stats["reads"], 0, "counters are per export");
    assert_eq!(stats["writes"], 0);
}

#[test]
fn server_reports_version_addresses_and_connections() {
    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let r = server.get("/v1/server");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64(), "{v}");
    assert_eq!(v["listen"], json!([server.nbd.to_string()]));
    assert_eq!(
        v["control"],
        json!([
            format!("unix:{}", server.socket.display()),
            format!("http://{}", server.tcp.unwrap())
        ])
    );
    assert_eq!(v["connections"], 0);
    assert_eq!(v["max_connections"], 1024);
    assert_eq!(v["exports"], 1);
    let _c = server.connect("memory");
    assert_eq!(server.get("/v1/server").json()["connections"], 1);
}

#[test]
fn exports_added_at_run_time_serve_clients() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let raw = raw_image(server.scratch(), "extra.img", 3 << 20);
    let image = strata_image(server.scratch(), "vm.strata", "8M");

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "scratch", "image": "memory:4M", "description": "for tests"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "scratch");
    assert_eq!(v["kind"], "memory");
    assert_eq!(v["size"], 4 << 20);
    assert_eq!(v["description"], "for tests");

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "ro", "image": raw, "read_only": true, "format": "raw"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(
        (v["kind"].as_str(), v["read_only"].as_bool()),
        (Some("raw"), Some(true))
    );
    assert_eq!(v["image"], raw.to_str().unwrap());

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "vm", "image": image})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["kind"], "image");
    assert_eq!(v["image"], image.to_str().unwrap());
    assert_eq!(v["size"], 8 << 20);
    assert_eq!(server.get("/v1/exports/vm").status, 200);

    // The new exports serve NBD clients at once.
    let data = crate::support::pattern(3, 65536);
    for name in ["scratch", "vm"] {
        let mut c = server.connect(name);
        assert_eq!(c.command(0, CMD_WRITE, 65536, 65536, &data).unwrap(), 0);
        assert_eq!(c.read(0, 65536, 65536).unwrap().unwrap(), data, "{name}");
    }
    let mut c = Client::tcp(server.nbd).unwrap();
    let (size, flags) = c.handshake("ro", STRUCTURED).unwrap();
    assert_eq!(size, 3 << 20);
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.command(0, CMD_WRITE, 0, 512, &[1; 512]).unwrap(), EPERM);
    drop(c);
    let scratch = server.wait_connections("scratch", 0);
    assert_eq!(scratch["stats"]["writes"], 1);
    assert_eq!(scratch["stats"]["bytes_written"], 65536);

    // What cannot be added, and why.
    let add = |body: Value| server.call("POST", "/v1/exports", Some(body));
    let r = add(json!({"name": "scratch", "image": "memory:1M"}));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("exists already"), "{r:?}");
    let r = add(json!({"name": "bad/name", "image": "memory:1M"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    let r = add(json!({"name": "gone", "image": server.scratch().join("missing.img")}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("does not exist"), "{r:?}");
    let r = add(json!({"name": "huge", "image": "memory:lots"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid size"), "{r:?}");
    // The same image twice: the first export holds its lock.
    let r = add(json!({"name": "vm2", "image": image}));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("in use"), "{r:?}");
    assert_eq!(server.get("/v1/exports/vm2").status, 404);
    assert_eq!(server.get("/v1/server").json()["exports"], 4);
}

#[test]
fn exports_added_at_run_time_work_with_qemu_io() {
    if !crate::support::require_tool("qemu-io") {
        return;
    }
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let image = strata_image(server.scratch(), "q.strata", "16M");
    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "q", "image": image, "format": "strata"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let uri = format!("nbd://{}/q", server.nbd);
    crate::support::qemu_io_ok(
        &uri,
        false,
        &["write -P 0x5c 1M 256k", "flush", "read -P 0x5c 1M 256k"],
    );
    crate::support::qemu_io_ok(&uri, true, &["read -P 0x5c 1M 256k", "read -P 0 0 1M"]);
    let q = server.wait_connections("q", 0);
    let stats = &q["stats"];
    assert_eq!(stats["total_connections"], 2, "{q}");
    assert_eq!(stats["bytes_written"], 256 << 10);
    assert!(stats["bytes_read"].as_u64().unwrap() >= (256 << 10) * 2 + (1 << 20));
    assert!(stats["flushes"].as_u64().unwrap() >= 1);
    assert_eq!(stats["errors"], 0);
}

#[test]
fn removing_an_export_waits_for_its_clients_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "busy.img", 1 << 20);
    let server = Running::serve(&[
        OsStr::new("--export"),
        export_arg("busy", &raw).as_os_str(),
        OsStr::new("--export"),
        OsStr::new("idle=memory:1M"),
    ]);

    let r = server.call("DELETE", "/v1/exports/idle", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"removed": "idle", "disconnected": 0}));
    assert_eq!(server.get("/v1/exports/idle").status, 404);
    let mut c = Client::tcp(server.nbd).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_GO, &info_data("idle", &[])).unwrap();
    assert_eq!(replies.last().unwrap().ty, REP_ERR_UNKNOWN);

    let mut c = server.connect("busy");
    assert_eq!(c.command(0, CMD_WRITE, 0, 512, &[9; 512]).unwrap(), 0);
    let r = server.call("DELETE", "/v1/exports/busy", None);
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("1 client(s) connected"), "{r:?}");
    let r = server.call("DELETE", "/v1/exports/busy?force=false", None);
    assert_eq!(r.status, 409, "{r:?}");
    // Still served, and the client is still connected.
    assert_eq!(server.export("busy")["stats"]["connections"], 1);
    assert_eq!(c.read(0, 0, 512).unwrap().unwrap(), vec![9; 512]);

    let r = server.call("DELETE", "/v1/exports/busy?force=true", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"removed": "busy", "disconnected": 1}));
    assert!(c.stream.hangs_up(WAIT), "the connection is still open");
    assert_eq!(server.get("/v1/exports/busy").status, 404);
    let r = server.call("DELETE", "/v1/exports/busy?force=true", None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("busy"), "{r:?}");
    // The client's write reached the file before its session was ended.
    assert_eq!(&std::fs::read(&raw).unwrap()[..512], &[9; 512]);
    assert_eq!(server.get("/v1/exports").json()["exports"], json!([]));
}

#[test]
fn ctl_prints_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "r.img", 1 << 20);
    let server = Running::serve(&[OsStr::new("--export"), export_arg("r", &raw).as_os_str()]);

    server
        .ctl(&["server"])
        .assert_success()
        .assert_stdout(&[env!("CARGO_PKG_VERSION"), &server.nbd.to_string()]);

    server
        .ctl(&["add", "extra", "memory:2M", "--description", "added by ctl"])
        .assert_success()
        .assert_stdout(&["memory"]);
    let out = server.ctl(&["exports"]).assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.report());
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "KIND", "SIZE", "MODE", "CONNS", "READS", "WRITES", "ERRORS", "SERVES"
        ]
    );
    assert!(lines[1].starts_with("extra "), "{}", out.report());
    assert!(lines[2].starts_with("r "), "{}", out.report());
    assert!(lines[2].contains(raw.to_str().unwrap()), "{}", out.report());
    // Columns line up: each row's size column ends where the header's does.
    let end = lines[0].find("SIZE").unwrap() + "SIZE".len();
    for l in &lines[1..] {
        assert_eq!(&l[end..end + 2], "  ", "{}", out.report());
        assert_ne!(&l[end - 1..end], " ", "{}", out.report());
    }

    let out = server.ctl(&["--json", "exports"]).assert_success();
    let v = out.json();
    assert_eq!(v, server.get("/v1/exports").json());
    let out = server.ctl(&["export", "r", "--json"]).assert_success();
    let v = out.json();
    assert_eq!(v["kind"], "raw");
    server
        .ctl(&["export", "r"])
        .assert_success()
        .assert_stdout(&["read-write", "1 MiB"]);

    // A relative image path is the caller's.
    let mut cmd = strata();
    cmd.current_dir(dir.path())
        .args([
            "ctl",
            "add",
            "rel",
            "r.img",
            "--read-only",
            "--format",
            "raw",
        ])
        .env("STRATA_CONTROL", &server.socket);
    run_ok(&mut cmd);
    let rel = server.export("rel");
    assert_eq!(rel["image"], raw.to_str().unwrap());
    assert_eq!(rel["read_only"], true);

    server
        .ctl(&["remove", "extra"])
        .assert_success()
        .assert_stdout(&["removed export extra"]);
    server
        .ctl(&["export", "extra"])
        .assert_code(1)
        .assert_stderr(&["no export named \"extra\""]);
    server
        .ctl(&["snapshots", "r"])
        .assert_code(1)
        .assert_stderr(&["snapshots need a Strata image"]);
    server
        .ctl(&["add", "r", "memory:1M"])
        .assert_code(1)
        .assert_stderr(&["exists already"]);

    let missing = dir.path().join("nobody.sock");
    let mut cmd = strata();
    cmd.args(["ctl", "--socket"]).arg(&missing).arg("server");
    crate::support::run(&mut cmd)
        .assert_failure()
        .assert_stderr(&[missing.to_str().unwrap(), "cannot reach"]);
    let mut cmd = strata();
    cmd.args(["ctl", "server"]).env_remove("STRATA_CONTROL");
    crate::support::run(&mut cmd)
        .assert_failure()
        .assert_stderr(&["--socket"]);
}

#[test]
fn ctl_over_tcp_sends_the_token() {
    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let url = format!("http://{}", server.tcp.unwrap());
    let mut cmd = strata();
    cmd.args(["ctl", "--url", &url, "--token-file"])
        .arg(server.token_file.as_ref().unwrap())
        .arg("exports");
    run_ok(&mut cmd).assert_stdout(&["memory"]);
    crate::support::run(strata().args(["ctl", "--url", &url, "exports"]))
        .assert_code(1)
        .assert_stderr(&["401", "Bearer"]);
}

#[test]
fn malformed_requests_get_json_errors() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let json_header = [("Content-Type", "application/json")];
    let post = |body: &[u8]| server.raw("POST", "/v1/exports", &json_header, Some(body));
    let check = |r: Response, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{r:?}");
        let msg = r.error();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    };

    check(post(b"{\"name\": \"x\","), 400, "JSON");
    check(post(b"[1, 2]"), 422, "");
    check(
        post(br#"{"name": "x", "image": "memory:1M", "colour": "blue"}"#),
        422,
        "unknown field `colour`",
    );
    check(
        post(br#"{"image": "memory:1M"}"#),
        422,
        "missing field `name`",
    );
    check(
        post(br#"{"name": "x", "image": "memory:1M", "format": "qcow2"}"#),
        422,
        "qcow2",
    );
    check(
        post(br#"{"name": "x", "image": "memory:1M", "read_only": "yes"}"#),
        422,
        "read_only",
    );
    check(
        server.raw(
            "POST",
            "/v1/exports",
            &[("Content-Type", "text/plain")],
            Some(br#"{"name": "x", "image": "memory:1M"}"#),
        ),
        415,
        "Content-Type",
    );
    check(
        server.raw(
            "POST",
            "/v1/exports",
            &[],
            Some(br#"{"name": "x", "image": "memory:1M"}"#),
        ),
        415,
        "Content-Type",
    );
    let huge = format!(
        r#"{{"name": "x", "image": "memory:1M", "description": "{}"}}"#,
        "d".repeat(70 * 1024)
    );
    check(post(huge.as_bytes()), 413, "limit");
    check(server.call("PUT", "/v1/server", None), 405, "PUT");
    check(server.call("DELETE", "/v1/exports", None), 405, "DELETE");
    check(server.call("POST", "/v1/exports/memory", None), 405, "POST");
    check(server.get("/v1/nothing"), 404, "/v1/nothing");
    check(server.get("/"), 404, "no such endpoint");
    check(server.get("/v2/server"), 404, "no such endpoint");
    check(
        server.call("DELETE", "/v1/exports/memory?force=maybe", None),
        400,
        "force",
    );
    check(
        server.call("DELETE", "/v1/exports/memory?forse=true", None),
        400,
        "forse",
    );
    check(server.get("/v1/exports/memory/dirty"), 400, "since");
    // Nothing was added or removed, and the server still answers.
    let list = server.get("/v1/exports").json();
    assert_eq!(list["exports"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(server.get("/v1/server").status, 200);
}

#[test]
fn tcp_control_needs_a_token() {
    // Refused at start: no token file, an empty one.
    crate::support::run(strata().args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--control-listen",
        "127.0.0.1:0",
        "memory:1M",
    ]))
    .assert_failure()
    .assert_stderr(&["--control-token-file"]);
    let (_dir, empty) = scratch("empty");
    std::fs::write(&empty, "\n").unwrap();
    crate::support::run(
        strata()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
                "--control-token-file",
            ])
            .arg(&empty)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["token is empty"]);

    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let bearer = format!("Bearer {TOKEN}");
    let r = server.tcp("GET", "/v1/server", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(r.error().contains("Bearer"), "{r:?}");
    for wrong in [
        "Bearer nope".to_owned(),
        format!("Bearer {TOKEN}x"),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
        format!("Bearer {}", TOKEN.to_uppercase()),
        format!("Basic {TOKEN}"),
        TOKEN.to_owned(),
    ] {
        let r = server.tcp("GET", "/v1/server", &[("Authorization", &wrong)]);
        assert_eq!(r.status, 401, "{wrong}: {r:?}");
        assert!(!r.error().is_empty());
    }
    // Without the token nothing is revealed, not even which routes exist.
    let r = server.tcp("GET", "/v1/nothing", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    let r = server.tcp("DELETE", "/v1/exports/memory?force=true", &[]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(server.get("/v1/exports/memory").status, 200);

    let r = server.tcp("GET", "/v1/server", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["version"], env!("CARGO_PKG_VERSION"));
    let r = server.tcp("GET", "/v1/nothing", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 404, "{r:?}");
    // The Unix socket needs no token.
    assert_eq!(server.get("/v1/server").status, 200);
}

#[test]
fn snapshot_endpoints_need_a_strata_image() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "plain.img", 1 << 20);
    let server = Running::serve(&[
        OsStr::new("--export"),
        export_arg("plain", &raw).as_os_str(),
        OsStr::new("--export"),
        OsStr::new("ram=memory:1M"),
    ]);
    for export in ["plain", "ram"] {
        let base = format!("/v1/exports/{export}");
        let requests = [
            ("GET", format!("{base}/snapshots"), None),
            (
                "POST",
                format!("{base}/snapshots"),
                Some(json!({"name": "s1"})),
            ),
            ("DELETE", format!("{base}/snapshots/s1"), None),
            (
                "POST",
                format!("{base}/rollback"),
                Some(json!({"snapshot": "s1"})),
            ),
            (
                "POST",
                format!("{base}/snapshots/s1/export"),
                Some(json!({})),
            ),
            ("GET", format!("{base}/dirty?since=s1"), None),
        ];
        for (method, path, body) in requests {
            let r = server.call(method, &path, body);
            assert_eq!(r.status, 400, "{method} {path}: {r:?}");
            let msg = r.error();
            assert!(
                msg.contains("snapshots need a Strata image") && msg.contains(export),
                "{method} {path}: {msg}"
            );
        }
    }
    assert_eq!(
        server.get("/v1/exports").json()["exports"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn bad_snapshot_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = strata_image(dir.path(), "vm.strata", "4M");
    let server = Running::serve(&[OsStr::new("--export"), export_arg("vm", &image).as_os_str()]);
    assert_eq!(server.export("vm")["kind"], "image");
    let long = "s".repeat(65);
    for bad in ["", ".hidden", "-dash", "a/b", "a b", "é", long.as_str()] {
        let r = server.call(
            "POST",
            "/v1/exports/vm/snapshots",
            Some(json!({"name": bad})),
        );
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert!(
            r.error().contains("invalid snapshot name"),
            "{bad:?}: {r:?}"
        );
        let r = server.call(
            "POST",
            "/v1/exports/vm/rollback",
            Some(json!({"snapshot": bad})),
        );
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert!(
            r.error().contains("invalid snapshot name"),
            "{bad:?}: {r:?}"
        );
    }
    for bad in [".hidden", "-dash", "a%20b", "%C3%A9", long.as_str()] {
        for (method, path, body) in [
            ("DELETE", format!("/v1/exports/vm/snapshots/{bad}"), None),
            (
                "POST",
                format!("/v1/exports/vm/snapshots/{bad}/export"),
                Some(json!({})),
            ),
            ("GET", format!("/v1/exports/vm/dirty?since={bad}"), None),
        ] {
            let r = server.call(method, &path, body);
            assert_eq!(r.status, 400, "{method} {path}: {r:?}");
            assert!(r.error().contains("invalid snapshot name"), "{path}: {r:?}");
        }
    }
    let r = server.call("GET", "/v1/exports/vm/dirty?since=", None);
    assert_eq!(r.status, 400, "{r:?}");
    // The name of the export a snapshot would be served as is checked too.
    let r = server.call(
        "POST",
        "/v1/exports/vm/snapshots/s1/export",
        Some(json!({"name": "no/slashes"})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    let r = server.call(
        "POST",
        &format!("/v1/exports/vm/snapshots/{}/export", "s".repeat(62)),
        Some(json!({})),
    );
    assert_eq!(r.status, 400, "the default name vm@SNAP is too long: {r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    assert_eq!(
        server.get("/v1/exports").json()["exports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn unknown_exports_are_404() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let requests = [
        ("GET", "/v1/exports/nope", None),
        ("DELETE", "/v1/exports/nope", None),
        ("DELETE", "/v1/exports/nope?force=true", None),
        ("GET", "/v1/exports/nope/snapshots", None),
        (
            "POST",
            "/v1/exports/nope/snapshots",
            Some(json!({"name": "s1"})),
        ),
        ("DELETE", "/v1/exports/nope/snapshots/s1", None),
        (
            "POST",
            "/v1/exports/nope/rollback",
            Some(json!({"snapshot": "s1"})),
        ),
        (
            "POST",
            "/v1/exports/nope/snapshots/s1/export",
            Some(json!({})),
        ),
        ("GET", "/v1/exports/nope/dirty?since=s1", None),
    ];
    for (method, path, body) in requests {
        let r = server.call(method, path, body);
        assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        assert!(r.error().contains("no export named \"nope\""), "{r:?}");
    }
    // A name that exists only as the default export's alias is not an export name.
    let r = server.get("/v1/exports/%20");
    assert_eq!(r.status, 404, "{r:?}");
}

#[test]
fn control_socket_is_private_replaces_a_stale_one_and_goes_at_shutdown() {
    let (_dir, socket) = scratch("ctl.sock");
    // A socket file left by a server that died.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = Running::serve_at(&socket, &[OsStr::new("memory:1M")]);
    let stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let r = http(stream, "GET", "/v1/server", &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    // An idle keep-alive connection does not hold up shutdown.
    let mut idle = UnixStream::connect(&socket).unwrap();
    idle.write_all(b"GET /v1/server HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    server.signal(libc::SIGTERM);
    let (status, log) = server.wait_exit();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("shutdown complete"), "{log}");
    assert!(
        !socket.exists(),
        "the control socket is removed at shutdown"
    );
    drop(idle);
}

#[test]
fn control_socket_path_must_be_free() {
    let (_dir, file) = scratch("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    crate::support::run(
        strata()
            .args(["serve", "--listen", "127.0.0.1:0", "--control"])
            .arg(&file)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["not a socket"]);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"data",
        "the file is left alone"
    );

    // A live control socket is not taken over.
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    crate::support::run(
        strata()
            .args(["serve", "--listen", "127.0.0.1:0", "--control"])
            .arg(&server.socket)
            .arg("memory:1M"),
    )
    .assert_failure()
    .assert_stderr(&["another server"]);
    assert_eq!(server.get("/v1/server").status, 200);
}

/// `MAX_CONNECTIONS` in src/server/http.rs.
const CONTROL_CONNECTIONS: usize = 64;

#[test]
fn idle_control_connections_are_capped_and_timed_out() {
    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let tcp = server.tcp.unwrap();
    // Connections that never send a request, as anyone may open without the token.
    let idle: Vec<TcpStream> = (0..CONTROL_CONNECTIONS)
        .map(|_| TcpStream::connect(tcp).unwrap())
        .collect();
    // One more is closed unanswered, even with a valid request.
    let mut extra = TcpStream::connect(tcp).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "GET /v1/server HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    let _ = extra.write_all(request.as_bytes());
    assert!(
        Stream::from(extra).hangs_up(WAIT),
        "a connection past the cap was served"
    );
    // The socket is a separate listener: it still answers.
    assert_eq!(server.get("/v1/server").status, 200);
    // Idle connections are closed by the server after the header timeout.
    for s in idle {
        assert!(
            Stream::from(s).hangs_up(WAIT),
            "an idle connection stayed open"
        );
    }
    // Then there is room again.
    let r = server.tcp(
        "GET",
        "/v1/server",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(r.status, 200, "{r:?}");
}
