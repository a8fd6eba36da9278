//! Golden JSON for every body: the exact text the API sends and accepts, field order and
//! left-out fields included, and that each decodes back to what was encoded.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;

/// `value` encodes to exactly `json`, and `json` decodes to `value`.
#[track_caller]
fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T, json: &str) {
    assert_eq!(serde_json::to_string(value).unwrap(), json);
    assert_eq!(&serde_json::from_str::<T>(json).unwrap(), value);
}

fn stats() -> StatsSnapshot {
    StatsSnapshot {
        connections: 1,
        total_connections: 3,
        reads: 18233,
        writes: 5120,
        flushes: 41,
        trims: 2,
        zeroes: 0,
        block_status: 12,
        caches: 0,
        bytes_read: 1_195_376_640,
        bytes_written: 335_544_320,
        errors: 0,
    }
}

const STATS: &str = r#"{"connections":1,"total_connections":3,"reads":18233,"writes":5120,"flushes":41,"trims":2,"zeroes":0,"block_status":12,"caches":0,"bytes_read":1195376640,"bytes_written":335544320,"errors":0}"#;

fn point() -> PointRef {
    PointRef {
        seq: 42,
        time: "2026-01-01T00:00:00.000000Z".into(),
    }
}

fn snapshot(exported_as: Option<&str>) -> Snapshot {
    Snapshot {
        name: "mon".into(),
        created: 1_767_225_600,
        path: "/var/lib/strata/vm1.strata@mon".into(),
        allocated: 524_288_000,
        exported_as: exported_as.map(Into::into),
    }
}

#[test]
fn server_view() {
    golden(
        &ServerView {
            version: "0.1.0".into(),
            uptime_s: 86400,
            listen: vec!["127.0.0.1:10809".into()],
            control: vec!["unix:/run/c.sock".into(), "http://127.0.0.1:10810".into()],
            connections: 2,
            max_connections: 1024,
            exports: 3,
        },
        r#"{"version":"0.1.0","uptime_s":86400,"listen":["127.0.0.1:10809"],"control":["unix:/run/c.sock","http://127.0.0.1:10810"],"connections":2,"max_connections":1024,"exports":3}"#,
    );
}

