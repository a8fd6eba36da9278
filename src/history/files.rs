//! Where a volume's files live: a directory, or (for crash tests) a simulated one.
//!
//! The log, the checkpoints and the manifest only create, open, list, rename and remove
//! whole files, and write into files that nothing else reads until they are complete
//! or synced. That narrow surface is a trait so that the crash tests can run the real
//! engine over [`SimFiles`], which forgets what a power failure would, and so that the
//! files can later live somewhere other than a local directory.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::image::sim::{Rng, SimStorage};
use crate::image::storage::{FileStorage, Storage};

/// A flat namespace of files. See the [module documentation](self).
pub trait Files: Send + Sync + Debug {
    /// Creates `name`, which must not exist.
    fn create(&self, name: &str) -> Result<Arc<dyn Storage>>;
    /// Opens `name` for reading, or for writing too.
    fn open(&self, name: &str, writable: bool) -> Result<Arc<dyn Storage>>;
    /// The names present, sorted.
    fn list(&self) -> Result<Vec<String>>;
    /// Replaces `to` with `from`, atomically.
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Removes `name`.
    fn remove(&self, name: &str) -> Result<()>;
    /// Makes creations, renames and removals so far durable.
    fn sync_names(&self) -> Result<()>;
    /// Whether writes never wait for a device (the files are in memory).
    fn in_memory(&self) -> bool {
        false
    }
}

fn io_err(e: io::Error, op: &'static str, path: &Path) -> Error {
    Error::from(e).with_op(op).with_path(path)
}

fn missing(name: &str) -> Error {
    Error::msg(ErrorKind::NotFound, format!("no file {name:?}"))
}

/// A directory of the host.
#[derive(Debug)]
pub struct DirFiles {
    dir: PathBuf,
    in_memory: bool,
}

impl DirFiles {
    /// The files of `dir`, which must exist.
    pub fn new(dir: &Path) -> Result<DirFiles> {
        let handle = File::open(dir).map_err(|e| io_err(e, "open", dir))?;
        Ok(DirFiles {
            dir: dir.to_path_buf(),
            in_memory: crate::sys::memory_backed(&handle),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Files for DirFiles {
    fn create(&self, name: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::create(&self.dir.join(name))?))
    }

    fn open(&self, name: &str, writable: bool) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open_without_lock(
            &self.dir.join(name),
            writable,
        )?))
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let list = |e| io_err(e, "list", &self.dir);
        for entry in std::fs::read_dir(&self.dir).map_err(list)? {
            if let Some(name) = entry.map_err(list)?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let to = self.dir.join(to);
        std::fs::rename(self.dir.join(from), &to).map_err(|e| io_err(e, "rename", &to))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        std::fs::remove_file(&path).map_err(|e| io_err(e, "remove", &path))
    }

    fn sync_names(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(e, "sync", &self.dir))
    }

    fn in_memory(&self) -> bool {
        self.in_memory
    }
}

/// A simulated directory of [`SimStorage`] files for crash tests: names created,
/// renamed or removed since the last [`Files::sync_names`] are forgotten by a crash, and
/// each file forgets what its own storage forgets.
#[derive(Debug, Default)]
pub struct SimFiles {
    state: Mutex<SimState>,
}

#[derive(Debug, Default, Clone)]
struct SimState {
    current: BTreeMap<String, Arc<SimStorage>>,
    durable: BTreeMap<String, Arc<SimStorage>>,
    capacity: Option<u64>,
}

impl SimFiles {
    /// An empty directory.
    pub fn new() -> SimFiles {
        SimFiles::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Limits every file to `capacity` bytes (writes beyond fail with `ENOSPC`), or lifts
    /// the limit.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        let mut st = self.lock();
        st.capacity = capacity;
        for f in st.current.values() {
            f.set_capacity(capacity);
        }
    }

    /// The directory a power failure now would leave behind.
    pub fn crash(&self, rng: &mut Rng) -> SimFiles {
        let st = self.lock();
        let durable = st
            .durable
            .iter()
            .map(|(name, f)| (name.clone(), Arc::new(f.crash(rng))))
            .collect::<BTreeMap<_, _>>();
        SimFiles {
            state: Mutex::new(SimState {
                current: durable.clone(),
                durable,
                capacity: None,
            }),
        }
    }
}

impl Files for SimFiles {
    fn create(&self, name: &str) -> Result<Arc<dyn Storage>> {
        let mut st = self.lock();
        if st.current.contains_key(name) {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!("file {name:?} exists"),
            ));
        }
        let f = Arc::new(SimStorage::new());
        f.set_capacity(st.capacity);
        st.current.insert(name.to_owned(), Arc::clone(&f));
        Ok(f)
    }

    fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn Storage>> {
        let st = self.lock();
        match st.current.get(name) {
            Some(f) => Ok(Arc::clone(f) as Arc<dyn Storage>),
            None => Err(missing(name)),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        Ok(self.lock().current.keys().cloned().collect())
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut st = self.lock();
        let f = st.current.remove(from).ok_or_else(|| missing(from))?;
        st.current.insert(to.to_owned(), f);
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        let mut st = self.lock();
        st.current
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| missing(name))
    }

    fn sync_names(&self) -> Result<()> {
        let mut st = self.lock();
        st.durable = st.current.clone();
        Ok(())
    }

    fn in_memory(&self) -> bool {
        true
    }
}
