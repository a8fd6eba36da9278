//! TLS policies (`--tls optional`, `require`, `off`) with real clients and the raw wire
//! client, and mutual TLS.

use std::fs;
use std::process::Command;

use crate::support::client::Client;
use crate::support::spec::{
    INFO_DESCRIPTION, INFO_NAME, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
};
use crate::support::wire::{info_data, meta_data, opt};
use crate::support::{
    MIB, assert_same_bytes, memory, nbdinfo, pattern, qemu_img, require_tools, run, strata_only,
};

use super::{
    Creds, Pki, assert_log_contains, greeted, nbds_uri, qemu_img_info_tls, qemu_tls, read_to_close,
    reply_bytes, size_in_qemu_json, tcp_addr,
};

// ---------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------

/// `--tls optional` (the default with a certificate): TLS and plaintext clients both work.
#[test]
fn optional_tls_serves_tls_and_plaintext_clients() {
    if !strata_only("TLS options") || !require_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let pki = Pki::new();
    let server = memory(4 * MIB).args(pki.server_args()).start();

    nbdinfo(&[&nbds_uri(&server, "memory", &pki, Creds::Anonymous)])
        .assert_success()
        .assert_stdout(&["with TLS", &format!("export-size: {}", 4 * MIB)]);
    let out = nbdinfo(&[&server.uri()]).assert_success();
    assert!(!out.stdout.contains("with TLS"), "{}", out.report());

    let out = qemu_img_info_tls(&server, "memory", &pki, Creds::Anonymous).assert_success();
    assert_eq!(size_in_qemu_json(&out), Some(4 * MIB), "{}", out.report());
    let out = run(qemu_img().args(["info", "--output=json", &server.uri()])).assert_success();
    assert_eq!(size_in_qemu_json(&out), Some(4 * MIB), "{}", out.report());
    assert_log_contains(&server, "TLS established");
}

