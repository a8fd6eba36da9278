//! A full disk: writes that need a new segment fail with ENOSPC, nothing acknowledged
//! is lost, the history stays, and writing works again once there is space.

use std::sync::Arc;

use strata::ErrorKind;

use super::{SIZE, base, bytes, create, open, read_all};

#[test]
fn a_full_disk_fails_writes_cleanly_and_recovers_when_space_returns() {
    let base = base();
    let files = create(&base, 3600);
    let h = open(&files, &base);
    // Fill most of the first segment (1 MiB), with restore points along the way.
    let mut n = 0;
    while n < 12 {
        h.write(0, &bytes(n, SIZE as usize), false).unwrap();
        h.flush().unwrap();
        n += 1;
    }
    let before = read_all(&h);
    let points = h.points();
    // No room for another segment.
    files.set_capacity(Some(512 * 1024));
    let mut failed = None;
    for i in 0..40 {
        if let Err(e) = h.write(0, &bytes(100 + i, SIZE as usize), false) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("the segment filled up and no other could start");
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    // A FUA write refused the same way leaves no trace: the flush after it neither
    // waits for it nor makes a point of it.
    h.flush().expect("what was written before stays durable");
    let listed = h.points().len();
    let refused = h.write(0, &bytes(500, SIZE as usize), true).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::NoSpace, "{refused}");
    let kept = read_all(&h);
    h.flush()
        .expect("a refused write leaves nothing to wait for");
    assert_eq!(h.points().len(), listed, "no point for refused writes");
    assert_eq!(
        &h.points()[..points.len()],
        &points[..],
        "the history is intact"
    );
    for p in &points {
        h.view(*p).unwrap();
    }
    // Space returns: writing works again, and survives a reopen.
    files.set_capacity(None);
    h.write(0, &bytes(999, 4096), true).unwrap();
    let mut now = kept.clone();
    now[..4096].copy_from_slice(&bytes(999, 4096));
    assert_eq!(read_all(&h), now);
    drop(h);
    let h = open(&files, &base);
    assert_eq!(read_all(&h), now);
    assert_ne!(before, now);
    let _ = Arc::clone(&files);
}
