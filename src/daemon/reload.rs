//! Applying a new list of configured exports to a running server (on `SIGHUP`).
//!
//! [`plan`] compares the exports the server runs from its configuration with those of
//! the new one, by name, and decides per export; it is pure. [`apply`] carries the plan
//! out on the export registry:
//!
//! - unchanged exports are not touched: their clients keep their connections;
//! - a changed description or access rules: a new export over the same open image
//!   replaces the old one, whose clients are disconnected (they may no longer be
//!   allowed) and reconnect to the new one;
//! - a changed image, read-only flag or format: the new definition is opened first and
//!   replaces the old one only if that works, so a broken new image leaves the old
//!   export serving. When the new definition opens the same file (which the old one
//!   keeps locked), the old export is closed first and the file opened again;
//! - an export no longer in the file is closed (clients disconnected) and removed;
//! - a new export is opened and added. If an export of that name was added through the
//!   control API, the file's definition takes its place; other API exports are left
//!   alone. An unchanged export that was removed through the control API since is
//!   added again: the file names it.
//!
//! A step that fails is logged and leaves that export as it was (or, for a file
//! reopened in place, absent); the other steps go on. What the server then runs is
//! returned, to be compared with the next reload.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::ExportDef;
use crate::error::{ErrorKind, Result};
use crate::server::export::{CLOSE_WAIT, Source, open_export};
use crate::server::{Export, Exports};

/// How long reopening a file waits for the old export's last references to go.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// What happens to one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The definition is the same: nothing happens.
    Keep,
    /// New in the file.
    Add,
    /// Only the description or access rules changed: the open image is reused.
    Present,
    /// The image, read-only flag or format changed: the image is opened anew.
    Reopen,
    /// Named by the file, but served now by an export added through the control API.
    TakeOver,
    /// No longer in the file.
    Remove,
}

/// The steps of a reload, by export name, in the order they are applied: removals
/// first (freeing names and files), then the new file's exports in its order.
pub fn plan(
    running: &[ExportDef],
    new: &[ExportDef],
    served: impl Fn(&str) -> bool,
) -> Vec<(String, Step)> {
    let mut steps: Vec<(String, Step)> = running
        .iter()
        .filter(|old| !new.iter().any(|n| n.name == old.name))
        .map(|old| (old.name.clone(), Step::Remove))
        .collect();
    for def in new {
        let step = match running.iter().find(|old| old.name == def.name) {
            Some(old) if old == def => Step::Keep,
            Some(old) if old.storage_differs(def) => Step::Reopen,
            Some(_) => Step::Present,
            None if served(&def.name) => Step::TakeOver,
            None => Step::Add,
        };
        steps.push((def.name.clone(), step));
    }
    steps
}

/// Carries out the reload from `running` to `new` on `exports`; returns the definitions
/// the server now runs.
pub async fn apply(exports: &Exports, running: &[ExportDef], new: &[ExportDef]) -> Vec<ExportDef> {
    let steps = plan(running, new, |name| {
        exports.get(name).is_some() && !name.is_empty()
    });
    let mut now: Vec<ExportDef> = Vec::new();
    for (name, step) in steps {
        let def = new.iter().find(|d| d.name == name);
        let old_def = running.iter().find(|d| d.name == name);
        match (step, def) {
            (Step::Remove, _) => remove(exports, &name).await,
            // Removed through the control API since: the file still names it.
            (Step::Keep, Some(def)) if exports.get(&name).is_none() => {
                if add(exports, def).await {
                    now.push(def.clone());
                }
            }
            (Step::Keep, Some(def)) => now.push(def.clone()),
            (Step::Add, Some(def)) => {
                if add(exports, def).await {
                    now.push(def.clone());
                }
            }
            (Step::Present, Some(def)) => {
                if present(exports, def).await {
                    now.push(def.clone());
                } else if let Some(old) = old_def {
                    now.push(old.clone());
                }
            }
            (Step::Reopen | Step::TakeOver, Some(def)) => match replace(exports, def).await {
                Replaced::Yes => now.push(def.clone()),
                Replaced::KeptOld => {
                    if let Some(old) = old_def {
                        now.push(old.clone());
                    }
                }
                Replaced::Gone => {}
            },
            (_, None) => unreachable!("every step but removal has a definition"),
        }
    }
    if let Some(first) = now.first() {
        exports.set_default(&first.name);
    }
    now
}

