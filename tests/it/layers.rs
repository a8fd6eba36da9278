//! The crate's layering, as docs/architecture.md draws it, checked on the source: every
//! top-level module imports only modules of lower layers (so there is no cycle), the
//! protocol stays free of I/O, and a few boundaries inside modules hold.
//!
//! Imports are read as `crate::NAME` paths (in `use` lines, groups `use crate::{a, b}`
//! and inline paths) and `super::NAME` paths, outside comments and `#[cfg(test)]`
//! modules.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import the modules of the layers below its
/// own, never those of its own layer or above.
const LAYERS: &[&[&str]] = &[
    &["error", "sys", "failpoint"],
    &["size", "names", "block", "mapping", "access", "time"],
    &["proto"],
    &["image"],
    &["history"],
    &["backend"],
    &["volume", "api"],
    &["server"],
    &["config"],
    &["daemon", "vm"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its unit-test modules: a
/// `#[cfg(test)] mod NAME { ... }` ends the file's code (the modules put their unit tests
/// last), a `#[cfg(test)] mod NAME;` line is skipped, and [`test_only_files`] are left
/// out whole.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            let next = lines.peek().map_or("", |l| l.trim_start());
            if next.starts_with("mod ") && next.ends_with(';') {
                lines.next();
                continue;
            }
            if next.starts_with("mod ") {
                break;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Files that are unit-test modules of their own (declared `#[cfg(test)] mod NAME;`).
fn test_only_files(sources: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (rel, text) in sources {
        let dir = match rel.rsplit_once('/') {
            Some((dir, "mod.rs")) => format!("{dir}/"),
            Some((dir, file)) => format!("{dir}/{}/", file.trim_end_matches(".rs")),
            None if rel == "lib.rs" || rel == "main.rs" => String::new(),
            None => format!("{}/", rel.trim_end_matches(".rs")),
        };
        let mut lines = text.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if line.starts_with("#[cfg(test)]")
                && let Some(next) = lines.next()
                && let Some(name) = next.strip_prefix("mod ").and_then(|n| n.strip_suffix(';'))
            {
                out.insert(format!("{dir}{name}.rs"));
            }
        }
    }
    out
}

/// The names that follow `prefix` in `code`, e.g. `backend` in `crate::backend::Foo`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

struct Source {
    /// Path below src/, with `/` separators.
    rel: String,
    code: String,
}

fn sources() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    files.sort();
    let texts: Vec<(String, String)> = files
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&src).unwrap().to_string_lossy();
            (
                rel.replace('\\', "/"),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect();
    let tests = test_only_files(&texts);
    texts
        .into_iter()
        .filter(|(rel, _)| !tests.contains(rel))
        .map(|(rel, text)| Source {
            code: code_of(&text),
            rel,
        })
        .collect()
}

/// The top-level module a file belongs to (`server` for `server/session/mod.rs`), or
/// None for the crate root, the binary and the command line.
fn module_of(rel: &str) -> Option<&str> {
    let top = rel.split('/').next().unwrap().trim_end_matches(".rs");
    (!matches!(top, "lib" | "main" | "cli")).then_some(top)
}

#[test]
fn every_module_imports_only_lower_layers() {
    let mut problems = Vec::new();
    for s in sources() {
        let Some(module) = module_of(&s.rel) else {
            continue;
        };
        let Some(own) = layer_of(module) else {
            problems.push(format!("{}: module {module} is in no layer", s.rel));
            continue;
        };
        for name in names_after(&s.code, "crate::") {
            if name == module || name.chars().next().is_some_and(char::is_uppercase) {
                // Within the module, or a type the crate root re-exports (`crate::Result`).
                continue;
            }
            match layer_of(&name) {
                Some(l) if l < own => {}
                Some(_) => problems.push(format!(
                    "{}: {module} (layer {own}) imports {name}, which is not below it",
                    s.rel
                )),
                None => problems.push(format!("{}: imports crate::{name}, in no layer", s.rel)),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_protocol_does_no_io() {
    for s in sources().iter().filter(|s| s.rel.starts_with("proto/")) {
        for forbidden in ["tokio", "std::net", "std::fs", "std::time::Instant"] {
            assert!(
                !s.code.contains(forbidden),
                "{} uses {forbidden}: the protocol layer is pure",
                s.rel
            );
        }
    }
}

#[test]
fn boundaries_inside_modules_hold() {
    let sources = sources();
    let find = |rel: &str| {
        sources
            .iter()
            .find(|s| s.rel == rel)
            .unwrap_or_else(|| panic!("src/{rel} is gone: update this test"))
    };
    // Metrics render samples; exports own their counters and take samples of them.
    let metrics = find("server/metrics.rs");
    assert!(
        !names_after(&metrics.code, "super::").contains("export")
            && !metrics.code.contains("server::export"),
        "server/metrics.rs imports server/export.rs"
    );
    // The launcher's drivers report through vm/mod.rs, not through the launcher.
    for s in sources.iter().filter(|s| {
        s.rel.starts_with("vm/") && !s.rel.starts_with("vm/launcher/") && s.rel != "vm/mod.rs"
    }) {
        assert!(
            !s.code.contains("launcher::"),
            "{} imports the launcher, which imports the drivers",
            s.rel
        );
    }
}

#[test]
fn the_layer_check_reads_imports_as_written() {
    let code = code_of(
        "use crate::error::{Error, Result};\n\
         use crate::{backend, image::Chain};\n\
         // use crate::server;\n\
         #[cfg(test)]\nmod testing;\n\
         fn f() -> crate::block::Extent { todo() }\n\
         use super::export;\n\
         #[cfg(test)]\nmod tests {\n    use crate::vm;\n}\n",
    );
    assert_eq!(
        names_after(&code, "crate::"),
        ["backend", "block", "error", "image"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        names_after(&code, "super::"),
        ["export"].map(String::from).into()
    );
    let files = [
        ("config/mod.rs", "#[cfg(test)]\nmod testing;\n"),
        ("api/mod.rs", "#[cfg(test)]\nmod tests;\n"),
        ("size.rs", "#[cfg(test)]\nmod tests {\n}\n"),
    ]
    .map(|(r, t)| (r.to_owned(), t.to_owned()));
    assert_eq!(
        test_only_files(&files),
        ["api/tests.rs", "config/testing.rs"]
            .map(String::from)
            .into()
    );
}
