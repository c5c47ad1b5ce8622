//! The process table: what the agent knows about each live (and recently exited) process.
//!
//! Entries come from kernel events (fork, exec, exit) and, for processes that started before the
//! agent, from a scan of /proc at start-up. A process that execs and exits within a millisecond is
//! still complete, because the exec record carries everything the table needs; /proc is read only
//! to seed the table and, as a fallback, for the parent of a process whose fork the agent missed.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwatch_model::observation::ProcessInfo;

use crate::telemetry::event::{ExecEvent, ExitEvent, ForkEvent};

/// How many ancestors an entry's ancestry lists.
const MAX_ANCESTRY: usize = 8;

/// Bounds of the process table.
#[derive(Debug, Clone)]
pub struct ProcessTableConfig {
    /// Maximum entries, live and exited together. When full, the oldest exited entry goes first,
    /// then the oldest live one.
    pub capacity: usize,
    /// How long an exited process stays known, so that events still in flight resolve to it.
    pub exited_retention: Duration,
}

impl Default for ProcessTableConfig {
    fn default() -> Self {
        ProcessTableConfig { capacity: 65_536, exited_retention: Duration::from_secs(30) }
    }
}

/// Counters of the process table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessTableStats {
    pub live: u64,
    pub exited: u64,
    pub seeded: u64,
    /// Entries removed to stay within `capacity` while still live or retained.
    pub evicted: u64,
    /// Exec events for a pid the table had never seen (its fork was missed).
    pub exec_without_fork: u64,
}

struct Entry {
    info: Arc<ProcessInfo>,
    /// When the process exited; `None` while it runs.
    exited_at: Option<Instant>,
    /// Insertion order stamp, to find the oldest entry.
    generation: u64,
}

/// The process table. Not thread-safe: the pipeline task owns it.
pub struct ProcessTable {
    config: ProcessTableConfig,
    entries: HashMap<u32, Entry>,
    /// Exited pids in exit order, for retention expiry.
    exited: VecDeque<(Instant, u32, u64)>,
    next_generation: u64,
    users: UserNames,
    stats: ProcessTableStats,
}

impl ProcessTable {
    pub fn new(config: ProcessTableConfig) -> Self {
        ProcessTable {
            config,
            entries: HashMap::new(),
            exited: VecDeque::new(),
            next_generation: 0,
            users: UserNames::load(),
            stats: ProcessTableStats::default(),
        }
    }

