//! The declared threat model once loaded: zones, components, flows and exceptions, and the identity
//! rules that map a process or an address onto them.
//!
//! [`crate::load`] builds a [`Model`] from YAML and guarantees what the rest of the crate relies on:
//! ids are unique across zones and components, every reference points at a declared id, and every
//! glob and CIDR compiled.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use crate::observation::{ProcessInfo, Protocol};
use crate::pattern::IdPattern;

/// The declared model: what should exist and which flows are intended.
#[derive(Debug, Clone)]
pub struct Model {
    /// File path or name the model was parsed from.
    pub source: String,
    pub version: u32,
    pub zones: Vec<Zone>,
    pub components: Vec<Component>,
    pub flows: Vec<Flow>,
    pub exceptions: Vec<Exception>,
    pub(crate) zone_index: crate::FastMap<String, usize>,
    pub(crate) component_index: crate::FastMap<String, usize>,
    /// Every zone CIDR with its zone index, longest prefix first, so the first hit is the most
    /// specific one.
    pub(crate) cidr_table: Vec<(IpNet, usize)>,
}

/// A trust zone. A higher `trust` means more trusted (0 to 100).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    pub trust: u8,
    /// Remote addresses in these networks belong to the zone.
    pub cidrs: Vec<IpNet>,
    /// The enclosing zone. A flow that names a zone also covers the zones nested in it.
    pub parent: Option<String>,
    pub description: Option<String>,
    /// Line in the model file, for messages.
    pub line: usize,
}

/// How much damage a compromise of a component does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Criticality {
    Low,
    Medium,
    High,
    Critical,
}

impl Criticality {
    pub fn as_str(self) -> &'static str {
        match self {
            Criticality::Low => "low",
            Criticality::Medium => "medium",
            Criticality::High => "high",
            Criticality::Critical => "critical",
        }
    }

    pub fn parse(name: &str) -> Option<Criticality> {
        [
            Criticality::Low,
            Criticality::Medium,
            Criticality::High,
            Criticality::Critical,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

/// A declared component: a program or service with its identity selectors and allowed behaviour.
#[derive(Debug, Clone)]
pub struct Component {
    pub id: String,
    pub zone: String,
    /// Reachable from outside its zone (an internet-facing service, for example).
    pub exposed: bool,
    pub criticality: Criticality,
    /// `None` when the component has no `match`: such a component matches no process.
    pub selectors: Option<Selectors>,
    pub listens: Vec<Listen>,
    /// Programs the component may run; empty means the `match.exe` globs.
    pub executables: GlobList,
    /// Data classification tags (`pii`, `credentials`, ...), carried into reports and imports.
    pub data: Vec<String>,
    pub description: Option<String>,
    pub line: usize,
    pub column: usize,
}

/// The `match` selectors of a component. A process matches when every selector present matches;
/// within one selector any entry may match.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// Globs on the executable path.
    pub exe: Option<GlobList>,
    /// Globs on the cgroup v2 path.
    pub cgroup: Option<GlobList>,
    pub user: Option<Vec<UserSelector>>,
    /// Globs on the systemd unit, derived from the last `.service` or `.scope` segment of the
    /// cgroup path.
    pub unit: Option<GlobList>,
    /// Container labels that must all be present with these values (compared exactly).
    pub container: Option<BTreeMap<String, String>>,
    /// Kubernetes pod labels that must all be present with these values (compared exactly).
    pub pod: Option<BTreeMap<String, String>>,
}

/// One entry of `match.user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSelector {
    Name(String),
    Uid(u32),
}

impl UserSelector {
    fn matches(&self, process: &ProcessInfo) -> bool {
        match self {
            UserSelector::Name(name) => process.user.as_deref() == Some(name.as_str()),
            UserSelector::Uid(uid) => process.uid == *uid,
        }
    }
}

/// A declared listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub port: u16,
    pub protocol: Protocol,
    /// `None` accepts any bound address; a specific address accepts only that one, so a wider bind
    /// (`0.0.0.0` where `127.0.0.1` is declared) is a new listener.
    pub address: Option<IpAddr>,
}

impl Listen {
    pub fn allows(&self, protocol: Protocol, port: u16, address: IpAddr) -> bool {
        self.protocol == protocol
            && self.port == port
            && self
                .address
                .is_none_or(|declared| declared == address.to_canonical())
    }
}

/// A declared flow. `from` and `to` are component or zone ids; a zone id stands for every
/// component and address in that zone and in the zones nested in it. `from` is the client side.
///
/// An allowed flow (`deny: false`) is intended traffic. A denied flow is a control the model
/// expects to hold, such as a firewall rule: a connection that matches it is `control-failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub from: String,
    pub to: String,
    /// Server ports, sorted and without duplicates; never empty.
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    pub direction: Direction,
    pub deny: bool,
    pub description: Option<String>,
    pub line: usize,
}

