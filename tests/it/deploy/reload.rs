//! Reloading on SIGHUP: exports added, changed and removed while the others keep serving;
//! an invalid file that keeps the running configuration; settings that wait for a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::support::client::{Client, SIMPLE, STRUCTURED};
use crate::support::daemon::WAIT;
use crate::support::{pattern, poll};

use super::{Site, assert_unknown, exports_toml, list, write_ok};

/// Writes and reads back on `c` until told to stop (or 100000 rounds), counting rounds.
fn keep_busy(
    mut c: Client,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for i in 0..100_000u64 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let offset = (i % 200) * 4096;
            let data = pattern(i, 4096);
            write_ok(&mut c, offset, &data);
            assert!(
                c.read(0, offset, 4096).unwrap().unwrap() == data,
                "round {i}: read back differs"
            );
            rounds.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Waits (bounded) until `counter` has moved `by` past `from`.
fn wait_past(counter: &AtomicU64, from: u64, by: u64) {
    let moved = poll(WAIT, || {
        (counter.load(Ordering::Relaxed) >= from + by).then_some(())
    });
    assert!(moved.is_some(), "the busy client stopped making progress");
}

#[test]
fn sighup_adds_changes_and_removes_exports_and_leaves_the_others_alone() {
    let site = Site::new();
    site.raw("old.raw", 1 << 20, 0x11);
    site.raw("new.raw", 1 << 20, 0x22);
    let (mut server, addr) = site.serve(&exports_toml(&[
        ("keep", "memory:1M"),
        ("change", "old.raw"),
        ("remove", "memory:1M"),
    ]));

    let mut keep = Client::tcp(addr).unwrap();
    keep.handshake("keep", STRUCTURED).unwrap();
    let kept = pattern(99, 4096);
    // Past the range the busy client below writes.
    write_ok(&mut keep, (1 << 20) - 4096, &kept);
    let mut change = Client::tcp(addr).unwrap();
    change.handshake("change", SIMPLE).unwrap();
    assert_eq!(change.read(0, 0, 4).unwrap().unwrap(), [0x11; 4]);
    let mut remove = Client::tcp(addr).unwrap();
    remove.handshake("remove", SIMPLE).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let busy = keep_busy(keep, stop.clone(), rounds.clone());
    wait_past(&rounds, 0, 10);

    site.config(&exports_toml(&[
        ("keep", "memory:1M"),
        ("change", "new.raw"),
        ("added", "memory:2M"),
    ]));
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");

    // The untouched export's client went on, on the same connection, across the reload.
    let after_reload = rounds.load(Ordering::Relaxed);
    wait_past(&rounds, after_reload, 10);
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("the busy client's I/O all succeeded");

    for (c, export) in [(&mut change, "changed"), (&mut remove, "removed")] {
        assert!(
            c.stream.hangs_up(WAIT),
            "the {export} export's client is disconnected"
        );
    }

    assert_eq!(list(addr), ["added", "change", "keep"]);
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("change", SIMPLE).unwrap();
    assert_eq!(
        c.read(0, 0, 4).unwrap().unwrap(),
        [0x22; 4],
        "the new image is served"
    );
    let mut c = Client::tcp(addr).unwrap();
    assert_eq!(c.handshake("added", SIMPLE).unwrap().0, 2 << 20);
    assert_unknown(addr, "remove");
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("keep", SIMPLE).unwrap();
    assert!(
        c.read(0, (1 << 20) - 4096, 4096).unwrap().unwrap() == kept,
        "the kept memory disk still holds what was written before the reload"
    );
    let log = server.log();
    assert!(log.contains("reload: export removed"), "{log}");
    assert!(log.contains("reload: export changed, serving"), "{log}");

    let (status, _) = server.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_reload_with_an_invalid_file_keeps_the_running_configuration() {
    let site = Site::new();
    let (mut server, addr) = site.serve(&exports_toml(&[("a", "memory:1M")]));
    let mut a = Client::tcp(addr).unwrap();
    a.handshake("a", SIMPLE).unwrap();
    write_ok(&mut a, 0, b"before");

    // exports[1] starts at line 5 of the file.
    let file = site.config(&exports_toml(&[("a", "memory:1M"), ("a", "missing.raw")]));
    server.signal(libc::SIGHUP);
    server.wait_for("keeping the running configuration");
    let log = server.log();
    let at = file.display();
    assert!(
        log.contains(&format!(
            "reload: {at}:6:8: exports[1].name: \"a\" is the name of exports[0] already"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "reload: {at}:7:9: exports[1].image: file {} does not exist",
            site.path("missing.raw").display()
        )),
        "{log}"
    );

    // Nothing changed: the client goes on, and new clients see the same exports.
    assert_eq!(a.read(0, 0, 6).unwrap().unwrap(), b"before");
    write_ok(&mut a, 6, b"after");
    assert_eq!(list(addr), ["a"]);

    // Malformed TOML too, and then a good file is applied.
    site.config("[[exports]\n");
    server.signal(libc::SIGHUP);
    server.wait_for_nth("keeping the running configuration", 2);
    site.config(&exports_toml(&[("a", "memory:1M"), ("b", "memory:1M")]));
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");
    assert_eq!(list(addr), ["a", "b"]);
    assert_eq!(a.read(0, 0, 11).unwrap().unwrap(), b"beforeafter");
}

#[test]
fn server_settings_changed_by_a_reload_wait_for_a_restart() {
    let site = Site::new();
    let (mut server, addr) = site.serve(&exports_toml(&[("a", "memory:1M")]));
    site.config(
        "listen = [\"127.0.0.1:0\", \"unix:more.sock\"]\nmax_connections = 3\n\
         [[exports]]\nname = \"a\"\nimage = \"memory:1M\"\n",
    );
    server.signal(libc::SIGHUP);
    server.wait_for("reload complete");
    let line = server.wait_for("applied at the next restart");
    assert!(line.contains("listen, max_connections changed"), "{line}");
    assert!(
        !site.path("more.sock").exists(),
        "listeners are not changed by a reload"
    );
    assert_eq!(list(addr), ["a"]);
}
