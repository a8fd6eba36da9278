//! Out of space: writes beyond the file size limit fail with `ENOSPC`.

use std::fs;
use std::path::Path;

use crate::support::client::{Client, SIMPLE};
use crate::support::spec::{CMD_FLUSH, CMD_TRIM, CMD_WRITE, ENOSPC};
use crate::support::{
    Endpoint, MIB, Server, assert_same_bytes, file, pattern, strata_at_ok, strata_only,
};

use super::{CS, assert_clean, contents, put};

/// A connection over TCP to the server's export.
fn conn(server: &Server) -> Client {
    let Endpoint::Tcp(addr) = server.endpoint() else {
        panic!("TCP expected")
    };
    let mut c = Client::tcp(*addr).unwrap();
    c.handshake(server.export_name(), SIMPLE).unwrap();
    c
}

/// Stops `server` (SIGTERM: it must exit cleanly), checks `disk.strata` in `d` and
/// returns what it holds, whose first 20 MiB must be `expected`'s (`what` says when).
fn stop_and_read(mut server: Server, d: &Path, expected: &[u8], what: &str) -> Vec<u8> {
    server.stop_cleanly_with(libc::SIGTERM);
    assert_clean(d, "disk.strata");
    let got = contents(d, "disk.strata");
    let head = 20 * MIB as usize;
    assert_same_bytes(what, &got[..head], &expected[..head]);
    got
}

#[test]
fn writes_beyond_the_file_size_limit_fail_with_enospc() {
    if !strata_only("Strata images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.strata");
    strata_at_ok(d, &["create", "disk.strata", "-s", "64M"]);
    let first = pattern(60, 4 * CS as usize);
    let mut expected = vec![0u8; 64 * MIB as usize];
    put(&mut expected, 0, &first);
    let mut server = file(&img).start();
    let mut c = conn(&server);
    assert_eq!(
        c.command(0, CMD_WRITE, 0, first.len() as u64, &first)
            .unwrap(),
        0
    );
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    drop(c);
    server.stop_cleanly_with(libc::SIGTERM);

    // The file may not grow at all: new clusters cannot be stored.
    let len = fs::metadata(&img).unwrap().len();
    let server = file(&img).file_size_limit(len).start();
    let mut c = conn(&server);
    let new = pattern(61, CS as usize);
    assert_eq!(
        c.command(0, CMD_WRITE, 10 * MIB, CS, &new).unwrap(),
        ENOSPC,
        "a write needing a new cluster\n{}",
        server.log()
    );
    // Clusters the image holds are still written in place, on the same connection.
    let small = pattern(62, 1000);
    assert_eq!(c.command(0, CMD_WRITE, 100, 1000, &small).unwrap(), 0);
    put(&mut expected, 100, &small);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    assert_same_bytes(
        "after ENOSPC",
        &c.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    // Space given back by a trim is reused once the trim is durable.
    assert_eq!(c.command(0, CMD_TRIM, 2 * CS, CS, &[]).unwrap(), 0);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    put(&mut expected, 2 * CS, &vec![0; CS as usize]);
    assert_eq!(
        c.command(0, CMD_WRITE, 10 * MIB, CS, &new).unwrap(),
        0,
        "{}",
        server.log()
    );
    put(&mut expected, 10 * MIB, &new);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    // Two clusters do not fit in the one freed.
    let two = pattern(63, 2 * CS as usize);
    assert_eq!(
        c.command(0, CMD_WRITE, 20 * MIB, 2 * CS, &two).unwrap(),
        ENOSPC
    );
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    // The server still serves this connection and new ones.
    assert_same_bytes(
        "written cluster",
        &c.read(0, 10 * MIB, CS as usize).unwrap().unwrap(),
        &new,
    );
    let mut c2 = conn(&server);
    assert_same_bytes(
        "new connection",
        &c2.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    drop((c, c2));
    let got = stop_and_read(server, d, &expected, "before the failed write");
    assert_same_bytes(
        "after the failed write",
        &got[22 * MIB as usize..],
        &expected[22 * MIB as usize..],
    );

    // Room for one more cluster, not for the map page a far cluster needs: the write
    // succeeds, the flush that would make it durable fails and says so.
    let len = fs::metadata(&img).unwrap().len();
    let server = file(&img).file_size_limit(len + CS).start();
    let mut c = conn(&server);
    let far = 40 * MIB;
    assert_eq!(
        c.command(0, CMD_WRITE, far, CS, &new).unwrap(),
        0,
        "{}",
        server.log()
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        ENOSPC,
        "{}",
        server.log()
    );
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        ENOSPC,
        "{}",
        server.log()
    );
    // Taking the write back makes the map fit again.
    assert_eq!(c.command(0, CMD_TRIM, far, CS, &[]).unwrap(), 0);
    assert_eq!(
        c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(),
        0,
        "{}",
        server.log()
    );
    assert_same_bytes(
        "flushed data",
        &c.read(0, 0, 4 * CS as usize).unwrap().unwrap(),
        &expected[..4 * CS as usize],
    );
    drop(c);
    let got = stop_and_read(server, d, &expected, "flushed data after restart");
    assert!(
        got[far as usize..(far + CS) as usize]
            .iter()
            .all(|&b| b == 0)
    );
}