/// Which side of a declared flow may open the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Only `from` connects to `to`.
    #[default]
    Forward,
    /// Either side may connect to the other on the flow's ports.
    Both,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Both => "both",
        }
    }
}

impl Flow {
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.binary_search(&port).is_ok()
    }
}

/// An accepted deviation: deviations whose id matches are not reported until `expires`.
#[derive(Debug, Clone)]
pub struct Exception {
    pub id: IdPattern,
    pub reason: String,
    /// Start of the expiry day (UTC); the exception applies to observations before it. `None`
    /// never expires.
    pub expires: Option<SystemTime>,
    pub line: usize,
    pub column: usize,
}

impl Exception {
    pub fn applies(&self, deviation_id: &str, time: SystemTime) -> bool {
        !self.is_expired(time) && self.id.matches(deviation_id)
    }

    pub fn is_expired(&self, time: SystemTime) -> bool {
        self.expires.is_some_and(|expires| time >= expires)
    }
}

/// Compiled globs with their source text.
#[derive(Debug, Clone)]
pub struct GlobList {
    pub patterns: Vec<String>,
    set: GlobSet,
}

impl GlobList {
    /// Compiles `patterns`. `*` and `?` stop at `/` and `**` crosses it, so
    /// `/usr/lib/postgresql/*/bin/postgres` matches one version directory.
    ///
    /// # Errors
    /// The first pattern that does not compile, with the reason.
    pub fn new(patterns: Vec<String>) -> Result<GlobList, (String, String)> {
        let mut builder = GlobSetBuilder::new();
        for pattern in &patterns {
            builder.add(compile_glob(pattern).map_err(|reason| (pattern.clone(), reason))?);
        }
        let set = builder
            .build()
            .map_err(|e| (patterns.join(", "), e.to_string()))?;
        Ok(GlobList { patterns, set })
    }

    pub fn empty() -> GlobList {
        GlobList {
            patterns: Vec::new(),
            set: GlobSet::empty(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn matches(&self, text: &str) -> bool {
        self.set.is_match(text)
    }
}

pub(crate) fn compile_glob(pattern: &str) -> Result<globset::Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| e.kind().to_string())
}

impl Selectors {
    pub fn matches(&self, process: &ProcessInfo) -> bool {
        let exe = self
            .exe
            .as_ref()
            .is_none_or(|globs| globs.matches(&process.exe));
        let cgroup = self
            .cgroup
            .as_ref()
            .is_none_or(|globs| globs.matches(&process.cgroup));
        let user = self
            .user
            .as_ref()
            .is_none_or(|users| users.iter().any(|u| u.matches(process)));
        let unit = self.unit.as_ref().is_none_or(|globs| {
            systemd_unit(&process.cgroup).is_some_and(|unit| globs.matches(unit))
        });
        let container = process.container.as_deref();
        let container_labels = self.container.as_ref().is_none_or(|required| {
            labels_match(required, container.and_then(|c| c.labels()))
        });
        let pod_labels = self.pod.as_ref().is_none_or(|required| {
            labels_match(required, container.and_then(|c| c.pod_labels()))
        });
        exe && cgroup && user && unit && container_labels && pod_labels
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.exe.is_none()
            && self.cgroup.is_none()
            && self.user.is_none()
            && self.unit.is_none()
            && self.container.is_none()
            && self.pod.is_none()
    }
}

/// True when every required label is present in `actual` with an equal value. Values are compared
/// exactly, as Kubernetes `matchLabels` does, not as globs. Unknown labels (`None`) match nothing,
/// so a label selector never matches a process whose labels the runtime has not returned.
pub fn labels_match(required: &BTreeMap<String, String>, actual: Option<&BTreeMap<String, String>>) -> bool {
    let Some(actual) = actual else {
        return false;
    };
    required
        .iter()
        .all(|(name, value)| actual.get(name) == Some(value))
}

/// Returns the systemd unit a cgroup path belongs to: its last segment that ends in `.service` or
/// `.scope`, so `/system.slice/nginx.service/worker` gives `nginx.service`.
pub fn systemd_unit(cgroup: &str) -> Option<&str> {
    cgroup
        .rsplit('/')
        .find(|segment| segment.ends_with(".service") || segment.ends_with(".scope"))
}

impl Component {
    /// True when the component may run `exe`. A component that declares neither `executables` nor
    /// `match.exe` places no limit on its programs.
    pub fn allows_executable(&self, exe: &str) -> bool {
        if !self.executables.is_empty() {
            return self.executables.matches(exe);
        }
        match self.selectors.as_ref().and_then(|s| s.exe.as_ref()) {
            Some(globs) if !globs.is_empty() => globs.matches(exe),
            _ => true,
        }
    }

