//! Which kinds of kernel hook this kernel accepts, found at start-up by loading a program of each
//! kind that does nothing (`r0 = 0; exit`) and closing it at once.
//!
//! The agent builds on tracepoints and cgroup socket hooks, and takes TCP state changes from a
//! `sock_ops` program where the kernel accepts one (see the loader). The result shows the
//! operator, in the status and the log, which richer hooks this kernel would allow, so that no
//! host is believed to have coverage it lacks. A kind that loads but cannot attach (kprobes without the kprobe event source) counts
//! as unavailable.

use std::io;
use std::path::Path;

use super::btf::Btf;

/// Result of probing one hook kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSupport {
    /// `tracepoint`, `raw_tracepoint`, `tp_btf`, `cgroup_sock_addr`, `sock_ops`, `kprobe`,
    /// `fentry` or `lsm`.
    pub kind: &'static str,
    pub available: bool,
    /// Reason the kind is unavailable.
    pub error: Option<String>,
}

// Numbers from include/uapi/linux/bpf.h.
const BPF_PROG_LOAD: libc::c_long = 5;
const PROG_TYPE_KPROBE: u32 = 2;
const PROG_TYPE_TRACEPOINT: u32 = 5;
const PROG_TYPE_SOCK_OPS: u32 = 13;
const PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_TYPE_TRACING: u32 = 26;
const PROG_TYPE_LSM: u32 = 29;
const ATTACH_CGROUP_INET4_CONNECT: u32 = 10;
const ATTACH_TRACE_RAW_TP: u32 = 23;
const ATTACH_TRACE_FENTRY: u32 = 24;
const ATTACH_LSM_MAC: u32 = 27;

/// Directory of the kprobe event source, which attaching a kprobe needs.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Probes every hook kind. `btf` is the kernel's BTF, which the BTF-typed kinds name their
/// target in; without it they are reported unavailable.
pub fn probe_hook_kinds(btf: Option<&Btf>) -> Vec<HookSupport> {
    let btf_id = |id: Option<u32>, what: &str| {
        id.ok_or_else(|| format!("{what} not found in kernel BTF"))
    };
    let btf_missing = || Err("no kernel BTF".to_string());
    let mut results = vec![
        support("tracepoint", load(PROG_TYPE_TRACEPOINT, 0, 0)),
        support("raw_tracepoint", load(PROG_TYPE_RAW_TRACEPOINT, 0, 0)),
        support(
            "tp_btf",
            match btf {
                Some(btf) => btf_id(btf.typedef_id("btf_trace_sched_process_exec"), "btf_trace_sched_process_exec")
                    .and_then(|id| load(PROG_TYPE_TRACING, ATTACH_TRACE_RAW_TP, id)),
                None => btf_missing(),
            },
        ),
        support(
            "cgroup_sock_addr",
            load(PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT, 0),
        ),
        support("sock_ops", load(PROG_TYPE_SOCK_OPS, 0, 0)),
    ];
    let kprobe = if Path::new(KPROBE_PMU).exists() {
        load(PROG_TYPE_KPROBE, 0, 0)
    } else {
        Err(format!("{KPROBE_PMU} is missing: the kernel has no kprobe support (CONFIG_KPROBES)"))
    };
    results.push(support("kprobe", kprobe));
    results.push(support(
        "fentry",
        match btf {
            Some(btf) => btf_id(btf.function_id("do_nanosleep"), "do_nanosleep")
                .and_then(|id| load(PROG_TYPE_TRACING, ATTACH_TRACE_FENTRY, id)),
            None => btf_missing(),
        },
    ));
    results.push(support(
        "lsm",
        match btf {
            Some(btf) => btf_id(btf.function_id("bpf_lsm_file_open"), "bpf_lsm_file_open")
                .and_then(|id| load(PROG_TYPE_LSM, ATTACH_LSM_MAC, id)),
            None => btf_missing(),
        },
    ));
    results
}

fn support(kind: &'static str, result: Result<(), String>) -> HookSupport {
    HookSupport { kind, available: result.is_ok(), error: result.err() }
}

/// Loads `r0 = 0; exit` as a program of `prog_type` and closes it.
fn load(prog_type: u32, expected_attach_type: u32, attach_btf_id: u32) -> Result<(), String> {
    // mov64 r0, 0; exit
    let instructions: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD, laid out by hand: the fields up to attach_btf_obj_fd.
    let mut attr = [0u8; 120];
    let mut put = |offset: usize, bytes: &[u8]| attr[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &prog_type.to_ne_bytes());
    put(4, &(instructions.len() as u32).to_ne_bytes());
    put(8, &(instructions.as_ptr() as u64).to_ne_bytes());
    put(16, &(license.as_ptr() as u64).to_ne_bytes());
    put(48, b"driftwatch_prob");
    put(68, &expected_attach_type.to_ne_bytes());
    put(108, &attach_btf_id.to_ne_bytes());
    // SAFETY: `attr` is a valid bpf_attr of the size passed; the pointers in it stay valid for
    // the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len() as u32) };
    if fd < 0 {
        let error = io::Error::last_os_error();
        return Err(format!("the kernel refused to load it: {error}"));
    }
    // SAFETY: closes the descriptor the kernel just returned to us.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoints_load_on_this_kernel() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let btf = Btf::from_file(Path::new(super::super::btf::VMLINUX_BTF)).ok();
        let results = probe_hook_kinds(btf.as_ref());
        let kinds: Vec<&str> = results.iter().map(|result| result.kind).collect();
        assert_eq!(kinds, ["tracepoint", "raw_tracepoint", "tp_btf", "cgroup_sock_addr", "sock_ops", "kprobe", "fentry", "lsm"]);
        let tracepoint = &results[0];
        assert!(tracepoint.available, "{tracepoint:?}");
        for result in &results {
            assert_eq!(result.available, result.error.is_none(), "{result:?}");
        }
    }
}
