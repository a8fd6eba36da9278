//! `strata vm`: the companion launcher's command line. It parses arguments, builds
//! specs and prints; the work is done by `strata::vm`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use strata::size::{format_size, parse_size};
use strata::vm::bundle::{self, Bundle};
use strata::vm::launcher::{
    self, Outcome, Request, ResumeOptions, RunOptions, Status, Stopping, Suspended,
};
use strata::vm::spec::{Accel, Network, SyncMode};
use strata::vm::{Disk, NbdUrl, Platform, VmSpec};
use strata::{Error, ErrorKind};

use super::output::Table;
use strata::time::seconds_utc;

/// `strata vm`
#[derive(Args, Debug)]
pub struct VmArgs {
    /// Directory of VM bundles [default: $XDG_DATA_HOME/strata/vms, or
    /// ~/.local/share/strata/vms].
    #[arg(long, value_name = "DIR", global = true, env = "STRATA_VM_BUNDLES")]
    bundles: Option<PathBuf>,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Create a VM bundle.
    Create(CreateArgs),
    /// Install macOS into a VM from a restore image (macOS hosts only).
    Install {
        /// VM name.
        name: String,
        /// The restore image (.ipsw).
        #[arg(long, value_name = "PATH")]
        ipsw: PathBuf,
    },
    /// Boot a VM and run it until it stops.
    Run {
        /// VM name.
        name: String,
        /// No display window (QEMU: no display; the serial console goes to
        /// console.log in the bundle).
        #[arg(long)]
        headless: bool,
        /// Serve a fresh overlay of IMAGE in-process as the VM's disk (kept in the
        /// bundle as disk.strata).
        #[arg(long, value_name = "IMAGE")]
        serve: Option<PathBuf>,
        /// With --serve: delete the overlay when the VM stops.
        #[arg(long, requires = "serve")]
        discard: bool,
        /// Boot from the disk as it was at this restore point (a seq, an RFC 3339 time
        /// or a time ago such as -10m) of a volume with history, on a clone deleted when
        /// the VM stops; the live disk is left alone. Crash-consistent: no memory state.
        #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Stop a running VM: ask the guest to shut down, then stop it after 30 s.
    Stop {
        /// VM name.
        name: String,
        /// Stop at once (power pulled).
        #[arg(long)]
        force: bool,
    },
    /// Pause a running VM, snapshot its disk, save its machine state, then let it run
    /// on (or stop it with --stop).
    Suspend {
        /// VM name.
        name: String,
        /// Checkpoint name [default: ckpt-N].
        #[arg(long, value_name = "NAME")]
        checkpoint: Option<String>,
        /// Stop the VM once the checkpoint is saved.
        #[arg(long)]
        stop: bool,
    },
    /// Start a VM from a checkpoint: roll its disk back to the checkpoint's snapshot and
    /// restore its machine state.
    Resume {
        /// VM name.
        name: String,
        /// Checkpoint [default: the newest].
        #[arg(long, value_name = "NAME")]
        checkpoint: Option<String>,
        /// Allow deleting the checkpoints newer than this one.
        #[arg(long)]
        destroy_newer: bool,
        /// No display window.
        #[arg(long)]
        headless: bool,
    },
    /// List the VMs.
    List,
    /// List a VM's checkpoints.
    Checkpoints {
        /// VM name.
        name: String,
    },
    /// Delete a checkpoint: its disk snapshot (merged into the layer above it, so the
    /// disk reads as before) and its machine state.
    DeleteCheckpoint {
        /// VM name.
        name: String,
        /// Checkpoint name.
        checkpoint: String,
    },
    /// Show what a running VM is doing.
    Status {
        /// VM name.
        name: String,
    },
}

/// `--platform`
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlatformArg {
    /// A Linux guest under QEMU.
    Linux,
    /// A macOS guest under Virtualization.framework.
    Macos,
}

/// `--sync`
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SyncArg {
    /// Guest flushes become NBD flushes.
    Full,
    /// Guest flushes are ignored.
    None,
}

/// `--network`
#[derive(Debug, Clone, Copy, ValueEnum)]
enum NetworkArg {
    /// No network device.
    None,
    /// A NIC behind the host's NAT.
    Nat,
}

/// `--accel`
#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    /// KVM when available.
    Auto,
    /// KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// VM name.
    name: String,
    /// The disk: an NBD URL (nbd://HOST[:PORT]/EXPORT, nbds://, nbd+unix:///EXPORT?socket=PATH,
    /// nbds+unix://), or an image file that the launcher serves itself.
    #[arg(long, value_name = "URL|IMAGE")]
    disk: String,
    /// With an image: give the VM its own overlay of it (disk.strata in the bundle), so
    /// the image stays as it is.
    #[arg(long)]
    overlay: bool,
    /// Guest platform [default: macos on macOS hosts, linux elsewhere].
    #[arg(long, value_enum)]
    platform: Option<PlatformArg>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    cpus: u32,
    /// Memory, e.g. 512M, 4G [default: 2G, 4G for macOS].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// With a URL: the disk server's control API (socket path or http://HOST:PORT),
    /// which checkpoints need.
    #[arg(long, value_name = "PATH|URL")]
    control: Option<String>,
    /// The bearer token file for --control http://...
    #[arg(long, value_name = "FILE", requires = "control")]
    token_file: Option<PathBuf>,
    /// Seconds the NBD client waits for the server before reconnecting.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    timeout: f64,
    /// What guest flushes do.
    #[arg(long, value_enum, default_value = "full")]
    sync: SyncArg,
    /// Attach the disk read-only.
    #[arg(long)]
    read_only: bool,
    /// The network.
    #[arg(long, value_enum, default_value = "none")]
    network: NetworkArg,
    /// Run without a display unless `run` says otherwise.
    #[arg(long)]
    headless: bool,
    /// Linux: a kernel to boot directly.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Linux: the kernel's initramfs.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Linux: the kernel's command line.
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    cmdline: Option<String>,
    /// Linux: the QEMU binary [default: qemu-system-<host architecture>].
    #[arg(long, value_name = "FILE")]
    qemu: Option<PathBuf>,
    /// Linux: acceleration.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::msg(ErrorKind::InvalidInput, message)
}

