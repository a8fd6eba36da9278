//! The Virtualization.framework driver (macOS only).
