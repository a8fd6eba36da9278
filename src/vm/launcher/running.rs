//! A run from start to end: the disk opened, the driver started (fresh, or from a
//! checkpoint), `launcher.sock` listening, then the main loop of the VM's events, the
//! requests and the signals until the VM stops, and the clean-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::{delete_checkpoint, prepare_resume, suspend};
use super::disk::{DiskAccess, open_disk, remove_overlay};
use super::host::{AnyDriver, check_host, start_driver};
use super::socket::{Answer, Request, SOCKET, Status, Stopping, accept_requests};
use super::{Outcome, RunOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::{self, Bundle};
use crate::vm::probe;
use crate::vm::spec::VmSpec;
use crate::vm::{Boot, Driver, Report, VmEvent};

/// How long a guest may take to shut down after `stop` (without `--force`) before it
/// is stopped outright.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often a disk error makes the launcher check whether a remote server answers.
const PROBE_EVERY: Duration = Duration::from_secs(10);

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
        let kept = bundle
            .spec()
            .is_ok_and(|s| s.disk == bundle::overlay_disk());
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
    let (tx, mut requests) = mpsc::channel::<(Request, oneshot::Sender<Answer>)>(4);
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
    requests: &mut mpsc::Receiver<(Request, oneshot::Sender<Answer>)>,
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
                    Request::Status => Answer::Status(Status {
                        disk: disk.url.to_string(),
                        driver: driver.name().to_owned(),
                        name: bundle.name().to_owned(),
                        pid: std::process::id(),
                        state: "running".to_owned(),
                    }),
                    Request::Stop { force } => {
                        let (stopped, grace_s) = if force {
                            (driver.stop().await, None)
                        } else {
                            report("asking the guest to shut down");
                            stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                            (driver.request_stop().await, Some(STOP_GRACE.as_secs()))
                        };
                        Answer::of(stopped, |()| {
                            Answer::Stopping(Stopping {
                                stopping: true,
                                grace_s,
                            })
                        })
                    }
                    Request::Delete { checkpoint } => Answer::of(
                        delete_checkpoint(bundle, disk, &checkpoint).await,
                        Answer::Deleted,
                    ),
                    Request::Suspend { checkpoint, stop } => {
                        match suspend(bundle, spec, disk, driver, checkpoint, stop, report).await {
                            Ok(taken) => {
                                if stop {
                                    suspended = Some(taken.checkpoint.clone());
                                }
                                Answer::Suspended(taken)
                            }
                            Err(e) => {
                                report(&format!("no checkpoint taken: {e}"));
                                Answer::failed(e)
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
