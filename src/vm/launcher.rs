//! Runs a VM: takes the bundle's lock, serves a local disk in-process or checks a remote
//! one, starts the driver, answers `strata vm stop/suspend/status` on the bundle's
//! `launcher.sock`, reports what happens, and cleans up when the VM ends.
//!
//! A suspend is ordered so that a checkpoint is recorded only once it is whole:
//!
//! 1. the VM is paused (QEMU's `stop` also drains and flushes the disk);
//! 2. the disk server takes snapshot `vm.NAME` through its control API;
//! 3. the machine state is written to `checkpoints/.NAME.state.partial`, synced and
//!    renamed to `checkpoints/NAME.state`;
//! 4. `checkpoints.json` is rewritten (atomically) with the new checkpoint;
//! 5. the VM resumes, or stops.
//!
//! A failure at 2 or 3 undoes what was done (the partial file, the snapshot) and
//! resumes the VM; a crash leaves at worst an unreferenced snapshot or state file,
//! never a checkpoint without its state or its snapshot. Resuming rolls the disk back
//! to the checkpoint's snapshot before the state is loaded, so memory and disk match.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::bundle::{self, Bundle, Checkpoint, commit_file};
use super::probe;
use super::qemu::{self, QemuDriver, QemuPaths};
use super::serve::{self, LocalServer};
use super::spec::{Disk, Platform, VmSpec};
use super::url::NbdUrl;
use super::{Boot, Driver, VmEvent};
use crate::api::Taken;
use crate::api::client::ControlTarget;
use crate::error::{Error, ErrorKind, Result};

/// The launcher's socket in the bundle.
pub const SOCKET: &str = "launcher.sock";

/// The steps of a suspend at which `STRATA_FAILPOINT` can stop the launcher (see
/// [`crate::failpoint::hit`]), for the crash tests: after the disk snapshot,
/// and after the state file is in place but before the checkpoint is recorded.
pub const FAILPOINTS: &[&str] = &["vm-suspend-snapshotted", "vm-suspend-saved"];

/// Where the launcher's messages go (the command line prints them).
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// How long a guest may take to shut down after `stop` (without `--force`) before it
/// is stopped outright.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often a disk error makes the launcher check whether a remote server answers.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// What `run` and `resume` were asked for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the spec's `headless`.
    pub headless: Option<bool>,
    /// Serve a fresh overlay of this image in-process, instead of the spec's disk.
    pub serve: Option<PathBuf>,
    /// With `serve`: delete the overlay when the VM ends.
    pub discard: bool,
    /// Resume from a checkpoint instead of booting.
    pub resume: Option<ResumeOptions>,
}

/// Which checkpoint to resume from.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// The checkpoint; the newest when `None`.
    pub checkpoint: Option<String>,
    /// Forget the checkpoints newer than it (their disk snapshots are deleted by the
    /// rollback), which a resume otherwise refuses to do.
    pub destroy_newer: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM stopped (powered off, or stopped by `strata vm stop`).
    Stopped(String),
    /// The VM was suspended to this checkpoint and stopped.
    Suspended(String),
}

/// A command for a running launcher, sent as one JSON line on its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// What the VM is doing.
    Status,
    /// Shut the VM down: ask the guest, then after [`STOP_GRACE`] stop it; `force`
    /// stops it at once.
    Stop {
        /// Stop at once.
        #[serde(default)]
        force: bool,
    },
    /// Save a checkpoint.
    Suspend {
        /// Its name; `ckpt-N` when `None`.
        #[serde(default)]
        checkpoint: Option<String>,
        /// Stop the VM afterwards instead of letting it run on.
        #[serde(default)]
        stop: bool,
    },
    /// Delete a checkpoint: its record, its disk snapshot, its state file.
    Delete {
        /// The checkpoint.
        checkpoint: String,
    },
}

