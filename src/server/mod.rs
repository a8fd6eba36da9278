//! The network side: listeners, connection slots, the handshake driver, sessions and
//! graceful shutdown.
//!
//! A [`Server`] owns the [`Exports`] and its configuration. Each accepted connection takes
//! a slot (connections are capped, in total and per client address), runs the handshake
//! under a deadline for the whole handshake, then a [`session`] until the client leaves,
//! stays idle too long, or the server shuts down. Shutting down stops the listeners, lets
//! sessions finish the requests they accepted, and flushes every export. What happens is
//! counted for [`metrics`].
//!
//! The handshake driver (`handshake.rs`) reads the exports through the view of one client
//! ([`export::ClientView`]), so exports its access rules refuse do not exist for it.
//! After `STARTTLS` the connection continues over TLS ([`tls`]), and the view is rebuilt
//! with the identity of the client's certificate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::ClientAddr;
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::{HandshakeConfig, TlsPolicy};

pub mod budget;
pub mod control;
pub mod export;
mod handshake;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod metrics_listener;
pub mod session;
pub mod tls;

pub use export::{Export, Exports};
pub use listener::{ListenAddr, Listener};
pub use session::SessionConfig;
pub use tls::{TlsFiles, TlsSettings};

use handshake::{HandshakeError, Ready, is_disconnect, negotiate};
use listener::Stream;

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client that has not finished the handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// Connections served at once from one client IP address (0: no limit); further
    /// ones are closed on accept. Unix-socket clients are local and only count towards
    /// `max_connections`.
    pub max_connections_per_client: usize,
    /// Bytes of request and reply data all connections together may have in flight
    /// (`None`: only each connection's `session.max_in_flight` applies). Connections
    /// lease their budgets from it and give them back when they go idle.
    pub max_in_flight_total: Option<u64>,
    /// How long shutdown waits for sessions to finish their requests.
    pub shutdown_grace: Duration,
    /// Handshake tunables.
    pub handshake: HandshakeConfig,
    /// Transmission-phase tunables.
    pub session: SessionConfig,
    /// Certificates and keys for `STARTTLS`; required unless `handshake.tls` is
    /// [`TlsPolicy::Disabled`].
    pub tls: Option<TlsSettings>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: 0,
            max_in_flight_total: Some(DEFAULT_MAX_IN_FLIGHT_TOTAL),
            shutdown_grace: Duration::from_secs(30),
            handshake: HandshakeConfig::default(),
            session: SessionConfig::default(),
            tls: None,
        }
    }
}

/// How long a client may take over its handshake unless configured.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The default server-wide in-flight budget: 1 GiB, sixteen connections' worth of the
/// default per-connection budget, and far more than a fast disk needs to stay busy.
pub const DEFAULT_MAX_IN_FLIGHT_TOTAL: u64 = 1 << 30;

/// State shared by the accept loops and connections.
struct Shared {
    exports: Arc<Exports>,
    config: ServerConfig,
    slots: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    budget: Option<Arc<budget::GlobalBudget>>,
    stats: Arc<metrics::ServerStats>,
    shutdown: watch::Receiver<bool>,
}

