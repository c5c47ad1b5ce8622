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
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};

use crate::{count, current_cgroup_id, current_ids, is_agent, ktime_ns, tcp, EVENTS, UDP_FLOWS};

/// The verdict that lets the system call go on.
const ALLOW: i32 = 1;

const IPPROTO_UDP: u32 = 17;

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

// Inlined into each program so that `family` is a constant there and the `user_ip6` reads are
// compiled only into the IPv6 programs: the verifier rejects them in an IPv4 program.
#[inline(always)]
fn try_udp(ctx: &SockAddrContext, kind: UdpKind, family: u16) -> Result<(), i64> {
    let addr: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `addr` is the program context; the verifier checks every field access, and
    // `read_volatile` keeps each one a 4-byte load, a size every field allows.
    let protocol = unsafe { read_volatile(addr_of!((*addr).protocol)) };
    if protocol != IPPROTO_UDP {
        // TCP connects are reported by `inet_sock_set_state`.
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    if is_agent(tgid) {
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

    let Some(mut entry) = EVENTS.reserve::<UdpRecord>(0) else {
        count(Counter::UdpRingBufferFull);
        // Forget the flow so that its next datagram tries again.
        let _ = UDP_FLOWS.remove(&key);
        return Ok(());
    };
    entry.write(UdpRecord {
        header: RecordHeader {
            kind: RecordKind::Udp as u32,
            pid: tgid,
            tid,
            _reserved: 0,
            ktime_ns: now,
            cgroup_id: current_cgroup_id(),
        },
        event: kind as u32,
        netns,
        cookie,
        family,
        sport,
        dport,
        _reserved: 0,
        saddr,
        daddr,
    });
    entry.submit(crate::submit_flags());
    Ok(())
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

/// Returns the kernel address of the socket as a plain number.
///
/// The verifier forbids arithmetic on a socket pointer, and the netns read needs the address of
/// a member. Copying the pointer out of the stack with a probe read gives the same value as a
/// scalar (allowed for programs loaded by root, which may see kernel addresses).
#[inline(always)]
fn kernel_address(sk: *const bpf_sock) -> u64 {
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
fn ipv6_bytes(words: [u32; 4]) -> [u8; 16] {
    let [w0, w1, w2, w3] = words;
    let [a0, a1, a2, a3] = w0.to_ne_bytes();
    let [b0, b1, b2, b3] = w1.to_ne_bytes();
    let [c0, c1, c2, c3] = w2.to_ne_bytes();
    let [d0, d1, d2, d3] = w3.to_ne_bytes();
    [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3]
}