/// Opens the export `def` describes: its image, access rules and fault rules.
pub(crate) fn open_def(def: &ExportDef) -> Result<Export> {
    let mut export = open_export(
        &def.name,
        &def.image,
        def.read_only,
        def.format,
        &def.description,
    )?
    .with_access(def.access.clone());
    if !def.faults.is_empty() {
        let rules = def
            .faults
            .iter()
            .map(|r| crate::backend::parse_fault_rule(r))
            .collect::<Result<Vec<_>>>()?;
        tracing::warn!(export = def.name, rules = ?def.faults, "injecting errors");
        export = export.with_layer(|b| Arc::new(crate::backend::Faulty::new(b, rules)));
    }
    Ok(export)
}

/// Opens an export of the file, off the network threads.
async fn open(def: &ExportDef) -> Result<Export> {
    let def = def.clone();
    tokio::task::spawn_blocking(move || open_def(&def))
        .await
        .unwrap_or_else(|e| {
            Err(crate::Error::msg(
                ErrorKind::Io,
                format!("opening the export failed: {e}"),
            ))
        })
}

/// Ends the sessions of an export taken out of (or replaced in) the registry, lets
/// them finish their requests, and flushes what they wrote.
async fn retire(export: &Export) -> u64 {
    let connected = export.stats().connections();
    export.close();
    if !export.wait_idle(CLOSE_WAIT).await {
        warn!(
            export = export.name(),
            "reload: clients still connected {CLOSE_WAIT:?} after their export was closed"
        );
    }
    if let Err(e) = export.backend().flush().await {
        warn!(export = export.name(), "reload: flush failed: {e}");
    }
    connected
}

async fn remove(exports: &Exports, name: &str) {
    let Some(old) = exports.remove(name) else {
        info!(export = name, "reload: already removed");
        return;
    };
    let disconnected = retire(&old).await;
    info!(export = name, disconnected, "reload: export removed");
}

async fn add(exports: &Exports, def: &ExportDef) -> bool {
    let export = match open(def).await {
        Ok(export) => export,
        Err(e) => {
            error!(export = def.name, "reload: cannot add the export: {e}");
            return false;
        }
    };
    let size = export.backend().size();
    match exports.try_insert(export) {
        Ok(_) => {
            info!(export = def.name, size, "reload: serving {}", def.image);
            true
        }
        Err(e) => {
            error!(export = def.name, "reload: cannot add the export: {e}");
            false
        }
    }
}

/// A new export over the open image of the current one, with the new description and
/// rules. Its counters start again.
async fn present(exports: &Exports, def: &ExportDef) -> bool {
    let Some(old) = exports.get(&def.name) else {
        return add(exports, def).await;
    };
    let export = match (old.volume(), old.source()) {
        (Some(volume), _) => Export::with_volume(&def.name, &def.description, volume.clone()),
        (None, source) => Export::new(&def.name, &def.description, old.backend().clone())
            .with_source(source.clone()),
    }
    .with_access(def.access.clone());
    exports.insert(export);
    let disconnected = retire(&old).await;
    info!(
        export = def.name,
        disconnected, "reload: description or access rules changed"
    );
    true
}

enum Replaced {
    Yes,
    KeptOld,
    Gone,
}

