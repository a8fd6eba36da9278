//! `strata ctl`: tables and `--json`, and the token over TCP.

use std::ffi::OsStr;

use crate::support::control::Running;
use crate::support::{run_ok, strata};

use super::serve_raw;

#[test]
fn ctl_prints_text_and_json() {
    let (dir, raw, server) = serve_raw("r", &[]);

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
