//! Restore points seen by real clients: a point served with `serve-at` compared by
//! `qemu-img compare` and copied out by `nbdcopy`, both against a raw file holding what
//! was written up to the point; an earlier point named with `ctl snapshot --at`, whose
//! `qemu:dirty-bitmap:` context `nbdinfo --map` reads as the ranges written since.

use std::process::Command;

use serde_json::json;

use crate::support::client::Client;
use crate::support::{nbdinfo, qemu_img_compare, require_tools, run_ok, strata_only};

use super::history::{history_volume_server, newest_seq};

#[test]
fn points_served_to_qemu_img_nbdcopy_and_nbdinfo() {
    if !strata_only("volumes with history") || !require_tools(&["qemu-img", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let (dir, server) = history_volume_server();
    let mut c: Client = server.connect("vm");
    let uri = |export: &str| format!("nbd://{}/{export}", server.nbd);
    // Point A: 1 MiB of 0x11 at 0. Then 64 KiB of 0x22 at 2 MiB and 4 KiB of 0x33 at
    // 512 KiB: point B.
    let want_a = dir.path().join("a.raw");
    let mut disk = vec![0u8; 4 << 20];
    disk[..1 << 20].fill(0x11);
    c.write(0, 0, &disk[..1 << 20]).unwrap().unwrap();
    c.flush().unwrap().unwrap();
    std::fs::write(&want_a, &disk).unwrap();
    let a = newest_seq(&server);
    c.write(0, 2 << 20, &[0x22; 65536]).unwrap().unwrap();
    c.write(0, 512 << 10, &[0x33; 4096]).unwrap().unwrap();
    c.flush().unwrap().unwrap();

    // A served, compared by qemu-img and copied by nbdcopy.
    let r = server.call(
        "POST",
        "/v1/exports/vm/serve-at",
        Some(json!({"at": a.to_string(), "as": "vm-a"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    run_ok(&mut qemu_img_compare(uri("vm-a"), &want_a));
    let copy = dir.path().join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(uri("vm-a")).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == disk,
        "nbdcopy of point {a}"
    );

    // A named: its dirty bitmap on the live disk is what was written since.
    let out = server.ctl(&["snapshot", "vm", "before", "--at", &a.to_string()]);
    assert!(out.success(), "{}", out.report());
    let map = nbdinfo(&["--map=qemu:dirty-bitmap:before", &uri("vm")]);
    assert!(map.success(), "{}", map.report());
    let dirty: Vec<(u64, u64)> = map
        .stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    assert_eq!(
        dirty,
        vec![(512 << 10, 4096), (2 << 20, 65536)],
        "{}",
        map.stdout
    );
    let listed = server.get("/v1/exports/vm/history").json();
    let named = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["seq"] == a)
        .unwrap()
        .clone();
    assert_eq!(
        (named["kind"].as_str(), named["name"].as_str()),
        (Some("snapshot"), Some("before")),
        "{listed}"
    );
}
