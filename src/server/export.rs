//! The exports a server offers, and how they look to the handshake.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::access::{Access, Client};
use crate::api::StatsSnapshot;
use crate::backend::{Capabilities, DynBackend, SharedBackend, Spec};
use crate::error::{Error, ErrorKind};
use crate::history::History;
use crate::proto::consts::QEMU_DIRTY_BITMAP;
use crate::proto::consts::transmission_flags as tf;
use crate::proto::handshake::default_meta_contexts;
use crate::proto::{BlockSizes, Command, ExportCatalog, ExportInfo, ExportSummary};
use crate::server::metrics::{self, Histogram};
use crate::volume::Volume;

/// How long the clients of an export that was removed or replaced (through the control
/// API or a reload) get to finish the requests they sent, before it is flushed anyway.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One named disk.
pub struct Export {
    name: String,
    description: String,
    backend: SharedBackend,
    /// Set for image exports that support snapshots.
    volume: Option<Arc<Volume>>,
    /// What the backend serves, for the control API; the volume, when there is one,
    /// says more.
    source: Source,
    /// Counters the sessions of this export update.
    stats: Arc<ExportStats>,
    /// Set to true once the export is removed: its sessions end, as they do at shutdown.
    closed: watch::Sender<bool>,
    /// Woken when the last connection of the export ends.
    idle: Notify,
    /// Who may see and open it.
    access: Access,
}

/// What an export serves, as far as its backend cannot tell (a backend is only storage).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Source {
    /// A backend handed over by the code that built the export.
    Backend,
    /// An in-memory disk (`memory:SIZE`).
    Memory,
    /// A raw file or block device.
    Raw(PathBuf),
    /// A snapshot of a volume, served read-only.
    Snapshot {
        /// The volume the snapshot belongs to, which must be told when the export goes.
        volume: Arc<Volume>,
        /// The export that serves that volume's live disk.
        export: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// A restore point of a volume with history, served read-only.
    Point {
        /// The volume the point belongs to, which must be told when the export goes.
        volume: Arc<Volume>,
        /// The export that serves that volume's live disk.
        export: String,
        /// The point.
        point: crate::history::Point,
    },
}

impl Source {
    /// The volume whose snapshot or restore point this serves, which must be told when
    /// the export goes.
    pub fn served_from(&self) -> Option<&Arc<Volume>> {
        match self {
            Source::Snapshot { volume, .. } | Source::Point { volume, .. } => Some(volume),
            _ => None,
        }
    }
}

/// Per-export counters: connections, requests by kind, errors by errno, and a latency
/// histogram per kind of request. Sessions update them with relaxed atomics, a few per
/// request, so they cost nothing measurable; readers see each counter on its own, not a
/// consistent picture of all of them.
#[derive(Debug, Default)]
pub struct ExportStats {
    connections: AtomicU64,
    total_connections: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    block_status: AtomicU64,
    caches: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Errors by errno, in the order of [`metrics::ERRNOS`].
    errors: [AtomicU64; metrics::ERRNOS.len()],
    /// Latency by kind of request, in the order of [`metrics::OPS`].
    latency: [Histogram; metrics::OPS.len()],
}

