//! A Strata server running inside the test process, on an ephemeral loopback port, for
//! tests that configure the library directly (timeouts, limits, backends) rather than
//! through the command line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use strata::backend::SharedBackend;
use strata::server::{Export, Exports, ListenAddr, Listener, Server, ServerConfig, ShutdownHandle};

use super::client::Client;

/// A server on its own runtime and thread, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<strata::Result<()>>>,
    thread_name: String,
}

impl TestServer {
    /// Serves `backend` as the export `disk`.
    pub fn start(backend: SharedBackend, config: ServerConfig) -> TestServer {
        Self::start_named("disk", backend, config)
    }

    pub fn start_named(name: &str, backend: SharedBackend, config: ServerConfig) -> TestServer {
        let exports = Arc::new(Exports::new());
        exports.insert(Export::new(name, "a test disk", backend));
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let thread_name = format!("test-server-{}", SERVERS.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(&thread_name)
            .enable_all()
            .build()
            .unwrap();
        let main = std::thread::Builder::new().name(thread_name.clone());
        let thread = main.spawn(move || {
            runtime.block_on(async move {
                let listener = Listener::bind(&"127.0.0.1:0".parse::<ListenAddr>().unwrap())
                    .await
                    .unwrap();
                let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
                    unreachable!()
                };
                let server = Server::new(exports, config);
                tx.send((addr, server.shutdown_handle())).unwrap();
                server.serve(vec![listener]).await
            })
        });
        let (addr, handle) = rx.recv().unwrap();
        TestServer {
            addr,
            handle,
            thread: Some(thread.unwrap()),
            thread_name,
        }
    }

    /// Shuts the server down and returns what `serve` returned.
    pub fn stop(mut self) -> strata::Result<()> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }

    /// The name of every thread of the server: its panics are told from other tests' by it.
    pub fn thread_name(&self) -> &str {
        &self.thread_name
    }

    /// A new raw connection.
    pub fn connect(&self) -> Client {
        Client::tcp(self.addr).expect("connect to the in-process server")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sparse RAM disk of `size` bytes.
pub fn memory_backend(size: u64) -> SharedBackend {
    strata::backend::open(&format!("memory:{size}"), false).unwrap()
}