/// The driver of either platform.
enum AnyDriver {
    Qemu(Box<QemuDriver>),
    #[cfg(target_os = "macos")]
    Vz(Box<super::macos::VzDriver>),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Qemu($d) => $e,
            #[cfg(target_os = "macos")]
            AnyDriver::Vz($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn name(&self) -> &'static str {
        each!(self, d => d.name())
    }
    async fn pause(&mut self) -> Result<()> {
        each!(self, d => d.pause().await)
    }
    async fn resume(&mut self) -> Result<()> {
        each!(self, d => d.resume().await)
    }
    async fn save_state(&mut self, path: &Path) -> Result<()> {
        each!(self, d => d.save_state(path).await)
    }
    async fn request_stop(&mut self) -> Result<()> {
        each!(self, d => d.request_stop().await)
    }
    async fn stop(&mut self) -> Result<()> {
        each!(self, d => d.stop().await)
    }
    async fn next_event(&mut self) -> Option<VmEvent> {
        each!(self, d => d.next_event().await)
    }
}

/// The driver name for `platform` on this host.
fn driver_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Linux => "qemu",
        Platform::Macos => "vz",
    }
}

/// Fails with [`ErrorKind::NotSupported`] when this host cannot run `spec`.
pub fn check_host(spec: &VmSpec) -> Result<()> {
    match spec.platform {
        Platform::Linux => {
            let binary = qemu_binary(spec);
            if binary.components().count() == 1 && find_on_path(&binary).is_none() {
                return Err(Error::msg(
                    ErrorKind::NotSupported,
                    format!(
                        "{} is not installed: Linux VMs run under QEMU (Debian: apt-get \
                         install qemu-system-x86; or set linux.qemu in config.json)",
                        binary.display()
                    ),
                ));
            }
            Ok(())
        }
        Platform::Macos => check_macos_host(),
    }
}

#[cfg(target_os = "macos")]
fn check_macos_host() -> Result<()> {
    super::macos::check_host()
}

#[cfg(not(target_os = "macos"))]
fn check_macos_host() -> Result<()> {
    Err(Error::msg(
        ErrorKind::NotSupported,
        format!(
            "macOS VMs run only on a Mac with Apple silicon and macOS 14 or later \
             (Virtualization.framework); this host runs {}",
            std::env::consts::OS
        ),
    ))
}

fn qemu_binary(spec: &VmSpec) -> PathBuf {
    spec.linux
        .as_ref()
        .and_then(|l| l.qemu.clone())
        .unwrap_or_else(|| PathBuf::from(qemu::default_binary()))
}

fn find_on_path(binary: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

/// The VM's disk, as this run reaches it.
struct DiskAccess {
    url: NbdUrl,
    control: Option<ControlTarget>,
    export: String,
    /// What checkpoints record as the disk.
    identity: String,
    local: Option<LocalServer>,
    /// An overlay made for this run, deleted at the end.
    discard: Option<PathBuf>,
}

impl DiskAccess {
    fn control(&self) -> Result<&ControlTarget> {
        if self.discard.is_some() {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "this run discards its disk when it ends (--discard): a checkpoint of it \
                 would be lost",
            ));
        }
        self.control.as_ref().ok_or_else(|| {
            Error::msg(
                ErrorKind::InvalidInput,
                "checkpoints need the disk server's control API to take disk snapshots: \
                 give the VM one with `strata vm create ... --control PATH|URL`",
            )
        })
    }

    async fn close(self, report: &Report) {
        if let Some(local) = self.local {
            if let Err(e) = local.stop().await {
                report(&format!("the disk server: {e}"));
            }
        }
        if let Some(overlay) = self.discard {
            remove_overlay(&overlay);
            report(&format!("discarded {}", overlay.display()));
        }
    }
}

