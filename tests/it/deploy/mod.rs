//! `strata serve` deployed as a service: a configuration with several exports served to
//! real clients, and exports that require TLS (`exports`), reloads on SIGHUP, good and
//! bad (`reload`), socket activation over TCP and Unix sockets and readiness
//! notifications (`service_manager`), the pid file, exit statuses and JSON logs
//! (`process`).
//!
//! Every server listens on loopback or on Unix sockets in a temporary directory, every
//! wait is bounded, and nothing asserts how long anything took.

mod exports;
mod process;
mod reload;
mod service_manager;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::support::Endpoint;
use crate::support::client::{Client, Stream};
use crate::support::daemon::Daemon;
use crate::support::spec::{
    C_FIXED_NO_ZEROES, CMD_WRITE, OPT_GO, OPT_LIST, REP_ACK, REP_ERR_UNKNOWN, REP_SERVER,
};
use crate::support::wire::info_data;

/// A temporary directory for a server: its configuration file and images.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::Builder::new()
                .prefix("strata-deploy-")
                .tempdir()
                .unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw image of `len` bytes of `fill`.
    fn raw(&self, name: &str, len: usize, fill: u8) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, vec![fill; len]).unwrap();
        path
    }

    /// Writes `strata.toml` and returns its path.
    fn config(&self, text: &str) -> PathBuf {
        let path = self.path("strata.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes `strata.toml` and serves it: the server, and the TCP address it listens on.
    fn serve(&self, text: &str) -> (Daemon, SocketAddr) {
        let mut server = Daemon::serve_config(&self.config(text), &[]);
        let addr = server.tcp_addr();
        (server, addr)
    }
}

/// A configuration that listens on a TCP port of its choice and serves each
/// `(name, image)`, one line a setting and no blank lines (so that a test can name the
/// line of any field).
fn exports_toml(exports: &[(&str, &str)]) -> String {
    let mut text = String::from("listen = [\"127.0.0.1:0\"]\n");
    for (name, image) in exports {
        text.push_str(&format!(
            "[[exports]]\nname = \"{name}\"\nimage = \"{image}\"\n"
        ));
    }
    text
}

/// The names `NBD_OPT_LIST` returns.
fn list(addr: SocketAddr) -> Vec<String> {
    let mut c = Client::tcp(addr).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_LIST, &[]).unwrap();
    let (ack, servers) = replies.split_last().unwrap();
    assert_eq!(ack.ty, REP_ACK);
    servers
        .iter()
        .map(|r| {
            assert_eq!(r.ty, REP_SERVER);
            let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect()
}

/// `NBD_OPT_GO` for `name` must fail as for an unknown export.
#[track_caller]
fn assert_unknown(addr: SocketAddr, name: &str) {
    let mut c = Client::tcp(addr).unwrap();
    c.greet(C_FIXED_NO_ZEROES).unwrap();
    let replies = c.opt(OPT_GO, &info_data(name, &[])).unwrap();
    assert_eq!(
        replies.last().unwrap().ty,
        REP_ERR_UNKNOWN,
        "{name} should not be visible"
    );
}

fn write_ok(c: &mut Client, offset: u64, data: &[u8]) {
    assert_eq!(
        c.command(0, CMD_WRITE, offset, data.len() as u64, data)
            .unwrap(),
        0,
        "write at {offset}"
    );
}

/// A client of the `nbd` crate over a Unix socket: `NBD_OPT_EXPORT_NAME`, simple replies.
fn unix_client(path: &Path, name: &str) -> nbd::client::NbdClient<Stream> {
    let mut s = Endpoint::Unix(path.to_path_buf()).connect().unwrap();
    let export = nbd::client::handshake(&mut s, name.as_bytes()).unwrap();
    nbd::client::NbdClient::new(s, &export)
}
