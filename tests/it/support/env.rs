//! What the machine offers: CI or not, which server is under test, which external tools
//! are installed (a missing one skips a test loudly, or fails it under `CI=true`).

use std::net::{Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::spawn;

/// True when running under CI (`CI=true`): missing tools are failures there.
pub fn is_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Which server the tests drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// The strata binary built by cargo.
    Strata,
    /// nbdkit with the memory or file plugin, to validate test logic.
    Nbdkit,
}

/// The server selected by `STRATA_TEST_SERVER`.
pub fn server_kind() -> ServerKind {
    match std::env::var("STRATA_TEST_SERVER").as_deref() {
        Err(_) | Ok("") | Ok("strata") => ServerKind::Strata,
        Ok("nbdkit") => ServerKind::Nbdkit,
        Ok(other) => panic!("STRATA_TEST_SERVER={other:?}: expected `strata` or `nbdkit`"),
    }
}

/// For tests of behaviour only strata promises (its command line, its export naming):
/// returns false, loudly, when another server is under test.
pub fn strata_only(what: &str) -> bool {
    match server_kind() {
        ServerKind::Strata => true,
        kind => {
            eprintln!("SKIPPED ({kind:?} under test): {what} is strata-specific");
            false
        }
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A directory holding a `python3` that can `import nbd` (python3-libnbd), which nbdsh
/// needs. The first `python3` on PATH may be another interpreter (pyenv, venv) without
/// the module; Debian's `/usr/bin/python3` is tried next.
pub(super) fn python_with_libnbd_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = on_path("python3") {
            candidates.push(p);
        }
        candidates.push(PathBuf::from("/usr/bin/python3"));
        candidates.into_iter().find_map(|py| {
            let mut cmd = Command::new(&py);
            cmd.args(["-c", "import nbd"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let ok = spawn(&mut cmd)
                .and_then(|mut c| c.wait())
                .is_ok_and(|s| s.success());
            if ok {
                py.parent().map(Path::to_path_buf)
            } else {
                None
            }
        })
    })
    .clone()
}

fn tool_present(tool: &str) -> bool {
    match tool {
        // nbdsh is a python script: it needs python3-libnbd as well.
        "nbdsh" => on_path("nbdsh").is_some() && python_with_libnbd_dir().is_some(),
        "python3-libnbd" => python_with_libnbd_dir().is_some(),
        _ => on_path(tool).is_some(),
    }
}

/// Checks that every tool is installed. Missing under `CI=true`: panics (a hard failure,
/// never a silent skip). Missing elsewhere: prints a loud SKIPPED message and returns
/// false, and the test should return at once.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !tool_present(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "required tool(s) not installed: {} (scripts/test.sh installs them: qemu-utils, \
         libnbd-bin, python3-libnbd, nbdkit, fio)",
        missing.join(", ")
    );
    if is_ci() {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    false
}

/// Shorthand for one tool.
pub fn require_tool(tool: &str) -> bool {
    require_tools(&[tool])
}

/// `::1` can be bound here (IPv6 loopback is configured).
pub fn ipv6_loopback_available() -> bool {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// A memory-backed directory (`/dev/shm`), for tests of the zero-copy read paths.
/// Without one such tests are skipped (`None`), except under `CI=true`, where that is a
/// failure.
pub fn memory_dir() -> Option<&'static str> {
    const DIR: &str = "/dev/shm";
    match tempfile::tempdir_in(DIR) {
        Ok(_) => Some(DIR),
        Err(e) if is_ci() => {
            panic!("{DIR} is not usable, so the zero-copy paths cannot be tested: {e}")
        }
        Err(_) => None,
    }
}