/// Removes an overlay with its snapshots and manifest.
fn remove_overlay(overlay: &Path) {
    let (Some(dir), Some(name)) = (overlay.parent(), overlay.file_name()) else {
        return;
    };
    let name = name.to_string_lossy().into_owned();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let f = f.strip_prefix('.').unwrap_or(&f);
            if f == name || f.starts_with(&format!("{name}@")) || f.starts_with(&format!("{name}."))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn image_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Opens the disk for this run: serves a local image or checks a remote export.
async fn open_disk(
    bundle: &Bundle,
    spec: &mut VmSpec,
    options: &RunOptions,
    report: &Report,
) -> Result<DiskAccess> {
    let nbd_sock = bundle.path("nbd.sock");
    let control_sock = bundle.path("control.sock");
    if let Some(image) = &options.serve {
        let overlay = bundle.path(bundle::OVERLAY);
        if overlay.exists() {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!(
                    "VM {:?} has a disk overlay already ({}): run it without --serve to go \
                     on with that disk",
                    bundle.name(),
                    overlay.display()
                ),
            ));
        }
        let base = std::path::absolute(image).map_err(|e| Error::from(e).with_path(image))?;
        if !base.exists() {
            return Err(Error::msg(ErrorKind::NotFound, "no such image").with_path(&base));
        }
        crate::image::create(
            &overlay,
            &crate::image::CreateOptions {
                backing: Some(base.clone()),
                ..Default::default()
            },
        )?;
        report(&format!(
            "serving a new overlay of {} ({})",
            base.display(),
            overlay.display()
        ));
        let local = match LocalServer::start(&overlay, &nbd_sock, &control_sock, false).await {
            Ok(l) => l,
            Err(e) => {
                remove_overlay(&overlay);
                return Err(e);
            }
        };
        if !options.discard {
            // From now on the overlay is this VM's disk.
            spec.disk = Disk::Image {
                path: PathBuf::from(bundle::OVERLAY),
            };
        }
        return Ok(DiskAccess {
            url: local.url.clone(),
            control: Some(local.control.clone()),
            export: serve::EXPORT.to_owned(),
            identity: image_identity(&overlay),
            local: Some(local),
            discard: options.discard.then_some(overlay),
        });
    }
    match &spec.disk {
        Disk::Image { path } => {
            let path = bundle.dir().join(path);
            let local =
                LocalServer::start(&path, &nbd_sock, &control_sock, spec.nbd.read_only).await?;
            Ok(DiskAccess {
                url: local.url.clone(),
                control: Some(local.control.clone()),
                export: serve::EXPORT.to_owned(),
                identity: image_identity(&path),
                local: Some(local),
                discard: None,
            })
        }
        Disk::Url {
            url,
            control,
            token_file,
        } => {
            let timeout = Duration::from_secs_f64(spec.nbd.timeout_s.max(1.0));
            let info = probe::probe(url, timeout).await?;
            if let Some(size) = info.size {
                report(&format!(
                    "disk {url}: {}{}",
                    crate::size::format_size(size),
                    if info.read_only { ", read-only" } else { "" }
                ));
            }
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| Error::from(e).with_path(f))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let control = control
                .as_deref()
                .map(|c| ControlTarget::parse(c, token))
                .transpose()?;
            Ok(DiskAccess {
                url: url.clone(),
                control,
                export: url.export.clone(),
                identity: url.to_string(),
                local: None,
                discard: None,
            })
        }
    }
}

/// A checkpoint to restore, checked against the VM and its disk, with its disk rolled
/// back already.
async fn prepare_resume(
    bundle: &Bundle,
    spec: &VmSpec,
    disk: &DiskAccess,
    options: &ResumeOptions,
    report: &Report,
) -> Result<Checkpoint> {
    let all = bundle.checkpoints()?;
    let checkpoint = match &options.checkpoint {
        Some(name) => bundle.checkpoint(name)?,
        None => all.last().cloned().ok_or_else(|| {
            Error::msg(
                ErrorKind::NotFound,
                format!(
                    "VM {:?} has no checkpoint to resume from (`strata vm suspend` makes one)",
                    bundle.name()
                ),
            )
        })?,
    };
    let want = driver_name(spec.platform);
    if checkpoint.driver != want {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} was saved by the {} driver; this VM runs with {want}",
                checkpoint.name, checkpoint.driver
            ),
        ));
    }
    if checkpoint.machine != spec.machine_fingerprint() {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} was saved from a different machine ({}); the VM is now {}",
                checkpoint.name,
                checkpoint.machine,
                spec.machine_fingerprint()
            ),
        ));
    }
    if checkpoint.disk != disk.identity {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "checkpoint {:?} belongs to the disk {}; the VM's disk is now {}",
                checkpoint.name, checkpoint.disk, disk.identity
            ),
        ));
    }
    let state = bundle.path(&checkpoint.state);
    if !state.is_file() {
        return Err(Error::msg(
            ErrorKind::NotFound,
            format!(
                "the state file of checkpoint {:?} is missing",
                checkpoint.name
            ),
        )
        .with_path(&state));
    }
    let newer: Vec<Checkpoint> = all
        .iter()
        .skip_while(|c| c.name != checkpoint.name)
        .skip(1)
        .cloned()
        .collect();
    if !newer.is_empty() && !options.destroy_newer {
        let names: Vec<&str> = newer.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::msg(
            ErrorKind::Busy,
            format!(
                "newer checkpoints exist ({}): resuming {:?} deletes them; allow that with \
                 --destroy-newer",
                names.join(", "),
                checkpoint.name
            ),
        ));
    }
    let control = disk.control()?;
    let names: Vec<String> = newer.iter().map(|c| c.name.clone()).collect();
    if !names.is_empty() {
        // Forget them first: a crash then leaves unreferenced files, never a checkpoint
        // whose snapshot is gone.
        bundle.remove_checkpoints(&names)?;
    }
    control
        .rollback(
            &disk.export,
            &checkpoint.snapshot,
            false,
            options.destroy_newer,
        )
        .await
        .map_err(|e| {
            Error::msg(
                e.kind(),
                format!(
                    "cannot roll the disk back to checkpoint {:?}: {e}",
                    checkpoint.name
                ),
            )
        })?;
    for c in &newer {
        let _ = std::fs::remove_file(bundle.path(&c.state));
        report(&format!("deleted newer checkpoint {}", c.name));
    }
    Ok(checkpoint)
}

