//! UDP flows by destination, from the cgroup `sock_addr` hooks.
//!
//! `sendmsg4/6` run in `udp_sendmsg` for every datagram sent with a destination address, and
//! `connect4/6` in `connect()`, so a connected socket is reported once at connect time (its later
//! `send()` calls carry no address and pass no hook). Both run in the sending task, below the
//! system call layer, so sends issued through io_uring (inline or from an io-wq worker thread of
//! the same process) are attributed to the process that owns the ring.
//!
//! `recvmsg4/6` run in `udp_recvmsg` when the receiving process requests the sender's address
//! (`recvfrom`, `recvmsg` with a name), which a server that replies needs. They report the
//! receiving end of a flow, in the receiving task. A server that reads with `recv()` and never
//! replies passes no hook.
//!
//! `bind4/6` and `post_bind4/6` report a UDP socket bound to a port its process chose, the UDP
//! form of a listener. The first runs before the kernel binds and reads the requested port (0
//! requests an ephemeral one, as clients do). The second runs only when the bind succeeded.
//!
//! Only the first datagram of a flow (process, network namespace, peer, direction) becomes a
//! record, and later ones only count in `UDP_FLOWS`. A DNS-heavy or streaming process so cannot
//! flood the ring buffer. Every program returns 1, which lets the operation go on unchanged.

use core::ptr::{addr_of, read_volatile};

use agent_common::{
    Counter, RecordHeader, RecordKind, UdpFlowCounts, UdpFlowKey, UdpKind, UdpRecord, DNS_PORT,
    FAMILY_INET, FAMILY_INET6,
};
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_probe_read_kernel, r#gen::bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};

use crate::{
    count, current_cgroup_id, current_ids, current_in_scope, is_agent, ktime_ns, tcp, EVENTS, UDP_BINDS, UDP_FLOWS,
};

/// A UDP `bind()` to a chosen port, from `bind4/6` until `post_bind4/6` reports it.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BindInProgress {
    netns: u32,
    _reserved: u32,
    cookie: u64,
}

/// The verdict that lets the system call go on.
const ALLOW: i32 = 1;

const IPPROTO_UDP: u32 = 17;
/// UDP-Lite runs through the same kernel paths and hooks as UDP, and is reported as UDP.
const IPPROTO_UDPLITE: u32 = 136;

/// True for the transport protocols these programs report.
#[inline(always)]
fn is_udp(protocol: u32) -> bool {
    protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE
}

