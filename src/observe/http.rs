//! The HTTP listener: `/metrics` (Prometheus text 0.0.4, or OpenMetrics when the scraper asks
//! for it), `/livez`, `/readyz`, on hyper's HTTP/1.1 server (request parsing, framing, the
//! header timeout). One request per connection, answered with `connection: close`: scrapes and
//! probes come seconds apart, and a closed connection holds nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::exposition::Format;
use super::{Health, Metrics};
use crate::settings::HttpSettings;

/// A client gets this long to send its request line and headers (slowloris).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one connection may take, request, answer and all: a client that stops reading the
/// answer is cut off here instead of holding a task and a socket forever.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request head accepted (probes and scrapers send a few hundred bytes); hyper's minimum.
const MAX_HEAD: usize = 8192;

/// Binds `http.listen` (unless empty) and serves in the background. A bind failure is an error
/// at start-up, not a silent lack of metrics. Returns the bound address.
pub async fn serve(
    settings: &HttpSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if settings.listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| bind_error(&settings.listen, &e))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics, /livez, /readyz");
    tokio::spawn(async move {
        loop {
            // A failed accept (the process out of descriptors, a connection reset before it was
            // taken) concerns that one connection: the listener carries on.
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = respond(&request, &metrics, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(socket), service);
                // Errors (a malformed request, a client gone, a timeout) end that connection
                // only; hyper has answered what could be answered (400, 431, ...).
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            });
        }
    });
    Ok(Some(addr))
}

/// One line naming the setting to change. The usual cause is a second worker on the same host
/// (another `make run`, or a test), which finds the first one's port taken.
fn bind_error(listen: &str, e: &std::io::Error) -> anyhow::Error {
    let fix = "Fix: give each worker on a host its own port";
    let example = match listen.parse::<std::net::SocketAddr>() {
        Ok(mut addr) if addr.port() < u16::MAX => {
            addr.set_port(addr.port() + 1);
            format!("EMBED_WORKER__HTTP__LISTEN={addr}")
        }
        _ => "EMBED_WORKER__HTTP__LISTEN=0.0.0.0:9465".to_string(),
    };
    let off = "or EMBED_WORKER__HTTP__LISTEN= (empty) to run without /metrics and probes";
    match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "http.listen {listen}: the port is already in use (another embed-worker on this host?). \
             {fix} (http.listen), e.g. {example}, {off}"
        ),
        _ => anyhow::anyhow!(
            "http.listen {listen}: {e}. Fix: set http.listen to a HOST:PORT this process may bind, \
             e.g. {example}, {off}"
        ),
    }
}

/// The answer to one request: GET (or HEAD) of the three paths, 405 for other methods.
fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    health: &Health,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => {
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            let body = metrics.encode(format, &[&health.registry()]);
            with_type(StatusCode::OK, format.content_type(), body)
        }
        "/livez" => plain(StatusCode::OK, "ok\n".into()),
        "/readyz" => match health.ready() {
            Ok(()) => plain(StatusCode::OK, "ready\n".into()),
            Err(missing) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", missing.join(", ")),
            ),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, "text/plain", body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two workers on one host: the second's error names the setting and a port to use instead.
    #[tokio::test]
    async fn a_taken_port_is_one_line_naming_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let settings = HttpSettings {
            listen: addr.to_string(),
        };
        let err = serve(
            &settings,
            Arc::new(Metrics::default()),
            Arc::new(Health::default()),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("already in use"), "{err}");
        let next = format!("EMBED_WORKER__HTTP__LISTEN=127.0.0.1:{}", addr.port() + 1);
        assert!(err.contains(&next), "{err}");
    }

    async fn listening() -> std::net::SocketAddr {
        let settings = HttpSettings {
            listen: "127.0.0.1:0".into(),
        };
        serve(
            &settings,
            Arc::new(Metrics::default()),
            Arc::new(Health::default()),
        )
        .await
        .unwrap()
        .expect("a listen address was given")
    }

    /// Sends `request` as given and reads until the server closes: (head, body).
    async fn exchange(addr: std::net::SocketAddr, request: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut raw))
            .await
            .expect("the server closes the connection after answering")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
        (head.to_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn metrics_are_text_0_0_4_unless_openmetrics_is_asked_for() {
        let addr = listening().await;
        let (head, body) = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("# TYPE embed_worker_documents_acked_total counter\n"));
        assert!(body.contains("\nembed_worker_ready 0\n"), "{body}");
        assert!(!body.contains("# EOF"));

        // What Prometheus sends: OpenMetrics first, the text format as a fallback.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (head, body) = exchange(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"),
        )
        .await;
        assert!(
            head.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        assert!(body.contains("# TYPE embed_worker_documents_acked counter\n"));
        assert!(body.contains("\nembed_worker_documents_acked_total 0\n"));
        assert!(body.contains("\nembed_worker_ready 0\n"), "{body}");
        assert!(body.ends_with("\n# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn probes_answer_and_other_paths_and_methods_do_not() {
        let addr = listening().await;
        let (head, body) = exchange(addr, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            head.starts_with("http/1.1 200") && body == "ok\n",
            "{head}{body}"
        );
        let (head, body) = exchange(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert!(body.starts_with("not ready: model not loaded"), "{body}");
        let (head, _) = exchange(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 404"), "{head}");
        let (head, _) = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("http/1.1 405"), "{head}");
        // HTTP/1.0, no Host: still answered (curl -0, old probes).
        let (head, _) = exchange(addr, "GET /livez HTTP/1.0\r\n\r\n").await;
        assert!(
            head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
            "{head}"
        );
    }

    /// A client that opens a connection and dribbles a request it never finishes is cut off
    /// after REQUEST_TIMEOUT, and the listener keeps answering others meanwhile.
    #[tokio::test]
    async fn a_slow_client_is_cut_off_and_others_are_served() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = listening().await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let (head, _) = exchange(addr, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let mut rest = Vec::new();
        tokio::time::timeout(
            REQUEST_TIMEOUT + Duration::from_secs(5),
            slow.read_to_end(&mut rest),
        )
        .await
        .expect("the slow connection is closed")
        .ok();
        let waited = started.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT - Duration::from_millis(500),
            "{waited:?}"
        );
        // Nothing answered but, at most, hyper's 408 for the unfinished request.
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }
}
