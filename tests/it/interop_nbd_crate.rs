//! Interop with the `nbd` crate's client (0.3): old-school negotiation through
//! `NBD_OPT_EXPORT_NAME` without `NO_ZEROES` (so the server must send the 124 zero
//! bytes), simple replies only, one request at a time.

use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};

use nbd::client::{NbdClient, NbdExt, handshake};

use crate::support::client::Stream;
use crate::support::*;

fn connect(server: &Server, name: &str) -> (Stream, nbd::client::Export) {
    let mut s = server
        .endpoint()
        .connect()
        .unwrap_or_else(|e| panic!("connect to {:?}: {e}", server.endpoint()));
    let export = handshake(&mut s, name.as_bytes())
        .unwrap_or_else(|e| panic!("handshake for export {name:?} failed: {e}"));
    (s, export)
}

fn read_at<IO: Read + Write>(c: &mut NbdClient<IO>, offset: u64, len: usize) -> Vec<u8> {
    c.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    c.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
    buf
}

fn write_at<IO: Read + Write>(c: &mut NbdClient<IO>, offset: u64, data: &[u8]) {
    c.seek(SeekFrom::Start(offset)).unwrap();
    c.write_all(data)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", data.len()));
}

fn nbd_crate_read_write_seek(t: Transport) {
    let size = 8 * MIB;
    let server = memory(size).listen(t).start();
    let (mut s, export) = connect(&server, server.export_name());
    assert_eq!(export.size, size, "export size");
    assert!(!export.readonly, "read-write export flagged read-only");
    assert!(export.send_flush, "flush not advertised");
    assert!(export.send_trim, "trim not advertised");
    let mut c = NbdClient::new(&mut s, &export);

    // Unwritten space reads as zeroes.
    assert_eq!(read_at(&mut c, 3 * MIB, 4096), vec![0u8; 4096]);

    let data = pattern(60, 256 * KIB as usize);
    write_at(&mut c, MIB, &data);
    c.flush().expect("flush");
    assert_same_bytes("read back", &read_at(&mut c, MIB, data.len()), &data);

    // Unaligned write straddling the end of the written range.
    let small = pattern(61, 1000);
    write_at(&mut c, MIB + 256 * KIB - 500, &small);
    let mut want = data.clone();
    want.extend_from_slice(&[0u8; 500]);
    want[256 * KIB as usize - 500..].copy_from_slice(&small);
    assert_same_bytes(
        "unaligned overwrite",
        &read_at(&mut c, MIB, want.len()),
        &want,
    );

    // Seeking relative to the end and to the current position.
    assert_eq!(c.seek(SeekFrom::End(-4096)).unwrap(), size - 4096);
    let tail = pattern(62, 4096);
    c.write_all(&tail).unwrap();
    assert_eq!(c.seek(SeekFrom::Current(-4096)).unwrap(), size - 4096);
    let mut buf = vec![0u8; 4096];
    c.read_exact(&mut buf).unwrap();
    assert_same_bytes("last block", &buf, &tail);
    // At the end, reads return nothing.
    assert_eq!(c.seek(SeekFrom::End(0)).unwrap(), size);
    assert_eq!(c.read(&mut buf).unwrap(), 0);

    // Trim a range inside the data; the data around it survives.
    c.seek(SeekFrom::Start(MIB + 64 * KIB)).unwrap();
    c.trim(64 * KIB as usize).expect("trim");
    assert_same_bytes(
        "before trimmed range",
        &read_at(&mut c, MIB, 64 * KIB as usize),
        &data[..64 * KIB as usize],
    );
    assert_same_bytes(
        "after trimmed range",
        &read_at(&mut c, MIB + 128 * KIB, 64 * KIB as usize),
        &data[128 * KIB as usize..192 * KIB as usize],
    );
    c.flush().unwrap();
    drop(s);

    // A second connection, through the default export name, sees the same data.
    let (mut s2, export2) = connect(&server, "");
    assert_eq!(export2.size, size);
    let mut c2 = NbdClient::new(&mut s2, &export2);
    assert_same_bytes(
        "second connection",
        &read_at(&mut c2, size - 4096, 4096),
        &tail,
    );
    assert_same_bytes(
        "second connection",
        &read_at(&mut c2, MIB, 64 * KIB as usize),
        &data[..64 * KIB as usize],
    );
}

fn nbd_crate_large_requests(t: Transport) {
    // Requests of several MiB each way, against a file export.
    let (_dir, disk) = scratch("big.img");
    std::fs::write(&disk, vec![0u8; 32 * MIB as usize]).unwrap();
    let mut server = file(&disk).listen(t).start();
    let data = pattern(63, 8 * MIB as usize);
    {
        let (mut s, export) = connect(&server, server.export_name());
        assert_eq!(export.size, 32 * MIB);
        let mut c = NbdClient::new(&mut s, &export);
        write_at(&mut c, 5 * MIB + 512, &data);
        c.flush().unwrap();
        assert_same_bytes(
            "8 MiB read",
            &read_at(&mut c, 5 * MIB + 512, data.len()),
            &data,
        );
    }
    server.stop_cleanly_with(libc::SIGTERM);
    let on_disk = std::fs::read(&disk).unwrap();
    assert_same_bytes(
        "backing file",
        &on_disk[5 * MIB as usize + 512..13 * MIB as usize + 512],
        &data,
    );
    assert!(on_disk[..5 * MIB as usize + 512].iter().all(|&b| b == 0));
}

