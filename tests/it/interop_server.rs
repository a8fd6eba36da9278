//! The server's command-line contract, seen from clients: export naming, several
//! `--listen` addresses at once, IPv6, unknown export names, startup errors and graceful
//! shutdown on SIGTERM/SIGINT.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

use crate::support::*;
use nbd::client::{NbdClient, handshake};

fn write_then_read_elsewhere(writer: &Endpoint, reader: &Endpoint, name: &str, seed: u64) {
    let data = pattern(seed, 64 * KIB as usize);
    let offset = seed * MIB;
    {
        let mut s = writer.connect().unwrap();
        let export = handshake(&mut s, name.as_bytes()).unwrap();
        let mut c = NbdClient::new(&mut s, &export);
        c.seek(SeekFrom::Start(offset)).unwrap();
        c.write_all(&data).unwrap();
        c.flush().unwrap();
    }
    let mut s = reader.connect().unwrap();
    let export = handshake(&mut s, name.as_bytes()).unwrap();
    let mut c = NbdClient::new(&mut s, &export);
    c.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; data.len()];
    c.read_exact(&mut buf).unwrap();
    assert_same_bytes(
        &format!("written via {writer:?}, read via {reader:?}"),
        &buf,
        &data,
    );
}

#[test]
fn default_export_names() {
    if !require_tool("nbdinfo") {
        return;
    }
    let server = memory(MIB).start();
    nbdinfo(&["--list", &server.default_uri()])
        .assert_success()
        .assert_stdout(&["export=\"memory\""]);

    let (_dir, disk) = scratch("guest-disk.raw");
    std::fs::write(&disk, vec![0u8; 2 * MIB as usize]).unwrap();
    let server = file(&disk).start();
    nbdinfo(&["--list", &server.default_uri()])
        .assert_success()
        .assert_stdout(&["export=\"guest-disk\""]);
    for uri in [server.endpoint().uri("guest-disk"), server.default_uri()] {
        let out = nbdinfo(&["--size", &uri]).assert_success();
        assert_eq!(out.stdout.trim(), (2 * MIB).to_string(), "{}", out.report());
    }
}

#[test]
fn unknown_export_name_is_refused() {
    if !strata_only("refusing unknown export names") || !require_tool("nbdinfo") {
        return;
    }
    let server = memory(MIB).name("known").start();
    let out = nbdinfo(&["--size", &server.endpoint().uri("no-such-export")]);
    assert!(
        !out.success(),
        "connecting to an unknown export name succeeded\n{}",
        out.report()
    );
    // NBD_OPT_EXPORT_NAME with an unknown name: the server must close the connection.
    let mut s = server.endpoint().connect().unwrap();
    assert!(
        handshake(&mut s, b"no-such-export").is_err(),
        "NBD_OPT_EXPORT_NAME accepted an unknown name"
    );
    // The known names still work.
    nbdinfo(&["--size", &server.uri()]).assert_success();
    nbdinfo(&["--size", &server.default_uri()]).assert_success();
}

#[test]
fn several_listen_addresses() {
    if !strata_only("several --listen addresses") {
        return;
    }
    let mut b = memory(16 * MIB)
        .listen(Transport::Tcp)
        .listen(Transport::Unix);
    if ipv6_loopback_available() {
        b = b.listen(Transport::Tcp6);
    } else {
        eprintln!("note: ::1 not available; testing TCP v4 + Unix only");
    }
    let server = b.start();
    let eps = server.endpoints().to_vec();
    let name = server.export_name().to_owned();
    for (i, w) in eps.iter().enumerate() {
        for (j, r) in eps.iter().enumerate() {
            if i != j {
                write_then_read_elsewhere(w, r, &name, (i * eps.len() + j) as u64);
            }
        }
    }
}

#[test]
fn ipv6_loopback() {
    if !ipv6_loopback_available() {
        eprintln!("SKIPPED: ::1 cannot be bound on this machine");
        return;
    }
    let server = memory(4 * MIB).listen(Transport::Tcp6).start();
    assert!(server.uri().starts_with("nbd://[::1]:"), "{}", server.uri());
    write_then_read_elsewhere(
        server.endpoint(),
        server.endpoint(),
        server.export_name(),
        1,
    );
    if require_tool("nbdinfo") {
        let out = nbdinfo(&["--size", &server.uri()]).assert_success();
        assert_eq!(out.stdout.trim(), (4 * MIB).to_string(), "{}", out.report());
    }
}

fn shutdown_on_signal(signal: libc::c_int) {
    let (_dir, disk) = scratch("sig.img");
    std::fs::write(&disk, vec![0u8; 4 * MIB as usize]).unwrap();
    let mut server = file(&disk).start();
    let data = pattern(80 + signal as u64, 256 * KIB as usize);
    // Written without a flush; a clean shutdown must still leave it in the file.
    {
        let mut s = server.endpoint().connect().unwrap();
        let export = handshake(&mut s, server.export_name().as_bytes()).unwrap();
        let mut c = NbdClient::new(&mut s, &export);
        c.seek(SeekFrom::Start(MIB)).unwrap();
        c.write_all(&data).unwrap();
    }
    // An idle client still connected must not keep the server from exiting. (nbdkit
    // sometimes waits for such a client, so this part is strata's promise only.)
    let idle = if server_kind() == ServerKind::Strata {
        let mut idle = server.endpoint().connect().unwrap();
        let export = handshake(&mut idle, server.export_name().as_bytes()).unwrap();
        assert_eq!(export.size, 4 * MIB);
        Some(idle)
    } else {
        None
    };

    let start = Instant::now();
    server.stop_cleanly_with(signal);
    eprintln!("server exited {:?} after signal {signal}", start.elapsed());
    let on_disk = std::fs::read(&disk).unwrap();
    assert_same_bytes(
        "data written before the signal",
        &on_disk[MIB as usize..MIB as usize + data.len()],
        &data,
    );
    // The listening address is closed.
    assert!(
        server.endpoint().connect().is_err(),
        "server still accepts connections after exiting"
    );
    drop(idle);
}

#[test]
fn sigterm_shuts_down_cleanly() {
    shutdown_on_signal(libc::SIGTERM);
}

#[test]
fn sigint_shuts_down_cleanly() {
    shutdown_on_signal(libc::SIGINT);
}

#[test]
fn unix_socket_and_read_only_together() {
    let (_dir, disk) = scratch("rounix.img");
    let data = pattern(90, MIB as usize);
    std::fs::write(&disk, &data).unwrap();
    let server = file(&disk).listen(Transport::Unix).read_only().start();
    let mut s = server.endpoint().connect().unwrap();
    let export = handshake(&mut s, b"").unwrap();
    assert!(export.readonly);
    assert_eq!(export.size, MIB);
    let mut c = NbdClient::new(&mut s, &export);
    let mut buf = vec![0u8; MIB as usize];
    c.read_exact(&mut buf).unwrap();
    assert_same_bytes("read over unix", &buf, &data);
}
