//! TLS on both sides: the TLS listener (`[listen.tls]`) and connections to Redis
//! (`[upstream.tls]`), on rustls (TLS 1.2 and 1.3, the `ring` provider, no OpenSSL).
//!
//! Why a module of its own: certificates are *material*, not settings. They are read from
//! files, checked (PEM parses, the key matches the certificate), turned into rustls configs
//! once, and then used by every handshake. Keeping that here lets the rest of the code treat a
//! TLS stream like any other ([`crate::net::Stream`]) and lets the config stay plain data.
//!
//! Rotation: the loaded material lives inside the config ([`Loaded`], filled by
//! [`crate::config::Config::load_tls`]), and the config is already swapped atomically
//! (`ArcSwap`) on SIGHUP and on file changes, with the same rules as every other setting: a
//! file that does not load rejects the reload and the running material stays. A handshake
//! takes the material current when it starts, so connections already open are untouched and
//! new ones get the new certificates. The file watch also watches the certificate files
//! ([`watched_files`]).
//!
//! Failures say what happened: every handshake is counted by side, result and reason
//! (`stormwall_tls_handshakes_total`), and failures are logged (throttled).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientAuth, Config, ListenTlsConfig, UpstreamTlsConfig};
use crate::logging::Throttle;
use crate::net::Addr;

/// A load error: the setting (as written in the file) and what is wrong, naming the file.
type LoadError = (&'static str, String);

/// Material loaded from files, compared by what the files held (so a rotated certificate is
/// a config change, and an untouched one is not).
pub struct Loaded<T> {
    inner: Option<Arc<T>>,
    fingerprint: u64,
}

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Loaded {
            inner: self.inner.clone(),
            fingerprint: self.fingerprint,
        }
    }
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded {
            inner: None,
            fingerprint: 0,
        }
    }
}

impl<T: Fingerprinted> Loaded<T> {
    pub(crate) fn new(value: T) -> Loaded<T> {
        Loaded {
            fingerprint: value.fingerprint(),
            inner: Some(Arc::new(value)),
        }
    }
}

impl<T> Loaded<T> {
    /// The material, if the side is configured.
    pub fn get(&self) -> Option<&Arc<T>> {
        self.inner.as_ref()
    }
}

impl<T> PartialEq for Loaded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.inner.is_some() == other.inner.is_some() && self.fingerprint == other.fingerprint
    }
}

impl<T> std::fmt::Debug for Loaded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner {
            Some(_) => write!(f, "Loaded({:016x})", self.fingerprint),
            None => f.write_str("NotLoaded"),
        }
    }
}

/// What identifies loaded material: a hash of the files' contents and the settings used.
pub trait Fingerprinted {
    fn fingerprint(&self) -> u64;
}

/// When one configured certificate expires.
#[derive(Debug, Clone)]
pub struct Expiry {
    /// `client` (the listener's own certificate and the CA for client certificates) or
    /// `upstream`.
    pub side: &'static str,
    /// The file, as configured.
    pub file: String,
    /// The earliest `notAfter` among the file's certificates, in Unix seconds.
    pub not_after: i64,
}

/// The TLS listener's material: what handshakes with clients use.
pub struct ServerSide {
    pub(crate) acceptor: TlsAcceptor,
    pub expiry: Vec<Expiry>,
    fingerprint: u64,
}

impl Fingerprinted for ServerSide {
    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// The material for connections to Redis.
pub struct ClientSide {
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
    pub expiry: Vec<Expiry>,
    fingerprint: u64,
}

impl Fingerprinted for ClientSide {
    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file, feeding it to the fingerprint.
fn read(key: &'static str, path: &Path, hash: &mut DefaultHasher) -> Result<Vec<u8>, LoadError> {
    let bytes =
        std::fs::read(path).map_err(|e| (key, format!("cannot read {}: {e}", path.display())))?;
    path.hash(hash);
    bytes.hash(hash);
    Ok(bytes)
}

/// Every certificate in a PEM file (at least one).
fn certs(
    key: &'static str,
    path: &Path,
    hash: &mut DefaultHasher,
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let bytes = read(key, path, hash)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                key,
                format!("{}: not a valid PEM file: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((
            key,
            format!(
                "{}: no certificate (-----BEGIN CERTIFICATE-----) found",
                path.display()
            ),
        ));
    }
    for (i, cert) in certs.iter().enumerate() {
        if x509_parser::parse_x509_certificate(cert).is_err() {
            return Err((
                key,
                format!(
                    "{}: certificate {} is not a valid X.509 certificate",
                    path.display(),
                    i + 1
                ),
            ));
        }
    }
    Ok(certs)
}

/// The private key in a PEM file.
fn private_key(
    key: &'static str,
    path: &Path,
    hash: &mut DefaultHasher,
) -> Result<PrivateKeyDer<'static>, LoadError> {
    let bytes = read(key, path, hash)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        (
            key,
            format!("{}: no usable private key found ({e})", path.display()),
        )
    })
}

