//! Process truth on real kernel events: the parent after reparenting, and exec in its less
//! common forms (from a memfd, from a deleted file, a script, no arguments at all).
//!
//! Workloads that need more than raw system calls are Python or shell programs started inside
//! the test cgroup. Their events carry an argument that names the test, so each test finds its
//! own records.

mod telemetry_common;

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use driftwatch::state::container::Runtime;
use driftwatch::state::process::{ProcessTable, ProcessTableConfig};
use driftwatch::telemetry::event::{Event, ExecEvent};
use driftwatch::telemetry::{cgroup2_mount, cgroup_path_by_id};
use telemetry_common::{
    python, run_program, start_scoped, Child, NestedCgroups, Recorder, TestCgroup, TestDir,
};

/// Waits for the exec whose argv contains `marker`.
async fn exec_with_marker(events: &mut Recorder, marker: &str) -> ExecEvent {
    let found = events
        .wait_for(&format!("exec with argument {marker}"), |event| {
            matches!(event, Event::Exec(exec) if exec.argv.iter().any(|arg| arg == marker))
        })
        .await;
    let Event::Exec(exec) = found else {
        unreachable!()
    };
    exec
}

/// Applies every event seen so far to a fresh process table, the way the pipeline does.
fn table_from(events: &Recorder) -> ProcessTable {
    let mut table = ProcessTable::new(ProcessTableConfig {
        capacity: 4096,
        exited_retention: Duration::from_secs(60),
    });
    let now = std::time::Instant::now();
    let mount = cgroup2_mount().unwrap();
    for event in &events.seen {
        match event {
            Event::Exec(exec) => {
                // The path relative to the cgroup2 mount, as the pipeline's resolver gives it.
                let cgroup = cgroup_path_by_id(&mount, exec.cgroup_id)
                    .ok()
                    .flatten()
                    .and_then(|path| {
                        path.strip_prefix(&mount)
                            .ok()
                            .map(|relative| format!("/{}", relative.display()))
                    })
                    .unwrap_or_default();
                table.on_exec(exec, cgroup);
            }
            Event::Fork(fork) => table.on_fork(fork),
            Event::Exit(exit) => {
                if let (Some(lineage), true) = (exit.lineage, exit.pid == exit.tid) {
                    table.observe_lineage(exit.pid, lineage);
                }
                table.on_exit(exit, now);
            }
            Event::Credentials(change) => {
                if let (Some(after), true) = (change.after, change.pid == change.tid) {
                    table.on_credentials(change.pid, after.uid, after.gid);
                }
            }
            Event::Tcp(tcp) => {
                if let Some(lineage) = tcp.lineage {
                    table.observe_lineage(tcp.pid, lineage);
                }
                if tcp.exe_unlinked {
                    table.mark_exe_deleted(tcp.pid);
                }
            }
            Event::Udp(_) | Event::Dns(_) | Event::Fold(_) => {}
            Event::Accept(accept) => {
                if let Some(lineage) = accept.lineage {
                    table.observe_lineage(accept.pid, lineage);
                }
            }
        }
    }
    table
}

const DAEMON: &str = r#"
import ctypes, os, sys, time
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
subreaper = os.getpid()
middle = os.fork()
if middle == 0:
    if os.fork() == 0:
        deadline = time.monotonic() + 5
        while os.getppid() != subreaper and time.monotonic() < deadline:
            time.sleep(0.001)
        os.execv("/bin/true", ["true", "driftwatch-daemon-probe"])
    os._exit(0)
os.waitpid(middle, 0)
os.wait()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparented_daemon_has_subreaper_parent() {
    let cgroup = TestCgroup::create("daemon");
    let python = python();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let subreaper = run_program(Some(&cgroup), &python, &["-c", DAEMON]);
    let daemon = exec_with_marker(&mut events, "driftwatch-daemon-probe").await;

    let lineage = daemon.lineage.expect("the exec record carries the parent");
    assert_eq!(lineage.parent_pid, subreaper);
    // The daemon was forked by the middle process, which exited before the exec.
    let Event::Fork(fork) = events
        .wait_for("fork of the daemon", |event| {
            matches!(event, Event::Fork(fork) if fork.child_pid == daemon.pid)
        })
        .await
    else {
        unreachable!()
    };
    assert_ne!(fork.parent_pid, subreaper);
    assert!(lineage.start_boottime_ns > lineage.parent_start_boottime_ns);

    let table = table_from(&events);
    let info = table.get(daemon.pid).expect("the daemon is in the table");
    assert_eq!(info.exe, "/bin/true");
    assert_eq!(info.ppid, subreaper);
    assert_eq!(info.ancestry.first(), Some(&(subreaper, python.clone())));
    assert!(table.stats().reparented >= 1, "{:?}", table.stats());
}