    /// Seeds the table from /proc with the processes that run now, resolving cgroup paths with
    /// `/proc/<pid>/cgroup`. Returns how many processes were added.
    pub fn seed_from_proc(&mut self, proc_root: &Path) -> usize {
        let Ok(dir) = fs::read_dir(proc_root) else {
            tracing::warn!(path = %proc_root.display(), "cannot read /proc; processes that started before the agent stay unknown");
            return 0;
        };
        let mut seeded = 0;
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(info) = read_proc_process(proc_root, pid, &self.users) {
                self.insert(info);
                seeded += 1;
            }
        }
        self.stats.seeded += seeded as u64;
        seeded
    }

    /// Returns the process with this pid, live or recently exited.
    pub fn get(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.entries.get(&pid).map(|entry| entry.info.clone())
    }

    /// Applies a fork: the child starts as a copy of its parent with its own pid.
    pub fn on_fork(&mut self, event: &ForkEvent) {
        let parent = self.get(event.parent_pid);
        let mut info = match parent {
            Some(parent) => ProcessInfo::clone(&parent),
            None => ProcessInfo {
                pid: 0,
                ppid: 0,
                exe: String::new(),
                argv: Vec::new(),
                argv_truncated: false,
                uid: 0,
                gid: 0,
                user: None,
                cgroup: String::new(),
                comm: String::new(),
                ancestry: Vec::new(),
            },
        };
        info.pid = event.child_pid;
        info.ppid = event.parent_pid;
        info.ancestry = self.ancestry_of(event.parent_pid);
        self.insert(info);
    }

    /// Applies an exec and returns the updated process. `cgroup` is the resolved cgroup path.
    pub fn on_exec(&mut self, event: &ExecEvent, cgroup: String) -> Arc<ProcessInfo> {
        let ppid = match self.entries.get(&event.pid) {
            Some(entry) => entry.info.ppid,
            None => {
                self.stats.exec_without_fork += 1;
                // Best effort only: the entry is complete without it.
                read_ppid(Path::new("/proc"), event.pid).unwrap_or(0)
            }
        };
        let info = ProcessInfo {
            pid: event.pid,
            ppid,
            exe: event.filename.clone(),
            argv: event.argv.clone(),
            argv_truncated: event.argv_truncated,
            uid: event.uid,
            gid: event.gid,
            user: self.users.name(event.uid),
            cgroup,
            comm: event.comm.clone(),
            ancestry: self.ancestry_of(ppid),
        };
        // A non-leader thread that execs takes over the leader's pid; its own tid disappears.
        if event.tid != event.pid {
            self.entries.remove(&event.tid);
        }
        self.insert(info)
    }

    /// Applies an exit. A thread's exit removes the entry its creation made; the process's own exit
    /// keeps the entry for `exited_retention` so that events still queued resolve to it.
    pub fn on_exit(&mut self, event: &ExitEvent, now: Instant) {
        if event.tid != event.pid {
            self.entries.remove(&event.tid);
            return;
        }
        if let Some(entry) = self.entries.get_mut(&event.pid) {
            if entry.exited_at.is_none() {
                entry.exited_at = Some(now);
                self.exited.push_back((now, event.pid, entry.generation));
            }
        }
        self.expire(now);
    }

    /// Drops exited entries older than the retention.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(exited_at, pid, generation)) = self.exited.front() {
            if now.duration_since(exited_at) < self.config.exited_retention {
                break;
            }
            self.exited.pop_front();
            if self.entries.get(&pid).is_some_and(|entry| entry.generation == generation) {
                self.entries.remove(&pid);
            }
        }
    }

    pub fn stats(&self) -> ProcessTableStats {
        let exited = self.entries.values().filter(|entry| entry.exited_at.is_some()).count() as u64;
        ProcessTableStats { live: self.entries.len() as u64 - exited, exited, ..self.stats.clone() }
    }

    fn insert(&mut self, info: ProcessInfo) -> Arc<ProcessInfo> {
        if !self.entries.contains_key(&info.pid) && self.entries.len() >= self.config.capacity {
            self.evict_one();
        }
        let info = Arc::new(info);
        self.next_generation += 1;
        let entry = Entry { info: info.clone(), exited_at: None, generation: self.next_generation };
        self.entries.insert(info.pid, entry);
        info
    }

    fn evict_one(&mut self) {
        // Exited entries first, oldest exit first.
        while let Some((_, pid, generation)) = self.exited.pop_front() {
            if self.entries.get(&pid).is_some_and(|entry| entry.generation == generation) {
                self.entries.remove(&pid);
                self.stats.evicted += 1;
                return;
            }
        }
        let oldest = self.entries.iter().min_by_key(|(_, entry)| entry.generation).map(|(pid, _)| *pid);
        if let Some(pid) = oldest {
            self.entries.remove(&pid);
            self.stats.evicted += 1;
        }
    }

    fn ancestry_of(&self, mut pid: u32) -> Vec<(u32, String)> {
        let mut ancestry = Vec::new();
        while pid != 0 && ancestry.len() < MAX_ANCESTRY {
            let Some(entry) = self.entries.get(&pid) else { break };
            ancestry.push((pid, entry.info.exe.clone()));
            if entry.info.ppid == pid {
                break;
            }
            pid = entry.info.ppid;
        }
        ancestry
    }
}

/// Reads one process from /proc; `None` for kernel threads and processes that are gone.
fn read_proc_process(proc_root: &Path, pid: u32, users: &UserNames) -> Option<ProcessInfo> {
    let dir = proc_root.join(pid.to_string());
    // Kernel threads have no executable.
    let exe = fs::read_link(dir.join("exe")).ok()?.to_string_lossy().into_owned();
    let status = fs::read_to_string(dir.join("status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)).map(|rest| rest.trim().to_string())
    };
    let ppid = field("PPid:").and_then(|value| value.parse().ok()).unwrap_or(0);
    // "Uid:" and "Gid:" list real, effective, saved and filesystem ids; the kernel programs report
    // the real ones (bpf_get_current_uid_gid), so take the first.
    let first_id = |value: Option<String>| {
        value.and_then(|value| value.split_whitespace().next().and_then(|id| id.parse().ok())).unwrap_or(0)
    };
    let uid = first_id(field("Uid:"));
    let gid = first_id(field("Gid:"));
    let argv = fs::read(dir.join("cmdline"))
        .map(|bytes| {
            bytes.split(|byte| *byte == 0).filter(|arg| !arg.is_empty()).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect()
        })
        .unwrap_or_default();
    let comm = fs::read_to_string(dir.join("comm")).map(|comm| comm.trim_end().to_string()).unwrap_or_default();
    let cgroup = fs::read_to_string(dir.join("cgroup")).ok().and_then(|text| cgroup_v2_path(&text)).unwrap_or_default();
    Some(ProcessInfo {
        pid,
        ppid,
        exe: strip_deleted(exe),
        argv,
        argv_truncated: false,
        uid,
        gid,
        user: users.name(uid),
        cgroup,
        comm,
        ancestry: Vec::new(),
    })
}

fn read_ppid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("PPid:")).and_then(|value| value.trim().parse().ok())
}