async fn start_driver(
    bundle: &Bundle,
    spec: &VmSpec,
    url: &NbdUrl,
    headless: bool,
    boot: Boot<'_>,
) -> Result<AnyDriver> {
    match spec.platform {
        Platform::Linux => {
            let paths = QemuPaths {
                qmp: bundle.path("qmp.sock"),
                console: bundle.path("console.log"),
            };
            let args = qemu::command_line(
                bundle.name(),
                spec,
                url,
                &paths,
                headless,
                qemu::kvm_available(),
                boot,
            );
            let restoring = matches!(boot, Boot::Restore(_));
            let driver = QemuDriver::start(&qemu_binary(spec), &args, &paths, restoring).await?;
            Ok(AnyDriver::Qemu(Box::new(driver)))
        }
        #[cfg(target_os = "macos")]
        Platform::Macos => {
            let driver = super::macos::VzDriver::start(bundle, spec, url, headless, boot).await?;
            Ok(AnyDriver::Vz(Box::new(driver)))
        }
        #[cfg(not(target_os = "macos"))]
        Platform::Macos => check_macos_host().map(|()| unreachable!()),
    }
}

/// Installs macOS into the VM of `bundle` from the restore image `ipsw`, its disk
/// served or reached as for a run; `progress` gets the fraction done. Marks the spec
/// installed once the install has succeeded.
#[cfg(target_os = "macos")]
pub async fn install(
    bundle: &Bundle,
    ipsw: &Path,
    report: Report,
    progress: Arc<dyn Fn(f64) + Send + Sync>,
) -> Result<()> {
    let mut spec = bundle.spec()?;
    if spec.platform != Platform::Macos {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!(
                "VM {:?} is a {} VM: only macOS is installed this way",
                bundle.name(),
                spec.platform
            ),
        ));
    }
    check_host(&spec)?;
    let _lock = bundle.lock()?;
    let disk = open_disk(bundle, &mut spec, &RunOptions::default(), &report).await?;
    let result = super::macos::install(bundle, &spec, &disk.url, ipsw, &report, progress).await;
    disk.close(&report).await;
    result?;
    if let Some(m) = spec.macos.as_mut() {
        m.installed = true;
    }
    bundle.save_spec(&spec)
}

