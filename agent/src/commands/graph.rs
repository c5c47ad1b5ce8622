//! `driftwatch graph`: print an agent's observed-communication graph as JSON or Graphviz DOT.

use std::io::{self, Write};

use anyhow::Context as _;
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_proto::v1 as pb;

use super::watch::times_to_rfc3339;
use crate::api::client::with_tls_advice;
use crate::api::{connect_with, convert, ClientTlsArgs, ListenAddr};

/// Arguments of `driftwatch graph`.
#[derive(Debug, Clone, clap::Args)]
pub struct GraphArgs {
    /// Agent API address: unix:/path/to.sock, IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
    pub api: ListenAddr,

    #[command(flatten)]
    pub tls: ClientTlsArgs,

    /// Output format: json, or dot for Graphviz (`driftwatch graph --format dot | dot -Tsvg`).
    #[arg(long, value_enum, default_value_t = GraphFormat::Json)]
    pub format: GraphFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Json,
    Dot,
}

/// Fetches the graph from the agent and prints it to stdout.
///
/// # Errors
///
/// Fails when the agent cannot be reached, sends a graph this build cannot read, or stdout fails.
pub async fn run(args: GraphArgs) -> anyhow::Result<()> {
    let mut client = connect_with(&args.api, &args.tls).await?;
    let graph = client
        .get_graph(pb::GetGraphRequest {})
        .await
        .with_context(|| format!("failed to get the graph from the agent at {}", args.api))
        .map_err(|error| with_tls_advice(error, &args.api))?
        .into_inner();
    let graph = convert::graph_from_proto(graph).with_context(|| {
        format!(
            "the agent at {} sent a graph this build cannot read",
            args.api
        )
    })?;

    let text = match args.format {
        GraphFormat::Json => to_json(&graph)?,
        GraphFormat::Dot => graph.to_dot(),
    };
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            Err(err).context("failed to write to stdout")
        }
        _ => Ok(()),
    }
}

fn to_json(graph: &GraphSnapshot) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(graph).context("failed to encode the graph as JSON")?;
    times_to_rfc3339(&mut value);
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use driftwatch_model::graph::{EdgeSnapshot, NodeKind, NodeSnapshot};
    use driftwatch_model::observation::Protocol;

    use super::*;

    fn sample_graph() -> GraphSnapshot {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        GraphSnapshot {
            nodes: vec![
                NodeSnapshot {
                    id: "web".into(),
                    kind: NodeKind::Declared,
                    zone: Some("dmz".into()),
                    processes: Vec::new(),
                },
                NodeSnapshot {
                    id: "unknown:/usr/bin/cu\"rl".into(),
                    kind: NodeKind::Discovered,
                    zone: None,
                    processes: Vec::new(),
                },
            ],
            edges: vec![EdgeSnapshot {
                source: "unknown:/usr/bin/cu\"rl".into(),
                destination: "web".into(),
                protocol: Protocol::Tcp,
                port: 443,
                declared: false,
                first_seen: time,
                last_seen: time,
                connections: 3,
                examples: vec![(42, "/usr/bin/curl".into())],
                remote_names: vec![],
            }],
        }
    }

    #[test]
    fn json_writes_times_as_rfc3339() {
        let json = to_json(&sample_graph()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value["edges"][0]["first_seen"],
            "2023-11-14T22:13:20.000000000Z"
        );
        assert_eq!(value["edges"][0]["port"], 443);
        assert_eq!(value["nodes"][0]["kind"], "declared");
    }
}
