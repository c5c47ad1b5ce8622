//! DNS answers, from the cgroup `skb` ingress hook: every UDP datagram from port 53 delivered to a
//! socket in scope is copied, up to `DNS_CAPTURE_BYTES`, into a record with the receiving
//! socket's cookie. Parsing happens in userspace, which joins the cookie to the process that sent
//! the query (its `UdpRecord` carries the same cookie).
//!
//! The context starts at the network header. IPv6 extension headers are not walked: an answer
//! behind one is not captured.

use agent_common::{
    Counter, DnsRecord, RecordHeader, RecordKind, DNS_CAPTURE_BYTES, DNS_PORT, FAMILY_INET,
    FAMILY_INET6,
};
use aya_ebpf::{
    helpers::r#gen::{bpf_get_socket_cookie, bpf_skb_load_bytes},
    macros::cgroup_skb,
    programs::SkBuffContext,
    EbpfContext,
};
use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use crate::{count, ktime_ns, EVENTS};

/// The verdict that lets the packet through.
const PASS: i32 = 1;

const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER_BYTES: u32 = 40;
const UDP_HEADER_BYTES: u32 = 8;

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = try_dns_ingress(&ctx);
    PASS
}

fn try_dns_ingress(ctx: &SkBuffContext) -> Result<(), i64> {
    // One load covers the version and both headers' protocol fields: this program runs on every
    // packet the host receives, and most are not UDP.
    let ip_header: [u8; 10] = match ip_header_in_place(ctx) {
        Some(header) => header,
        None => ctx.load(0)?,
    };
    let first = ip_header[0];
    let (family, udp_offset, saddr) = match first >> 4 {
        4 => {
            if ip_header[9] != IPPROTO_UDP {
                return Ok(());
            }
            let source: [u8; 4] = ctx.load(12)?;
            let [a, b, c, d] = source;
            let saddr = [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            (FAMILY_INET, u32::from(first & 0x0f) * 4, saddr)
        }
        6 => {
            if ip_header[6] != IPPROTO_UDP {
                return Ok(());
            }
            let saddr: [u8; 16] = ctx.load(8)?;
            (FAMILY_INET6, IPV6_HEADER_BYTES, saddr)
        }
        _ => return Ok(()),
    };
    let ports: [u8; 4] = ctx.load(udp_offset as usize)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    if sport != DNS_PORT {
        return Ok(());
    }
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let payload_offset = udp_offset + UDP_HEADER_BYTES;
    let message_len = ctx.len().saturating_sub(payload_offset);
    if message_len == 0 {
        return Ok(());
    }

    let Some(mut entry) = EVENTS.reserve::<DnsRecord>(0) else {
        count(Counter::DnsRingBufferFull);
        return Ok(());
    };
    let record = entry.as_mut_ptr();
    let mut captured = message_len;
    if captured > DNS_CAPTURE_BYTES as u32 {
        captured = DNS_CAPTURE_BYTES as u32;
    }
    // `captured` is between 1 and DNS_CAPTURE_BYTES already, so this leaves it unchanged. The
    // verifier loses the lower bound across the reserve call; the mask restores both bounds.
    let captured = (captured.wrapping_sub(1) & (DNS_CAPTURE_BYTES as u32 - 1)) + 1;
    // SAFETY: `record` points to reserved ring buffer memory of `size_of::<DnsRecord>()` bytes;
    // `captured` is between 1 and the size of `data`, which the verifier checks again.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const c_void,
            payload_offset,
            (*record).data.as_mut_ptr() as *mut c_void,
            captured,
        )
    };
    if loaded != 0 {
        entry.discard(0);
        return Ok(());
    }
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: writes of plain fields into the reserved record; `data` was filled above.
    unsafe {
        (*record).header = RecordHeader {
            kind: RecordKind::Dns as u32,
            pid: 0,
            tid: 0,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: 0,
        };
        (*record).cookie = cookie;
        (*record).family = family;
        (*record).sport = sport;
        (*record).dport = dport;
        (*record)._reserved = 0;
        (*record).message_len = message_len;
        (*record).captured_len = captured;
        (*record).saddr = saddr;
    }
    entry.submit(crate::submit_flags());
    Ok(())
}

/// Reads the first bytes of the IP header straight from the packet, where the receive path left
/// them in its linear part. A plain load costs less than the helper call of
/// `SkBuffContext::load`, which stays as the fallback.
#[inline(always)]
fn ip_header_in_place(ctx: &SkBuffContext) -> Option<[u8; 10]> {
    let skb = ctx.skb.skb;
    // SAFETY: `data` and `data_end` are 4-byte context fields, which the verifier turns into the
    // packet's bounds.
    let (start, end) =
        unsafe { (read_volatile(addr_of!((*skb).data)) as usize, read_volatile(addr_of!((*skb).data_end)) as usize) };
    if start + 10 > end {
        return None;
    }
    // SAFETY: the check above keeps the read inside the packet, which the verifier checks again.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; 10]) })
}
