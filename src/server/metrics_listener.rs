//! The metrics listener (`strata serve --metrics`): `GET /metrics` in the Prometheus text
//! format, and nothing else. The control API serves the same text at `/v1/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::http::{no_route, serve_http, wrong_method};
use super::listener::{ListenAddr, Listener};
use super::{ConnectionGauge, Exports, ShutdownHandle};
use crate::error::Result;

/// The server's metrics as an HTTP response, for the control API and the metrics
/// listener alike.
pub(super) fn metrics_response(gauge: &ConnectionGauge, exports: &Exports) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(super::metrics::CONTENT_TYPE),
        )],
        gauge.render_metrics(exports),
    )
        .into_response()
}

/// A listener that serves `GET /metrics` (Prometheus text format) and nothing else, on
/// TCP or a Unix socket (`strata serve --metrics`). It needs no token: metrics reveal
/// export names and counters, not data, so bind it where only the scraper can reach it.
pub struct MetricsServer {
    listener: Listener,
    exports: Arc<Exports>,
    gauge: ConnectionGauge,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` for the metrics of `exports` and the server `gauge` belongs to.
    pub async fn bind(
        addr: &ListenAddr,
        exports: Arc<Exports>,
        gauge: ConnectionGauge,
    ) -> Result<MetricsServer> {
        Ok(MetricsServer {
            listener: Listener::bind(addr).await?,
            exports,
            gauge,
        })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> Result<ListenAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is asked for.
    pub async fn serve(self, shutdown: ShutdownHandle) {
        let state = Arc::new((self.exports, self.gauge));
        let app = Router::new()
            .route(
                "/metrics",
                get(
                    |State(state): State<Arc<(Arc<Exports>, ConnectionGauge)>>| async move {
                        metrics_response(&state.1, &state.0)
                    },
                ),
            )
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method)
            .with_state(state);
        serve_http(self.listener, app, shutdown).await;
    }
}
