//! Exec: argv is stashed per thread at `execve`/`execveat` entry, because the argv pointer is no
//! longer readable at `sched_process_exec`. The exec record is written at `sched_process_exec`,
//! once the exec can no longer fail, with the path the kernel resolved.

use core::{ffi::c_void, ptr::addr_of_mut};

use agent_common::{
    Counter, ExecRecord, Lineage, RecordHeader, RecordKind, ARGV_CAPTURE_BYTES, ARGV_MAX_ARGS,
    COMM_BYTES, EXEC_FLAG_ARGV_MISSING, EXEC_FLAG_ARGV_TRUNCATED, EXEC_FLAG_EXE_UNKNOWN,
    EXEC_FLAG_EXE_UNLINKED, EXEC_FLAG_FILENAME_TRUNCATED, EXEC_FLAG_LINEAGE_UNKNOWN,
    EXE_NAME_BYTES, FILENAME_BYTES,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_uid_gid, bpf_probe_read_user,
        r#gen::{
            bpf_get_current_comm, bpf_probe_read_kernel, bpf_probe_read_kernel_str,
            bpf_probe_read_user_str,
        },
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

use crate::{
    count, current_cgroup_id, kernel, current_ids, current_in_scope, is_agent, ktime_ns, ARGV_SCRATCH,
    EVENTS, EXEC_ARGS,
};

// Offsets in the tracepoint records, from events/<category>/<name>/format in tracefs.
const EXECVE_ARGV_OFFSET: usize = 24;
const EXECVEAT_ARGV_OFFSET: usize = 32;
const SCHED_EXEC_FILENAME_LOC_OFFSET: usize = 8;
const SCHED_EXEC_OLD_PID_OFFSET: usize = 16;

#[tracepoint]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    let _ = try_stash_argv(&ctx, EXECVE_ARGV_OFFSET);
    0
}

#[tracepoint]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    let _ = try_stash_argv(&ctx, EXECVEAT_ARGV_OFFSET);
    0
}

#[tracepoint]
pub fn sys_exit_execve(_ctx: TracePointContext) -> u32 {
    drop_stash();
    0
}

