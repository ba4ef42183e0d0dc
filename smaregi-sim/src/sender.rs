//! The simulator as Smaregi's *sender* (API送信): form POSTs of
//! `proc_name`, `params` and the merchant's custom parameters to a URL,
//! as SMAREGI.md §2 describes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("CA file {0}: {1}")]
    CaFile(String, String),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
}

/// Sends notifications; trusts the system's roots, plus `ca_file` (e.g.
/// the relay's self-signed certificate) if given.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
}

impl Sender {
    pub fn new(ca_file: Option<&Path>) -> Result<Self, SendError> {
        Ok(Self {
            client: http_client(ca_file)?,
        })
    }

    /// POSTs one notification; returns the status and body of the answer.
    pub async fn send(
        &self,
        url: &str,
        proc_name: &str,
        params: &Value,
        custom: &[(String, String)],
    ) -> Result<(u16, String), SendError> {
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("proc_name", proc_name);
            form.append_pair("params", &params.to_string());
            for (key, value) in custom {
                form.append_pair(key, value);
            }
            form.finish()
        };
        let response = self
            .client
            .post(url)
            .header(
                "content-type",
                "application/x-www-form-urlencoded;charset=UTF-8",
            )
            .body(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }
}

/// An HTTP client over rustls with ring, trusting the system's roots plus
/// `ca_file` if given.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, SendError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let ca_error = |e: &dyn std::fmt::Display| {
            SendError::CaFile(path.display().to_string(), e.to_string())
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(&e))? {
            roots
                .add(cert.map_err(|e| ca_error(&e))?)
                .map_err(|e| ca_error(&e))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()?)
}
