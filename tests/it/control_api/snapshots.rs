//! What the API promises around snapshots: the endpoints need an export with a Strata
//! image, and bad snapshot names are refused.

use std::ffi::OsStr;

use serde_json::json;

use crate::support::control::Running;

use super::{export_arg, serve_raw, strata_image};

#[test]
fn snapshot_endpoints_need_a_strata_image() {
    let (_dir, _raw, server) = serve_raw("plain", &["--export", "ram=memory:1M"]);
    for export in ["plain", "ram"] {
        let base = format!("/v1/exports/{export}");
        let requests = [
            ("GET", format!("{base}/snapshots"), None),
            (
                "POST",
                format!("{base}/snapshots"),
                Some(json!({"name": "s1"})),
            ),
            ("DELETE", format!("{base}/snapshots/s1"), None),
            (
                "POST",
                format!("{base}/rollback"),
                Some(json!({"snapshot": "s1"})),
            ),
            (
                "POST",
                format!("{base}/snapshots/s1/export"),
                Some(json!({})),
            ),
            ("GET", format!("{base}/dirty?since=s1"), None),
        ];
        for (method, path, body) in requests {
            let r = server.call(method, &path, body);
            assert_eq!(r.status, 400, "{method} {path}: {r:?}");
            let msg = r.error();
            assert!(
                msg.contains("snapshots need a Strata image") && msg.contains(export),
                "{method} {path}: {msg}"
            );
        }
    }
    assert_eq!(
        server.get("/v1/exports").json()["exports"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn bad_snapshot_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = strata_image(dir.path(), "vm.strata", "4M");
    let server = Running::serve(&[OsStr::new("--export"), export_arg("vm", &image).as_os_str()]);
    assert_eq!(server.export("vm")["kind"], "image");
    let long = "s".repeat(65);
    for bad in ["", ".hidden", "-dash", "a/b", "a b", "é", long.as_str()] {
        for (path, body) in [
            ("/v1/exports/vm/snapshots", json!({"name": bad})),
            ("/v1/exports/vm/rollback", json!({"snapshot": bad})),
        ] {
            let r = server.call("POST", path, Some(body));
            assert_eq!(r.status, 400, "{path} {bad:?}: {r:?}");
            assert!(
                r.error().contains("invalid snapshot name"),
                "{path} {bad:?}: {r:?}"
            );
        }
    }
    for bad in [".hidden", "-dash", "a%20b", "%C3%A9", long.as_str()] {
        for (method, path, body) in [
            ("DELETE", format!("/v1/exports/vm/snapshots/{bad}"), None),
            (
                "POST",
                format!("/v1/exports/vm/snapshots/{bad}/export"),
                Some(json!({})),
            ),
            ("GET", format!("/v1/exports/vm/dirty?since={bad}"), None),
        ] {
            let r = server.call(method, &path, body);
            assert_eq!(r.status, 400, "{method} {path}: {r:?}");
            assert!(r.error().contains("invalid snapshot name"), "{path}: {r:?}");
        }
    }
    let r = server.call("GET", "/v1/exports/vm/dirty?since=", None);
    assert_eq!(r.status, 400, "{r:?}");
    // The name of the export a snapshot would be served as is checked too.
    let r = server.call(
        "POST",
        "/v1/exports/vm/snapshots/s1/export",
        Some(json!({"name": "no/slashes"})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    let r = server.call(
        "POST",
        &format!("/v1/exports/vm/snapshots/{}/export", "s".repeat(62)),
        Some(json!({})),
    );
    assert_eq!(r.status, 400, "the default name vm@SNAP is too long: {r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    assert_eq!(
        server.get("/v1/exports").json()["exports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