    /// Returns the effective executable globs, for messages and resolutions.
    pub fn executable_patterns(&self) -> &[String] {
        if !self.executables.is_empty() {
            return &self.executables.patterns;
        }
        self.selectors
            .as_ref()
            .and_then(|s| s.exe.as_ref())
            .map_or(&[], |globs| globs.patterns.as_slice())
    }

    pub fn allows_listen(&self, protocol: Protocol, port: u16, address: IpAddr) -> bool {
        self.listens
            .iter()
            .any(|l| l.allows(protocol, port, address))
    }

    fn matches(&self, process: &ProcessInfo) -> bool {
        self.selectors
            .as_ref()
            .is_some_and(|s| !s.is_empty() && s.matches(process))
    }
}

/// Why a process was attributed to a component by [`Model::attribute_process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// Every selector of the component matches the process itself.
    Selectors,
    /// The process runs in the component's cgroup (and as its user, if one is declared) but is not
    /// one of its executables, such as a shell started inside the service's unit.
    Cgroup,
    /// The nearest ancestor that matches the component's `exe` (and `cgroup`, if declared) selector;
    /// the value is that ancestor's pid.
    Ancestor(u32),
}

impl Model {
    pub fn zone(&self, id: &str) -> Option<&Zone> {
        self.zone_index.get(id).map(|&i| &self.zones[i])
    }

    pub fn component(&self, id: &str) -> Option<&Component> {
        self.component_index.get(id).map(|&i| &self.components[i])
    }

    /// Returns the zone of a component.
    pub fn component_zone(&self, component: &Component) -> &Zone {
        // The loader rejects a component whose zone is not declared.
        self.zone(&component.zone)
            .expect("component zone is validated at load")
    }

    /// Resolves a process to the first component, in file order, whose selectors all match it.
    ///
    /// Selectors that a component leaves out are not checked, and a component without `match`
    /// matches nothing. Since the first match wins, declare narrower components (more selectors,
    /// more specific globs) before broader ones.
    pub fn resolve_process(&self, process: &ProcessInfo) -> Option<&Component> {
        self.components.iter().find(|c| c.matches(process))
    }

    /// Attributes a process to the component it runs inside, which may be a component whose
    /// selectors it does not fully match. The rules, first hit wins:
    ///
    /// 1. [`Model::resolve_process`].
    /// 2. The first component with a `cgroup` selector that matches the process's cgroup, and with
    ///    a `user` selector (if any) that matches its user: a program run inside a service's unit.
    /// 3. Walking the ancestry nearest first, the first ancestor whose executable matches some
    ///    component's `exe` selector, provided that component's `cgroup` selector (if any) matches
    ///    this process's cgroup: a shell started by the web server.
    pub fn attribute_process(&self, process: &ProcessInfo) -> Option<(&Component, Attribution)> {
        if let Some(component) = self.resolve_process(process) {
            return Some((component, Attribution::Selectors));
        }

        let by_cgroup = self.components.iter().find(|c| {
            let Some(selectors) = &c.selectors else {
                return false;
            };
            let Some(cgroups) = &selectors.cgroup else {
                return false;
            };
            let user = selectors
                .user
                .as_ref()
                .is_none_or(|users| users.iter().any(|u| u.matches(process)));
            cgroups.matches(&process.cgroup) && user
        });
        if let Some(component) = by_cgroup {
            return Some((component, Attribution::Cgroup));
        }

        for (pid, exe) in &process.ancestry {
            let by_ancestor = self.components.iter().find(|c| {
                let Some(selectors) = &c.selectors else {
                    return false;
                };
                let Some(exes) = &selectors.exe else {
                    return false;
                };
                let cgroup = selectors
                    .cgroup
                    .as_ref()
                    .is_none_or(|g| g.matches(&process.cgroup));
                exes.matches(exe) && cgroup
            });
            if let Some(component) = by_ancestor {
                return Some((component, Attribution::Ancestor(*pid)));
            }
        }
        None
    }

