//! The QEMU driver: a Linux guest under `qemu-system-<arch>`, its disk attached with
//! QEMU's own NBD client (`-blockdev driver=nbd`), driven over QMP.
//!
//! Suspend saves the machine state with QEMU's migration to a file (`migrate` to
//! `exec:cat > FILE`, which QEMU 7.2 and later all take) after `stop` has paused the
//! guest and drained its disk I/O; resume starts QEMU with `-incoming` from that file.
//! The state file holds the guest's RAM and device state; the disk is not in it (the
//! disk snapshot is its counterpart).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::spec::{Accel, Network, SyncMode, VmSpec};
use super::url::{Endpoint, NbdUrl};
use super::{Boot, Driver, VmEvent};
use crate::error::{Error, ErrorKind, Result};

/// How long QEMU may take to open its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a migration to a file may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long QEMU may take to exit after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Files a QEMU VM uses, all in its bundle.
#[derive(Debug, Clone)]
pub struct QemuPaths {
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The serial console's output.
    pub console: PathBuf,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas are doubled).
fn esc(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Quotes `s` for `/bin/sh` (QEMU runs `exec:` migration URIs through it).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The emulator for this host's architecture.
pub fn default_binary() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    }
}

/// The error for a QEMU `binary` that is not there, with where to get it.
pub fn not_installed(binary: &Path) -> Error {
    Error::msg(
        ErrorKind::NotSupported,
        format!(
            "{} is not installed: Linux VMs run under QEMU (Debian: apt-get install \
             qemu-system-x86; or set linux.qemu in config.json)",
            binary.display()
        ),
    )
}

/// Whether KVM can be used here.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The `-blockdev` value for the disk.
pub fn blockdev(url: &NbdUrl, spec: &VmSpec) -> String {
    let mut opts = vec!["driver=nbd".to_owned(), "node-name=disk0".to_owned()];
    match &url.endpoint {
        Endpoint::Tcp { host, port } => {
            opts.push("server.type=inet".into());
            opts.push(format!("server.host={}", esc(host)));
            opts.push(format!("server.port={port}"));
        }
        Endpoint::Unix(path) => {
            opts.push("server.type=unix".into());
            opts.push(format!("server.path={}", esc(&path_str(path))));
        }
    }
    opts.push(format!("export={}", esc(&url.export)));
    if url.tls {
        opts.push("tls-creds=tls0".into());
        if let Some(h) = &url.tls_hostname {
            opts.push(format!("tls-hostname={}", esc(h)));
        }
    }
    // Requests wait this long for a lost server to come back before they fail.
    let delay = spec.nbd.timeout_s.ceil().max(1.0) as u64;
    opts.push(format!("reconnect-delay={delay}"));
    if spec.nbd.read_only {
        opts.push("read-only=on".into());
    }
    if spec.nbd.sync == SyncMode::None {
        opts.push("cache.no-flush=on".into());
    }
    opts.join(",")
}

/// QEMU's command line (without the binary) for `spec` with its disk at `url`.
pub fn command_line(
    name: &str,
    spec: &VmSpec,
    url: &NbdUrl,
    paths: &QemuPaths,
    headless: bool,
    kvm: bool,
    boot: Boot<'_>,
) -> Vec<String> {
    let linux = spec.linux.clone().unwrap_or_default();
    let kvm = match linux.accel {
        Accel::Auto => kvm,
        Accel::Kvm => true,
        Accel::Tcg => false,
    };
    let arm = std::env::consts::ARCH == "aarch64";
    let accel = if kvm { "kvm" } else { "tcg" };
    let mut args: Vec<String> = Vec::new();
    let mut push = |a: &str, b: String| {
        args.push(a.to_owned());
        args.push(b);
    };
    push("-name", esc(name));
    args_push(&mut push, spec, url, paths, headless, arm, accel, kvm);
    if let Some(k) = &linux.kernel {
        push("-kernel", path_str(k));
    }
    if let Some(i) = &linux.initrd {
        push("-initrd", path_str(i));
    }
    if let Some(c) = &linux.cmdline {
        push("-append", c.clone());
    }
    if let Boot::Restore(state) = boot {
        push(
            "-incoming",
            format!("exec:cat {}", sh_quote(&path_str(state))),
        );
    }
    let mut all = vec!["-nodefaults".to_owned(), "-no-user-config".to_owned()];
    all.extend(args);
    all
}

