//! Exports and the server's state: listed with counters that follow NBD I/O, the
//! server's version, addresses and connections, exports added at run time (served to the
//! wire client and qemu-io) and removed (waiting for their clients unless forced).

use std::ffi::OsStr;

use serde_json::{Value, json};

use crate::support::client::{Client, STRUCTURED};
use crate::support::control::Running;
use crate::support::daemon::WAIT;
use crate::support::spec::{
    C_FIXED_NO_ZEROES, CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EPERM, OPT_GO,
    REP_ERR_UNKNOWN,
};
use crate::support::wire::info_data;

use super::{raw_image, serve_raw, strata_image};

#[test]
fn exports_are_listed_with_counters_that_follow_nbd_io() {
    let (_dir, raw, server) = serve_raw(
        "disk",
        &["--export", "mem=memory:2M", "--description", "test disks"],
    );
    let list = server.get("/v1/exports");
    assert_eq!(list.status, 200, "{list:?}");
    let list = list.json();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "mem"]);
    let disk = &exports[0];
    assert_eq!(disk["kind"], "raw");
    assert_eq!(disk["size"], 1 << 20);
    assert_eq!(disk["read_only"], false);
    assert_eq!(disk["image"], raw.to_str().unwrap());
    assert_eq!(disk["description"], "test disks");
    assert_eq!(exports[1]["kind"], "memory");
    assert_eq!(exports[1]["image"], Value::Null);
    assert_eq!(exports[1]["size"], 2 << 20);
    for e in exports {
        for (counter, value) in e["stats"].as_object().unwrap() {
            assert_eq!(value, 0, "{} {counter} before any client", e["name"]);
        }
    }

    let mut c = server.connect("disk");
    let data = crate::support::pattern(7, 4096);
    assert_eq!(c.command(0, CMD_WRITE, 8192, 4096, &data).unwrap(), 0);
    assert_eq!(c.read(0, 8192, 4096).unwrap().unwrap(), data);
    assert_eq!(c.read(0, 0, 512).unwrap().unwrap(), vec![0; 512]);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0, &[]).unwrap(), 0);
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096, &[]).unwrap(), 0);
    // Refused at validation: counted as an error, not as a read.
    assert_eq!(c.read(0, 1 << 20, 512).unwrap(), Err(EINVAL));

    let disk = server.export("disk");
    let stats = &disk["stats"];
    assert_eq!(stats["connections"], 1, "{disk}");
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["reads"], 2);
    assert_eq!(stats["bytes_read"], 4096 + 512);
    assert_eq!(stats["writes"], 1);
    assert_eq!(stats["bytes_written"], 4096);
    assert_eq!(stats["flushes"], 1);
    assert_eq!(stats["trims"], 1);
    assert_eq!(stats["errors"], 1);
    let server_view = server.get("/v1/server").json();
    assert_eq!(server_view["connections"], 1, "{server_view}");

    let mut zero = Client::tcp(server.nbd).unwrap();
    zero.handshake("mem", STRUCTURED).unwrap();
    assert_eq!(zero.command(0, CMD_WRITE_ZEROES, 0, 65536, &[]).unwrap(), 0);
    let bs = zero.block_status(0, 0, 65536).unwrap();
    assert!(!bs.is_empty());
    drop(zero);

    c.disconnect().unwrap();
    drop(c);
    let disk = server.wait_connections("disk", 0);
    assert_eq!(disk["stats"]["total_connections"], 1);
    let mem = server.wait_connections("mem", 0);
    let stats = &mem["stats"];
    assert_eq!(stats["zeroes"], 1, "{mem}");
    assert_eq!(stats["block_status"], 1);
    assert_eq!(stats["reads"], 0, "counters are per export");
    assert_eq!(stats["writes"], 0);
}

#[test]
fn server_reports_version_addresses_and_connections() {
    let server = Running::serve_with_tcp(&[OsStr::new("memory:1M")]);
    let r = server.get("/v1/server");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].is_u64(), "{v}");
    assert_eq!(v["listen"], json!([server.nbd.to_string()]));
    assert_eq!(
        v["control"],
        json!([
            format!("unix:{}", server.socket.display()),
            format!("http://{}", server.tcp.unwrap())
        ])
    );
    assert_eq!(v["connections"], 0);
    assert_eq!(v["max_connections"], 1024);
    assert_eq!(v["exports"], 1);
    let _c = server.connect("memory");
    assert_eq!(server.get("/v1/server").json()["connections"], 1);
}

