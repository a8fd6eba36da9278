//! Volumes with history through the control API and `strata ctl`: a volume made by
//! `strata create --history`, written and flushed by an NBD client to make restore
//! points, then listed, served at a point (read back, read-only), rolled back (refused
//! under a client unless forced), compared with the live disk and cloned; and the
//! refusals: malformed points, times before the first point, unknown exports, exports
//! without history.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::client::{Client, STRUCTURED};
use crate::support::control::Running;
use crate::support::spec::{CMD_WRITE, EPERM};
use crate::support::{run, run_ok, strata};

use super::{export_arg, raw_image, strata_image};

const SIZE: u64 = 4 << 20;

/// A volume with history, `NAME` in `dir`, of 4 MiB with points kept a day.
fn history_volume(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    run_ok(
        strata()
            .args(["create", "--size", "4M", "--history", "24h"])
            .arg(&path),
    );
    path
}

/// A server with a control socket serving a new volume with history as `vm`, then the
/// `more` arguments. Returns the scratch directory and the server.
fn serve_history(more: &[OsString]) -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    let volume = history_volume(dir.path(), "vm");
    let mut args = vec![OsString::from("--export"), export_arg("vm", &volume)];
    args.extend(more.iter().cloned());
    let server = Running::serve(&args.iter().map(OsString::as_os_str).collect::<Vec<_>>());
    (dir, server)
}

/// Writes `data` at `offset` and flushes: a new restore point.
fn write_point(c: &mut Client, offset: u64, data: &[u8]) {
    c.write(0, offset, data).unwrap().unwrap();
    c.flush().unwrap().unwrap();
}

fn read(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    c.read(0, offset, len).unwrap().unwrap()
}

/// A server with a control socket serving a new volume with history as `vm`.
pub(super) fn history_volume_server() -> (tempfile::TempDir, Running) {
    serve_history(&[])
}

