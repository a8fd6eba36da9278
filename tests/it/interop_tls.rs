//! TLS and access control with real clients: `nbdinfo` and `nbdcopy` (`nbds://` URIs),
//! `qemu-img` (`tls-creds-x509`), and the raw wire client for the bytes a plaintext
//! client sees from a server that requires TLS.
//!
//! Every test makes its own certificates with rcgen: a CA, a server certificate for
//! localhost, 127.0.0.1 and ::1, two client certificates signed by the CA (`client-a`
//! and `client-b`), and one signed by another CA. Each client's files are laid out in a
//! directory as libnbd (`tls-certificates=DIR`) and qemu (`dir=DIR`) read them.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::client::Client;
use crate::support::spec::*;
use crate::support::wire::{OptReply, info_data, meta_data, opt};
use crate::support::*;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// Which files a client presents.
#[derive(Debug, Clone, Copy)]
enum Creds {
    /// The CA and client-a's certificate (CN client-a, DNS client-a.example, URI
    /// spiffe://strata.test/client-a).
    ClientA,
    /// The CA and client-b's certificate (CN client-b).
    ClientB,
    /// The CA and a certificate for "client-a" signed by a CA the server does not know.
    Untrusted,
    /// Only the CA: the client verifies the server but has no certificate.
    Anonymous,
}

