//! Connections from settings (URL, ACL user, password, TLS), and what each Redis error means
//! for the caller: retry after a back-off, or stop.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::redis::cluster::ClusterConfig;
use ::redis::{AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError};

use super::cluster::Conn;
use super::coordinator::Memo;
use super::seeds::Seeds;
use crate::settings::{redact_url, ClusterMode, RedisSettings};

/// What a caller does about a Redis error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Connection trouble, a restart, LOADING, BUSY, a timeout: back off, reconnect, try again.
    Retry,
    /// Wrong password, missing permission, bad TLS set-up, a schema conflict: a person must act.
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Redis error is part of the message (not a `source`), so a printed cause chain does
    /// not repeat it; a hint follows for the errors a person must fix.
    #[error("redis {url}: {error}{}", hint(error))]
    Redis { url: String, error: RedisError },
    #[error("redis {url}: cannot read {what} {path}: {source}")]
    TlsFile {
        url: String,
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("redis {url}: {message}")]
    Setup { url: String, message: String },
}

impl StoreError {
    pub fn disposition(&self) -> Disposition {
        match self {
            StoreError::Redis { error, .. } => classify(error),
            StoreError::TlsFile { .. } | StoreError::Setup { .. } => Disposition::Stop,
        }
    }
}

/// Transient errors are worth retrying; everything a person must fix stops the worker.
pub fn classify(err: &RedisError) -> Disposition {
    if let Some(code) = err.code() {
        return match code {
            // OOM: maxmemory reached; memory can come back (eviction, a bigger limit), and
            // exiting would only turn a full Redis into a crash-looping fleet.
            // MOVED and ASK reach here only when the redirect could not be followed (the crate
            // follows them): the slot map is changing, which is a reshard or a failover.
            // UNBLOCKED: a blocking read (XREADGROUP BLOCK) or WAIT was cut short because its
            // primary became a replica (CLUSTER FAILOVER), or by CLIENT UNBLOCK.
            "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY" | "OOM"
            | "MOVED" | "ASK" | "FAILOVER" | "WAITTIMEOUT" | "UNBLOCKED" => Disposition::Retry,
            "NOAUTH" | "WRONGPASS" | "NOPERM" => Disposition::Stop,
            _ => Disposition::Stop,
        };
    }
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
    {
        if is_tls_failure(err) {
            return Disposition::Stop;
        }
        return Disposition::Retry;
    }
    match err.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig => Disposition::Stop,
        ErrorKind::Server(
            ::redis::ServerErrorKind::Moved
            | ::redis::ServerErrorKind::Ask
            | ::redis::ServerErrorKind::TryAgain
            | ::redis::ServerErrorKind::ClusterDown
            | ::redis::ServerErrorKind::MasterDown
            | ::redis::ServerErrorKind::ReadOnly,
        ) => Disposition::Retry,
        ErrorKind::Server(::redis::ServerErrorKind::CrossSlot) => Disposition::Stop,
        _ => Disposition::Retry,
    }
}

