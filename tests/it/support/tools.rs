//! The external tools the tests drive, and the `strata` binary itself, as commands.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Command;

use super::env::python_with_libnbd_dir;
use super::{CMD_TIMEOUT, CmdOutput, run, run_ok, run_timeout};

/// The `strata` binary cargo built for these tests.
pub fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

/// A `nbdsh` command that works even when the first `python3` on PATH lacks the `nbd`
/// module (nbdsh runs `python3 -m nbd`).
pub fn nbdsh() -> Command {
    let mut cmd = Command::new("nbdsh");
    if let Some(dir) = python_with_libnbd_dir() {
        let mut path = OsString::from(dir.as_os_str());
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs a Python snippet in nbdsh (`h` is a fresh, unconnected handle; `import nbd`
/// and `os` are available) with `URI` and the given variables in the environment.
/// Panics with the script's output unless it succeeds.
#[track_caller]
pub fn nbdsh_script(uri: &str, vars: &[(&str, String)], script: &str) -> CmdOutput {
    let mut cmd = nbdsh();
    cmd.env("URI", uri);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let prelude = "import os, sys, errno\nimport nbd\n";
    cmd.arg("-c").arg(format!("{prelude}{script}"));
    run_timeout(&mut cmd, CMD_TIMEOUT).assert_success()
}

/// Runs `nbdinfo` with `args` and returns its output (not asserting success).
pub fn nbdinfo(args: &[&str]) -> CmdOutput {
    run(Command::new("nbdinfo").args(args))
}

/// `strata ARGS...` with `dir` as its working directory (so paths are relative, as users
/// type them), logging only errors.
pub fn strata_at(dir: &Path, args: &[&str]) -> Command {
    let mut c = strata();
    c.current_dir(dir).args(args).env("RUST_LOG", "error");
    c
}

/// Runs [`strata_at`], failing the test unless it succeeds.
#[track_caller]
pub fn strata_at_ok(dir: &Path, args: &[&str]) -> CmdOutput {
    run_ok(&mut strata_at(dir, args))
}

/// `qemu-img`.
pub fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// `qemu-img convert` of the raw image `from` into a new raw file `to`.
pub fn qemu_img_convert(from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> Command {
    let mut c = qemu_img();
    c.args(["convert", "-f", "raw", "-O", "raw"])
        .arg(from)
        .arg(to);
    c
}

/// `qemu-img convert -n` of the raw image `from` into the raw image `to`, which exists
/// (an export, a file of the right size).
pub fn qemu_img_convert_into(from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> Command {
    let mut c = qemu_img();
    c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(from)
        .arg(to);
    c
}

/// `qemu-img compare` of two raw images: exit status 0 when they read the same.
pub fn qemu_img_compare(a: impl AsRef<OsStr>, b: impl AsRef<OsStr>) -> Command {
    let mut c = qemu_img();
    c.args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b);
    c
}

/// `qemu-io -f raw [-r] -c CMD... URI`.
pub fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    c
}

/// Runs qemu-io on `uri` and panics unless every command succeeded: exit 0 and no
/// failure message (qemu-io reports pattern mismatches on stdout).
#[track_caller]
pub fn qemu_io_ok(uri: &str, read_only: bool, cmds: &[&str]) -> CmdOutput {
    let out = run(&mut qemu_io(uri, read_only, cmds)).assert_success();
    let all = format!("{}{}", out.stdout, out.stderr).to_ascii_lowercase();
    assert!(
        !all.contains("fail") && !all.contains("error"),
        "qemu-io reported a failure\n{}",
        out.report()
    );
    out
}