#[cgroup_sock_addr(sendmsg4)]
pub fn udp_sendmsg4(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Send, FAMILY_INET);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn udp_sendmsg6(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Send, FAMILY_INET6);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn udp_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Connect, FAMILY_INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn udp_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Connect, FAMILY_INET6);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn udp_recvmsg4(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Receive, FAMILY_INET);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn udp_recvmsg6(ctx: SockAddrContext) -> i32 {
    let _ = try_udp(&ctx, UdpKind::Receive, FAMILY_INET6);
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn udp_bind4(ctx: SockAddrContext) -> i32 {
    let _ = try_bind(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn udp_bind6(ctx: SockAddrContext) -> i32 {
    let _ = try_bind(&ctx);
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn udp_post_bind4(ctx: SockContext) -> i32 {
    let _ = try_post_bind(&ctx, FAMILY_INET);
    ALLOW
}

#[cgroup_sock(post_bind6)]
pub fn udp_post_bind6(ctx: SockContext) -> i32 {
    let _ = try_post_bind(&ctx, FAMILY_INET6);
    ALLOW
}

/// Remembers a UDP bind to a chosen port for `post_bind`, in the binding thread.
#[inline(always)]
fn try_bind(ctx: &SockAddrContext) -> Result<(), i64> {
    let addr: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `try_udp`.
    let (protocol, port) = unsafe { (read_volatile(addr_of!((*addr).protocol)), read_volatile(addr_of!((*addr).user_port))) };
    if !is_udp(protocol) {
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    if port == 0 {
        // An ephemeral port: a client's bind. A stale entry of this thread goes too.
        let _ = UDP_BINDS.remove(&tid);
        return Ok(());
    }
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let netns = socket_netns(addr);
    UDP_BINDS.insert(&tid, &BindInProgress { netns, _reserved: 0, cookie }, 0)
}

/// Reports the bind that `try_bind` remembered for this thread, now that it succeeded.
#[inline(always)]
fn try_post_bind(ctx: &SockContext, family: u16) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(bind) = (unsafe { UDP_BINDS.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = UDP_BINDS.remove(&tid);

    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: `sk` is the program context, and the verifier checks every field read. The IPv6
    // fields are read only in the IPv6 program, where `family` is a constant.
    let (protocol, port, saddr) = unsafe {
        let saddr = if family == FAMILY_INET {
            widen_ipv4(read_volatile(addr_of!((*sk).src_ip4)))
        } else {
            ipv6_bytes([
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ])
        };
        (read_volatile(addr_of!((*sk).protocol)), read_volatile(addr_of!((*sk).src_port)), saddr)
    };
    if !is_udp(protocol) {
        return Ok(());
    }

    let record = UdpRecord {
        header: record_header(tgid, tid, ktime_ns()),
        event: UdpKind::Bind as u32,
        netns: bind.netns,
        cookie: bind.cookie,
        family,
        // `src_port` of a `bpf_sock` is in host byte order.
        sport: port as u16,
        dport: 0,
        _reserved: 0,
        saddr,
        daddr: [0; 16],
    };
    if !submit_record(record) {
        count(Counter::UdpRingBufferFull);
    }
    Ok(())
}

// Inlined into each program so that `family` is a constant there and the `user_ip6` reads are
// compiled only into the IPv6 programs: the verifier rejects them in an IPv4 program.
#[inline(always)]
fn try_udp(ctx: &SockAddrContext, kind: UdpKind, family: u16) -> Result<(), i64> {
    let addr: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `addr` is the program context; the verifier checks every field access, and
    // `read_volatile` keeps each one a 4-byte load, a size every field allows.
    let protocol = unsafe { read_volatile(addr_of!((*addr).protocol)) };
    if !is_udp(protocol) {
        // TCP connects are reported by `inet_sock_set_state`.
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    // The hooks run for sockets created in the scope, and the task must be in it too, as for
    // the tracepoints: a process that moved out with its socket is no longer observed.
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: as above.
    let (port, daddr) = unsafe {
        let port = read_volatile(addr_of!((*addr).user_port));
        let daddr = if family == FAMILY_INET {
            let ip4 = read_volatile(addr_of!((*addr).user_ip4));
            widen_ipv4(ip4)
        } else {
            ipv6_bytes([
                read_volatile(addr_of!((*addr).user_ip6[0])),
                read_volatile(addr_of!((*addr).user_ip6[1])),
                read_volatile(addr_of!((*addr).user_ip6[2])),
                read_volatile(addr_of!((*addr).user_ip6[3])),
            ])
        };
        (port, daddr)
    };
    // `user_port` stores the port in network byte order in its low 16 bits. For a receive, the
    // address and port are the sender's.
    let dport = u16::from_be(port as u16);
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (sport, saddr, netns) = socket_details(addr);

    let key = UdpFlowKey {
        pid: tgid,
        netns,
        cookie: if dport == DNS_PORT { cookie } else { 0 },
        family,
        dport,
        event: kind as u16,
        sport: if kind == UdpKind::Receive { sport } else { 0 },
        daddr,
    };
    let now = ktime_ns();
    if let Some(counts) = UDP_FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer is to this map's value, valid during the program. Two CPUs that
        // count the same flow at once may lose an increment; the counts are informational.
        unsafe {
            (*counts).packets += 1;
            (*counts).last_ns = now;
        }
        return Ok(());
    }
    let counts = UdpFlowCounts { packets: 1, last_ns: now };
    if UDP_FLOWS.insert(&key, &counts, 0).is_err() {
        count(Counter::UdpFlowMapFull);
    }

    let record = UdpRecord {
        header: record_header(tgid, tid, now),
        event: kind as u32,
        netns,
        cookie,
        family,
        sport,
        dport,
        _reserved: 0,
        saddr,
        daddr,
    };
    if !submit_record(record) {
        count(Counter::UdpRingBufferFull);
        // Forget the flow so that its next datagram tries again.
        let _ = UDP_FLOWS.remove(&key);
    }
    Ok(())
}

#[inline(always)]
fn record_header(tgid: u32, tid: u32, now: u64) -> RecordHeader {
    RecordHeader {
        kind: RecordKind::Udp as u32,
        pid: tgid,
        tid,
        _reserved: 0,
        ktime_ns: now,
        cgroup_id: current_cgroup_id(),
    }
}

/// Writes `record` into the ring buffer; false when it is full.
#[inline(always)]
fn submit_record(record: UdpRecord) -> bool {
    let Some(mut entry) = EVENTS.reserve::<UdpRecord>(0) else {
        return false;
    };
    entry.write(record);
    entry.submit(crate::submit_flags());
    true
}

/// Local port and address of the context's socket, and the inode of its network namespace.
#[inline(always)]
fn socket_details(addr: *const bpf_sock_addr) -> (u16, [u8; 16], u32) {
    // SAFETY: `sk` of a sock_addr context is never null; the verifier types it as a socket
    // pointer and checks each field read below.
    let sk: *const bpf_sock = unsafe { read_volatile(addr_of!((*addr).__bindgen_anon_1.sk)) }.cast_const();
    if sk.is_null() {
        return (0, [0; 16], 0);
    }
    // SAFETY: see above.
    let (sport, family) = unsafe {
        (
            read_volatile(addr_of!((*sk).src_port)),
            read_volatile(addr_of!((*sk).family)),
        )
    };
    // SAFETY: see above.
    let saddr = unsafe {
        if family == u32::from(FAMILY_INET6) {
            ipv6_bytes([
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ])
        } else {
            widen_ipv4(read_volatile(addr_of!((*sk).src_ip4)))
        }
    };
    (sport as u16, saddr, tcp::socket_netns(kernel_address(sk)))
}

/// Returns the inode of the network namespace of the context's socket, 0 when unknown.
// Kept apart from `socket_details`: when that was inlined with its addresses unused, the
// compiler emitted pointer arithmetic on the socket for an IPv6 address read, which the verifier
// rejects.
#[inline(always)]
fn socket_netns(addr: *const bpf_sock_addr) -> u32 {
    // SAFETY: as in `socket_details`.
    let sk: *const bpf_sock = unsafe { read_volatile(addr_of!((*addr).__bindgen_anon_1.sk)) }.cast_const();
    if sk.is_null() {
        return 0;
    }
    tcp::socket_netns(kernel_address(sk))
}

/// Returns the kernel address of the socket as a plain number.
///
/// The verifier forbids arithmetic on a socket pointer, and the netns read needs the address of
/// a member. Copying the pointer out of the stack with a probe read gives the same value as a
/// scalar (allowed for programs loaded by root, which may see kernel addresses).
#[inline(always)]
pub(crate) fn kernel_address(sk: *const bpf_sock) -> u64 {
    let slot: u64 = sk as u64;
    // SAFETY: a fault-handling probe read of a local variable.
    unsafe { bpf_probe_read_kernel(&slot as *const u64) }.unwrap_or(0)
}

/// Places an IPv4 address, as the `u32` of a context field in network byte order, in the
/// first 4 bytes of a zeroed 16-byte field.
#[inline(always)]
fn widen_ipv4(address: u32) -> [u8; 16] {
    let [a, b, c, d] = address.to_ne_bytes();
    [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Joins the four network-order words of an IPv6 context field into its 16 bytes.
#[inline(always)]
pub(crate) fn ipv6_bytes(words: [u32; 4]) -> [u8; 16] {
    let [w0, w1, w2, w3] = words;
    let [a0, a1, a2, a3] = w0.to_ne_bytes();
    let [b0, b1, b2, b3] = w1.to_ne_bytes();
    let [c0, c1, c2, c3] = w2.to_ne_bytes();
    let [d0, d1, d2, d3] = w3.to_ne_bytes();
    [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3]
}
