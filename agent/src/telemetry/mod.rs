//! Kernel telemetry: loading and attaching the eBPF programs, reading the ring buffer and decoding
//! records into [`event::Event`]s. Only this module uses aya.
//!
//! [`Telemetry::start`] loads the programs and spawns one reader task that drains the ring buffer
//! whenever it becomes readable and forwards decoded events into a bounded channel. The reader
//! never waits for the consumer: when the channel is full the event is dropped and counted, so the
//! kernel side keeps draining and back pressure never turns into kernel-side drops that are harder
//! to attribute. Every loss (kernel counters, decode errors, channel drops) is visible through
//! [`Telemetry::counters`].

pub mod btf;
pub mod cgroup;
pub mod decode;
pub mod event;
mod fold;
pub mod loader;
pub mod seeded;
pub mod probe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agent_common::{
    MAP_FOLD_WINDOW, MAP_PAIRED_ACCEPTS, ConnectionKey, Counter, ListenerKey, ListenerOwner, SockOwner, DEFAULT_RING_BUFFER_BYTES, MAP_COUNTERS,
    MAP_EVENTS, MAP_FOLDS, MAP_LISTENERS, MAP_SEEDED_CONNECTIONS,
};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cgroup::{
    cgroup2_mount, cgroup_id, cgroup_path_by_id, CgroupError, CgroupPaths, CgroupScope,
};
pub use decode::DecodeError;
pub use event::Event;
pub use loader::{HookStatus, TcpHook};
pub use probe::HookSupport;

/// Pauses and resumes the kernel's folding of repeated TCP connections while the agent runs.
#[derive(Clone)]
pub struct FoldSwitch {
    map: Arc<std::sync::Mutex<Array<MapData, u64>>>,
    window_ns: u64,
}

impl FoldSwitch {
    /// Takes the kernel's fold window map and sets the configured window in it.
    fn start(ebpf: &mut aya::Ebpf, window: std::time::Duration) -> Result<FoldSwitch, TelemetryError> {
        let map_error = |source| TelemetryError::Map { name: MAP_FOLD_WINDOW, source };
        let missing = || map_error(aya::maps::MapError::InvalidName { name: MAP_FOLD_WINDOW.to_string() });
        let map = Array::try_from(ebpf.take_map(MAP_FOLD_WINDOW).ok_or_else(missing)?).map_err(map_error)?;
        let switch = FoldSwitch {
            map: Arc::new(std::sync::Mutex::new(map)),
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
        };
        switch.report_every_connection(false)?;
        Ok(switch)
    }

    /// Makes the kernel report every TCP connection when `every` is true, and fold repeated ones
    /// again, if the agent was started with a fold window, when it is false.
    pub fn report_every_connection(&self, every: bool) -> Result<(), TelemetryError> {
        let window = if every { 0 } else { self.window_ns };
        let mut map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.set(0, window, 0).map_err(|source| TelemetryError::Map { name: MAP_FOLD_WINDOW, source })
    }
}

/// Default of [`TelemetryConfig::fold_window`].
pub const DEFAULT_FOLD_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Settings of [`Telemetry::start`].
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Report only processes inside this cgroup v2 directory or below it; everything when `None`.
    pub scope_cgroup: Option<PathBuf>,
    /// Size of the kernel ring buffer in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Capacity of the channel to the pipeline, in decoded events; new events are dropped when full.
    pub channel_capacity: usize,
    /// Source of TCP state changes.
    pub tcp_hook: loader::TcpHook,
    /// Whether the io_uring programs attach, which name the process of an io_uring accept.
    pub uring_accepts: bool,
    /// Fold epoch: a TCP connection of a flow that had one reported in the same epoch is counted
    /// in the kernel instead of reported. Zero reports every connection. Only the `sock_ops` hook
    /// folds.
    pub fold_window: std::time::Duration,
    /// Age after which the agent removes an accepted socket of a folded pair from the kernel's map
    /// of sockets waiting for an accept: one taken into an io_uring fixed-file slot, or not yet
    /// taken.
    pub paired_accept_max_age: std::time::Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            scope_cgroup: None,
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            channel_capacity: 16384,
            tcp_hook: loader::TcpHook::Auto,
            uring_accepts: true,
            fold_window: DEFAULT_FOLD_WINDOW,
            paired_accept_max_age: std::time::Duration::from_nanos(agent_common::PAIRED_ACCEPT_MAX_AGE_NS),
        }
    }
}