fn nbd_crate_read_only(t: Transport) {
    let (_dir, disk) = scratch("ro.img");
    let data = pattern(64, 1024 * 1024);
    std::fs::write(&disk, &data).unwrap();
    let server = file(&disk).listen(t).read_only().start();
    let (mut s, export) = connect(&server, server.export_name());
    assert!(export.readonly, "read-only export not flagged read-only");
    assert!(!export.send_trim, "read-only export advertises trim");
    let mut c = NbdClient::new(&mut s, &export);
    assert_same_bytes("read", &read_at(&mut c, 4096, 8192), &data[4096..12288]);

    // The client sends the write anyway; the server must refuse it with EPERM.
    c.seek(SeekFrom::Start(0)).unwrap();
    let err = c
        .write(&[0xffu8; 4096])
        .expect_err("write to read-only export succeeded");
    assert_eq!(
        err.kind(),
        ErrorKind::PermissionDenied,
        "expected EPERM, got {err}"
    );
    // The connection still works and nothing changed.
    assert_same_bytes(
        "after refused write",
        &read_at(&mut c, 0, 8192),
        &data[..8192],
    );
    drop(s);
    drop(server);
    assert_same_bytes("file", &std::fs::read(&disk).unwrap(), &data);
}

fn nbd_crate_many_clients(t: Transport) {
    let server = memory(16 * MIB).listen(t).start();
    let clients = 8;
    std::thread::scope(|scope| {
        for i in 0..clients {
            let server = &server;
            scope.spawn(move || {
                let (mut s, export) = connect(server, server.export_name());
                let mut c = NbdClient::new(&mut s, &export);
                let data = pattern(70 + i, 512 * KIB as usize);
                for round in 0..4u64 {
                    let off = i * 2 * MIB + round * 512 * KIB;
                    write_at(&mut c, off, &data);
                    assert_same_bytes("own region", &read_at(&mut c, off, data.len()), &data);
                }
                c.flush().unwrap();
            });
        }
    });
    let (mut s, export) = connect(&server, server.export_name());
    let mut c = NbdClient::new(&mut s, &export);
    for i in 0..clients {
        let data = pattern(70 + i, 512 * KIB as usize);
        assert_same_bytes(
            "region written by another client",
            &read_at(&mut c, i * 2 * MIB + 3 * 512 * KIB, data.len()),
            &data,
        );
    }
}

/// Resident memory of a process, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// A hundred idle connections (handshake done, nothing in flight) beside one busy
/// client cost the server little memory: under 50 MiB resident in all. The export is a
/// file, so the disk's data is page cache, not the server's own memory.
fn idle_connections_stay_small(t: Transport) {
    if !strata_only("the resident-memory bound") {
        return;
    }
    let (_dir, path) = scratch("disk.raw");
    std::fs::write(&path, vec![0u8; 64 * MIB as usize]).unwrap();
    let server = file(&path).listen(t).start();
    let pid = server.pid().expect("server running");
    let idle: Vec<_> = (0..100)
        .map(|_| connect(&server, server.export_name()))
        .collect();
    let (mut s, export) = connect(&server, server.export_name());
    let mut c = NbdClient::new(&mut s, &export);
    let data = pattern(90, 4 * MIB as usize);
    for round in 0..8u64 {
        write_at(&mut c, round * 4 * MIB, &data);
        assert_same_bytes(
            "busy client",
            &read_at(&mut c, round * 4 * MIB, data.len()),
            &data,
        );
    }
    let rss = resident_bytes(pid);
    eprintln!(
        "server resident with {} idle connections: {rss} bytes",
        idle.len()
    );
    assert!(
        rss < 50 * MIB,
        "server resident size {rss} bytes with 100 idle connections"
    );
    drop(idle);
}

/// Replies read from a file in memory point into a mapping of the file. If another
/// process truncates the file under the server, such a reply cannot be sent: that
/// connection ends, the client gets an error rather than wrong data, and the server
/// carries on (no SIGBUS) and still shuts down cleanly.
fn truncated_file_in_memory_ends_only_the_connection(t: Transport) {
    if !strata_only("zero-copy reads of files in memory") {
        return;
    }
    let Some(shm) = memory_dir() else {
        return;
    };
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("disk.raw");
    let data = pattern(91, 4 * MIB as usize);
    std::fs::write(&path, &data).unwrap();
    let mut server = file(&path).listen(t).start();
    let (mut s, export) = connect(&server, server.export_name());
    let mut c = NbdClient::new(&mut s, &export);
    let at = MIB as usize;
    assert_same_bytes(
        "before truncation",
        &read_at(&mut c, MIB, 64 * KIB as usize),
        &data[at..at + 64 * KIB as usize],
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    c.seek(SeekFrom::Start(2 * MIB)).unwrap();
    let mut buf = vec![0u8; 64 * KIB as usize];
    let r = c.read_exact(&mut buf);
    assert!(r.is_err(), "a read of a truncated file returned data");
    // The server is still up: a new client gets through the handshake.
    let (_s2, export2) = connect(&server, server.export_name());
    assert_eq!(export2.size, export.size);
    server.stop_cleanly_with(libc::SIGTERM);
}

over_transports!(
    nbd_crate_read_write_seek,
    nbd_crate_large_requests,
    nbd_crate_read_only,
    nbd_crate_many_clients,
    idle_connections_stay_small,
    truncated_file_in_memory_ends_only_the_connection,
);
