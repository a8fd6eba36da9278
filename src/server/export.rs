//! The exports a server offers, and how they look to the handshake.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::access::{Access, Client};
use crate::backend::{Capabilities, DynBackend, SharedBackend};
use crate::proto::consts::transmission_flags as tf;
use crate::proto::handshake::default_meta_contexts;
use crate::proto::{BlockSizes, ExportCatalog, ExportInfo, ExportSummary};
use crate::server::Volume;

/// One named disk.
pub struct Export {
    name: String,
    description: String,
    backend: SharedBackend,
    /// Set for image exports that support snapshots.
    volume: Option<Arc<Volume>>,
    /// Who may see and open it.
    access: Access,
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
            access: Access::open(),
        }
    }

    /// Creates an export named `name` serving the live disk of `volume`.
    pub fn with_volume(
        name: impl Into<String>,
        description: impl Into<String>,
        volume: Arc<Volume>,
    ) -> Self {
        Export {
            name: name.into(),
            description: description.into(),
            backend: volume.backend().clone(),
            volume: Some(volume),
            access: Access::open(),
        }
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

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The storage behind it.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Transmission flags derived from the backend's capabilities.
    pub fn transmission_flags(&self) -> u16 {
        flags_for(&self.backend.capabilities())
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
            meta_contexts: default_meta_contexts(),
        }
    }
}

/// Opens the export `name` for `spec` (`memory:SIZE`, or the path of a Strata image, a
/// raw file or a block device), the way `strata serve` and the control API do: Strata
/// images become [`Volume`]s (with snapshots), everything else a plain backend.
/// `format` forces how a file is read; `None` detects it from its first bytes.
pub fn open_export(
    name: &str,
    spec: &str,
    read_only: bool,
    format: Option<crate::image::Format>,
    description: &str,
) -> crate::Result<Export> {
    use crate::image::{self, Format};
    let is_image = !spec.starts_with("memory:")
        && match format {
            Some(f) => f == Format::Strata,
            None => image::probe(std::path::Path::new(spec))? == Format::Strata,
        };
    Ok(if is_image {
        let volume = Volume::open(std::path::Path::new(spec), read_only)?;
        Export::with_volume(name, description, volume)
    } else {
        Export::new(
            name,
            description,
            crate::backend::open_as(spec, read_only, format)?,
        )
    })
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

impl Exports {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export.
    pub fn insert(&self, export: Export) {
        let mut reg = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reg.default.is_none() {
            reg.default = Some(export.name.clone());
        }
        reg.by_name.insert(export.name.clone(), Arc::new(export));
    }

    /// Finds an export by the name a client sent; "" is the default export.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let reg = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = if name.is_empty() {
            reg.default.as_deref()?
        } else {
            name
        };
        reg.by_name.get(key).cloned()
    }

    /// All exports, in name order.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let reg = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.by_name.values().cloned().collect()
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
