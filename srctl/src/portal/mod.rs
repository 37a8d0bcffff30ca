//! `srctl portal`: a read-only web portal of the lab, modelled on the ASR portal (replicated
//! items, jobs, infrastructure, the link), served on loopback with axum.
//!
//! - **Access**: the portal prints its URL with a random token (as Jupyter does) and writes
//!   it to `DIR/operator/portal.url` (the operator's directory, 0700). A request carrying
//!   `?token=` gets an HttpOnly, SameSite=Strict cookie and is redirected to the same page
//!   without it; any other request without the cookie is answered 401. Another local user
//!   who can reach the port cannot read the lab.
//! - **Data**: everything is read through the operator API with the operator's credentials
//!   ([`snapshot`]), once a second by one task whatever the number of browsers, and pushed to
//!   every open page as server-sent events (`/events`); `/api/snapshot` gives the same JSON.
//! - **Offline**: the page, its script and its style are in the binary (`page.html`); no
//!   CDN, nothing fetched.

pub mod snapshot;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The page, with its script and style.
const PAGE: &str = include_str!("page.html");
/// The cookie that carries the token once the URL was opened.
const COOKIE: &str = "flab_portal";

struct Shared {
    token: String,
    latest: watch::Sender<Arc<String>>,
}

/// A running portal.
pub struct Portal {
    pub address: SocketAddr,
    /// The URL to open (with the token).
    pub url: String,
    /// Where the URL was written for the operator.
    pub url_file: PathBuf,
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The token check in front of every route.
async fn auth(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let query_token = request.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string())
    });
    if let Some(t) = query_token {
        if !same(&t, &shared.token) {
            return unauthorized();
        }
        let mut r = Redirect::to(request.uri().path()).into_response();
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
            shared.token
        )) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    match cookie_token(request.headers()) {
        Some(t) if same(&t, &shared.token) => next.run(request).await,
        _ => unauthorized(),
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "401: open the URL `srctl portal` printed (it carries the token; see DIR/operator/portal.url)\n",
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn snapshot_json(State(shared): State<Arc<Shared>>) -> Response {
    let body = shared.latest.borrow().clone();
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn events(
    State(shared): State<Arc<Shared>>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    use futures::StreamExt;
    let stream = tokio_stream::wrappers::WatchStream::new(shared.latest.subscribe())
        .map(|s| Ok(Event::default().event("snapshot").data(s.as_str())));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// Starts the portal of the lab in `dir` on `listen` (loopback unless `remote` allows
/// otherwise); it serves until `shutdown`.
pub async fn start(
    dir: &Path,
    listen: &str,
    remote: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<Portal> {
    let addr: SocketAddr = listen.parse().map_err(|e| {
        anyhow::anyhow!("--listen `{listen}` is not an address like 127.0.0.1:8080: {e}")
    })?;
    if !addr.ip().is_loopback() && !remote {
        anyhow::bail!(
            "--listen {listen} is not a loopback address: the portal answers on loopback only \
             unless --allow-remote is given (anyone who gets the URL can then read the lab)"
        );
    }
    // The operator's credentials must work before anything is served.
    crate::client::operator(dir).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let shared = Arc::new(Shared {
        token: random_token(),
        latest: watch::Sender::new(Arc::new("{}".to_string())),
    });
    // One reader for every browser.
    let (poll_dir, poll_shared, poll_stop) = (dir.to_path_buf(), shared.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut history = snapshot::History::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = poll_stop.cancelled() => return,
            }
            let s = snapshot::read(&poll_dir, &mut history).await;
            poll_shared.latest.send_replace(Arc::new(s.to_string()));
        }
    });
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/api/snapshot", get(snapshot_json))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), auth))
        .with_state(shared.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    let url = format!("http://{address}/?token={}", shared.token);
    let url_file = dir.join("operator").join("portal.url");
    failback_common::durable::write(&url_file, format!("{url}\n").as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", url_file.display()))?;
    Ok(Portal {
        address,
        url,
        url_file,
    })
}
