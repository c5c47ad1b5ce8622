//! Prometheus metrics: the one registry of the process and the HTTP endpoint that serves it at
//! `/metrics` in the OpenMetrics text format.
//!
//! Most values already live as counters in telemetry, the pipeline, the engine and the deviation
//! hub, so [`AgentCollector`] reads them at scrape time instead of keeping copies. Counters that
//! exist nowhere else (model reloads) are registered as metrics of their own. Other parts of the
//! process, such as a collector's lag, add theirs with [`MetricsRegistry::register`] or
//! [`MetricsRegistry::register_collector`]. Every name carries the `driftwatch_` prefix.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::hub::DeviationHub;
use crate::api::tls::ServerTls;
use crate::fleet::push::PushCounters;
use crate::pipeline::Shared;
use crate::telemetry::Telemetry;

/// Content type of the OpenMetrics text format, which Prometheus 2.5 and later scrape.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process's metric registry, shared by everything that exports metrics.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: RwLock<Registry>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        MetricsRegistry {
            registry: RwLock::new(Registry::with_prefix("driftwatch")),
        }
    }
}

impl MetricsRegistry {
    /// Registers `metric` as `driftwatch_<name>`; a counter gets the `_total` suffix on output.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.write().register(name, help, metric);
    }

    /// Registers a collector that encodes its metrics on every scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.write().register_collector(collector);
    }

    /// Encodes every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        let registry = self.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Binds `addr` for [`serve_metrics`], so that the caller learns the port when it asked for 0.
///
/// # Errors
///
/// Fails when the address is in use or cannot be bound.
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen for metrics on {addr}"))
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled. Other paths return 404.
///
/// # Errors
///
/// Fails when the HTTP server fails.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<MetricsRegistry>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("failed to read the metrics address")?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move {
                match registry.encode() {
                    Ok(text) => ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
                    Err(error) => {
                        tracing::error!(%error, "failed to encode the metrics");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .with_context(|| format!("the metrics server on {addr} failed"))?;
    tracing::info!(%addr, "metrics stopped");
    Ok(())
}

/// Label set of [`AgentMetrics::model_reloads`]: `result` is `success` or `failure`.
pub type ReloadLabels = [(&'static str, &'static str); 1];

/// Metrics the agent counts itself because no other component keeps them.
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    /// Model reloads by result.
    pub model_reloads: Family<ReloadLabels, Counter>,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &MetricsRegistry) -> AgentMetrics {
        let metrics = AgentMetrics::default();
        registry.register(
            "model_reloads",
            "Model reloads requested by SIGHUP, a file change or the API, by result; a failure keeps the previous model",
            metrics.model_reloads.clone(),
        );
        metrics
    }

    /// Counts one model reload.
    pub fn count_reload(&self, succeeded: bool) {
        let result = if succeeded { "success" } else { "failure" };
        self.model_reloads.get_or_create(&[("result", result)]).inc();
    }
}

/// Reads the counters of telemetry, the pipeline, the engine and the hub at every scrape.
pub struct AgentCollector {
    pub telemetry: Arc<Telemetry>,
    pub shared: Arc<Shared>,
    pub hub: Arc<DeviationHub>,
    /// The hub of raw events; `None` where none are recorded.
    pub events: Option<Arc<crate::events::EventHub>>,
    /// The API's TLS, for its handshake failures; `None` without TLS.
    pub api_tls: Option<ServerTls>,
    /// The pusher's counters; `None` without `--collector`.
    pub push: Option<Arc<PushCounters>>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats = self.shared.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let events = [
            ("exec", stats.execs),
            ("fork", stats.forks),
            ("exit", stats.exits),
            ("tcp", stats.tcp_events),
            ("credentials", stats.credential_changes),
            ("accept", stats.accepts),
            ("udp", stats.udp_flows),
            ("udp_bind", stats.udp_binds),
            ("dns", stats.dns.messages),
        ];
        encode_counters(&mut encoder, "events", "Kernel events handled by the pipeline, by kind", "kind", &events)?;