/// Failure to start telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("loading eBPF programs needs root (effective uid is {euid}); run driftwatch as root")]
    NotRoot { euid: u32 },
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed; mount it with `mount -t tracefs tracefs /sys/kernel/tracing`")]
    Tracefs {
        #[source]
        source: std::io::Error,
    },
    #[error("this driftwatch binary was built without its eBPF object; build it with `cargo xtask build`")]
    ObjectMissing,
    #[error("the kernel has no bpf() system call; it needs CONFIG_BPF_SYSCALL=y")]
    BpfUnsupported,
    #[error("the kernel refused to create BPF maps or programs; run as root and check kernel.unprivileged_bpf_disabled and lockdown")]
    BpfPermission {
        #[source]
        source: aya::EbpfError,
    },
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("required hook {name} failed: {error}")]
    RequiredHook { name: String, error: String },
    #[error("invalid ring buffer size {0} bytes: it must be a power of two and at least one page")]
    RingBufferSize(u32),
    #[error("invalid channel capacity 0: it must be at least 1")]
    ChannelCapacity,
    #[error("invalid scope cgroup {path}")]
    Scope {
        path: PathBuf,
        #[source]
        source: CgroupError,
    },
    #[error("map {name} is missing or has the wrong type")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("Telemetry::start must be called inside a tokio runtime")]
    NoRuntime,
    #[error("failed to register the ring buffer with the tokio reactor")]
    Reactor(#[source] std::io::Error),
}

/// Kernel-side losses of one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDrops {
    /// Program that lost the record or stash.
    pub program: &'static str,
    pub reason: &'static str,
    /// False for a counter that loses no event (see [`Counter::loses_events`]): it is shown but
    /// raises no `telemetry-gap`.
    pub loses_events: bool,
    /// Sum over CPUs.
    pub total: u64,
    /// One value per possible CPU.
    pub per_cpu: Vec<u64>,
}

/// Loss and throughput counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryCounters {
    /// One entry per kernel counter; empty when the counter map could not be read.
    pub kernel: Vec<KernelDrops>,
    /// Records read from the ring buffer.
    pub records_read: u64,
    /// Records that failed to decode, all causes.
    pub decode_errors: u64,
    /// Records shorter than their kind requires.
    pub short_records: u64,
    /// Records with an unknown kind, TCP event or address family.
    pub unknown_records: u64,
    /// Decoded events dropped because the channel to the pipeline was full.
    pub channel_drops: u64,
    /// Events handed to the channel.
    pub events_sent: u64,
    /// Accepted sockets of folded pairs removed from the kernel's waiting map because no accept
    /// record took them in time (io_uring accepts into fixed-file slots, or connections still
    /// queued).
    pub paired_accepts_swept: u64,
}

impl TelemetryCounters {
    /// Sum of the kernel counters of lost events (see [`Counter::loses_events`]).
    pub fn kernel_drops(&self) -> u64 {
        self.kernel.iter().filter(|drops| drops.loses_events).map(|drops| drops.total).sum()
    }
}

#[derive(Debug, Default)]
struct ReaderStats {
    records_read: AtomicU64,
    short_records: AtomicU64,
    unknown_records: AtomicU64,
    channel_drops: AtomicU64,
    events_sent: AtomicU64,
    paired_accepts_swept: AtomicU64,
}

/// Running kernel telemetry. Dropping it stops the reader task and detaches every program.
pub struct Telemetry {
    ebpf: Ebpf,
    hooks: Vec<HookStatus>,
    stats: Arc<ReaderStats>,
    cancel: CancellationToken,
    scope: Option<CgroupScope>,
    support: Vec<HookSupport>,
    /// True when the accept offsets resolved, so the accept programs write records.
    accept_offsets_valid: bool,
    /// Pauses folding while a client streams raw TCP events.
    fold_switch: FoldSwitch,
    /// The runtime and channel of the reader, for the task that reports the close of connections
    /// opened before the agent.
    runtime: tokio::runtime::Handle,
    sender: mpsc::Sender<Event>,
}

