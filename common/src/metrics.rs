//! Prometheus metrics of a component process: one registry per process (the process's CPU,
//! memory and file descriptors included), served as the text exposition format at
//! `GET /metrics` on the component's `metrics_listen` address (plain HTTP; loopback in the
//! local lab).
//!
//! Names follow Prometheus's conventions: `flab_` prefix, base units (`_bytes`, `_seconds`),
//! `_total` for counters, and one series per state for states (`flab_item_state{state=...}`
//! is 1 for the item's state, 0 for the others). Values a component already keeps (cache use,
//! journal size, a job's state) are read at scrape time by the hooks given to
//! [`Metrics::on_scrape`]; values that need an asynchronous read (the configuration server's
//! database) by those given to [`Metrics::on_scrape_async`], each waited for at most
//! [`ASYNC_HOOK_WAIT`] (a slow one leaves its gauges as they were). What happens on a hot path
//! (bytes replicated) is a counter incremented there.
//!
//! The endpoint is bounded like every listener of the lab: at most [`MAX_CONNECTIONS`] open
//! at once (more are closed at once), a request's head must arrive within
//! [`HEADER_TIMEOUT`], and a connection lives at most [`CONNECTION_TIMEOUT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
pub use prometheus;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most scrape connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a scrape waits for one asynchronous hook.
pub const ASYNC_HOOK_WAIT: Duration = Duration::from_secs(5);

type Hook = Box<dyn Fn() + Send + Sync>;
type AsyncHook =
    Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// A process's metrics: the registry and the hooks that refresh gauges before a scrape.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    hooks: Arc<Mutex<Vec<Hook>>>,
    async_hooks: Arc<Mutex<Vec<AsyncHook>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the process's own metrics (`process_cpu_seconds_total`,
    /// `process_resident_memory_bytes`, `process_open_fds`, ...) and its control-stream
    /// connection counts (`flab_control_connects_total`).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = registry.register(Box::new(process)) {
            tracing::warn!("process metrics unavailable: {e}");
        }
        if let Err(e) = registry.register(Box::new(crate::control::CONNECTS.clone())) {
            tracing::warn!("control-stream metrics unavailable: {e}");
        }
        Metrics {
            registry,
            hooks: Arc::default(),
            async_hooks: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a collector (a gauge, a counter, a vector of them). A name registered
    /// twice is a programming error: it panics, in tests as in the binary.
    pub fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        #[allow(clippy::expect_used)]
        self.registry
            .register(Box::new(c.clone()))
            .expect("a metric registered twice");
        c
    }

    /// Runs `hook` before every scrape (it sets gauges from the component's state).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(hook));
    }

    /// Runs `hook` (to completion, or for at most [`ASYNC_HOOK_WAIT`]) before every scrape
    /// served by the endpoint: gauges that need a read the scrape must wait for, refreshed
    /// only as often as someone looks.
    pub fn on_scrape_async<F>(&self, hook: impl Fn() -> F + Send + Sync + 'static)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.async_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(move || Box::pin(hook())));
    }

    /// The exposition text, after running the asynchronous hooks, then the others.
    pub async fn scrape(&self) -> String {
        let pending: Vec<_> = self
            .async_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|hook| hook())
            .collect();
        for refresh in pending {
            if tokio::time::timeout(ASYNC_HOOK_WAIT, refresh)
                .await
                .is_err()
            {
                tracing::warn!(
                    "metrics: a refresh took longer than {ASYNC_HOOK_WAIT:?}; its series are as they were"
                );
            }
        }
        self.render()
    }

    /// The exposition text, after running the (synchronous) hooks.
    pub fn render(&self) -> String {
        for hook in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook();
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A gauge vector with one series per label value of `state` for each `key` labels: sets the
/// one of `current` to 1 and the others of `all` to 0.
pub fn set_state(vec: &prometheus::GaugeVec, key: &[&str], all: &[&str], current: &str) {
    for s in all {
        let mut labels: Vec<&str> = key.to_vec();
        labels.push(s);
        vec.with_label_values(&labels)
            .set(if *s == current { 1.0 } else { 0.0 });
    }
}

/// Binds `address` for the metrics endpoint.
pub async fn bind(address: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for metrics on {address} (`metrics_listen`): {e}")
    })?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "metrics endpoint: {MAX_CONNECTIONS} connections open; closed a new one");
            continue;
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                _ = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn respond<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n".into());
    }
    let mut r = reply(StatusCode::OK, metrics.scrape().await);
    if let Ok(v) = hyper::header::HeaderValue::from_str(TextEncoder::new().format_type()) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Starts the endpoint on `address` (none: no endpoint) and returns the address it listens on.
pub async fn start(
    address: Option<&str>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(address) = address.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let (listener, local) = bind(address).await?;
    tracing::info!("metrics at http://{local}/metrics");
    tokio::spawn(serve(listener, metrics.clone(), shutdown.clone()));
    Ok(Some(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_endpoint_serves_the_registry_and_runs_the_hooks() {
        let metrics = Metrics::new();
        let g = metrics.register(prometheus::Gauge::new("flab_test_bytes", "test").expect("gauge"));
        let g2 = g.clone();
        metrics.on_scrape(move || g2.set(42.0));
        let later =
            metrics.register(prometheus::Gauge::new("flab_test_async", "test").expect("gauge"));
        metrics.on_scrape_async(move || {
            let later = later.clone();
            async move {
                tokio::task::yield_now().await;
                later.set(7.0);
            }
        });
        let shutdown = CancellationToken::new();
        let addr = start(Some("127.0.0.1:0"), &metrics, &shutdown)
            .await
            .expect("start")
            .expect("addr");
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            out
        })
        .await
        .expect("join");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("flab_test_bytes 42"), "{body}");
        assert!(body.contains("flab_test_async 7"), "{body}");
        assert!(body.contains("process_resident_memory_bytes"), "{body}");
        shutdown.cancel();
    }
}
