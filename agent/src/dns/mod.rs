//! DNS names for remote addresses, learned from the answers processes receive.
//!
//! The kernel reports the first datagram (or the connect) of every UDP socket that talks to port
//! 53, with the socket's cookie, and copies every datagram from port 53 delivered to a socket in
//! scope, with the same cookie. [`DnsNames`] joins the two, so each answer is known to come to a
//! socket of an observed process, parses it, and keeps address -> name for the names that
//! process asked for. Flows to those addresses then carry the name.
//!
//! NOTE: names are kept per address, not per process or network namespace, so an address that
//! two processes know by different names carries the name learned last.

pub mod cache;
pub mod message;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub use cache::{NameCache, NameCacheStats};

use crate::telemetry::event::DnsEvent;

/// Bounds of [`DnsNames`].
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Addresses with a name kept at once.
    pub max_names: usize,
    /// DNS sockets (cookie to process) remembered at once; the oldest goes first.
    pub max_sockets: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { max_names: 65_536, max_sockets: 4096 }
    }
}

/// Counters of DNS processing, for the status call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Messages from port 53 the kernel delivered.
    pub messages: u64,
    /// Messages that were not valid DNS, or whose answer section ended early.
    pub parse_errors: u64,
    /// Messages to a socket whose query the agent did not see (its socket was forgotten, or it
    /// was opened before the agent started).
    pub unmatched: u64,
    /// Messages cut at the kernel's capture limit.
    pub cut: u64,
    /// Address-to-name entries learned.
    pub names_learned: u64,
    /// DNS sockets forgotten because the socket table was full.
    pub sockets_evicted: u64,
    pub cache: NameCacheStats,
}

/// The process that owns a DNS socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsSocket {
    pub pid: u32,
    pub netns: u32,
}

/// What one answer taught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The process that asked, when its query was seen.
    pub asker: Option<DnsSocket>,
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// DNS sockets, parsed answers and the address-to-name cache. The pipeline task owns it.
#[derive(Debug)]
pub struct DnsNames {
    max_sockets: usize,
    sockets: HashMap<u64, DnsSocket>,
    socket_order: VecDeque<u64>,
    names: NameCache,
    stats: DnsStats,
}

impl DnsNames {
    pub fn new(config: &DnsConfig) -> DnsNames {
        DnsNames {
            max_sockets: config.max_sockets.max(1),
            sockets: HashMap::new(),
            socket_order: VecDeque::new(),
            names: NameCache::new(config.max_names),
            stats: DnsStats::default(),
        }
    }

    /// Remembers that the socket with `cookie` sent a query for process `pid`.
    pub fn on_query_socket(&mut self, cookie: u64, socket: DnsSocket) {
        if self.sockets.insert(cookie, socket).is_some() {
            return;
        }
        self.socket_order.push_back(cookie);
        while self.sockets.len() > self.max_sockets {
            let Some(oldest) = self.socket_order.pop_front() else { break };
            if self.sockets.remove(&oldest).is_some() {
                self.stats.sockets_evicted += 1;
            }
        }
    }

    /// Parses one message and learns the names of the addresses it answers with. Returns what it
    /// learned, or `None` when the message was no usable answer.
    pub fn on_message(&mut self, event: &DnsEvent, now: Instant) -> Option<Learned> {
        self.stats.messages += 1;
        if event.message_len as usize > event.message.len() {
            self.stats.cut += 1;
        }
        let asker = self.sockets.get(&event.cookie).copied();
        if asker.is_none() {
            self.stats.unmatched += 1;
        }
        let message = match message::parse(&event.message) {
            Ok(message) => message,
            Err(error) => {
                self.stats.parse_errors += 1;
                tracing::debug!(%error, server = %event.server, "invalid DNS message");
                return None;
            }
        };
        if let Some(error) = &message.incomplete {
            self.stats.parse_errors += 1;
            tracing::debug!(%error, server = %event.server, "DNS answer section ends early; using the records before");
        }
        let (name, _) = message.question.as_ref()?;
        let resolved = message.resolved_addresses();
        if resolved.is_empty() {
            return None;
        }
        for (address, ttl) in &resolved {
            self.names.insert(*address, name, Duration::from_secs(u64::from(*ttl)), now);
            self.stats.names_learned += 1;
        }
        Some(Learned {
            asker,
            name: name.clone(),
            addresses: resolved.into_iter().map(|(address, _)| address).collect(),
        })
    }

    /// Returns the name a process asked for that resolved to `address`, while its TTL lasts.
    pub fn name_of(&self, address: IpAddr, now: Instant) -> Option<&str> {
        self.names.lookup(address, now)
    }

    /// Removes expired names.
    pub fn expire(&mut self, now: Instant) {
        self.names.expire(now);
    }

    pub fn stats(&self) -> DnsStats {
        DnsStats { cache: self.names.stats(), ..self.stats.clone() }
    }
}