impl ExportStats {
    /// Counts a request that passed validation and is about to run.
    #[inline]
    pub fn count_request(&self, command: Command, length: u64) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match command {
            Command::Read => {
                add(&self.reads, 1);
                add(&self.bytes_read, length);
            }
            Command::Write => {
                add(&self.writes, 1);
                add(&self.bytes_written, length);
            }
            Command::Flush => add(&self.flushes, 1),
            Command::Trim => add(&self.trims, 1),
            Command::WriteZeroes => add(&self.zeroes, 1),
            Command::BlockStatus => add(&self.block_status, 1),
            Command::Cache => add(&self.caches, 1),
            Command::Disconnect | Command::Resize | Command::Unknown(_) => {}
        }
    }

    /// Counts a request answered with the NBD error `errno`.
    #[inline]
    pub fn count_error(&self, errno: u32) {
        self.errors[metrics::errno_index(errno)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a request of kind `command` took.
    #[inline]
    pub fn record_latency(&self, command: Command, elapsed: Duration) {
        if let Some(op) = metrics::op_index(command) {
            self.latency[op].record(elapsed);
        }
    }

    /// The counters as the metrics text shows them, for the export `name`.
    pub fn sample(&self, name: &str) -> metrics::ExportSample {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // In the order of metrics::OPS.
        let requests = [
            &self.reads,
            &self.writes,
            &self.flushes,
            &self.trims,
            &self.zeroes,
            &self.block_status,
            &self.caches,
        ];
        metrics::ExportSample {
            name: name.to_owned(),
            connections: get(&self.connections),
            total_connections: get(&self.total_connections),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            requests: requests.map(get),
            errors: self.errors.each_ref().map(get),
            latency: self.latency.each_ref().map(Histogram::snapshot),
            history: None,
        }
    }

    /// Clients in the transmission phase now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// All counters, read one by one.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&self.connections),
            total_connections: get(&self.total_connections),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            trims: get(&self.trims),
            zeroes: get(&self.zeroes),
            block_status: get(&self.block_status),
            caches: get(&self.caches),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: self.errors.iter().map(get).sum(),
        }
    }
}

/// A client's connection to an export, counted while this lives.
#[derive(Debug)]
pub struct Attached<'a> {
    export: &'a Export,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if self
            .export
            .stats
            .connections
            .fetch_sub(1, Ordering::Relaxed)
            == 1
        {
            self.export.idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Creates an export named `name` over `backend`.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        backend: SharedBackend,
    ) -> Self {
        Export {
            name: name.into(),
            description: description.into(),
            backend,
            volume: None,
            source: Source::Backend,
            stats: Arc::default(),
            closed: watch::Sender::new(false),
            idle: Notify::new(),
            access: Access::open(),
        }
    }

    /// Says what the backend serves (see [`Source`]).
    #[must_use]
    pub fn with_source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    /// Creates an export named `name` serving the live disk of `volume`.
    pub fn with_volume(
        name: impl Into<String>,
        description: impl Into<String>,
        volume: Arc<Volume>,
    ) -> Self {
        let mut export = Export::new(name, description, volume.backend().clone());
        export.volume = Some(volume);
        export
    }

    /// Puts a layer over the export's backend (fault injection, say); a volume keeps
    /// its own handle on the image below.
    #[must_use]
    pub fn with_layer(mut self, layer: impl FnOnce(SharedBackend) -> SharedBackend) -> Self {
        self.backend = layer(self.backend);
        self
    }

    /// Restricts who may see and open the export.
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Who may see and open the export.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The volume behind an image export, for snapshots.
    pub fn volume(&self) -> Option<&Arc<Volume>> {
        self.volume.as_ref()
    }

    /// What the export serves, besides its volume.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// A short name for what the export serves: `image` (a Strata image, with
    /// snapshots), `history` (a volume with history), `snapshot`, `point` (a restore
    /// point of a volume with history), `raw` (a file or block device), `memory`, or
    /// `backend`.
    pub fn kind(&self) -> &'static str {
        if let Some(v) = &self.volume {
            return if v.history().is_some() {
                "history"
            } else {
                "image"
            };
        }
        match self.source {
            Source::Backend => "backend",
            Source::Memory => "memory",
            Source::Raw(_) => "raw",
            Source::Snapshot { .. } => "snapshot",
            Source::Point { .. } => "point",
        }
    }

    /// The file served, when there is one.
    pub fn image_path(&self) -> Option<&Path> {
        match (&self.volume, &self.source) {
            (Some(volume), _) => Some(volume.path()),
            (None, Source::Raw(path)) => Some(path),
            _ => None,
        }
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description clients are sent.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Does the export refuse writes?
    pub fn read_only(&self) -> bool {
        self.backend.capabilities().read_only
    }

    /// The export's counters.
    pub fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }

    /// The export's counters, read now for the metrics text.
    pub fn metrics_sample(&self) -> metrics::ExportSample {
        let mut sample = self.stats.sample(&self.name);
        sample.history = self
            .volume
            .as_ref()
            .and_then(|v| v.history())
            .map(|h| history_sample(h));
        sample
    }

    /// Counts a client connection until the returned guard is dropped.
    pub fn attach(&self) -> Attached<'_> {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.stats.total_connections.fetch_add(1, Ordering::Relaxed);
        Attached { export: self }
    }

    /// Ends every session of this export (each finishes the requests it accepted) and
    /// every session that starts on it later.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// True after [`Export::close`]; sessions watch it.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Waits until no client is connected, at most `timeout`; returns whether none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                // Registered before the check, so a wake-up between the two is not lost.
                notified.as_mut().enable();
                if self.stats.connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }

    /// The storage behind it.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Transmission flags derived from the backend's capabilities.
    pub fn transmission_flags(&self) -> u16 {
        flags_for(&self.backend.capabilities())
    }

    /// The metadata contexts clients may select: those of every export, then one
    /// `qemu:dirty-bitmap:NAME` per snapshot the backend can compare the disk with.
    pub fn meta_contexts(&self) -> Vec<String> {
        let mut contexts = default_meta_contexts();
        contexts.extend(
            self.backend
                .dirty_bitmaps()
                .into_iter()
                .map(|name| format!("{QEMU_DIRTY_BITMAP}{name}")),
        );
        contexts
    }

    /// What the handshake reports about this export.
    pub fn info(&self) -> ExportInfo {
        let bs = DynBackend::block_size(&*self.backend);
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.backend.size(),
            flags: self.transmission_flags(),
            block_sizes: BlockSizes {
                minimum: bs.minimum,
                preferred: bs.preferred,
                maximum: bs.maximum,
            },
            meta_contexts: self.meta_contexts(),
        }
    }
}

