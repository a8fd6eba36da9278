//! The transmission phase of one connection.
//!
//! ```text
//!   socket read half ──> reader loop ──> validate ──> spawn per request ──┐
//!                        (this task)     (refusals answered at once)      │ backend op
//!                                                                         v
//!   socket write half <── writer task <── reply channel <── encoded reply ─┘
//! ```
//!
//! Requests run concurrently and complete in any order; replies carry the request's
//! cookie. Only the writer task touches the write half, and it batches whatever replies
//! are ready into one vectored write. Memory in flight is bounded by a per-connection byte
//! budget, which may draw from a server-wide one ([`super::budget`]): the reader stops
//! reading from the socket while the budget is spent, which pushes back on the client
//! through TCP flow control.
//!
//! With an idle timeout, a session whose client sent no request for that long is closed,
//! unless requests are still running; a client that stops reading its replies counts as
//! idle too (its replies make no progress), since it holds budget without using it.
//!
//! # Layout
//! - `mod.rs`: the session's loop, which reads requests and hands them out, and the
//!   idle watch;
//! - `reader.rs`: request headers and payloads off the socket, validated and charged;
//! - `dispatch.rs`: a request run on the backend, its reply encoded;
//! - `writer.rs`: the one owner of the write half, batching replies into vectored writes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::budget::{ConnBudget, GlobalBudget};
use super::export::Export;
use super::listener::{ReadHalf, WriteHalf};
use crate::proto::{Negotiated, ProtocolError, RequestHeader};

mod dispatch;
mod reader;
mod writer;

use dispatch::Dispatcher;
use reader::{FrameReader, Step};
use writer::{Outgoing, WriterProgress};

/// Bytes of request and reply payload one connection may have in flight unless
/// configured: two of the largest requests, and room for many small ones.
pub const DEFAULT_MAX_IN_FLIGHT: u64 = 64 << 20;

/// Tunables of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Bytes of request and reply payload one connection may have in flight.
    pub max_in_flight: u64,
    /// How long the last replies of a closing session may take to reach a client that
    /// has stopped reading, before the connection is dropped without them.
    pub final_replies_timeout: Duration,
    /// A client that sends no request for this long, while none of its requests runs,
    /// is disconnected (within a quarter more); so is one that reads none of its
    /// replies for this long. `None` keeps idle clients forever, as VMs whose disks see
    /// no I/O for hours expect.
    pub idle_timeout: Option<Duration>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            final_replies_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection without `NBD_CMD_DISC`.
    ClientClosed,
    /// The server is shutting down.
    Shutdown,
    /// The export was removed.
    Removed,
    /// The client sent nothing (or read nothing) for the idle timeout.
    Idle,
    /// The client broke the protocol.
    Protocol(ProtocolError),
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Disconnect => f.write_str("client disconnected"),
            SessionEnd::ClientClosed => f.write_str("client closed the connection"),
            SessionEnd::Shutdown => f.write_str("server shutting down"),
            SessionEnd::Removed => f.write_str("export removed"),
            SessionEnd::Idle => f.write_str("client idle for too long"),
            SessionEnd::Protocol(e) => write!(f, "protocol error: {e}"),
            SessionEnd::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// A connection that finished its handshake, as the session takes it over.
pub struct Connection {
    /// The socket's read half: requests and their payloads.
    pub reader: ReadHalf,
    /// The socket's write half, which only the reply writer touches.
    pub writer: WriteHalf,
    /// Bytes the client sent past the end of the handshake: the start of its requests.
    pub leftover: BytesMut,
    /// The connection runs over TLS, which encrypts in user space: replies must not
    /// carry bytes only the kernel may read
    /// ([`crate::backend::Backend::read_for_kernel`]).
    pub tls: bool,
}

/// What the server gives every session: its tunables, the server-wide budget that
/// per-connection budgets lease from (when there is one), and the shutdown signal.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The transmission phase's tunables.
    pub config: SessionConfig,
    /// The server-wide in-flight budget.
    pub budget: Option<Arc<GlobalBudget>>,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs the transmission phase of `conn` on `export` until the client disconnects, the
