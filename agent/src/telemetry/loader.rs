//! Loading the embedded eBPF object and attaching its programs.
//!
//! Before loading, the checks that give the operator an actionable error run first: root,
//! tracefs mounted, an object embedded at build time. Globals (the agent's tgid, the cgroup scope,
//! the struct offsets for the network namespace) are set before load. Each program is then loaded
//! and attached on its own, so one refused hook is a [`HookStatus`] with its error, fatal only when
//! the program is marked required.
//!
//! Cgroup programs (UDP flows, DNS answers) attach to the scope cgroup, or to the cgroup v2 root
//! when there is no scope, in a way that lets them run beside programs other tools attached to
//! the same cgroup.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use agent_common::{
    AcceptOffsets, CgroupHook, CgroupProgramSpec, KernelOffsets, ProgramSpec, TracepointField, UringOffsets,
    CGROUP_PROGRAMS, GLOBAL_ACCEPT_OFFSETS, GLOBAL_AGENT_TGID, GLOBAL_KERNEL_OFFSETS, GLOBAL_NETNS_OFFSETS_VALID,
    GLOBAL_OFFSET_NET_INUM, GLOBAL_OFFSET_SKC_NET, GLOBAL_SCOPE_CGROUP_ID, GLOBAL_SCOPE_CGROUP_LEVEL,
    GLOBAL_SCOPE_ENABLED, GLOBAL_URING_OFFSETS, MAP_EVENTS, PROGRAMS, TCP_SOCK_OPS_PROGRAM, TCP_TRACEPOINT_PROGRAM,
    URING_COMPLETE_PROGRAM, URING_SUBMIT_PROGRAM,
};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError, SockOps, TracePoint,
};
use aya::{Ebpf, EbpfLoader};

use super::btf::NetnsOffsets;
use super::cgroup::CgroupScope;
use super::TelemetryError;

/// The eBPF object `cargo xtask build` produced, embedded by `build.rs`; empty when the agent was
/// built without it.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/driftwatch.bpf.o"));

/// Mount point of tracefs that aya tries first.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Load and attach result of one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookStatus {
    /// Program name, also the tracepoint name for a tracepoint program.
    pub name: String,
    /// `category:name` of the tracepoint, or `cgroup/<hook>:<cgroup directory>` for a cgroup
    /// program.
    pub tracepoint: String,
    pub required: bool,
    pub attached: bool,
    /// Load or attach error, with the verifier log when the verifier rejected the program.
    pub error: Option<String>,
}

/// Everything [`load`] sets in the programs before they are loaded.
pub struct LoadParameters<'a> {
    pub agent_tgid: u32,
    pub scope: Option<&'a CgroupScope>,
    pub netns_offsets: Option<NetnsOffsets>,
    pub kernel_offsets: KernelOffsets,
    pub accept_offsets: AcceptOffsets,
    /// Offsets of the io_uring accept programs, or why they cannot be resolved.
    pub uring_offsets: Result<UringOffsets, String>,
    pub ring_buffer_bytes: u32,
    pub tcp_hook: TcpHook,
}

/// Source of TCP state changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcpHook {
    /// The cgroup `sock_ops` program when the kernel accepts it, else the tracepoint.
    #[default]
    Auto,
    /// The `sock:inet_sock_set_state` tracepoint, which runs for every state change of every
    /// TCP socket.
    Tracepoint,
}

/// Fails with [`TelemetryError::NotRoot`] unless the effective user is root.
pub fn check_root() -> Result<(), TelemetryError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(TelemetryError::NotRoot { euid });
    }
    Ok(())
}

