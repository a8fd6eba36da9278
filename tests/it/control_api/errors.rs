//! Requests the API refuses with a JSON error: malformed or oversized bodies, wrong
//! content types, unknown fields, routes and methods, and unknown exports.

use std::ffi::OsStr;

use serde_json::json;

use crate::support::control::{Response, Running};

#[test]
fn malformed_requests_get_json_errors() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let json_header = [("Content-Type", "application/json")];
    let post = |body: &[u8]| server.raw("POST", "/v1/exports", &json_header, Some(body));
    let check = |r: Response, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{r:?}");
        let msg = r.error();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    };

    check(post(b"{\"name\": \"x\","), 400, "JSON");
    check(post(b"[1, 2]"), 422, "");
    check(
        post(br#"{"name": "x", "image": "memory:1M", "colour": "blue"}"#),
        422,
        "unknown field `colour`",
    );
    check(
        post(br#"{"image": "memory:1M"}"#),
        422,
        "missing field `name`",
    );
    check(
        post(br#"{"name": "x", "image": "memory:1M", "format": "qcow2"}"#),
        422,
        "qcow2",
    );
    check(
        post(br#"{"name": "x", "image": "memory:1M", "read_only": "yes"}"#),
        422,
        "read_only",
    );
    check(
        server.raw(
            "POST",
            "/v1/exports",
            &[("Content-Type", "text/plain")],
            Some(br#"{"name": "x", "image": "memory:1M"}"#),
        ),
        415,
        "Content-Type",
    );
    check(
        server.raw(
            "POST",
            "/v1/exports",
            &[],
            Some(br#"{"name": "x", "image": "memory:1M"}"#),
        ),
        415,
        "Content-Type",
    );
    let huge = format!(
        r#"{{"name": "x", "image": "memory:1M", "description": "{}"}}"#,
        "d".repeat(70 * 1024)
    );
    check(post(huge.as_bytes()), 413, "limit");
    check(server.call("PUT", "/v1/server", None), 405, "PUT");
    check(server.call("DELETE", "/v1/exports", None), 405, "DELETE");
    check(server.call("POST", "/v1/exports/memory", None), 405, "POST");
    check(server.get("/v1/nothing"), 404, "/v1/nothing");
    check(server.get("/"), 404, "no such endpoint");
    check(server.get("/v2/server"), 404, "no such endpoint");
    check(
        server.call("DELETE", "/v1/exports/memory?force=maybe", None),
        400,
        "force",
    );
    check(
        server.call("DELETE", "/v1/exports/memory?forse=true", None),
        400,
        "forse",
    );
    check(server.get("/v1/exports/memory/dirty"), 400, "since");
    // Nothing was added or removed, and the server still answers.
    let list = server.get("/v1/exports").json();
    assert_eq!(list["exports"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(server.get("/v1/server").status, 200);
}

#[test]
fn unknown_exports_are_404() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let requests = [
        ("GET", "/v1/exports/nope", None),
        ("DELETE", "/v1/exports/nope", None),
        ("DELETE", "/v1/exports/nope?force=true", None),
        ("GET", "/v1/exports/nope/snapshots", None),
        (
            "POST",
            "/v1/exports/nope/snapshots",
            Some(json!({"name": "s1"})),
        ),
        ("DELETE", "/v1/exports/nope/snapshots/s1", None),
        (
            "POST",
            "/v1/exports/nope/rollback",
            Some(json!({"snapshot": "s1"})),
        ),
        (
            "POST",
            "/v1/exports/nope/snapshots/s1/export",
            Some(json!({})),
        ),
        ("GET", "/v1/exports/nope/dirty?since=s1", None),
    ];
    for (method, path, body) in requests {
        let r = server.call(method, path, body);
        assert_eq!(r.status, 404, "{method} {path}: {r:?}");
        assert!(r.error().contains("no export named \"nope\""), "{r:?}");
    }
    // A name that exists only as the default export's alias is not an export name.
    let r = server.get("/v1/exports/%20");
    assert_eq!(r.status, 404, "{r:?}");
}