/// `--tls require`, as a plaintext client sees it on the wire: every option but
/// STARTTLS and ABORT is refused with ERR_TLS_REQD and nothing else (no export list, no
/// export information), EXPORT_NAME ends the session, and so does a client without fixed
/// newstyle, which cannot start TLS at all.
#[test]
fn require_tls_tells_plaintext_clients_nothing() {
    if !strata_only("TLS options") {
        return;
    }
    let pki = Pki::new();
    let server = memory(MIB)
        .args(pki.server_args())
        .args(["--tls", "require", "--description", "secret disk"])
        .start();
    let refusal = |option| reply_bytes(option, REP_ERR_TLS_REQD, b"TLS is required on this server");

    let mut c = greeted(&server);
    for (option, data) in [
        (OPT_LIST, vec![]),
        (
            OPT_INFO,
            info_data("memory", &[INFO_NAME, INFO_DESCRIPTION]),
        ),
        (OPT_GO, info_data("", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("memory", &[])),
        (0x4242, vec![]),
    ] {
        c.send(&opt(option, &data)).unwrap();
        let want = refusal(option);
        let got = c.read_exact(want.len()).unwrap();
        assert_eq!(got, want, "reply to option {option:#x}");
    }
    // Nothing was queued behind those refusals: the next reply is ABORT's.
    c.send(&opt(OPT_ABORT, &[])).unwrap();
    assert_eq!(
        c.read_exact(20).unwrap(),
        reply_bytes(OPT_ABORT, REP_ACK, &[])
    );
    assert!(read_to_close(&mut c).is_empty());

    let mut c = greeted(&server);
    c.send(&opt(OPT_EXPORT_NAME, b"memory")).unwrap();
    assert!(
        read_to_close(&mut c).is_empty(),
        "EXPORT_NAME must end the session"
    );

    let mut c = Client::tcp(tcp_addr(&server)).unwrap();
    c.greet(0).unwrap();
    c.send(&opt(OPT_EXPORT_NAME, b"memory")).unwrap();
    assert!(
        read_to_close(&mut c).is_empty(),
        "no fixed newstyle, no TLS"
    );
}

/// STARTTLS is acknowledged only when nothing follows it before the TLS handshake: bytes
/// sent behind it are never taken as options from inside the TLS session.
#[test]
fn starttls_with_bytes_behind_it_ends_the_session() {
    if !strata_only("TLS options") {
        return;
    }
    let pki = Pki::new();
    let server = memory(MIB).args(pki.server_args()).start();
    let mut c = greeted(&server);
    c.send(&[opt(OPT_STARTTLS, &[]), opt(OPT_LIST, &[])].concat())
        .unwrap();
    let sent = read_to_close(&mut c);
    // Whether the server saw the LIST at once (and closes without a reply) or only once
    // it expected a TLS ClientHello (which the LIST is not), no LIST reply ever comes.
    assert!(
        sent.is_empty() || sent == reply_bytes(OPT_STARTTLS, REP_ACK, &[]),
        "{sent:02x?}"
    );
}

/// `--tls require` with real clients: plaintext ones fail, TLS ones work, and data
/// written over TLS reads back (nbdcopy both ways, qemu-img convert and compare).
#[test]
fn require_tls_with_real_clients() {
    if !strata_only("TLS options") || !require_tools(&["nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    let pki = Pki::new();
    let server = memory(4 * MIB)
        .args(pki.server_args())
        .args(["--tls", "require"])
        .start();

    let out = nbdinfo(&["--list", &server.default_uri()]);
    assert!(
        !out.success(),
        "plaintext listing must fail\n{}",
        out.report()
    );
    assert!(!out.stdout.contains("memory"), "{}", out.report());
    let out = run(qemu_img().args(["info", &server.uri()]));
    assert!(
        !out.success(),
        "plaintext qemu-img must fail\n{}",
        out.report()
    );

    nbdinfo(&["--list", &nbds_uri(&server, "", &pki, Creds::Anonymous)])
        .assert_success()
        .assert_stdout(&["export=\"memory\""]);

    // nbdcopy in, nbdcopy out.
    let scratch = server.scratch();
    let data = pattern(7, 4 * MIB as usize);
    fs::write(scratch.join("in.raw"), &data).unwrap();
    let uri = nbds_uri(&server, "memory", &pki, Creds::Anonymous);
    run(Command::new("nbdcopy")
        .arg(scratch.join("in.raw"))
        .arg(&uri))
    .assert_success();
    run(Command::new("nbdcopy")
        .arg(&uri)
        .arg(scratch.join("out.raw")))
    .assert_success();
    assert_same_bytes(
        "nbdcopy over TLS",
        &data,
        &fs::read(scratch.join("out.raw")).unwrap(),
    );

    // qemu-img convert into the export, then compare it with the source.
    let other = pattern(8, 4 * MIB as usize);
    fs::write(scratch.join("other.raw"), &other).unwrap();
    let (object, opts) = qemu_tls(&server, "memory", &pki, Creds::Anonymous);
    run(qemu_img()
        .args([
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            &object,
            "--target-image-opts",
        ])
        .arg(scratch.join("other.raw"))
        .arg(&opts))
    .assert_success();
    let src = format!(
        "driver=raw,file.filename={}",
        scratch.join("other.raw").display()
    );
    run(qemu_img().args(["compare", "--object", &object, "--image-opts", &src, &opts]))
        .assert_success();
    let out = run(qemu_img()
        .args(["compare", "--object", &object, "--image-opts"])
        .arg(format!(
            "driver=raw,file.filename={}",
            scratch.join("in.raw").display()
        ))
        .arg(&opts));
    assert_eq!(
        out.code(),
        Some(1),
        "different images must differ\n{}",
        out.report()
    );
}

/// STARTTLS is refused with ERR_UNSUP without a certificate, as before TLS existed.
#[test]
fn tls_off_refuses_starttls() {
    if !strata_only("TLS options") {
        return;
    }
    let server = memory(MIB).start();
    let mut c = greeted(&server);
    let r = c.opt(OPT_STARTTLS, &[]).unwrap();
    assert_eq!((r.len(), r[0].ty), (1, REP_ERR_UNSUP));
    c.go("memory", &[]).unwrap();
}

// ---------------------------------------------------------------------------------------
// Mutual TLS
// ---------------------------------------------------------------------------------------

/// With `--tls-client-ca`, a client certificate signed by that CA gets in (and its
/// identity is logged); an untrusted certificate or none at all does not.
#[test]
fn mutual_tls_needs_a_trusted_client_certificate() {
    if !strata_only("TLS options") || !require_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let pki = Pki::new();
    let server = memory(MIB)
        .args(pki.mutual_args())
        .args(["--tls", "require"])
        .start();

    nbdinfo(&[&nbds_uri(&server, "memory", &pki, Creds::ClientA)]).assert_success();
    assert_log_contains(&server, "CN=client-a");
    assert_log_contains(&server, "URI:spiffe://strata.test/client-a");
    let out = qemu_img_info_tls(&server, "memory", &pki, Creds::ClientA).assert_success();
    assert_eq!(size_in_qemu_json(&out), Some(MIB), "{}", out.report());

    for creds in [Creds::Untrusted, Creds::Anonymous] {
        let out = nbdinfo(&[&nbds_uri(&server, "memory", &pki, creds)]);
        assert!(
            !out.success(),
            "{creds:?} must be refused\n{}",
            out.report()
        );
    }
    assert_log_contains(&server, "TLS handshake failed");
}
