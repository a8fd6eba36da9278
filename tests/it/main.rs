//! Strata's integration tests, in one test binary: each module was once a test target of
//! its own, and they share the helpers under `support`.

mod support;

mod backend_conformance;
mod cli;
mod codec_corpus;
mod codec_golden;
mod codec_handshake;
mod codec_roundtrip;
mod codec_validate;
mod config;
mod control_api;
mod deploy;
mod faults;
mod history;
mod history_served;
mod hostile;
mod image_cli;
mod image_crash;
mod image_engine;
mod interop_fio;
mod interop_images;
mod interop_libnbd;
mod interop_nbd_crate;
mod interop_nbdsh;
mod interop_qemu;
mod interop_server;
mod interop_snapshots;
#[cfg(feature = "tls")]
mod interop_tls;
mod layers;
mod limits;
mod protocol;
mod snapshot_crash;
mod snapshot_model;
mod snapshot_online;
mod soak;
mod vm_e2e;
