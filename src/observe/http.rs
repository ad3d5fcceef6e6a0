//! The HTTP listener: `/metrics` (Prometheus text), `/livez`, `/readyz`.
//! Deliberately tiny (GET only, one request per connection): no web framework for three routes.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Health, Metrics};
use crate::settings::HttpSettings;

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
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let Ok(Ok(Some(head))) =
                    tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut socket)).await
                else {
                    return;
                };
                let request = String::from_utf8_lossy(&head);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = route(path, &metrics, &health);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
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

/// A client gets this long to send its request line and headers.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest request head accepted (probes and scrapers send a few hundred bytes).
const MAX_HEAD: usize = 8192;

/// Reads up to the blank line ending the headers, however the client split its writes: closing
/// with request bytes unread would reset the connection before the client reads the answer.
async fn read_head(socket: &mut tokio::net::TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(head))
}

fn route(path: &str, metrics: &Metrics, health: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render() + &health.render(),
        ),
        "/livez" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => match health.ready() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
            Err(missing) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {}\n", missing.join(", ")),
            ),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
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
}