fn absolute(path: &Path) -> strata::Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::from(e).with_path(path))
}

fn root(args: &VmArgs) -> strata::Result<PathBuf> {
    match &args.bundles {
        Some(dir) => absolute(dir),
        None => bundle::default_root(),
    }
}

/// Whether this command boots a macOS VM that should get a window.
#[cfg(target_os = "macos")]
pub fn wants_window(args: &VmArgs) -> bool {
    let (name, headless) = match &args.command {
        VmCommand::Run { name, headless, .. } | VmCommand::Resume { name, headless, .. } => {
            (name, *headless)
        }
        _ => return false,
    };
    let spec = root(args).and_then(|root| Bundle::open(&root, name)?.spec());
    !headless && matches!(spec, Ok(s) if s.platform == Platform::Macos && !s.headless)
}

/// Runs `args` on a thread of its own while AppKit's event loop runs on this, the main,
/// thread; exits the process when the command is done.
#[cfg(target_os = "macos")]
pub fn run_with_window(args: VmArgs) -> ! {
    strata::vm::macos::run_app(move || {
        let runtime = match super::runtime() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("strata: {e}");
                return 1;
            }
        };
        match runtime.block_on(run(args)) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("strata: {e}");
                1
            }
        }
    })
}

/// The message printer given to the launcher.
fn reporter() -> strata::vm::Report {
    Arc::new(|line: &str| eprintln!("strata vm: {line}"))
}

