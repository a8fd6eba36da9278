//! Start-up errors: bad TLS files named when the server starts.

use std::ffi::OsString;
use std::fs;
use std::path::Path;

use crate::support::strata_only;

use super::{Pki, assert_serve_fails};

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