impl Telemetry {
    /// Loads and attaches the kernel programs and starts reading their records.
    ///
    /// Must be called inside a tokio runtime, which runs the reader task. Fails when not root,
    /// when tracefs is missing and cannot be mounted, when the binary has no embedded object, when
    /// the scope cgroup is not a cgroup v2 directory, or when a required hook does not attach.
    /// Optional hooks that fail are reported by [`Telemetry::hooks`].
    pub fn start(
        config: TelemetryConfig,
    ) -> Result<(Telemetry, mpsc::Receiver<Event>), TelemetryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        if !config.ring_buffer_bytes.is_power_of_two() || config.ring_buffer_bytes < page_size() {
            return Err(TelemetryError::RingBufferSize(config.ring_buffer_bytes));
        }
        if config.channel_capacity == 0 {
            return Err(TelemetryError::ChannelCapacity);
        }
        loader::check_root()?;
        loader::ensure_tracefs()?;
        loader::raise_memlock_limit();

        let scope = match &config.scope_cgroup {
            Some(path) => Some(resolve_scope(path)?),
            None => None,
        };
        let kernel_btf = btf::Btf::from_file(Path::new(btf::VMLINUX_BTF));
        let (netns_offsets, kernel_offsets) = resolve_offsets(kernel_btf.as_ref());
        let support = probe::probe_hook_kinds(kernel_btf.as_ref().ok());
        for kind in &support {
            match &kind.error {
                None => tracing::info!(kind = kind.kind, "hook kind available"),
                Some(error) => tracing::info!(kind = kind.kind, %error, "hook kind unavailable"),
            }
        }
        let accept_offsets = resolve_accept_offsets(kernel_btf.as_ref());
        let uring_offsets = match &kernel_btf {
            _ if !config.uring_accepts => Err("turned off with --no-io-uring-accepts".to_string()),
            Ok(parsed) => btf::uring_offsets(parsed).map_err(|error| format!("cannot resolve the io_uring accept request from kernel BTF: {error}")),
            Err(error) => Err(format!("no kernel BTF for the io_uring accept request: {error}")),
        };
        let parameters = loader::LoadParameters {
            agent_tgid: std::process::id(),
            scope: scope.as_ref(),
            netns_offsets,
            kernel_offsets,
            accept_offsets,
            uring_offsets,
            ring_buffer_bytes: config.ring_buffer_bytes,
            tcp_hook: config.tcp_hook,
        };
        let (mut ebpf, hooks) = loader::load(&parameters)?;

        let events = ebpf.take_map(MAP_EVENTS).ok_or(TelemetryError::Map {
            name: MAP_EVENTS,
            source: aya::maps::MapError::InvalidName {
                name: MAP_EVENTS.to_string(),
            },
        })?;
        let ring = RingBuf::try_from(events).map_err(|source| TelemetryError::Map {
            name: MAP_EVENTS,
            source,
        })?;
        let ring = {
            // AsyncFd registers with the reactor of the current runtime.
            let _guard = runtime.enter();
            // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as
            // the AsyncFd owns the ring buffer.
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                .map_err(|error| TelemetryError::Reactor(error.into()))?
        };