/// Mounts tracefs at [`TRACEFS`] unless a tracefs is already reachable there or under debugfs.
pub fn ensure_tracefs() -> Result<(), TelemetryError> {
    if Path::new(TRACEFS).join("events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    let target = CString::new(TRACEFS).expect("constant path has no NUL");
    let fs_type = CString::new("tracefs").expect("constant has no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data
    // argument is passed.
    let result = unsafe {
        libc::mount(
            fs_type.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(TelemetryError::Tracefs {
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}

/// Lifts `RLIMIT_MEMLOCK`, which kernels before 5.11 charge BPF maps against.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: the pointer is to a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        let error = io::Error::last_os_error();
        // From 5.11 on, BPF memory is charged to the cgroup and the limit no longer matters.
        if kernel_at_least(5, 11) {
            tracing::debug!(%error, "failed to lift the memlock limit, which this kernel does not apply to BPF maps");
        } else {
            tracing::warn!(%error, "failed to lift the memlock limit; map creation may fail on kernels before 5.11");
        }
    }
}

/// Returns whether the running kernel's release is at least `major.minor`; false when unreadable.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|part| part.parse::<u32>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(found_major), Some(found_minor)) => (found_major, found_minor) >= (major, minor),
        _ => false,
    }
}

/// Loads the embedded object with `parameters`, then loads and attaches every program.
pub fn load(parameters: &LoadParameters<'_>) -> Result<(Ebpf, Vec<HookStatus>), TelemetryError> {
    if BPF_OBJECT.is_empty() {
        return Err(TelemetryError::ObjectMissing);
    }
    let (scope_enabled, scope_id, scope_level) = match parameters.scope {
        Some(scope) => (1u32, scope.id, scope.level),
        None => (0, 0, 0),
    };
    let (offsets_valid, skc_net, net_inum) = match parameters.netns_offsets {
        Some(offsets) => (1u32, offsets.skc_net, offsets.net_inum),
        None => (0, 0, 0),
    };

    let unresolved = UringOffsets::default();
    let uring_offsets = parameters.uring_offsets.as_ref().unwrap_or(&unresolved);

    let mut loader = EbpfLoader::new();
    loader
        .set_global(GLOBAL_AGENT_TGID, &parameters.agent_tgid, true)
        .set_global(GLOBAL_SCOPE_ENABLED, &scope_enabled, true)
        .set_global(GLOBAL_SCOPE_CGROUP_ID, &scope_id, true)
        .set_global(GLOBAL_SCOPE_CGROUP_LEVEL, &scope_level, true)
        .set_global(GLOBAL_NETNS_OFFSETS_VALID, &offsets_valid, true)
        .set_global(GLOBAL_OFFSET_SKC_NET, &skc_net, true)
        .set_global(GLOBAL_OFFSET_NET_INUM, &net_inum, true)
        .set_global(GLOBAL_KERNEL_OFFSETS, &parameters.kernel_offsets, true)
        .set_global(GLOBAL_ACCEPT_OFFSETS, &parameters.accept_offsets, true)
        .set_global(GLOBAL_URING_OFFSETS, uring_offsets, true)
        .set_max_entries(MAP_EVENTS, parameters.ring_buffer_bytes);
    let mut ebpf = loader.load(BPF_OBJECT).map_err(classify_load_error)?;

    let mut hooks = Vec::with_capacity(PROGRAMS.len());
    let sock_ops = match parameters.tcp_hook {
        TcpHook::Auto => Some(attach_sock_ops(&mut ebpf)),
        TcpHook::Tracepoint => None,
    };
    if let Some(status) = &sock_ops {
        match &status.error {
            None => tracing::info!(hook = TCP_SOCK_OPS_PROGRAM, attach_point = %status.tracepoint, "attached; TCP state changes come from sock_ops"),
            Some(error) => tracing::warn!(
                hook = TCP_SOCK_OPS_PROGRAM,
                %error,
                "sock_ops program failed; TCP state changes come from the inet_sock_set_state tracepoint, which costs more per connection"
            ),
        }
    }
    let sock_ops_attached = sock_ops.as_ref().is_some_and(|status| status.attached);
    hooks.extend(sock_ops);
    for spec in PROGRAMS {
        if spec.name == TCP_TRACEPOINT_PROGRAM && sock_ops_attached {
            continue;
        }
        let uring = spec.name == URING_SUBMIT_PROGRAM || spec.name == URING_COMPLETE_PROGRAM;
        if let (true, Err(reason)) = (uring, &parameters.uring_offsets) {
            tracing::info!(hook = spec.name, %reason, "not attached; io_uring accepts are attributed to the listener's owner");
            hooks.push(HookStatus::new(spec, Some(reason.clone())));
            continue;
        }
        let result = check_format(spec).and_then(|()| attach(&mut ebpf, spec));
        let status = match result {
            Ok(()) => {
                tracing::info!(hook = spec.name, "attached");
                HookStatus::new(spec, None)
            }
            Err(error) => {
                if spec.required {
                    tracing::error!(hook = spec.name, %error, "required hook failed");
                } else {
                    tracing::warn!(
                        hook = spec.name,
                        %error,
                        "optional hook failed; its data is missing from the events"
                    );
                }
                HookStatus::new(spec, Some(error))
            }
        };
        hooks.push(status);
    }
    let cgroup = cgroup_attach_point(parameters.scope);
    for spec in CGROUP_PROGRAMS {
        let result = cgroup
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|(path, file)| attach_cgroup(&mut ebpf, spec, file).map(|()| path));
        let attach_point = match &cgroup {
            Ok((path, _)) => format!("cgroup/{}:{}", hook_name(spec.hook), path.display()),
            Err(_) => format!("cgroup/{}", hook_name(spec.hook)),
        };
        let error = match result {
            Ok(path) => {
                tracing::info!(hook = spec.name, cgroup = %path.display(), "attached");
                None
            }
            Err(error) => {
                tracing::warn!(
                    hook = spec.name,
                    %error,
                    "optional hook failed; UDP flows, UDP listeners or DNS names are missing from the events"
                );
                Some(error)
            }
        };
        hooks.push(HookStatus {
            name: spec.name.to_string(),
            tracepoint: attach_point,
            required: spec.required,
            attached: error.is_none(),
            error,
        });
    }
    if let Some(failed) = hooks.iter().find(|hook| hook.required && !hook.attached) {
        return Err(TelemetryError::RequiredHook {
            name: failed.name.clone(),
            error: failed.error.clone().unwrap_or_default(),
        });
    }
    Ok((ebpf, hooks))
}

impl HookStatus {
    fn new(spec: &ProgramSpec, error: Option<String>) -> Self {
        Self {
            name: spec.name.to_string(),
            tracepoint: format!("{}:{}", spec.category, spec.tracepoint),
            required: spec.required,
            attached: error.is_none(),
            error,
        }
    }
}

/// Checks the record fields that `spec` reads against its tracepoint's format in tracefs.
fn check_format(spec: &ProgramSpec) -> Result<(), String> {
    if spec.fields.is_empty() {
        return Ok(());
    }
    let events = if Path::new(TRACEFS).join("events").is_dir() {
        Path::new(TRACEFS).join("events")
    } else {
        PathBuf::from("/sys/kernel/debug/tracing/events")
    };
    let path = events.join(spec.category).join(spec.tracepoint).join("format");
    let text = std::fs::read_to_string(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    check_fields(&text, spec.fields).map_err(|problem| format!("{}: {problem}", path.display()))
}

/// Checks that the tracepoint format `text` lists each of `fields` at its offset and size.
fn check_fields(text: &str, fields: &[TracepointField]) -> Result<(), String> {
    for field in fields {
        match text.lines().filter_map(format_field).find(|(name, _, _)| *name == field.name) {
            None => {
                return Err(format!("the record has no field `{}`; this kernel's record differs from the one the program reads", field.name))
            }
            Some((_, offset, size)) if (offset, size) != (field.offset, field.size) => {
                return Err(format!(
                    "field `{}` is at offset {offset} with size {size}; the program reads offset {} with size {}",
                    field.name, field.offset, field.size
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Parses a field line of a tracepoint format, `field:void * req;\toffset:16;\tsize:8;...`,
/// into its name, offset and size.
fn format_field(line: &str) -> Option<(&str, u32, u32)> {
    let mut parts = line.trim().split(';').map(str::trim);
    let declaration = parts.next()?.strip_prefix("field:")?;
    // The name is the declaration's last word, without an array's length: `char comm[16]`.
    let name = declaration.rsplit([' ', '*']).next()?.split('[').next()?;
    let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
    let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
    Some((name, offset, size))
}

fn attach(ebpf: &mut Ebpf, spec: &ProgramSpec) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| format!("program {} is missing from the eBPF object", spec.name))?;
    let program: &mut TracePoint = program
        .try_into()
        .map_err(|error: ProgramError| error.to_string())?;
    program
        .load()
        .map_err(|error| describe_program_error(&error))?;
    program
        .attach(spec.category, spec.tracepoint)
        .map_err(|error| describe_program_error(&error))?;
    Ok(())
}

/// Loads the TCP `sock_ops` program and attaches it to the cgroup v2 root.
fn attach_sock_ops(ebpf: &mut Ebpf) -> HookStatus {
    let root = super::cgroup::cgroup2_mount().map_err(|error| error.to_string());
    let tracepoint = match &root {
        Ok(path) => format!("cgroup/sock_ops:{}", path.display()),
        Err(_) => "cgroup/sock_ops".to_string(),
    };
    let result = root.and_then(|path| {
        let cgroup = File::open(&path).map_err(|error| format!("failed to open cgroup {}: {error}", path.display()))?;
        let program: &mut SockOps = ebpf
            .program_mut(TCP_SOCK_OPS_PROGRAM)
            .ok_or_else(|| format!("program {TCP_SOCK_OPS_PROGRAM} is missing from the eBPF object"))?
            .try_into()
            .map_err(|error: ProgramError| error.to_string())?;
        program.load().map_err(|error| describe_program_error(&error))?;
        program
            .attach(&cgroup, cgroup_attach_mode())
            .map_err(|error| describe_program_error(&error))?;
        Ok(())
    });
    let error = result.err();
    HookStatus { name: TCP_SOCK_OPS_PROGRAM.to_string(), tracepoint, required: false, attached: error.is_none(), error }
}

/// Opens the cgroup directory the cgroup programs attach to: the scope, or the cgroup v2 root.
fn cgroup_attach_point(scope: Option<&CgroupScope>) -> Result<(PathBuf, File), String> {
    let path = match scope {
        Some(scope) => scope.path.clone(),
        None => super::cgroup::cgroup2_mount().map_err(|error| error.to_string())?,
    };
    let file = File::open(&path)
        .map_err(|error| format!("failed to open cgroup {}: {error}", path.display()))?;
    Ok((path, file))
}

/// Returns the libbpf section suffix of a cgroup hook, as operators know it.
fn hook_name(hook: CgroupHook) -> &'static str {
    match hook {
        CgroupHook::Connect4 => "connect4",
        CgroupHook::Connect6 => "connect6",
        CgroupHook::UdpSendmsg4 => "sendmsg4",
        CgroupHook::UdpSendmsg6 => "sendmsg6",
        CgroupHook::UdpRecvmsg4 => "recvmsg4",
        CgroupHook::UdpRecvmsg6 => "recvmsg6",
        CgroupHook::Bind4 => "bind4",
        CgroupHook::Bind6 => "bind6",
        CgroupHook::PostBind4 => "post_bind4",
        CgroupHook::PostBind6 => "post_bind6",
        CgroupHook::SkbIngress => "skb_ingress",
    }
}

/// Returns the mode that lets a cgroup program run beside the programs other tools attached.
fn cgroup_attach_mode() -> CgroupAttachMode {
    // From 5.7 on, aya attaches through a bpf_link. The kernel always runs a link beside other
    // programs and rejects any flag on it. Before 5.7, aya uses BPF_PROG_ATTACH, which needs
    // BPF_F_ALLOW_MULTI to do the same.
    if kernel_at_least(5, 7) {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    }
}

fn attach_cgroup(ebpf: &mut Ebpf, spec: &CgroupProgramSpec, cgroup: &File) -> Result<(), String> {
    let mode = cgroup_attach_mode();
    let program = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| format!("program {} is missing from the eBPF object", spec.name))?;
    match spec.hook {
        CgroupHook::SkbIngress => {
            let program: &mut CgroupSkb = program
                .try_into()
                .map_err(|error: ProgramError| error.to_string())?;
            program.load().map_err(|error| describe_program_error(&error))?;
            program
                .attach(cgroup, CgroupSkbAttachType::Ingress, mode)
                .map_err(|error| describe_program_error(&error))?;
        }
        CgroupHook::Connect4
        | CgroupHook::Connect6
        | CgroupHook::UdpSendmsg4
        | CgroupHook::UdpSendmsg6
        | CgroupHook::UdpRecvmsg4
        | CgroupHook::UdpRecvmsg6
        | CgroupHook::Bind4
        | CgroupHook::Bind6 => {
            let program: &mut CgroupSockAddr = program
                .try_into()
                .map_err(|error: ProgramError| error.to_string())?;
            program.load().map_err(|error| describe_program_error(&error))?;
            program
                .attach(cgroup, mode)
                .map_err(|error| describe_program_error(&error))?;
        }
        CgroupHook::PostBind4 | CgroupHook::PostBind6 => {
            let program: &mut CgroupSock = program
                .try_into()
                .map_err(|error: ProgramError| error.to_string())?;
            program.load().map_err(|error| describe_program_error(&error))?;
            program
                .attach(cgroup, mode)
                .map_err(|error| describe_program_error(&error))?;
        }
    }
    Ok(())
}

/// Formats a program error with its cause and, for a verifier rejection, the end of the log.
fn describe_program_error(error: &ProgramError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if let ProgramError::LoadError { verifier_log, .. } = error {
        let log = verifier_log.to_string();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        text.push_str("\nverifier log (last lines):\n");
        text.push_str(&tail.join("\n"));
    }
    text
}

/// Maps an object load failure to an error that names what is missing.
fn classify_load_error(error: aya::EbpfError) -> TelemetryError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        if let Some(io_error) = cause.downcast_ref::<io::Error>() {
            match io_error.raw_os_error() {
                Some(libc::ENOSYS) => return TelemetryError::BpfUnsupported,
                Some(libc::EPERM) => return TelemetryError::BpfPermission { source: error },
                _ => {}
            }
        }
        source = cause.source();
    }
    TelemetryError::Load(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{URING_COMPLETE_CFLAGS, URING_COMPLETE_REQ, URING_COMPLETE_RES, URING_SUBMIT_OPCODE};

    /// The record of `io_uring:io_uring_complete` on Linux 6.18.
    const COMPLETE_FORMAT: &str = "name: io_uring_complete
ID: 2141
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * ctx;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u64 user_data;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int res;\toffset:32;\tsize:4;\tsigned:1;
\tfield:unsigned cflags;\toffset:36;\tsize:4;\tsigned:0;
\tfield:char comm[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"ring %p, req %p\", REC->ctx, REC->req
";

    #[test]
    fn format_fields_at_their_offsets_pass() {
        check_fields(COMPLETE_FORMAT, &[URING_COMPLETE_REQ, URING_COMPLETE_RES, URING_COMPLETE_CFLAGS]).unwrap();
        let comm = TracepointField { name: "comm", offset: 40, size: 16 };
        check_fields(COMPLETE_FORMAT, &[comm]).unwrap();
    }

    #[test]
    fn moved_or_missing_fields_are_named() {
        // Linux 5.10 had no request in this record, and the result at offset 24.
        let old = COMPLETE_FORMAT.replace("\tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;\n", "").replace("offset:32", "offset:24");
        let error = check_fields(&old, &[URING_COMPLETE_REQ]).unwrap_err();
        assert!(error.contains("no field `req`"), "{error}");
        let error = check_fields(&old, &[URING_COMPLETE_RES]).unwrap_err();
        assert!(error.contains("field `res` is at offset 24 with size 4; the program reads offset 32"), "{error}");
        let error = check_fields(COMPLETE_FORMAT, &[URING_SUBMIT_OPCODE]).unwrap_err();
        assert!(error.contains("no field `opcode`"), "{error}");
    }

    #[test]
    fn running_kernel_formats_match_the_programs() {
        for spec in PROGRAMS.iter().filter(|spec| !spec.fields.is_empty()) {
            if !Path::new(TRACEFS).join("events").join(spec.category).is_dir() {
                eprintln!("skipped {}: tracefs has no {} events here", spec.name, spec.category);
                continue;
            }
            check_format(spec).unwrap();
        }
    }
}