#[allow(clippy::too_many_arguments)]
fn args_push(
    push: &mut impl FnMut(&str, String),
    spec: &VmSpec,
    url: &NbdUrl,
    paths: &QemuPaths,
    headless: bool,
    arm: bool,
    accel: &str,
    kvm: bool,
) {
    push(
        "-machine",
        format!("{},accel={accel}", if arm { "virt" } else { "q35" }),
    );
    push("-cpu", if kvm { "host" } else { "max" }.to_owned());
    push("-smp", spec.cpus.to_string());
    push("-m", format!("{}M", spec.memory >> 20));
    push(
        "-chardev",
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            esc(&path_str(&paths.qmp))
        ),
    );
    push("-mon", "chardev=qmp,mode=control".to_owned());
    push(
        "-chardev",
        format!(
            "file,id=console,path={},append=on",
            esc(&path_str(&paths.console))
        ),
    );
    push("-serial", "chardev:console".to_owned());
    if headless {
        push("-display", "none".to_owned());
    } else {
        push(
            "-device",
            if arm { "virtio-gpu-pci" } else { "VGA" }.to_owned(),
        );
    }
    if url.tls {
        let mut creds = "tls-creds-x509,id=tls0,endpoint=client".to_owned();
        if let Some(dir) = &url.tls_certificates {
            creds.push_str(&format!(",dir={}", esc(&path_str(dir))));
        }
        push("-object", creds);
    }
    push("-blockdev", blockdev(url, spec));
    push("-device", "virtio-blk-pci,drive=disk0,id=vda".to_owned());
    match spec.network {
        Network::None => push("-nic", "none".to_owned()),
        Network::Nat => push("-nic", "user,model=virtio-net-pci".to_owned()),
    }
}

/// A running QEMU.
#[derive(Debug)]
pub struct QemuDriver {
    child: Child,
    qmp: super::qmp::Qmp,
    stderr: mpsc::UnboundedReceiver<String>,
    /// QEMU's last words, for the message when it fails.
    last_stderr: VecDeque<String>,
    pending: VecDeque<VmEvent>,
    shutdown_reason: Option<String>,
    exited: bool,
}

