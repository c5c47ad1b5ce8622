//! Deviations: what the comparison raises, with the evidence and how to resolve it.

use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::observation::{ProcessInfo, Protocol};

/// What kind of drift a deviation reports. The discriminants are stable: the API carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// An observed flow matches no declared flow.
    UnexpectedFlow = 1,
    /// An undeclared flow crosses zones.
    TrustBoundaryCrossing = 2,
    /// A program runs in a component that does not list it.
    UnexpectedExecutable = 3,
    /// A component listens on a port it does not declare.
    NewListener = 4,
    /// Network activity from a process that matches no component.
    UnknownComponent = 5,
    /// A remote endpoint that matches no component or zone.
    UnattributedEndpoint = 6,
    /// Observed edges open a path from an exposed component to a critical one.
    NewAttackPath = 7,
    /// A declared flow not seen in a window.
    DeclaredFlowUnused = 8,
    /// A flow the model declares as denied was attempted and connected.
    ControlFailed = 9,
    /// Events were lost; verdicts for the window are degraded.
    TelemetryGap = 10,
}

impl Category {
    pub const ALL: [Category; 10] = [
        Category::UnexpectedFlow,
        Category::TrustBoundaryCrossing,
        Category::UnexpectedExecutable,
        Category::NewListener,
        Category::UnknownComponent,
        Category::UnattributedEndpoint,
        Category::NewAttackPath,
        Category::DeclaredFlowUnused,
        Category::ControlFailed,
        Category::TelemetryGap,
    ];

    /// The kebab-case name used in deviation ids, filters and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::UnexpectedFlow => "unexpected-flow",
            Category::TrustBoundaryCrossing => "trust-boundary-crossing",
            Category::UnexpectedExecutable => "unexpected-executable",
            Category::NewListener => "new-listener",
            Category::UnknownComponent => "unknown-component",
            Category::UnattributedEndpoint => "unattributed-endpoint",
            Category::NewAttackPath => "new-attack-path",
            Category::DeclaredFlowUnused => "declared-flow-unused",
            Category::ControlFailed => "control-failed",
            Category::TelemetryGap => "telemetry-gap",
        }
    }

    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Ranks categories of equal severity for the stream, 0 first. Evidence that a control or the
    /// model's boundaries are already broken comes before drift that may be benign, and
    /// informational categories come last.
    pub fn priority_rank(self) -> u8 {
        match self {
            Category::ControlFailed => 0,
            Category::NewAttackPath => 1,
            Category::TrustBoundaryCrossing => 2,
            Category::UnexpectedExecutable => 3,
            Category::TelemetryGap => 4,
            Category::UnknownComponent => 5,
            Category::NewListener => 6,
            Category::UnexpectedFlow => 7,
            Category::UnattributedEndpoint => 8,
            Category::DeclaredFlowUnused => 9,
        }
    }

    /// Returns the STRIDE class a deviation of this category points at.
    pub fn stride(self) -> Stride {
        match self {
            // Traffic the model does not expect is the path by which data leaves a component.
            Category::UnexpectedFlow | Category::UnattributedEndpoint => {
                Stride::InformationDisclosure
            }
            // Reaching a zone, a program or a path the model does not grant is gaining privilege.
            Category::TrustBoundaryCrossing
            | Category::UnexpectedExecutable
            | Category::NewAttackPath
            | Category::ControlFailed => Stride::ElevationOfPrivilege,
            // A new listening socket changes what the component exposes.
            Category::NewListener => Stride::Tampering,
            // A process that matches no component has an identity that no declaration vouches for.
            Category::UnknownComponent => Stride::Spoofing,
            // An unused declaration or lost events both weaken the record of what happened.
            Category::DeclaredFlowUnused | Category::TelemetryGap => Stride::Repudiation,
        }
    }
}

/// Severity on five levels, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low = 1,
    Medium = 2,
    Elevated = 3,
    High = 4,
    Critical = 5,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Low,
        Severity::Medium,
        Severity::Elevated,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::Elevated => "elevated",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(name: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// STRIDE threat class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stride {
    Spoofing = 1,
    Tampering = 2,
    Repudiation = 3,
    InformationDisclosure = 4,
    DenialOfService = 5,
    ElevationOfPrivilege = 6,
}

/// The facts behind a deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The process that acted (connected, listened, ran), when one did.
    pub process: Option<ProcessInfo>,
    /// The process on the other end of a flow, when it is on this host.
    pub peer_process: Option<ProcessInfo>,
    /// Client address of a flow, or the bound address of a listener.
    pub local_addr: Option<SocketAddr>,
    /// Server address of a flow.
    pub remote_addr: Option<SocketAddr>,
    pub source_zone: Option<String>,
    pub destination_zone: Option<String>,
    /// Network namespace inode, 0 when unknown.
    pub netns: u32,
    /// The DNS name the acting process asked for that resolved to the remote address, when the
    /// agent saw the answer and its TTL has not run out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_name: Option<String>,
}

/// One deviation between the observed system and the declared model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deviation {
    /// Stable id `category@source@destination@proto/port`; exceptions match it with wildcards.
    /// Categories without a port leave out the last part: `unexpected-executable@web@/bin/bash`.
    pub id: String,
    pub category: Category,
    pub severity: Severity,
    pub stride: Stride,
    /// One sentence that explains the deviation to an operator.
    pub summary: String,
    /// Source component id (or a discovered name such as `unknown:/usr/bin/curl`).
    pub source: String,
    /// Destination component, zone or address; empty where the category has none.
    pub destination: String,
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
    pub evidence: Evidence,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// How many times it was observed.
    pub count: u64,
    /// Model YAML that would declare what was observed, if it is intended.
    pub resolution: String,
}

impl Deviation {
    /// Orders deviations for an operator, most urgent first: higher severity, then the category
    /// rank of [`Category::priority_rank`], then the earlier first sighting, then the id.
    pub fn priority_cmp(&self, other: &Deviation) -> std::cmp::Ordering {
        other
            .severity
            .cmp(&self.severity)
            .then(
                self.category
                    .priority_rank()
                    .cmp(&other.category.priority_rank()),
            )
            .then(self.first_seen.cmp(&other.first_seen))
            .then(self.id.cmp(&other.id))
    }
}

/// Sorts deviations into the priority order of [`Deviation::priority_cmp`].
pub fn sort_by_priority(deviations: &mut [Deviation]) {
    deviations.sort_by(Deviation::priority_cmp);
}
