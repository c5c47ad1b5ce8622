//! Writing a model, or a patch to one, from a recorded observed graph.
//!
//! The input is a [`GraphSnapshot`] as `driftwatch graph --format json` prints it. The engine
//! already grouped processes that matched no component into one node per workload (the cgroup of
//! a systemd unit, a container or another dedicated cgroup) and, outside any workload, one node
//! per executable. Each such node becomes one component: selected by its unit or cgroup and
//! listing the programs seen in it, or selected by its executable. Remote addresses in no zone
//! become single-address zones. Each edge becomes a flow, with the ports of one (source,
//! destination, protocol) triple merged into one entry. A learned component listens on the ports
//! that other nodes reached it on, and is exposed when an address outside the host reached it.
//!
//! NOTE: a snapshot records only the programs and listeners that took part in a connection, so a
//! program that ran without connecting, or a port that nobody connected to, is not learned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::graph::{GraphSnapshot, NodeKind, NodeProcess};
use crate::model::Model;
use crate::observation::Protocol;

/// Zone of the learned components when the base model does not place them.
pub const LEARNED_ZONE: &str = "learned";
/// Zone of the learned components that addresses outside the host reached. It trusts less than
/// [`LEARNED_ZONE`], so an undeclared flow from an exposed component inward crosses a boundary.
pub const LEARNED_EXPOSED_ZONE: &str = "learned-exposed";

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
        names.add(node.id.as_str(), node.kind, node.zone.as_deref(), &node.processes);
    }
    let external: BTreeSet<&str> = snapshot
        .nodes
        .iter()
        .filter(|node| node.kind == NodeKind::External)
        .map(|node| node.id.as_str())
        .collect();
    for edge in &snapshot.edges {
        let Some(to) = names.name_of(&edge.destination) else {
            continue;
        };
        if let Some(component) = names.new_components.iter_mut().find(|c| c.id == to) {
            component.listens.insert((edge.protocol, edge.port));
            if external.contains(edge.source.as_str()) {
                component.exposed = true;
            }
        }
    }
    names.separate_exposed();

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
        out.push_str("# Learned by driftwatch model learn from an observed graph. Review every entry:\n# it declares what was observed, which may include what should not happen.\nversion: 1\n");
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
        write_component(&mut out, component);
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
    selector: Selector,
    /// Programs seen in a workload; empty for a component selected by its executable.
    executables: Vec<String>,
    listens: BTreeSet<(Protocol, u16)>,
    exposed: bool,
}

/// Selector of a learned component's processes.
enum Selector {
    Exe(String),
    Unit(String),
    Cgroup(String),
    /// A discovered container workload (`k8s:<namespace>/<workload>/<container>`, ...): the graph
    /// node names it but does not carry its labels.
    ContainerWorkload(String),
    /// A component of the recording's model, whose selectors the snapshot does not carry.
    FromRecording,
}