/// Connections open per client address, for `max_connections_per_client`. Touched twice
/// per connection (accept and close), never per request.
#[derive(Debug)]
struct PerClient {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection counted against its address until dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `addr`, unless its address is at the limit. Unix-socket
    /// clients and a limit of 0 are not counted.
    fn admit(
        table: &Arc<PerClient>,
        addr: &ClientAddr,
    ) -> std::result::Result<Option<ClientSlot>, ()> {
        let ClientAddr::Tcp(sa) = addr else {
            return Ok(None);
        };
        if table.limit == 0 {
            return Ok(None);
        }
        let ip = canonical_ip(sa.ip());
        let mut open = table.open();
        let n = open.entry(ip).or_insert(0);
        if *n >= table.limit {
            return Err(());
        }
        *n += 1;
        Ok(Some(ClientSlot {
            table: table.clone(),
            ip,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 client that reached an IPv6 socket counts as its IPv4 address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// An NBD server over a set of exports.
pub struct Server {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
}

/// A handle that asks a running [`Server`] to shut down.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }

    /// Resolves once a shutdown has been asked for, so that services running beside the
    /// server (the control API) stop with it.
    pub async fn requested(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// How many connections a server holds, read from its connection slots, with the
/// server's other counters and gauges for metrics.
#[derive(Clone, Debug)]
pub struct ConnectionGauge {
    slots: Arc<Semaphore>,
    max: usize,
    stats: Arc<metrics::ServerStats>,
    budget: Option<Arc<budget::GlobalBudget>>,
}

impl ConnectionGauge {
    /// The server-wide counters.
    pub fn stats(&self) -> &metrics::ServerStats {
        &self.stats
    }

    /// The server-wide gauges, read now.
    pub fn gauges(&self) -> metrics::Gauges {
        metrics::Gauges {
            connections: self.open() as u64,
            max_connections: self.max as u64,
            in_flight_bytes: self.budget.as_ref().map_or(0, |b| b.leased()),
            in_flight_limit: self.budget.as_ref().map(|b| b.total()),
        }
    }

    /// Every metric of the server and of `exports`, in the Prometheus text format.
    pub fn render_metrics(&self, exports: &Exports) -> String {
        let samples: Vec<_> = exports.all().iter().map(|e| e.metrics_sample()).collect();
        metrics::render(&samples, &self.stats, self.gauges())
    }

    /// Connections open now, in the handshake or in transmission.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    /// The most connections served at once.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Server {
    /// Creates a server for `exports`.
    pub fn new(exports: Arc<Exports>, config: ServerConfig) -> Self {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let per_client = Arc::new(PerClient {
            limit: config.max_connections_per_client,
            open: Mutex::new(HashMap::new()),
        });
        let budget = config.max_in_flight_total.map(budget::GlobalBudget::new);
        Server {
            shared: Arc::new(Shared {
                exports,
                config,
                slots,
                per_client,
                budget,
                stats: Arc::default(),
                shutdown,
            }),
            shutdown_tx,
        }
    }

    /// A handle to stop the server from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown_tx.clone())
    }

    /// A view of the server's connection count.
    pub fn connection_gauge(&self) -> ConnectionGauge {
        ConnectionGauge {
            slots: self.shared.slots.clone(),
            max: self.shared.config.max_connections,
            stats: self.shared.stats.clone(),
            budget: self.shared.budget.clone(),
        }
    }

    /// Serves on `listeners` until [`ShutdownHandle::shutdown`] is called, then drains
    /// connections and flushes every export.
    pub async fn serve(self, listeners: Vec<Listener>) -> Result<()> {
        if listeners.is_empty() {
            return Err(Error::msg(ErrorKind::InvalidInput, "no listen address"));
        }
        if self.shared.config.handshake.tls != TlsPolicy::Disabled
            && self.shared.config.tls.is_none()
        {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "a TLS policy other than off needs a certificate and a key",
            ));
        }
        let mut loops = Vec::new();
        for listener in listeners {
            loops.push(tokio::spawn(accept_loop(listener, self.shared.clone())));
        }
        let mut shutdown = self.shared.shutdown.clone();
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        info!("shutting down: no new connections, finishing requests in flight");
        for l in loops {
            let _ = l.await;
        }
        let all = u32::try_from(self.shared.config.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(
            self.shared.config.shutdown_grace,
            self.shared.slots.acquire_many(all),
        )
        .await
        {
            Ok(_) => debug!("all connections closed"),
            Err(_) => warn!("connections still open after the shutdown grace period"),
        }
        let mut result = Ok(());
        for export in self.shared.exports.all() {
            if let Err(e) = export.backend().flush().await {
                warn!(export = export.name(), "final flush failed: {e}");
                result = Err(e);
            }
        }
        info!("shutdown complete");
        result
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => r,
        };
        let listener::Accepted { stream, addr, peer } = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and similar: back off briefly instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            warn!(%peer, "connection refused: limit of {} connections reached", shared.config.max_connections);
            shared.stats.count_refused(metrics::Refusal::MaxConnections);
            drop(stream);
            continue;
        };
        let Ok(client_slot) = PerClient::admit(&shared.per_client, &addr) else {
            warn!(
                %peer,
                "connection refused: limit of {} connections per client reached",
                shared.config.max_connections_per_client
            );
            shared.stats.count_refused(metrics::Refusal::PerClient);
            drop(stream);
            continue;
        };
        shared.stats.count_accepted();
        let shared = shared.clone();
        let span = info_span!("conn", %peer);
        tokio::spawn(
            async move {
                handle_connection(stream, addr, &shared).await;
                drop(client_slot);
                drop(slot);
            }
            .instrument(span),
        );
    }
}

async fn handle_connection(stream: Stream, addr: ClientAddr, shared: &Shared) {
    debug!("connected");
    let mut shutdown = shared.shutdown.clone();
    let negotiation = tokio::select! {
        r = tokio::time::timeout(
            shared.config.handshake_timeout,
            negotiate(stream, addr, shared),
        ) => r,
        _ = shutdown.wait_for(|stop| *stop) => {
            debug!("shutdown during the handshake");
            return;
        }
    };
    use metrics::HandshakeFailure as Failure;
    let failed = |why| shared.stats.count_handshake_failure(why);
    let ready = match negotiation {
        Err(_) => {
            warn!(
                "handshake not finished within {:?}; dropping",
                shared.config.handshake_timeout
            );
            failed(Failure::Timeout);
            return;
        }
        Ok(Err(HandshakeError::Io(e))) if is_disconnect(&e) => {
            debug!("client went away during the handshake: {e}");
            failed(Failure::Disconnected);
            return;
        }
        Ok(Err(HandshakeError::Closed)) => {
            debug!("client closed the connection during the handshake");
            failed(Failure::Disconnected);
            return;
        }
        Ok(Err(e)) => {
            info!("handshake failed: {e}");
            failed(match e {
                HandshakeError::Tls(_) | HandshakeError::TlsUnavailable => Failure::Tls,
                HandshakeError::Io(_) => Failure::Disconnected,
                HandshakeError::Protocol(_) | HandshakeError::Closed => Failure::Protocol,
            });
            return;
        }
        Ok(Ok(None)) => {
            debug!("client aborted the handshake");
            return;
        }
        Ok(Ok(Some(ready))) => ready,
    };
    let Ready {
        conn,
        negotiated,
        client,
    } = ready;
    let Some(export) = shared.exports.seen_by(&client).get(&negotiated.export.name) else {
        warn!(
            export = negotiated.export.name,
            "export vanished during the handshake"
        );
        return;
    };
    info!(
        export = export.name(),
        structured = negotiated.structured,
        extended = negotiated.extended,
        tls = client.tls,
        "transmission started"
    );
    let _attached = export.attach();
    let env = session::Environment {
        config: shared.config.session,
        budget: shared.budget.clone(),
        shutdown: shared.shutdown.clone(),
    };
    let end = session::run(conn, &export, &negotiated, env).await;
    if matches!(end, session::SessionEnd::Idle) {
        shared.stats.count_idle_closed();
    }
}
