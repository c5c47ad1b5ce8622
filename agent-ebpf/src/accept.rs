//! Accepted connections attributed to the process that accepts them, from the exit of the
//! `accept` and `accept4` system calls.
//!
//! The kernel completes a handshake in softirq, outside any process, so the `Accepted` record of
//! `inet_sock_set_state` names no process. Whoever takes the connection off the listening socket
//! does so through `accept()`: a prefork worker, one of several SO_REUSEPORT listeners, or a
//! process that received the listening socket over a Unix socket. At the system call's exit the
//! new descriptor leads to the `struct sock` (`task->files->fdt->fd[n]->private_data->sk`), whose
//! address pairs this record with the `Accepted` one in userspace.
//!
//! io_uring's accept (`IORING_OP_ACCEPT`) does not pass through these system calls. Its
//! submission is recorded in `URING_ACCEPTS` by ring, user data and request, and counted by ring
//! and user data, because the completions of a multishot accept may name no request. Its
//! completion runs in a thread of the process that owns the ring, with that process's descriptor
//! table, and takes the same path as a system call's exit. The entries go with the request's last
//! completion. An accept into a fixed-file slot (a direct descriptor) returns no descriptor. It is
//! not recorded, and its connection keeps the listener's owner as its process.

use agent_common::{
    AcceptOffsets, AcceptRecord, Counter, Lineage, RecordHeader, RecordKind, SockOwner, UringRequest, FAMILY_INET,
    FAMILY_INET6, SOCKET_FLAGS_FOLDED, SOCKET_FLAG_AGENT, SOCKET_FLAG_FOLDED_IN, SOCKET_FLAG_FOLDED_PAIRED,
    TCP_FLAG_EXE_UNLINKED, URING_COMPLETE_CFLAGS, URING_COMPLETE_REQ, URING_COMPLETE_RES, URING_COMPLETE_RING,
    URING_COMPLETE_USER_DATA, URING_SUBMIT_OPCODE, URING_SUBMIT_REQ, URING_SUBMIT_RING, URING_SUBMIT_USER_DATA,
};
use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext};
use core::ptr::{addr_of, read_volatile};

use crate::{
    count, current_cgroup_id, current_ids, current_in_scope, fold, is_agent, kernel, ktime_ns, tcp, tracepoint_field,
    ACCEPT_OFFSETS, EVENTS, PAIRED_ACCEPTS, SOCKETS, URING_ACCEPTS, URING_OFFSETS, URING_WAITING,
};

// Offset of `ret` in every sys_exit_* record, from events/syscalls/sys_exit_*/format in tracefs.
const SYS_EXIT_RET_OFFSET: usize = 16;

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

fn try_accept(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offset of `ret` in this tracepoint's record, aligned to its size.
    let ret: i64 = unsafe { tracepoint_field(ctx, SYS_EXIT_RET_OFFSET) };
    if ret < 0 {
        return Ok(());
    }
    accepted(ret as u64)
}

// include/uapi/linux/io_uring.h.
const IORING_OP_ACCEPT: u8 = 13;
const IORING_CQE_F_MORE: u32 = 1 << 1;

#[tracepoint]
pub fn io_uring_submit_req(ctx: TracePointContext) -> u32 {
    let _ = try_uring_submit(&ctx);
    0
}

#[tracepoint]
pub fn io_uring_complete(ctx: TracePointContext) -> u32 {
    let _ = try_uring_complete(&ctx);
    0
}

