//! TLS listeners: a rustls server configuration from PEM files, built and
//! checked when the configuration loads, so that a bad certificate or key is
//! a configuration error and never a failure at the first client.
//!
//! rustls with the *ring* provider; TLS 1.2 and 1.3; ALPN `http/1.1` (the
//! gateway speaks HTTP/1.1 only, and WebSocket upgrades need it).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

/// What is wrong with a listener's `tls`, and which of its two keys to blame.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsFileError {
    /// The `cert` file.
    Cert(String),
    /// The `key` file.
    Key(String),
}

const CERT_HINT: &str = "`cert` must be a PEM file holding the server's certificate \
                         (-----BEGIN CERTIFICATE-----), then any intermediates";
const KEY_HINT: &str = "`key` must be a PEM file holding the certificate's private key, \
                        unencrypted (BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)";

/// A PEM syntax error in words (rustls prints markers as byte lists).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "no -----END {}----- line",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => {
            format!("malformed line {:?}", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    }
}

/// The provider every TLS listener uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read a certificate chain and its private key (PEM) into a server
/// configuration, checking that the key is usable and belongs to the
/// first certificate.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsFileError> {
    let cert_pem = std::fs::read(cert).map_err(|e| {
        TlsFileError::Cert(format!(
            "cannot read certificate file {}: {e}; {CERT_HINT}",
            cert.display()
        ))
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsFileError::Cert(format!(
                "{} is not valid PEM ({}); {CERT_HINT}",
                cert.display(),
                pem_error(&e)
            ))
        })?;
    if chain.is_empty() {
        let swapped = if PrivateKeyDer::from_pem_slice(&cert_pem).is_ok() {
            " (it holds a private key: are `cert` and `key` swapped?)"
        } else {
            ""
        };
        return Err(TlsFileError::Cert(format!(
            "{} holds no certificate{swapped}; {CERT_HINT}",
            cert.display()
        )));
    }

    let key_pem = std::fs::read(key).map_err(|e| {
        TlsFileError::Key(format!(
            "cannot read private key file {}: {e}; {KEY_HINT}",
            key.display()
        ))
    })?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            let text = String::from_utf8_lossy(&key_pem);
            let why = if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
                " (it holds an encrypted key: decrypt it with `openssl pkey -in KEY -out PLAIN_KEY`)"
            } else if text.contains("-----BEGIN CERTIFICATE-----") {
                " (it holds a certificate: are `cert` and `key` swapped?)"
            } else {
                ""
            };
            return Err(TlsFileError::Key(format!(
                "{} holds no private key{why}; {KEY_HINT}",
                key.display()
            )));
        }
        Err(e) => {
            return Err(TlsFileError::Key(format!(
                "{} is not valid PEM ({}); {KEY_HINT}",
                key.display(),
                pem_error(&e)
            )));
        }
    };

    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| {
            let why = match e {
                rustls::Error::General(m) => m,
                other => other.to_string(),
            };
            TlsFileError::Key(format!(
                "the private key in {} is not usable ({why}); supported keys: RSA (2048 bits or more), ECDSA P-256 or P-384, Ed25519",
                key.display()
            ))
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsFileError::Key(format!(
                "the private key in {} does not belong to the certificate in {}: give the key the certificate was issued for",
                key.display(),
                cert.display()
            )));
        }
        Err(e) => {
            let why = match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding) => {
                    "it does not parse".to_string()
                }
                rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
                other => other.to_string(),
            };
            return Err(TlsFileError::Cert(format!(
                "the first certificate in {} is not a valid X.509 certificate ({why}); {CERT_HINT}",
                cert.display()
            )));
        }
    }

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Cert(format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tls")
            .join(name)
    }

    fn load(cert: &str, key: &str) -> Result<Arc<ServerConfig>, TlsFileError> {
        server_config(&data(cert), &data(key))
    }

    #[test]
    fn every_key_format_loads() {
        for (cert, key) in [
            ("rsa_cert.pem", "rsa_key_pkcs8.pem"),
            ("rsa_cert.pem", "rsa_key_pkcs1.pem"),
            ("ec_chain.pem", "ec_key_pkcs8.pem"),
            ("ec_chain.pem", "ec_key_sec1.pem"),
        ] {
            let cfg = load(cert, key).unwrap_or_else(|e| panic!("{cert} + {key}: {e:?}"));
            assert_eq!(cfg.alpn_protocols, [b"http/1.1".to_vec()]);
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let d = |n| data(n).display().to_string();
        assert_eq!(
            load("rsa_cert.pem", "ec_key_sec1.pem").unwrap_err(),
            TlsFileError::Key(format!(
                "the private key in {} does not belong to the certificate in {}: give the key the certificate was issued for",
                d("ec_key_sec1.pem"),
                d("rsa_cert.pem")
            ))
        );
    }

    #[test]
    fn swapped_encrypted_and_missing_files_say_what_is_wrong() {
        let msg = |r: Result<Arc<ServerConfig>, TlsFileError>| match r.unwrap_err() {
            TlsFileError::Cert(m) => format!("cert: {m}"),
            TlsFileError::Key(m) => format!("key: {m}"),
        };
        let d = |n| data(n).display().to_string();
        assert_eq!(
            msg(load("rsa_key_pkcs8.pem", "rsa_cert.pem")),
            format!(
                "cert: {} holds no certificate (it holds a private key: are `cert` and `key` swapped?); {CERT_HINT}",
                d("rsa_key_pkcs8.pem")
            )
        );
        assert_eq!(
            msg(load("ec_chain.pem", "ec_chain.pem")),
            format!(
                "key: {} holds no private key (it holds a certificate: are `cert` and `key` swapped?); {KEY_HINT}",
                d("ec_chain.pem")
            )
        );
        assert_eq!(
            msg(load("ec_chain.pem", "ec_key_encrypted.pem")),
            format!(
                "key: {} holds no private key (it holds an encrypted key: decrypt it with `openssl pkey -in KEY -out PLAIN_KEY`); {KEY_HINT}",
                d("ec_key_encrypted.pem")
            )
        );
        assert_eq!(
            msg(load("nothing.pem", "ec_key_sec1.pem")),
            format!(
                "cert: cannot read certificate file {}: No such file or directory (os error 2); {CERT_HINT}",
                d("nothing.pem")
            )
        );
        assert_eq!(
            msg(load("ec_chain.pem", "nothing.pem")),
            format!(
                "key: cannot read private key file {}: No such file or directory (os error 2); {KEY_HINT}",
                d("nothing.pem")
            )
        );
    }

    #[test]
    fn bad_pem_and_unusable_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("gateway-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad_key = dir.join("bad_key.pem");
        std::fs::write(
            &bad_key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let bad_cert = dir.join("bad_cert.pem");
        std::fs::write(
            &bad_cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let unended = dir.join("unended.pem");
        std::fs::write(&unended, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let r1 = server_config(&data("rsa_cert.pem"), &bad_key);
        let r2 = server_config(&bad_cert, &data("rsa_key_pkcs8.pem"));
        let r3 = server_config(&unended, &data("rsa_key_pkcs8.pem"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            r1.unwrap_err(),
            TlsFileError::Key(format!(
                "the private key in {} is not usable (failed to parse private key as RSA, ECDSA, or EdDSA); supported keys: RSA (2048 bits or more), ECDSA P-256 or P-384, Ed25519",
                bad_key.display()
            ))
        );
        assert_eq!(
            r2.unwrap_err(),
            TlsFileError::Cert(format!(
                "the first certificate in {} is not a valid X.509 certificate (it does not parse); {CERT_HINT}",
                bad_cert.display()
            ))
        );
        assert_eq!(
            r3.unwrap_err(),
            TlsFileError::Cert(format!(
                "{} is not valid PEM (no -----END CERTIFICATE----- line); {CERT_HINT}",
                unended.display()
            ))
        );
    }

    /// Frames written to a TLS stream whose peer reads slowly all arrive,
    /// with nothing written after them: rustls keeps what the socket does
    /// not take in its own buffer, and the session's writer must flush it.
    #[tokio::test(flavor = "current_thread")]
    async fn frames_through_tls_arrive_without_a_later_write() {
        use crate::ws::{FrameWriter, OP_BINARY, frame};
        use tokio::io::AsyncReadExt;

        let server = server_config(&data("rsa_cert.pem"), &data("rsa_key_pkcs8.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(data("rsa_cert.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // A 4 KiB pipe: far less than rustls buffers (64 KiB).
        let (a, b) = tokio::io::duplex(4096);
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(a);
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            b,
        );
        let (server_stream, client_stream) = tokio::join!(accept, connect);
        let (mut server_stream, mut client_stream) =
            (server_stream.unwrap(), client_stream.unwrap());

        let frames: Vec<_> = (0..40u8).map(|i| frame(OP_BINARY, &[i; 5000])).collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let len = expected.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; len];
            client_stream.read_exact(&mut got).await.map(|_| got)
        });
        let mut w = FrameWriter::new(false);
        for f in frames {
            w.push(f);
        }
        std::future::poll_fn(|cx| w.poll_write_all(cx, &mut server_stream))
            .await
            .unwrap();
        assert!(w.is_empty());
        // Nothing is written any more; the reader must still get it all.
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("everything written arrives without a later write")
            .unwrap()
            .unwrap();
        assert!(got == expected, "the bytes differ");
    }
}
