//! The launcher end to end: `strata vm` boots a real Linux kernel under QEMU (software
//! emulation) with its disk on a Strata overlay of a golden image built here, the guest
//! writes to the disk and powers off, the bytes are checked through Strata, then the
//! VM boots again, is suspended to a checkpoint and resumed from it, its memory and its
//! disk matching (`boot`). Also: a launcher that dies in the middle of a suspend
//! (`crash`), a throwaway VM and a disk server that vanishes under a running VM
//! (`remote`), and what the launcher says about bad input (`bad_input`).
//!
//! Needs qemu-system-x86_64, a Debian kernel in /boot with its modules (virtio_blk and
//! its dependencies, found through modules.dep) and a static busybox; scripts/test.sh
//! installs them (qemu-system-x86, linux-image-cloud-amd64, busybox-static). Nothing
//! leaves the machine: the guest has no network device. The guest is made in `guest`;
//! driving the launcher is done here.

mod at;
mod bad_input;
mod boot;
mod crash;
mod guest;
mod remote;

use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::{CmdOutput, harden, poll, run_timeout, spawn, strata};

use guest::Guest;

const MIB: u64 = 1 << 20;
/// The guest writes its marker here (sector 2048) and its tick counter at 2 MiB.
const MARKER_OFFSET: u64 = MIB;
const TICK_OFFSET: u64 = 2 * MIB;
const MARKER: &str = "STRATA-E2E-MARKER-1";
const GOLDEN: &[u8] = b"GOLDEN-IMAGE-0001";
/// A boot of the test guest to its first output takes a few seconds under TCG;
/// everything waits at most this long for the guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A `strata vm` process running in the background, its stderr in a file; killed with
/// its process group if still running when dropped.
struct Launcher {
    child: Child,
    log: PathBuf,
}

impl Launcher {
    fn spawn(mut cmd: Command, log: PathBuf) -> Launcher {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        harden(&mut cmd);
        Launcher {
            child: spawn(&mut cmd).expect("strata vm starts"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (30 s at most) for the launcher to exit, which it must do successfully.
    #[track_caller]
    fn assert_exits_ok(&mut self) {
        let status = self.wait(Duration::from_secs(30));
        assert!(status.success(), "{}", self.log());
    }

    /// Asserts that the log says `want`.
    #[track_caller]
    fn assert_logged(&self, want: &str) {
        let log = self.log();
        assert!(log.contains(want), "{want:?} is not in the log\n{log}");
    }

    /// Waits for the launcher to exit; panics with its log after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let exited = poll(timeout, || self.child.try_wait().unwrap());
        exited.unwrap_or_else(|| {
            panic!(
                "the launcher did not exit within {timeout:?}\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the launcher's own process group (it leads it).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("STRATA_TEST_SHOW_LOG").is_some() {
            eprintln!("--- launcher log ---\n{}", self.log());
        }
    }
}

/// `strata serve --listen unix:SOCKET ARGS...` in the background, its log in `log`;
/// returns once `ready` (the NBD socket, or another socket the server makes) accepts
/// connections.
fn serve_unix(socket: &Path, args: &[&OsStr], ready: &Path, log: PathBuf) -> Launcher {
    let mut cmd = strata();
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(args);
    let server = Launcher::spawn(cmd, log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(ready).is_err() {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Runs `cmd` (bounded), which must succeed.
#[track_caller]
fn succeeds(cmd: &mut Command) -> CmdOutput {
    let r = run_timeout(cmd, Duration::from_secs(30));
    assert!(r.success(), "{}", r.report());
    r
}

/// Waits until `file` holds a line containing `want`; returns the file's contents.
fn wait_for(file: &Path, want: &str, timeout: Duration, context: &dyn Fn() -> String) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{want:?} did not appear in {} within {timeout:?}\n--- it holds ---\n{text}\n{}",
            file.display(),
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The highest tick the guest printed in `console`.
fn last_tick(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("STRATA-E2E-TICK ")?
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// The disk image `image` (a Strata image, any chain) as raw bytes, through
/// `strata convert`.
fn raw_copy(image: &Path, out: &Path) -> PathBuf {
    let _ = std::fs::remove_file(out);
    let r = run_timeout(
        strata().args(["convert", "-O", "raw"]).arg(image).arg(out),
        Duration::from_secs(60),
    );
    assert!(r.success(), "{}", r.report());
    out.to_path_buf()
}

/// What the VM tests start from: a scratch directory holding the test guest and a
/// golden image ([`golden`]), and the root of the VM bundles, `vms/`, in it.
struct Rig {
    dir: TempDir,
    guest: Guest,
    golden: PathBuf,
}

impl Rig {
    /// `None` when the guest cannot be made here (the test then returns: see
    /// [`guest::build_guest`]).
    fn new() -> Option<Rig> {
        let dir = tempfile::tempdir().unwrap();
        let guest = guest::build_guest(dir.path())?;
        let golden = golden(dir.path());
        Some(Rig { dir, guest, golden })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates the VM `name` of the test guest on `disk` (see [`Vm::create`]).
    fn vm(&self, name: &'static str, disk: &str, extra: &[&str]) -> Vm {
        let vm = Vm {
            root: self.path().join("vms"),
            name,
        };
        vm.create(&self.guest, disk, extra);
        vm
    }

    /// The golden image as a `--disk` argument.
    fn golden_disk(&self) -> &str {
        self.golden.to_str().unwrap()
    }
}

fn golden(dir: &Path) -> PathBuf {
    let path = dir.join("golden.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(GOLDEN, 0).unwrap();
    path
}

struct Vm {
    root: PathBuf,
    name: &'static str,
}

impl Vm {
    fn cmd(&self) -> Command {
        let mut c = strata();
        c.arg("vm").arg("--bundles").arg(&self.root);
        c
    }

    fn bundle(&self) -> PathBuf {
        self.root.join(self.name)
    }

    fn console(&self) -> PathBuf {
        self.bundle().join("console.log")
    }

    fn create(&self, guest: &Guest, disk: &str, extra: &[&str]) {
        succeeds(
            self.cmd()
                .args(["create", self.name, "--disk", disk])
                .args([
                    "--cpus",
                    "1",
                    "--memory",
                    "256M",
                    "--headless",
                    "--accel",
                    "tcg",
                ])
                .arg("--kernel")
                .arg(&guest.kernel)
                .arg("--initrd")
                .arg(&guest.initrd)
                .args(["--cmdline", "console=ttyS0 quiet"])
                .args(extra),
        );
    }

    fn launch(&self, args: &[&str], log: &str) -> Launcher {
        let mut c = self.cmd();
        c.args(args);
        Launcher::spawn(c, self.root.join(log))
    }

    fn ctl(&self, args: &[&str]) -> CmdOutput {
        run_timeout(self.cmd().args(args), Duration::from_secs(120))
    }

    /// Stops the VM with `stop --force`; `run`, its launcher, must then exit successfully.
    #[track_caller]
    fn force_stop(&self, run: &mut Launcher) {
        let r = self.ctl(&["stop", self.name, "--force"]);
        assert!(r.success(), "{}", r.report());
        run.assert_exits_ok();
    }
}