/// Records an io_uring accept that will return a descriptor. Every submission of every ring
/// comes here, so the others end at the opcode.
fn try_uring_submit(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets of this tracepoint's fields, which the loader checked against its format.
    let opcode: u8 = unsafe { tracepoint_field(ctx, URING_SUBMIT_OPCODE.offset as usize) };
    if opcode != IORING_OP_ACCEPT {
        return Ok(());
    }
    // SAFETY: a plain read of a static that the loader initialised.
    let offsets = unsafe { read_volatile(addr_of!(URING_OFFSETS)) };
    if offsets.valid == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let (ring, req, user_data): (u64, u64, u64) = unsafe {
        (
            tracepoint_field(ctx, URING_SUBMIT_RING.offset as usize),
            tracepoint_field(ctx, URING_SUBMIT_REQ.offset as usize),
            tracepoint_field(ctx, URING_SUBMIT_USER_DATA.offset as usize),
        )
    };

    // The request is prepared before this tracepoint, so its slot is set.
    if req == 0 || read_at::<u32>(req, offsets.accept_file_slot) != Some(0) {
        return Ok(());
    }

    let accept = UringRequest { ring, user_data, req };
    // SAFETY: only the presence of the entry is read.
    if unsafe { URING_ACCEPTS.get(&accept) }.is_some() {
        // The entry of an earlier request at this address whose last completion went unseen.
        // This request takes it over, and is counted already.
        return Ok(());
    }
    if URING_ACCEPTS.insert(&accept, &0, 0).is_err() {
        count(Counter::UringAcceptMapFull);
        return Ok(());
    }
    add_waiting(1);

    let counted = UringRequest { ring, user_data, req: 0 };
    match URING_ACCEPTS.get_ptr_mut(&counted) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        Some(pending) => unsafe { fold::add(pending, 1) },
        // A single-shot accept still finds its own entry.
        None if URING_ACCEPTS.insert(&counted, &1, 0).is_err() => count(Counter::UringAcceptMapFull),
        None => {}
    }
    Ok(())
}

/// Takes the descriptor of a recorded io_uring accept's completion to the accept path. Every
/// completion of every ring comes here, so the others end at the count of waiting accepts, or
/// at the map lookup when some wait.
fn try_uring_complete(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: a plain read of this map's value, which programs on other CPUs may change.
    if URING_WAITING.get_ptr(0).is_none_or(|waiting| unsafe { read_volatile(waiting) } == 0) {
        return Ok(());
    }

    // SAFETY: offsets of this tracepoint's fields, which the loader checked against its format.
    let key = unsafe {
        UringRequest {
            ring: tracepoint_field(ctx, URING_COMPLETE_RING.offset as usize),
            user_data: tracepoint_field(ctx, URING_COMPLETE_USER_DATA.offset as usize),
            req: tracepoint_field(ctx, URING_COMPLETE_REQ.offset as usize),
        }
    };
    // A completion that names no request finds the entry that counts the ring's accepts with its
    // user data.
    // NOTE: so another multishot operation of the process with an accept's user data, on the same
    // ring, is taken for the accept. Its result then names a descriptor that is no new socket.
    // SAFETY: only the presence of the entry is read.
    if unsafe { URING_ACCEPTS.get(&key) }.is_none() {
        return Ok(());
    }

    // SAFETY: as above.
    let (res, cflags): (i32, u32) = unsafe {
        (
            tracepoint_field(ctx, URING_COMPLETE_RES.offset as usize),
            tracepoint_field(ctx, URING_COMPLETE_CFLAGS.offset as usize),
        )
    };
    // The flag marks a completion that more completions of the request follow.
    if key.req != 0 && cflags & IORING_CQE_F_MORE == 0 && URING_ACCEPTS.remove(&key).is_ok() {
        add_waiting(u64::MAX);
        forget_accept(&UringRequest { req: 0, ..key });
    }
    if res < 0 {
        return Ok(());
    }
    accepted(res as u64)
}

/// Adds `delta` (`u64::MAX` to take one off) to the count of accepts waiting in `URING_ACCEPTS`.
#[inline(always)]
fn add_waiting(delta: u64) {
    if let Some(waiting) = URING_WAITING.get_ptr_mut(0) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        unsafe { fold::add(waiting, delta) };
    }
}

/// Takes one accept off the count at `counted`, and the entry with the last.
// NOTE: an accept submitted with the same ring and user data on another CPU, between the
// decrement and the removal, loses the entry: its completions that name no request are then not
// taken for it.
#[inline(always)]
fn forget_accept(counted: &UringRequest) {
    let Some(pending) = URING_ACCEPTS.get_ptr_mut(counted) else { return };
    // SAFETY: the pointer is to this map's value, valid during the program. The BPF target this
    // object is built for has no atomic add that returns the old value, so the count is read after.
    let left = unsafe {
        fold::add(pending, u64::MAX);
        read_volatile(pending)
    };
    if left == 0 || left > u64::MAX / 2 {
        let _ = URING_ACCEPTS.remove(counted);
    }
}