#[test]
fn exports_added_at_run_time_serve_clients() {
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let raw = raw_image(server.scratch(), "extra.img", 3 << 20);
    let image = strata_image(server.scratch(), "vm.strata", "8M");

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "scratch", "image": "memory:4M", "description": "for tests"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "scratch");
    assert_eq!(v["kind"], "memory");
    assert_eq!(v["size"], 4 << 20);
    assert_eq!(v["description"], "for tests");

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "ro", "image": raw, "read_only": true, "format": "raw"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(
        (v["kind"].as_str(), v["read_only"].as_bool()),
        (Some("raw"), Some(true))
    );
    assert_eq!(v["image"], raw.to_str().unwrap());

    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "vm", "image": image})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["kind"], "image");
    assert_eq!(v["image"], image.to_str().unwrap());
    assert_eq!(v["size"], 8 << 20);
    assert_eq!(server.get("/v1/exports/vm").status, 200);

    // The new exports serve NBD clients at once.
    let data = crate::support::pattern(3, 65536);
    for name in ["scratch", "vm"] {
        let mut c = server.connect(name);
        assert_eq!(c.command(0, CMD_WRITE, 65536, 65536, &data).unwrap(), 0);
        assert_eq!(c.read(0, 65536, 65536).unwrap().unwrap(), data, "{name}");
    }
    let mut c = Client::tcp(server.nbd).unwrap();
    let (size, flags) = c.handshake("ro", STRUCTURED).unwrap();
    assert_eq!(size, 3 << 20);
    assert_ne!(flags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.command(0, CMD_WRITE, 0, 512, &[1; 512]).unwrap(), EPERM);
    drop(c);
    let scratch = server.wait_connections("scratch", 0);
    assert_eq!(scratch["stats"]["writes"], 1);
    assert_eq!(scratch["stats"]["bytes_written"], 65536);

    // What cannot be added, and why.
    let add = |body: Value| server.call("POST", "/v1/exports", Some(body));
    let r = add(json!({"name": "scratch", "image": "memory:1M"}));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("exists already"), "{r:?}");
    let r = add(json!({"name": "bad/name", "image": "memory:1M"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid export name"), "{r:?}");
    let r = add(json!({"name": "gone", "image": server.scratch().join("missing.img")}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("does not exist"), "{r:?}");
    let r = add(json!({"name": "huge", "image": "memory:lots"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("invalid size"), "{r:?}");
    // The same image twice: the first export holds its lock.
    let r = add(json!({"name": "vm2", "image": image}));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("in use"), "{r:?}");
    assert_eq!(server.get("/v1/exports/vm2").status, 404);
    assert_eq!(server.get("/v1/server").json()["exports"], 4);
}

#[test]
fn exports_added_at_run_time_work_with_qemu_io() {
    if !crate::support::require_tool("qemu-io") {
        return;
    }
    let server = Running::serve(&[OsStr::new("memory:1M")]);
    let image = strata_image(server.scratch(), "q.strata", "16M");
    let r = server.call(
        "POST",
        "/v1/exports",
        Some(json!({"name": "q", "image": image, "format": "strata"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let uri = format!("nbd://{}/q", server.nbd);
    crate::support::qemu_io_ok(
        &uri,
        false,
        &["write -P 0x5c 1M 256k", "flush", "read -P 0x5c 1M 256k"],
    );
    crate::support::qemu_io_ok(&uri, true, &["read -P 0x5c 1M 256k", "read -P 0 0 1M"]);
    let q = server.wait_connections("q", 0);
    let stats = &q["stats"];
    assert_eq!(stats["total_connections"], 2, "{q}");
    assert_eq!(stats["bytes_written"], 256 << 10);
    assert!(stats["bytes_read"].as_u64().unwrap() >= (256 << 10) * 2 + (1 << 20));
    assert!(stats["flushes"].as_u64().unwrap() >= 1);
    assert_eq!(stats["errors"], 0);
}

#[test]
fn removing_an_export_waits_for_its_clients_unless_forced() {
    let (_dir, raw, server) = serve_raw("busy", &["--export", "idle=memory:1M"]);

    let r = server.call("DELETE", "/v1/exports/idle", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"removed": "idle", "disconnected": 0}));
    assert_eq!(server.get("/v1/exports/idle").status, 404);
    let mut c = Client::tcp(server.nbd).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_GO, &info_data("idle", &[])).unwrap();
    assert_eq!(replies.last().unwrap().ty, REP_ERR_UNKNOWN);

    let mut c = server.connect("busy");
    assert_eq!(c.command(0, CMD_WRITE, 0, 512, &[9; 512]).unwrap(), 0);
    let r = server.call("DELETE", "/v1/exports/busy", None);
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("1 client(s) connected"), "{r:?}");
    let r = server.call("DELETE", "/v1/exports/busy?force=false", None);
    assert_eq!(r.status, 409, "{r:?}");
    // Still served, and the client is still connected.
    assert_eq!(server.export("busy")["stats"]["connections"], 1);
    assert_eq!(c.read(0, 0, 512).unwrap().unwrap(), vec![9; 512]);

    let r = server.call("DELETE", "/v1/exports/busy?force=true", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"removed": "busy", "disconnected": 1}));
    assert!(c.stream.hangs_up(WAIT), "the connection is still open");
    assert_eq!(server.get("/v1/exports/busy").status, 404);
    let r = server.call("DELETE", "/v1/exports/busy?force=true", None);
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.error().contains("busy"), "{r:?}");
    // The client's write reached the file before its session was ended.
    assert_eq!(&std::fs::read(&raw).unwrap()[..512], &[9; 512]);
    assert_eq!(server.get("/v1/exports").json()["exports"], json!([]));
}