/// Runs the VM of `bundle` until it stops.
pub async fn run(bundle: &Bundle, options: RunOptions, report: Report) -> Result<Outcome> {
    let mut spec = bundle.spec()?;
    check_host(&spec)?;
    let _lock = bundle.lock()?;
    if options.resume.is_some() && options.serve.is_some() {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            "resume continues on the VM's own disk; --serve makes a new one",
        ));
    }
    let headless = options.headless.unwrap_or(spec.headless);
    let disk = open_disk(bundle, &mut spec, &options, &report).await?;
    let result = run_with_disk(bundle, &mut spec, &options, &disk, headless, &report).await;
    disk.close(&report).await;
    let _ = std::fs::remove_file(bundle.path(SOCKET));
    if result.is_err() && options.serve.is_some() && !options.discard {
        // A VM that never ran on its new overlay does not keep it: the spec names it
        // only once the VM has started.
        let kept = bundle.spec().is_ok_and(|s| {
            s.disk
                == Disk::Image {
                    path: PathBuf::from(bundle::OVERLAY),
                }
        });
        if !kept {
            remove_overlay(&bundle.path(bundle::OVERLAY));
        }
    }
    result
}

async fn run_with_disk(
    bundle: &Bundle,
    spec: &mut VmSpec,
    options: &RunOptions,
    disk: &DiskAccess,
    headless: bool,
    report: &Report,
) -> Result<Outcome> {
    let checkpoint = match &options.resume {
        Some(r) => Some(prepare_resume(bundle, spec, disk, r, report).await?),
        None => None,
    };
    let state = checkpoint.as_ref().map(|c| bundle.path(&c.state));
    let boot = match &state {
        Some(s) => Boot::Restore(s),
        None => Boot::Fresh,
    };
    let started = Instant::now();
    let mut driver = start_driver(bundle, spec, &disk.url, headless, boot).await?;
    if let Some(c) = &checkpoint {
        driver.resume().await?;
        report(&format!(
            "resumed from checkpoint {} in {} ms",
            c.name,
            started.elapsed().as_millis()
        ));
    }
    if options.serve.is_some() && !options.discard {
        bundle.save_spec(spec)?;
    }
    let socket = bundle.path(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| {
        Error::from(e)
            .with_message("cannot listen")
            .with_path(&socket)
    })?;
    report(&format!(
        "VM {} is running (disk {}); `strata vm stop {}` stops it",
        bundle.name(),
        disk.url,
        bundle.name()
    ));
    let (tx, mut requests) = mpsc::channel::<(Request, oneshot::Sender<Value>)>(4);
    // Each connection holds a clone: the answers given just before the VM stopped (to
    // `stop` itself) are written before the launcher exits.
    let in_flight = Arc::new(());
    let accept = tokio::spawn(accept_requests(listener, tx, Arc::clone(&in_flight)));
    let result = serve_vm(bundle, spec, disk, &mut driver, &mut requests, report).await;
    accept.abort();
    let _ = accept.await;
    drop(requests);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&in_flight) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if result.is_err() {
        let _ = driver.stop().await;
    }
    result
}

