//! The neutral HTTP client: the gateway's providers and its trace export (through the MLflow
//! transport) both send with it, so it lives below both and imports from neither.
//!
//! Requests go through hyper's pooled client (keep-alive connections, rustls with the webpki
//! roots for `https`). It takes the request as built, an `http::Request` with its `Uri`, so
//! nothing is parsed again on the way: reqwest, on the same path, parses each request's URL
//! several times (into a `Url`, into a `Uri`, and again in its redirect layer), which cost more
//! than a tenth of the gateway's whole CPU per request.
//!
//! A destination that the proxy environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`,
//! `NO_PROXY`, read at start) sends through a proxy goes through reqwest instead, which speaks to
//! proxies (CONNECT tunnels, proxy credentials) exactly as before.

use std::pin::Pin;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Request, StatusCode};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use http_body_util::{BodyDataStream, BodyExt as _, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Idle keep-alive connections kept per host.
const MAX_IDLE_PER_HOST: usize = 1024;
/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A server could not be reached, or its answer could not be read.
#[derive(Debug)]
pub struct TransportError {
    pub message: String,
    /// The client's own timeout (reqwest's; the gateway's attempt timeout is separate).
    pub timeout: bool,
}

impl TransportError {
    fn of(err: &(dyn std::error::Error + 'static)) -> Self {
        TransportError {
            message: crate::error_chain(err),
            timeout: false,
        }
    }

    fn of_reqwest(err: &reqwest::Error) -> Self {
        TransportError {
            message: crate::error_chain(err),
            timeout: err.is_timeout(),
        }
    }
}

/// A response body as a stream of byte chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, TransportError>> + Send>>;

enum Body {
    Hyper(hyper::body::Incoming),
    Reqwest(reqwest::Response),
}

/// A server's answer: its status, then its body, whole or as a stream.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Body,
}

impl UpstreamResponse {
    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, TransportError> {
        match self.body {
            Body::Hyper(body) => body
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .map_err(|e| TransportError::of(&e)),
            Body::Reqwest(resp) => resp
                .bytes()
                .await
                .map_err(|e| TransportError::of_reqwest(&e)),
        }
    }

    /// The next piece of the body, `None` at its end (for a caller that bounds what it reads).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        match &mut self.body {
            Body::Hyper(body) => loop {
                match body.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(TransportError::of(&e)),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            },
            Body::Reqwest(resp) => resp
                .chunk()
                .await
                .map_err(|e| TransportError::of_reqwest(&e)),
        }
    }

    /// The body as it arrives.
    pub fn into_stream(self) -> ByteStream {
        match self.body {
            Body::Hyper(body) => {
                Box::pin(BodyDataStream::new(body).map_err(|e| TransportError::of(&e)))
            }
            Body::Reqwest(resp) => Box::pin(
                resp.bytes_stream()
                    .map(|chunk| chunk.map_err(|e| TransportError::of_reqwest(&e))),
            ),
        }
    }
}

/// Pooled connections (to the providers, or to the tracking server).
pub struct UpstreamClient {
    direct: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    proxies: Matcher,
    proxied: reqwest::Client,
}

impl UpstreamClient {
    /// The client, with the proxy rules of the environment.
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_proxies(Matcher::from_system(), None)
    }

    /// The client with explicit proxy rules (`proxy`: the URL reqwest sends proxied requests to;
    /// `None`: reqwest reads the environment, as `proxies` was).
    pub fn with_proxies(proxies: Matcher, proxy: Option<&str>) -> Result<Self, reqwest::Error> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // `https` URIs are handed to the TLS layer around this connector.
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let direct = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(https);
        let mut proxied = reqwest::Client::builder()
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(url) = proxy {
            proxied = proxied.proxy(reqwest::Proxy::all(url)?);
        }
        Ok(UpstreamClient {
            direct,
            proxies,
            proxied: proxied.build()?,
        })
    }

    /// Whether a request to `uri` goes through a proxy.
    pub fn is_proxied(&self, uri: &axum::http::Uri) -> bool {
        self.proxies.intercept(uri).is_some()
    }

    /// Sends the request; the answer is there once its status and headers are.
    pub async fn send(&self, request: Request<Bytes>) -> Result<UpstreamResponse, TransportError> {
        if self.is_proxied(request.uri()) {
            let (parts, body) = request.into_parts();
            let resp = self
                .proxied
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| TransportError::of_reqwest(&e))?;
            return Ok(UpstreamResponse {
                status: resp.status(),
                headers: resp.headers().clone(),
                body: Body::Reqwest(resp),
            });
        }
        let resp = self
            .direct
            .request(request.map(Full::new))
            .await
            .map_err(|e| TransportError::of(&e))?;
        let (parts, body) = resp.into_parts();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body: Body::Hyper(body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Uri;

    /// A server on 127.0.0.1 that answers every request with the request's target (absolute
    /// form when spoken to as a proxy) and its Host header.
    async fn echo_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string();
            format!("{} {host}", req.uri())
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn post(uri: &str) -> Request<Bytes> {
        let mut request = Request::new(Bytes::from_static(b"{}"));
        *request.method_mut() = axum::http::Method::POST;
        *request.uri_mut() = uri.parse().unwrap();
        request
    }

    #[tokio::test]
    async fn sends_directly_without_a_proxy() {
        let addr = echo_server().await;
        let client = UpstreamClient::with_proxies(Matcher::builder().build(), None).unwrap();
        let uri = format!("http://{addr}/v1/chat/completions?x=1");
        assert!(!client.is_proxied(&uri.parse::<Uri>().unwrap()));
        let resp = client.send(post(&uri)).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        let body = resp.bytes().await.unwrap();
        assert_eq!(body, format!("/v1/chat/completions?x=1 {addr}"));
    }

    #[tokio::test]
    async fn a_proxied_destination_goes_through_the_proxy() {
        let proxy = echo_server().await;
        let proxy_url = format!("http://{proxy}");
        let matcher = Matcher::builder()
            .http(proxy_url.clone())
            .no("127.0.0.1")
            .build();
        let client = UpstreamClient::with_proxies(matcher, Some(&proxy_url)).unwrap();
        // A name that resolves nowhere: only the proxy can answer for it.
        let uri = "http://llm.invalid/v1/chat/completions";
        assert!(client.is_proxied(&uri.parse::<Uri>().unwrap()));
        let resp = client.send(post(uri)).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        let body = resp.bytes().await.unwrap();
        assert_eq!(body, "http://llm.invalid/v1/chat/completions llm.invalid");
        // NO_PROXY: sent directly.
        let direct = echo_server().await;
        let uri = format!("http://{direct}/v1/models");
        assert!(!client.is_proxied(&uri.parse::<Uri>().unwrap()));
        let body = client
            .send(post(&uri))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body, format!("/v1/models {direct}"));
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transport_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = UpstreamClient::with_proxies(Matcher::builder().build(), None).unwrap();
        let err = client
            .send(post(&format!("http://{addr}/v1/chat/completions")))
            .await
            .err()
            .expect("nothing listens there");
        assert!(!err.timeout);
        assert!(err.message.contains("onnect"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_stream_yields_the_body_as_it_comes() {
        let addr = echo_server().await;
        let client = UpstreamClient::with_proxies(Matcher::builder().build(), None).unwrap();
        let resp = client
            .send(post(&format!("http://{addr}/stream")))
            .await
            .unwrap();
        let mut stream = resp.into_stream();
        let mut body = Vec::new();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(body, format!("/stream {addr}").as_bytes());
    }
}