/// Serves `def` in place of the export of that name, opening its image anew.
async fn replace(exports: &Exports, def: &ExportDef) -> Replaced {
    let Some(old) = exports.get(&def.name) else {
        return if add(exports, def).await {
            Replaced::Yes
        } else {
            Replaced::Gone
        };
    };
    if same_file(&old, &def.image) {
        return reopen_in_place(exports, old, def).await;
    }
    let export = match open(def).await {
        Ok(export) => export,
        Err(e) => {
            error!(
                export = def.name,
                "reload: cannot open the new definition, still serving the old one: {e}"
            );
            return Replaced::KeptOld;
        }
    };
    exports.insert(export);
    let disconnected = retire(&old).await;
    info!(
        export = def.name,
        disconnected, "reload: export changed, serving {}", def.image
    );
    Replaced::Yes
}

/// The old export keeps its file locked, so it goes first; then the file is opened
/// again. Refused while snapshots or restore points of the image are served, which keep
/// it open.
async fn reopen_in_place(exports: &Exports, old: Arc<Export>, def: &ExportDef) -> Replaced {
    let snapshots: Vec<String> = exports
        .all()
        .iter()
        .filter(|e| {
            matches!(e.source(),
                Source::Snapshot { export, .. } | Source::Point { export, .. }
                    if *export == def.name)
        })
        .map(|e| e.name().to_owned())
        .collect();
    if !snapshots.is_empty() {
        error!(
            export = def.name,
            "reload: the export's snapshots or restore points are served ({}); remove \
             them to change how its image is opened. Still serving the old definition",
            snapshots.join(", ")
        );
        return Replaced::KeptOld;
    }
    exports.remove(&def.name);
    let disconnected = retire(&old).await;
    drop(old);
    // Sessions and handshakes drop their references to the old export right after
    // they end; until then its file is still locked.
    let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
    let export = loop {
        match open(def).await {
            Ok(export) => break export,
            Err(e) if e.kind() == ErrorKind::Busy && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                error!(
                    export = def.name,
                    "reload: the export was closed to reopen its image, which failed; \
                     it is no longer served: {e}"
                );
                return Replaced::Gone;
            }
        }
    };
    exports.insert(export);
    info!(
        export = def.name,
        disconnected, "reload: export reopened, serving {}", def.image
    );
    Replaced::Yes
}

