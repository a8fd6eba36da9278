//! Turning history on for an existing Strata image, in place: the image becomes the
//! read-only base of a new volume with history at the same path.
//!
//! The image file is renamed `NAME.before-history` in its directory (so the backing
//! references it holds, relative to that directory, keep their meaning), then the
//! volume is made at `NAME` over it. A crash between the two leaves the image under its
//! new name, which running the command again picks up.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::image::{self, Format, snapshot};

use super::engine::{CreateHistory, DEFAULT_SEGMENT_BYTES, History, is_volume};
use super::manifest::Manifest;

/// Where the image goes: `NAME.before-history` beside it.
pub fn renamed(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".before-history");
    image.with_file_name(name)
}

/// Turns `image` into a volume with history keeping points for `window`, at most
/// `max_bytes` of them. Refused for an image in use, one with snapshots, or a file
/// that is not a Strata image.
pub fn enable(
    image: &Path,
    window: std::time::Duration,
    max_bytes: Option<u64>,
) -> Result<Manifest> {
    let base = renamed(image);
    if is_volume(image) {
        return Err(
            Error::msg(ErrorKind::AlreadyExists, "already a volume with history").with_path(image),
        );
    }
    if image.exists() {
        if base.exists() {
            return Err(Error::msg(
                ErrorKind::AlreadyExists,
                format!("{} exists: move it away first", base.display()),
            )
            .with_path(image));
        }
        if image::probe(image)? != Format::Strata {
            return Err(Error::msg(
                ErrorKind::InvalidInput,
                "not a Strata image (for a raw file, create a volume over it: strata create VOL --backing FILE --history ...)",
            )
            .with_path(image));
        }
        {
            // Takes the image's exclusive lock: refused while something serves it.
            let chain = image::open(image, true)?;
            if !snapshot::in_chain(&chain).is_empty() {
                return Err(Error::msg(
                    ErrorKind::NotSupported,
                    "the image has snapshots: delete them (strata snapshot delete) before turning history on",
                )
                .with_path(image));
            }
        }
        std::fs::rename(image, &base)
            .map_err(|e| Error::from(e).with_op("rename").with_path(image))?;
    } else if !base.exists() {
        return Err(Error::msg(ErrorKind::NotFound, "no such image").with_path(image));
    }
    let made = History::create(
        image,
        &CreateHistory {
            size: None,
            base: Some(base.clone()),
            window,
            max_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        },
    );
    if made.is_err() && !image.exists() {
        let _ = std::fs::rename(&base, image);
    }
    made
}
