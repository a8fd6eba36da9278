//! Load with verification through fio's libnbd engine (`--ioengine=nbd`): random 4 KiB
//! writes at queue depth 16 checked with crc32c, re-verified over a new connection, and
//! several connections in parallel.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const FIO_TIMEOUT: Duration = Duration::from_secs(180);

/// A memory disk of `size` bytes served over `t`, when fio is installed.
fn fio_server(t: Transport, size: u64) -> Option<Server> {
    require_tool("fio").then(|| memory(size).listen(t).start())
}

fn fio(server: &Server, args: &[&str]) -> Command {
    let uri = server.uri();
    let mut c = Command::new("fio");
    // fio may leave state files in its working directory: keep them out of the tree.
    c.current_dir(server.scratch());
    c.args([
        "--verify_state_save=0",
        "--name=strata",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--bs=4k",
        "--iodepth=16",
        "--verify=crc32c",
        "--output-format=json",
    ]);
    c.args(args);
    c
}

/// Bytes fio reports for `dir` ("read" or "write"), summed over all jobs.
fn io_bytes(out: &CmdOutput, dir: &str) -> u64 {
    // The nbd engine says `fio: connected to NBD server` before the report.
    let at = out.stdout.find("\n{").map_or(0, |at| at + 1);
    let report: Value = serde_json::from_str(&out.stdout[at..])
        .unwrap_or_else(|e| panic!("no JSON report from fio ({e})\n{}", out.report()));
    let jobs = report["jobs"].as_array().filter(|jobs| !jobs.is_empty());
    jobs.unwrap_or_else(|| panic!("no jobs in fio output\n{}", out.report()))
        .iter()
        .map(|job| {
            job[dir]["io_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("no {dir}.io_bytes in fio output\n{}", out.report()))
        })
        .sum()
}

fn fio_randwrite_verify(t: Transport) {
    let Some(server) = fio_server(t, 128 * MIB) else {
        return;
    };

    let out = run_timeout(
        &mut fio(&server, &["--rw=randwrite", "--size=64m", "--do_verify=1"]),
        FIO_TIMEOUT,
    )
    .assert_success();
    assert_eq!(io_bytes(&out, "write"), 64 * MIB, "{}", out.report());
    assert_eq!(
        io_bytes(&out, "read"),
        64 * MIB,
        "verify pass did not read everything\n{}",
        out.report()
    );

    // The same blocks verify again over a fresh connection.
    let out = run_timeout(
        &mut fio(
            &server,
            &["--rw=randwrite", "--size=64m", "--verify_only=1"],
        ),
        FIO_TIMEOUT,
    )
    .assert_success();
    assert_eq!(io_bytes(&out, "read"), 64 * MIB, "{}", out.report());

    // Control: verification of a range nobody wrote must fail.
    let bad = run_timeout(
        &mut fio(
            &server,
            &[
                "--rw=randwrite",
                "--offset=64m",
                "--size=8m",
                "--verify_only=1",
                "--verify_fatal=1",
            ],
        ),
        FIO_TIMEOUT,
    );
    assert!(
        !bad.success(),
        "fio verified data that was never written\n{}",
        bad.report()
    );
}

fn fio_parallel_connections(t: Transport) {
    let Some(server) = fio_server(t, 64 * MIB) else {
        return;
    };
    let out = run_timeout(
        &mut fio(
            &server,
            &[
                "--rw=randrw",
                "--rwmixread=30",
                "--numjobs=4",
                "--size=16m",
                "--offset_increment=16m",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
        ),
        FIO_TIMEOUT,
    )
    .assert_success();
    assert!(io_bytes(&out, "write") > 0, "{}", out.report());
}

over_transports!(fio_randwrite_verify, fio_parallel_connections);