async fn accept_requests(
    listener: UnixListener,
    tx: mpsc::Sender<(Request, oneshot::Sender<Value>)>,
    in_flight: Arc<()>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let tx = tx.clone();
        let token = Arc::clone(&in_flight);
        tokio::spawn(async move {
            let _token = token;
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let (reply, wait) = oneshot::channel();
                    if tx.send((request, reply)).await.is_err() {
                        json!({ "error": "the VM is stopping" })
                    } else {
                        wait.await
                            .unwrap_or_else(|_| json!({ "error": "the VM is stopping" }))
                    }
                }
                Err(e) => json!({ "error": format!("bad request: {e}") }),
            };
            let mut text = answer.to_string();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

fn describe(event: &VmEvent) -> String {
    match event {
        VmEvent::Stopped { reason } => format!("VM stopped: {reason}"),
        VmEvent::Failed(why) => format!("VM failed: {why}"),
        VmEvent::DiskConnected => "disk connected".to_owned(),
        VmEvent::DiskError { message, fatal } => {
            if *fatal {
                format!("DISK LOST: {message}")
            } else {
                format!("disk: {message}")
            }
        }
        VmEvent::Note(n) => n.clone(),
    }
}

/// The VM's main loop: events, requests and signals until it stops.
async fn serve_vm(
    bundle: &Bundle,
    spec: &VmSpec,
    disk: &DiskAccess,
    driver: &mut AnyDriver,
    requests: &mut mpsc::Receiver<(Request, oneshot::Sender<Value>)>,
    report: &Report,
) -> Result<Outcome> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::from)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::from)?;
    let mut stop_by: Option<tokio::time::Instant> = None;
    let mut suspended: Option<String> = None;
    let mut last_probe: Option<Instant> = None;
    loop {
        let deadline = async {
            match stop_by {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = driver.next_event() => {
                let Some(event) = event else {
                    return Ok(Outcome::Stopped("the VM is gone".to_owned()));
                };
                report(&describe(&event));
                match event {
                    VmEvent::Stopped { reason } => {
                        return Ok(match suspended {
                            Some(c) => Outcome::Suspended(c),
                            None => Outcome::Stopped(reason),
                        });
                    }
                    VmEvent::Failed(why) => return Err(Error::msg(ErrorKind::Io, why)),
                    VmEvent::DiskError { .. } if disk.local.is_none() => {
                        // Say whether the server itself is gone, once in a while.
                        let due = last_probe.is_none_or(|t: Instant| t.elapsed() > PROBE_EVERY);
                        if due {
                            last_probe = Some(Instant::now());
                            if let Err(e) = probe::probe(&disk.url, Duration::from_secs(2)).await {
                                report(&format!("the disk server does not answer: {e}"));
                            }
                        }
                    }
                    _ => {}
                }
            }
            request = requests.recv() => {
                let Some((request, reply)) = request else { continue };
                let answer = match request {
                    Request::Status => json!({
                        "name": bundle.name(),
                        "state": "running",
                        "pid": std::process::id(),
                        "disk": disk.url.to_string(),
                        "driver": driver.name(),
                    }),
                    Request::Stop { force } => {
                        if force {
                            driver.stop().await.map_or_else(
                                |e| json!({ "error": e.to_string() }),
                                |()| json!({ "stopping": true }),
                            )
                        } else {
                            report("asking the guest to shut down");
                            stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                            driver.request_stop().await.map_or_else(
                                |e| json!({ "error": e.to_string() }),
                                |()| json!({ "stopping": true, "grace_s": STOP_GRACE.as_secs() }),
                            )
                        }
                    }
                    Request::Delete { checkpoint } => {
                        match delete_checkpoint(bundle, disk, &checkpoint).await {
                            Ok(v) => v,
                            Err(e) => json!({ "error": e.to_string() }),
                        }
                    }
                    Request::Suspend { checkpoint, stop } => {
                        match suspend(bundle, spec, disk, driver, checkpoint, stop, report).await {
                            Ok(v) => {
                                if stop {
                                    suspended = v["checkpoint"].as_str().map(str::to_owned);
                                }
                                v
                            }
                            Err(e) => {
                                report(&format!("no checkpoint taken: {e}"));
                                json!({ "error": e.to_string() })
                            }
                        }
                    }
                };
                let _ = reply.send(answer);
            }
            () = deadline => {
                report("the guest did not shut down in time; stopping it");
                stop_by = None;
                driver.stop().await?;
            }
            _ = term.recv() => {
                report("SIGTERM: stopping the VM");
                driver.stop().await?;
            }
            _ = int.recv() => {
                if stop_by.is_some() {
                    report("stopping the VM now");
                    driver.stop().await?;
                } else {
                    report("asking the guest to shut down (Ctrl-C again stops it at once)");
                    stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                    if let Err(e) = driver.request_stop().await {
                        report(&format!("{e}"));
                    }
                }
            }
        }
    }
}