const MEMFD_EXEC: &str = r#"
import os, sys
fd = os.memfd_create("driftwatch-payload", 0)
with open("/bin/true", "rb") as source:
    os.write(fd, source.read())
os.execve(fd, ["payload", "driftwatch-memfd-probe"], {})
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fexecve_of_a_memfd_is_flagged_fileless() {
    let cgroup = TestCgroup::create("memfd");
    let python = python();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let pid = run_program(Some(&cgroup), &python, &["-c", MEMFD_EXEC]);
    let exec = exec_with_marker(&mut events, "driftwatch-memfd-probe").await;

    assert_eq!(exec.pid, pid);
    assert!(
        exec.filename.starts_with("/dev/fd/"),
        "the kernel names a descriptor exec /dev/fd/<n>: {}",
        exec.filename
    );
    assert_eq!(exec.exe_name, "memfd:driftwatch-payload");
    assert_eq!(exec.exe_unlinked, Some(true));
    assert!(exec.from_descriptor(), "{exec:?}");
    assert!(exec.fileless(), "{exec:?}");
    assert_eq!(exec.argv, ["payload", "driftwatch-memfd-probe"]);
    assert_eq!(exec.lineage.map(|lineage| lineage.parent_pid), Some(std::process::id()));

    let table = table_from(&events);
    let details = table.exec_details(pid).unwrap();
    assert!(details.fileless, "{details:?}");
    assert!(details.from_descriptor, "{details:?}");
    assert!(details.exe_deleted, "{details:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_binary_flagged_at_exec_and_later() {
    let cgroup = TestCgroup::create("deleted");
    let dir = TestDir::create("deleted");
    let python = python();
    let copy = dir.path.join("true-copy");
    fs::copy("/bin/true", &copy).unwrap();
    let perl = dir.path.join("perl-copy");
    fs::copy("/usr/bin/perl", &perl).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    // Opened, unlinked, then run from the descriptor.
    let unlinked_exec = format!(
        "import os\nfd = os.open({copy:?}, os.O_RDONLY)\nos.unlink({copy:?})\n\
         os.execve(fd, ['true-copy', 'driftwatch-unlinked-probe'], {{}})\n",
        copy = copy.to_str().unwrap()
    );
    run_program(Some(&cgroup), &python, &["-c", &unlinked_exec]);
    let exec = exec_with_marker(&mut events, "driftwatch-unlinked-probe").await;
    assert_eq!(exec.exe_name, "true-copy");
    assert_eq!(exec.exe_unlinked, Some(true));
    assert!(!exec.fileless());

    // Started from a file on disk that it deletes, then it connects.
    let script = format!(
        "use Socket; unlink '{perl}' or die; socket(S, PF_INET, SOCK_STREAM, 0) or die; \
         connect(S, pack_sockaddr_in({port}, inet_aton('127.0.0.1'))) or die; close(S)",
        perl = perl.to_str().unwrap()
    );
    let perl_pid = run_program(
        Some(&cgroup),
        perl.to_str().unwrap(),
        &["-e", &script, "driftwatch-deleted-probe"],
    );
    let started = exec_with_marker(&mut events, "driftwatch-deleted-probe").await;
    assert_eq!(started.pid, perl_pid);
    assert_eq!(started.exe_unlinked, Some(false));
    let connect = events
        .wait_for_tcp("connect of the deleted binary", |tcp| {
            tcp.pid == perl_pid && tcp.remote.port() == port
        })
        .await;
    assert!(connect.exe_unlinked);
    drop(listener);

    let table = table_from(&events);
    assert!(table.exec_details(perl_pid).unwrap().exe_deleted);
    assert_eq!(table.get(perl_pid).unwrap().exe, perl.to_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_exec_reports_the_script_and_its_interpreter() {
    let cgroup = TestCgroup::create("script");
    let dir = TestDir::create("script");
    let script = dir.path.join("job.sh");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let interpreter_name = fs::canonicalize("/bin/sh")
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let script_path = script.to_str().unwrap();
    let pid = run_program(Some(&cgroup), script_path, &["driftwatch-script-probe"]);
    let exec = exec_with_marker(&mut events, "driftwatch-script-probe").await;

    assert_eq!(exec.pid, pid);
    // The kernel reports the script as the program; argv is what the caller passed, before the
    // kernel put the interpreter in front of it.
    assert_eq!(exec.filename, script_path);
    assert_eq!(exec.argv, [script_path, "driftwatch-script-probe"]);
    assert_eq!(exec.exe_name, interpreter_name);
    assert_eq!(exec.exe_unlinked, Some(false));

    let table = table_from(&events);
    let details = table.exec_details(pid).unwrap();
    assert_eq!(details.interpreter.as_deref(), Some("/bin/sh"));
    assert_eq!(table.get(pid).unwrap().exe, script_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_empty_argv_reports_no_arguments() {
    let cgroup = TestCgroup::create("noargv");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let path = CString::new("/bin/true").unwrap();
    let child = Child::fork(Some(&cgroup.procs), |_| {
        let argv: [*const libc::c_char; 1] = [std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: NULL-terminated arrays and a NUL-terminated path that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        70
    });
    let pid = child.pid as u32;
    assert_eq!(child.wait(), 0, "/bin/true with no argv failed");

    let Event::Exec(exec) = events
        .wait_for(
            "exec with no argv",
            |event| matches!(event, Event::Exec(exec) if exec.pid == pid),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(exec.filename, "/bin/true");
    assert!(exec.argv.is_empty(), "{:?}", exec.argv);
    assert!(!exec.argv_truncated);
    assert_eq!(exec.exe_name, "true");
}

const CONTAINER_ID: &str = "4f1c3b2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
const POD_UID: &str = "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

/// Depth of this test's own pid namespace: the number of ids on the `NSpid:` line, less one.
fn own_pid_namespace_level() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .unwrap();
    line.split_whitespace().count() as u32 - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_reports_namespace_pid_and_ids() {
    let cgroup = TestCgroup::create("container");
    let pod_slice = format!("kubepods-besteffort-pod{}.slice", POD_UID.replace('-', "_"));
    let scope = format!("cri-containerd-{CONTAINER_ID}.scope");
    let nested = NestedCgroups::create(
        &cgroup,
        &["kubepods.slice", "kubepods-besteffort.slice", &pod_slice, &scope],
    );
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    run_program(
        Some(nested.innermost()),
        "/usr/bin/unshare",
        &[
            "--pid",
            "--fork",
            "/bin/sh",
            "-c",
            "exec /bin/true driftwatch-pidns-probe",
        ],
    );
    let exec = exec_with_marker(&mut events, "driftwatch-pidns-probe").await;

    assert_ne!(exec.pid, 1);
    assert_eq!(
        exec.namespace_pid,
        Some((1, own_pid_namespace_level() + 1)),
        "the first process of a new pid namespace is its pid 1"
    );
    assert_eq!(exec.cgroup_id, nested.innermost().id);

    let table = table_from(&events);
    let details = table.exec_details(exec.pid).unwrap();
    assert_eq!(
        details.origin.container,
        Some((Runtime::Containerd, CONTAINER_ID.to_string()))
    );
    assert_eq!(details.origin.pod_uid.as_deref(), Some(POD_UID));
    assert_eq!(details.origin.systemd_unit.as_deref(), Some(scope.as_str()));
    assert_eq!(details.namespace_pid.map(|(pid, _)| pid), Some(1));
    drop(nested);
}

const DROP_PRIVILEGES: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
os.setgid(65534)
header = Header(0x20080522, 0)
data = (Data * 2)()
assert libc.capget(ctypes.byref(header), data) == 0
data[0].effective = (1 << 10) | (1 << 7)
data[1].effective = 0
assert libc.capset(ctypes.byref(header), data) == 0
os.setuid(65534)
try:
    os.setuid(0)
except PermissionError:
    pass
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_changes_report_the_ids_and_capabilities_after() {
    use driftwatch::telemetry::event::{CredChange, CredEvent};

    let cgroup = TestCgroup::create("creds");
    let python = python();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let pid = run_program(Some(&cgroup), &python, &["-c", DROP_PRIVILEGES]);
    // The exit comes after every credential record of the process in the ring buffer.
    events
        .wait_for(
            "exit of the script",
            |event| matches!(event, Event::Exit(exit) if exit.pid == pid),
        )
        .await;
    let changes: Vec<&CredEvent> = events
        .seen
        .iter()
        .filter_map(|event| match event {
            Event::Credentials(change) if change.pid == pid => Some(change),
            _ => None,
        })
        .collect();
    let kinds: Vec<CredChange> = changes.iter().map(|change| change.change).collect();
    // The failed setuid(0) is not among them.
    assert_eq!(
        kinds,
        [CredChange::Setgid, CredChange::Capset, CredChange::Setuid],
        "{changes:#?}"
    );
    let after: Vec<_> = changes.iter().map(|change| change.after.unwrap()).collect();
    assert_eq!((after[0].gid, after[0].egid, after[0].uid), (65534, 65534, 0));
    assert_eq!(after[1].cap_effective, (1 << 10) | (1 << 7));
    assert_eq!((after[2].uid, after[2].euid), (65534, 65534));
    assert_eq!(after[2].cap_effective, 0);

    let table = table_from(&events);
    let info = table.get(pid).unwrap();
    assert_eq!((info.uid, info.gid), (65534, 65534));
}