/// What the metrics show of a volume with history.
fn history_sample(h: &History) -> metrics::HistorySample {
    let now = crate::time::now_us();
    metrics::HistorySample {
        points: h.point_count() as u64,
        oldest_point_age: h
            .point_bounds()
            .map(|(oldest, _)| Duration::from_micros(now.saturating_sub(oldest.time_us))),
        history_bytes: h.history_bytes(),
        reclaimed_bytes: h.reclaimed_bytes(),
        dropped_for_space: h.dropped_for_space(),
    }
}

/// Opens the export `name` for `spec` (`memory:SIZE`, or the path of a Strata image, a
/// raw file or a block device), the way `strata serve` and the control API do: Strata
/// images become [`Volume`]s (with snapshots), everything else a plain backend.
/// `format` forces how a file is read; `None` detects it from its first bytes, once.
pub fn open_export(
    name: &str,
    spec: &str,
    read_only: bool,
    format: Option<crate::image::Format>,
    description: &str,
) -> crate::Result<Export> {
    let spec = Spec::parse(spec, format)?;
    let source = match &spec {
        Spec::Image(path) | Spec::History(path) => {
            let volume = Volume::open(path, read_only)?;
            return Ok(Export::with_volume(name, description, volume));
        }
        Spec::Memory(_) => Source::Memory,
        Spec::Raw(path) => Source::Raw(path.clone()),
    };
    Ok(Export::new(name, description, spec.open(read_only)?).with_source(source))
}

/// Transmission flags for a backend with `caps`. Zeroing and cache are always offered:
/// the backend trait has honest fallbacks for both.
pub fn flags_for(caps: &Capabilities) -> u16 {
    let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_CACHE;
    let set = |flags: &mut u16, on: bool, bit: u16| {
        if on {
            *flags |= bit;
        }
    };
    set(&mut flags, caps.read_only, tf::READ_ONLY);
    set(
        &mut flags,
        !caps.read_only,
        tf::SEND_FUA | tf::SEND_WRITE_ZEROES,
    );
    set(&mut flags, !caps.read_only && caps.trim, tf::SEND_TRIM);
    set(
        &mut flags,
        !caps.read_only && caps.fast_zero,
        tf::SEND_FAST_ZERO,
    );
    set(&mut flags, caps.multi_conn, tf::CAN_MULTI_CONN);
    set(&mut flags, caps.rotational, tf::ROTATIONAL);
    flags
}