    /// Resolves an address to the zone with the most specific CIDR that contains it.
    ///
    /// IPv4-mapped IPv6 addresses resolve as IPv4. Loopback addresses get no special treatment:
    /// with a `0.0.0.0/0` zone they resolve to it unless a zone declares `127.0.0.0/8`.
    pub fn resolve_endpoint(&self, ip: IpAddr) -> Option<&Zone> {
        let ip = ip.to_canonical();
        self.cidr_table
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|&(_, i)| &self.zones[i])
    }

    /// Resolves a remote server address to a component when the declaration singles one out.
    /// That is a component that declares a listener on exactly this address and port, or else the
    /// only component of the address's zone that listens on the port without naming an address.
    pub fn resolve_remote_service(
        &self,
        ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Option<&Component> {
        let ip = ip.to_canonical();
        let exact = self.components.iter().find(|c| {
            c.listens
                .iter()
                .any(|l| l.protocol == protocol && l.port == port && l.address == Some(ip))
        });
        if exact.is_some() {
            return exact;
        }

        let zone = self.resolve_endpoint(ip)?;
        let mut candidates = self.components.iter().filter(|c| {
            c.zone == zone.id
                && c.listens
                    .iter()
                    .any(|l| l.protocol == protocol && l.port == port && l.address.is_none())
        });
        let first = candidates.next()?;
        candidates.next().is_none().then_some(first)
    }

    /// Returns true when zone `inner` is `outer` or nested in it, at any depth.
    pub fn zone_within(&self, inner: &str, outer: &str) -> bool {
        let mut current = Some(inner);
        // The loader rejects parent cycles; the bound only guards a model built by hand.
        for _ in 0..=self.zones.len() {
            let Some(id) = current else {
                return false;
            };
            if id == outer {
                return true;
            }
            current = self.zone(id).and_then(|z| z.parent.as_deref());
        }
        false
    }

    /// Returns true when an allowed flow covers traffic from `source` to `destination`.
    ///
    /// Each side is a node id (component, zone or discovered name) with the zone it belongs to. A
    /// flow naming a zone matches any node in that zone or a zone nested in it. Traffic between a
    /// component and itself is always allowed.
    pub fn flow_declared(
        &self,
        source: (&str, Option<&str>),
        destination: (&str, Option<&str>),
        protocol: Protocol,
        port: u16,
    ) -> bool {
        // A component's traffic with itself (worker to worker, a reconnect to its own port) is
        // internal to it and needs no declaration.
        if source.0 == destination.0 && self.component_index.contains_key(source.0) {
            return true;
        }
        self.matching_flow(source, destination, protocol, port, false)
            .is_some()
    }

    /// Returns the index of the first flow with the given `deny` flag that covers the traffic.
    pub fn matching_flow(
        &self,
        source: (&str, Option<&str>),
        destination: (&str, Option<&str>),
        protocol: Protocol,
        port: u16,
        deny: bool,
    ) -> Option<usize> {
        self.flows.iter().position(|f| {
            f.deny == deny && self.flow_covers(f, source, destination, protocol, port)
        })
    }

    /// True when `flow` covers traffic from `source` to `destination`.
    ///
    /// A side known only by its zone (a remote address for which the model names no component)
    /// also matches an allowed flow's component that is declared in that zone. The agent on this
    /// host cannot tell which of the zone's components the peer is; the peer's own agent judges
    /// the flow by its process. A `deny` flow matches such a side only by the zone, so a control
    /// is not reported as failed on a guess.
    pub fn flow_covers(
        &self,
        flow: &Flow,
        source: (&str, Option<&str>),
        destination: (&str, Option<&str>),
        protocol: Protocol,
        port: u16,
    ) -> bool {
        // The protocol and port are checked first: they are cheap and rule out most flows.
        if flow.protocol != protocol || !flow.allows_port(port) {
            return false;
        }
        let side_matches = |declared: &str, (node, zone): (&str, Option<&str>)| {
            declared == node
                || (self.zone_index.contains_key(declared)
                    && zone.is_some_and(|zone| self.zone_within(zone, declared)))
                || (!flow.deny
                    && self.zone_index.contains_key(node)
                    && self
                        .component(declared)
                        .is_some_and(|component| self.zone_within(&component.zone, node)))
        };
        let forward = side_matches(&flow.from, source) && side_matches(&flow.to, destination);
        let reverse = flow.direction == Direction::Both
            && side_matches(&flow.from, destination)
            && side_matches(&flow.to, source);
        forward || reverse
    }

    /// Returns the first exception in force at `time` that covers `deviation_id`.
    pub fn exception_for(&self, deviation_id: &str, time: SystemTime) -> Option<&Exception> {
        self.exceptions
            .iter()
            .find(|e| e.applies(deviation_id, time))
    }

    /// Returns the first exception that covers `deviation_id` but expired before `time`.
    pub fn expired_exception_for(
        &self,
        deviation_id: &str,
        time: SystemTime,
    ) -> Option<&Exception> {
        self.exceptions
            .iter()
            .find(|e| e.is_expired(time) && e.id.matches(deviation_id))
    }
}
