//! `driftwatch model diff OLD NEW`: what a change added to or removed from the flows, listeners
//! and executables, between two recorded graphs (`driftwatch check --record`) or two models.
//!
//! From a recorded graph, a flow is an edge (source, destination, protocol, port). A listener is
//! the destination and port of an edge whose destination is a process on the host (a declared or
//! discovered component). An executable is one that the edge examples name. A graph keeps a few
//! example processes per edge, so executables seen only on busy edges can be missing. From a model,
//! they are the declared flows, each component's `listens` and each component's `executables`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use driftwatch_model::graph::{GraphSnapshot, NodeKind};
use driftwatch_model::Model;

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The earlier graph (JSON from `driftwatch check --record`) or model (YAML).
    pub old: PathBuf,
    /// The later graph or model, of the same kind as OLD.
    pub new: PathBuf,
    /// Exit with status 1 when NEW adds a flow, listener or executable, so CI can require a review.
    #[arg(long)]
    pub fail_on_added: bool,
}

/// The comparable facts of one graph or model.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Surface {
    /// `source -> destination proto/port`.
    pub flows: BTreeSet<String>,
    /// `component proto/port`.
    pub listeners: BTreeSet<String>,
    /// `component: executable` (a path, or a glob from a model).
    pub executables: BTreeSet<String>,
}

impl Surface {
    pub fn from_graph(graph: &GraphSnapshot) -> Surface {
        let mut surface = Surface::default();
        let local_nodes: BTreeSet<&str> = graph
            .nodes
            .iter()
            .filter(|node| matches!(node.kind, NodeKind::Declared | NodeKind::Discovered))
            .map(|node| node.id.as_str())
            .collect();
        for edge in &graph.edges {
            let protocol = edge.protocol.as_str();
            surface.flows.insert(format!("{} -> {} {protocol}/{}", edge.source, edge.destination, edge.port));
            if local_nodes.contains(edge.destination.as_str()) {
                surface.listeners.insert(format!("{} {protocol}/{}", edge.destination, edge.port));
            }
            // The examples are the processes that made the connections, so they belong to the source.
            for (_, exe) in &edge.examples {
                surface.executables.insert(format!("{}: {exe}", edge.source));
            }
        }
        surface
    }

    pub fn from_model(model: &Model) -> Surface {
        let mut surface = Surface::default();
        for flow in &model.flows {
            for port in &flow.ports {
                surface.flows.insert(format!("{} -> {} {}/{port}", flow.from, flow.to, flow.protocol.as_str()));
            }
        }
        for component in &model.components {
            for listen in &component.listens {
                let address = listen.address.map(|address| format!(" at {address}")).unwrap_or_default();
                surface.listeners.insert(format!("{} {}/{}{address}", component.id, listen.protocol.as_str(), listen.port));
            }
            for pattern in &component.executables.patterns {
                surface.executables.insert(format!("{}: {pattern}", component.id));
            }
        }
        surface
    }
}

/// The entries NEW has and OLD lacks (added), and the reverse (removed).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SurfaceDiff {
    pub added: Surface,
    pub removed: Surface,
}

impl SurfaceDiff {
    pub fn between(old: &Surface, new: &Surface) -> SurfaceDiff {
        let difference = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.difference(b).cloned().collect();
        SurfaceDiff {
            added: Surface {
                flows: difference(&new.flows, &old.flows),
                listeners: difference(&new.listeners, &old.listeners),
                executables: difference(&new.executables, &old.executables),
            },
            removed: Surface {
                flows: difference(&old.flows, &new.flows),
                listeners: difference(&old.listeners, &new.listeners),
                executables: difference(&old.executables, &new.executables),
            },
        }
    }

    pub fn has_additions(&self) -> bool {
        !(self.added.flows.is_empty() && self.added.listeners.is_empty() && self.added.executables.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        *self == SurfaceDiff::default()
    }

    /// Renders the diff as `+`/`-` lines under one heading per kind, leaving out empty kinds.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let sections = [
            ("flows", &self.added.flows, &self.removed.flows),
            ("listeners", &self.added.listeners, &self.removed.listeners),
            ("executables", &self.added.executables, &self.removed.executables),
        ];
        for (title, added, removed) in sections {
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{title}:");
            for line in added {
                let _ = writeln!(out, "  + {line}");
            }
            for line in removed {
                let _ = writeln!(out, "  - {line}");
            }
        }
        if out.is_empty() {
            out.push_str("no added or removed flows, listeners or executables\n");
        }
        out
    }
}

