//! The control API: HTTP/JSON for operators and VM launchers to inspect and manage a
//! running server (exports, their counters, snapshots, restore points). `docs/api.md`
//! documents every endpoint.
//!
//! It listens on a Unix socket, created with mode 0600 so that only the server's user can
//! connect (no token needed), and optionally on TCP, where every request must carry
//! `Authorization: Bearer TOKEN`. It stops when the NBD server shuts down.
//!
//! Every failure is answered `{"error": "message"}`: errors of the crate get their
//! status from their [`ErrorKind`] in [`status_for`], and nowhere else; requests the HTTP
//! layer rejects (bad JSON, wrong content type, bodies over [`BODY_LIMIT`], unknown
//! routes or methods) get the status that layer chose, with the same JSON shape.
//!
//! This file holds what the API is made of: its listeners, its state and its routes; the
//! endpoints are in `handlers.rs` (those of volumes with history in `history.rs`), the
//! HTTP plumbing it shares with the metrics listener in [`super::http`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};

use super::http::{bind_private_socket, no_route, require_token, serve_http, wrong_method};
use super::listener::{ListenAddr, Listener};
use super::{ConnectionGauge, Exports, ShutdownHandle};
use crate::access::Access;
use crate::error::{Error, ErrorKind, Result};

mod handlers;
mod history;

pub use super::http::{ApiError, Token, status_for};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Where the control API listens.
#[derive(Debug, Default)]
pub struct ControlConfig {
    /// The Unix socket; created with mode 0600, a stale one replaced.
    pub socket: Option<PathBuf>,
    /// A TCP address, which needs [`ControlConfig::token`].
    pub tcp: Option<SocketAddr>,
    /// The bearer token TCP clients must send.
    pub token: Option<Token>,
}

/// What the control API manages and reports: the server's exports and its state.
#[derive(Debug)]
pub struct ControlState {
    exports: Arc<Exports>,
    started: Instant,
    listen: Vec<String>,
    control: Vec<String>,
    connections: ConnectionGauge,
    /// Who may use exports added through the API (those given at start-up have the
    /// same rules); a snapshot's export takes its volume export's rules.
    access: Access,
}

impl ControlState {
    /// Applies `access` to exports added through the API.
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// State for a server of `exports` listening on `listen` (reported as given), whose
    /// connections `gauge` counts.
    pub fn new(exports: Arc<Exports>, listen: &[ListenAddr], gauge: ConnectionGauge) -> Self {
        ControlState {
            exports,
            started: Instant::now(),
            listen: listen.iter().map(ToString::to_string).collect(),
            control: Vec::new(),
            connections: gauge,
            access: Access::open(),
        }
    }
}

/// The bound control listeners, ready to serve.
pub struct ControlServer {
    unix: Option<Listener>,
    tcp: Option<(Listener, Token)>,
    addrs: Vec<ListenAddr>,
    state: ControlState,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Binds the listeners of `config`. A TCP listener without a token is refused.
    pub async fn bind(config: ControlConfig, mut state: ControlState) -> Result<ControlServer> {
        let mut addrs = Vec::new();
        let unix = match &config.socket {
            Some(path) => {
                let listener = bind_private_socket(path).await?;
                addrs.push(ListenAddr::Unix(path.clone()));
                Some(listener)
            }
            None => None,
        };
        let tcp = match config.tcp {
            Some(addr) => {
                let Some(token) = config.token else {
                    return Err(Error::msg(
                        ErrorKind::InvalidInput,
                        format!("the control API on TCP ({addr}) needs a token file"),
                    ));
                };
                let listener = Listener::bind(&ListenAddr::Tcp(addr)).await?;
                addrs.push(listener.local_addr()?);
                Some((listener, token))
            }
            None => None,
        };
        state.control = addrs
            .iter()
            .map(|a| match a {
                ListenAddr::Tcp(a) => format!("http://{a}"),
                ListenAddr::Unix(_) => a.to_string(),
            })
            .collect();
        Ok(ControlServer {
            unix,
            tcp,
            addrs,
            state,
        })
    }

    /// The bound addresses (with the real port when port 0 was asked for).
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.addrs
    }

    /// Serves until `shutdown` is asked for, then finishes the requests in progress (at
    /// most a few seconds) and removes the Unix socket.
    pub async fn serve(self, shutdown: ShutdownHandle) {
        let state = Arc::new(self.state);
        let unix = self
            .unix
            .map(|listener| serve_http(listener, router(state.clone()), shutdown.clone()));
        let tcp = self.tcp.map(|(listener, token)| {
            let app =
                router(state.clone()).layer(middleware::from_fn_with_state(token, require_token));
            serve_http(listener, app, shutdown.clone())
        });
        let maybe = |f: Option<_>| async move {
            if let Some(f) = f {
                f.await;
            }
        };
        tokio::join!(maybe(unix), maybe(tcp));
    }
}

/// The control API's routes.
fn router(state: Arc<ControlState>) -> Router {
    use handlers as h;
    Router::new()
        .route("/v1/server", get(h::server_info))
        .route("/v1/metrics", get(h::metrics))
        .route("/v1/exports", get(h::list_exports).post(h::add_export))
        .route(
            "/v1/exports/{name}",
            get(h::get_export).delete(h::remove_export),
        )
        .route(
            "/v1/exports/{name}/snapshots",
            get(h::list_snapshots).post(h::take_snapshot),
        )
        .route(
            "/v1/exports/{name}/snapshots/{snap}",
            axum::routing::delete(h::delete_snapshot),
        )
        .route(
            "/v1/exports/{name}/snapshots/{snap}/export",
            post(h::export_snapshot),
        )
        .route("/v1/exports/{name}/rollback", post(h::rollback))
        .route("/v1/exports/{name}/dirty", get(h::dirty))
        .route("/v1/exports/{name}/history", get(history::list))
        .route("/v1/exports/{name}/serve-at", post(history::serve_at))
        .route("/v1/exports/{name}/clone", post(history::clone))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_needs_a_token() {
        let exports = Arc::new(Exports::new());
        let server = super::super::Server::new(exports.clone(), Default::default());
        let state = ControlState::new(exports, &[], server.connection_gauge());
        let config = ControlConfig {
            socket: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            token: None,
        };
        let e = ControlServer::bind(config, state).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("needs a token"), "{e}");
    }
}
