//! `launcher.sock`, the running launcher's door: `strata vm stop/suspend/status` and
//! checkpoint deletions arrive as one JSON line each and get one JSON line back. The
//! launcher's main loop answers them one at a time, between the VM's events, so a
//! request never races a suspend.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
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

pub(super) async fn accept_requests(
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
}
