//! TLS with rustls (the ring provider): certificates and keys read from
//! PEM files, servers that may require a client certificate from a CA
//! (mTLS), and the app a client certificate names.
//!
//! **Identity.** A verified client certificate names its app in its
//! subject's Common Name (`CN=checkout`). Where mTLS is on, that name is
//! the caller's app for registration rights and access rules; what a
//! caller writes about itself (a Hello's app, the `tern.app` attachment)
//! must agree with it or is refused.
//!
//! **Reloading.** [`ServerTls::reload`] reads the files again; connections
//! accepted afterwards use the new certificate, open ones keep theirs. A
//! file that fails to load leaves the previous configuration in place.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use super::Stream;

/// A TLS file that could not be used, or a configuration rustls refused.
#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {}: {reason}", path.display())]
pub struct TlsError {
    /// Which file: "certificate", "key", "CA".
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// ring: small, quick to build, and no cmake. rustls 0.23.48 deprecates
/// it for lacking post-quantum key exchange (aws-lc-rs has it, at several
/// times the build time); revisit when that matters more than the build.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".to_owned()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError {
        what: "key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("CA", path)? {
        roots.add(cert).map_err(|e| TlsError {
            what: "CA",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The app a certificate names: its subject's Common Name.
pub fn app_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The files a TLS server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, this server's first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates: when set, every client must present a
    /// certificate they issued (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// A TLS server's configuration, shared by its clones and reloadable.
#[derive(Debug, Clone)]
pub struct ServerTls {
    files: Arc<ServerTlsFiles>,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Reads `files`.
    ///
    /// # Errors
    ///
    /// A file that is missing or holds no usable certificate or key, named.
    pub fn new(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let config = Self::load(&files)?;
        Ok(ServerTls {
            files: Arc::new(files),
            config: Arc::new(RwLock::new(config)),
        })
    }

    fn load(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certs("certificate", &files.cert)?;
        let key = key(&files.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions");
        let builder = match &files.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| TlsError {
                        what: "CA",
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError {
            what: "key",
            path: files.key.clone(),
            reason: format!("does not fit the certificate {}: {e}", files.cert.display()),
        })?;
        // gRPC clients ask for HTTP/2 by ALPN; native clients ask for nothing.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads the files again. On an error the configuration in use stays.
    ///
    /// # Errors
    ///
    /// As [`ServerTls::new`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Self::load(&self.files)?;
        *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }

    /// The files it reads.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate (mTLS).
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The server side of a handshake on `tcp`. Bound it with a timeout:
    /// a client that stops half-way holds it.
    ///
    /// # Errors
    ///
    /// The handshake failed (no certificate where one is required, one from
    /// another CA, not TLS at all): rustls's reason.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let config = self
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        let peer_app = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(app_of)
            .map(Arc::from);
        Ok(Stream::tls(tls.into(), peer_app))
    }
}

/// A TLS client's configuration: the CA its servers' certificates come
/// from, and optionally its own certificate (for servers that verify
/// clients). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Trusts servers whose certificates `ca` issued; presents no
    /// certificate of its own.
    ///
    /// # Errors
    ///
    /// The CA file is missing or holds no certificate.
    pub fn new(ca: impl AsRef<Path>) -> Result<ClientTls, TlsError> {
        Self::build(ca.as_ref(), None)
    }

    /// Trusts servers whose certificates `ca` issued, and presents `cert`
    /// (whose subject's Common Name is this node's app) with `key`.
    ///
    /// # Errors
    ///
    /// A file is missing or unusable, or the key does not fit.
    pub fn with_identity(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<ClientTls, TlsError> {
        Self::build(ca.as_ref(), Some((cert.as_ref(), key.as_ref())))
    }

    fn build(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, key_path)) => builder
                .with_client_auth_cert(certs("certificate", cert)?, key(key_path)?)
                .map_err(|e| TlsError {
                    what: "key",
                    path: key_path.to_owned(),
                    reason: format!("does not fit the certificate {}: {e}", cert.display()),
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Checks every server's certificate against `name` instead of the
    /// host dialled (when servers share one certificate, or are dialled by
    /// IP while their certificates name them by DNS name).
    ///
    /// # Errors
    ///
    /// `name` is neither a DNS name nor an IP address.
    pub fn server_name(mut self, name: &str) -> Result<ClientTls, TlsError> {
        let parsed = ServerName::try_from(name.to_owned()).map_err(|e| TlsError {
            what: "server name",
            path: PathBuf::from(name),
            reason: e.to_string(),
        })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// The client side of a handshake on `tcp` with `host` (a DNS name or
    /// an IP address, checked against the server's certificate unless a
    /// [`ClientTls::server_name`] is set). Bound it with a timeout.
    ///
    /// # Errors
    ///
    /// The handshake failed (a certificate the CA did not issue, one for
    /// another name): rustls's reason.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<Stream> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match host.parse::<IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(host.to_owned())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))?,
                }
            }
        };
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await?;
        Ok(Stream::tls(tls.into(), None))
    }
}

/// Splits `host:port` into the host, for [`ClientTls::connect`].
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}