/// Runs `strata vm`.
pub async fn run(args: VmArgs) -> strata::Result<ExitCode> {
    let root = root(&args)?;
    match args.command {
        VmCommand::Create(c) => create(&root, c),
        VmCommand::Install { name, ipsw } => install(&root, &name, &ipsw).await,
        VmCommand::Run {
            name,
            headless,
            serve,
            discard,
            at,
        } => {
            let options = RunOptions {
                headless: headless.then_some(true),
                serve,
                discard,
                at,
                resume: None,
            };
            run_vm(&root, &name, options).await
        }
        VmCommand::Resume {
            name,
            checkpoint,
            destroy_newer,
            headless,
        } => {
            let options = RunOptions {
                headless: headless.then_some(true),
                resume: Some(ResumeOptions {
                    checkpoint,
                    destroy_newer,
                }),
                ..RunOptions::default()
            };
            run_vm(&root, &name, options).await
        }
        VmCommand::Stop { name, force } => {
            let bundle = Bundle::open(&root, &name)?;
            let _: Stopping =
                launcher::send(&bundle, &Request::Stop { force }, Duration::from_secs(30)).await?;
            println!(
                "VM {name} is {}",
                if force { "stopping" } else { "shutting down" }
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Suspend {
            name,
            checkpoint,
            stop,
        } => {
            let bundle = Bundle::open(&root, &name)?;
            let answer: Suspended = launcher::send(
                &bundle,
                &Request::Suspend { checkpoint, stop },
                Duration::from_secs(900),
            )
            .await?;
            print_suspended(&name, &answer);
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Status { name } => {
            let bundle = Bundle::open(&root, &name)?;
            let answer: Status =
                launcher::send(&bundle, &Request::Status, Duration::from_secs(30)).await?;
            println!(
                "{}",
                serde_json::to_string(&answer).expect("answers encode")
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::DeleteCheckpoint { name, checkpoint } => {
            let bundle = Bundle::open(&root, &name)?;
            let answer = launcher::delete(&bundle, &checkpoint, reporter()).await?;
            println!(
                "checkpoint {checkpoint} of {name} deleted{}",
                if !answer.snapshot_deleted {
                    " (its disk snapshot was gone already)"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::List => list(&root),
        VmCommand::Checkpoints { name } => checkpoints(&root, &name),
    }
}

/// `run` and `resume`: runs the VM until it stops, and says how it ended.
async fn run_vm(root: &Path, name: &str, options: RunOptions) -> strata::Result<ExitCode> {
    let bundle = Bundle::open(root, name)?;
    match launcher::run(&bundle, options, reporter()).await? {
        Outcome::Stopped(reason) => eprintln!("strata vm: done ({reason})"),
        Outcome::Suspended(c) => {
            eprintln!("strata vm: suspended to checkpoint {c}; `strata vm resume` goes on");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_suspended(name: &str, s: &Suspended) {
    println!(
        "checkpoint {} of {name} saved: {} of machine state, disk snapshot {}; paused {} ms, \
         snapshot {} ms, state {} ms, {} ms in all{}",
        s.checkpoint,
        format_size(s.state_bytes),
        s.snapshot,
        s.pause_ms,
        s.snapshot_ms,
        s.state_ms,
        s.total_ms,
        if s.stopped { "; the VM is stopped" } else { "" }
    );
}

fn create(root: &Path, args: CreateArgs) -> strata::Result<ExitCode> {
    let platform = match args.platform {
        Some(PlatformArg::Linux) => Platform::Linux,
        Some(PlatformArg::Macos) => Platform::Macos,
        None if cfg!(target_os = "macos") => Platform::Macos,
        None => Platform::Linux,
    };
    let is_url = args.disk.contains("://");
    let image = (!is_url)
        .then(|| absolute(Path::new(&args.disk)))
        .transpose()?;
    let disk = match &image {
        None => {
            if args.overlay {
                return Err(invalid("--overlay applies to an image, not to an NBD URL"));
            }
            Disk::Url {
                url: NbdUrl::parse(&args.disk)?,
                control: args.control.clone(),
                token_file: args.token_file.as_deref().map(absolute).transpose()?,
            }
        }
        Some(path) => {
            if args.control.is_some() {
                return Err(invalid(
                    "--control applies to an NBD URL: the launcher serves an image itself",
                ));
            }
            if !path.exists() {
                return Err(Error::msg(ErrorKind::NotFound, "no such image").with_path(path));
            }
            if args.overlay {
                bundle::overlay_disk()
            } else {
                Disk::Image { path: path.clone() }
            }
        }
    };
    let mut spec = VmSpec::new(platform, disk);
    spec.cpus = args.cpus;
    if let Some(m) = &args.memory {
        spec.memory = parse_size(m).map_err(|e| invalid(format!("--memory {m:?}: {e}")))?;
    }
    spec.nbd.timeout_s = args.timeout;
    spec.nbd.sync = match args.sync {
        SyncArg::Full => SyncMode::Full,
        SyncArg::None => SyncMode::None,
    };
    spec.nbd.read_only = args.read_only;
    spec.network = match args.network {
        NetworkArg::None => Network::None,
        NetworkArg::Nat => Network::Nat,
    };
    spec.headless = args.headless;
    match &mut spec.linux {
        Some(linux) => {
            linux.kernel = args.kernel.as_deref().map(absolute).transpose()?;
            linux.initrd = args.initrd.as_deref().map(absolute).transpose()?;
            linux.cmdline = args.cmdline.clone();
            linux.qemu = args.qemu.clone();
            linux.accel = match args.accel {
                AccelArg::Auto => Accel::Auto,
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
            };
        }
        None => {
            if args.kernel.is_some() || args.qemu.is_some() {
                return Err(invalid("--kernel and --qemu apply to Linux VMs"));
            }
        }
    }
    let overlay_of = image.filter(|_| args.overlay);
    let bundle = Bundle::create(root, &args.name, &spec, |dir| {
        if let Some(base) = &overlay_of {
            bundle::create_overlay(dir, base)?;
        }
        platform_files(dir, &spec)
    })?;
    println!(
        "created VM {} ({}, {} CPUs, {}) in {}",
        args.name,
        spec.platform,
        spec.cpus,
        format_size(spec.memory),
        bundle.dir().display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(target_os = "macos")]
fn platform_files(dir: &Path, spec: &VmSpec) -> strata::Result<()> {
    match spec.platform {
        Platform::Macos => strata::vm::macos::prepare_bundle(dir),
        Platform::Linux => Ok(()),
    }
}

#[cfg(not(target_os = "macos"))]
fn platform_files(_dir: &Path, _spec: &VmSpec) -> strata::Result<()> {
    // A macOS VM's identity files are made by `strata vm install` on a Mac.
    Ok(())
}

#[cfg(target_os = "macos")]
async fn install(root: &Path, name: &str, ipsw: &Path) -> strata::Result<ExitCode> {
    let bundle = Bundle::open(root, name)?;
    let bar = super::progress::Bar::fraction();
    let progress: strata::vm::Progress = {
        let bar = bar.clone();
        Arc::new(move |fraction| bar.set_fraction(fraction))
    };
    let installed = launcher::install(&bundle, ipsw, reporter(), progress).await;
    bar.finish();
    installed?;
    println!("macOS is installed in VM {name}; `strata vm run {name}` boots it");
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(target_os = "macos"))]
async fn install(root: &Path, name: &str, _ipsw: &Path) -> strata::Result<ExitCode> {
    Bundle::open(root, name)?;
    Err(Error::msg(
        ErrorKind::NotSupported,
        format!(
            "installing macOS needs a Mac with Apple silicon and macOS 14 or later \
             (Virtualization.framework); this host runs {}",
            std::env::consts::OS
        ),
    ))
}

fn describe_disk(spec: &VmSpec) -> String {
    match &spec.disk {
        Disk::Url { url, .. } => url.to_string(),
        Disk::Image { path } => path.display().to_string(),
    }
}

fn list(root: &Path) -> strata::Result<ExitCode> {
    let rows = bundle::list(root)?
        .into_iter()
        .map(|(b, spec)| {
            let checkpoints = b.checkpoints().map_or(0, |c| c.len());
            let state = if b.is_running() { "running" } else { "stopped" };
            match spec {
                Ok(s) => vec![
                    b.name().to_owned(),
                    s.platform.to_string(),
                    s.cpus.to_string(),
                    format_size(s.memory),
                    state.to_owned(),
                    checkpoints.to_string(),
                    describe_disk(&s),
                ],
                Err(e) => vec![
                    b.name().to_owned(),
                    "?".into(),
                    "-".into(),
                    "-".into(),
                    state.to_owned(),
                    checkpoints.to_string(),
                    format!("unreadable: {e}"),
                ],
            }
        })
        .collect();
    print!(
        "{}",
        Table {
            headers: &[
                "NAME",
                "PLATFORM",
                "CPUS",
                "MEMORY",
                "STATE",
                "CHECKPOINTS",
                "DISK"
            ],
            numeric: &[false, false, true, true, false, true, false],
            rows,
        }
        .render()
    );
    Ok(ExitCode::SUCCESS)
}

fn checkpoints(root: &Path, name: &str) -> strata::Result<ExitCode> {
    let bundle = Bundle::open(root, name)?;
    let rows = bundle
        .checkpoints()?
        .into_iter()
        .map(|c| {
            vec![
                c.name,
                seconds_utc(c.created),
                c.snapshot,
                format_size(c.state_bytes),
                c.driver,
            ]
        })
        .collect();
    print!(
        "{}",
        Table {
            headers: &["NAME", "CREATED (UTC)", "DISK SNAPSHOT", "STATE", "DRIVER"],
            numeric: &[false, false, false, true, false],
            rows,
        }
        .render()
    );
    Ok(ExitCode::SUCCESS)
}
