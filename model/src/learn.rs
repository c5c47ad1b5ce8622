//! Writing a model, or a patch to one, from a recorded observed graph.
//!
//! The input is a [`GraphSnapshot`] as `driftwatch graph --format json` prints it. Processes that
//! matched no component were already grouped by the engine into one `unknown:<executable>` node
//! per executable, so each becomes one component that matches that executable, not one per pid.
//! Remote addresses in no zone become single-address zones. Each edge becomes a flow, with the
//! ports of one (source, destination, protocol) triple merged into one entry.
//!
//! NOTE: a snapshot does not carry the cgroup or systemd unit of a discovered node, so learning
//! cannot split one executable run by two services (the demo tiers share one binary). Those
//! components need a base model that declares them, or a `cgroup`/`unit` selector added by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::graph::{GraphSnapshot, NodeKind};
use crate::model::Model;
use crate::observation::Protocol;

/// Zone of the learned components when the base model does not place them.
pub const LEARNED_ZONE: &str = "learned";

/// What [`learn`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// A whole model without a base; with a base, the zones, components and flows to append.
    pub yaml: String,
    pub zones: usize,
    pub components: usize,
    pub flows: usize,
}

/// Writes the model that declares everything in `snapshot`, or with `base`, only what `base`
/// does not declare yet.
pub fn learn(snapshot: &GraphSnapshot, base: Option<&Model>) -> Learned {
    let mut names = Names::new(base);
    for node in &snapshot.nodes {
        names.add(node.id.as_str(), node.kind, node.zone.as_deref());
    }

    // (source, destination, protocol) -> ports
    let mut flows: BTreeMap<(String, String, Protocol), Vec<u16>> = BTreeMap::new();
    for edge in &snapshot.edges {
        if base.is_some() && edge.declared {
            continue;
        }
        let (Some(from), Some(to)) = (
            names.name_of(&edge.source),
            names.name_of(&edge.destination),
        ) else {
            continue;
        };
        if from == to && names.is_component(&from) {
            continue;
        }
        let ports = flows.entry((from, to, edge.protocol)).or_default();
        if !ports.contains(&edge.port) {
            ports.push(edge.port);
            ports.sort_unstable();
        }
    }
    let mut out = String::new();
    if base.is_none() {
        out.push_str("# Learned by driftwatch model learn from a recorded graph. Review every entry:\n# it declares what was observed, which may include what should not happen.\nversion: 1\n");
    } else {
        out.push_str("# Learned by driftwatch model learn: append these entries to the base model's lists.\n");
    }

    out.push_str("zones:\n");
    for zone in &names.new_zones {
        let _ = write!(out, "  - {{ id: {}, trust: {}", quote(&zone.id), zone.trust);
        if let Some(cidr) = &zone.cidr {
            let _ = write!(out, ", match: {{ cidrs: [{}] }}", quote(cidr));
        }
        out.push_str(" }\n");
    }

    out.push_str("components:\n");
    for component in &names.new_components {
        let _ = writeln!(
            out,
            "  - id: {}\n    zone: {}",
            quote(&component.id),
            quote(&component.zone)
        );
        if let Some(exe) = &component.exe {
            let _ = writeln!(out, "    match: {{ exe: [{}] }}", quote(exe));
        } else if let Some(workload) = &component.workload {
            // NOTE: the graph node names the workload but does not carry its labels, so the
            // selector is left for the reader to fill in.
            let _ = writeln!(
                out,
                "    # container workload {workload}: select it with match.pod or match.container labels"
            );
        } else {
            out.push_str(
                "    # declared in the recording's model; copy its match selectors here\n",
            );
        }
    }

    out.push_str("flows:\n");
    for ((from, to, protocol), ports) in &flows {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let _ = write!(
            out,
            "  - {{ from: {}, to: {}, ports: [{}]",
            quote(from),
            quote(to),
            ports.join(", ")
        );
        if *protocol == Protocol::Udp {
            out.push_str(", proto: udp");
        }
        out.push_str(" }\n");
    }

    Learned {
        yaml: out,
        zones: names.new_zones.len(),
        components: names.new_components.len(),
        flows: flows.len(),
    }
}

struct NewZone {
    id: String,
    trust: u8,
    cidr: Option<String>,
}

