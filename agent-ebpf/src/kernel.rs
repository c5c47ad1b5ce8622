//! Reads of kernel structs at the member offsets the agent resolved from BTF ([`KERNEL_OFFSETS`]).
//!
//! Every read goes through `bpf_probe_read_kernel`, which returns an error instead of faulting, so
//! a wrong offset gives a zero or a missing value, never a crash. A group of offsets the agent
//! could not resolve is marked invalid and not read at all.

use core::{ffi::c_void, ptr::addr_of};

use agent_common::{KernelOffsets, Lineage};
use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    r#gen::{bpf_get_current_task, bpf_probe_read_kernel_str},
};

use crate::KERNEL_OFFSETS;

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of a static that the loader initialised.
    unsafe { core::ptr::read_volatile(addr_of!(KERNEL_OFFSETS)) }
}

#[inline(always)]
fn read_u64(address: u64) -> Option<u64> {
    if address == 0 {
        return None;
    }
    // SAFETY: a fault-handling probe read.
    unsafe { bpf_probe_read_kernel(address as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(address: u64) -> Option<u32> {
    if address == 0 {
        return None;
    }
    // SAFETY: a fault-handling probe read.
    unsafe { bpf_probe_read_kernel(address as *const u32) }.ok()
}

/// Address of the current task's `task_struct`.
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: the helper has no arguments.
    unsafe { bpf_get_current_task() }
}

/// Parent tgid and start times of `task`; `None` when the offsets are unknown or a read failed.
#[inline(always)]
pub fn lineage(task: u64) -> Option<Lineage> {
    let offsets = offsets();
    if offsets.task_valid == 0 || task == 0 {
        return None;
    }
    let leader = read_u64(task + u64::from(offsets.task_group_leader))?;
    let start = read_u64(leader + u64::from(offsets.task_start_boottime))?;
    let parent = read_u64(task + u64::from(offsets.task_real_parent))?;
    let parent_tgid = read_u32(parent + u64::from(offsets.task_tgid))?;
    let parent_leader = read_u64(parent + u64::from(offsets.task_group_leader))?;
    let parent_start = read_u64(parent_leader + u64::from(offsets.task_start_boottime))?;
    Some(Lineage {
        parent_tgid,
        _reserved: 0,
        start_boottime_ns: start,
        parent_start_boottime_ns: parent_start,
    })
}

/// Address of the `dentry` of the file `task` runs (`mm->exe_file`); `None` for kernel threads,
/// unknown offsets or a failed read.
#[inline(always)]
pub fn exe_dentry(task: u64) -> Option<u64> {
    let offsets = offsets();
    if offsets.exe_valid == 0 || task == 0 {
        return None;
    }
    let mm = read_u64(task + u64::from(offsets.task_mm))?;
    let file = read_u64(mm + u64::from(offsets.mm_exe_file))?;
    let dentry = read_u64(file + u64::from(offsets.file_dentry))?;
    if dentry == 0 {
        return None;
    }
    Some(dentry)
}

/// Returns a value that changes when the current process runs another program: the address of its
/// memory map, which each exec replaces, shifted past its alignment. 0 when the offsets are unknown.
#[inline(always)]
pub fn exec_cookie() -> u32 {
    let offsets = offsets();
    if offsets.exe_valid == 0 {
        return 0;
    }
    read_u64(current_task() + u64::from(offsets.task_mm)).map_or(0, |mm| (mm >> 6) as u32)
}

/// True when the file behind `dentry` has no link left in any directory.
#[inline(always)]
pub fn dentry_unlinked(dentry: u64) -> Option<bool> {
    let offsets = offsets();
    let inode = read_u64(dentry + u64::from(offsets.dentry_inode))?;
    let nlink = read_u32(inode + u64::from(offsets.inode_nlink))?;
    Some(nlink == 0)
}

/// Copies the name of `dentry` into `out` (at most `size` bytes with the NUL); returns the
/// length without the NUL, 0 on failure.
///
/// # Safety
/// `out` must be valid for writes of `size` bytes.
#[inline(always)]
pub unsafe fn dentry_name(dentry: u64, out: *mut u8, size: u32) -> u32 {
    let offsets = offsets();
    let Some(name) = read_u64(dentry + u64::from(offsets.dentry_name)) else {
        return 0;
    };
    if name == 0 {
        return 0;
    }
    let read = bpf_probe_read_kernel_str(out as *mut c_void, size, name as *const c_void);
    if read > 0 {
        (read - 1) as u32
    } else {
        0
    }
}

/// `RCV_SHUTDOWN` in `sock.sk_shutdown`: the peer's FIN arrived.
const RCV_SHUTDOWN: u8 = 1;

/// Payload bytes sent and received and the pending error of the TCP socket at `sock`.
#[inline(always)]
pub fn tcp_socket_counters(sock: u64) -> Option<(u64, u64, i32)> {
    let offsets = offsets();
    if offsets.tcp_valid == 0 || sock == 0 {
        return None;
    }
    // Retransmissions count again in bytes_sent; a FIN counts in bytes_received because it takes
    // a sequence number. Neither is payload.
    let sent = read_u64(sock + u64::from(offsets.tcp_bytes_sent))?;
    let retransmitted = read_u64(sock + u64::from(offsets.tcp_bytes_retrans))?;
    let mut received = read_u64(sock + u64::from(offsets.tcp_bytes_received))?;
    let error = read_u32(sock + u64::from(offsets.sock_err))?;
    // SAFETY: a fault-handling probe read.
    let shutdown: u8 =
        unsafe { bpf_probe_read_kernel((sock + u64::from(offsets.sock_shutdown)) as *const u8) }
            .ok()?;
    if shutdown & RCV_SHUTDOWN != 0 && received > 0 {
        received -= 1;
    }
    Some((sent.saturating_sub(retransmitted), received, error as i32))
}

/// Process id of `task` inside its own pid namespace, and that namespace's depth.
#[inline(always)]
pub fn namespace_pid(task: u64) -> Option<(u32, u32)> {
    let offsets = offsets();
    if offsets.pid_valid == 0 || task == 0 {
        return None;
    }
    let pid = read_u64(task + u64::from(offsets.task_thread_pid))?;
    let level = read_u32(pid + u64::from(offsets.pid_level))?;
    // pid namespaces nest at most 32 deep (MAX_PID_NS_LEVEL).
    if level > 32 {
        return None;
    }
    let entry = pid
        + u64::from(offsets.pid_numbers)
        + u64::from(level) * u64::from(offsets.upid_size)
        + u64::from(offsets.upid_nr);
    let nr = read_u32(entry)?;
    Some((nr, level))
}

/// Real and effective user and group ids and effective capabilities of `task`.
#[inline(always)]
pub fn credentials(task: u64) -> Option<(u32, u32, u32, u32, u64)> {
    let offsets = offsets();
    if offsets.cred_valid == 0 || task == 0 {
        return None;
    }
    let cred = read_u64(task + u64::from(offsets.task_cred))?;
    Some((
        read_u32(cred + u64::from(offsets.cred_uid))?,
        read_u32(cred + u64::from(offsets.cred_euid))?,
        read_u32(cred + u64::from(offsets.cred_gid))?,
        read_u32(cred + u64::from(offsets.cred_egid))?,
        read_u64(cred + u64::from(offsets.cred_cap_effective))?,
    ))
}
