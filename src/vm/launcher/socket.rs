//! `launcher.sock`, the running launcher's door: `strata vm stop/suspend/status` and
//! checkpoint deletions arrive as one JSON line each and get one JSON line back. The
//! launcher's main loop answers them one at a time, between the VM's events, so a
//! request never races a suspend.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, ErrorKind, Result};
use crate::vm::bundle::Bundle;

/// The launcher's socket in the bundle.
pub const SOCKET: &str = "launcher.sock";

/// A command for a running launcher, sent as one JSON line on its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// What the VM is doing.
    Status,
    /// Shut the VM down: ask the guest, then after [`STOP_GRACE`](super::STOP_GRACE) stop it; `force`
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

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The NBD URL of the VM's disk.
    pub disk: String,
    /// The driver running the VM (`qemu`, `virtualization`).
    pub driver: String,
    /// The VM's name.
    pub name: String,
    /// The launcher's process id.
    pub pid: u32,
    /// `running`.
    pub state: String,
}

/// The answer to [`Request::Stop`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopping {
    /// Always true: the VM is on its way down.
    pub stopping: bool,
    /// Seconds the guest has to shut down before it is stopped (not for a forced stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<u64>,
}

/// The answer to [`Request::Suspend`]: the checkpoint taken and how long each step took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    /// The checkpoint's name.
    pub checkpoint: String,
    /// Its disk snapshot.
    pub snapshot: String,
    /// Bytes of machine state saved.
    pub state_bytes: u64,
    /// Milliseconds to pause the VM.
    pub pause_ms: u64,
    /// Milliseconds the disk snapshot took.
    pub snapshot_ms: u64,
    /// Microseconds the server held the disk's requests for the snapshot.
    pub snapshot_pause_us: u64,
    /// Milliseconds to save the machine state.
    pub state_ms: u64,
    /// Milliseconds in all.
    pub total_ms: u64,
    /// The VM was stopped afterwards instead of running on.
    pub stopped: bool,
}

/// The answer to [`Request::Delete`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The checkpoint deleted.
    pub deleted: String,
    /// False when its disk snapshot was gone already.
    pub snapshot_deleted: bool,
}

/// A request that failed: `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    /// What went wrong.
    pub error: String,
}

/// Any answer, as the launcher writes it: one JSON object, the shape of which the
/// request decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// To [`Request::Status`].
    Status(Status),
    /// To [`Request::Stop`].
    Stopping(Stopping),
    /// To [`Request::Suspend`].
    Suspended(Suspended),
    /// To [`Request::Delete`].
    Deleted(Deleted),
    /// To any request that failed.
    Failed(Failed),
}

impl Answer {
    /// The answer to a request that failed with `error`.
    pub fn failed(error: impl std::fmt::Display) -> Answer {
        Answer::Failed(Failed {
            error: error.to_string(),
        })
    }

    /// `Ok(answer)` as its answer, an error as [`Answer::Failed`].
    pub fn of<T>(result: Result<T>, answer: impl FnOnce(T) -> Answer) -> Answer {
        result.map_or_else(Answer::failed, answer)
    }
}

pub(super) async fn accept_requests(
    listener: UnixListener,
    tx: mpsc::Sender<(Request, oneshot::Sender<Answer>)>,
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
                        Answer::failed("the VM is stopping")
                    } else {
                        wait.await
                            .unwrap_or_else(|_| Answer::failed("the VM is stopping"))
                    }
                }
                Err(e) => Answer::failed(format!("bad request: {e}")),
            };
            let mut text = serde_json::to_string(&answer).expect("answers encode");
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

/// Sends `request` to the launcher running the VM of `bundle` and returns its answer,
/// of the type `request` is answered with ([`Status`], [`Stopping`], [`Suspended`] or
/// [`Deleted`]); an answer `{"error": ...}` becomes the error.
pub async fn send<A: DeserializeOwned>(
    bundle: &Bundle,
    request: &Request,
    timeout: Duration,
) -> Result<A> {
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
        if let Ok(failed) = serde_json::from_str::<Failed>(&answer) {
            return Err(Error::msg(ErrorKind::Io, failed.error));
        }
        serde_json::from_str(&answer)
            .map_err(|e| Error::msg(ErrorKind::Io, format!("bad answer from the launcher: {e}")))
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
    fn answers_are_json_objects_of_the_request_s_shape() {
        let line = |a: &Answer| serde_json::to_string(a).unwrap();
        let status = Status {
            disk: "nbd+unix:///disk?socket=/run/nbd.sock".into(),
            driver: "qemu".into(),
            name: "vm1".into(),
            pid: 42,
            state: "running".into(),
        };
        assert_eq!(
            line(&Answer::Status(status.clone())),
            r#"{"disk":"nbd+unix:///disk?socket=/run/nbd.sock","driver":"qemu","name":"vm1","pid":42,"state":"running"}"#
        );
        assert_eq!(
            serde_json::from_str::<Status>(&line(&Answer::Status(status.clone()))).unwrap(),
            status
        );
        let stopping = |grace_s| {
            Answer::Stopping(Stopping {
                stopping: true,
                grace_s,
            })
        };
        assert_eq!(line(&stopping(None)), r#"{"stopping":true}"#);
        assert_eq!(
            line(&stopping(Some(30))),
            r#"{"stopping":true,"grace_s":30}"#
        );
        let deleted = Answer::Deleted(Deleted {
            deleted: "ckpt-1".into(),
            snapshot_deleted: false,
        });
        assert_eq!(
            line(&deleted),
            r#"{"deleted":"ckpt-1","snapshot_deleted":false}"#
        );
        let failed = line(&Answer::failed("no such checkpoint"));
        assert_eq!(failed, r#"{"error":"no such checkpoint"}"#);
        // A failure is told apart from every success by its one field.
        assert!(serde_json::from_str::<Failed>(&failed).is_ok());
        for success in [line(&deleted), line(&stopping(Some(1)))] {
            assert!(
                serde_json::from_str::<Failed>(&success).is_err(),
                "{success}"
            );
        }
    }
}