        let fold_switch = FoldSwitch::start(&mut ebpf, config.fold_window)?;
        let folds = if config.fold_window.is_zero() {
            None
        } else {
            let map_error = |source| TelemetryError::Map { name: MAP_FOLDS, source };
            let missing = || map_error(aya::maps::MapError::InvalidName { name: MAP_FOLDS.to_string() });
            let map = ebpf.take_map(MAP_FOLDS).ok_or_else(missing)?;
            let map = BpfHashMap::try_from(map).map_err(map_error)?;
            let paired = ebpf.take_map(MAP_PAIRED_ACCEPTS).map(BpfHashMap::try_from).transpose().map_err(|source| {
                TelemetryError::Map { name: MAP_PAIRED_ACCEPTS, source }
            })?;
            Some(fold::FoldReader::new(map, paired, config.fold_window, config.paired_accept_max_age))
        };
        let (sender, receiver) = mpsc::channel(config.channel_capacity);
        let stats = Arc::new(ReaderStats::default());
        let cancel = CancellationToken::new();
        runtime.spawn(read_ring_buffer(
            ring,
            folds,
            sender.clone(),
            stats.clone(),
            cancel.clone(),
        ));
        tracing::info!(
            scope = ?scope.as_ref().map(|scope| &scope.path),
            ring_buffer_bytes = config.ring_buffer_bytes,
            "kernel telemetry started"
        );
        Ok((
            Telemetry {
                ebpf,
                hooks,
                stats,
                cancel,
                scope,
                support,
                accept_offsets_valid: accept_offsets.valid != 0,
                fold_switch,
                runtime,
                sender,
            },
            receiver,
        ))
    }

    /// Returns the switch that pauses folding of repeated TCP connections.
    pub fn fold_switch(&self) -> FoldSwitch {
        self.fold_switch.clone()
    }

    /// Load and attach status of every hook, then one entry per hook kind probed at start-up
    /// (`kind:<name>`, "attached" when this kernel accepts programs of that kind).
    pub fn hooks(&self) -> Vec<HookStatus> {
        let kinds = self.support.iter().map(|kind| HookStatus {
            name: format!("kind:{}", kind.kind),
            tracepoint: String::new(),
            required: false,
            attached: kind.available,
            error: kind.error.clone(),
        });
        self.hooks.iter().cloned().chain(kinds).collect()
    }

    /// Adds listening sockets that existed before the programs were attached to the kernel's
    /// listener map, as (network namespace inode, local address, owner pid, socket inode). Under
    /// a cgroup scope the kernel reports accepts only on listeners in that map, so without this,
    /// connections accepted on them would be missing. An entry the programs made meanwhile is
    /// kept. The `sock_ops` program is not called when these listeners close, so a task removes their
    /// entries once /proc no longer shows them (see [`seeded`]). Returns how many entries were
    /// added.
    pub fn seed_listeners(&mut self, listeners: &[(u32, SocketAddr, u32, u64)]) -> Result<usize, TelemetryError> {
        let map_error = |source| TelemetryError::Map { name: MAP_LISTENERS, source };
        let missing = || map_error(aya::maps::MapError::InvalidName { name: MAP_LISTENERS.to_string() });
        let map = self.ebpf.map_mut(MAP_LISTENERS).ok_or_else(missing)?;
        let mut map: BpfHashMap<&mut MapData, ListenerKey, ListenerOwner> =
            BpfHashMap::try_from(map).map_err(map_error)?;
        let key = |(netns, port, family, addr): (u32, u16, u16, [u8; 16])| ListenerKey { netns, port, family, addr };
        let forms = |netns: u32, local: SocketAddr| {
            listener_address_forms(local.ip()).into_iter().map(move |(family, addr)| (netns, local.port(), family, addr))
        };
        let mut counts: std::collections::HashMap<(u32, u16, u16, [u8; 16]), ListenerOwner> =
            std::collections::HashMap::new();
        for &(netns, local, pid, _) in listeners {
            for form in forms(netns, local) {
                counts.entry(form).or_insert(ListenerOwner { pid, flags: 0, sockets: 0, serial: 0 }).sockets += 1;
            }
        }
        let mut added = std::collections::HashSet::new();
        for (form, owner) in counts {
            // A listener the programs recorded since they were attached is newer: keep it.
            match map.insert(key(form), owner, BPF_NOEXIST) {
                Ok(()) => {
                    added.insert(form);
                }
                Err(aya::maps::MapError::SyscallError(error)) if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(error) => return Err(map_error(error)),
            }
        }
        if self.tcp_from_sock_ops() && !added.is_empty() {
            let watched: Vec<seeded::SeededListener> = listeners
                .iter()
                .map(|&(netns, local, pid, inode)| {
                    let keys = forms(netns, local).filter(|form| added.contains(form)).map(key).collect();
                    (netns, inode, pid, keys)
                })
                .collect();
            // Only this task writes the map from userspace from now on.
            let map = self.ebpf.take_map(MAP_LISTENERS).ok_or_else(missing)?;
            let map = BpfHashMap::try_from(map).map_err(map_error)?;
            self.runtime.spawn(seeded::forget_closed_listeners(
                watched,
                PathBuf::from("/proc"),
                map,
                self.cancel.clone(),
            ));
        }
        Ok(added.len())
    }

    /// Adds TCP connections that existed before the programs were attached, as (network
    /// namespace inode, local address, remote address, owner pid), so that their close is
    /// reported with the owner, also under a cgroup scope. The tracepoint program finds them in a
    /// kernel map. The `sock_ops` program never hears of them, so a task reads their owners' TCP
    /// tables for them (see [`seeded`]). Returns how many were added; the rest are not attributed
    /// when the map is full.
    pub fn seed_connections(
        &mut self,
        connections: &[seeded::SeededConnection],
    ) -> Result<usize, TelemetryError> {
        if self.tcp_from_sock_ops() {
            if !connections.is_empty() {
                self.runtime.spawn(seeded::report_closes(
                    connections.to_vec(),
                    PathBuf::from("/proc"),
                    self.sender.clone(),
                    self.cancel.clone(),
                ));
            }
            return Ok(connections.len());
        }
        let map_error = |source| TelemetryError::Map { name: MAP_SEEDED_CONNECTIONS, source };
        let map = self.ebpf.map_mut(MAP_SEEDED_CONNECTIONS).ok_or_else(|| {
            map_error(aya::maps::MapError::InvalidName { name: MAP_SEEDED_CONNECTIONS.to_string() })
        })?;
        let mut map: BpfHashMap<&mut MapData, ConnectionKey, SockOwner> =
            BpfHashMap::try_from(map).map_err(map_error)?;
        let mut added = 0;
        for &(netns, local, remote, pid) in connections {
            for (saddr, daddr) in kernel_address_forms(local.ip(), remote.ip()) {
                let key = ConnectionKey { netns, sport: local.port(), dport: remote.port(), saddr, daddr };
                map.insert(key, SockOwner { pid, flags: 0, netns, exec: 0 }, 0).map_err(map_error)?;
            }
            added += 1;
        }
        Ok(added)
    }

    /// Returns true when TCP state changes come from the `sock_ops` program.
    pub fn tcp_from_sock_ops(&self) -> bool {
        self.hooks.iter().any(|hook| hook.name == agent_common::TCP_SOCK_OPS_PROGRAM && hook.attached)
    }

    /// Returns true when accepted connections are reported with the process that accepts them:
    /// both accept programs attached and their offsets resolved.
    pub fn reports_acceptors(&self) -> bool {
        let attached = |name: &str| self.hooks.iter().any(|hook| hook.name == name && hook.attached);
        self.accept_offsets_valid && attached("sys_exit_accept") && attached("sys_exit_accept4")
    }

    /// Returns the hook kinds this kernel accepts, as probed at start-up.
    pub fn hook_support(&self) -> &[HookSupport] {
        &self.support
    }

    /// Returns the scope cgroup the kernel programs filter on, if any.
    pub fn scope(&self) -> Option<&CgroupScope> {
        self.scope.as_ref()
    }

    /// Current loss and throughput counters.
    pub fn counters(&self) -> TelemetryCounters {
        let stats = &self.stats;
        let short_records = stats.short_records.load(Ordering::Relaxed);
        let unknown_records = stats.unknown_records.load(Ordering::Relaxed);
        TelemetryCounters {
            kernel: self.kernel_drops(),
            records_read: stats.records_read.load(Ordering::Relaxed),
            decode_errors: short_records + unknown_records,
            short_records,
            unknown_records,
            channel_drops: stats.channel_drops.load(Ordering::Relaxed),
            events_sent: stats.events_sent.load(Ordering::Relaxed),
            paired_accepts_swept: stats.paired_accepts_swept.load(Ordering::Relaxed),
        }
    }

    fn kernel_drops(&self) -> Vec<KernelDrops> {
        let counters = self
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or_else(|| aya::maps::MapError::InvalidName {
                name: MAP_COUNTERS.to_string(),
            })
            .and_then(PerCpuArray::<&MapData, u64>::try_from);
        let counters = match counters {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!(%error, "cannot read kernel drop counters");
                return Vec::new();
            }
        };
        Counter::ALL
            .iter()
            .filter_map(|&counter| match counters.get(&(counter as u32), 0) {
                Ok(values) => {
                    let per_cpu: Vec<u64> = values.iter().copied().collect();
                    Some(KernelDrops {
                        program: counter.program(),
                        reason: counter.reason(),
                        loses_events: counter.loses_events(),
                        total: per_cpu.iter().sum(),
                        per_cpu,
                    })
                }
                Err(error) => {
                    tracing::warn!(%error, counter = ?counter, "cannot read kernel drop counter");
                    None
                }
            })
            .collect()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // The programs detach when `ebpf` drops right after this; the reader owns the ring buffer
        // and ends on the cancellation.
        self.cancel.cancel();
    }
}

