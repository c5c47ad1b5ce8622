//! Prometheus metrics of the collector, served by `driftwatch collector --metrics`.
//!
//! Everything but the lag is read from the collector's state at scrape time. The lag is a
//! histogram per node of the delay between the kernel event behind a deviation (its `last_seen`,
//! stamped by the agent that raised it) and the moment the collector wrote the deviation to its
//! journal and published it. Both times come from different clocks when the agent runs on another
//! host, so the lag includes their offset.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector as PrometheusCollector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::Collector;
use crate::metrics::MetricsRegistry;

/// Label set of the per-node metrics: the node name an agent gave with `--node`.
pub type NodeLabels = [(&'static str, String); 1];

/// Lag histograms by node; see the module documentation.
#[derive(Debug, Clone)]
pub struct LagHistograms(Family<NodeLabels, Histogram, fn() -> Histogram>);

impl Default for LagHistograms {
    fn default() -> Self {
        LagHistograms(Family::new_with_constructor(new_lag_histogram))
    }
}

/// Buckets from 1 ms to about 33 s, doubling: a healthy fleet lands in the first few, and a
/// collector restart or network cut that agents recover from shows in the last ones.
fn new_lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl LagHistograms {
    /// Records the lag of one deviation stored for `node`. A node clock ahead of the collector's
    /// gives a negative delay, which is recorded as 0.
    pub(super) fn observe(&self, node: &str, raised_at: SystemTime, stored_at: SystemTime) {
        let seconds = stored_at.duration_since(raised_at).map_or(0.0, |delay| delay.as_secs_f64());
        self.0.get_or_create(&[("node", node.to_owned())]).observe(seconds);
    }
}

/// Registers the collector's metrics in `registry`.
pub fn register(registry: &MetricsRegistry, collector: &Arc<Collector>) {
    registry.register(
        "collector_lag_seconds",
        "Delay from the kernel event behind a deviation on its node to the collector's journal write, by node; includes the offset between the two clocks",
        collector.lag.0.clone(),
    );
    registry.register_collector(Box::new(CollectorScrape { collector: Arc::clone(collector) }));
}

/// The per-node values of one scrape, copied under the collector's lock.
struct NodeValues {
    labels: NodeLabels,
    connected: bool,
    received: u64,
    lost: u64,
    duplicates: u64,
    rejected_streams: u64,
    unacknowledged: u64,
}

/// Reads the collector's state at every scrape.
struct CollectorScrape {
    collector: Arc<Collector>,
}

impl fmt::Debug for CollectorScrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollectorScrape").finish_non_exhaustive()
    }
}

impl PrometheusCollector for CollectorScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (graph, _) = self.collector.merged_graph();
        let (nodes, journal_path, journal_errors, invalid) = {
            let inner = self.collector.lock();
            let nodes: Vec<NodeValues> = inner
                .nodes
                .iter()
                .map(|(name, state)| NodeValues {
                    labels: [("node", name.clone())],
                    connected: state.stream.is_some(),
                    received: state.cursor.received,
                    lost: state.cursor.lost,
                    duplicates: state.duplicates,
                    rejected_streams: state.rejected_streams,
                    unacknowledged: state.unacknowledged,
                })
                .collect();
            let path = inner.journal.as_ref().map(|journal| journal.path().to_path_buf());
            (nodes, path, inner.journal_errors, inner.invalid_deviations)
        };

        let connected = nodes.iter().filter(|node| node.connected).count() as u64;
        encode_gauge(&mut encoder, "collector_nodes_connected", "Agents with an open push stream", connected)?;
        encode_gauge(&mut encoder, "collector_nodes", "Nodes the collector has state for, connected or not", nodes.len() as u64)?;
        let per_node: [(&str, &str, fn(&NodeValues) -> u64); 4] = [
            ("collector_deviations_received", "Deviations stored from each node, resends after a reconnect excluded", |node| node.received),
            ("collector_deviations_lost", "Deviations each node reported lost before it could push them (gaps), or that the collector could not read", |node| node.lost),
            ("collector_deviations_duplicate", "Deviations a node sent again that the collector had already stored", |node| node.duplicates),
            ("collector_streams_rejected", "Push streams rejected because another agent process had a stream open under the same node name", |node| node.rejected_streams),
        ];
        for (name, help, value) in per_node {
            let mut family = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            for node in &nodes {
                ConstCounter::new(value(node)).encode(family.encode_family(&node.labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "collector_node_unacknowledged",
            "Deviations each node had published but the collector had not acknowledged, as the node reported with its latest snapshot",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for node in &nodes {
            ConstGauge::new(to_gauge(node.unacknowledged)).encode(family.encode_family(&node.labels)?)?;
        }

        if let Some(path) = journal_path {
            // A failed stat (the file is being replaced by a compaction) reports 0 for this scrape.
            let bytes = std::fs::metadata(&path).map_or(0, |metadata| metadata.len());
            encode_gauge(&mut encoder, "collector_journal_bytes", "Size of the journal file in bytes", bytes)?;
        }
        encode_counter(&mut encoder, "collector_journal_errors", "Journal writes and rewrites that failed", journal_errors)?;
        encode_counter(&mut encoder, "collector_invalid_deviations", "Pushed deviations the collector could not read, recorded as lost", invalid)?;

        let hub = self.collector.hub.counters();
        encode_gauge(&mut encoder, "subscribers", "Deviation stream subscribers connected now", hub.subscribers)?;
        encode_counter(
            &mut encoder,
            "subscriber_deviations_dropped",
            "Deviations subscribers missed because they read too slowly, summed over subscribers",
            hub.dropped_slow,
        )?;
        let mut family = encoder.encode_descriptor(
            "deviations",
            "Deviations of the whole fleet published, by category and severity",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (category, severity, count) in self.collector.hub.published_by_kind() {
            let labels = [("category", category.as_str()), ("severity", severity.as_str())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }

        encode_gauge(&mut encoder, "graph_nodes", "Nodes of the merged graph of the fleet", graph.nodes.len() as u64)?;
        encode_gauge(&mut encoder, "graph_edges", "Edges of the merged graph of the fleet", graph.edges.len() as u64)?;
        Ok(())
    }
}

fn to_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn encode_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    let counter = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    counter.encode(metric)
}

fn encode_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    let gauge = ConstGauge::new(to_gauge(value));
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}
