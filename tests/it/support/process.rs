//! Child processes: run with a time limit and their output captured, in a process group
//! of their own, killed with the test if it dies.

use std::fmt::Write as _;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{CMD_TIMEOUT, spawn};

/// Makes a spawned process safe to leave behind: its own process group (so a timeout can
/// kill everything it started) and SIGKILL if the spawning thread dies.
pub fn harden(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(char::is_whitespace) || a.is_empty() {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// What a finished command did.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Everything about the run, for a failure message.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {} (after {:.1?})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.command,
            self.status,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Standard output as JSON; panics with the full report if it is not.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("output is not JSON: {e}\n{}", self.report()))
    }

    /// Panics with the full report unless the command exited 0.
    #[track_caller]
    pub fn assert_success(self) -> Self {
        assert!(self.success(), "command failed\n{}", self.report());
        self
    }

    /// Panics with the full report unless the command exited with `code`.
    #[track_caller]
    pub fn assert_code(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status\n{}",
            self.report()
        );
        self
    }

    /// Panics with the full report unless the command failed (a status other than 0).
    #[track_caller]
    pub fn assert_failure(self) -> Self {
        assert!(
            !self.success(),
            "the command should have failed\n{}",
            self.report()
        );
        self
    }

    /// Panics with the full report unless standard error holds every one of `needles`.
    #[track_caller]
    pub fn assert_stderr(self, needles: &[&str]) -> Self {
        self.assert_holds(false, needles)
    }

    /// Panics with the full report unless standard output holds every one of `needles`.
    #[track_caller]
    pub fn assert_stdout(self, needles: &[&str]) -> Self {
        self.assert_holds(true, needles)
    }

    #[track_caller]
    fn assert_holds(self, stdout: bool, needles: &[&str]) -> Self {
        let (what, text) = if stdout {
            ("output", &self.stdout)
        } else {
            ("error output", &self.stderr)
        };
        for n in needles {
            assert!(
                text.contains(n),
                "expected {n:?} in the {what}\n{}",
                self.report()
            );
        }
        self
    }
}

/// Runs `cmd` with stdin empty, capturing stdout and stderr, killing it (and its process
/// group) if it is still running after `timeout`, which panics.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let command = describe(cmd);
    harden(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = spawn(cmd).unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let out_reader = spawn_reader(child.stdout.take().expect("stdout piped"));
    let err_reader = spawn_reader(child.stderr.take().expect("stderr piped"));
    let status = wait_deadline(&mut child, timeout);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| {
        kill_group(&child, libc::SIGKILL);
        child.wait().expect("wait after kill")
    });
    let elapsed = start.elapsed();
    let output = CmdOutput {
        command,
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
        elapsed,
    };
    if timed_out {
        panic!(
            "command timed out after {timeout:?} and was killed\n{}",
            output.report()
        );
    }
    output
}

/// [`run_timeout`] with [`CMD_TIMEOUT`].
pub fn run(cmd: &mut Command) -> CmdOutput {
    run_timeout(cmd, CMD_TIMEOUT)
}

/// Runs `cmd` with [`CMD_TIMEOUT`] and panics unless it exits 0.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> CmdOutput {
    run(cmd).assert_success()
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Calls `check` every 20 ms until it gives a value or `within` has passed (then None).
pub fn poll<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` until `timeout`; None if it is still running.
pub(super) fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    poll(timeout, || child.try_wait().expect("try_wait"))
}

pub(super) fn kill_group(child: &Child, signal: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the process group we created for this child (process_group(0)
    // makes its pgid equal its pid); no memory is involved.
    unsafe {
        libc::kill(-pid, signal);
    }
}

pub(super) fn kill_one(child: &Child, signal: libc::c_int) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (we hold
    // the Child and have not seen it exit), so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, signal);
    }
}
