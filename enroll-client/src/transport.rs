//! The one HTTPS client of the enrollment service ([`Client`]): TLS 1.3 with the bootstrap
//! file's root as the only trust anchor (and the appliance's certificate for mutual TLS once it
//! is enrolled), the service URLs in order, timeouts on every step, and the last connection
//! that answered kept for the next call, so an appliance that polls the policy and the hub list
//! does not make a TCP and TLS handshake (with a client certificate the service verifies) for
//! every poll.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use komnet_proto::api::ApiError;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::{describe_tls_error, ClientError};

/// Largest answer read from the service (a response is a few KiB).
pub(crate) const MAX_RESPONSE_BYTES: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The enrollment service's HTTPS client. Calls take `&self` and may run at the same time
/// (each then has its own connection; one is kept afterwards).
///
/// Service URLs are tried in order; the first that answers decides (an answer that refuses is
/// final, only connection failures move on to the next URL). A kept connection is used only for
/// `GET`s, which may be repeated: when the service closed it meanwhile (its idle timeout), the
/// request goes once more over a new connection, found as above. Enrolling and renewing
/// (`POST`) always open a connection of their own, so a one-time token is never sent twice.
///
/// ```no_run
/// # async fn poll(e: &komnet_enroll_client::Enrollment) -> Result<(), komnet_enroll_client::ClientError> {
/// let client = komnet_enroll_client::Client::for_enrollment(e)?;
/// let hubs = client.fetch_hubs().await?;
/// let policy = client.fetch_policy(Some(7)).await?; // over the same connection
/// # let _ = (hubs, policy); Ok(()) }
/// ```
pub struct Client {
    urls: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    idle: Mutex<Option<Connection>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.urls)
            .field("connections_opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

/// Why a request got no answer.
enum SendError {
    /// The connection failed before an answer came (closed by the service, reset): a request
    /// that may be repeated can go over a new one.
    Closed(ClientError),
    /// Anything else (a timeout, a request that could not be built): final.
    Failed(ClientError),
}

impl SendError {
    fn into_inner(self) -> ClientError {
        match self {
            SendError::Closed(e) | SendError::Failed(e) => e,
        }
    }
}

impl Client {
    /// A client trusting `root_ca_pem` only, with the appliance's certificate chain and key for
    /// mutual TLS if given.
    pub fn new(
        root_ca_pem: &str,
        client_auth: Option<(&str, &str)>,
        urls: &[String],
    ) -> Result<Self, ClientError> {
        Ok(Client {
            urls: urls.to_vec(),
            tls: client_config(root_ca_pem, client_auth)?,
            idle: Mutex::new(None),
            opened: AtomicU64::new(0),
        })
    }

    /// How many connections (TCP + TLS handshakes) this client has opened.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// A new connection to the first URL that answers.
    async fn connect_first(&self) -> Result<Connection, ClientError> {
        let mut last = ClientError::Config("no enroll URL given".into());
        for url in &self.urls {
            let target = match parse_url(url) {
                Ok(t) => t,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match connect(&target, self.tls.clone()).await {
                Ok(conn) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "enroll URL unreachable, trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.take().filter(|c| !c.sender.is_closed())
    }

    /// Keeps a connection whose answer has been read completely, for the next call.
    pub(crate) fn keep(&self, conn: Connection) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.is_none() {
            *idle = Some(conn);
        }
    }

    /// Sends one request; the answer comes with the connection it came on, which the caller
    /// hands back with [`Self::keep`] once it has read the body.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(hyper::Response<Incoming>, Connection), ClientError> {
        if method == Method::GET {
            if let Some(mut conn) = self.take_idle() {
                match conn.send(Method::GET, path, None).await {
                    Ok(resp) => return Ok((resp, conn)),
                    Err(SendError::Closed(e)) => {
                        tracing::debug!(error = %e, "kept connection gone; a new one");
                    }
                    Err(SendError::Failed(e)) => return Err(e),
                }
            }
        }
        let mut conn = self.connect_first().await?;
        let resp = conn
            .send(method, path, body)
            .await
            .map_err(SendError::into_inner)?;
        Ok((resp, conn))
    }

    /// Sends and decodes a JSON answer, or the typed error.
    pub(crate) async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.call_limited(method, path, body, MAX_RESPONSE_BYTES)
            .await
    }

    pub(crate) async fn call_limited<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<T, ClientError> {
        let (resp, conn) = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = conn.read_body(resp, limit).await?;
        let result = if status != StatusCode::OK {
            conn.api_error(status, &bytes).and_then(|error| {
                Err(ClientError::Api {
                    url: conn.url.clone(),
                    status: status.as_u16(),
                    error,
                })
            })
        } else {
            serde_json::from_slice(&bytes).map_err(|e| conn.protocol(format!("JSON: {e}")))
        };
        self.keep(conn);
        result
    }
}

pub(crate) struct Target {
    url: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

pub(crate) fn parse_url(url: &str) -> Result<Target, ClientError> {
    let bad = |m: &str| ClientError::Config(format!("enroll URL {url:?}: {m}"));
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must be https://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad("has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(host.clone()).map_err(|_| bad("bad host name"))?;
    Ok(Target {
        url: url.trim_end_matches('/').to_owned(),
        port: uri.port_u16().unwrap_or(443),
        host,
        server_name,
    })
}

fn client_config(
    root_ca_pem: &str,
    client_auth: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let root = CertificateDer::from_pem_slice(root_ca_pem.as_bytes())
        .map_err(|e| ClientError::Config(format!("root CA: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(root)
        .map_err(|e| ClientError::Config(format!("root CA: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Config(format!("certificate chain: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| ClientError::Config(format!("private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("client certificate: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One HTTPS connection to the service.
pub(crate) struct Connection {
    pub(crate) url: String,
    host_header: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

pub(crate) async fn connect(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Connection, ClientError> {
    let cerr = |message: String| ClientError::Connect {
        url: target.url.clone(),
        message,
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| cerr("timed out".into()))?
    .map_err(|e| cerr(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(target.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| cerr("TLS handshake timed out".into()))?
    .map_err(|e| cerr(describe_tls_error(&e)))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| cerr(format!("HTTP: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Connection {
        url: target.url.clone(),
        host_header: format!("{}:{}", target.host, target.port),
        sender,
    })
}

impl Connection {
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, SendError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host_header);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| SendError::Failed(self.protocol(e.to_string())))?;
        let url = &self.url;
        // Any failure of the connection itself (closed, reset, a TLS close without
        // close_notify) before an answer: a kept connection the service gave up.
        let failed = |e: hyper::Error| {
            let message = match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            SendError::Closed(ClientError::Protocol {
                url: url.clone(),
                message,
            })
        };
        // The previous answer may still be finishing inside hyper's dispatcher; sending before
        // it is ready fails with "connection was not ready".
        tokio::time::timeout(REQUEST_TIMEOUT, self.sender.ready())
            .await
            .map_err(|_| SendError::Failed(self.protocol("connection not ready in time".into())))?
            .map_err(failed)?;
        tokio::time::timeout(REQUEST_TIMEOUT, self.sender.send_request(req))
            .await
            .map_err(|_| SendError::Failed(self.protocol("no answer in time".into())))?
            .map_err(failed)
    }

    pub(crate) fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            url: self.url.clone(),
            message,
        }
    }

    /// An answer's body, at most `limit` bytes, within the request timeout.
    pub(crate) async fn read_body(
        &self,
        resp: hyper::Response<Incoming>,
        limit: usize,
    ) -> Result<Bytes, ClientError> {
        Ok(tokio::time::timeout(
            REQUEST_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| self.protocol("answer body timed out".into()))?
        .map_err(|e| self.protocol(format!("answer body: {e}")))?
        .to_bytes())
    }

    /// The typed error in a refusal's body.
    pub(crate) fn api_error(
        &self,
        status: StatusCode,
        bytes: &[u8],
    ) -> Result<ApiError, ClientError> {
        serde_json::from_slice(bytes).map_err(|_| {
            self.protocol(format!(
                "status {status} without a typed error: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })
    }
}