#[tracepoint]
pub fn sys_exit_execveat(_ctx: TracePointContext) -> u32 {
    drop_stash();
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

/// Removes what a failed exec left in the stash. After a successful exec `sched_process_exec`
/// already removed it, so this is a no-op then.
#[inline(always)]
fn drop_stash() {
    let (_, tid) = current_ids();
    let _ = EXEC_ARGS.remove(&tid);
}

fn try_stash_argv(ctx: &TracePointContext, argv_offset: usize) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: the offset is the `argv` field of this tracepoint's record.
    let argv: u64 = unsafe { ctx.read_at(argv_offset)? };

    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        count(Counter::ExecArgsScratchMissing);
        return Ok(());
    };
    // SAFETY: `scratch` points to this CPU's slot of the scratch map, valid for this run.
    let stash = unsafe { &mut *scratch };
    stash.len = 0;
    stash.flags = 0;
    let data = addr_of_mut!(stash.data) as *mut u8;

    let mut used: usize = 0;
    let mut index: u32 = 0;
    while index < ARGV_MAX_ARGS {
        // SAFETY: reads one user pointer; a fault returns an error instead of crashing.
        let arg: u64 =
            match unsafe { bpf_probe_read_user((argv + u64::from(index) * 8) as *const u64) } {
                Ok(arg) => arg,
                Err(_) => break,
            };
        if arg == 0 {
            break;
        }
        if used >= ARGV_CAPTURE_BYTES {
            stash.flags |= EXEC_FLAG_ARGV_TRUNCATED;
            break;
        }
        // The mask makes the bound visible to the verifier: the write starts below
        // ARGV_CAPTURE_BYTES and is at most ARGV_CAPTURE_BYTES long, inside the doubled scratch.
        let offset = used & (ARGV_CAPTURE_BYTES - 1);
        // SAFETY: `data + offset .. + ARGV_CAPTURE_BYTES` lies inside `stash.data`.
        let read = unsafe {
            bpf_probe_read_user_str(
                data.add(offset) as *mut c_void,
                ARGV_CAPTURE_BYTES as u32,
                arg as *const c_void,
            )
        };
        if read <= 0 {
            break;
        }
        used += read as usize;
        index += 1;
    }
    if index == ARGV_MAX_ARGS {
        // SAFETY: as above; a non-null pointer after the last captured one means more arguments.
        let next: u64 = unsafe { bpf_probe_read_user((argv + u64::from(index) * 8) as *const u64) }
            .unwrap_or(0);
        if next != 0 {
            stash.flags |= EXEC_FLAG_ARGV_TRUNCATED;
        }
    }
    if used > ARGV_CAPTURE_BYTES {
        used = ARGV_CAPTURE_BYTES;
        stash.flags |= EXEC_FLAG_ARGV_TRUNCATED;
    }
    stash.len = used as u32;

    if EXEC_ARGS.insert(&tid, stash, 0).is_err() {
        count(Counter::ExecArgsStashFull);
    }
    Ok(())
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, _) = current_ids();
    if is_agent(tgid) || !current_in_scope() {
        return Ok(());
    }
    // SAFETY: offsets of `filename` (a __data_loc: offset in the low 16 bits, length including
    // the NUL in the high 16) and `old_pid` in this tracepoint's record.
    let filename_loc: u32 = unsafe { crate::tracepoint_field(ctx, SCHED_EXEC_FILENAME_LOC_OFFSET) };
    let old_pid: i32 = unsafe { crate::tracepoint_field(ctx, SCHED_EXEC_OLD_PID_OFFSET) };
    let old_tid = old_pid as u32;

    let Some(mut entry) = EVENTS.reserve::<ExecRecord>(0) else {
        count(Counter::ExecRingBufferFull);
        let _ = EXEC_ARGS.remove(&old_tid);
        return Ok(());
    };
    let record = entry.as_mut_ptr();
    let uid_gid = bpf_get_current_uid_gid();

    // SAFETY: `record` points to a reserved ring buffer slot of `size_of::<ExecRecord>()` bytes;
    // every write below stays inside its fields.
    unsafe {
        (*record).header = RecordHeader {
            kind: RecordKind::Exec as u32,
            pid: tgid,
            tid: old_tid,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: current_cgroup_id(),
        };
        (*record).uid = uid_gid as u32;
        (*record).gid = (uid_gid >> 32) as u32;
        (*record)._reserved = 0;

        let comm = addr_of_mut!((*record).comm) as *mut c_void;
        if bpf_get_current_comm(comm, COMM_BYTES as u32) != 0 {
            (*record).comm[0] = 0;
        }

        let mut flags = 0;
        let filename_src = (ctx.as_ptr() as *const u8).add((filename_loc & 0xffff) as usize);
        let read = bpf_probe_read_kernel_str(
            addr_of_mut!((*record).filename) as *mut c_void,
            FILENAME_BYTES as u32,
            filename_src as *const c_void,
        );
        (*record).filename_len = if read > 0 { (read - 1) as u32 } else { 0 };
        if (filename_loc >> 16) as usize > FILENAME_BYTES {
            flags |= EXEC_FLAG_FILENAME_TRUNCATED;
        }

        match EXEC_ARGS.get(&old_tid) {
            Some(stash) => {
                let copied = bpf_probe_read_kernel(
                    addr_of_mut!((*record).argv) as *mut c_void,
                    ARGV_CAPTURE_BYTES as u32,
                    stash.data.as_ptr() as *const c_void,
                );
                let len = if stash.len as usize > ARGV_CAPTURE_BYTES {
                    ARGV_CAPTURE_BYTES as u32
                } else {
                    stash.len
                };
                (*record).argv_len = if copied == 0 { len } else { 0 };
                flags |= stash.flags;
                let _ = EXEC_ARGS.remove(&old_tid);
            }
            None => {
                (*record).argv_len = 0;
                flags |= EXEC_FLAG_ARGV_MISSING;
            }
        }
        let task = kernel::current_task();
        match kernel::lineage(task) {
            Some(lineage) => (*record).lineage = lineage,
            None => {
                (*record).lineage = Lineage::default();
                flags |= EXEC_FLAG_LINEAGE_UNKNOWN;
            }
        }
        (*record)._reserved2 = 0;
        (*record).exe_name_len = 0;
        (*record).exe_name[0] = 0;
        match kernel::exe_dentry(task) {
            Some(dentry) => {
                (*record).exe_name_len = kernel::dentry_name(
                    dentry,
                    addr_of_mut!((*record).exe_name) as *mut u8,
                    EXE_NAME_BYTES as u32,
                );
                match kernel::dentry_unlinked(dentry) {
                    Some(true) => flags |= EXEC_FLAG_EXE_UNLINKED,
                    Some(false) => {}
                    None => flags |= EXEC_FLAG_EXE_UNKNOWN,
                }
            }
            None => flags |= EXEC_FLAG_EXE_UNKNOWN,
        }
        let (ns_pid, ns_level) = kernel::namespace_pid(task).unwrap_or((0, 0));
        (*record).ns_pid = ns_pid;
        (*record).ns_level = ns_level;
        (*record).flags = flags;
    }
    entry.submit(crate::submit_flags());
    Ok(())
}
