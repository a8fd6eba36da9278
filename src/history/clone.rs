//! Clones: a new volume with history whose disk starts as another volume's disk at one
//! of its restore points.
//!
//! The clone shares the original's base file (the raw file or image the original was
//! created over, if any) and gets, in its own base image, only what the point reads
//! from the original's log: blocks never written read through to the shared base in
//! both. It starts with no restore points and keeps the original's retention settings;
//! the original is not changed, and the two are independent from then on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;
use crate::image::{self, Chain, ZeroMode};

use super::engine::{CreateHistory, History};
use super::index::{Lineage, Loc};
use super::manifest::Manifest;
use super::retention::PointView;

/// The most bytes copied by one read and one write.
const COPY_CHUNK: u64 = 1 << 20;
/// The most of the disk whose block versions are looked up at once.
const WALK_SPAN: u64 = 1 << 30;

impl PointView {
    /// Makes a volume with history in `dir` (which must not exist) whose disk starts as
    /// this point's. The point stays held while the copy runs; a crash during it leaves
    /// no volume in `dir`.
    pub fn clone_to(&self, dir: &Path) -> Result<Manifest> {
        let h = self.history();
        let manifest = h.manifest();
        let options = CreateHistory {
            size: Some(h.size()),
            base: h.base_file()?,
            window: Duration::from_secs(manifest.window_secs),
            max_bytes: manifest.max_bytes,
            segment_bytes: manifest.segment_bytes,
        };
        History::create_filled(dir, &options, |base| {
            let chain = image::open(base, true)?;
            h.copy_point(self.lineage(), &chain)?;
            chain.flush()
        })
    }
}

impl History {
    /// The file the base image is an overlay of (the base given at creation), made
    /// absolute so that a volume elsewhere can refer to it too.
    fn base_file(&self) -> Result<Option<PathBuf>> {
        let layers = self.base.layers();
        let Some(below) = layers.len().checked_sub(2).map(|i| &layers[i]) else {
            return Ok(None);
        };
        let path = std::path::absolute(&below.path)
            .map_err(|e| crate::Error::from(e).with_path(&below.path))?;
        Ok(Some(path))
    }

    /// Writes into `chain`, an empty overlay of this volume's base file, what the point
    /// `at` reads from the log: data as data, zeroed and trimmed blocks as zeroes (they
    /// hide the base). Blocks the point reads from the base are left to the base.
    fn copy_point(&self, at: &Lineage, chain: &Chain) -> Result<()> {
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < self.size {
            let span = WALK_SPAN.min(self.size - offset);
            self.runs(offset, span, Some(at), |pos, len, loc| {
                match loc {
                    Loc::Base => {}
                    Loc::Zero => chain.zero(pos, len, ZeroMode::Zero, false)?,
                    Loc::Hole => chain.zero(pos, len, ZeroMode::Trim, false)?,
                    Loc::Data { .. } => {
                        let mut done = 0;
                        while done < len {
                            let n = COPY_CHUNK.min(len - done);
                            buf.resize(usize::try_from(n).expect("a chunk fits in memory"), 0);
                            self.read_at(at, pos + done, &mut buf)?;
                            chain.write(pos + done, &buf, false)?;
                            done += n;
                        }
                    }
                }
                Ok(true)
            })?;
            offset += span;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::history::PointSpec;

    const SIZE: u64 = 1 << 20;

    fn read_all(h: &History) -> Vec<u8> {
        let mut buf = vec![0; SIZE as usize];
        h.read(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_clone_reads_the_point_over_the_shared_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&base, &pattern).unwrap();
        let options = CreateHistory {
            size: None,
            base: Some(base),
            window: Duration::from_secs(3600),
            max_bytes: None,
            segment_bytes: 1 << 20,
        };
        History::create(&dir.path().join("vol"), &options).unwrap();
        let h = Arc::new(History::open(&dir.path().join("vol"), false).unwrap());
        h.write(8192, &[7; 10_000], false).unwrap();
        h.zero(65536, 65536, false, false).unwrap();
        h.zero(200_000, 4096, true, false).unwrap();
        h.flush().unwrap();
        let at = read_all(&h);
        h.write(0, &[9; 4096], true).unwrap();

        let point = h.resolve(PointSpec::Seq(h.points()[0].seq)).unwrap();
        let clone_dir = dir.path().join("clone");
        h.view(point).unwrap().clone_to(&clone_dir).unwrap();
        let clone = History::open(&clone_dir, false).unwrap();
        assert!(read_all(&clone) == at, "the clone reads the point");
        assert!(clone.points().is_empty());
        clone.write(0, &[5; 4096], true).unwrap();
        assert_eq!(read_all(&h)[..4096], [9; 4096], "the original is unchanged");
        let e = h.view(point).unwrap().clone_to(&clone_dir).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
    }
}
