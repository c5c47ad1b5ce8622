//! Fork and exit of tasks. The exit status comes from `exit_group`, stashed per process, because
//! `sched_process_exit` does not carry it; a task killed by a signal therefore has no status.

use agent_common::{Counter, ExitRecord, ForkRecord, RecordHeader, RecordKind};

use crate::kernel;
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::{
    count, current_cgroup_id, current_ids, current_in_scope, is_agent, ktime_ns, EVENTS, EXIT_CODES,
};

// Offsets in the tracepoint records, from events/<category>/<name>/format in tracefs.
const SCHED_FORK_CHILD_PID_OFFSET: usize = 20;
const EXIT_GROUP_ERROR_CODE_OFFSET: usize = 16;
const SCHED_EXIT_GROUP_DEAD_OFFSET: usize = 32;

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_fork(&ctx);
    0
}

#[tracepoint]
pub fn sys_enter_exit_group(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_exit_group(&ctx);
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_fork(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // NOTE: the parent recorded is the forking process, which is wrong for CLONE_PARENT children
    // until their exec, exit or socket records bring the kernel's `real_parent`.
    // SAFETY: offset of `child_pid` in this tracepoint's record.
    let child_pid: i32 = unsafe { crate::tracepoint_field(ctx, SCHED_FORK_CHILD_PID_OFFSET) };

    let Some(mut entry) = EVENTS.reserve::<ForkRecord>(0) else {
        count(Counter::ForkRingBufferFull);
        return Ok(());
    };
    entry.write(ForkRecord {
        header: RecordHeader {
            kind: RecordKind::Fork as u32,
            pid: tgid,
            tid,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: current_cgroup_id(),
        },
        child_pid: child_pid as u32,
        _reserved: 0,
    });
    entry.submit(crate::submit_flags());
    Ok(())
}

fn try_sys_enter_exit_group(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, _) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: offset of `error_code` (the `exit_group` argument) in this tracepoint's record.
    let code: u64 = unsafe { crate::tracepoint_field(ctx, EXIT_GROUP_ERROR_CODE_OFFSET) };
    // The kernel keeps the low 8 bits, shifted as wait(2) reports a normal exit.
    let status = ((code & 0xff) << 8) as i32;
    if EXIT_CODES.insert(&tgid, &status, 0).is_err() {
        count(Counter::ExitCodeStashFull);
    }
    Ok(())
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: offset of `group_dead` in this tracepoint's record.
    let group_dead: u8 = unsafe { crate::tracepoint_field(ctx, SCHED_EXIT_GROUP_DEAD_OFFSET) };

    // SAFETY: the value is copied out before the entry can be removed.
    let exit_code = unsafe { EXIT_CODES.get(&tgid) }.copied();
    if group_dead != 0 {
        let _ = EXIT_CODES.remove(&tgid);
    }

    let Some(mut entry) = EVENTS.reserve::<ExitRecord>(0) else {
        count(Counter::ExitRingBufferFull);
        return Ok(());
    };
    entry.write(ExitRecord {
        header: RecordHeader {
            kind: RecordKind::Exit as u32,
            pid: tgid,
            tid,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: current_cgroup_id(),
        },
        exit_code: exit_code.unwrap_or(0),
        has_exit_code: u32::from(exit_code.is_some()),
        group_dead: u32::from(group_dead != 0),
        _reserved: 0,
        lineage: kernel::lineage(kernel::current_task()).unwrap_or_default(),
    });
    entry.submit(crate::submit_flags());
    Ok(())
}
