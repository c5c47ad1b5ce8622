//! Conversion of kernel events into [`RawEvent`]s with the process and placement the agent has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use driftwatch_model::observation::{FlowObservation, ProcessInfo, Protocol};
use driftwatch_model::Engine;

use super::{EventDetail, EventKind, Placement, RawEvent, SocketDetail};
use crate::dns::{DnsNames, Learned};
use crate::pipeline::KernelClock;
use crate::state::process::ProcessTable;
use crate::state::udp_reply::{is_udp_reply, EphemeralPorts};
use crate::telemetry::event::{DnsEvent, Event, TcpEventKind, UdpEventKind};

/// Borrowed pipeline state that a raw event reads its process and placement from.
pub struct EventBuilder<'a> {
    pub processes: &'a ProcessTable,
    pub engine: &'a Engine,
    pub dns: &'a DnsNames,
    pub clock: KernelClock,
    /// The range that separates a UDP server's reply from a client's datagram.
    pub ephemeral_ports: EphemeralPorts,
}

impl EventBuilder<'_> {
    /// Returns the raw event kind a kernel event becomes, or `None` for one that becomes none: a
    /// credential change, or a thread's exit. A DNS message becomes a DNS answer only once the
    /// pipeline has parsed it ([`EventBuilder::dns_answer`]).
    pub fn kind_of(event: &Event) -> Option<EventKind> {
        let kind = match event {
            Event::Exec(_) => EventKind::ProcessExec,
            Event::Fork(_) => EventKind::ProcessFork,
            Event::Exit(exit) if exit.pid == exit.tid => EventKind::ProcessExit,
            Event::Exit(_) | Event::Credentials(_) | Event::Fold(_) => return None,
            Event::Tcp(tcp) => match tcp.kind {
                TcpEventKind::Connect => EventKind::TcpConnect,
                TcpEventKind::Connected | TcpEventKind::Accepted => EventKind::TcpEstablished,
                TcpEventKind::ConnectFailed => EventKind::TcpConnectFailed,
                TcpEventKind::Listen => EventKind::TcpListen,
                TcpEventKind::Close => EventKind::TcpClose,
            },
            Event::Udp(udp) if udp.kind == UdpEventKind::Bind => EventKind::UdpListen,
            Event::Udp(_) => EventKind::UdpFlow,
            Event::Dns(_) => EventKind::DnsAnswer,
            Event::Accept(_) => EventKind::TcpAccept,
        };
        Some(kind)
    }

    /// Builds the raw event for `event`, after the pipeline applied it to its state, or `None`
    /// when it becomes none (see [`EventBuilder::kind_of`]).
    pub fn build(&self, event: &Event) -> Option<RawEvent> {
        let kind = Self::kind_of(event)?;
        let raw = match event {
            Event::Exec(exec) => self.process_event(kind, exec.ktime_ns, exec.pid, EventDetail::Exec),
            Event::Fork(fork) => {
                let detail = EventDetail::Fork { child_pid: fork.child_pid };
                self.process_event(kind, fork.ktime_ns, fork.child_pid, detail)
            }
            Event::Exit(exit) => {
                let detail = EventDetail::Exit { exit_code: exit.exit_code };
                self.process_event(kind, exit.ktime_ns, exit.pid, detail)
            }
            Event::Tcp(tcp) => {
                let socket = Socket {
                    protocol: Protocol::Tcp,
                    local: tcp.local,
                    remote: tcp.remote,
                    netns: tcp.netns,
                    local_is_server: false,
                    received: false,
                };
                let mut raw = self.socket_event(kind, tcp.ktime_ns, tcp.pid, socket);
                if let EventDetail::Socket(detail) = &mut raw.detail {
                    if tcp.kind == TcpEventKind::Close {
                        detail.bytes_sent = tcp.bytes_sent;
                        detail.bytes_received = tcp.bytes_received;
                    }
                    detail.error = tcp.error;
                }
                raw
            }
            Event::Udp(udp) => {
                // The addresses stay as the kernel reported them, but a reply places the sender
                // as the server, and a receive the receiver unless it reads a reply, as the
                // pipeline observes the flow.
                let local_is_server = match udp.kind {
                    UdpEventKind::Receive => !is_udp_reply(udp.remote.port(), udp.local.port(), self.ephemeral_ports),
                    UdpEventKind::Bind => true,
                    _ => is_udp_reply(udp.local.port(), udp.remote.port(), self.ephemeral_ports),
                };
                let socket = Socket {
                    protocol: Protocol::Udp,
                    local: udp.local,
                    remote: udp.remote,
                    netns: udp.netns,
                    local_is_server,
                    received: udp.kind == UdpEventKind::Receive,
                };
                self.socket_event(kind, udp.ktime_ns, udp.pid, socket)
            }
            Event::Accept(accept) => {
                let socket = Socket {
                    protocol: Protocol::Tcp,
                    local: accept.local,
                    remote: accept.remote,
                    netns: accept.netns,
                    local_is_server: true,
                    received: false,
                };
                self.socket_event(kind, accept.ktime_ns, accept.pid, socket)
            }
            Event::Dns(_) | Event::Credentials(_) | Event::Fold(_) => return None,
        };
        Some(raw)
    }

    /// Builds the DNS answer event for a message the pipeline parsed into `learned`.
    pub fn dns_answer(&self, event: &DnsEvent, learned: &Learned) -> RawEvent {
        let process = learned.asker.and_then(|asker| self.process(asker.pid));
        RawEvent {
            kind: EventKind::DnsAnswer,
            time: self.clock.to_system(event.ktime_ns),
            placement: self.placement(process.as_ref()),
            process,
            detail: EventDetail::DnsAnswer {
                name: learned.name.clone(),
                addresses: learned.addresses.clone(),
                server: event.server,
            },
        }
    }

    fn process(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        // Pid 0 is the kernel's own context, as for a connection the kernel established.
        (pid != 0).then(|| self.processes.get(pid)).flatten()
    }

    fn placement(&self, process: Option<&Arc<ProcessInfo>>) -> Placement {
        let Some(process) = process else { return Placement::default() };
        let node = self.engine.process_node(process);
        Placement { component: node.id, zone: node.zone }
    }

    fn process_event(&self, kind: EventKind, ktime_ns: u64, pid: u32, detail: EventDetail) -> RawEvent {
        let process = self.process(pid);
        RawEvent {
            kind,
            time: self.clock.to_system(ktime_ns),
            placement: self.placement(process.as_ref()),
            process,
            detail,
        }
    }

    fn socket_event(&self, kind: EventKind, ktime_ns: u64, pid: u32, socket: Socket) -> RawEvent {
        let process = self.process(pid);
        let time = self.clock.to_system(ktime_ns);
        let remote_name = self.dns.name_of(socket.remote.ip(), Instant::now()).map(str::to_owned);
        let (placement, remote_placement) = if matches!(kind, EventKind::TcpListen | EventKind::UdpListen) {
            (self.placement(process.as_ref()), Placement::default())
        } else {
            // The engine resolves both ends as it would for the flow. The local end is the server
            // for an accepted connection or a UDP reply, and the client otherwise.
            // NOTE: the remote end resolves by its address only. A peer process on this host (in
            // another network namespace) is not looked up, so it takes the zone its address
            // matches, where the deviations of the joined flow name its component.
            let (client, server, client_addr, server_addr) = if socket.local_is_server {
                (None, process.clone(), socket.remote, socket.local)
            } else {
                (process.clone(), None, socket.local, socket.remote)
            };
            let flow = FlowObservation {
                time,
                protocol: socket.protocol,
                client,
                server,
                client_addr,
                server_addr,
                netns: socket.netns,
                remote_name: remote_name.clone(),
            };
            let (source, destination) = self.engine.flow_nodes(&flow);
            let (local, remote) = if socket.local_is_server { (destination, source) } else { (source, destination) };
            let local = match process {
                Some(_) => Placement { component: local.id, zone: local.zone },
                None => Placement::default(),
            };
            (local, Placement { component: remote.id, zone: remote.zone })
        };
        RawEvent {
            kind,
            time,
            process,
            placement,
            detail: EventDetail::Socket(SocketDetail {
                protocol: socket.protocol,
                local: socket.local,
                remote: socket.remote,
                netns: socket.netns,
                bytes_sent: 0,
                bytes_received: 0,
                error: 0,
                remote_name,
                remote_placement,
                is_reply: kind == EventKind::UdpFlow && socket.local_is_server && !socket.received,
                received: socket.received,
            }),
        }
    }
}

struct Socket {
    protocol: Protocol,
    local: SocketAddr,
    remote: SocketAddr,
    netns: u32,
    /// True when the local end is the server: it accepted the connection, sent a UDP reply or
    /// read a datagram that was not a reply.
    local_is_server: bool,
    /// True when the local process read the datagram of a UDP flow.
    received: bool,
}