/// connection fails, the export is closed, the client stays idle past the idle timeout,
/// or the server shuts down. Requests are charged to a budget of
/// `env.config.max_in_flight` bytes, leased from the server-wide one when there is one.
pub async fn run(
    conn: Connection,
    export: &Export,
    negotiated: &Negotiated,
    env: Environment,
) -> SessionEnd {
    let Environment {
        config,
        budget: global,
        mut shutdown,
    } = env;
    let mut closed = export.closed();
    let limits = reader::limits(negotiated);
    let dispatcher = Arc::new(Dispatcher::new(export, negotiated, conn.tls));
    let budget = ConnBudget::new(
        config.max_in_flight.max(u64::from(limits.max_payload)),
        global,
    );
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let progress = Arc::new(WriterProgress::default());
    let mut writer_task = tokio::spawn(writer::write_loop(conn.writer, rx, progress.clone()));
    let mut reader = FrameReader::new(conn.reader, conn.leftover);
    let header_len = RequestHeader::wire_len(negotiated.extended);
    let mut idle = config.idle_timeout.map(IdleWatch::new);
    let mut requests_read = 0u64;
    // The charge of the request being read, which is not running yet.
    let reading = AtomicU64::new(0);

    let end = loop {
        if *shutdown.borrow() {
            break SessionEnd::Shutdown;
        }
        if *closed.borrow() {
            break SessionEnd::Removed;
        }
        // About to wait for the client: an idle connection holds no shared budget.
        let waiting = reader.buffered() < header_len;
        if waiting {
            budget.set_waiting(true);
        }
        let next = reader::next_request(&mut reader, &budget, &reading, &limits, header_len);
        tokio::pin!(next);
        // Shutdown, removal, a dead writer and idleness interrupt the wait for a request
        // wherever it is: its header, the budget, its payload. A request cut off there was
        // never accepted, so nothing is lost.
        let step = loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Step::End(SessionEnd::Shutdown),
                _ = closed.changed() => break Step::End(SessionEnd::Removed),
                res = &mut writer_task => {
                    break Step::End(match res {
                        Ok(Err(e)) => SessionEnd::Io(e),
                        _ => SessionEnd::ClientClosed,
                    });
                }
                () = IdleWatch::tick(idle.as_mut()) => {
                    let watch = idle.as_mut().expect("ticks only with a watch");
                    let running = budget.charged() > reading.load(Ordering::Relaxed);
                    if watch.expired(requests_read, running, &progress) {
                        break Step::End(SessionEnd::Idle);
                    }
                }
                step = &mut next => break step,
            }
        };
        reading.store(0, Ordering::Relaxed);
        if waiting {
            budget.set_waiting(false);
        }
        match step {
            Step::End(end) => break end,
            Step::Refused(header, refusal, charge) => {
                requests_read += 1;
                let parts = dispatcher.refused(&header, &refusal);
                let _ = tx.send(Outgoing::new(parts, charge));
            }
            Step::Request(header, payload, charge) => {
                requests_read += 1;
                let dispatcher = dispatcher.clone();
                let tx = tx.clone();
                run_or_spawn(async move {
                    let parts = dispatcher.execute(header, payload).await;
                    let _ = tx.send(Outgoing::new(parts, charge));
                });
            }
        }
    };

    // Let every request already accepted finish and its reply reach the client: the
    // writer ends once the last sender (held by in-flight tasks) is gone.
    drop(tx);
    if !writer_task.is_finished() {
        match tokio::time::timeout(config.final_replies_timeout, &mut writer_task).await {
            Ok(Ok(Err(e))) => debug!("writing final replies failed: {e}"),
            Ok(Err(e)) => warn!("reply writer failed: {e}"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => {
                warn!("client is not reading its replies; dropping the connection");
                writer_task.abort();
            }
        }
    }
    dispatcher.flush_if_written().await;
    info!("session ended: {end}");
    end
}

/// Ticks a quarter of the idle timeout apart; a session is idle after four ticks in a
/// row without a new request, with nothing running or with replies that make no
/// progress. This costs a timer per session, not per request.
struct IdleWatch {
    period: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    quiet: u32,
    requests: u64,
    writes: u64,
}

/// Quiet ticks after which a session is idle.
const IDLE_TICKS: u32 = 4;

impl IdleWatch {
    fn new(timeout: Duration) -> IdleWatch {
        let period = (timeout / IDLE_TICKS).max(Duration::from_millis(1));
        IdleWatch {
            period,
            sleep: Box::pin(tokio::time::sleep(period)),
            quiet: 0,
            requests: 0,
            writes: 0,
        }
    }

    /// The next tick; never, without a watch.
    async fn tick(watch: Option<&mut IdleWatch>) {
        match watch {
            Some(w) => w.sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Called on each tick: true once the session has been quiet for the timeout.
    fn expired(&mut self, requests: u64, in_flight: bool, progress: &WriterProgress) -> bool {
        let writes = progress.writes();
        let stalled = progress.writing() && writes == self.writes;
        let busy = requests != self.requests || (in_flight && !stalled);
        self.requests = requests;
        self.writes = writes;
        self.quiet = if busy { 0 } else { self.quiet + 1 };
        let deadline = self.sleep.deadline() + self.period;
        self.sleep.as_mut().reset(deadline);
        self.quiet >= IDLE_TICKS
    }
}

/// Polls `request` once right here and spawns it only if it has to wait.
///
/// Most requests on memory-backed storage complete without ever waiting; running them
/// inline saves a task spawn and a cross-thread wake-up per request. A request that does
/// wait (a disk read on the thread pool, say) becomes its own task, so the reader moves on
/// to the next request at once. Polling first with a no-op waker is sound: a future must
/// register the waker of the poll that returns `Pending`, and the spawned task polls again
/// with its own.
fn run_or_spawn(request: impl Future<Output = ()> + Send + 'static) {
    let mut request = Box::pin(request);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if request.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(request);
    }
}