/// True when `spec` names the file `export` serves (which it may hold locked).
fn same_file(export: &Export, spec: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = export.image_path() else {
        return false;
    };
    if spec.starts_with("memory:") {
        return false;
    }
    match (std::fs::metadata(path), std::fs::metadata(Path::new(spec))) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => path == Path::new(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Access;

    fn def(name: &str, image: &str) -> ExportDef {
        ExportDef::new(name, image, false, None, "", Access::open())
    }

    #[test]
    fn plans_each_export_by_what_changed() {
        let running = vec![
            def("same", "memory:1M"),
            def("described", "memory:1M"),
            def("moved", "/a.raw"),
            def("gone", "memory:1M"),
            def("ro", "/b.raw"),
        ];
        let mut described = def("described", "memory:1M");
        described.description = "now with words".into();
        let mut ro = def("ro", "/b.raw");
        ro.read_only = true;
        let mut guarded = def("same", "memory:1M");
        guarded.access = Access::new(vec!["unix".parse().unwrap()], vec![]);
        let new = vec![
            def("same", "memory:1M"),
            described,
            def("moved", "/c.raw"),
            ro,
            def("fresh", "memory:1M"),
            def("from-api", "memory:1M"),
        ];
        let steps = plan(&running, &new, |name| name == "from-api");
        assert_eq!(
            steps,
            vec![
                ("gone".to_owned(), Step::Remove),
                ("same".to_owned(), Step::Keep),
                ("described".to_owned(), Step::Present),
                ("moved".to_owned(), Step::Reopen),
                ("ro".to_owned(), Step::Reopen),
                ("fresh".to_owned(), Step::Add),
                ("from-api".to_owned(), Step::TakeOver),
            ]
        );
        let steps = plan(&running, &[guarded], |_| false);
        assert!(
            steps.contains(&("same".to_owned(), Step::Present)),
            "{steps:?}"
        );
    }

    fn memory_export(name: &str) -> Export {
        open_export(name, "memory:1M", false, None, "").unwrap()
    }

    #[tokio::test]
    async fn applies_a_plan_to_the_registry() {
        let exports = Exports::new();
        let running = vec![
            def("a", "memory:1M"),
            def("b", "memory:1M"),
            def("c", "memory:1M"),
        ];
        for d in &running {
            exports.insert(memory_export(&d.name));
        }
        exports.insert(memory_export("api"));
        exports.insert(memory_export("api2"));
        let a = exports.get("a").unwrap();
        let b = exports.get("b").unwrap();
        let c = exports.get("c").unwrap();
        let mut a_closed = a.closed();
        let mut b_closed = b.closed();
        let c_closed = c.closed();

        let mut b2 = def("b", "memory:1M");
        b2.description = "described".into();
        let new = vec![
            def("c", "memory:1M"),
            b2.clone(),
            def("d", "memory:2M"),
            def("api", "memory:3M"),
        ];
        let now = apply(&exports, &running, &new).await;
        assert_eq!(now, new);

        assert!(exports.get("a").is_none(), "removed");
        assert!(
            *a_closed.borrow_and_update(),
            "its sessions were told to end"
        );
        let b_now = exports.get("b").unwrap();
        assert_eq!(b_now.description(), "described");
        assert!(
            Arc::ptr_eq(b_now.backend(), b.backend()),
            "the open disk is reused"
        );
        assert!(*b_closed.borrow_and_update());
        assert!(Arc::ptr_eq(&exports.get("c").unwrap(), &c), "untouched");
        assert!(!*c_closed.borrow());
        assert_eq!(exports.get("d").unwrap().backend().size(), 2 << 20);
        assert_eq!(
            exports.get("api").unwrap().backend().size(),
            3 << 20,
            "taken over"
        );
        assert!(
            exports.get("api2").is_some(),
            "API exports the file does not name stay"
        );
        assert_eq!(
            exports.get("").unwrap().name(),
            "c",
            "the file's first export is the default"
        );

        // An export of the file removed behind its back comes back at the next reload.
        exports.remove("d");
        let again = apply(&exports, &now, &new).await;
        assert_eq!(again, new);
        assert!(exports.get("d").is_some());
        assert!(
            Arc::ptr_eq(&exports.get("c").unwrap(), &c),
            "still untouched"
        );
    }

    #[tokio::test]
    async fn a_definition_that_cannot_be_opened_keeps_the_old_export() {
        let exports = Exports::new();
        let running = vec![def("a", "memory:1M")];
        exports.insert(memory_export("a"));
        let a = exports.get("a").unwrap();
        let new = vec![
            def("a", "/nonexistent/image.raw"),
            def("b", "/nonexistent/b.raw"),
        ];
        let now = apply(&exports, &running, &new).await;
        assert_eq!(now, running, "the old definition is what runs");
        assert!(Arc::ptr_eq(&exports.get("a").unwrap(), &a));
        assert!(!*a.closed().borrow());
        assert!(exports.get("b").is_none());
    }

    #[tokio::test]
    async fn reopens_a_file_the_old_export_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.strata");
        crate::image::create(
            &path,
            &crate::image::CreateOptions {
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let spec = path.display().to_string();
        let exports = Exports::new();
        let running = vec![def("d", &spec)];
        exports.insert(open_export("d", &spec, false, None, "").unwrap());
        let mut ro = def("d", &spec);
        ro.read_only = true;
        let now = apply(&exports, &running, std::slice::from_ref(&ro)).await;
        assert_eq!(now, vec![ro]);
        assert!(exports.get("d").unwrap().read_only());
    }
}
