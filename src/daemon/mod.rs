//! `strata serve` as a long-running service: it builds the server from a validated
//! [`Config`], reloads the configured exports on `SIGHUP`, and fits a service manager
//! (systemd): sockets it passes down ([`activation`]), readiness notifications
//! ([`notify`]), a pid file ([`pid_file`]), and a clean exit on `SIGTERM`/`SIGINT`.
//!
//! Start-up order: signal handlers (so a signal sent as soon as the server says where it
//! listens is handled), the pid file's lock, TLS files, exports, listeners, the control
//! API, then the pid and `READY=1`.

pub mod activation;
pub mod notify;
pub mod pid_file;
pub mod reload;

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{self, Config, ControlSettings, Overrides, SystemFiles, TlsMode};
use crate::error::{Error, Result};
use crate::proto::{HandshakeConfig, TlsPolicy};
use crate::server::control::{ControlConfig, ControlServer, ControlState, Token};
use crate::server::metrics_listener::MetricsServer;
use crate::server::{
    Exports, ListenAddr, Listener, Server, ServerConfig, SessionConfig, ShutdownHandle, TlsFiles,
    TlsSettings,
};
use activation::Inherited;
use notify::Notifier;
use pid_file::PidFile;

/// What `run` needs besides the configuration.
#[derive(Debug, Default)]
pub struct Options {
    /// The command line's flags, applied over the file again at every reload.
    pub flags: Overrides,
    /// Sockets a service manager passed down; when there are any they are served
    /// instead of binding the configured addresses.
    pub inherited: Vec<Inherited>,
}

/// The signals the server acts on, caught from the moment this exists.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let install = |kind| {
            signal(kind).map_err(|e| Error::from(e).with_message("cannot install signal handlers"))
        };
        Ok(Signals {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }
}

/// Runs the server of `config` until `SIGTERM` or `SIGINT` has shut it down.
pub async fn run(config: Config, options: Options) -> Result<()> {
    let signals = Signals::install()?;
    let mut pid_file = config
        .server
        .pid_file
        .as_deref()
        .map(PidFile::lock)
        .transpose()?;
    let notifier = Notifier::from_env();
    let (tls_policy, tls) = tls_settings(&config)?;

    let exports = Arc::new(Exports::new());
    for def in &config.exports {
        let export = reload::open_def(def)?;
        info!(
            export = def.name,
            size = export.backend().size(),
            read_only = def.read_only,
            "serving {}",
            def.image
        );
        if !def.access.is_open() {
            info!(
                export = def.name,
                networks = ?def.access.networks().iter().map(ToString::to_string).collect::<Vec<_>>(),
                identities = ?def.access.identities(),
                tls_required = def.access.tls_required(),
                "export restricted"
            );
        }
        exports.insert(export);
    }
    if let Some(first) = config.exports.first() {
        exports.set_default(&first.name);
    }

    let (listeners, bound) = listeners(&config, options.inherited).await?;
    info!(tls = ?tls_policy, client_certificates = tls.as_ref().is_some_and(TlsSettings::verifies_clients), "TLS policy");
    let limits = &config.server.limits;
    let server_config = ServerConfig {
        handshake_timeout: config.server.handshake_timeout,
        max_connections: config.server.max_connections,
        max_connections_per_client: limits.max_connections_per_client,
        max_in_flight_total: limits.max_in_flight_total,
        session: SessionConfig {
            max_in_flight: limits.max_in_flight,
            idle_timeout: limits.idle_timeout,
            ..SessionConfig::default()
        },
        handshake: HandshakeConfig {
            tls: tls_policy,
            ..HandshakeConfig::default()
        },
        tls,
        ..ServerConfig::default()
    };
    let server = Server::new(exports.clone(), server_config);
    let handle = server.shutdown_handle();
    let control = ControlState::new(exports.clone(), &bound, server.connection_gauge())
        .with_access(config.server.api_access.clone());
    let control = bind_control(&config.server.control, control).await?;
    let control = control.map(|c| tokio::spawn(c.serve(handle.clone())));
    let metrics = match &config.server.metrics {
        Some(addr) => {
            let m = MetricsServer::bind(addr, exports.clone(), server.connection_gauge()).await?;
            info!("metrics on {}/metrics", m.local_addr()?);
            Some(tokio::spawn(m.serve(handle.clone())))
        }
        None => None,
    };

    if let Some(pid_file) = &mut pid_file {
        pid_file.write_pid()?;
        info!(
            "pid {} written to {}",
            std::process::id(),
            pid_file.path().display()
        );
    }
    notifier.ready(&status(&exports));
    let signal_loop = tokio::spawn(handle_signals(
        signals,
        config,
        options.flags,
        exports.clone(),
        handle.clone(),
        notifier,
    ));

    let served = server.serve(listeners).await;
    // The control API stops on the same signal; make sure it was sent even if the
    // server ended on its own.
    handle.shutdown();
    if let Some(control) = control {
        let _ = control.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    signal_loop.abort();
    drop(pid_file);
    served
}

/// What `systemctl status` shows.
fn status(exports: &Exports) -> String {
    let n = exports.all().len();
    format!("serving {n} export{}", if n == 1 { "" } else { "s" })
}

fn tls_settings(config: &Config) -> Result<(TlsPolicy, Option<TlsSettings>)> {
    let tls = &config.server.tls;
    let policy = match tls.mode {
        TlsMode::Off => TlsPolicy::Disabled,
        TlsMode::Optional => TlsPolicy::Allowed,
        TlsMode::Require => TlsPolicy::Required,
    };
    let settings = match (&tls.cert, &tls.key, policy) {
        (Some(cert), Some(key), p) if p != TlsPolicy::Disabled => {
            Some(TlsSettings::load(&TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: tls.client_ca.clone(),
            })?)
        }
        _ => None,
    };
    Ok((policy, settings))
}

