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
        .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", settings.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics, /livez, /readyz");
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    socket.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
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

fn route(path: &str, metrics: &Metrics, health: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
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