/// The set of exports, shared by every connection. The first export added is the default
/// one, answered for the empty name.
#[derive(Debug, Default)]
pub struct Exports {
    inner: RwLock<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    by_name: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
}

impl Registry {
    fn check_free(&self, name: &str) -> crate::Result<()> {
        if self.by_name.contains_key(name) {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!("an export named {name:?} exists already"),
            ));
        }
        Ok(())
    }
}

impl Exports {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export.
    pub fn insert(&self, export: Export) {
        let mut reg = self.write();
        if reg.default.is_none() {
            reg.default = Some(export.name.clone());
        }
        reg.by_name.insert(export.name.clone(), Arc::new(export));
    }

    /// Adds an export unless one of that name exists ([`ErrorKind::AlreadyExists`]).
    /// Like [`Exports::insert`], it becomes the default export if there is none.
    pub fn try_insert(&self, export: Export) -> crate::Result<Arc<Export>> {
        let mut reg = self.write();
        reg.check_free(&export.name)?;
        if reg.default.is_none() {
            reg.default = Some(export.name.clone());
        }
        let export = Arc::new(export);
        reg.by_name.insert(export.name.clone(), export.clone());
        Ok(export)
    }

    /// Fails with [`ErrorKind::AlreadyExists`] when an export is named `name`, so that
    /// work towards a new export stops before it starts.
    pub fn check_free(&self, name: &str) -> crate::Result<()> {
        self.read().check_free(name)
    }

    /// Takes the export `name` out of the set: new clients no longer find it, connected
    /// ones are left alone (see [`Export::close`]). Removing the default export leaves
    /// none until the next one is added.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut reg = self.write();
        let export = reg.by_name.remove(name)?;
        if reg.default.as_deref() == Some(name) {
            reg.default = None;
        }
        Some(export)
    }

    /// Makes `name` the default export, answered for the empty name. Returns false, and
    /// changes nothing, when there is no export of that name.
    pub fn set_default(&self, name: &str) -> bool {
        let mut reg = self.write();
        if !reg.by_name.contains_key(name) {
            return false;
        }
        reg.default = Some(name.to_owned());
        true
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finds an export by the name a client sent; "" is the default export.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let reg = self.read();
        let key = if name.is_empty() {
            reg.default.as_deref()?
        } else {
            name
        };
        reg.by_name.get(key).cloned()
    }

    /// All exports, in name order.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.read().by_name.values().cloned().collect()
    }
}

impl Exports {
    /// The exports as one client may see them, for its handshake.
    pub fn seen_by<'a>(&'a self, client: &'a Client) -> ClientView<'a> {
        ClientView {
            exports: self,
            client,
        }
    }
}

/// The catalog one client's handshake reads: exports its [`Access`] rules do not allow
/// are missing from listings and unknown by name, exactly as if they did not exist.
#[derive(Debug, Clone, Copy)]
pub struct ClientView<'a> {
    exports: &'a Exports,
    client: &'a Client,
}

impl ClientView<'_> {
    /// The export `name` ("" for the default one), if this client may use it.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .get(name)
            .filter(|e| e.access.allows(self.client))
    }
}

