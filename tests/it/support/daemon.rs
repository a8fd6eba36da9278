//! A `strata serve` child for the configuration and deployment tests: its log (text or
//! JSON lines on stderr) collected as it comes, bounded waits for lines, signals, and
//! its exit status. The child is killed when this is dropped, and its log printed if
//! the test is failing.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::process::wait_deadline;
use super::{poll, spawn, strata};

/// How long any wait for the server lasts at most.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running `strata` process.
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `cmd` with stderr collected and stdin closed.
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        let mut child = spawn(&mut cmd).unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            })
        };
        Daemon {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// `strata serve ARGS...`.
    pub fn serve<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Daemon {
        let mut cmd = strata();
        cmd.arg("serve").args(args);
        Self::spawn(cmd)
    }

    /// `strata serve --config FILE ARGS...`.
    pub fn serve_config(file: &Path, args: &[&str]) -> Daemon {
        let mut cmd = strata();
        cmd.arg("serve").arg("--config").arg(file).args(args);
        Self::spawn(cmd)
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The log so far, as one text.
    pub fn log(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits until `n` lines contain `what`; returns the n-th. Panics, with the log, if
    /// the server exits first or the wait runs out.
    #[track_caller]
    pub fn wait_for_nth(&mut self, what: &str, n: usize) -> String {
        let logged = poll(WAIT, || {
            let found = self
                .lines()
                .into_iter()
                .filter(|l| l.contains(what))
                .nth(n - 1);
            if found.is_none() {
                if let Some(status) = self.child.try_wait().unwrap() {
                    // Let the reader collect what the server printed last.
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "the server exited ({status}) before logging {what:?}:\n{}",
                        self.log()
                    );
                }
            }
            found
        });
        logged.unwrap_or_else(|| panic!("the server never logged {what:?}:\n{}", self.log()))
    }

    /// Waits for the first line containing `what`.
    #[track_caller]
    pub fn wait_for(&mut self, what: &str) -> String {
        self.wait_for_nth(what, 1)
    }

    /// The first TCP address the server logs it listens on.
    #[track_caller]
    pub fn tcp_addr(&mut self) -> SocketAddr {
        self.wait_for("listening on");
        let logged = poll(WAIT, || {
            let lines = self.lines();
            lines.iter().find_map(|l| address_after(l, "listening on "))
        });
        logged.unwrap_or_else(|| panic!("no TCP listening address logged:\n{}", self.log()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Waits (bounded) for the process to exit; returns its status and log.
    #[track_caller]
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = wait_deadline(&mut self.child, WAIT)
            .unwrap_or_else(|| panic!("the server did not exit:\n{}", self.log()));
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        (status, self.log())
    }

    /// Sends `signal` and waits for the exit.
    #[track_caller]
    pub fn stop_with(self, signal: libc::c_int) -> (ExitStatus, String) {
        self.signal(signal);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}\n------------------", self.log());
        }
    }
}

/// The socket address that follows `marker` in a log line, text or JSON: that of a
/// `listening on ADDR` line with `listening on `.
pub fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '\x1b' || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
