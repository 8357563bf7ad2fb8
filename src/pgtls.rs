//! TLS for the PostgreSQL state, asked for in the URL the way libpq users know:
//! `?sslmode=require|verify-ca|verify-full` and `&sslrootcert=FILE`.
//!
//! The `postgres` crate speaks TLS through a connector it is given; this one is rustls (the
//! same library and crypto provider as the HTTPS client and `serve --tls-cert`), so no
//! OpenSSL is linked. Unlike libpq, every TLS mode checks the server's certificate chain:
//! `require` and `verify-full` also check that it names the host, `verify-ca` does not. A
//! connection that patient ids travel over is never encrypted to whoever answers. Without
//! `sslmode` (or with `disable` or `prefer`) the connection stays plain, as before.

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// What a URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// No TLS (no `sslmode`, or `disable` or `prefer`).
    Off,
    /// TLS, the chain checked against `roots` (a PEM file, else the system's CAs), and the
    /// host name too unless `any_name` (`verify-ca`).
    On { roots: Option<String>, any_name: bool },
}

/// Splits the TLS settings off a `postgres://` URL: the URL as the `postgres` crate takes it
/// (`sslmode=require` for every TLS mode, no `sslrootcert`) and what TLS it asks for.
pub fn split(url: &str) -> Result<(String, Tls), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Tls::Off));
    };
    let (mut mode, mut roots) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => mode = Some(value.to_string()),
            "sslrootcert" => {
                let path = percent_decode(value).ok_or_else(|| format!("sslrootcert `{value}` is not a valid percent-encoded path"))?;
                roots = Some(path);
            }
            _ => kept.push(pair),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable" | "prefer") => None,
        Some("require" | "verify-full") => Some(false),
        Some("verify-ca") => Some(true),
        Some(other) => {
            return Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    let tls = match tls {
        None if roots.is_some() => return Err("sslrootcert is given but sslmode asks for no TLS: add sslmode=verify-full".into()),
        None => {
            // `disable` and `prefer` go on to the `postgres` crate as they were.
            if let Some(m) = &mode {
                kept.push(if m == "disable" { "sslmode=disable" } else { "sslmode=prefer" });
            }
            Tls::Off
        }
        Some(any_name) => {
            kept.push("sslmode=require");
            Tls::On { roots, any_name }
        }
    };
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The connector for [`Tls::On`]; errors name the file or say what is missing.
pub fn connector(roots: Option<&str>, any_name: bool) -> Result<Rustls, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {path}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {path}: no PEM certificate in it"));
            }
            for c in certs {
                store.add(c).map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A system bundle often holds a certificate rustls cannot use; skip it as
                // every TLS client does.
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err("no CA certificates found on this system: give the server's CA with sslrootcert=FILE".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if any_name {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(store).with_no_client_auth()
    };
    Ok(Rustls(Arc::new(config)))
}

/// `verify-ca`: the chain must lead to a trusted CA, whatever host name it is issued for.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A rustls connector for the `postgres` crate.
#[derive(Clone)]
pub struct Rustls(Arc<rustls::ClientConfig>);

pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for Rustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            config: self.0.clone(),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(Stream)
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM then authenticates without channel binding (SCRAM-SHA-256, not -PLUS), as
        // libpq does by default (channel_binding=prefer falls back the same way).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_settings_are_split_off_the_url() {
        let base = "postgres://sweeper@db.example:5432/trialgate";
        assert_eq!(split(base).unwrap(), (base.to_string(), Tls::Off));
        assert_eq!(
            split(&format!(
                "{base}?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fpg%20ca.pem"
            ))
            .unwrap(),
            (
                format!("{base}?application_name=x&sslmode=require"),
                Tls::On {
                    roots: Some("/etc/pg ca.pem".into()),
                    any_name: false
                }
            )
        );
        assert_eq!(
            split(&format!("{base}?sslmode=verify-ca")).unwrap().1,
            Tls::On {
                roots: None,
                any_name: true
            }
        );
        assert_eq!(
            split(&format!("{base}?sslmode=require")).unwrap().1,
            Tls::On {
                roots: None,
                any_name: false
            },
            "require checks the certificate too"
        );
        assert_eq!(
            split(&format!("{base}?sslmode=prefer")).unwrap(),
            (format!("{base}?sslmode=prefer"), Tls::Off)
        );
        assert_eq!(
            split(&format!("{base}?sslmode=disable&connect_timeout=5")).unwrap(),
            (format!("{base}?connect_timeout=5&sslmode=disable"), Tls::Off)
        );
        assert!(split(&format!("{base}?sslmode=allow")).unwrap_err().contains("sslmode `allow`"));
        assert!(
            split(&format!("{base}?sslrootcert=ca.pem"))
                .unwrap_err()
                .contains("add sslmode=verify-full")
        );
        assert!(split(&format!("{base}?sslmode=require&sslrootcert=%zz")).is_err());
    }

    #[test]
    fn a_root_file_that_is_missing_or_holds_no_certificate_is_named() {
        let e = connector(Some("/nonexistent/ca.pem"), false).err().unwrap_or_default();
        assert!(e.starts_with("sslrootcert /nonexistent/ca.pem:"), "{e}");
        let dir = std::env::temp_dir().join(format!("trialgate-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = connector(empty.to_str(), false).err().unwrap_or_default();
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
