//! Credential changes: the `set*id` and `capset` system calls, reported at their exit when they
//! succeeded, with the credentials the task has afterwards. Failed attempts change nothing and
//! are not reported.

use agent_common::{CredRecord, CredSyscall, Counter, RecordHeader, RecordKind};
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::{count, current_cgroup_id, current_ids, current_in_scope, is_agent, kernel, ktime_ns, EVENTS};

// Offset of `ret` in every sys_exit_* record, from events/syscalls/sys_exit_*/format in tracefs.
const SYS_EXIT_RET_OFFSET: usize = 16;

#[tracepoint]
pub fn sys_exit_setuid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setuid);
    0
}

#[tracepoint]
pub fn sys_exit_setgid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setgid);
    0
}

#[tracepoint]
pub fn sys_exit_setreuid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setreuid);
    0
}

#[tracepoint]
pub fn sys_exit_setregid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setregid);
    0
}

#[tracepoint]
pub fn sys_exit_setresuid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setresuid);
    0
}

#[tracepoint]
pub fn sys_exit_setresgid(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Setresgid);
    0
}

#[tracepoint]
pub fn sys_exit_capset(ctx: TracePointContext) -> u32 {
    let _ = try_cred_change(&ctx, CredSyscall::Capset);
    0
}

fn try_cred_change(ctx: &TracePointContext, syscall: CredSyscall) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: offset of `ret` in this tracepoint's record.
    let ret: i64 = unsafe { crate::tracepoint_field(ctx, SYS_EXIT_RET_OFFSET) };
    if ret != 0 {
        return Ok(());
    }
    let credentials = kernel::credentials(kernel::current_task());
    let (uid, euid, gid, egid, cap_effective) = credentials.unwrap_or((0, 0, 0, 0, 0));
    let Some(mut entry) = EVENTS.reserve::<CredRecord>(0) else {
        count(Counter::CredRingBufferFull);
        return Ok(());
    };
    entry.write(CredRecord {
        header: RecordHeader {
            kind: RecordKind::Credentials as u32,
            pid: tgid,
            tid,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: current_cgroup_id(),
        },
        syscall: syscall as u32,
        read: u32::from(credentials.is_some()),
        uid,
        euid,
        gid,
        egid,
        cap_effective,
    });
    entry.submit(crate::submit_flags());
    Ok(())
}
