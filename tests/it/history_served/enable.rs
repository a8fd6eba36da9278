//! `strata history enable`: an existing image keeps its data and gains a history at the
//! same path; refused while served or with snapshots.

use super::serve;
use crate::support::{
    CMD_TIMEOUT, KIB, file, pattern, run_timeout, strata_at, strata_at_ok, strata_only,
};

#[test]
fn an_existing_image_turns_into_a_volume_with_history_in_place() {
    if !strata_only("volumes with history") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    strata_at_ok(dir.path(), &["create", "img.strata", "--size", "1M"]);
    let img = dir.path().join("img.strata");
    let data = pattern(7, 64 * KIB as usize);
    {
        let mut server = file(&img).name("img").start();
        let mut c = crate::support::client::Client::connect(server.endpoint()).unwrap();
        c.handshake("img", crate::support::client::STRUCTURED)
            .unwrap();
        c.write(0, 0, &data).unwrap().unwrap();
        c.flush().unwrap().unwrap();
        // Refused while served.
        let busy = run_timeout(
            &mut strata_at(
                dir.path(),
                &["history", "enable", "img.strata", "--window", "1h"],
            ),
            CMD_TIMEOUT,
        );
        busy.assert_failure().assert_stderr(&["in use"]);
        drop(c);
        server.stop_cleanly_with(libc::SIGTERM);
    }
    // Refused with snapshots.
    strata_at_ok(dir.path(), &["snapshot", "create", "img.strata", "s1"]);
    let snap = run_timeout(
        &mut strata_at(
            dir.path(),
            &["history", "enable", "img.strata", "--window", "1h"],
        ),
        CMD_TIMEOUT,
    );
    snap.assert_failure().assert_stderr(&["snapshots"]);
    strata_at_ok(dir.path(), &["snapshot", "delete", "img.strata", "s1"]);

    strata_at_ok(
        dir.path(),
        &["history", "enable", "img.strata", "--window", "1h"],
    )
    .assert_stdout(&["keeps its history"]);
    assert!(img.is_dir() && dir.path().join("img.strata.before-history").is_file());
    // Served at the same path: the old data, and new writes become points.
    let (mut server, mut c) = serve(&img);
    assert_eq!(c.read(0, 0, data.len()).unwrap().unwrap(), data);
    c.write(0, 4096, &pattern(8, 4096)).unwrap().unwrap();
    c.flush().unwrap().unwrap();
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);
    let listed = strata_at_ok(dir.path(), &["history", "img.strata", "--json"]).json();
    assert_eq!(listed["points"].as_array().unwrap().len(), 1, "{listed}");
}