/// The seq of the newest point `vm` lists.
pub(super) fn newest_seq(server: &Running) -> u64 {
    let h = server.get("/v1/exports/vm/history").json();
    h["points"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// An export's client after its handshake, with its transmission flags.
fn connect_flags(server: &Running, name: &str) -> (Client, u16) {
    let mut c = Client::tcp(server.nbd).unwrap();
    let (size, flags) = c.handshake(name, STRUCTURED).unwrap();
    assert_eq!(size, SIZE);
    (c, flags)
}

/// Two restore points on `vm`: the first holds 8 KiB of 0x11 at 0; the second has 4
/// KiB of 0x22 over its start and 4 KiB of 0x33 at 64 KiB. Returns their seqs.
fn two_points(server: &Running, c: &mut Client) -> (u64, u64) {
    write_point(c, 0, &[0x11; 8192]);
    let first = newest_seq(server);
    c.write(0, 0, &[0x22; 4096]).unwrap().unwrap();
    write_point(c, 65536, &[0x33; 4096]);
    (first, newest_seq(server))
}

#[test]
fn points_are_listed_served_compared_and_rolled_back() {
    let (_dir, server) = serve_history(&[]);
    let v = server.export("vm");
    assert_eq!(v["kind"], "history");
    assert_eq!(v["history"]["window_s"], 86400);
    let mut c = server.connect("vm");
    let (first, second) = two_points(&server, &mut c);
    assert!(first < second);

    let h = server.get("/v1/exports/vm/history");
    assert_eq!(h.status, 200, "{h:?}");
    let h = h.json();
    assert_eq!(h["window_s"], 86400);
    let seqs: Vec<u64> = (h["points"].as_array().unwrap().iter())
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.contains(&first) && seqs.ends_with(&[second]), "{h}");
    let v = server.export("vm");
    assert_eq!(v["history"]["oldest_point"]["seq"], seqs[0], "{v}");
    assert_eq!(v["history"]["newest_point"]["seq"], second, "{v}");

    // The first point, served read-only under its default name.
    let r = server.call(
        "POST",
        "/v1/exports/vm/serve-at",
        Some(json!({"at": first.to_string()})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let at_first = format!("vm@{first}");
    let v = r.json();
    assert_eq!(v["name"], at_first.as_str());
    assert_eq!(
        (v["kind"].as_str(), v["read_only"].as_bool()),
        (Some("point"), Some(true))
    );
    assert_eq!(v["point_of"]["export"], "vm");
    assert_eq!(v["point_of"]["seq"], first);
    assert_eq!(v["point_of"]["time"], h["points"][0]["time"]);
    let (mut p, flags) = connect_flags(&server, &at_first);
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    assert_eq!(read(&mut p, 0, 8192), [0x11; 8192]);
    assert_eq!(read(&mut p, 65536, 4096), [0; 4096]);
    assert_eq!(p.command(0, CMD_WRITE, 0, 512, &[1; 512]).unwrap(), EPERM);

    // What changed since the first point.
    let d = server.get(&format!("/v1/exports/vm/dirty?since_point={first}"));
    assert_eq!(d.status, 200, "{d:?}");
    let d = d.json();
    assert_eq!(d["point"]["seq"], first);
    assert_eq!(d["cluster_size"], 4096);
    assert_eq!(
        d["ranges"],
        json!([{"offset": 0, "length": 4096}, {"offset": 65536, "length": 4096}])
    );
    assert_eq!(d["bytes"], 8192);

    // A rollback under a connected client is refused unless forced.
    let rollback = |force: bool| {
        let body = json!({"at": first.to_string(), "force": force});
        server.call("POST", "/v1/exports/vm/rollback", Some(body))
    };
    let r = rollback(false);
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("client(s) connected"), "{r:?}");
    assert_eq!(read(&mut c, 0, 4096), [0x22; 4096]);
    let r = rollback(true);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["point"]["seq"], first);
    assert_eq!(r.json()["export"], "vm");
    assert_eq!(read(&mut c, 0, 8192), [0x11; 8192]);
    assert_eq!(read(&mut c, 65536, 4096), [0; 4096]);

    // The points rolled over are still there, and can be served.
    let h = server.get("/v1/exports/vm/history").json();
    assert!(
        h["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["seq"] == second),
        "{h}"
    );
    let r = server.call(
        "POST",
        "/v1/exports/vm/serve-at",
        Some(json!({"at": second.to_string(), "as": "before-rollback"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let mut after = server.connect("before-rollback");
    assert_eq!(read(&mut after, 0, 4096), [0x22; 4096]);
    assert_eq!(read(&mut after, 65536, 4096), [0x33; 4096]);

    // Removing a point's export releases it; the name can serve another point.
    drop(p);
    server.wait_connections(&at_first, 0);
    let r = server.call("DELETE", &format!("/v1/exports/{at_first}"), None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(server.get(&format!("/v1/exports/{at_first}")).status, 404);
    let r = server.call(
        "POST",
        "/v1/exports/vm/serve-at",
        Some(json!({"at": second.to_string(), "as": at_first})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["point_of"]["seq"], second);
}

#[test]
fn a_clone_starts_at_the_point_and_goes_its_own_way() {
    let (dir, server) = serve_history(&[]);
    let mut c = server.connect("vm");
    let (_, second) = two_points(&server, &mut c);
    c.write(0, 0, &[0x44; 4096]).unwrap().unwrap();
    c.flush().unwrap().unwrap();

    let image = dir.path().join("copy");
    let body = json!({"at": second.to_string(), "name": "copy", "image": image});
    let r = server.call("POST", "/v1/exports/vm/clone", Some(body.clone()));
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["kind"], "history");
    assert_eq!(v["read_only"], false);
    assert_eq!(v["image"], image.to_str().unwrap());
    assert!(
        v["history"]["oldest_point"].is_null(),
        "a clone starts without points: {v}"
    );

    let mut k = server.connect("copy");
    assert_eq!(read(&mut k, 0, 4096), [0x22; 4096]);
    assert_eq!(read(&mut k, 4096, 4096), [0x11; 4096]);
    assert_eq!(read(&mut k, 65536, 4096), [0x33; 4096]);
    assert_eq!(read(&mut k, 1 << 20, 4096), [0; 4096]);
    write_point(&mut k, 0, &[0x55; 8192]);
    assert_eq!(read(&mut k, 0, 8192), [0x55; 8192]);
    assert_eq!(
        read(&mut c, 0, 4096),
        [0x44; 4096],
        "the original is unchanged"
    );
    assert_eq!(read(&mut c, 4096, 4096), [0x11; 4096]);
    let h = server.get("/v1/exports/copy/history").json();
    assert_eq!(h["points"].as_array().unwrap().len(), 1, "{h}");

    // The directory is taken now, and so is the name.
    let r = server.call("POST", "/v1/exports/vm/clone", Some(body));
    assert_eq!(r.status, 409, "{r:?}");
    let body = json!({"at": "-1h", "name": "other", "image": image});
    let r = server.call("POST", "/v1/exports/vm/clone", Some(body));
    assert_eq!(r.status, 404, "an hour ago there was no point yet: {r:?}");
    let body = json!({"at": second.to_string(), "name": "other", "image": image});
    let r = server.call("POST", "/v1/exports/vm/clone", Some(body));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("exists"), "{r:?}");
}

#[test]
fn points_that_cannot_be_named_and_exports_without_history() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path(), "plain.img", 1 << 20);
    let image = strata_image(dir.path(), "img.strata", "1M");
    let more = [
        OsString::from("--export"),
        export_arg("plain", &raw),
        OsString::from("--export"),
        export_arg("img", &image),
    ];
    let (_dir, server) = serve_history(&more);
    let calls = |export: &str, at: &str| -> Vec<(&'static str, String, Option<Value>)> {
        let base = format!("/v1/exports/{export}");
        let encoded = at.replace(':', "%3A").replace('+', "%2B");
        vec![
            ("POST", format!("{base}/serve-at"), Some(json!({"at": at}))),
            ("POST", format!("{base}/rollback"), Some(json!({"at": at}))),
            ("GET", format!("{base}/dirty?since_point={encoded}"), None),
            (
                "POST",
                format!("{base}/clone"),
                Some(json!({"at": at, "name": "c", "image": dir.path().join("c")})),
            ),
        ]
    };
    let expect = |export: &str, at: &str, status: u16, needle: &str| {
        for (method, path, body) in calls(export, at) {
            let r = server.call(method, &path, body);
            assert_eq!(r.status, status, "{method} {path}: {r:?}");
            assert!(r.error().contains(needle), "{method} {path}: {r:?}");
        }
    };
    expect("vm", "1", 404, "no restore point yet");
    let mut c = server.connect("vm");
    write_point(&mut c, 0, &[1; 4096]);
    for bad in ["soon", "12abc", "-10x"] {
        expect("vm", bad, 400, "is not a restore point: give a seq");
    }
    expect("vm", "2026-13-01T00:00:00Z", 400, "is not a time");
    expect(
        "vm",
        "2000-01-01T00:00:00Z",
        404,
        "before the oldest restore point",
    );
    expect("vm", "999999", 404, "no restore point with seq 999999");
    expect("nope", "1", 404, "no export named \"nope\"");
    assert_eq!(server.get("/v1/exports/nope/history").status, 404);
    for export in ["plain", "img"] {
        expect(
            export,
            "1",
            400,
            "restore points need a volume with history",
        );
        let r = server.get(&format!("/v1/exports/{export}/history"));
        assert_eq!(r.status, 400, "{r:?}");
        assert!(
            r.error()
                .contains("restore points need a volume with history"),
            "{r:?}"
        );
        assert!(server.export(export)["history"].is_null());
    }

    // Exactly one of a snapshot and a point.
    let r = server.call(
        "POST",
        "/v1/exports/vm/rollback",
        Some(json!({"snapshot": "s", "at": "1"})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("exactly one"), "{r:?}");
    let r = server.call("POST", "/v1/exports/vm/rollback", Some(json!({})));
    assert_eq!(r.status, 400, "{r:?}");
    let r = server.get("/v1/exports/vm/dirty?since=s&since_point=1");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("exactly one"), "{r:?}");
    let r = server.call(
        "POST",
        "/v1/exports/vm/rollback",
        Some(json!({"at": "1", "destroy_newer": true})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let r = server.call(
        "POST",
        "/v1/exports/vm/serve-at",
        Some(json!({"at": "-1m", "as": "no/slash"})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    assert!(!dir.path().join("c").exists());
}

#[test]
fn ctl_lists_serves_rolls_back_and_clones_points() {
    let (dir, server) = serve_history(&[]);
    let mut c = server.connect("vm");
    let (first, second) = two_points(&server, &mut c);
    drop(c);
    server.wait_connections("vm", 0);

    let out = server.ctl(&["history", "vm"]).assert_success();
    out.assert_stdout(&["restore points, kept 1d", "SEQ", &second.to_string()]);
    let json = server
        .ctl(&["--json", "history", "vm"])
        .assert_success()
        .json();
    assert_eq!(json, server.get("/v1/exports/vm/history").json());
    server
        .ctl(&["export", "vm"])
        .assert_success()
        .assert_stdout(&["history:", "kept 1d", &format!("to seq {second}")]);

    let first_s = first.to_string();
    server
        .ctl(&["serve-at", "vm", &first_s, "--as", "old"])
        .assert_success()
        .assert_stdout(&[&format!("restore point {first}"), "as export old"]);
    assert_eq!(server.export("old")["kind"], "point");
    server
        .ctl(&["dirty", "vm", "--since", &first_s])
        .assert_success()
        .assert_stdout(&["2 range(s)", &format!("since restore point {first}")]);
    server
        .ctl(&["dirty", "vm", "--since", "-1h"])
        .assert_code(1)
        .assert_stderr(&["before the oldest restore point"]);

    let image = dir.path().join("copy");
    // A relative directory is the caller's.
    let mut cmd = strata();
    cmd.current_dir(dir.path())
        .arg("ctl")
        .arg("--socket")
        .arg(&server.socket)
        .args(["clone", "vm", &second.to_string(), "copy", "copy"]);
    run(&mut cmd).assert_success();
    assert_eq!(server.export("copy")["image"], image.to_str().unwrap());
    let mut k = server.connect("copy");
    assert_eq!(read(&mut k, 0, 4096), [0x22; 4096]);

    server
        .ctl(&["rollback", "vm", "--at", &first_s])
        .assert_success()
        .assert_stdout(&[&format!("rolled back to restore point {first}")]);
    let mut c = server.connect("vm");
    assert_eq!(read(&mut c, 0, 4096), [0x11; 4096]);
    server
        .ctl(&["rollback", "vm", "--at", &second.to_string()])
        .assert_code(1)
        .assert_stderr(&["client(s) connected", "409"]);
    server
        .ctl(&["history", "nope"])
        .assert_code(1)
        .assert_stderr(&["no export named", "404"]);
}