/// Takes a checkpoint: see the [module documentation](self) for the order of steps.
async fn suspend(
    bundle: &Bundle,
    spec: &VmSpec,
    disk: &DiskAccess,
    driver: &mut AnyDriver,
    name: Option<String>,
    then_stop: bool,
    report: &Report,
) -> Result<Value> {
    let control = disk.control()?;
    let name = match name {
        Some(n) => n,
        None => bundle.next_checkpoint_name()?,
    };
    if !super::spec::valid_name(&name) {
        return Err(Error::msg(
            ErrorKind::InvalidInput,
            format!("{name:?} is not a valid checkpoint name"),
        ));
    }
    if bundle.checkpoints()?.iter().any(|c| c.name == name) {
        return Err(Error::msg(
            ErrorKind::AlreadyExists,
            format!("VM {:?} has a checkpoint {name:?} already", bundle.name()),
        ));
    }
    let snapshot = Checkpoint::snapshot_name(&name);
    let rel = Bundle::state_file(&name);
    let path = bundle.path(&rel);
    let partial = path.with_file_name(format!(".{name}.state.partial"));

    let start = Instant::now();
    driver.pause().await?;
    let paused = start.elapsed();
    let snapshot_pause_us = match take_snapshot(bundle, control, &disk.export, &snapshot).await {
        Ok(taken) => taken.pause_us,
        Err(e) => {
            let _ = driver.resume().await;
            return Err(Error::msg(
                e.kind(),
                format!("the disk snapshot failed, the VM runs on: {e}"),
            ));
        }
    };
    let snapped = start.elapsed();
    crate::failpoint::hit(FAILPOINTS[0]);
    let saved = async {
        driver.save_state(&partial).await?;
        commit_file(&partial, &path)?;
        crate::failpoint::hit(FAILPOINTS[1]);
        let state_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        bundle.add_checkpoint(Checkpoint {
            name: name.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            snapshot: snapshot.clone(),
            state: rel.clone(),
            driver: driver_name(spec.platform).to_owned(),
            machine: spec.machine_fingerprint(),
            disk: disk.identity.clone(),
            state_bytes,
        })?;
        Ok::<u64, Error>(state_bytes)
    }
    .await;
    let state_bytes = match saved {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(&path);
            let _ = control.delete_snapshot(&disk.export, &snapshot).await;
            let _ = driver.resume().await;
            return Err(Error::msg(
                e.kind(),
                format!("saving the machine state failed, the VM runs on: {e}"),
            ));
        }
    };
    let saved_at = start.elapsed();
    if then_stop {
        driver.stop().await?;
    } else {
        driver.resume().await?;
    }
    let total = start.elapsed();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    report(&format!(
        "checkpoint {name}: paused in {} ms, disk snapshot in {} ms, {} of machine state in \
         {} ms; {} after {} ms",
        ms(paused),
        ms(snapped - paused),
        crate::size::format_size(state_bytes),
        ms(saved_at - snapped),
        if then_stop {
            "stopped"
        } else {
            "running again"
        },
        ms(total)
    ));
    Ok(json!({
        "checkpoint": name,
        "snapshot": snapshot,
        "state_bytes": state_bytes,
        "pause_ms": ms(paused),
        "snapshot_ms": ms(snapped - paused),
        "snapshot_pause_us": snapshot_pause_us,
        "state_ms": ms(saved_at - snapped),
        "total_ms": ms(total),
        "stopped": then_stop,
    }))
}

/// Deletes checkpoint `name`: first its record (so that a crash never leaves a listed
/// checkpoint without its snapshot), then its disk snapshot (merged into the layer
/// above it, so the disk reads as before), then its state file.
async fn delete_checkpoint(bundle: &Bundle, disk: &DiskAccess, name: &str) -> Result<Value> {
    let checkpoint = bundle.checkpoint(name)?;
    let control = disk.control()?;
    bundle.remove_checkpoints(std::slice::from_ref(&checkpoint.name))?;
    let snapshot = match control
        .delete_snapshot(&disk.export, &checkpoint.snapshot)
        .await
    {
        Ok(_) => json!(true),
        Err(e) if e.kind() == ErrorKind::NotFound => json!(false),
        Err(e) => {
            let _ = std::fs::remove_file(bundle.path(&checkpoint.state));
            return Err(Error::msg(
                e.kind(),
                format!(
                    "checkpoint {name:?} is forgotten, but its disk snapshot {} is left \
                     (`strata ctl delete-snapshot` removes it): {e}",
                    checkpoint.snapshot
                ),
            ));
        }
    };
    let _ = std::fs::remove_file(bundle.path(&checkpoint.state));
    Ok(json!({ "deleted": name, "snapshot_deleted": snapshot }))
}

