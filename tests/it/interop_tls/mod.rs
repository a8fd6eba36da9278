//! TLS and access control with real clients: `nbdinfo` and `nbdcopy` (`nbds://` URIs),
//! `qemu-img` (`tls-creds-x509`), and the raw wire client for the bytes a plaintext
//! client sees from a server that requires TLS. By theme: TLS policies and mutual TLS
//! (`policies`), `--allow` and `--allow-identity` (`access`), files in memory truncated
//! under a TLS reader (`memory`), and bad TLS files at start-up (`startup`).
//!
//! Every test makes its own certificates with rcgen (here): a CA, a server certificate
//! for localhost, 127.0.0.1 and ::1, two client certificates signed by the CA
//! (`client-a` and `client-b`), and one signed by another CA. Each client's files are
//! laid out in a directory as libnbd (`tls-certificates=DIR`) and qemu (`dir=DIR`) read
//! them.

mod access;
mod memory;
mod policies;
mod startup;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::support::client::Client;
use crate::support::spec::C_FIXED;
use crate::support::wire::OptReply;
use crate::support::{CmdOutput, Endpoint, Server, qemu_img, run, strata};

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
