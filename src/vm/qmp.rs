//! A small client of QMP, the QEMU Machine Protocol: JSON objects, one per line, over
//! a Unix socket. The server greets, the client enables commands with
//! `qmp_capabilities`, then each command gets exactly one `return` or `error`;
//! asynchronous `event`s may arrive at any time in between.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting (`{"QMP": {...}}`).
    Greeting(Value),
    /// A command's success, with its `return` value.
    Return(Value),
    /// A command's failure.
    Error {
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// Its description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Its name (`SHUTDOWN`, `BLOCK_IO_ERROR`, ...).
        name: String,
        /// Its `data`, or null.
        data: Value,
    },
}

/// Parses one line the server sent.
pub fn parse_message(line: &str) -> Result<Message> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        Error::msg(
            ErrorKind::Io,
            format!("QEMU sent a line that is not JSON ({e}): {line:?}"),
        )
    })?;
    if let Some(greeting) = v.get("QMP") {
        return Ok(Message::Greeting(greeting.clone()));
    }
    if let Some(ret) = v.get("return") {
        return Ok(Message::Return(ret.clone()));
    }
    if let Some(err) = v.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(Message::Event {
            name: name.to_owned(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err(Error::msg(
        ErrorKind::Io,
        format!("QEMU sent an unknown QMP message: {line}"),
    ))
}

/// The command line for `command` with `arguments`.
pub fn encode_command(command: &str, arguments: Option<Value>) -> String {
    let mut v = json!({ "execute": command });
    if let Some(a) = arguments {
        v["arguments"] = a;
    }
    let mut line = v.to_string();
    line.push('\n');
    line
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: OwnedWriteHalf,
    replies: mpsc::UnboundedReceiver<Message>,
    events: mpsc::UnboundedReceiver<(String, Value)>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn gone() -> Error {
    Error::msg(ErrorKind::Io, "QEMU closed its monitor connection")
}

impl Qmp {
    /// Connects to the monitor socket at `path`, retrying until `deadline` while it does
    /// not exist yet, and negotiates capabilities.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(Error::from(e)
                        .with_message("QEMU's monitor did not come up")
                        .with_path(path));
                }
            }
        };
        let (read, writer) = stream.into_split();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match parse_message(&line) {
                    Ok(Message::Event { name, data }) => {
                        let _ = event_tx.send((name, data));
                    }
                    Ok(m) => {
                        if reply_tx.send(m).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        });
        let mut qmp = Qmp {
            writer,
            replies,
            events,
            reader,
        };
        match qmp.replies.recv().await {
            Some(Message::Greeting(_)) => {}
            Some(other) => {
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("QEMU's monitor did not greet: {other:?}"),
                ));
            }
            None => return Err(gone()),
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.writer
            .write_all(encode_command(command, arguments).as_bytes())
            .await
            .map_err(|_| gone())?;
        match self.replies.recv().await {
            Some(Message::Return(v)) => Ok(v),
            Some(Message::Error { class, desc }) => Err(Error::msg(
                ErrorKind::Io,
                format!("QEMU refused {command}: {desc} ({class})"),
            )),
            Some(other) => Err(Error::msg(
                ErrorKind::Io,
                format!("QEMU answered {command} with {other:?}"),
            )),
            None => Err(gone()),
        }
    }

    /// The next event: its name and data. `None` once the connection is closed.
    pub async fn next_event(&mut self) -> Option<(String, Value)> {
        self.events.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse_message(g).unwrap(), Message::Greeting(_)));
        assert_eq!(
            parse_message(r#"{"return": {}}"#).unwrap(),
            Message::Return(json!({}))
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        let e = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
        assert_eq!(
            parse_message(e).unwrap(),
            Message::Event {
                name: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-shutdown"})
            }
        );
        assert!(parse_message("not json").is_err());
        assert!(parse_message(r#"{"what": 1}"#).is_err());
    }

    #[test]
    fn commands_encode_as_lines() {
        assert_eq!(encode_command("stop", None), "{\"execute\":\"stop\"}\n");
        assert_eq!(
            encode_command("migrate", Some(json!({"uri": "exec:cat"}))),
            "{\"arguments\":{\"uri\":\"exec:cat\"},\"execute\":\"migrate\"}\n"
        );
    }
}