/// Extracts the cgroup v2 path from the text of `/proc/<pid>/cgroup` (the `0::` line).
pub fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string)
}

/// The kernel appends " (deleted)" to the link of an unlinked executable.
fn strip_deleted(exe: String) -> String {
    match exe.strip_suffix(" (deleted)") {
        Some(path) => path.to_string(),
        None => exe,
    }
}

/// User names by uid from /etc/passwd, read once at start-up.
struct UserNames {
    names: HashMap<u32, String>,
}

impl UserNames {
    fn load() -> Self {
        let text = fs::read_to_string("/etc/passwd").unwrap_or_default();
        UserNames { names: parse_passwd(&text) }
    }

    fn name(&self, uid: u32) -> Option<String> {
        self.names.get(&uid).cloned()
    }
}

fn parse_passwd(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(pid: u32, filename: &str) -> ExecEvent {
        ExecEvent {
            ktime_ns: 1,
            pid,
            tid: pid,
            filename: filename.to_string(),
            argv: vec![filename.to_string(), "-x".to_string()],
            argv_truncated: false,
            uid: 0,
            gid: 0,
            cgroup_id: 1,
            comm: "x".to_string(),
        }
    }

    fn table(capacity: usize) -> ProcessTable {
        ProcessTable::new(ProcessTableConfig { capacity, exited_retention: Duration::from_secs(5) })
    }

    #[test]
    fn fork_then_exec_keeps_parent_and_ancestry() {
        let mut table = table(16);
        table.on_exec(&exec(100, "/usr/bin/parent"), "/a".into());
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 100, child_pid: 101, cgroup_id: 1 });
        let child = table.on_exec(&exec(101, "/bin/child"), "/a".into());
        assert_eq!(child.ppid, 100);
        assert_eq!(child.exe, "/bin/child");
        assert_eq!(child.argv, vec!["/bin/child", "-x"]);
        assert_eq!(child.ancestry, vec![(100, "/usr/bin/parent".to_string())]);
    }

    #[test]
    fn exited_process_stays_until_retention() {
        let mut table = table(16);
        table.on_exec(&exec(7, "/bin/true"), "/".into());
        let start = Instant::now();
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 7, tid: 7, exit_code: Some(0) }, start);
        assert!(table.get(7).is_some());
        table.expire(start + Duration::from_secs(6));
        assert!(table.get(7).is_none());
    }

    #[test]
    fn thread_exit_removes_only_the_thread() {
        let mut table = table(16);
        table.on_exec(&exec(10, "/bin/server"), "/".into());
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 10, child_pid: 11, cgroup_id: 1 });
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 10, tid: 11, exit_code: None }, Instant::now());
        assert!(table.get(11).is_none());
        assert!(table.get(10).is_some());
    }

    #[test]
    fn full_table_evicts_exited_before_live() {
        let mut table = table(2);
        table.on_exec(&exec(1, "/a"), "/".into());
        table.on_exec(&exec(2, "/b"), "/".into());
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 2, tid: 2, exit_code: None }, Instant::now());
        table.on_exec(&exec(3, "/c"), "/".into());
        assert!(table.get(1).is_some());
        assert!(table.get(2).is_none());
        assert!(table.get(3).is_some());
        assert_eq!(table.stats().evicted, 1);
    }

    #[test]
    fn pid_reuse_after_exit_is_not_expired_by_the_old_exit() {
        let mut table = table(16);
        let start = Instant::now();
        table.on_exec(&exec(5, "/old"), "/".into());
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 5, tid: 5, exit_code: None }, start);
        table.on_exec(&exec(5, "/new"), "/".into());
        table.expire(start + Duration::from_secs(60));
        assert_eq!(table.get(5).map(|info| info.exe.clone()), Some("/new".to_string()));
    }

    #[test]
    fn passwd_and_cgroup_parsing() {
        let users = parse_passwd("root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n");
        assert_eq!(users.get(&33).map(String::as_str), Some("www-data"));
        assert_eq!(cgroup_v2_path("12:cpu:/x\n0::/system.slice/nginx.service\n").as_deref(), Some("/system.slice/nginx.service"));
    }

    #[test]
    fn seed_reads_this_test_process() {
        let mut table = table(100_000);
        assert!(table.seed_from_proc(Path::new("/proc")) > 0);
        let me = table.get(std::process::id()).expect("the test process is seeded");
        assert!(!me.exe.is_empty());
        assert_eq!(me.pid, std::process::id());
    }
}
