//! Raw process and socket events for subscribers that ask for them.
//!
//! The pipeline turns each kernel event into a [`RawEvent`] only when a subscriber wants its kind
//! ([`EventHub::wants`], one atomic load), so an agent without such a subscriber pays nothing for
//! events. The [`EventHub`] numbers events in a sequence of their own and keeps them in a bounded
//! ring apart from the deviation history, so a burst of events never evicts deviations.

mod build;
pub mod hub;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use driftwatch_model::observation::{ProcessInfo, Protocol};

pub use build::EventBuilder;
pub use hub::{EventHub, EventHubConfig, EventHubCounters, EventMessage, EventSubscription};

/// Kind of a raw event. The discriminant is the kind's bit in an [`EventKinds`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    ProcessExec,
    ProcessFork,
    ProcessExit,
    TcpConnect,
    TcpEstablished,
    TcpConnectFailed,
    TcpAccept,
    TcpListen,
    TcpClose,
    UdpFlow,
    DnsAnswer,
    UdpListen,
}

impl EventKind {
    /// Every kind, in the order of its number in the API.
    pub const ALL: [EventKind; 12] = [
        EventKind::ProcessExec,
        EventKind::ProcessFork,
        EventKind::ProcessExit,
        EventKind::TcpConnect,
        EventKind::TcpEstablished,
        EventKind::TcpConnectFailed,
        EventKind::TcpAccept,
        EventKind::TcpListen,
        EventKind::TcpClose,
        EventKind::UdpFlow,
        EventKind::DnsAnswer,
        EventKind::UdpListen,
    ];

    /// Returns the kind's name on the command line and in JSON lines, such as `tcp-close`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ProcessExec => "process-exec",
            EventKind::ProcessFork => "process-fork",
            EventKind::ProcessExit => "process-exit",
            EventKind::TcpConnect => "tcp-connect",
            EventKind::TcpEstablished => "tcp-established",
            EventKind::TcpConnectFailed => "tcp-connect-failed",
            EventKind::TcpAccept => "tcp-accept",
            EventKind::TcpListen => "tcp-listen",
            EventKind::TcpClose => "tcp-close",
            EventKind::UdpFlow => "udp-flow",
            EventKind::DnsAnswer => "dns-answer",
            EventKind::UdpListen => "udp-listen",
        }
    }

    /// Parses a name that [`EventKind::as_str`] returns.
    pub fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of event kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKinds(u32);

impl EventKinds {
    pub const NONE: EventKinds = EventKinds(0);

    pub fn all() -> EventKinds {
        EventKind::ALL.into_iter().collect()
    }

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn insert(&mut self, kind: EventKind) {
        self.0 |= kind.bit();
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Returns the kinds in the set, in [`EventKind::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = EventKind> {
        EventKind::ALL.into_iter().filter(move |kind| self.contains(*kind))
    }
}

impl FromIterator<EventKind> for EventKinds {
    fn from_iter<I: IntoIterator<Item = EventKind>>(kinds: I) -> Self {
        let mut set = EventKinds::NONE;
        for kind in kinds {
            set.insert(kind);
        }
        set
    }
}

/// A component or remote node an event resolved to, with its zone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub component: String,
    pub zone: Option<String>,
}

/// One raw event, ready for subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub kind: EventKind,
    /// Kernel time of the event, converted to wall-clock time.
    pub time: SystemTime,
    /// The process that acted, when the process table has it.
    pub process: Option<Arc<ProcessInfo>>,
    /// Component and zone of the process under the model in force; default when there is no process.
    pub placement: Placement,
    pub detail: EventDetail,
}

/// The kind-specific part of a [`RawEvent`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventDetail {
    Exec,
    Fork {
        child_pid: u32,
    },
    Exit {
        exit_code: Option<i32>,
    },
    Socket(SocketDetail),
    DnsAnswer {
        name: String,
        addresses: Vec<IpAddr>,
        server: SocketAddr,
    },
}

/// The connection or listener of a socket event.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketDetail {
    pub protocol: Protocol,
    pub local: SocketAddr,
    /// Unspecified for a listener.
    pub remote: SocketAddr,
    pub netns: u32,
    /// Payload bytes sent; set in a TCP close only.
    pub bytes_sent: u64,
    /// Payload bytes received; set in a TCP close only.
    pub bytes_received: u64,
    /// errno of a failed connect, 0 otherwise.
    pub error: i32,
    pub remote_name: Option<String>,
    /// Component and zone of the remote address; default for a listener.
    pub remote_placement: Placement,
    /// True for a UDP flow whose first datagram was a server's reply to the remote client.
    pub is_reply: bool,
    /// True for a UDP flow the local process read: `remote` sent the datagram.
    pub received: bool,
}
