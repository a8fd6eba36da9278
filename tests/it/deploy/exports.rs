//! A configuration's exports served to real clients, and exports that require TLS.

use std::io::{Read, Seek, SeekFrom, Write};

use crate::support::client::{Client, EXTENDED, SIMPLE, STRUCTURED};
use crate::support::pattern;
use crate::support::spec::{CMD_WRITE, EPERM};

use super::{Site, assert_unknown, list, unix_client, write_ok};

// ---------------------------------------------------------------------------------------
// Serving a configuration
// ---------------------------------------------------------------------------------------

#[test]
fn serves_the_exports_of_a_configuration() {
    let site = Site::new();
    site.raw("vm1.raw", 1 << 20, 0);
    site.raw("golden.raw", 1 << 20, 0x5a);
    let (mut server, addr) = site.serve(
        r#"
listen = ["127.0.0.1:0", "unix:nbd.sock"]
handshake_timeout = 5

[[exports]]
name = "vm1"
image = "vm1.raw"
description = "the first VM"

[[exports]]
name = "golden"
image = "golden.raw"
read_only = true

[[exports]]
name = "scratch"
image = "memory:4M"

[[exports]]
name = "local"
image = "memory:1M"
allow = ["unix"]
"#,
    );
    server.wait_for("listening on unix:");

    assert_eq!(
        list(addr),
        ["golden", "scratch", "vm1"],
        "`local` is for Unix-socket clients only"
    );

    // The first export of the file is the default one.
    let mut c = Client::tcp(addr).unwrap();
    let (size, _) = c.handshake("", SIMPLE).unwrap();
    assert_eq!(size, 1 << 20);
    let data = pattern(1, 8192);
    write_ok(&mut c, 4096, &data);
    assert!(
        c.read(0, 4096, 8192).unwrap().unwrap() == data,
        "read back differs"
    );
    drop(c);
    let on_disk = std::fs::read(site.path("vm1.raw")).unwrap();
    assert_eq!(
        &on_disk[4096..4096 + 8192],
        &data[..],
        "written to the file"
    );

    let mut c = Client::tcp(addr).unwrap();
    let (_, flags) = c.handshake("golden", STRUCTURED).unwrap();
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.command(0, CMD_WRITE, 0, 4, b"nope").unwrap(), EPERM);
    assert_eq!(c.read(0, 0, 4).unwrap().unwrap(), [0x5a; 4]);

    let mut c = Client::tcp(addr).unwrap();
    let (size, _) = c.handshake("scratch", EXTENDED).unwrap();
    assert_eq!(size, 4 << 20);

    assert_unknown(addr, "local");
    let mut u = unix_client(&site.path("nbd.sock"), "local");
    u.write_all(b"over unix").unwrap();
    u.seek(SeekFrom::Start(0)).unwrap();
    let mut back = [0u8; 9];
    u.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over unix");

    let (status, _) = server.stop_with(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Exports that require TLS
// ---------------------------------------------------------------------------------------

/// A CA and a server certificate for 127.0.0.1, as PEM files: `server/cert.pem`,
/// `server/key.pem`, and `client/ca-cert.pem` for libnbd's `tls-certificates=`.
#[cfg(feature = "tls")]
fn certificates(site: &Site) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "deploy test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    for (name, text) in [
        ("server/cert.pem", leaf.pem()),
        ("server/key.pem", key.serialize_pem()),
        ("client/ca-cert.pem", ca.pem()),
    ] {
        let path = site.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[cfg(feature = "tls")]
#[test]
fn an_export_that_requires_tls_is_invisible_to_plaintext_clients() {
    let site = Site::new();
    certificates(&site);
    let (_server, addr) = site.serve(
        r#"
listen = ["127.0.0.1:0"]
[tls]
mode = "optional"
cert = "server/cert.pem"
key = "server/key.pem"

[[exports]]
name = "open"
image = "memory:1M"

[[exports]]
name = "secret"
image = "memory:2M"
require_tls = true
"#,
    );
    assert_eq!(list(addr), ["open"], "plaintext clients do not see it");
    assert_unknown(addr, "secret");
    let mut c = Client::tcp(addr).unwrap();
    c.handshake("open", SIMPLE).unwrap();

    if !crate::support::require_tool("nbdinfo") {
        return;
    }
    let dir = site.path("client");
    let tls_uri = format!("nbds://{addr}/secret?tls-certificates={}", dir.display());
    let out = crate::support::nbdinfo(&["--size", &tls_uri]).assert_success();
    assert_eq!(out.stdout.trim(), (2u64 << 20).to_string());
    let out = crate::support::nbdinfo(&["--size", &format!("nbd://{addr}/secret")]);
    assert!(!out.success(), "plaintext is refused\n{}", out.report());
}