impl QemuDriver {
    /// Starts QEMU (`binary`) with `args`. For a [`Boot::Restore`], waits until the
    /// state is loaded; the VM is then paused.
    pub async fn start(
        binary: &Path,
        args: &[String],
        paths: &QemuPaths,
        restoring: bool,
    ) -> Result<QemuDriver> {
        let _ = std::fs::remove_file(&paths.qmp);
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // QEMU goes when the launcher goes, even if the launcher is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                not_installed(binary)
            } else {
                Error::msg(
                    ErrorKind::NotSupported,
                    format!("cannot start {}: {e}", binary.display()),
                )
            }
        })?;
        let (tx, stderr) = mpsc::unbounded_channel();
        if let Some(err) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let connected = tokio::select! {
            q = super::qmp::Qmp::connect(&paths.qmp, deadline) => q,
            status = child.wait() => {
                let mut stderr = stderr;
                let mut words = Vec::new();
                while let Ok(l) = tokio::time::timeout(Duration::from_millis(200), stderr.recv()).await {
                    match l { Some(l) => words.push(l), None => break }
                }
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("QEMU exited at once ({status}): {}", words.join(" / ")),
                ));
            }
        };
        let qmp = connected?;
        let mut driver = QemuDriver {
            child,
            qmp,
            stderr,
            last_stderr: VecDeque::new(),
            pending: VecDeque::from([VmEvent::DiskConnected]),
            shutdown_reason: None,
            exited: false,
        };
        if restoring {
            driver.wait_incoming().await?;
        }
        Ok(driver)
    }

    /// Waits until an incoming migration has been loaded.
    async fn wait_incoming(&mut self) -> Result<()> {
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let status = self.qmp.execute("query-status", None).await.map_err(|e| {
                Error::msg(
                    ErrorKind::Io,
                    format!("QEMU failed while loading the saved state: {e}"),
                )
            })?;
            match status.get("status").and_then(Value::as_str) {
                Some("inmigrate") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some("inmigrate") => {
                    return Err(Error::msg(
                        ErrorKind::Io,
                        "loading the saved state timed out",
                    ));
                }
                _ => return Ok(()),
            }
        }
    }

    fn note_stderr(&mut self, line: String) -> VmEvent {
        if self.last_stderr.len() == 8 {
            self.last_stderr.pop_front();
        }
        self.last_stderr.push_back(line.clone());
        let lower = line.to_ascii_lowercase();
        if lower.contains("nbd") && (lower.contains("reconnect") || lower.contains("connect")) {
            VmEvent::DiskError {
                message: format!("qemu: {line}"),
                fatal: false,
            }
        } else {
            VmEvent::Note(format!("qemu: {line}"))
        }
    }

    fn event_for(&mut self, name: &str, data: &Value) -> Option<VmEvent> {
        let field = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        match name {
            "SHUTDOWN" => {
                let reason = match field("reason").as_str() {
                    "guest-shutdown" => "the guest powered off".to_owned(),
                    "guest-reset" => "the guest reset".to_owned(),
                    "host-qmp-quit" => "stopped".to_owned(),
                    "host-signal" => "QEMU was signalled".to_owned(),
                    "guest-panic" => "the guest panicked".to_owned(),
                    other => format!("shutdown ({other})"),
                };
                self.shutdown_reason = Some(reason);
                None
            }
            "BLOCK_IO_ERROR" => Some(VmEvent::DiskError {
                message: format!(
                    "{} error on the disk: {}",
                    field("operation"),
                    Some(field("reason"))
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "I/O error".to_owned())
                ),
                fatal: false,
            }),
            "GUEST_PANICKED" => Some(VmEvent::Note("the guest kernel panicked".into())),
            _ => None,
        }
    }

    async fn exit_event(&mut self, status: std::io::Result<std::process::ExitStatus>) -> VmEvent {
        self.exited = true;
        // Collect what QEMU said last.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(100), self.stderr.recv()).await
        {
            self.note_stderr(line);
        }
        match status {
            Ok(s) if s.success() => VmEvent::Stopped {
                reason: self
                    .shutdown_reason
                    .clone()
                    .unwrap_or_else(|| "QEMU exited".to_owned()),
            },
            Ok(s) => VmEvent::Failed(format!(
                "QEMU exited with {s}: {}",
                Vec::from(self.last_stderr.clone()).join(" / ")
            )),
            Err(e) => VmEvent::Failed(format!("cannot wait for QEMU: {e}")),
        }
    }

    async fn migrate_to(&mut self, path: &Path) -> Result<()> {
        // QEMU 7.2 throttles migrations to 32 MiB/s by default; a file takes any speed.
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 1u64 << 40 })),
            )
            .await?;
        let uri = format!("exec:cat > {}", sh_quote(&path_str(path)));
        self.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await?;
        let deadline = Instant::now() + SAVE_TIMEOUT;
        loop {
            let info = self.qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(Error::msg(
                        ErrorKind::Io,
                        format!("QEMU could not save the machine state: {why}"),
                    ));
                }
                _ if Instant::now() > deadline => {
                    let _ = self.qmp.execute("migrate_cancel", None).await;
                    return Err(Error::msg(
                        ErrorKind::Io,
                        "saving the machine state timed out",
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn pause(&mut self) -> Result<()> {
        // `stop` drains and flushes every block device before it returns.
        self.qmp.execute("stop", None).await.map(drop)
    }

    async fn resume(&mut self) -> Result<()> {
        self.qmp.execute("cont", None).await.map(drop)
    }

    async fn save_state(&mut self, path: &Path) -> Result<()> {
        self.migrate_to(path).await
    }

    async fn request_stop(&mut self) -> Result<()> {
        self.qmp.execute("system_powerdown", None).await.map(drop)
    }

    async fn stop(&mut self) -> Result<()> {
        if self.exited {
            return Ok(());
        }
        self.shutdown_reason
            .get_or_insert_with(|| "stopped".to_owned());
        let _ = self.qmp.execute("quit", None).await;
        match tokio::time::timeout(QUIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let event = self.exit_event(status).await;
                self.pending.push_back(event);
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                let status = self.child.wait().await;
                let event = self.exit_event(status).await;
                self.pending.push_back(event);
                Ok(())
            }
        }
    }

    async fn next_event(&mut self) -> Option<VmEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.exited {
                return None;
            }
            tokio::select! {
                event = self.qmp.next_event() => {
                    if let Some((name, data)) = event {
                        if let Some(e) = self.event_for(&name, &data) {
                            return Some(e);
                        }
                    } else {
                        // The monitor closed: QEMU is exiting.
                        let status = self.child.wait().await;
                        return Some(self.exit_event(status).await);
                    }
                }
                line = self.stderr.recv() => {
                    if let Some(line) = line {
                        return Some(self.note_stderr(line));
                    }
                    let status = self.child.wait().await;
                    return Some(self.exit_event(status).await);
                }
                status = self.child.wait() => {
                    return Some(self.exit_event(status).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let mut s = crate::vm::spec::tests::linux();
        s.cpus = 1;
        s.memory = 256 << 20;
        s
    }

    fn paths() -> QemuPaths {
        QemuPaths {
            qmp: "/b/qmp.sock".into(),
            console: "/b/console.log".into(),
        }
    }

    #[test]
    fn disks_attach_through_qemus_nbd_client() {
        let s = spec();
        let url = NbdUrl::parse("nbd+unix:///disk?socket=/b/a,b.sock").unwrap();
        assert_eq!(
            blockdev(&url, &s),
            "driver=nbd,node-name=disk0,server.type=unix,server.path=/b/a,,b.sock,\
             export=disk,reconnect-delay=5"
        );
        let mut s = spec();
        s.nbd.read_only = true;
        s.nbd.sync = SyncMode::None;
        s.nbd.timeout_s = 2.5;
        let url = NbdUrl::parse("nbds://[::1]:7/vm1?tls-hostname=nas").unwrap();
        assert_eq!(
            blockdev(&url, &s),
            "driver=nbd,node-name=disk0,server.type=inet,server.host=::1,server.port=7,\
             export=vm1,tls-creds=tls0,tls-hostname=nas,reconnect-delay=3,read-only=on,\
             cache.no-flush=on"
        );
    }

    #[test]
    fn command_lines() {
        let mut s = spec();
        let linux = s.linux.as_mut().unwrap();
        linux.kernel = Some("/boot/vmlinuz".into());
        linux.initrd = Some("/b/initrd".into());
        linux.cmdline = Some("console=ttyS0".into());
        linux.accel = Accel::Tcg;
        let url = NbdUrl::parse("nbd://nas/vm1").unwrap();
        let args = command_line("vm1", &s, &url, &paths(), true, true, Boot::Fresh);
        let line = args.join(" ");
        for want in [
            "-nodefaults",
            "-machine ",
            "accel=tcg",
            "-cpu max",
            "-smp 1 -m 256M",
            "-chardev socket,id=qmp,path=/b/qmp.sock,server=on,wait=off",
            "-serial chardev:console",
            "-display none",
            "-device virtio-blk-pci,drive=disk0",
            "-nic none",
            "-kernel /boot/vmlinuz -initrd /b/initrd -append console=ttyS0",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        assert!(!line.contains("-incoming"));
        let args = command_line(
            "vm1",
            &s,
            &url,
            &paths(),
            true,
            false,
            Boot::Restore(Path::new("/b/it's.state")),
        );
        let i = args.iter().position(|a| a == "-incoming").unwrap();
        assert_eq!(args[i + 1], r"exec:cat '/b/it'\''s.state'");
    }

    #[test]
    fn kvm_when_asked_or_available() {
        let url = NbdUrl::parse("nbd://nas/vm1").unwrap();
        let s = spec();
        let kvm = command_line("v", &s, &url, &paths(), false, true, Boot::Fresh).join(" ");
        assert!(
            kvm.contains("accel=kvm") && kvm.contains("-cpu host"),
            "{kvm}"
        );
        assert!(!kvm.contains("-display none"));
        let mut s = spec();
        s.network = Network::Nat;
        let tcg = command_line("v", &s, &url, &paths(), true, false, Boot::Fresh).join(" ");
        assert!(tcg.contains("accel=tcg") && tcg.contains("-nic user,model=virtio-net-pci"));
    }
}
