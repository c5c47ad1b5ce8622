//! `driftwatch status`: print an agent's version, kernel hooks, counters and model in force, and
//! a collector's nodes.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use driftwatch_proto::v1 as pb;

use super::watch::format_time;
use crate::api::client::with_tls_advice;
use crate::api::{connect_with, ClientTlsArgs, ListenAddr};

/// Arguments of `driftwatch status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Agent API address: unix:/path/to.sock, IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
    pub api: ListenAddr,

    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Fetches the agent's status and prints it to stdout.
///
/// # Errors
///
/// Fails when the agent cannot be reached or stdout fails.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = connect_with(&args.api, &args.tls).await?;
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .with_context(|| format!("failed to get the status of the agent at {}", args.api))
        .map_err(|error| with_tls_advice(error, &args.api))?
        .into_inner();

    let mut stdout = io::stdout().lock();
    match write_status(&mut stdout, &status) {
        Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
            Err(err).context("failed to write to stdout")
        }
        _ => Ok(()),
    }
}

/// Writes the status as aligned text: a header line, the model, the hooks, then the counters.
pub fn write_status(out: &mut impl Write, status: &pb::AgentStatus) -> io::Result<()> {
    let uptime = status
        .uptime
        .and_then(|uptime| Duration::try_from(uptime).ok())
        .map(|uptime| humantime::format_duration(Duration::from_secs(uptime.as_secs())).to_string())
        .unwrap_or_else(|| "unknown".into());
    let started = status.started_at.and_then(time_from_proto).map(format_time);
    write!(out, "driftwatch {}, up {uptime}", status.version)?;
    match started {
        Some(started) => writeln!(out, " (since {started})")?,
        None => writeln!(out)?,
    }

    match &status.model {
        Some(model) => {
            let loaded = model.loaded_at.and_then(time_from_proto).map(format_time);
            writeln!(out, "model      {}", model.path)?;
            writeln!(
                out,
                "           loaded {}",
                loaded.as_deref().unwrap_or("at an unknown time")
            )?;
            writeln!(
                out,
                "           {} zone(s), {} component(s), {} flow(s)",
                model.zones, model.components, model.flows
            )?;
        }
        None => writeln!(out, "model      none loaded")?,
    }
    writeln!(
        out,
        "sequence   last {}, oldest retained {}",
        status.last_sequence, status.oldest_retained_sequence
    )?;

    writeln!(out, "\nhooks")?;
    if status.hooks.is_empty() {
        writeln!(out, "  (none reported)")?;
    }
    for hook in &status.hooks {
        if hook.attached {
            writeln!(out, "  attached      {}", hook.name)?;
        } else {
            writeln!(out, "  NOT ATTACHED  {}: {}", hook.name, hook.error)?;
        }
    }

    if !status.nodes.is_empty() {
        writeln!(out, "\nnodes")?;
        for node in &status.nodes {
            let state = if node.connected { "connected" } else { "disconnected" };
            writeln!(
                out,
                "  {:<12}  {} {state}, acknowledged {}, received {}, duplicates {}, lost {}",
                node.name, node.version, node.acknowledged_sequence, node.received, node.duplicates, node.lost
            )?;
        }
    }

    writeln!(out, "\ncounters")?;
    let width = status
        .counters
        .iter()
        .map(|counter| counter.name.len())
        .max()
        .unwrap_or(0);
    for counter in &status.counters {
        writeln!(out, "  {:<width$}  {}", counter.name, counter.value)?;
    }
    Ok(())
}

fn time_from_proto(timestamp: prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(timestamp).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_lists_failed_hook_with_its_error() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let status = pb::AgentStatus {
            version: "0.1.0".into(),
            started_at: Some(started.into()),
            uptime: Some(prost_types::Duration {
                seconds: 3723,
                nanos: 5,
            }),
            hooks: vec![
                pb::HookStatus {
                    name: "sched_process_exec".into(),
                    attached: true,
                    error: String::new(),
                },
                pb::HookStatus {
                    name: "cgroup_connect4".into(),
                    attached: false,
                    error: "cgroup2 is not mounted".into(),
                },
            ],
            counters: vec![
                pb::Counter {
                    name: "events".into(),
                    value: 10,
                },
                pb::Counter {
                    name: "api_published".into(),
                    value: 2,
                },
            ],
            model: None,
            last_sequence: 2,
            oldest_retained_sequence: 1,
            nodes: vec![pb::NodeStatus {
                name: "db-1".into(),
                connected: true,
                acknowledged_sequence: 40,
                received: 41,
                duplicates: 3,
                lost: 1,
                connected_at: None,
                version: "0.1.0".into(),
            }],
        };
        let mut out = Vec::new();
        write_status(&mut out, &status).unwrap();
        let text = String::from_utf8(out).unwrap();

        assert!(
            text.starts_with("driftwatch 0.1.0, up 1h 2m 3s (since 2023-11-14T22:13:20Z)\n"),
            "{text}"
        );
        assert!(text.contains("model      none loaded\n"), "{text}");
        assert!(
            text.contains("  attached      sched_process_exec\n"),
            "{text}"
        );
        assert!(
            text.contains("  NOT ATTACHED  cgroup_connect4: cgroup2 is not mounted\n"),
            "{text}"
        );
        assert!(text.contains("  events         10\n"), "{text}");
        assert!(text.contains("  api_published  2\n"), "{text}");
        assert!(
            text.contains(
                "\nnodes\n  db-1          0.1.0 connected, acknowledged 40, received 41, duplicates 3, lost 1\n"
            ),
            "{text}"
        );
    }
}
