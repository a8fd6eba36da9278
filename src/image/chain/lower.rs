//! The read-only lower part of a chain: backing layers and their merged map, shared by
//! every overlay of the same base.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::image::format::{BackingKind, ENTRIES, Entry, Header};
use crate::image::layer::{L2Content, Scan};
use crate::image::map::{MergedMap, Page, entry};
use crate::image::storage::Storage;

/// What a layer of a chain is.
#[derive(Debug, Clone)]
pub enum LayerKind {
    /// A raw file or block device, always the bottom of a chain.
    Raw {
        /// Its size in bytes.
        size: u64,
    },
    /// A Strata image.
    Strata {
        /// Its header.
        header: Header,
    },
}

/// One layer of a chain.
#[derive(Debug)]
pub struct Layer {
    /// Where its bytes live.
    pub storage: Arc<dyn Storage>,
    /// Its path, for messages and `strata info`.
    pub path: PathBuf,
    /// Raw or Strata, with details.
    pub kind: LayerKind,
}

impl Layer {
    /// The virtual size this layer presents.
    pub fn size(&self) -> u64 {
        match &self.kind {
            LayerKind::Raw { size } => *size,
            LayerKind::Strata { header, .. } => header.virtual_size,
        }
    }
}

/// The read-only lower part of a chain: the backing layers of an overlay, with their
/// merged map. Shared by every overlay of the same base.
#[derive(Debug)]
pub struct Lower {
    /// Layers, bottom first.
    pub layers: Vec<Arc<Layer>>,
    pub(super) map: MergedMap,
    /// What an overlay of this chain records to recognise it.
    pub identity: (BackingKind, [u8; 16]),
    /// The shared chain below this one's top, kept open (and so in the cache of open
    /// chains) as long as this one is.
    pub(in crate::image) below: Option<Arc<Lower>>,
}

impl Lower {
    /// A chain of one raw layer. `identity` is its content fingerprint.
    pub fn raw(storage: Arc<dyn Storage>, path: &Path, identity: [u8; 16]) -> Result<Lower> {
        let size = storage
            .len()
            .map_err(|e| Error::from(e).with_op("open").with_path(path))?;
        Ok(Lower {
            layers: vec![Arc::new(Layer {
                storage,
                path: path.to_path_buf(),
                kind: LayerKind::Raw { size },
            })],
            map: MergedMap::default(),
            identity: (BackingKind::Raw, identity),
            below: None,
        })
    }

    /// A Strata layer (already scanned) over `below`.
    pub fn strata(
        storage: Arc<dyn Storage>,
        path: &Path,
        scan: Scan,
        below: Option<&Lower>,
    ) -> Result<Lower> {
        let mut layers = below.map(|b| b.layers.clone()).unwrap_or_default();
        let mut map = below.map(|b| b.map.clone()).unwrap_or_default();
        let id = layer_id(layers.len(), path)?;
        overlay_scan(&mut map, &scan, id);
        let identity = (BackingKind::Strata, scan.header.image_id);
        layers.push(Arc::new(Layer {
            storage,
            path: path.to_path_buf(),
            kind: LayerKind::Strata {
                header: scan.header,
            },
        }));
        Ok(Lower {
            layers,
            map,
            identity,
            below: None,
        })
    }

    /// Virtual size of the chain's top.
    pub fn size(&self) -> u64 {
        self.layers.last().map_or(0, |l| l.size())
    }

    /// The top layer of this chain.
    pub fn top(&self) -> &Arc<Layer> {
        self.layers.last().expect("a chain has a layer")
    }

    /// The chain below this one's top layer, when it has one.
    pub fn below(&self) -> Option<&Arc<Lower>> {
        self.below.as_ref()
    }

    /// Cluster size of the chain's top, when it is a Strata image.
    pub fn cluster_bits(&self) -> Option<u32> {
        match &self.layers.last()?.kind {
            LayerKind::Strata { header, .. } => Some(header.cluster_bits),
            LayerKind::Raw { .. } => None,
        }
    }
}

pub(super) fn layer_id(index: usize, path: &Path) -> Result<u16> {
    u16::try_from(index).map_err(|_| {
        Error::msg(ErrorKind::InvalidInput, "backing chain is too deep")
            .with_op("open")
            .with_path(path)
    })
}

/// Lays the clusters a scanned image maps over `map`, as layer `id`.
pub(super) fn overlay_scan(map: &mut MergedMap, scan: &Scan, id: u16) {
    map.grow(scan.header.l2_pages() as usize);
    let zero_page: Arc<Page> = Arc::new([entry::zero(id); ENTRIES]);
    for (q, content) in &scan.pages {
        let page = match content {
            L2Content::AllZero => Arc::clone(&zero_page),
            L2Content::Entries(entries) => Arc::new(entries.map(|e| match e {
                Entry::Unallocated => entry::UNALLOCATED,
                Entry::Zero => entry::zero(id),
                Entry::Data(host) => entry::data(id, host),
            })),
        };
        map.overlay_page(*q as usize, &page);
    }
}
