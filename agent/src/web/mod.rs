//! The live view: a page in the browser that draws the component graph and lists deviations as
//! they arrive.
//!
//! [`LiveView`] serves it over HTTP/1.1 (axum). It reads the graph through a [`LiveSource`] and
//! deviations from a [`DeviationHub`], so a lone agent and the collector mount the same page:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn example(source: Arc<dyn driftwatch::web::LiveSource>, hub: Arc<driftwatch::api::DeviationHub>) -> anyhow::Result<()> {
//! use driftwatch::web::{LiveView, LiveViewConfig, WebAddr, WebListener};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let view = LiveView::new(source, hub, LiveViewConfig::default());
//! let listener = WebListener::bind(&"127.0.0.1:9180".parse::<WebAddr>()?).await?;
//! driftwatch::web::serve_on(listener, view, shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! or merge [`LiveView::router`] into a router of their own.
//!
//! The page is one HTML file, one script and one style sheet, embedded in the binary, with no
//! request to any other origin. It receives everything over one server-sent event stream
//! (`/api/events`): the graph each time it changes, then deviations with their sequence numbers.
//! When the stream breaks, the page reconnects and resumes one past the last sequence it saw.

mod events;
pub mod host;
pub mod topology;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use driftwatch_model::graph::GraphSnapshot;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::DeviationHub;
pub use events::GraphFeed;
pub use host::{parse_allowed_host, AllowedHosts};
pub use topology::{DeclaredModel, Topology, TopologyLimits};

/// Address the live view listens on when `--web` is given without one.
pub const DEFAULT_WEB_ADDR: &str = "127.0.0.1:9180";

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Scripts and styles come from this origin only, and nothing may frame the page. Even a value
/// that escaped escaping could then run no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Content the page draws, besides deviations.
pub trait LiveSource: Send + Sync + 'static {
    /// Returns a copy of the observed graph.
    fn graph(&self) -> GraphSnapshot;
    /// Returns the zones, components and flows of the model in force.
    fn declared(&self) -> DeclaredModel;
    /// Returns the fleet nodes (hosts) behind each graph node, by graph node id. A lone agent
    /// has none to report; a collector names the agents whose graphs contain the node.
    fn hosts(&self) -> BTreeMap<String, Vec<String>> {
        BTreeMap::new()
    }
}

/// Settings of a [`LiveView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveViewConfig {
    /// How often the graph is compared with the one the pages last received, while a page is open.
    pub graph_interval: Duration,
    /// Deviations replayed to a page that connects without a sequence to resume from.
    pub initial_replay: u64,
    pub limits: TopologyLimits,
    /// Host names served besides IP literals and `localhost`; see [`host`].
    pub allowed_hosts: AllowedHosts,
}

impl Default for LiveViewConfig {
    fn default() -> Self {
        LiveViewConfig {
            graph_interval: Duration::from_secs(1),
            initial_replay: 200,
            limits: TopologyLimits::default(),
            allowed_hosts: AllowedHosts::default(),
        }
    }
}

/// Returns the default settings with the host names of `--web-allow-host` allowed.
pub fn live_view_config(allowed_hosts: &[String]) -> LiveViewConfig {
    LiveViewConfig { allowed_hosts: AllowedHosts::new(allowed_hosts), ..LiveViewConfig::default() }
}

/// The live view's state: where it reads the graph and deviations, and the graph feed shared by
/// every open page.
pub struct LiveView {
    hub: Arc<DeviationHub>,
    feed: Arc<GraphFeed>,
    config: LiveViewConfig,
}

impl LiveView {
    pub fn new(source: Arc<dyn LiveSource>, hub: Arc<DeviationHub>, config: LiveViewConfig) -> Arc<LiveView> {
        Arc::new(LiveView { hub, feed: Arc::new(GraphFeed::new(source, config.limits)), config })
    }

    /// Returns the routes of the page and its API: `/`, `/app.js`, `/style.css`, `/api/graph`
    /// and `/api/events`. Every route rejects a request whose Host the live view does not serve,
    /// with 403 (see [`host`]). Event streams end when `shutdown` is cancelled, and a task that compares
    /// the graph every [`LiveViewConfig::graph_interval`] runs until then.
    pub fn router(self: &Arc<Self>, shutdown: CancellationToken) -> Router {
        tokio::spawn(Arc::clone(&self.feed).run(self.config.graph_interval, shutdown.clone()));
        let view = Arc::clone(self);
        let events = move |request: axum::extract::Request| {
            let view = Arc::clone(&view);
            let shutdown = shutdown.clone();
            async move { events::handle(&view, request.headers(), request.uri(), shutdown).await }
        };
        let feed = Arc::clone(&self.feed);
        let graph = move || {
            let feed = Arc::clone(&feed);
            async move {
                match feed.refresh().await {
                    Ok(document) => json_response(document.json.clone()),
                    Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error).into_response(),
                }
            }
        };
        Router::new()
            .route("/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
            .route("/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
            .route("/style.css", get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }))
            .route("/api/graph", get(graph))
            .route("/api/events", get(events))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(self.config.allowed_hosts.clone()),
                host::require_allowed_host,
            ))
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json_response(body: Arc<str>) -> Response {
    let mut response = body.to_string().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A loopback TCP address for the live view.
///
/// The page has no authentication and shows every process's command line, so it serves on
/// loopback only; reach it from another machine through an SSH tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebAddr(pub SocketAddr);

/// Errors from parsing a [`WebAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebAddrError {
    #[error("invalid live view address {0:?}: expected 127.0.0.1:PORT or [::1]:PORT")]
    Invalid(String),
    #[error(
        "live view address {0} is not a loopback address; the page has no authentication, so \
         listen on 127.0.0.1 or [::1] and reach it through an SSH tunnel"
    )]
    NotLoopback(SocketAddr),
}

impl FromStr for WebAddr {
    type Err = WebAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let addr: SocketAddr = text.parse().map_err(|_| WebAddrError::Invalid(text.to_owned()))?;
        if !addr.ip().is_loopback() {
            return Err(WebAddrError::NotLoopback(addr));
        }
        Ok(WebAddr(addr))
    }
}

impl fmt::Display for WebAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A bound live view socket, so that a caller learns the port before it starts a browser.
pub struct WebListener {
    listener: TcpListener,
}

impl WebListener {
    /// # Errors
    ///
    /// Fails when the address is in use or cannot be bound, naming it.
    pub async fn bind(addr: &WebAddr) -> anyhow::Result<WebListener> {
        let listener = TcpListener::bind(addr.0).await.with_context(|| format!("failed to listen on {addr} for the live view"))?;
        Ok(WebListener { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Serves the live view on `listener` until `shutdown` is cancelled.
pub async fn serve_on(listener: WebListener, view: Arc<LiveView>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let local_addr = listener.local_addr().context("failed to read the live view's address")?;
    let router = view.router(shutdown.clone());
    tracing::info!(url = %format!("http://{local_addr}/"), "live view listening");
    axum::serve(listener.listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .with_context(|| format!("live view server on {local_addr} failed"))?;
    tracing::info!(addr = %local_addr, "live view stopped");
    Ok(())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
