//! `strata check` of a volume with history: a torn tail is reported and cut by
//! `--repair`, a damaged checkpoint is passed over, a missing segment is an error.

use std::io::Write as _;

use super::{serve, volume};
use crate::support::{
    CMD_TIMEOUT, KIB, pattern, run_timeout, strata_at, strata_at_ok, strata_only,
};

fn segments(vol: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut s: Vec<_> = std::fs::read_dir(vol)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    s.sort();
    s
}

#[test]
fn check_reports_a_torn_tail_a_bad_checkpoint_and_a_missing_segment() {
    if !strata_only("volumes with history") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), "1M");
    let (mut server, mut c) = serve(&vol);
    c.write(0, 0, &pattern(1, 64 * KIB as usize))
        .unwrap()
        .unwrap();
    c.flush().unwrap().unwrap();
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);
    let clean = strata_at_ok(dir.path(), &["check", "vol", "--json"]).json();
    assert_eq!(clean["problems"].as_array().unwrap().len(), 0, "{clean}");
    assert_eq!(clean["torn_bytes"], 0, "{clean}");
    assert_eq!(clean["points"], 1, "{clean}");

    // A record a crash tore: bytes after the last whole record.
    let last = segments(&vol).pop().unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap()
        .write_all(&[0xab; 100])
        .unwrap();
    let torn = strata_at_ok(dir.path(), &["check", "vol", "--json"]).json();
    assert_eq!(torn["torn_bytes"], 100, "{torn}");
    let text = strata_at_ok(dir.path(), &["check", "vol"]);
    text.assert_stdout(&["torn log tail", "no errors"]);
    let repaired = strata_at_ok(dir.path(), &["check", "vol", "--repair", "--json"]).json();
    assert_eq!(repaired["torn_bytes"], 0, "{repaired}");
    assert!(
        repaired["repaired"][0]
            .as_str()
            .unwrap()
            .contains("cut 100 bytes"),
        "{repaired}"
    );

    // A damaged checkpoint is passed over: the log is replayed from the start.
    let ckpt = std::fs::read_dir(&vol)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("ckpt-")
        })
        .expect("a checkpoint from the clean close");
    let good = std::fs::read(&ckpt).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0xff;
    std::fs::write(&ckpt, &bad).unwrap();
    let passed = strata_at_ok(dir.path(), &["check", "vol", "--json"]).json();
    assert_eq!(passed["bad_checkpoints"], 1, "{passed}");
    assert_eq!(
        passed["points"], 1,
        "the point is found again in the log: {passed}"
    );
    std::fs::write(&ckpt, &good).unwrap();

    // A segment the index reads is gone: an error, and the exit status says so.
    for s in segments(&vol) {
        std::fs::remove_file(s).unwrap();
    }
    let broken = run_timeout(&mut strata_at(dir.path(), &["check", "vol"]), CMD_TIMEOUT);
    assert!(!broken.success(), "{}", broken.report());
}