/// Reads the struct offsets the programs need from the kernel's BTF. Whatever cannot be resolved
/// is left out with a warning naming what the events then lack.
fn resolve_offsets(
    kernel_btf: Result<&btf::Btf, &btf::BtfError>,
) -> (Option<btf::NetnsOffsets>, agent_common::KernelOffsets) {
    let parsed = match kernel_btf {
        Ok(parsed) => parsed,
        Err(error) => {
            tracing::warn!(
                %error,
                "cannot read kernel BTF; events carry no netns, parent, executable file or byte counts"
            );
            return (None, agent_common::KernelOffsets::default());
        }
    };
    let netns = match btf::netns_offsets_in(parsed) {
        Ok(offsets) => Some(offsets),
        Err(error) => {
            tracing::warn!(
                error = %error,
                "cannot resolve socket struct offsets from kernel BTF; TCP events carry netns 0"
            );
            None
        }
    };
    let (offsets, errors) = btf::kernel_offsets(parsed);
    for error in errors {
        tracing::warn!(
            %error,
            "cannot resolve a kernel struct offset; the matching fields of events stay empty"
        );
    }
    (netns, offsets)
}

/// Returns the (family, address) forms under which the kernel programs key a listener on
/// `local`. A wildcard address is all zeros. /proc shows an IPv4 address the same for an IPv4
/// socket and an IPv6 one bound to its IPv4-mapped form, so it gets both forms.
fn listener_address_forms(local: std::net::IpAddr) -> Vec<(u16, [u8; 16])> {
    use agent_common::{FAMILY_INET, FAMILY_INET6};
    match local {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => vec![(FAMILY_INET, [0; 16])],
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => vec![(FAMILY_INET6, [0; 16])],
        std::net::IpAddr::V4(v4) => {
            let mut widened = [0u8; 16];
            widened[..4].copy_from_slice(&v4.octets());
            vec![(FAMILY_INET, widened), (FAMILY_INET6, v4.to_ipv6_mapped().octets())]
        }
        std::net::IpAddr::V6(v6) => vec![(FAMILY_INET6, v6.octets())],
    }
}

