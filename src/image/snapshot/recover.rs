//! Recovery: a snapshot operation that a crash interrupted is finished or undone before
//! the live image is opened again, from what the files and the manifest say.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::info;

use super::manifest::{Manifest, Pending};
use super::{SEP, TMP_SUFFIX, file_name, file_of, parent_dir, remove_file, sync_dir};
use crate::error::{Error, Result};
use crate::image::{MAX_CHAIN_DEPTH, format_id, resolve_backing, tools};

/// The files of `live`'s chain, by following backing references from its header.
fn chain_files(live: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![live.to_path_buf()];
    let mut path = live.to_path_buf();
    while out.len() <= MAX_CHAIN_DEPTH {
        let header = match tools::header(&path) {
            Ok(h) => h,
            // A raw base, or a file the open will report on.
            Err(_) => break,
        };
        let Some(b) = header.backing else { break };
        path = resolve_backing(&path, &b.path);
        out.push(path.clone());
    }
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn references(files: &[PathBuf], target: &Path) -> bool {
    files.iter().any(|f| same_file(f, target))
}

/// Finishes or undoes a snapshot operation that a crash interrupted, before the live
/// image at `live` is opened. Returns what it did, one line per action (empty when
/// there was nothing to do).
pub fn recover(live: &Path) -> Result<Vec<String>> {
    let dir = parent_dir(live);
    let mut done = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::from(e).with_op("recover").with_path(dir))?;
    let mut manifest = Manifest::load(live);
    let snap_prefix = format!("{}{SEP}", file_name(live));
    let tmp_prefix = format!(".{snap_prefix}");
    let pending = manifest.pending.clone();
    let rolled_back = match &pending {
        Some(Pending::Rollback { new_id, .. }) => {
            tools::header(live).is_ok_and(|h| format_id(&h.image_id) == *new_id)
        }
        _ => false,
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&tmp_prefix) && name.ends_with(TMP_SUFFIX) {
            remove_file(&path)?;
            done.push(format!("removed unfinished overlay {}", path.display()));
        } else if name.starts_with(&snap_prefix) && same_file(&path, live) {
            // A snapshot was being taken: the live file was linked under the snapshot's
            // name, but the new overlay never replaced it.
            remove_file(&path)?;
            done.push(format!(
                "undid the unfinished snapshot {} (the live image is unchanged)",
                path.display()
            ));
        }
    }
    match &pending {
        Some(Pending::Delete { name }) => {
            let file = file_of(live, name);
            if file.exists() && !references(&chain_files(live)?, &file) {
                remove_file(&file)?;
                done.push(format!("finished deleting snapshot {name}"));
            } else {
                done.push(format!(
                    "snapshot {name} was not deleted (interrupted before its removal)"
                ));
            }
        }
        Some(Pending::Rollback { to, discard, .. }) => {
            if rolled_back {
                for n in discard {
                    remove_file(&file_of(live, n))?;
                    manifest.snapshots.remove(n);
                }
                done.push(format!("finished rolling back to snapshot {to}"));
            } else {
                done.push(format!(
                    "rollback to snapshot {to} did not happen (interrupted before the switch)"
                ));
            }
        }
        None => {}
    }
    if pending.is_some() || !done.is_empty() {
        manifest.pending = None;
        manifest.snapshots.retain(|n, _| file_of(live, n).exists());
        sync_dir(dir)?;
        manifest.store(live)?;
    }
    for line in &done {
        info!("{}: {line}", live.display());
    }
    Ok(done)
}
