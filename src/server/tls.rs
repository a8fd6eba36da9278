//! TLS for `NBD_OPT_STARTTLS`: certificates and keys from PEM files, the upgrade of an
//! accepted connection, and the identity of a verified client certificate.
//!
//! Built on rustls with the ring provider, behind the `tls` cargo feature. Without the
//! feature the types still exist, so the command line and the server are the same code,
//! but [`TlsSettings::load`] refuses with a clear error.

use std::fmt;
use std::path::PathBuf;

#[cfg(not(feature = "tls"))]
use crate::error::{Error, ErrorKind, Result};

/// The files a TLS server is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to. When set, every TLS
    /// client must present a certificate signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A loaded TLS server configuration, cheap to clone and shared by every connection.
#[derive(Clone)]
pub struct TlsSettings {
    #[cfg(feature = "tls")]
    acceptor: tokio_rustls::TlsAcceptor,
    verifies_clients: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// True when clients must present a certificate signed by the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }
}

/// True when this build can serve TLS (the `tls` cargo feature).
pub const AVAILABLE: bool = cfg!(feature = "tls");

#[cfg(not(feature = "tls"))]
impl TlsSettings {
    /// Always fails: this build has no TLS.
    pub fn load(_files: &TlsFiles) -> Result<Self> {
        Err(Error::msg(
            ErrorKind::NotSupported,
            "this strata was built without TLS support (the `tls` cargo feature)",
        ))
    }
}

#[cfg(feature = "tls")]
pub use with_rustls::Upgraded;

#[cfg(feature = "tls")]
mod with_rustls {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::server::WebPkiClientVerifier;
    use tracing::debug;

    use super::{TlsFiles, TlsSettings};
    use crate::access::ClientIdentity;
    use crate::error::{Error, ErrorKind, Result};
    use crate::server::listener::Stream;

    /// A connection after a successful TLS handshake.
    pub type Upgraded = tokio_rustls::server::TlsStream<Stream>;

    const CERTIFICATE: &str = "a PEM 'BEGIN CERTIFICATE' section";
    const KEY: &str =
        "a PEM 'BEGIN PRIVATE KEY', 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY' section";

    fn file_error(what: &str, expected: &str, path: &Path, e: pem::Error) -> Error {
        let detail = match e {
            pem::Error::Io(e) => {
                return Error::from(e)
                    .with_message(format!("cannot read the {what} file {}", path.display()));
            }
            pem::Error::NoItemsFound => format!("found no {what} in it (expected {expected})"),
            other => other.to_string(),
        };
        Error::msg(
            ErrorKind::InvalidInput,
            format!("bad {what} file {}: {detail}", path.display()),
        )
    }

    fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
            .map_err(|e| file_error(what, CERTIFICATE, path, e))?;
        if certs.is_empty() {
            return Err(file_error(
                what,
                CERTIFICATE,
                path,
                pem::Error::NoItemsFound,
            ));
        }
        Ok(certs)
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    impl TlsSettings {
        /// Reads the certificate chain, the key and the client CA, and checks that they
        /// make a working server. Every error names the file at fault.
        pub fn load(files: &TlsFiles) -> Result<Self> {
            let chain = certificates("TLS certificate", &files.cert)?;
            let key = PrivateKeyDer::from_pem_file(&files.key)
                .map_err(|e| file_error("TLS private key", KEY, &files.key, e))?;
            let builder = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::msg(ErrorKind::InvalidInput, e.to_string()))?;
            let builder = match &files.client_ca {
                None => builder.with_no_client_auth(),
                Some(path) => {
                    let mut roots = RootCertStore::empty();
                    for cert in certificates("TLS client CA", path)? {
                        roots.add(cert).map_err(|e| {
                            Error::msg(
                                ErrorKind::InvalidInput,
                                format!("bad TLS client CA file {}: {e}", path.display()),
                            )
                        })?;
                    }
                    let verifier =
                        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                            .build()
                            .map_err(|e| {
                                Error::msg(
                                    ErrorKind::InvalidInput,
                                    format!("bad TLS client CA file {}: {e}", path.display()),
                                )
                            })?;
                    builder.with_client_cert_verifier(verifier)
                }
            };
            let config = builder.with_single_cert(chain, key).map_err(|e| {
                let e = match e {
                    rustls::Error::InconsistentKeys(_) => {
                        "the key does not belong to the certificate".to_owned()
                    }
                    other => other.to_string(),
                };
                Error::msg(
                    ErrorKind::InvalidInput,
                    format!(
                        "TLS certificate {} and key {} do not make a server: {e}",
                        files.cert.display(),
                        files.key.display()
                    ),
                )
            })?;
            Ok(TlsSettings {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                verifies_clients: files.client_ca.is_some(),
            })
        }

        /// Runs the TLS handshake on `stream`, right after the `STARTTLS` reply. Returns
        /// the encrypted stream and, when client certificates are verified, the client's
        /// identity.
        pub async fn accept(
            &self,
            stream: Stream,
        ) -> std::io::Result<(Upgraded, Option<ClientIdentity>)> {
            let tls = self.acceptor.accept(stream).await?;
            let session = tls.get_ref().1;
            debug!(
                version = ?session.protocol_version(),
                suite = ?session.negotiated_cipher_suite().map(|s| s.suite()),
                "TLS handshake done"
            );
            let identity = match session.peer_certificates() {
                Some([leaf, ..]) if self.verifies_clients => {
                    Some(ClientIdentity::from_der(leaf).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    })?)
                }
                _ => None,
            };
            Ok((tls, identity))
        }
    }
}