/// Returns the address pairs under which `inet_sock_set_state` can show a connection: an IPv4
/// connection appears with IPv4 addresses on an IPv4 socket and IPv4-mapped on a dual-stack one.
fn kernel_address_forms(local: std::net::IpAddr, remote: std::net::IpAddr) -> Vec<([u8; 16], [u8; 16])> {
    use std::net::IpAddr;
    match (local, remote) {
        (IpAddr::V4(local), IpAddr::V4(remote)) => {
            let widen = |address: std::net::Ipv4Addr| {
                let mut bytes = [0u8; 16];
                bytes[..4].copy_from_slice(&address.octets());
                bytes
            };
            vec![
                (widen(local), widen(remote)),
                (local.to_ipv6_mapped().octets(), remote.to_ipv6_mapped().octets()),
            ]
        }
        (local, remote) => {
            let v6 = |address: IpAddr| match address {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            vec![(v6(local), v6(remote))]
        }
    }
}

/// Reads the offsets the accept programs need. Without them the programs write nothing, and
/// accepted connections are attributed to the listener's owner.
fn resolve_accept_offsets(kernel_btf: Result<&btf::Btf, &btf::BtfError>) -> agent_common::AcceptOffsets {
    let Ok(parsed) = kernel_btf else {
        return agent_common::AcceptOffsets::default();
    };
    match btf::accept_offsets(parsed) {
        Ok(offsets) => offsets,
        Err(error) => {
            tracing::warn!(
                %error,
                "cannot resolve the file table offsets from kernel BTF; accepted connections are attributed to the listener's owner"
            );
            agent_common::AcceptOffsets::default()
        }
    }
}

fn resolve_scope(path: &Path) -> Result<CgroupScope, TelemetryError> {
    let scope_error = |source| TelemetryError::Scope {
        path: path.to_path_buf(),
        source,
    };
    let mount = cgroup2_mount().map_err(scope_error)?;
    CgroupScope::resolve(&mount, path).map_err(scope_error)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// `bpf_map_update_elem` flag: fail with `EEXIST` instead of replacing an entry.
const BPF_NOEXIST: u64 = 1;

/// How often the reader drains the ring buffer when no wakeup came.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Drains the ring buffer each time it becomes readable, and on a timer, until `cancel` fires or the receiver is
/// dropped.
async fn read_ring_buffer(
    mut ring: AsyncFd<RingBuf<aya::maps::MapData>>,
    mut folds: Option<fold::FoldReader>,
    sender: mpsc::Sender<Event>,
    stats: Arc<ReaderStats>,
    cancel: CancellationToken,
) {
    // The programs wake the reader only once a batch has built up (see `submit_flags` in the
    // kernel crate), so it also drains on this timer. The period bounds the added latency.
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = poll.tick() => {
                if !drain(ring.get_mut(), &sender, &stats) {
                    return;
                }
                // Read right after the ring buffer, so that every flow's reported connection
                // reaches the pipeline before the counts of the connections folded after it.
                if let Some(folds) = folds.as_mut().filter(|folds| folds.due(std::time::Instant::now())) {
                    if sender.is_closed() {
                        return;
                    }
                    // A count the full channel does not take is sent again with the next read, so
                    // it is not a drop.
                    let swept = folds.read(std::time::Instant::now(), |event| {
                        let sent = sender.try_send(event).is_ok();
                        if sent {
                            stats.events_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        sent
                    });
                    stats.paired_accepts_swept.fetch_add(swept as u64, Ordering::Relaxed);
                }
            }
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    if !drain(guard.get_inner_mut(), &sender, &stats) {
                        return;
                    }
                    guard.clear_ready();
                }
                Err(error) => {
                    tracing::error!(%error, "ring buffer polling failed; no more kernel events");
                    break;
                }
            },
        }
    }
    tracing::debug!("ring buffer reader stopped");
}

