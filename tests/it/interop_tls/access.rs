//! Access control: `--allow` by network, address family and Unix socket, and
//! `--allow-identity` by a client certificate's CN, DNS and URI names.

use crate::support::spec::{OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, REP_ACK, REP_ERR_UNKNOWN};
use crate::support::wire::{info_data, opt};
use crate::support::{
    MIB, Transport, ipv6_loopback_available, memory, nbdinfo, require_tool, require_tools,
    strata_only,
};

use super::{Creds, Pki, greeted, nbds_uri, qemu_img_info_tls, read_to_close};

/// `--allow` admits the networks it names; a client outside them finds no export: not
/// in the listing, unknown to INFO and GO, and EXPORT_NAME ends its session.
#[test]
fn access_by_network() {
    if !strata_only("access options") || !require_tool("nbdinfo") {
        return;
    }
    let server = memory(MIB).args(["--allow", "127.0.0.1/32"]).start();
    nbdinfo(&[&server.uri()]).assert_success();

    let server = memory(MIB)
        .args(["--allow", "10.0.0.0/8", "--allow", "fd00::/8"])
        .start();
    let out = nbdinfo(&["--list", &server.default_uri()]);
    assert!(!out.stdout.contains("memory"), "{}", out.report());
    let out = nbdinfo(&[&server.uri()]);
    assert!(!out.success(), "{}", out.report());

    let mut c = greeted(&server);
    let r = c.opt(OPT_LIST, &[]).unwrap();
    assert_eq!((r.len(), r[0].ty), (1, REP_ACK), "an empty listing");
    for name in ["memory", ""] {
        let r = c.opt(OPT_GO, &info_data(name, &[])).unwrap();
        assert_eq!((r.len(), r[0].ty), (1, REP_ERR_UNKNOWN), "GO {name:?}");
        let r = c.opt(OPT_INFO, &info_data(name, &[])).unwrap();
        assert_eq!((r.len(), r[0].ty), (1, REP_ERR_UNKNOWN), "INFO {name:?}");
    }
    // Refused exactly as a name that does not exist.
    let unknown = c.opt(OPT_GO, &info_data("no-such-disk", &[])).unwrap();
    assert_eq!(unknown[0].ty, REP_ERR_UNKNOWN);
    let mut c = greeted(&server);
    c.send(&opt(OPT_EXPORT_NAME, b"memory")).unwrap();
    assert!(read_to_close(&mut c).is_empty());
}

/// Rules per address family, and Unix-socket clients, which only `--allow unix` admits
/// once any rule is given.
#[test]
fn access_by_family_and_unix_socket() {
    if !strata_only("access options") || !require_tool("nbdinfo") {
        return;
    }
    let mut builder = memory(MIB)
        .listen(Transport::Tcp)
        .listen(Transport::Unix)
        .args(["--allow", "127.0.0.0/8"]);
    let v6 = ipv6_loopback_available();
    if v6 {
        builder = builder.listen(Transport::Tcp6);
    }
    let server = builder.start();
    let [tcp, unix] = &server.endpoints()[..2] else {
        unreachable!()
    };
    nbdinfo(&[&tcp.uri("memory")]).assert_success();
    let out = nbdinfo(&[&unix.uri("memory")]);
    assert!(
        !out.success(),
        "Unix clients need --allow unix\n{}",
        out.report()
    );
    if v6 {
        let out = nbdinfo(&[&server.endpoints()[2].uri("memory")]);
        assert!(
            !out.success(),
            "::1 is not in 127.0.0.0/8\n{}",
            out.report()
        );
    }

    let server = memory(MIB)
        .listen(Transport::Unix)
        .listen(Transport::Tcp)
        .args(["--allow", "unix"])
        .start();
    nbdinfo(&[&server.endpoints()[0].uri("memory")]).assert_success();
    let out = nbdinfo(&[&server.endpoints()[1].uri("memory")]);
    assert!(!out.success(), "{}", out.report());
}

/// `--allow-identity` admits clients whose verified certificate carries the name (as CN,
/// DNS or URI name); other trusted clients, and plaintext ones under `--tls optional`,
/// see no export.
#[test]
fn access_by_certificate_identity() {
    if !strata_only("access options") || !require_tools(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let pki = Pki::new();
    for name in [
        "client-a",
        "CLIENT-A.example",
        "spiffe://strata.test/client-a",
    ] {
        let server = memory(MIB)
            .args(pki.mutual_args())
            .args(["--allow-identity", name])
            .start();
        let out =
            nbdinfo(&["--list", &nbds_uri(&server, "", &pki, Creds::ClientA)]).assert_success();
        assert!(
            out.stdout.contains("export=\"memory\""),
            "{name}: {}",
            out.report()
        );
        nbdinfo(&[&nbds_uri(&server, "memory", &pki, Creds::ClientA)]).assert_success();
        qemu_img_info_tls(&server, "memory", &pki, Creds::ClientA).assert_success();

        let out = nbdinfo(&["--list", &nbds_uri(&server, "", &pki, Creds::ClientB)]);
        assert!(!out.stdout.contains("memory"), "{name}: {}", out.report());
        let out = nbdinfo(&[&nbds_uri(&server, "memory", &pki, Creds::ClientB)]);
        assert!(
            !out.success(),
            "{name}: client-b must not open it\n{}",
            out.report()
        );
        let out = qemu_img_info_tls(&server, "memory", &pki, Creds::ClientB);
        assert!(!out.success(), "{name}: {}", out.report());

        let out = nbdinfo(&[&server.uri()]);
        assert!(
            !out.success(),
            "{name}: plaintext has no identity\n{}",
            out.report()
        );
    }
}