/// Checks that `key` belongs to the first certificate of `chain`.
fn check_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_file: &Path,
    key_file: &Path,
    key_setting: &'static str,
) -> Result<(), LoadError> {
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            (
                key_setting,
                format!("{}: unsupported private key: {e}", key_file.display()),
            )
        })?;
    rustls::sign::CertifiedKey::new(chain.to_vec(), signing)
        .keys_match()
        .map_err(|e| {
            (
                key_setting,
                format!(
                    "{} does not match the certificate in {}: {e}",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })
}

/// The earliest expiry among `certs`.
fn expiry(side: &'static str, file: &Path, certs: &[CertificateDer<'_>]) -> Option<Expiry> {
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
        .map(|not_after| Expiry {
            side,
            file: file.display().to_string(),
            not_after,
        })
}

fn roots(
    key: &'static str,
    path: &Path,
    hash: &mut DefaultHasher,
) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), LoadError> {
    let certs = certs(key, path, hash)?;
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| {
            (
                key,
                format!("{}: not usable as a CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok((store, certs))
}

impl ServerSide {
    /// Loads `[listen.tls]`'s files (only called when `listen.tls.address` is set, after
    /// validation made sure the files are named).
    pub(crate) fn load(cfg: &ListenTlsConfig) -> Result<ServerSide, LoadError> {
        let mut hash = DefaultHasher::new();
        let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
            return Err((
                "listen.tls.cert_file",
                "listen.tls.cert_file and listen.tls.key_file are required".into(),
            ));
        };
        let chain = certs("listen.tls.cert_file", cert_file, &mut hash)?;
        let key = private_key("listen.tls.key_file", key_file, &mut hash)?;
        check_pair(&chain, &key, cert_file, key_file, "listen.tls.key_file")?;
        let mut expiries: Vec<Expiry> = expiry("client", cert_file, &chain).into_iter().collect();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| ("listen.tls", e.to_string()))?;
        let builder = match (cfg.client_auth, &cfg.client_ca_file) {
            (ClientAuth::Off, _) | (_, None) => builder.with_no_client_auth(),
            (auth, Some(ca_file)) => {
                let (store, ca) = roots("listen.tls.client_ca_file", ca_file, &mut hash)?;
                expiries.extend(expiry("client", ca_file, &ca));
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider());
                let verifier = if auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                let verifier = verifier.build().map_err(|e| {
                    (
                        "listen.tls.client_ca_file",
                        format!("{}: {e}", ca_file.display()),
                    )
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        (cfg.client_auth as u8).hash(&mut hash);
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            (
                "listen.tls.cert_file",
                format!("{}: {e}", cert_file.display()),
            )
        })?;
        Ok(ServerSide {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            expiry: expiries,
            fingerprint: hash.finish(),
        })
    }
}

/// The host part of a `host:port` address, without IPv6 brackets.
fn host_of(addr: &Addr) -> Option<&str> {
    match addr {
        Addr::Tcp(hp) => hp
            .rsplit_once(':')
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']')),
        Addr::Unix(_) => None,
    }
}

impl ClientSide {
    /// Loads `[upstream.tls]` (only called when it is enabled).
    pub(crate) fn load(cfg: &UpstreamTlsConfig, address: &Addr) -> Result<ClientSide, LoadError> {
        let mut hash = DefaultHasher::new();
        let name = match (&cfg.server_name, host_of(address)) {
            (Some(name), _) => name.as_str(),
            (None, Some(host)) => host,
            (None, None) => {
                return Err((
                    "upstream.tls.server_name",
                    "is required: upstream.address has no host name".into(),
                ));
            }
        };
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| {
            (
                "upstream.tls.server_name",
                format!("`{name}` is not a valid DNS name or IP address: {e}"),
            )
        })?;
        name.hash(&mut hash);
        let mut expiries = Vec::new();
        let store = match &cfg.ca_file {
            Some(ca_file) => {
                let (store, ca) = roots("upstream.tls.ca_file", ca_file, &mut hash)?;
                expiries.extend(expiry("upstream", ca_file, &ca));
                store
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err((
                        "upstream.tls.ca_file",
                        format!(
                            "is unset and no system root certificates were found ({}); \
                             name a CA file",
                            found
                                .errors
                                .first()
                                .map(|e| e.to_string())
                                .unwrap_or_else(|| "none installed".into())
                        ),
                    ));
                }
                store
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| ("upstream.tls", e.to_string()))?;
        let builder = if cfg.insecure_skip_verify {
            true.hash(&mut hash);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            builder.with_root_certificates(store)
        };
        let mut config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = certs("upstream.tls.cert_file", cert_file, &mut hash)?;
                let key = private_key("upstream.tls.key_file", key_file, &mut hash)?;
                check_pair(&chain, &key, cert_file, key_file, "upstream.tls.key_file")?;
                expiries.extend(expiry("upstream", cert_file, &chain));
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    (
                        "upstream.tls.cert_file",
                        format!("{}: {e}", cert_file.display()),
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        // Resumption makes reconnects (spares, pins, an outage's end) cheaper.
        config.resumption = rustls::client::Resumption::in_memory_sessions(256);
        Ok(ClientSide {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            expiry: expiries,
            fingerprint: hash.finish(),
        })
    }
}

