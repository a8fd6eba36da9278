//! The server as a process: its pid file, its exit statuses, and its JSON logs.

use std::path::Path;

use crate::support::client::{Client, SIMPLE};
use crate::support::daemon::Daemon;

use super::Site;

// ---------------------------------------------------------------------------------------
// Pid file and exit statuses
// ---------------------------------------------------------------------------------------

fn serve_with_pid_file(pid_file: &Path) -> Daemon {
    Daemon::serve(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--pid-file".as_ref(),
        pid_file.as_os_str(),
        "memory:1M".as_ref(),
    ])
}

#[test]
fn the_pid_file_is_written_held_and_removed() {
    let site = Site::new();
    let pid_file = site.path("strata.pid");
    let mut first = serve_with_pid_file(&pid_file);
    first.wait_for("written to");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", first.pid())
    );

    let second = serve_with_pid_file(&pid_file);
    let (status, log) = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "another process (pid {}) holds the pid file",
            first.pid()
        )),
        "{log}"
    );
    assert!(log.contains(&pid_file.display().to_string()), "{log}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", first.pid()),
        "the refused server left the file alone"
    );

    let (status, _) = first.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(!pid_file.exists(), "removed at a clean exit");

    // A file left by a killed server does not stop the next one.
    let mut killed = serve_with_pid_file(&pid_file);
    killed.wait_for("written to");
    let (status, _) = killed.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None);
    assert!(pid_file.exists(), "nothing removed it");
    let mut next = serve_with_pid_file(&pid_file);
    next.wait_for("written to");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", next.pid())
    );
    let (status, _) = next.stop_with(libc::SIGINT);
    assert_eq!(status.code(), Some(0));
    assert!(!pid_file.exists());
}

#[test]
fn exit_statuses() {
    let site = Site::new();
    let good = site
        .config("listen = [\"127.0.0.1:0\"]\n[[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut server = Daemon::serve_config(&good, &[]);
        server.tcp_addr();
        let (status, log) = server.stop_with(signal);
        assert_eq!(status.code(), Some(0), "after signal {signal}: {log}");
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) = Daemon::serve_config(&good, &["--listen", &addr]).wait_exit();
    assert_eq!(status.code(), Some(1), "a taken port: {log}");
    assert!(log.contains("cannot listen"), "{log}");

    let (status, log) = Daemon::serve(&["/nonexistent/disk.img"]).wait_exit();
    assert_eq!(status.code(), Some(1), "a missing image: {log}");

    let bad = site.path("bad.toml");
    std::fs::write(&bad, "max_connections = 0\n").unwrap();
    let (status, log) = Daemon::serve_config(&bad, &[]).wait_exit();
    assert_eq!(status.code(), Some(78), "an invalid configuration: {log}");

    let (status, log) = Daemon::serve_config(&good, &["memory:1M"]).wait_exit();
    assert_eq!(
        status.code(),
        Some(2),
        "exports on the command line and in the file: {log}"
    );

    let (status, log) = Daemon::serve(&["--listen", "nowhere", "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(2), "a bad flag: {log}");
    let (status, log) = Daemon::serve(&["--tls", "require", "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(2), "contradictory flags: {log}");
}

// ---------------------------------------------------------------------------------------
// JSON logs
// ---------------------------------------------------------------------------------------

/// Every line must be a JSON object with a timestamp, a level and a message; returns
/// the messages.
#[track_caller]
fn json_messages(log: &str) -> Vec<String> {
    assert!(!log.is_empty());
    log.lines()
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"));
            assert!(obj["timestamp"].is_string(), "{line}");
            assert!(obj["level"].is_string(), "{line}");
            obj["message"]
                .as_str()
                .unwrap_or_else(|| panic!("no message: {line}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut server = Daemon::serve(&[
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "memory:1M",
    ]);
    let addr = server.tcp_addr();
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("memory", SIMPLE).unwrap();
    drop(c);
    let (status, log) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    let messages = json_messages(&log);
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("listening on 127.0.0.1:")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "transmission started"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "shutdown complete"),
        "{messages:?}"
    );
    // The event's fields sit beside the message.
    let started = log
        .lines()
        .find(|l| l.contains("transmission started"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(started).unwrap();
    assert_eq!(v["export"], "memory");
}

#[test]
fn json_logs_stay_json_when_the_server_cannot_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) =
        Daemon::serve(&["--log-format", "json", "--listen", &addr, "memory:1M"]).wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    let messages = json_messages(&log);
    assert!(
        messages.iter().any(|m| m.contains("cannot listen on")),
        "{messages:?}"
    );
}

#[test]
fn json_logs_from_the_file_cover_reload_errors() {
    let site = Site::new();
    let text = "listen = [\"127.0.0.1:0\"]\n[log]\nformat = \"json\"\n";
    let file = site.config(text);
    let mut server = Daemon::serve_config(&file, &[]);
    server.tcp_addr();
    site.config(&format!("{text}bogus = 1\n"));
    server.signal(libc::SIGHUP);
    server.wait_for("keeping the running configuration");
    let (status, log) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    let messages = json_messages(&log);
    let want = format!(
        "reload: {}:4:1: log.bogus: unknown field `bogus`",
        file.display()
    );
    assert!(
        messages.iter().any(|m| m.starts_with(&want)),
        "{messages:?}"
    );
}