/// The inherited sockets when there are any, the configured addresses otherwise.
async fn listeners(
    config: &Config,
    inherited: Vec<Inherited>,
) -> Result<(Vec<Listener>, Vec<ListenAddr>)> {
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    if inherited.is_empty() {
        for addr in &config.server.listen {
            let listener = Listener::bind(addr).await?;
            let local = listener.local_addr()?;
            info!("listening on {local}");
            listeners.push(listener);
            bound.push(local);
        }
        return Ok((listeners, bound));
    }
    for socket in inherited {
        let (number, name) = (socket.number, socket.name.clone());
        let listener = socket.into_listener()?;
        let local = listener.local_addr()?;
        match name {
            Some(name) => info!("listening on {local} (socket activation: fd {number}, {name})"),
            None => info!("listening on {local} (socket activation: fd {number})"),
        }
        listeners.push(listener);
        bound.push(local);
    }
    info!(
        "sockets passed by the service manager replace the configured listen addresses ({})",
        config
            .server
            .listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((listeners, bound))
}

/// Binds the control API's listeners, if any were asked for.
async fn bind_control(
    settings: &ControlSettings,
    state: ControlState,
) -> Result<Option<ControlServer>> {
    if settings.socket.is_none() && settings.listen.is_none() {
        return Ok(None);
    }
    let config = ControlConfig {
        socket: settings.socket.clone(),
        tcp: settings.listen,
        token: settings
            .token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?,
    };
    let server = ControlServer::bind(config, state).await?;
    for addr in server.local_addrs() {
        match addr {
            ListenAddr::Tcp(a) => info!("control API on http://{a}"),
            ListenAddr::Unix(p) => info!("control API on unix:{}", p.display()),
        }
    }
    Ok(Some(server))
}

/// Shuts down on `SIGTERM`/`SIGINT`; reloads on `SIGHUP`.
async fn handle_signals(
    mut signals: Signals,
    mut running: Config,
    flags: Overrides,
    exports: Arc<Exports>,
    handle: ShutdownHandle,
    notifier: Notifier,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => info!("SIGTERM received"),
            _ = signals.int.recv() => info!("SIGINT received"),
            _ = signals.hup.recv() => {
                reload(&mut running, &flags, &exports, &notifier).await;
                continue;
            }
        }
        notifier.stopping();
        handle.shutdown();
        return;
    }
}

/// Re-reads the configuration file and applies its exports; on any problem keeps what
/// runs.
async fn reload(running: &mut Config, flags: &Overrides, exports: &Exports, notifier: &Notifier) {
    let Some(file) = running.file.clone() else {
        warn!("SIGHUP: the server was started without --config; there is nothing to reload");
        return;
    };
    notifier.reloading();
    info!("SIGHUP: reloading {}", file.display());
    match read_config(&file, flags).await {
        Err(message) => {
            for line in message.lines() {
                error!("reload: {line}");
            }
            error!("reload: keeping the running configuration");
        }
        Ok(new) => {
            let restart = running.server.differences(&new.server);
            if !restart.is_empty() {
                warn!(
                    "reload: {} changed; these settings are applied at the next restart",
                    restart.join(", ")
                );
            }
            match new.check_exports_against(&running.server.tls) {
                Err(errors) => {
                    for e in errors.errors() {
                        error!("reload: {e} (the server runs with its start-up TLS settings)");
                    }
                    error!("reload: keeping the running configuration");
                }
                Ok(()) => {
                    running.exports = reload::apply(exports, &running.exports, &new.exports).await;
                    info!(
                        configured = running.exports.len(),
                        total = exports.all().len(),
                        "reload complete"
                    );
                }
            }
        }
    }
    notifier.ready(&status(exports));
}

/// Reads and validates `file` (off the network threads); the message lists every
/// problem.
async fn read_config(file: &Path, flags: &Overrides) -> std::result::Result<Config, String> {
    let (file, flags) = (file.to_path_buf(), flags.clone());
    tokio::task::spawn_blocking(move || {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        config::load(&text, &file, &flags, &SystemFiles).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("reading the configuration failed: {e}")))
}