struct NewComponent {
    id: String,
    zone: String,
    exe: Option<String>,
    /// The discovered container workload (`k8s:<namespace>/<workload>/<container>`, ...) when the
    /// node stands for a container rather than an executable.
    workload: Option<String>,
}

/// Maps snapshot node ids to model ids and collects the zones and components to declare.
struct Names<'m> {
    base: Option<&'m Model>,
    by_node: BTreeMap<String, String>,
    new_zones: Vec<NewZone>,
    new_components: Vec<NewComponent>,
}

impl<'m> Names<'m> {
    fn new(base: Option<&'m Model>) -> Names<'m> {
        Names {
            base,
            by_node: BTreeMap::new(),
            new_zones: Vec::new(),
            new_components: Vec::new(),
        }
    }

    fn is_component(&self, id: &str) -> bool {
        self.new_components.iter().any(|c| c.id == id)
            || self.base.is_some_and(|m| m.component(id).is_some())
    }

    fn name_of(&self, node: &str) -> Option<String> {
        self.by_node.get(node).cloned()
    }

    fn taken(&self, id: &str) -> bool {
        self.new_zones.iter().any(|z| z.id == id)
            || self.new_components.iter().any(|c| c.id == id)
            || self
                .base
                .is_some_and(|m| m.zone(id).is_some() || m.component(id).is_some())
    }

    fn unique(&self, wanted: &str) -> String {
        let mut id = wanted.to_owned();
        let mut n = 2;
        while self.taken(&id) {
            id = format!("{wanted}-{n}");
            n += 1;
        }
        id
    }

    fn ensure_zone(&mut self, id: &str, trust: u8, cidr: Option<String>) {
        let known = self.new_zones.iter().any(|z| z.id == id)
            || self.base.is_some_and(|m| m.zone(id).is_some());
        if !known {
            self.new_zones.push(NewZone {
                id: id.to_owned(),
                trust,
                cidr,
            });
        }
    }

    fn add(&mut self, node: &str, kind: NodeKind, zone: Option<&str>) {
        let known_component = self.base.is_some_and(|m| m.component(node).is_some());
        let known_zone = self.base.is_some_and(|m| m.zone(node).is_some());
        if known_component || known_zone {
            self.by_node.insert(node.to_owned(), node.to_owned());
            return;
        }
        match kind {
            NodeKind::Discovered => {
                let rest = node.strip_prefix("unknown:").unwrap_or(node);
                self.ensure_zone(LEARNED_ZONE, 50, None);
                // Executables are absolute paths; anything else is a container workload name.
                let is_path = rest.starts_with('/');
                let id = self.unique(&component_name(rest));
                self.new_components.push(NewComponent {
                    id: id.clone(),
                    zone: LEARNED_ZONE.to_owned(),
                    exe: is_path.then(|| rest.to_owned()),
                    workload: (!is_path).then(|| rest.to_owned()),
                });
                self.by_node.insert(node.to_owned(), id);
            }
            NodeKind::External => {
                if let Some(ip) = node
                    .strip_prefix("external:")
                    .and_then(|t| t.parse::<IpAddr>().ok())
                {
                    let id = self.unique(&zone_name(ip));
                    let cidr = ipnet::IpNet::from(ip).to_string();
                    self.ensure_zone(&id, 0, Some(cidr));
                    self.by_node.insert(node.to_owned(), id);
                } else {
                    // A zone of the recording's model; without its CIDRs it matches no address.
                    self.ensure_zone(node, 0, None);
                    self.by_node.insert(node.to_owned(), node.to_owned());
                }
            }
            NodeKind::Declared => {
                let zone = zone.unwrap_or(LEARNED_ZONE).to_owned();
                self.ensure_zone(&zone, 50, None);
                self.new_components.push(NewComponent {
                    id: node.to_owned(),
                    zone,
                    exe: None,
                    workload: None,
                });
                self.by_node.insert(node.to_owned(), node.to_owned());
            }
        }
    }
}

/// Derives a component id from an executable: `/usr/bin/python3.12` gives `python3-12`.
fn component_name(exe: &str) -> String {
    let base = exe.rsplit('/').next().unwrap_or(exe);
    let name = slug(base);
    if name.is_empty() {
        "learned-component".to_owned()
    } else {
        name
    }
}

fn zone_name(ip: IpAddr) -> String {
    format!("net-{}", slug(&ip.to_string()))
}

fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}