/// Decodes and forwards every record in the ring buffer. Returns false when the receiver is gone.
fn drain(ring_buffer: &mut RingBuf<aya::maps::MapData>, sender: &mpsc::Sender<Event>, stats: &ReaderStats) -> bool {
    while let Some(item) = ring_buffer.next() {
        stats.records_read.fetch_add(1, Ordering::Relaxed);
        let event = match decode::decode(&item) {
            Ok(event) => event,
            Err(error) => {
                let counter = match error {
                    DecodeError::Short { .. } => &stats.short_records,
                    _ => &stats.unknown_records,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, len = item.len(), "dropped undecodable record");
                continue;
            }
        };
        tracing::trace!(?event, "kernel event");
        if forward(event, sender, stats) == Forwarded::Closed {
            return false;
        }
    }
    true
}

/// Outcome of handing an event to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forwarded {
    Sent,
    /// The channel was full; the event was counted as dropped.
    Dropped,
    /// The receiver is gone.
    Closed,
}

/// Hands one event to the pipeline, counting it as dropped when the channel is full.
fn forward(event: Event, sender: &mpsc::Sender<Event>, stats: &ReaderStats) -> Forwarded {
    match sender.try_send(event) {
        Ok(()) => {
            stats.events_sent.fetch_add(1, Ordering::Relaxed);
            Forwarded::Sent
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            let dropped = stats.channel_drops.fetch_add(1, Ordering::Relaxed) + 1;
            // Logged at 1, 2, 4, 8, ... drops so that a long overload stays readable.
            if dropped.is_power_of_two() {
                tracing::error!(dropped, "event channel full; kernel events were dropped");
            }
            Forwarded::Dropped
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            tracing::info!("event receiver dropped; ring buffer reader stops");
            Forwarded::Closed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{FAMILY_INET, FAMILY_INET6};

    #[test]
    fn listener_address_forms_per_family() {
        let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(listener_address_forms(ip("0.0.0.0")), [(FAMILY_INET, [0; 16])]);
        assert_eq!(listener_address_forms(ip("::")), [(FAMILY_INET6, [0; 16])]);
        let mut widened = [0u8; 16];
        widened[..4].copy_from_slice(&[127, 0, 0, 2]);
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2];
        assert_eq!(listener_address_forms(ip("127.0.0.2")), [(FAMILY_INET, widened), (FAMILY_INET6, mapped)]);
        assert_eq!(listener_address_forms(ip("::1")), [(FAMILY_INET6, std::net::Ipv6Addr::LOCALHOST.octets())]);
    }
}