fn write_component(out: &mut String, component: &NewComponent) {
    let _ = writeln!(
        out,
        "  - id: {}\n    zone: {}",
        quote(&component.id),
        quote(&component.zone)
    );
    if component.exposed {
        out.push_str("    exposed: true\n");
    }
    match &component.selector {
        Selector::Exe(exe) => {
            let _ = writeln!(out, "    match: {{ exe: [{}] }}", quote(exe));
        }
        Selector::Unit(unit) => {
            let _ = writeln!(out, "    match: {{ unit: [{}] }}", quote(unit));
        }
        Selector::Cgroup(cgroup) => {
            let _ = writeln!(out, "    match: {{ cgroup: [{}] }}", quote(cgroup));
        }
        Selector::ContainerWorkload(workload) => {
            let _ = writeln!(
                out,
                "    # container workload {workload}: select it with match.pod or match.container labels"
            );
        }
        Selector::FromRecording => {
            out.push_str("    # declared in the recording's model; copy its match selectors here\n");
        }
    }
    if !component.listens.is_empty() {
        let listens: Vec<String> = component
            .listens
            .iter()
            .map(|(protocol, port)| match protocol {
                Protocol::Tcp => format!("{{ port: {port} }}"),
                Protocol::Udp => format!("{{ port: {port}, proto: udp }}"),
            })
            .collect();
        let _ = writeln!(out, "    listens: [{}]", listens.join(", "));
    }
    if !component.executables.is_empty() {
        let executables: Vec<String> = component.executables.iter().map(|exe| quote(exe)).collect();
        let _ = writeln!(out, "    executables: [{}]", executables.join(", "));
    }
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

    /// Moves the exposed components of [`LEARNED_ZONE`] into [`LEARNED_EXPOSED_ZONE`], and drops
    /// [`LEARNED_ZONE`] when that leaves it empty.
    fn separate_exposed(&mut self) {
        let in_learned = |c: &NewComponent| c.zone == LEARNED_ZONE;
        if !self.new_components.iter().any(|c| in_learned(c) && c.exposed) {
            return;
        }
        self.ensure_zone(LEARNED_EXPOSED_ZONE, 30, None);
        for component in self.new_components.iter_mut().filter(|c| c.zone == LEARNED_ZONE && c.exposed) {
            component.zone = LEARNED_EXPOSED_ZONE.to_owned();
        }
        if !self.new_components.iter().any(in_learned) {
            self.new_zones.retain(|zone| zone.id != LEARNED_ZONE);
        }
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

    fn add(&mut self, node: &str, kind: NodeKind, zone: Option<&str>, processes: &[NodeProcess]) {
        let known_component = self.base.is_some_and(|m| m.component(node).is_some());
        let known_zone = self.base.is_some_and(|m| m.zone(node).is_some());
        if known_component || known_zone {
            self.by_node.insert(node.to_owned(), node.to_owned());
            return;
        }
        match kind {
            NodeKind::Discovered => {
                let name = node.strip_prefix("unknown:").unwrap_or(node);
                let (wanted, selector, executables) = match name.strip_prefix("cgroup:") {
                    Some(cgroup) => {
                        let executables: BTreeSet<&str> =
                            processes.iter().map(|p| p.exe.as_str()).collect();
                        (
                            workload_name(cgroup, processes),
                            workload_selector(cgroup),
                            executables.into_iter().map(str::to_owned).collect(),
                        )
                    }
                    // Executables are absolute paths; anything else is a container workload name.
                    None if name.starts_with('/') => {
                        (component_name(name), Selector::Exe(name.to_owned()), Vec::new())
                    }
                    None => (component_name(name), Selector::ContainerWorkload(name.to_owned()), Vec::new()),
                };
                self.ensure_zone(LEARNED_ZONE, 50, None);
                let id = self.unique(&wanted);
                self.new_components.push(NewComponent {
                    id: id.clone(),
                    zone: LEARNED_ZONE.to_owned(),
                    selector,
                    executables,
                    listens: BTreeSet::new(),
                    exposed: false,
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
                    selector: Selector::FromRecording,
                    executables: Vec::new(),
                    listens: BTreeSet::new(),
                    exposed: false,
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

/// Names a workload's component: `container-<first 12 digits of the id>` for a container, else
/// the cgroup's last segment without a unit suffix (`/system.slice/nginx.service` gives `nginx`).
fn workload_name(cgroup: &str, processes: &[NodeProcess]) -> String {
    let last = cgroup.rsplit('/').next().unwrap_or(cgroup);
    let container = processes
        .iter()
        .find_map(|p| p.container.clone())
        .or_else(|| container_id_in(last).map(str::to_owned));
    if let Some(id) = container {
        return format!("container-{}", &id[..id.len().min(12)]);
    }
    let unit = last
        .strip_suffix(".service")
        .or_else(|| last.strip_suffix(".scope"))
        .unwrap_or(last);
    let name = slug(unit);
    if name.is_empty() {
        "learned-component".to_owned()
    } else {
        name
    }
}

/// Finds a 64-hex-digit container id in a cgroup segment such as `docker-<id>.scope`.
fn container_id_in(segment: &str) -> Option<&str> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = name.rsplit('-').next().unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Selects a systemd service by its unit name, which holds wherever the unit's slice is, and any
/// other workload by its exact cgroup.
fn workload_selector(cgroup: &str) -> Selector {
    let last = cgroup.rsplit('/').next().unwrap_or(cgroup);
    if last.ends_with(".service") {
        Selector::Unit(last.to_owned())
    } else {
        Selector::Cgroup(cgroup.to_owned())
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