/// A CA, a server certificate and client credentials in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Strata tests");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca(cn: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(
    cn: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &(Certificate, KeyPair),
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.subject_alt_names = sans;
    // qemu insists on key encipherment too, whatever the key type.
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    (p.signed_by(&key, &issuer.0, &issuer.1).unwrap(), key)
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("strata-pki-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let ca = ca("Strata test CA");
        let rogue = ca_rogue();
        let server = leaf(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                SanType::IpAddress("::1".parse().unwrap()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        write(&root.join("server/cert.pem"), &server.0.pem());
        write(&root.join("server/key.pem"), &server.1.serialize_pem());
        write(&root.join("server/client-ca.pem"), &ca.0.pem());

        let client_a = leaf(
            "client-a",
            vec![
                SanType::DnsName("client-a.example".try_into().unwrap()),
                SanType::URI("spiffe://strata.test/client-a".try_into().unwrap()),
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        );
        let client_b = leaf("client-b", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca);
        let untrusted = leaf(
            "client-a",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue,
        );
        for (creds, pair) in [
            (Creds::ClientA, Some(&client_a)),
            (Creds::ClientB, Some(&client_b)),
            (Creds::Untrusted, Some(&untrusted)),
            (Creds::Anonymous, None),
        ] {
            let d = root.join(client_dir_name(creds));
            write(&d.join("ca-cert.pem"), &ca.0.pem());
            if let Some((cert, key)) = pair {
                write(&d.join("client-cert.pem"), &cert.pem());
                write(&d.join("client-key.pem"), &key.serialize_pem());
            }
        }
        Pki { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `--tls-cert` and `--tls-key`.
    fn server_args(&self) -> Vec<OsString> {
        vec![
            "--tls-cert".into(),
            self.path("server/cert.pem").into(),
            "--tls-key".into(),
            self.path("server/key.pem").into(),
        ]
    }

    /// [`Pki::server_args`] plus `--tls-client-ca`: mutual TLS.
    fn mutual_args(&self) -> Vec<OsString> {
        let mut args = self.server_args();
        args.push("--tls-client-ca".into());
        args.push(self.path("server/client-ca.pem").into());
        args
    }

    fn client_dir(&self, creds: Creds) -> PathBuf {
        self.path(client_dir_name(creds))
    }
}

fn ca_rogue() -> (Certificate, KeyPair) {
    ca("Some other CA")
}

fn client_dir_name(creds: Creds) -> &'static str {
    match creds {
        Creds::ClientA => "clients/client-a",
        Creds::ClientB => "clients/client-b",
        Creds::Untrusted => "clients/untrusted",
        Creds::Anonymous => "clients/anonymous",
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

fn tcp_addr(server: &Server) -> SocketAddr {
    match server.endpoint() {
        Endpoint::Tcp(a) => *a,
        Endpoint::Unix(p) => panic!("expected a TCP endpoint, got {}", p.display()),
    }
}

/// The libnbd URI of `name` over TLS with the files of `creds`.
fn nbds_uri(server: &Server, name: &str, pki: &Pki, creds: Creds) -> String {
    let dir = pki.client_dir(creds);
    match server.endpoint() {
        Endpoint::Tcp(a) => format!("nbds://{a}/{name}?tls-certificates={}", dir.display()),
        Endpoint::Unix(p) => format!(
            "nbds+unix:///{name}?socket={}&tls-certificates={}",
            p.display(),
            dir.display()
        ),
    }
}

/// qemu's `--object` and `--image-opts` for `name` over TLS with the files of `creds`.
fn qemu_tls(server: &Server, name: &str, pki: &Pki, creds: Creds) -> (String, String) {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.client_dir(creds).display()
    );
    let opts = format!("{},tls-creds=tls0", server.endpoint().qemu_image_opts(name));
    (object, opts)
}

/// `qemu-img info` of `name` over TLS.
fn qemu_img_info_tls(server: &Server, name: &str, pki: &Pki, creds: Creds) -> CmdOutput {
    let (object, opts) = qemu_tls(server, name, pki, creds);
    run(qemu_img()
        .args(["info", "--output=json", "--object"])
        .arg(object)
        .arg("--image-opts")
        .arg(opts))
}

fn size_in_qemu_json(out: &CmdOutput) -> Option<u64> {
    out.json()["virtual-size"].as_u64()
}

/// A raw connection that has read the greeting and sent fixed newstyle.
fn greeted(server: &Server) -> Client {
    let mut c = Client::tcp(tcp_addr(server)).unwrap();
    c.greet(C_FIXED).unwrap();
    c
}

/// Reads until the server closes the connection; returns what it sent first.
fn read_to_close(c: &mut Client) -> Vec<u8> {
    let mut rest = Vec::new();
    match c.stream.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => rest,
        Err(e) => panic!("expected the server to close the connection: {e}"),
    }
}

/// The bytes of an option reply, built from the specification's layout.
fn reply_bytes(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let data = data.to_vec();
    OptReply { option, ty, data }.to_wire()
}

#[track_caller]
fn assert_log_contains(server: &Server, what: &str) {
    let log = server.log();
    assert!(log.contains(what), "server log lacks {what:?}\n{log}");
}

/// `strata serve` with `args` must fail at start-up with a message containing `what`.
#[track_caller]
fn assert_serve_fails(args: &[OsString], what: &str) {
    let out = run(strata()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .arg("memory:1M"));
    assert!(!out.success(), "serve should have failed\n{}", out.report());
    assert!(
        out.stderr.contains(what),
        "the error should mention {what:?}\n{}",
        out.report()
    );
}

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

// ---------------------------------------------------------------------------------------
// Access control
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Files in memory under TLS
// ---------------------------------------------------------------------------------------

/// Reads the whole export over TLS, in a loop, until the file `TRUNCATED` exists and one
/// more pass is done. Every read either fails or returns the bytes read before the
/// truncation, or, when `ZEROES` is set, zeroes (a Strata image reads clusters past the
/// end of its file as zeroes); prints `reads=N errors=M`.
const TLS_READ_LOOP: &str = r#"
h.set_tls(nbd.TLS_REQUIRE)
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
size = h.get_size()
step = 256 * 1024
before = [h.pread(step, off) for off in range(0, size, step)]
open(os.environ["READY"], "w").close()
reads = errors = 0
last_pass = False
while True:
    if os.path.exists(os.environ["TRUNCATED"]):
        last_pass = True
    for i, off in enumerate(range(0, size, step)):
        try:
            data = h.pread(step, off)
        except nbd.Error:
            errors += 1
            continue
        reads += 1
        zeroes = os.environ.get("ZEROES") and data == bytes(len(data))
        assert data == before[i] or zeroes, f"a read at {off} returned new bytes"
    if last_pass:
        break
print(f"reads={reads} errors={errors}")
"#;

/// A file in memory (where reads may point into a mapping of it) truncated by another
/// process while a TLS client reads it: TLS encrypts replies in user space, which must
/// never touch such a mapping (a fault there kills the server with SIGBUS). The server
/// survives and keeps serving; the client sees errors or the old bytes.
#[test]
fn a_file_in_memory_truncated_under_a_tls_reader() {
    if !strata_only("TLS options") || !require_tools(&["nbdsh", "nbdinfo"]) {
        return;
    }
    let Some(shm) = memory_dir() else {
        return;
    };
    let pki = Pki::new();
    for format in ["raw", "strata"] {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let raw = dir.path().join("disk.raw");
        write_mixed_image(&raw, 7, 4 * MIB as usize);
        let path = if format == "raw" {
            raw
        } else {
            let image = dir.path().join("disk.strata");
            strata_at_ok(dir.path(), &["convert", "disk.raw", "disk.strata"]);
            image
        };
        let mut server = file(&path)
            .args(["--format", format])
            .args(pki.server_args())
            .start();
        let ready = dir.path().join("ready");
        let truncated = dir.path().join("truncated");
        let uri = nbds_uri(&server, server.export_name(), &pki, Creds::Anonymous);
        let reader = std::thread::spawn({
            let (ready, truncated) = (ready.clone(), truncated.clone());
            move || {
                nbdsh_script(
                    &uri,
                    &[
                        ("READY", ready.display().to_string()),
                        ("TRUNCATED", truncated.display().to_string()),
                        ("ZEROES", if format == "strata" { "1" } else { "" }.into()),
                    ],
                    TLS_READ_LOOP,
                )
            }
        });
        let deadline = std::time::Instant::now() + CMD_TIMEOUT;
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline && !reader.is_finished(),
                "{format}: the TLS reader never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        fs::write(&truncated, "").unwrap();
        let out = reader.join().unwrap();
        assert!(out.stdout.contains("reads="), "{format}: {}", out.report());

        // Still serving: a new client is answered, and the server stops cleanly.
        let info = nbdinfo(&["--size", &server.uri()]).assert_success();
        assert!(
            info.stdout.trim().parse::<u64>().is_ok(),
            "{}",
            info.report()
        );
        server.stop_cleanly_with(libc::SIGTERM);
        assert!(
            !server.log().contains("panicked"),
            "{format}: {}",
            server.log()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Start-up errors
// ---------------------------------------------------------------------------------------

#[test]
fn bad_tls_files_fail_at_start_up_naming_the_file() {
    if !strata_only("TLS options") {
        return;
    }
    let pki = Pki::new();
    let missing = pki.path("server/missing.pem");
    let garbage = pki.path("server/garbage.pem");
    fs::write(&garbage, "not a PEM file\n").unwrap();
    let other_key = pki.path("clients/client-b/client-key.pem");
    let cert = pki.path("server/cert.pem");
    let key = pki.path("server/key.pem");
    let os = |p: &Path| OsString::from(p);

    let cases: Vec<(Vec<OsString>, String)> = vec![
        (
            vec![
                "--tls-cert".into(),
                os(&missing),
                "--tls-key".into(),
                os(&key),
            ],
            missing.display().to_string(),
        ),
        (
            vec![
                "--tls-cert".into(),
                os(&garbage),
                "--tls-key".into(),
                os(&key),
            ],
            garbage.display().to_string(),
        ),
        (
            vec![
                "--tls-cert".into(),
                os(&cert),
                "--tls-key".into(),
                os(&garbage),
            ],
            garbage.display().to_string(),
        ),
        (
            vec![
                "--tls-cert".into(),
                os(&cert),
                "--tls-key".into(),
                os(&other_key),
            ],
            other_key.display().to_string(),
        ),
        (
            [
                pki.server_args(),
                vec!["--tls-client-ca".into(), os(&missing)],
            ]
            .concat(),
            missing.display().to_string(),
        ),
        (
            [
                pki.server_args(),
                vec!["--tls-client-ca".into(), os(&garbage)],
            ]
            .concat(),
            garbage.display().to_string(),
        ),
        (vec!["--tls".into(), "require".into()], "--tls-cert".into()),
        (
            [pki.server_args(), vec!["--tls".into(), "off".into()]].concat(),
            "--tls off".into(),
        ),
        (vec!["--tls-cert".into(), os(&cert)], "--tls-key".into()),
        (
            [
                pki.server_args(),
                vec!["--allow-identity".into(), "x".into()],
            ]
            .concat(),
            "--tls-client-ca".into(),
        ),
        (
            vec!["--allow".into(), "10.1.2.3/8".into()],
            "10.0.0.0/8".into(),
        ),
        (vec!["--allow".into(), "nonsense".into()], "nonsense".into()),
    ];
    for (args, what) in cases {
        assert_serve_fails(&args, &what);
    }
}