impl ExportCatalog for ClientView<'_> {
    fn export(&self, name: &str) -> Option<ExportInfo> {
        self.get(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<ExportSummary> {
        self.exports
            .all()
            .iter()
            .filter(|e| e.access.allows(self.client))
            .map(|e| ExportSummary {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn memory(name: &str) -> Export {
        Export::new(name, "", Arc::new(MemoryBackend::new(1 << 20)))
    }

    #[test]
    fn names_are_unique_and_the_default_follows_removal() {
        let exports = Exports::new();
        exports.try_insert(memory("a")).unwrap();
        exports.try_insert(memory("b")).unwrap();
        let e = exports.try_insert(memory("a")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(exports.get("").unwrap().name(), "a");
        assert_eq!(exports.remove("a").unwrap().name(), "a");
        assert!(exports.remove("a").is_none());
        assert!(exports.get("a").is_none());
        assert!(exports.get("").is_none(), "no default after removing it");
        exports.try_insert(memory("c")).unwrap();
        assert_eq!(exports.get("").unwrap().name(), "c");
        assert_eq!(exports.all().len(), 2);
        assert!(exports.set_default("b"));
        assert_eq!(exports.get("").unwrap().name(), "b");
        assert!(!exports.set_default("a"), "no such export");
        assert_eq!(exports.get("").unwrap().name(), "b");
    }

    #[test]
    fn stats_count_requests_and_connections() {
        let export = memory("m");
        let stats = export.stats();
        stats.count_request(Command::Read, 4096);
        stats.count_request(Command::Read, 512);
        stats.count_request(Command::Write, 100);
        stats.count_request(Command::Flush, 0);
        stats.count_request(Command::Trim, 4096);
        stats.count_request(Command::WriteZeroes, 4096);
        stats.count_request(Command::BlockStatus, 4096);
        stats.count_request(Command::Cache, 4096);
        stats.count_error(crate::proto::consts::errno::EIO);
        {
            let _a = export.attach();
            let _b = export.attach();
            assert_eq!(stats.connections(), 2);
        }
        let s = stats.snapshot();
        assert_eq!(
            s,
            StatsSnapshot {
                connections: 0,
                total_connections: 2,
                reads: 2,
                writes: 1,
                flushes: 1,
                trims: 1,
                zeroes: 1,
                block_status: 1,
                caches: 1,
                bytes_read: 4608,
                bytes_written: 100,
                errors: 1,
            }
        );
    }

    #[test]
    fn samples_follow_the_order_of_the_metrics_tables() {
        let export = memory("m");
        let stats = export.stats();
        let commands = [
            Command::Read,
            Command::Write,
            Command::Flush,
            Command::Trim,
            Command::WriteZeroes,
            Command::BlockStatus,
            Command::Cache,
        ];
        for (i, &command) in commands.iter().enumerate() {
            for _ in 0..=i {
                stats.count_request(command, 10);
            }
            stats.record_latency(command, Duration::from_micros(30));
        }
        stats.count_error(crate::proto::consts::errno::ENOSPC);
        let _attached = export.attach();
        let sample = export.metrics_sample();
        assert_eq!(sample.name, "m");
        assert_eq!((sample.connections, sample.total_connections), (1, 1));
        assert_eq!((sample.bytes_read, sample.bytes_written), (10, 20));
        for (i, &command) in commands.iter().enumerate() {
            let op = metrics::op_index(command).unwrap();
            assert_eq!(sample.requests[op], i as u64 + 1, "{}", metrics::OPS[op]);
            assert_eq!(sample.latency[op].count(), 1, "{}", metrics::OPS[op]);
        }
        let enospc = metrics::errno_index(crate::proto::consts::errno::ENOSPC);
        assert_eq!(sample.errors[enospc], 1);
        assert_eq!(sample.errors.iter().sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn closing_signals_sessions_and_waiting_ends_with_the_last_one() {
        let export = Arc::new(memory("m"));
        let mut closed = export.closed();
        assert!(!*closed.borrow());
        assert!(export.wait_idle(Duration::from_millis(1)).await);
        let (attached_tx, attached_rx) = tokio::sync::oneshot::channel();
        let session = {
            let export = export.clone();
            tokio::spawn(async move {
                let _attached = export.attach();
                let mut closed = export.closed();
                attached_tx.send(()).unwrap();
                closed.wait_for(|c| *c).await.unwrap();
            })
        };
        attached_rx.await.unwrap();
        assert!(!export.wait_idle(Duration::from_millis(10)).await);
        export.close();
        assert!(export.wait_idle(Duration::from_secs(10)).await);
        session.await.unwrap();
        assert!(closed.has_changed().unwrap() && *closed.borrow_and_update());
        assert_eq!(export.stats().connections(), 0);
    }
}
