//! Running a synchronous storage engine from async requests.

use crate::error::{Error, ErrorKind, Result};

/// Runs `f` inline when its storage lives in memory (it never waits for a device), and
/// on tokio's blocking pool otherwise, so that a slow disk never stalls the network
/// threads. `what` names the engine in the error of a task that did not finish.
pub(crate) async fn offload<T, F>(inline: bool, what: &'static str, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    if inline {
        return f();
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::msg(ErrorKind::Io, format!("{what} task failed")).with_source(e)),
    }
}