#[test]
fn exports_send_a_null_image_and_leave_out_snapshot_of() {
    let image = ExportView {
        name: "vm1".into(),
        description: "web server".into(),
        size: 21_474_836_480,
        read_only: false,
        kind: "image".into(),
        image: Some("/var/lib/strata/vm1.strata".into()),
        snapshot_of: None,
        point_of: None,
        history: None,
        stats: stats(),
    };
    let image_json = format!(
        r#"{{"name":"vm1","description":"web server","size":21474836480,"read_only":false,"kind":"image","image":"/var/lib/strata/vm1.strata","stats":{STATS}}}"#
    );
    golden(&image, &image_json);
    let snap = ExportView {
        name: "vm1@mon".into(),
        description: "snapshot mon of vm1".into(),
        size: 4096,
        read_only: true,
        kind: "snapshot".into(),
        image: None,
        snapshot_of: Some(SnapshotOf {
            export: "vm1".into(),
            snapshot: "mon".into(),
        }),
        point_of: None,
        history: None,
        stats: StatsSnapshot::default(),
    };
    let snap_json = r#"{"name":"vm1@mon","description":"snapshot mon of vm1","size":4096,"read_only":true,"kind":"snapshot","image":null,"snapshot_of":{"export":"vm1","snapshot":"mon"},"stats":{"connections":0,"total_connections":0,"reads":0,"writes":0,"flushes":0,"trims":0,"zeroes":0,"block_status":0,"caches":0,"bytes_read":0,"bytes_written":0,"errors":0}}"#;
    golden(&snap, snap_json);
    let history = ExportView {
        name: "vm2".into(),
        description: String::new(),
        size: 4096,
        read_only: false,
        kind: "history".into(),
        image: Some("/var/lib/strata/vm2".into()),
        snapshot_of: None,
        point_of: None,
        history: Some(HistorySummary {
            window_s: 86400,
            oldest_point: Some(point()),
            newest_point: None,
        }),
        stats: StatsSnapshot::default(),
    };
    let zero_stats = r#"{"connections":0,"total_connections":0,"reads":0,"writes":0,"flushes":0,"trims":0,"zeroes":0,"block_status":0,"caches":0,"bytes_read":0,"bytes_written":0,"errors":0}"#;
    golden(
        &history,
        &format!(
            r#"{{"name":"vm2","description":"","size":4096,"read_only":false,"kind":"history","image":"/var/lib/strata/vm2","history":{{"window_s":86400,"oldest_point":{{"seq":42,"time":"2026-01-01T00:00:00.000000Z"}},"newest_point":null}},"stats":{zero_stats}}}"#
        ),
    );
    let point_view = ExportView {
        name: "vm2@42".into(),
        read_only: true,
        kind: "point".into(),
        image: None,
        point_of: Some(PointOf {
            export: "vm2".into(),
            point: point(),
        }),
        history: None,
        ..history
    };
    golden(
        &point_view,
        &format!(
            r#"{{"name":"vm2@42","description":"","size":4096,"read_only":true,"kind":"point","image":null,"point_of":{{"export":"vm2","seq":42,"time":"2026-01-01T00:00:00.000000Z"}},"stats":{zero_stats}}}"#
        ),
    );
    golden(
        &ExportList {
            exports: vec![image, snap],
        },
        &format!(r#"{{"exports":[{image_json},{snap_json}]}}"#),
    );
}

#[test]
fn answers_about_exports() {
    golden(
        &Removed {
            removed: "vm3".into(),
            disconnected: 1,
        },
        r#"{"removed":"vm3","disconnected":1}"#,
    );
    golden(
        &ErrorBody {
            error: "no export named \"x\"".into(),
        },
        r#"{"error":"no export named \"x\""}"#,
    );
}

#[test]
fn snapshots_send_a_null_export() {
    golden(
        &SnapshotList {
            snapshots: vec![snapshot(Some("vm1@mon")), snapshot(None)],
        },
        r#"{"snapshots":[{"name":"mon","created":1767225600,"path":"/var/lib/strata/vm1.strata@mon","allocated":524288000,"exported_as":"vm1@mon"},{"name":"mon","created":1767225600,"path":"/var/lib/strata/vm1.strata@mon","allocated":524288000,"exported_as":null}]}"#,
    );
    golden(
        &Taken {
            snapshot: snapshot(None),
            pause_us: 850,
        },
        r#"{"snapshot":{"name":"mon","created":1767225600,"path":"/var/lib/strata/vm1.strata@mon","allocated":524288000,"exported_as":null},"pause_us":850}"#,
    );
    golden(&Deleted { copied: 65536 }, r#"{"copied":65536}"#);
    golden(
        &RolledBack {
            export: "vm1".into(),
            snapshot: Some("mon".into()),
            point: None,
        },
        r#"{"export":"vm1","snapshot":"mon"}"#,
    );
    golden(
        &RolledBack {
            export: "vm1".into(),
            snapshot: None,
            point: Some(point()),
        },
        r#"{"export":"vm1","point":{"seq":42,"time":"2026-01-01T00:00:00.000000Z"}}"#,
    );
}

#[test]
fn dirty_leaves_out_an_unknown_cluster_size() {
    let ranges = vec![
        DirtyRange {
            offset: 0,
            length: 131_072,
        },
        DirtyRange {
            offset: 1_048_576,
            length: 65536,
        },
    ];
    golden(
        &Dirty {
            since: "nightly".into(),
            point: None,
            cluster_size: Some(65536),
            ranges: ranges.clone(),
            bytes: 196_608,
        },
        r#"{"since":"nightly","cluster_size":65536,"ranges":[{"offset":0,"length":131072},{"offset":1048576,"length":65536}],"bytes":196608}"#,
    );
    golden(
        &Dirty {
            since: "nightly".into(),
            point: None,
            cluster_size: None,
            ranges: Vec::new(),
            bytes: 0,
        },
        r#"{"since":"nightly","ranges":[],"bytes":0}"#,
    );
    golden(
        &Dirty {
            since: "-10m".into(),
            point: Some(point()),
            cluster_size: Some(4096),
            ranges: Vec::new(),
            bytes: 0,
        },
        r#"{"since":"-10m","point":{"seq":42,"time":"2026-01-01T00:00:00.000000Z"},"cluster_size":4096,"ranges":[],"bytes":0}"#,
    );
}

#[test]
fn request_bodies_take_defaults_and_refuse_unknown_fields() {
    golden(
        &AddExport {
            name: "vm3".into(),
            image: "/var/lib/strata/vm3.strata".into(),
            read_only: true,
            format: FormatChoice::Raw,
            description: "build runner".into(),
        },
        r#"{"name":"vm3","image":"/var/lib/strata/vm3.strata","read_only":true,"format":"raw","description":"build runner"}"#,
    );
    golden(
        &AddExport {
            name: "m".into(),
            image: "memory:1M".into(),
            read_only: false,
            format: FormatChoice::Auto,
            description: String::new(),
        },
        r#"{"name":"m","image":"memory:1M","read_only":false,"format":"auto"}"#,
    );
    let minimal: AddExport = serde_json::from_str(r#"{"name":"m","image":"memory:1M"}"#).unwrap();
    assert!(!minimal.read_only && minimal.format == FormatChoice::Auto);
    assert!(minimal.description.is_empty());
    golden(
        &TakeSnapshot {
            name: "mon".into(),
            at: None,
        },
        r#"{"name":"mon"}"#,
    );
    golden(
        &Rollback {
            snapshot: Some("mon".into()),
            at: None,
            force: false,
            destroy_newer: true,
        },
        r#"{"snapshot":"mon","force":false,"destroy_newer":true}"#,
    );
    golden(
        &Rollback {
            at: Some("-10m".into()),
            force: true,
            ..Rollback::default()
        },
        r#"{"at":"-10m","force":true,"destroy_newer":false}"#,
    );
    golden(
        &ServeAt {
            at: "42".into(),
            as_name: Some("vm1@before".into()),
        },
        r#"{"at":"42","as":"vm1@before"}"#,
    );
    golden(
        &ServeAt {
            at: "42".into(),
            as_name: None,
        },
        r#"{"at":"42"}"#,
    );
    golden(
        &CloneAt {
            at: "2026-01-01T00:00:00Z".into(),
            name: "vm2".into(),
            image: "/var/lib/strata/vm2".into(),
        },
        r#"{"at":"2026-01-01T00:00:00Z","name":"vm2","image":"/var/lib/strata/vm2"}"#,
    );
    golden(&ServeSnapshot::default(), "{}");
    golden(
        &ServeSnapshot {
            name: Some("golden".into()),
        },
        r#"{"name":"golden"}"#,
    );
    for refused in [
        r#"{"name":"x","image":"memory:1M","colour":"blue"}"#,
        r#"{"image":"memory:1M"}"#,
        r#"{"name":"x","image":"memory:1M","format":"qcow2"}"#,
    ] {
        assert!(
            serde_json::from_str::<AddExport>(refused).is_err(),
            "{refused}"
        );
    }
    assert!(serde_json::from_str::<ServeSnapshot>(r#"{"as":"x"}"#).is_err());
    assert!(serde_json::from_str::<Rollback>(r#"{"snapshot":"s","forced":true}"#).is_err());
    assert!(serde_json::from_str::<ServeAt>(r#"{"at":"1","name":"x"}"#).is_err());
    assert!(serde_json::from_str::<CloneAt>(r#"{"at":"1","name":"x"}"#).is_err());
}

#[test]
fn answers_accept_fields_a_newer_server_adds() {
    let v: Deleted = serde_json::from_str(r#"{"copied":1,"took_ms":5}"#).unwrap();
    assert_eq!(v, Deleted { copied: 1 });
}