        let telemetry = self.telemetry.counters();
        let mut family = encoder.encode_descriptor(
            "kernel_records_lost",
            "Records the kernel programs could not hand to userspace, by program and reason",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for drops in &telemetry.kernel {
            let labels = [("program", drops.program), ("reason", drops.reason)];
            ConstCounter::new(drops.total).encode(family.encode_family(&labels)?)?;
        }
        encode_counter(
            &mut encoder,
            "channel_events_dropped",
            "Decoded kernel events dropped because the channel to the pipeline was full",
            telemetry.channel_drops,
        )?;
        encode_counter(
            &mut encoder,
            "records_undecodable",
            "Ring buffer records that were too short or of an unknown kind",
            telemetry.decode_errors,
        )?;

        let hub = self.hub.counters();
        encode_counter(
            &mut encoder,
            "subscriber_deviations_dropped",
            "Deviations subscribers missed because they read too slowly, summed over subscribers",
            hub.dropped_slow,
        )?;
        encode_counter(
            &mut encoder,
            "history_deviations_evicted",
            "Deviations evicted from the replay history to make room for newer ones",
            hub.evicted,
        )?;
        encode_gauge(&mut encoder, "subscribers", "Deviation stream subscribers connected now", hub.subscribers)?;
        if let Some(events) = &self.events {
            let events = events.counters();
            encode_counter(&mut encoder, "raw_events_published", "Raw events recorded for subscribers that asked for them", events.published)?;
            encode_counter(
                &mut encoder,
                "subscriber_raw_events_dropped",
                "Raw events subscribers missed because they read too slowly, summed over subscribers",
                events.dropped_slow,
            )?;
            encode_gauge(&mut encoder, "raw_event_subscribers", "Subscribers that asked for raw events, connected now", events.subscribers)?;
        }

        let mut family = encoder.encode_descriptor(
            "deviations",
            "Deviations published, by category and severity",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (category, severity, count) in self.hub.published_by_kind() {
            let labels = [("category", category.as_str()), ("severity", severity.as_str())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }

        let engine = self.shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).stats();
        encode_gauge(&mut encoder, "graph_nodes", "Nodes of the observed graph", engine.graph_nodes)?;
        encode_gauge(&mut encoder, "graph_edges", "Edges of the observed graph", engine.graph_edges)?;
        encode_gauge(&mut encoder, "processes", "Live processes in the process table", stats.processes.live)?;

        if let Some(push) = &self.push {
            encode_push(&mut encoder, push, &self.hub)?;
        }
        if let Some(tls) = &self.api_tls {
            encode_counter(
                &mut encoder,
                "api_tls_handshake_failures",
                "API connections rejected during the TLS handshake, such as clients without a valid certificate",
                tls.handshake_failures(),
            )?;
        }
        Ok(())
    }
}

/// Encodes the state of the push to the collector.
fn encode_push(encoder: &mut DescriptorEncoder, push: &PushCounters, hub: &DeviationHub) -> Result<(), fmt::Error> {
    encode_gauge(
        encoder,
        "push_backlog",
        "Deviations published that the collector has not acknowledged yet; --history bounds them",
        push.backlog(hub),
    )?;
    encode_gauge(
        encoder,
        "push_acknowledged_sequence",
        "Latest sequence of this agent that the collector acknowledged",
        push.acknowledged.load(Ordering::Relaxed),
    )?;
    encode_gauge(encoder, "push_connected", "1 while a push stream to the collector is open", push.connected.load(Ordering::Relaxed))?;
    encode_counter(
        encoder,
        "push_deviations_lost",
        "Deviations evicted from the buffer before the collector acknowledged them, reported to it as gaps",
        push.lost.load(Ordering::Relaxed),
    )
}

fn encode_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    let counter = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    counter.encode(metric)
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (value_label, value) in values {
        ConstCounter::new(*value).encode(family.encode_family(&[(label, *value_label)])?)?;
    }
    Ok(())
}

fn encode_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    // Gauges are signed in OpenMetrics; the counts here stay far below i64::MAX.
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_counter_is_encoded_with_prefix_and_suffix() {
        let registry = MetricsRegistry::default();
        let metrics = AgentMetrics::register(&registry);
        metrics.count_reload(true);
        metrics.count_reload(true);
        metrics.count_reload(false);

        let text = registry.encode().unwrap();
        assert!(text.contains("driftwatch_model_reloads_total{result=\"success\"} 2\n"), "{text}");
        assert!(text.contains("driftwatch_model_reloads_total{result=\"failure\"} 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
