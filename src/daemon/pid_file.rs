//! `--pid-file`: the server's pid in a file, for tools that find a daemon that way.
//!
//! The file is locked (`flock`) for as long as the server runs, and the lock, not the
//! pid written in it, says whether a server holds it: a second server refuses to start,
//! naming the first one's pid, while a file left by a server that was killed (whose lock
//! died with it) is simply taken over, so a crash never blocks a restart. The lock is
//! taken before anything else starts; the pid is written once the listeners are up; the
//! file is removed when the server exits.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::sys;

/// A locked pid file, removed on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Creates or opens `path` and locks it; fails with [`ErrorKind::Busy`] when a live
    /// process holds it.
    pub fn lock(path: &Path) -> Result<PidFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let context = |e: std::io::Error| {
            Error::from(e)
                .with_message("cannot open the pid file")
                .with_path(path)
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(context)?;
        if !file.metadata().map_err(context)?.is_file() {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "the pid file is not a regular file",
            )
            .with_path(path));
        }
        if let Err(e) = sys::try_lock(&file, true) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(context(e));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "another process".to_owned(),
                pid => format!("another process (pid {pid})"),
            };
            return Err(Error::msg(
                ErrorKind::Busy,
                format!("{holder} holds the pid file: is another strata serve running?"),
            )
            .with_path(path));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes this process's pid, replacing whatever the file held.
    pub fn write_pid(&mut self) -> Result<()> {
        let context = |e: std::io::Error| {
            Error::from(e)
                .with_message("cannot write the pid file")
                .with_path(&self.path)
        };
        self.file.set_len(0).map_err(context)?;
        self.file.rewind().map_err(context)?;
        writeln!(self.file, "{}", std::process::id()).map_err(context)?;
        self.file.sync_data().map_err(context)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Removed while still locked, so no other server can have taken it over yet.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strata.pid");
        let mut first = PidFile::lock(&path).unwrap();
        first.write_pid().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        let e = PidFile::lock(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(e.to_string().contains("strata.pid"), "{e}");
        drop(first);
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strata.pid");
        std::fs::write(&path, "4194301\nleft by a crash\n").unwrap();
        let mut file = PidFile::lock(&path).unwrap();
        file.write_pid().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn refuses_what_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PidFile::lock(dir.path()).is_err());
        assert!(PidFile::lock(&dir.path().join("no/such/dir/pid")).is_err());
    }
}