/// `upstream.tls.insecure_skip_verify`: accepts any certificate (signatures are still checked,
/// so the handshake itself is sound; who is at the other end is not).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate files a config names, for the file watch (a rotation that replaces the
/// files without touching the config file is still noticed).
pub fn watched_files(config: &Config) -> Vec<PathBuf> {
    let l = &config.listen.tls;
    let u = &config.upstream.tls;
    let mut files = Vec::new();
    if l.address.is_some() {
        files.extend(
            [&l.cert_file, &l.key_file, &l.client_ca_file]
                .into_iter()
                .flatten()
                .cloned(),
        );
    }
    if u.enabled {
        files.extend(
            [&u.ca_file, &u.cert_file, &u.key_file]
                .into_iter()
                .flatten()
                .cloned(),
        );
    }
    files
}

/// Every reason label of `stormwall_tls_handshakes_total` (failures; successes are `ok`).
pub const FAILURE_REASONS: &[&str] = &[
    "not_tls",
    "untrusted",
    "expired",
    "not_yet_valid",
    "name_mismatch",
    "bad_certificate",
    "no_client_certificate",
    "peer_rejected",
    "incompatible",
    "timeout",
    "closed",
    "io",
    "other",
];

/// Why a handshake failed, as a `reason` label.
pub fn failure_reason(e: &io::Error) -> &'static str {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => "not_tls",
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => "untrusted",
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "not_yet_valid"
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => "name_mismatch",
                _ => "bad_certificate",
            },
            rustls::Error::NoCertificatesPresented => "no_client_certificate",
            rustls::Error::AlertReceived(_) => "peer_rejected",
            rustls::Error::PeerIncompatible(_) => "incompatible",
            _ => "other",
        };
    }
    match e.kind() {
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => "closed",
        _ => "io",
    }
}

static FAILURE_LOG: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(5));

/// Counts one handshake (`side` = `client` | `upstream`) and logs a failure (throttled).
pub(crate) fn note_handshake(side: &'static str, peer: &str, result: &io::Result<()>) {
    match result {
        Ok(()) => {
            metrics::counter!("stormwall_tls_handshakes_total", "side" => side, "result" => "ok", "reason" => "")
                .increment(1);
        }
        Err(e) => {
            let reason = failure_reason(e);
            metrics::counter!("stormwall_tls_handshakes_total", "side" => side, "result" => "failed", "reason" => reason)
                .increment(1);
            if FAILURE_LOG.allow() {
                let what = match side {
                    "client" => "TLS handshake with a client failed",
                    _ => "TLS handshake with Redis failed",
                };
                tracing::warn!(side, peer, reason, error = %e, "{what}");
            }
        }
    }
}

/// Sets `stormwall_tls_certificate_expiry_seconds` for every configured certificate file.
pub fn publish_expiry(config: &Config) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let server = config.listen.tls.loaded.get().map(|s| s.expiry.as_slice());
    let client = config
        .upstream
        .tls
        .loaded
        .get()
        .map(|c| c.expiry.as_slice());
    for e in server.into_iter().chain(client).flatten() {
        metrics::gauge!("stormwall_tls_certificate_expiry_seconds", "side" => e.side, "file" => e.file.clone())
            .set((e.not_after - now) as f64);
    }
}

/// Warnings to log at start about TLS settings.
pub fn warnings(config: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if config.upstream.tls.enabled && config.upstream.tls.insecure_skip_verify {
        out.push(
            "upstream.tls.insecure_skip_verify is on: Redis's certificate is not verified, so \
             anyone on the network path can impersonate Redis and read or change the traffic",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_come_from_the_address() {
        assert_eq!(
            host_of(&Addr::Tcp("redis.internal:6380".into())),
            Some("redis.internal")
        );
        assert_eq!(host_of(&Addr::Tcp("[::1]:6380".into())), Some("::1"));
        assert_eq!(host_of(&Addr::Unix("/run/r.sock".into())), None);
    }

    #[test]
    fn io_errors_have_reasons() {
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "x");
        assert_eq!(failure_reason(&timeout), "timeout");
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(failure_reason(&tls), "untrusted");
        for r in [
            "not_tls",
            "untrusted",
            "expired",
            "name_mismatch",
            "no_client_certificate",
        ] {
            assert!(FAILURE_REASONS.contains(&r));
        }
    }
}
