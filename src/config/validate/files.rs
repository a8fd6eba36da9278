//! What is at a path, as far as validation cares. Asked through a trait, so that
//! validation stays a pure function and tests can give a fixed answer.

use std::path::{Path, PathBuf};

use crate::config::error::Problems;
use crate::config::overrides::Setting;

/// What a path names, as far as validation cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
    /// A directory.
    Directory,
    /// Something else (a socket, a FIFO, ...).
    Other,
    /// Nothing.
    Missing,
    /// It cannot be looked at (permissions, I/O); the reason.
    Unreadable(String),
}

/// Answers what is at a path, so that validation can say a file is missing without
/// doing I/O itself.
pub trait Files {
    /// What `path` names, following symbolic links.
    fn kind(&self, path: &Path) -> FileKind;
}

/// [`Files`] of the real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemFiles;

impl Files for SystemFiles {
    fn kind(&self, path: &Path) -> FileKind {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => FileKind::File,
            Ok(m) if m.file_type().is_block_device() => FileKind::BlockDevice,
            Ok(m) if m.is_dir() => FileKind::Directory,
            Ok(_) => FileKind::Other,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileKind::Missing,
            Err(e) => FileKind::Unreadable(e.to_string()),
        }
    }
}

/// Reports a path setting that does not name a regular file (when `files` can tell).
pub(super) fn check_regular_file(
    setting: &Setting<Option<PathBuf>>,
    files: Option<&dyn Files>,
    problems: &mut Problems,
) {
    let (Some(path), Some(files)) = (&setting.value, files) else {
        return;
    };
    let problem = match files.kind(path) {
        FileKind::File => return,
        FileKind::Missing => format!("file {} does not exist", path.display()),
        FileKind::Unreadable(why) => format!("cannot look at {}: {why}", path.display()),
        FileKind::Directory | FileKind::BlockDevice | FileKind::Other => {
            format!("{} is not a regular file", path.display())
        }
    };
    problems.add(setting.at.clone(), setting.name.clone(), problem);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn missing_files_are_reported_where_they_are_named() {
        let text = r#"
[tls]
cert = "cert.pem"
key = "key.pem"
client_ca = "/etc/ssl"

[control]
listen = "127.0.0.1:10810"
token_file = "/etc/strata/nothing"

[[exports]]
name = "vm1"
image = "/tank/vm1.strata"

[[exports]]
name = "vm2"
image = "/x"

[[exports]]
name = "vm3"
image = "/tank"
"#;
        let files = Fake(vec![
            ("/etc/strata/key.pem", FileKind::Missing),
            ("/etc/ssl", FileKind::Directory),
            ("/etc/strata/nothing", FileKind::Missing),
            ("/x", FileKind::Missing),
            ("/tank", FileKind::Directory),
        ]);
        assert_eq!(
            errors_with(text, &Overrides::default(), &files),
            vec![
                "/etc/strata/strata.toml:4:7: tls.key: file /etc/strata/key.pem does not exist",
                "/etc/strata/strata.toml:5:13: tls.client_ca: /etc/ssl is not a regular file",
                "/etc/strata/strata.toml:9:14: control.token_file: file /etc/strata/nothing does not exist",
                "/etc/strata/strata.toml:17:9: exports[1].image: file /x does not exist",
                "/etc/strata/strata.toml:21:9: exports[2].image: /tank is a directory, not an \
                 image, raw file or block device",
            ]
        );
    }
}