/// Reports the connection behind descriptor `fd` of the current process, which an accept
/// returned.
#[inline(always)]
fn accepted(fd: u64) -> Result<(), i64> {
    // SAFETY: a plain read of a static that the loader initialised.
    let offsets = unsafe { read_volatile(addr_of!(ACCEPT_OFFSETS)) };
    if offsets.valid == 0 {
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    let task = kernel::current_task();
    let Some(sock) = socket_of_fd(&offsets, task, fd) else {
        return Ok(());
    };
    if is_agent(tgid) {
        remember_owner(sock, tgid, SOCKET_FLAG_AGENT, 0);
        return Ok(());
    }
    // A connection whose connecting end on this host was folded is counted in that end's flow.
    // NOTE: so the processes of such a pair are those of the pair's last reported connection,
    // whichever process accepts.
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(paired) = unsafe { PAIRED_ACCEPTS.get(&sock) }.copied() {
        let _ = PAIRED_ACCEPTS.remove(&sock);
        // An entry of an earlier socket at this address, which no accept took, does not count.
        if read_at::<u64>(sock, offsets.skc_cookie) == Some(paired.cookie) {
            return Ok(());
        }
    }
    // The entry the Accepted record left contains the socket's namespace and the listener's
    // owner.
    // SAFETY: the value is copied out of the map.
    let known = unsafe { SOCKETS.get(&sock) }.copied();
    // A process outside the scope may accept a connection of a listener in scope: a forked child
    // that left the scope, or one the listening socket was passed to. Its record names no
    // process, so the listener's owner is not charged with the connection.
    let outside = !current_in_scope();
    // A folded connection is counted in its flow, which names the process of the flow's last
    // reported connection, so that process accepting it adds nothing. A paired one is here when
    // `PAIRED_ACCEPTS` was full.
    let folded = known.map_or(0, |owner| owner.flags & SOCKET_FLAGS_FOLDED);
    let expected = known.is_some_and(|owner| owner.pid == tgid);
    if folded != 0 && !outside && (folded & SOCKET_FLAG_FOLDED_PAIRED != 0 || expected) {
        return Ok(());
    }
    if outside && folded == 0 && !known.is_some_and(|owner| owner.flags == 0) {
        return Ok(());
    }
    // A Unix domain socket or another family's accept goes through the same system call.
    let family: u16 = read_at(sock, offsets.skc_family).ok_or(0i64)?;
    let (saddr, daddr) = match family {
        FAMILY_INET => {
            let local: [u8; 4] = read_at(sock, offsets.skc_rcv_saddr).ok_or(0i64)?;
            let remote: [u8; 4] = read_at(sock, offsets.skc_daddr).ok_or(0i64)?;
            (tcp::widen_ipv4(local), tcp::widen_ipv4(remote))
        }
        FAMILY_INET6 => (
            read_at(sock, offsets.skc_v6_rcv_saddr).ok_or(0i64)?,
            read_at(sock, offsets.skc_v6_daddr).ok_or(0i64)?,
        ),
        _ => return Ok(()),
    };
    let sport: u16 = read_at(sock, offsets.skc_num).ok_or(0i64)?;
    let dport: u16 = read_at::<u16>(sock, offsets.skc_dport).ok_or(0i64)?;
    let known_netns = known.map_or(0, |owner| owner.netns);
    // The socket's entry contains its listener's serial, part of the flow's key.
    let flow = fold::incoming_key(known_netns, known.map_or(0, |owner| owner.exec), family, saddr, sport, daddr);
    if folded & SOCKET_FLAG_FOLDED_IN != 0 {
        // Accepted outside the scope, or in it by another process than the flow's last reported
        // acceptor: the connection leaves its flow's count, and the latter is reported below.
        fold::unfold_accepted(&flow);
    }
    if folded != 0 && outside {
        let _ = SOCKETS.remove(&sock);
        return Ok(());
    }
    if known.is_some() && !outside && fold::enabled() {
        // The flow's folded connections are expected to come to this process.
        fold::note_acceptor(tgid, &flow);
    }
    let netns = if known_netns != 0 { known_netns } else { tcp::socket_netns(sock) };
    // The listener's owner accepting its own connection is the common case, and the entry
    // already names it: the record skips the map update and the reads of its lineage and
    // executable, which its listen or the agent's /proc scan gave.
    // NOTE: so an executable deleted or a parent changed after the listen shows only in the
    // owner's other records.
    let by_listener_owner = known.is_some_and(|owner| owner.pid == tgid && owner.flags == 0 && owner.netns != 0);
    let mut flags = 0;
    let mut lineage = Lineage::default();
    let (mut pid, mut thread, mut cgroup_id) = (tgid, tid, current_cgroup_id());
    if outside {
        // Its close is not reported either.
        let _ = SOCKETS.remove(&sock);
        (pid, thread, cgroup_id) = (0, 0, 0);
    } else if !by_listener_owner {
        // From now on the connection's Close record names this process.
        remember_owner(sock, tgid, 0, netns);
        if let Some(dentry) = kernel::exe_dentry(task) {
            if kernel::dentry_unlinked(dentry) == Some(true) {
                flags |= TCP_FLAG_EXE_UNLINKED;
            }
        }
        lineage = kernel::lineage(task).unwrap_or_default();
    }
    let Some(mut entry) = EVENTS.reserve::<AcceptRecord>(0) else {
        count(Counter::AcceptRingBufferFull);
        return Ok(());
    };
    entry.write(AcceptRecord {
        header: RecordHeader {
            kind: RecordKind::Accept as u32,
            pid,
            tid: thread,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id,
        },
        skaddr: sock,
        fd: fd as u32,
        flags,
        netns,
        family,
        sport,
        dport: u16::from_be(dport),
        _reserved: 0,
        _reserved2: 0,
        saddr,
        daddr,
        lineage,
    });
    entry.submit(crate::submit_flags());
    Ok(())
}

/// Returns the `struct sock` behind descriptor `fd` of `task`, or `None` when the descriptor is
/// out of range, empty, not a socket, or a read fails.
#[inline(always)]
fn socket_of_fd(offsets: &AcceptOffsets, task: u64, fd: u64) -> Option<u64> {
    let files: u64 = read_at(task, offsets.task_files)?;
    let table: u64 = read_at(files, offsets.files_fdt)?;
    // `max_fds` is a 32-bit field, in the low half of its word.
    let (max_fds, array) = read_two_words(table, offsets.fdtable_max_fds, offsets.fdtable_fd)?;
    if fd >= max_fds & u64::from(u32::MAX) {
        return None;
    }
    let file: u64 = read_pointer(array + fd * 8)?;
    let socket: u64 = read_at(file, offsets.file_private_data)?;
    // Only a socket's private data points back to its file.
    let (back, sk) = read_two_words(socket, offsets.socket_file, offsets.socket_sk)?;
    (back == file).then_some(sk)
}

/// Reads the 8-byte words at `base + first` and `base + second`, in one probe read when the
/// second starts 8 bytes after the first.
#[inline(always)]
fn read_two_words(base: u64, first: u32, second: u32) -> Option<(u64, u64)> {
    if second == first.wrapping_add(8) {
        let [a, b] = read_at::<[u64; 2]>(base, first)?;
        return Some((a, b));
    }
    Some((read_at(base, first)?, read_at(base, second)?))
}

/// Records `pid` as the owner of the socket, so that its later records carry the process.
#[inline(always)]
fn remember_owner(sock: u64, pid: u32, flags: u32, netns: u32) {
    if SOCKETS.insert(&sock, &SockOwner { pid, flags, netns, exec: 0 }, 0).is_err() {
        count(Counter::TcpSocketMapFull);
    }
}

#[inline(always)]
fn read_pointer(address: u64) -> Option<u64> {
    if address == 0 {
        return None;
    }
    // SAFETY: a fault-handling probe read.
    let value = unsafe { bpf_probe_read_kernel(address as *const u64) }.ok()?;
    (value != 0).then_some(value)
}

/// Reads a `T` at `base + offset`; `None` when `base` is null or the read fails.
#[inline(always)]
fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: a fault-handling probe read.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}