/// Deletes checkpoint `name` of `bundle`: through its launcher when the VM runs (which
/// serialises it with suspends), directly otherwise (the disk served in-process for the
/// time it takes, for a local disk).
pub async fn delete(bundle: &Bundle, name: &str, report: Report) -> Result<Value> {
    if bundle.is_running() {
        let request = Request::Delete {
            checkpoint: name.to_owned(),
        };
        return send(bundle, &request, Duration::from_secs(600)).await;
    }
    let mut spec = bundle.spec()?;
    bundle.checkpoint(name)?;
    let _lock = bundle.lock()?;
    let disk = open_disk(bundle, &mut spec, &RunOptions::default(), &report).await?;
    let result = delete_checkpoint(bundle, &disk, name).await;
    disk.close(&report).await;
    result
}

/// Takes the disk snapshot of a new checkpoint. A snapshot of that name that no
/// checkpoint lists was left by a suspend that crashed before recording it: it is
/// deleted and taken anew.
async fn take_snapshot(
    bundle: &Bundle,
    control: &ControlTarget,
    export: &str,
    snapshot: &str,
) -> Result<Taken> {
    match control.take_snapshot(export, snapshot).await {
        Err(e) if e.kind() == ErrorKind::Busy => {
            let listed = bundle.checkpoints()?.iter().any(|c| c.snapshot == snapshot);
            let exists = control
                .snapshots(export)
                .await?
                .iter()
                .any(|s| s.name == snapshot);
            if listed || !exists {
                return Err(e);
            }
            control.delete_snapshot(export, snapshot).await?;
            control.take_snapshot(export, snapshot).await
        }
        other => other,
    }
}

/// Sends `request` to the launcher running the VM of `bundle` and returns its answer;
/// an answer `{"error": ...}` becomes the error.
pub async fn send(bundle: &Bundle, request: &Request, timeout: Duration) -> Result<Value> {
    let socket = bundle.path(SOCKET);
    let not_running = || {
        Error::msg(
            ErrorKind::NotFound,
            format!("VM {:?} is not running", bundle.name()),
        )
    };
    if !bundle.is_running() {
        return Err(not_running());
    }
    let work = async {
        let stream = UnixStream::connect(&socket)
            .await
            .map_err(|_| not_running())?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(request).expect("requests encode");
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(Error::from)?;
        let mut answer = String::new();
        BufReader::new(read)
            .read_line(&mut answer)
            .await
            .map_err(Error::from)?;
        if answer.is_empty() {
            return Err(Error::msg(
                ErrorKind::Io,
                "the launcher closed the connection without answering",
            ));
        }
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| Error::msg(ErrorKind::Io, format!("bad answer from the launcher: {e}")))?;
        match v.get("error").and_then(Value::as_str) {
            Some(e) => Err(Error::msg(ErrorKind::Io, e.to_owned())),
            None => Ok(v),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::msg(
                ErrorKind::Io,
                format!(
                    "the launcher of VM {:?} did not answer in time",
                    bundle.name()
                ),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"suspend","checkpoint":"c1"}"#).unwrap();
        assert_eq!(
            r,
            Request::Suspend {
                checkpoint: Some("c1".into()),
                stop: false
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"stop"}"#).unwrap();
        assert_eq!(r, Request::Stop { force: false });
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
    }

    #[test]
    fn macos_guests_need_a_mac() {
        let spec = VmSpec::new(Platform::Macos, Disk::Image { path: "d".into() });
        if cfg!(not(target_os = "macos")) {
            let err = check_host(&spec).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotSupported);
            assert!(err.to_string().contains("macOS 14 or later"), "{err}");
        }
    }

    #[test]
    fn a_missing_qemu_is_named() {
        let mut spec = VmSpec::new(Platform::Linux, Disk::Image { path: "d".into() });
        spec.linux.as_mut().unwrap().qemu = Some("qemu-system-nonesuch".into());
        let err = check_host(&spec).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotSupported);
        assert!(
            err.to_string()
                .contains("qemu-system-nonesuch is not installed")
        );
    }

    #[test]
    fn overlays_go_with_their_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "disk.strata",
            "disk.strata@vm.ckpt-1",
            "disk.strata.snapshots.json",
            ".disk.strata@x.new",
            "config.json",
            "disk.strata2",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        remove_overlay(&dir.path().join("disk.strata"));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["config.json", "disk.strata2"]);
    }
}