/// A client built from the settings, password kept out of every message.
#[derive(Clone)]
pub struct Store {
    client: Client,
    /// Where a cluster client starts (the same server first); None when `redis.cluster = false`.
    cluster: Option<Seeds>,
    /// Whether the server is a cluster: forced by the settings, or found on the first connect.
    is_cluster: Arc<OnceLock<bool>>,
    /// Whether the cluster's search module has a coordinator, asked now and then.
    coordinator: Arc<Memo>,
    /// The URL with any password masked, for messages.
    pub url: String,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Store {
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let url = redact_url(&settings.url);
        let setup = |message: String| StoreError::Setup {
            url: url.clone(),
            message,
        };
        let mut info = settings.url.as_str().into_connection_info().map_err(|e| {
            setup(format!(
                "invalid URL: {}",
                redact_message(&e.to_string(), settings)
            ))
        })?;
        let mut redis_info = info.redis_settings().clone();
        if !settings.username.is_empty() {
            redis_info = redis_info.set_username(&settings.username);
        }
        if !settings.password.is_empty() {
            redis_info = redis_info.set_password(settings.password.expose());
        }
        redis_info = redis_info.set_lib_name("embed-worker", env!("CARGO_PKG_VERSION"));
        info = info.set_redis_settings(redis_info);
        let seed = info.clone();

        let tls = settings.url.starts_with("rediss://");
        if tls {
            // redis builds rustls without choosing a crypto provider; without a process default
            // the first handshake panics. An Err means one is installed already: fine.
            let _ = ::rustls::crypto::ring::default_provider().install_default();
        }
        let mut certificates = None;
        let client = if tls
            && (!settings.tls_ca_file.is_empty() || !settings.tls_cert_file.is_empty())
        {
            let read = |what: &'static str, path: &str| {
                std::fs::read(path).map_err(|source| StoreError::TlsFile {
                    url: url.clone(),
                    what,
                    path: path.to_string(),
                    source,
                })
            };
            let root_cert = if settings.tls_ca_file.is_empty() {
                None
            } else {
                Some(read("CA file", &settings.tls_ca_file)?)
            };
            let client_tls = if settings.tls_cert_file.is_empty() {
                None
            } else {
                Some(::redis::ClientTlsConfig {
                    client_cert: read("client certificate", &settings.tls_cert_file)?,
                    client_key: read("client key", &settings.tls_key_file)?,
                })
            };
            let certs = ::redis::TlsCertificates {
                client_tls,
                root_cert,
            };
            certificates = Some(certs.clone());
            Client::build_with_tls(info, certs).map_err(|e| setup(format!("TLS set-up: {e}")))?
        } else {
            if !tls && !settings.tls_ca_file.is_empty() {
                return Err(setup(
                    "redis.tls_ca_file is set but the URL is not rediss://".into(),
                ));
            }
            Client::open(info).map_err(|e| setup(e.to_string()))?
        };
        let cluster =
            (settings.cluster != ClusterMode::Single).then(|| Seeds::new(seed, certificates));
        let is_cluster = Arc::new(OnceLock::new());
        match settings.cluster {
            ClusterMode::Auto => {}
            ClusterMode::Cluster => drop(is_cluster.set(true)),
            ClusterMode::Single => drop(is_cluster.set(false)),
        }
        Ok(Self {
            client,
            cluster,
            is_cluster,
            coordinator: Arc::default(),
            url,
            connect_timeout: settings.connect_timeout,
            command_timeout: settings.command_timeout,
        })
    }

    /// Whether the server is a Redis Cluster (asked once, on the first connection, when the
    /// settings leave it to "auto").
    pub async fn is_cluster(&self) -> Result<bool, StoreError> {
        if let Some(known) = self.is_cluster.get() {
            return Ok(*known);
        }
        let mut c = self.connect_single(Duration::ZERO).await?;
        let info: String = ::redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut c)
            .await
            .map_err(|e| self.error(e))?;
        let found = info.lines().any(|l| l.trim() == "cluster_enabled:1");
        if found {
            tracing::info!(url = %self.url, "the server is a Redis Cluster node: routing by slot");
        }
        Ok(*self.is_cluster.get_or_init(|| found))
    }

    /// A new connection whose replies may take up to `extra` beyond the command timeout (for
    /// blocking reads): multiplexed to the one server, or to every node of a cluster.
    pub async fn connect_with(&self, extra: Duration) -> Result<Conn, StoreError> {
        match (&self.cluster, self.is_cluster().await?) {
            (Some(seeds), true) => {
                let cluster = seeds.client().map_err(|e| self.error(e))?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_response_timeout(self.command_timeout + extra);
                // Bounded here: the crate's own connect can wait forever for a node that a
                // failover left in its slot map (it retries the dead node without a deadline).
                let limit = self.connect_timeout * 2;
                match tokio::time::timeout(limit, cluster.get_async_connection_with_config(config))
                    .await
                {
                    Ok(Ok(mut c)) => {
                        seeds.learn(&mut c, self.connect_timeout).await;
                        Ok(Conn::Cluster(
                            c,
                            self.command_timeout + extra,
                            self.coordinator.clone(),
                        ))
                    }
                    Ok(Err(source)) => Err(self.error(source)),
                    Err(_) => Err(self.error(RedisError::from((
                        ::redis::ErrorKind::Io,
                        "no cluster connection in time",
                        format!(
                            "the nodes' connections and slot map took longer than {} (twice redis.connect_timeout)",
                            humantime::format_duration(limit)
                        ),
                    )))),
                }
            }
            _ => self.connect_single(extra).await.map(Conn::Single),
        }
    }

    async fn connect_single(
        &self,
        extra: Duration,
    ) -> Result<::redis::aio::MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout + extra));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|source| self.error(source))
    }

    pub async fn connect(&self) -> Result<Conn, StoreError> {
        self.connect_with(Duration::ZERO).await
    }

    /// Wraps a Redis error with the (redacted) URL.
    pub fn error(&self, source: RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url.clone(),
            error: source,
        }
    }
}