/// Compares two recorded graphs or two models and prints what was added and removed.
///
/// Exits with status 0, or 1 with `--fail-on-added` when something was added; errors (unreadable
/// files, an invalid model, one graph and one model) are returned.
pub fn run(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let old = load_surface(&args.old)?;
    let new = load_surface(&args.new)?;
    anyhow::ensure!(
        old.0 == new.0,
        "{} is a {} but {} is a {}: compare two recorded graphs or two models",
        args.old.display(),
        old.0,
        args.new.display(),
        new.0
    );
    let diff = SurfaceDiff::between(&old.1, &new.1);
    print!("{}", diff.render());
    if args.fail_on_added && diff.has_additions() {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a file as a recorded graph when it is JSON, else as a model; returns the kind's name too.
fn load_surface(path: &Path) -> anyhow::Result<(&'static str, Surface)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    if text.trim_start().starts_with('{') {
        let graph: GraphSnapshot = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a graph recorded by `driftwatch check --record`", path.display()))?;
        return Ok(("recorded graph", Surface::from_graph(&graph)));
    }
    match Model::parse(&text, &path.display().to_string()) {
        Ok(model) => Ok(("model", Surface::from_model(&model))),
        Err(errors) => anyhow::bail!("{errors}\n{} is an invalid model ({} errors)", path.display(), errors.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_MODEL: &str = r#"version: 1
zones:
  - { id: dmz, trust: 40 }
components:
  - id: web
    zone: dmz
    match: { exe: ["/usr/sbin/nginx"] }
    listens: [{ port: 443 }]
  - id: db
    zone: dmz
    match: { exe: ["/usr/bin/postgres"] }
    listens: [{ port: 5432 }]
flows:
  - { from: web, to: db, port: 5432 }
"#;

    #[test]
    fn model_diff_lists_added_and_removed() {
        let new_text = OLD_MODEL
            .replace("listens: [{ port: 443 }]", "listens: [{ port: 443 }, { port: 8443 }]")
            .replace("{ from: web, to: db, port: 5432 }", "{ from: db, to: web, port: 443 }");
        let old = Surface::from_model(&Model::parse(OLD_MODEL, "old.yaml").unwrap());
        let new = Surface::from_model(&Model::parse(&new_text, "new.yaml").unwrap());
        let diff = SurfaceDiff::between(&old, &new);

        assert_eq!(diff.added.flows.iter().collect::<Vec<_>>(), ["db -> web tcp/443"]);
        assert_eq!(diff.removed.flows.iter().collect::<Vec<_>>(), ["web -> db tcp/5432"]);
        assert_eq!(diff.added.listeners.iter().collect::<Vec<_>>(), ["web tcp/8443"]);
        assert!(diff.removed.listeners.is_empty());
        assert!(diff.has_additions());
        let text = diff.render();
        assert!(text.contains("  + db -> web tcp/443"), "{text}");
        assert!(text.contains("  - web -> db tcp/5432"), "{text}");
    }

    #[test]
    fn identical_models_have_empty_diff() {
        let model = Surface::from_model(&Model::parse(OLD_MODEL, "m.yaml").unwrap());
        let diff = SurfaceDiff::between(&model, &model);
        assert!(diff.is_empty());
        assert!(!diff.has_additions());
        assert_eq!(diff.render(), "no added or removed flows, listeners or executables\n");
    }

    #[test]
    fn graph_diff_reports_new_edge_listener_and_executable() {
        let old: GraphSnapshot = serde_json::from_value(serde_json::json!({
            "nodes": [
                { "id": "app", "kind": "declared", "zone": "ci" },
                { "id": "local", "kind": "external", "zone": "local" }
            ],
            "edges": [edge("app", "local", 80, "/usr/bin/curl")]
        }))
        .unwrap();
        let mut new = old.clone();
        new.nodes.push(serde_json::from_value(serde_json::json!({ "id": "db", "kind": "declared", "zone": "ci" })).unwrap());
        new.edges.push(serde_json::from_value(edge("app", "db", 5432, "/usr/bin/psql")).unwrap());

        let diff = SurfaceDiff::between(&Surface::from_graph(&old), &Surface::from_graph(&new));
        assert_eq!(diff.added.flows.iter().collect::<Vec<_>>(), ["app -> db tcp/5432"]);
        assert_eq!(diff.added.listeners.iter().collect::<Vec<_>>(), ["db tcp/5432"]);
        assert_eq!(diff.added.executables.iter().collect::<Vec<_>>(), ["app: /usr/bin/psql"]);
        assert!(diff.removed.flows.is_empty());
    }

    fn edge(source: &str, destination: &str, port: u16, exe: &str) -> serde_json::Value {
        serde_json::json!({
            "source": source,
            "destination": destination,
            "protocol": "tcp",
            "port": port,
            "declared": false,
            "first_seen": { "secs_since_epoch": 0, "nanos_since_epoch": 0 },
            "last_seen": { "secs_since_epoch": 0, "nanos_since_epoch": 0 },
            "connections": 1,
            "examples": [[100, exe]]
        })
    }
}
