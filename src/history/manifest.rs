//! The manifest: what a volume is (its identity, size and retention) and the names it
//! gives to restore points. It changes rarely and is replaced whole, atomically.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

use super::files::Files;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
const TEMPORARY: &str = "manifest.json.new";
/// The format this code writes and reads.
pub const FORMAT: u32 = 1;

/// A restore point kept under a name (a snapshot): it outlives the retention window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The snapshot's name.
    pub name: String,
    /// The point's `seq`.
    pub seq: u64,
    /// The point's epoch.
    pub epoch: u32,
    /// When it was taken, in microseconds since the epoch.
    pub time_us: u64,
}

/// The manifest. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The format version.
    pub format: u32,
    /// The volume's identity (hex), written into every segment and checkpoint.
    pub id: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// When the volume was made, in microseconds since the epoch.
    pub created_us: u64,
    /// How long restore points are kept, in seconds.
    pub window_secs: u64,
    /// The most bytes the history may take; over it, the oldest points go first.
    pub max_bytes: Option<u64>,
    /// The size at which a segment is sealed and the next one started.
    pub segment_bytes: u64,
    /// Named restore points.
    #[serde(default)]
    pub snapshots: Vec<Pin>,
}

impl Manifest {
    /// The identity as bytes.
    pub fn id_bytes(&self) -> Result<[u8; 16]> {
        let bad = || {
            Error::msg(
                ErrorKind::Corrupt,
                format!("{MANIFEST}: bad volume id {:?}", self.id),
            )
        };
        if self.id.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.id[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }

    /// Reads the manifest of `files`.
    pub fn load(files: &dyn Files) -> Result<Manifest> {
        let storage = files.open(MANIFEST, false)?;
        let len = storage
            .len()
            .map_err(|e| Error::from(e).with_op("read manifest"))?;
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 24)];
        storage
            .read_at(&mut bytes, 0)
            .map_err(|e| Error::from(e).with_op("read manifest"))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::msg(ErrorKind::Corrupt, format!("{MANIFEST}: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::msg(
                ErrorKind::NotSupported,
                format!(
                    "{MANIFEST}: volume format {} is not supported (this is {FORMAT})",
                    m.format
                ),
            ));
        }
        if m.segment_bytes < 1 << 20 || m.size == 0 {
            return Err(Error::msg(
                ErrorKind::Corrupt,
                format!("{MANIFEST}: bad sizes"),
            ));
        }
        m.id_bytes()?;
        Ok(m)
    }

    /// Replaces the manifest of `files` with this one, durably.
    pub fn store(&self, files: &dyn Files) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        let _ = files.remove(TEMPORARY);
        let storage = files.create(TEMPORARY)?;
        storage
            .write_at(&[&bytes, b"\n"], 0)
            .and_then(|()| storage.sync())
            .map_err(|e| Error::from(e).with_op("write manifest"))?;
        files.rename(TEMPORARY, MANIFEST)?;
        files.sync_names()
    }
}