/// What to check, for the errors that will not fix themselves.
fn hint(err: &RedisError) -> &'static str {
    if err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("WRONGPASS" | "NOAUTH"))
    {
        return " (check redis.username / redis.password or the URL's credentials)";
    }
    if err.code() == Some("NOPERM") || super::documents::is_acl_failure(err) {
        return " (the ACL user lacks this command or key; see deploy/redis-acl.conf)";
    }
    if is_tls_failure(err) {
        return " (TLS: check redis.tls_ca_file signs the server's certificate, and the host name)";
    }
    ""
}

/// A TLS handshake failure (unknown CA, bad or expired certificate, wrong name) surfaces as
/// I/O, but it will not fix itself.
fn is_tls_failure(err: &RedisError) -> bool {
    let text = err.to_string().to_lowercase();
    text.contains("certificate") || text.contains("tls") && text.contains("handshake")
}

/// Removes the password from an error message that might echo the URL.
fn redact_message(message: &str, settings: &RedisSettings) -> String {
    let mut out = message.replace(&settings.url, &redact_url(&settings.url));
    if !settings.password.is_empty() {
        out = out.replace(settings.password.expose(), "***");
    }
    out
}

/// Capped exponential back-off with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [cap/2, cap], cap = min(max, initial * 2^attempt).
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let cap = self.initial.saturating_mul(factor).min(self.max);
        let half = cap / 2;
        half + Duration::from_secs_f64(rand::random::<f64>() * half.as_secs_f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn server_error_codes_have_dispositions() {
        let loading = RedisError::from((
            ErrorKind::Server(::redis::ServerErrorKind::BusyLoading),
            "LOADING",
        ));
        assert_eq!(classify(&loading), Disposition::Retry);
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert_eq!(classify(&io), Disposition::Retry);
        // As a demoted primary answers a client blocked in XREADGROUP (seen in the failover
        // test: the worker exited on it).
        let line = "-UNBLOCKED force unblock from blocking operation, instance state changed \
                    (master -> replica?)\r\n";
        let ::redis::Value::ServerError(unblocked) =
            ::redis::parse_redis_value(line.as_bytes()).unwrap()
        else {
            panic!("not an error reply")
        };
        assert_eq!(classify(&unblocked.into()), Disposition::Retry);
        let Ok(::redis::Value::ServerError(wrongtype)) =
            ::redis::parse_redis_value(b"-WRONGTYPE Operation against a key\r\n")
        else {
            panic!("not an error reply")
        };
        assert_eq!(classify(&wrongtype.into()), Disposition::Stop);
    }

    #[test]
    fn passwords_never_reach_messages() {
        let mut s = crate::settings::Settings::load_from(None, Vec::new())
            .unwrap()
            .redis;
        s.url = "redis://u:topsecret@127.0.0.1:1".into();
        let store = Store::new(&s).unwrap();
        assert!(!store.url.contains("topsecret"));
        assert!(!redact_message("bad redis://u:topsecret@127.0.0.1:1", &s).contains("topsecret"));
    }
}
