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

use driftwatch_model::observation::{ContainerIdentity, ExecFacts, ProcessInfo};

use crate::state::container::{classify_cgroup, CgroupOrigin};
use crate::telemetry::event::{ExecEvent, ExitEvent, ForkEvent, Lineage};

/// How many ancestors an entry's ancestry lists.
const MAX_ANCESTRY: usize = 8;
/// How often [`ProcessTable::sweep_vanished`] looks for processes that exited unseen: a stat of
/// `/proc/<pid>` per live entry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

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
    /// Processes whose parent changed after they started (the parent exited and the kernel
    /// reparented them to a subreaper or init).
    pub reparented: u64,
    /// Parents known by pid whose start time showed a different, earlier process under the same
    /// pid; the stale entry was not used for ancestry.
    pub stale_parents: u64,
    /// Processes that moved to another cgroup without exec, seen in a record from their own
    /// context.
    pub cgroup_moves: u64,
    /// Running processes the table did not know, read from /proc when a record from their own
    /// context arrived: their fork and exec were out of scope or lost.
    pub read_from_proc: u64,
    /// Of those, processes whose pid belonged to an exited entry: a pid reused without a fork
    /// the agent saw.
    pub reused_pids: u64,
    /// Processes that a record showed running but whose /proc entry could not be read.
    pub proc_read_failures: u64,
    /// Live entries whose process was gone from /proc without an exit record: it exited outside
    /// the scope.
    pub vanished: u64,
}

/// Facts about how a process's program was started, beyond its path, from the exec record. The
/// table keeps them next to the [`ProcessInfo`] that the engine receives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecDetails {
    /// Name of the file the kernel runs (`memfd:<name>`, or the interpreter's file name for a
    /// script); empty when unknown.
    pub exe_name: String,
    /// Started from a file descriptor (`fexecve`, `execveat` with `AT_EMPTY_PATH`).
    pub from_descriptor: bool,
    /// Runs from a memfd: no file on any file system ever held the program.
    pub fileless: bool,
    /// The executable had no directory entry at exec time, or lost it while the process ran.
    pub exe_deleted: bool,
    /// For a script: the interpreter named on its `#!` line; `ProcessInfo::exe` is the script.
    pub interpreter: Option<String>,
    /// Process id inside its own pid namespace and the namespace's depth (0 for the host's).
    pub namespace_pid: Option<(u32, u32)>,
    /// Systemd unit, container and pod that the cgroup path names.
    pub origin: CgroupOrigin,
    /// cgroup v2 id that the cgroup path was resolved from, 0 when the table has none (a process
    /// seeded from /proc).
    pub cgroup_id: u64,
}

impl ExecDetails {
    /// Returns the facts that travel with the process into the engine and the API.
    pub fn facts(&self) -> ExecFacts {
        ExecFacts {
            fileless: self.fileless,
            exe_deleted: self.exe_deleted,
            from_descriptor: self.from_descriptor,
            interpreter: self.interpreter.clone(),
            namespace_pid: self.namespace_pid.map(|(pid, _)| pid),
            pid_namespace_level: self.namespace_pid.map_or(0, |(_, level)| level),
            systemd_unit: self.origin.systemd_unit.clone(),
        }
    }
}

struct Entry {
    info: Arc<ProcessInfo>,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22), when known. It
    /// separates this process from an earlier one with the same pid.
    start_ticks: Option<u64>,
    details: Arc<ExecDetails>,
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
    /// Nanoseconds per clock tick of `/proc/<pid>/stat`.
    tick_ns: u64,
    /// When [`ProcessTable::sweep_vanished`] last looked at /proc.
    last_sweep: Option<Instant>,
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
            tick_ns: tick_ns(),
            last_sweep: None,
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
            if let Some((info, start_ticks)) = read_proc_process(proc_root, pid, &self.users) {
                let details = read_proc_details(proc_root, pid);
                self.insert(info, start_ticks, details);
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

    /// Returns the process with this pid while it runs.
    pub fn get_live(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.entries.get(&pid).filter(|entry| entry.exited_at.is_none()).map(|entry| entry.info.clone())
    }

    /// Returns how the process's program was started, when the table has the process.
    pub fn exec_details(&self, pid: u32) -> Option<Arc<ExecDetails>> {
        self.entries.get(&pid).map(|entry| entry.details.clone())
    }

    /// Applies a fork: the child starts as a copy of its parent with its own pid.
    pub fn on_fork(&mut self, event: &ForkEvent) {
        let parent = self.entries.get(&event.parent_pid);
        let mut details = parent.map(|entry| entry.details.clone()).unwrap_or_default();
        // The child has a pid of its own in the namespace too. In the host's namespace it is the
        // child's pid; in any other only the child's exec reports it.
        if let Some((_, level)) = details.namespace_pid {
            let mut own = ExecDetails::clone(&details);
            own.namespace_pid = (level == 0).then_some((event.child_pid, 0));
            details = Arc::new(own);
        }
        let mut info = match parent.map(|entry| entry.info.clone()) {
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
                container: None,
                exec: Default::default(),
            },
        };
        info.pid = event.child_pid;
        info.ppid = event.parent_pid;
        info.ancestry = self.ancestry_of(event.parent_pid);
        self.insert_details(info, None, details);
    }

    /// Applies an exec and returns the updated process. `cgroup` is the resolved cgroup path.
    pub fn on_exec(&mut self, event: &ExecEvent, cgroup: String) -> Arc<ProcessInfo> {
        let known = self.entries.get(&event.pid).map(|entry| entry.info.ppid);
        if known.is_none() {
            self.stats.exec_without_fork += 1;
        }
        // The kernel's parent is the truth: it follows reparenting, which no event announces.
        let ppid = match (event.lineage, known) {
            (Some(lineage), Some(ppid)) => {
                if lineage.parent_pid != ppid {
                    self.stats.reparented += 1;
                }
                lineage.parent_pid
            }
            (Some(lineage), None) => lineage.parent_pid,
            (None, Some(ppid)) => ppid,
            // Best effort only: the entry is complete without it.
            (None, None) => read_ppid(Path::new("/proc"), event.pid).unwrap_or(0),
        };
        if let Some(lineage) = event.lineage {
            self.check_parent(lineage);
        }
        let start_ticks = event.lineage.map(|lineage| lineage.start_boottime_ns / self.tick_ns);
        let mut details = exec_details(event);
        details.origin = classify_cgroup(&cgroup);
        details.cgroup_id = event.cgroup_id;
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
            // The pipeline attaches the container identity, which needs the label cache.
            container: None,
            exec: Default::default(),
        };
        // A non-leader thread that execs takes over the leader's pid; its own tid disappears.
        if event.tid != event.pid {
            self.entries.remove(&event.tid);
        }
        self.insert_details(info, start_ticks, Arc::new(details))
    }

    /// Applies the lineage an event read from a live process: when its parent changed since the
    /// table last looked (the parent exited and the kernel reparented it), the entry and its
    /// ancestry follow. Returns the entry as it now is.
    pub fn observe_lineage(&mut self, pid: u32, lineage: Lineage) -> Option<Arc<ProcessInfo>> {
        let entry = self.entries.get(&pid)?;
        if entry.info.ppid == lineage.parent_pid || lineage.parent_pid == 0 {
            return Some(entry.info.clone());
        }
        self.stats.reparented += 1;
        self.check_parent(lineage);
        let mut info = ProcessInfo::clone(&self.entries[&pid].info);
        info.ppid = lineage.parent_pid;
        info.ancestry = self.ancestry_of(lineage.parent_pid);
        let info = Arc::new(info);
        if let Some(entry) = self.entries.get_mut(&pid) {
            entry.info = info.clone();
        }
        Some(info)
    }

    /// Makes sure the table has a live entry for `pid`, which a record written in the process's
    /// own context shows to be running. When the table has none, or only an exited one whose pid
    /// was reused, the process is read from /proc. Returns true when it was read.
    pub fn ensure_live(&mut self, pid: u32, proc_root: &Path) -> bool {
        let known = self.entries.get(&pid).map(|entry| entry.exited_at.is_some());
        if known == Some(false) || pid == 0 {
            return false;
        }
        let Some((mut info, start_ticks)) = read_proc_process(proc_root, pid, &self.users) else {
            // Already gone: an exited entry, if any, is the best identity left.
            self.stats.proc_read_failures += 1;
            return false;
        };
        info.ancestry = self.ancestry_of(info.ppid);
        let details = read_proc_details(proc_root, pid);
        tracing::debug!(pid, exe = %info.exe, reused = known.is_some(), "read a running process the table did not know from /proc");
        self.insert(info, start_ticks, details);
        self.stats.read_from_proc += 1;
        if known == Some(true) {
            self.stats.reused_pids += 1;
        }
        true
    }

    /// Applies the cgroup id of a record written in the process's own context. A process can move
    /// to another cgroup without exec (a write to `cgroup.procs`, or a clone into a cgroup), and
    /// its cgroup path decides its component, so the entry follows. `resolve` turns an id into a
    /// path. Returns the updated entry when the process moved.
    pub fn observe_cgroup(
        &mut self,
        pid: u32,
        cgroup_id: u64,
        proc_root: &Path,
        resolve: impl FnOnce(u64) -> String,
    ) -> Option<Arc<ProcessInfo>> {
        if cgroup_id == 0 {
            return None;
        }
        let entry = self.entries.get_mut(&pid)?;
        if entry.details.cgroup_id == cgroup_id {
            return None;
        }

        let path = resolve(cgroup_id);
        if path.is_empty() {
            // The cgroup is gone already: the next record tries again.
            return None;
        }
        if path == entry.info.cgroup {
            // The first id seen for a process seeded from /proc, where only the path was known.
            let mut details = ExecDetails::clone(&entry.details);
            details.cgroup_id = cgroup_id;
            entry.details = Arc::new(details);
            return None;
        }

        tracing::info!(pid, from = %entry.info.cgroup, to = %path, "process moved to another cgroup without exec");
        self.stats.cgroup_moves += 1;
        if let Some(replaced) = self.replace_if_changed(pid, cgroup_id, proc_root) {
            return Some(replaced);
        }
        let entry = self.entries.get_mut(&pid)?;
        let mut details = ExecDetails::clone(&entry.details);
        details.cgroup_id = cgroup_id;
        details.origin = classify_cgroup(&path);
        let mut info = ProcessInfo::clone(&entry.info);
        info.cgroup = path;
        // The pipeline looks up the container of the new cgroup.
        info.container = None;
        info.exec = details.facts();
        entry.info = Arc::new(info);
        entry.details = Arc::new(details);
        Some(entry.info.clone())
    }

    /// Reads a process that moved from /proc, and replaces its entry when /proc shows another
    /// process under the pid (the old one exited where the agent did not see it) or another
    /// program (an exec the agent did not see). Returns the new entry when it replaced one.
    fn replace_if_changed(&mut self, pid: u32, cgroup_id: u64, proc_root: &Path) -> Option<Arc<ProcessInfo>> {
        let (mut info, start_ticks) = read_proc_process(proc_root, pid, &self.users)?;
        let mut details = read_proc_details(proc_root, pid);
        let entry = self.entries.get(&pid)?;
        let reused = matches!((entry.start_ticks, start_ticks), (Some(known), Some(read)) if known != read);
        // The kernel's name of the executable file, which a symlink or a script's path does not
        // change, when the table has it.
        let known_file = if entry.details.exe_name.is_empty() {
            entry.info.exe.rsplit('/').next().unwrap_or_default()
        } else {
            entry.details.exe_name.as_str()
        };
        let other_program = !details.exe_name.is_empty() && details.exe_name != known_file;
        if !reused && !other_program {
            return None;
        }

        tracing::info!(pid, before = %entry.info.exe, now = %info.exe, reused, "process changed where the agent did not see it; read it from /proc");
        info.ancestry = self.ancestry_of(info.ppid);
        details.cgroup_id = cgroup_id;
        self.stats.read_from_proc += 1;
        if reused {
            self.stats.reused_pids += 1;
        }
        Some(self.insert(info, start_ticks, details))
    }

    /// Marks exited the live entries whose process no longer exists under `proc_root`, at most
    /// once per [`SWEEP_INTERVAL`]. A process that exits outside the scope sends no exit record,
    /// so its entry would otherwise stay live, and a process that later takes its pid without a
    /// fork the agent sees would take its identity. Returns how many entries it marked.
    pub fn sweep_vanished(&mut self, proc_root: &Path, now: Instant) -> usize {
        if self.last_sweep.is_some_and(|last| now.duration_since(last) < SWEEP_INTERVAL) {
            return 0;
        }
        self.last_sweep = Some(now);
        let mut vanished = 0;
        for (pid, entry) in &mut self.entries {
            if entry.exited_at.is_some() || proc_root.join(pid.to_string()).exists() {
                continue;
            }
            entry.exited_at = Some(now);
            self.exited.push_back((now, *pid, entry.generation));
            vanished += 1;
        }
        self.stats.vanished += vanished as u64;
        vanished
    }

    /// Applies a credential change of the process's main thread: its user and group ids become
    /// the real ids the kernel reports afterwards.
    pub fn on_credentials(&mut self, pid: u32, uid: u32, gid: u32) {
        let Some(entry) = self.entries.get_mut(&pid) else { return };
        if entry.info.uid == uid && entry.info.gid == gid {
            return;
        }
        let mut info = ProcessInfo::clone(&entry.info);
        info.uid = uid;
        info.gid = gid;
        info.user = self.users.name(uid);
        entry.info = Arc::new(info);
    }

    /// Sets the container identity of one process and returns the updated entry.
    pub fn set_container(&mut self, pid: u32, identity: Arc<ContainerIdentity>) -> Option<Arc<ProcessInfo>> {
        let entry = self.entries.get_mut(&pid)?;
        if entry.info.container.as_ref().is_some_and(|known| Arc::ptr_eq(known, &identity)) {
            return Some(entry.info.clone());
        }
        let mut info = ProcessInfo::clone(&entry.info);
        info.container = Some(identity);
        entry.info = Arc::new(info);
        Some(entry.info.clone())
    }

    /// Gives every process of the container `identity.id` this identity, for when its labels
    /// arrive. Returns how many processes changed.
    pub fn update_container(&mut self, identity: &Arc<ContainerIdentity>) -> usize {
        let mut updated = 0;
        for entry in self.entries.values_mut() {
            let Some(known) = &entry.info.container else { continue };
            if known.id != identity.id || Arc::ptr_eq(known, identity) {
                continue;
            }
            let mut info = ProcessInfo::clone(&entry.info);
            info.container = Some(identity.clone());
            entry.info = Arc::new(info);
            updated += 1;
        }
        updated
    }

    /// Returns the pids of the processes whose cgroup names a container, with their cgroup origin.
    pub fn containerized(&self) -> Vec<(u32, CgroupOrigin)> {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.details.origin.container.is_some())
            .map(|(pid, entry)| (*pid, entry.details.origin.clone()))
            .collect()
    }

    /// Marks the process's executable as deleted (seen by the kernel at a later event).
    pub fn mark_exe_deleted(&mut self, pid: u32) {
        if let Some(entry) = self.entries.get_mut(&pid) {
            if !entry.details.exe_deleted {
                let mut details = ExecDetails::clone(&entry.details);
                details.exe_deleted = true;
                entry.details = Arc::new(details);
                let mut info = ProcessInfo::clone(&entry.info);
                info.exec.exe_deleted = true;
                entry.info = Arc::new(info);
            }
        }
    }

    /// Drops the table's entry for the parent named by `lineage` when it is an earlier process
    /// that had the same pid, then re-reads the parent from /proc, so that ancestry never names
    /// the wrong program.
    fn check_parent(&mut self, lineage: Lineage) {
        let parent_ticks = lineage.parent_start_boottime_ns / self.tick_ns;
        let stale = self
            .entries
            .get(&lineage.parent_pid)
            .and_then(|entry| entry.start_ticks)
            .is_some_and(|ticks| ticks != parent_ticks);
        if !stale {
            return;
        }
        self.stats.stale_parents += 1;
        self.entries.remove(&lineage.parent_pid);
        let proc_root = Path::new("/proc");
        if let Some((info, Some(ticks))) = read_proc_process(proc_root, lineage.parent_pid, &self.users) {
            if ticks == parent_ticks {
                let details = read_proc_details(proc_root, lineage.parent_pid);
                self.insert(info, Some(ticks), details);
            }
        }
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

    fn insert(&mut self, info: ProcessInfo, start_ticks: Option<u64>, details: ExecDetails) -> Arc<ProcessInfo> {
        self.insert_details(info, start_ticks, Arc::new(details))
    }

    fn insert_details(&mut self, mut info: ProcessInfo, start_ticks: Option<u64>, details: Arc<ExecDetails>) -> Arc<ProcessInfo> {
        if !self.entries.contains_key(&info.pid) && self.entries.len() >= self.config.capacity {
            self.evict_one();
        }
        info.exec = details.facts();
        let info = Arc::new(info);
        self.next_generation += 1;
        let entry = Entry { info: info.clone(), start_ticks, details, exited_at: None, generation: self.next_generation };
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

/// Builds the exec details from the exec record.
fn exec_details(event: &ExecEvent) -> ExecDetails {
    let from_descriptor = event.from_descriptor();
    let file_name = event.filename.rsplit('/').next().unwrap_or_default();
    // The kernel maps the interpreter, not the script, so the two names differ for a script.
    // They also differ for a symlink, which has no `#!` line.
    let interpreter = if !from_descriptor && !event.exe_name.is_empty() && event.exe_name != file_name {
        script_interpreter(Path::new(&event.filename))
    } else {
        None
    };
    ExecDetails {
        exe_name: event.exe_name.clone(),
        from_descriptor,
        fileless: event.fileless(),
        exe_deleted: event.exe_unlinked == Some(true),
        interpreter,
        namespace_pid: event.namespace_pid,
        origin: CgroupOrigin::default(),
        cgroup_id: 0,
    }
}

/// Reads the interpreter path from the `#!` line of the script at `path`, if it has one.
fn script_interpreter(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let read = fs::File::open(path).and_then(|mut file| file.read(&mut head)).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = line.split(|&byte| byte == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    line.split_whitespace().next().map(str::to_string)
}

/// Nanoseconds per clock tick of /proc (`USER_HZ`).
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { 1_000_000_000 / hz as u64 } else { 10_000_000 }
}

/// Exec details of a running process from /proc, for processes seeded at start-up.
fn read_proc_details(proc_root: &Path, pid: u32) -> ExecDetails {
    let exe = fs::read_link(proc_root.join(pid.to_string()).join("exe")).map(|path| path.to_string_lossy().into_owned()).unwrap_or_default();
    ExecDetails {
        exe_name: exe.rsplit('/').next().unwrap_or_default().trim_end_matches(" (deleted)").to_string(),
        from_descriptor: false,
        fileless: exe.starts_with("/memfd:"),
        exe_deleted: exe.ends_with(" (deleted)"),
        interpreter: None,
        namespace_pid: fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok().and_then(|status| namespace_pid(&status)),
        origin: fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|text| cgroup_v2_path(&text))
            .map(|path| classify_cgroup(&path))
            .unwrap_or_default(),
        cgroup_id: 0,
    }
}

/// Returns the pid in the innermost pid namespace and that namespace's depth from the `NSpid:`
/// line of `/proc/<pid>/status`, which lists the pid in every namespace from the host's inward.
fn namespace_pid(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|line| line.strip_prefix("NSpid:"))?;
    let pids: Vec<u32> = line.split_whitespace().filter_map(|pid| pid.parse().ok()).collect();
    let innermost = *pids.last()?;
    Some((innermost, pids.len() as u32 - 1))
}

/// Start time of a process in clock ticks since boot, field 22 of `/proc/<pid>/stat`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Reads one process and its start time in ticks from /proc; `None` for kernel threads and
/// processes that are gone.
fn read_proc_process(proc_root: &Path, pid: u32, users: &UserNames) -> Option<(ProcessInfo, Option<u64>)> {
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
    let start_ticks = fs::read_to_string(dir.join("stat")).ok().and_then(|stat| parse_start_ticks(&stat));
    let info = ProcessInfo {
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
        container: None,
        exec: Default::default(),
    };
    Some((info, start_ticks))
}

fn read_ppid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("PPid:")).and_then(|value| value.trim().parse().ok())
}

/// Extracts the cgroup v2 path from the text of `/proc/<pid>/cgroup` (the `0::` line).
pub fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string)
}

/// Strips the " (deleted)" that the kernel appends to the link of an unlinked executable.
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
            lineage: None,
            exe_name: String::new(),
            exe_unlinked: Some(false),
            namespace_pid: None,
        }
    }

    fn lineage(parent_pid: u32, start_s: u64, parent_start_s: u64) -> Lineage {
        Lineage {
            parent_pid,
            start_boottime_ns: start_s * 1_000_000_000,
            parent_start_boottime_ns: parent_start_s * 1_000_000_000,
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
    fn cgroup_move_without_exec_updates_entry() {
        // /proc has nothing to say about these made-up processes.
        let no_proc = tempfile::tempdir().unwrap();
        let mut table = table(16);
        let started = table.on_exec(&exec(100, "/usr/bin/app"), "/system.slice/app.service".into());

        // The same cgroup id as at exec: nothing to resolve.
        let same = table.observe_cgroup(100, 1, no_proc.path(), |_| panic!("resolved an unchanged cgroup"));
        assert!(same.is_none());
        // Another id that resolves to another path: the process moved.
        let moved = table.observe_cgroup(100, 2, no_proc.path(), |_| "/system.slice/other.service".into()).expect("a move");
        assert_eq!(moved.cgroup, "/system.slice/other.service");
        assert_eq!(moved.exe, started.exe);
        assert_eq!(moved.exec.systemd_unit.as_deref(), Some("other.service"));
        assert_eq!(table.get(100).unwrap().cgroup, "/system.slice/other.service");
        assert_eq!(table.stats().cgroup_moves, 1);
        // A child forked afterwards starts there and has the id too.
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 100, child_pid: 101, cgroup_id: 2 });
        assert!(table.observe_cgroup(101, 2, no_proc.path(), |_| panic!("resolved an unchanged cgroup")).is_none());
        assert_eq!(table.get(101).unwrap().cgroup, "/system.slice/other.service");
    }

    #[test]
    fn cgroup_id_of_seeded_process_is_learned() {
        let no_proc = tempfile::tempdir().unwrap();
        let mut table = table(16);
        let mut seeded = exec(100, "/usr/bin/app");
        seeded.cgroup_id = 0;
        table.on_exec(&seeded, "/a".into());

        // The first id resolves to the known path: learned, and no move.
        assert!(table.observe_cgroup(100, 5, no_proc.path(), |_| "/a".into()).is_none());
        assert!(table.observe_cgroup(100, 5, no_proc.path(), |_| panic!("resolved a learned cgroup")).is_none());
        // An id that resolves to nothing (the cgroup is gone) changes nothing either.
        assert!(table.observe_cgroup(100, 6, no_proc.path(), |_| String::new()).is_none());
        assert_eq!(table.get(100).unwrap().cgroup, "/a");
        // A record without a cgroup id and an unknown pid are ignored.
        assert!(table.observe_cgroup(100, 0, no_proc.path(), |_| panic!("resolved id 0")).is_none());
        assert!(table.observe_cgroup(999, 7, no_proc.path(), |_| panic!("resolved for an unknown pid")).is_none());
        assert_eq!(table.stats().cgroup_moves, 0);
    }

    /// Writes the /proc files of one process under `root`, as `read_proc_process` reads them.
    fn fake_proc(root: &Path, pid: u32, exe: &str, ppid: u32, cgroup: &str) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        let _ = fs::remove_file(dir.join("exe"));
        std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        fs::write(dir.join("status"), format!("Name:\tx\nPPid:\t{ppid}\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n")).unwrap();
        fs::write(dir.join("cmdline"), format!("{exe}\0--serve\0")).unwrap();
        fs::write(dir.join("comm"), "x\n").unwrap();
        fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
    }

    #[test]
    fn unknown_running_process_is_read_from_proc() {
        let root = tempfile::tempdir().unwrap();
        let mut table = table(16);
        table.on_exec(&exec(100, "/usr/bin/parent"), "/a".into());
        fake_proc(root.path(), 200, "/usr/bin/moved-in", 100, "/a/b");

        assert!(table.ensure_live(200, root.path()));
        let read = table.get(200).expect("an entry");
        assert_eq!(read.exe, "/usr/bin/moved-in");
        assert_eq!(read.argv, ["/usr/bin/moved-in", "--serve"]);
        assert_eq!(read.cgroup, "/a/b");
        assert_eq!(read.ancestry, [(100, "/usr/bin/parent".to_string())]);
        // Known and live: not read again.
        assert!(!table.ensure_live(200, root.path()));
        // Not in /proc any more: counted, and the table is unchanged.
        assert!(!table.ensure_live(300, root.path()));
        assert!(table.get(300).is_none());
        let stats = table.stats();
        assert_eq!((stats.read_from_proc, stats.reused_pids, stats.proc_read_failures), (1, 0, 1));
    }

    #[test]
    fn reused_pid_takes_new_identity() {
        let root = tempfile::tempdir().unwrap();
        let mut table = table(16);
        let start = Instant::now();
        table.on_exec(&exec(100, "/usr/bin/old"), "/a".into());
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 100, tid: 100, exit_code: Some(0), lineage: None }, start);
        fake_proc(root.path(), 100, "/usr/bin/new", 1, "/b");

        assert!(table.ensure_live(100, root.path()));
        let entry = table.get(100).unwrap();
        assert_eq!(entry.exe, "/usr/bin/new");
        assert_eq!(entry.cgroup, "/b");
        assert_eq!(table.stats().reused_pids, 1);
        // The old exit's retention does not remove the new entry.
        table.expire(start + Duration::from_secs(6));
        assert_eq!(table.get(100).unwrap().exe, "/usr/bin/new");
    }

    #[test]
    fn move_after_unseen_exec_rereads_program() {
        let root = tempfile::tempdir().unwrap();
        let mut table = table(16);
        table.on_exec(&exec(100, "/usr/bin/python3"), "/a".into());
        // It left the scope, ran bash there, and came back into another cgroup.
        fake_proc(root.path(), 100, "/usr/bin/bash", 1, "/b");

        let moved = table.observe_cgroup(100, 2, root.path(), |_| "/b".into()).expect("a move");
        assert_eq!(moved.exe, "/usr/bin/bash");
        assert_eq!(moved.cgroup, "/b");
        assert_eq!(table.get(100).unwrap().exe, "/usr/bin/bash");
        let stats = table.stats();
        assert_eq!((stats.cgroup_moves, stats.read_from_proc, stats.reused_pids), (1, 1, 0));
    }

    #[test]
    fn move_with_same_program_keeps_entry() {
        let root = tempfile::tempdir().unwrap();
        let mut table = table(16);
        let mut event = exec(100, "/usr/bin/python3");
        event.exe_name = "python3.11".to_string();
        table.on_exec(&event, "/a".into());
        // The executable that /proc names is the file behind the symlink the exec used.
        fake_proc(root.path(), 100, "/usr/bin/python3.11", 1, "/b");

        let moved = table.observe_cgroup(100, 2, root.path(), |_| "/b".into()).expect("a move");
        assert_eq!(moved.exe, "/usr/bin/python3");
        assert_eq!(moved.argv, ["/usr/bin/python3", "-x"]);
        assert_eq!(table.stats().read_from_proc, 0);
    }

    #[test]
    fn sweep_marks_vanished_processes_exited() {
        let root = tempfile::tempdir().unwrap();
        let mut table = table(16);
        table.on_exec(&exec(100, "/usr/bin/alive"), "/a".into());
        table.on_exec(&exec(200, "/usr/bin/gone"), "/a".into());
        fake_proc(root.path(), 100, "/usr/bin/alive", 1, "/a");
        let start = Instant::now();

        assert_eq!(table.sweep_vanished(root.path(), start), 1);
        assert_eq!(table.stats().live, 1);
        assert_eq!(table.stats().vanished, 1);
        // An exited entry is one a pid reuse replaces from /proc.
        fake_proc(root.path(), 200, "/usr/bin/new", 1, "/a");
        assert!(table.ensure_live(200, root.path()));
        assert_eq!(table.get(200).unwrap().exe, "/usr/bin/new");
        // Within the interval the sweep does not look again.
        fs::remove_dir_all(root.path().join("100")).unwrap();
        assert_eq!(table.sweep_vanished(root.path(), start + Duration::from_secs(1)), 0);
        assert_eq!(table.sweep_vanished(root.path(), start + SWEEP_INTERVAL), 1);
    }

    #[test]
    fn exited_process_stays_until_retention() {
        let mut table = table(16);
        table.on_exec(&exec(7, "/bin/true"), "/".into());
        let start = Instant::now();
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 7, tid: 7, exit_code: Some(0), lineage: None }, start);
        assert!(table.get(7).is_some());
        table.expire(start + Duration::from_secs(6));
        assert!(table.get(7).is_none());
    }

    #[test]
    fn thread_exit_removes_only_the_thread() {
        let mut table = table(16);
        table.on_exec(&exec(10, "/bin/server"), "/".into());
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 10, child_pid: 11, cgroup_id: 1 });
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 10, tid: 11, exit_code: None, lineage: None }, Instant::now());
        assert!(table.get(11).is_none());
        assert!(table.get(10).is_some());
    }

    #[test]
    fn full_table_evicts_exited_before_live() {
        let mut table = table(2);
        table.on_exec(&exec(1, "/a"), "/".into());
        table.on_exec(&exec(2, "/b"), "/".into());
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 2, tid: 2, exit_code: None, lineage: None }, Instant::now());
        table.on_exec(&exec(3, "/c"), "/".into());
        assert!(table.get(1).is_some());
        assert!(table.get(2).is_none());
        assert!(table.get(3).is_some());
        assert_eq!(table.stats().evicted, 1);
    }

    #[test]
    fn reused_pid_survives_old_exit() {
        let mut table = table(16);
        let start = Instant::now();
        table.on_exec(&exec(5, "/old"), "/".into());
        table.on_exit(&ExitEvent { ktime_ns: 3, pid: 5, tid: 5, exit_code: None, lineage: None }, start);
        table.on_exec(&exec(5, "/new"), "/".into());
        table.expire(start + Duration::from_secs(60));
        assert_eq!(table.get(5).map(|info| info.exe.clone()), Some("/new".to_string()));
    }

    #[test]
    fn exec_takes_the_kernel_parent_after_reparenting() {
        let mut table = table(16);
        let mut subreaper = exec(50, "/usr/bin/supervisor");
        subreaper.lineage = Some(lineage(1, 10, 1));
        table.on_exec(&subreaper, "/".into());
        table.on_exec(&exec(60, "/bin/sh"), "/".into());
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 60, child_pid: 61, cgroup_id: 1 });
        // 60 exits and the kernel hands 61 to the subreaper before 61 execs.
        let mut daemon = exec(61, "/usr/sbin/daemon");
        daemon.lineage = Some(lineage(50, 30, 10));
        let info = table.on_exec(&daemon, "/".into());
        assert_eq!(info.ppid, 50);
        assert_eq!(info.ancestry, vec![(50, "/usr/bin/supervisor".to_string())]);
        assert_eq!(table.stats().reparented, 1);
    }

    #[test]
    fn observed_lineage_moves_process_to_new_parent() {
        let mut table = table(16);
        table.on_exec(&exec(50, "/usr/bin/supervisor"), "/".into());
        table.on_exec(&exec(60, "/bin/sh"), "/".into());
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 60, child_pid: 61, cgroup_id: 1 });
        let info = table.observe_lineage(61, lineage(50, 30, 10)).unwrap();
        assert_eq!(info.ppid, 50);
        assert_eq!(table.get(61).unwrap().ancestry, vec![(50, "/usr/bin/supervisor".to_string())]);
    }

    #[test]
    fn reused_parent_pid_is_not_named_in_ancestry() {
        let mut table = table(16);
        // An earlier process with pid 4_000_000 (never a live pid here, so /proc has no
        // replacement) started at 10 s.
        let mut old = exec(4_000_000, "/old/program");
        old.lineage = Some(lineage(1, 10, 1));
        table.on_exec(&old, "/".into());
        // A child whose parent has the same pid but started at 20 s.
        let mut child = exec(4_000_001, "/bin/child");
        child.lineage = Some(lineage(4_000_000, 25, 20));
        let info = table.on_exec(&child, "/".into());
        assert_eq!(info.ppid, 4_000_000);
        assert!(info.ancestry.is_empty(), "{:?}", info.ancestry);
        assert_eq!(table.stats().stale_parents, 1);
    }

    #[test]
    fn script_exec_records_its_interpreter() {
        let dir = std::env::temp_dir().join(format!("driftwatch-script-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let script = dir.join("job.sh");
        fs::write(&script, "#!/bin/sh -e\necho hi\n").unwrap();
        let mut event = exec(70, script.to_str().unwrap());
        event.exe_name = "dash".to_string();
        let details = exec_details(&event);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(details.interpreter.as_deref(), Some("/bin/sh"));
        assert!(!details.fileless);
        assert!(!details.from_descriptor);
        assert!(!details.exe_deleted);
    }

    #[test]
    fn namespace_pid_is_the_innermost_of_nspid() {
        assert_eq!(namespace_pid("Name:\tsh\nNSpid:\t4242\t17\t1\n"), Some((1, 2)));
        assert_eq!(namespace_pid("NSpid:\t4242\n"), Some((4242, 0)));
        assert_eq!(namespace_pid("Name:\tsh\n"), None);
    }

    #[test]
    fn fork_child_namespace_pid_by_level() {
        let mut table = table(16);
        let mut parent = exec(100, "/usr/bin/containerd-shim");
        parent.namespace_pid = Some((1, 1));
        let info = table.on_exec(&parent, "/system.slice/docker-0123.scope".into());
        assert_eq!(info.exec.namespace_pid, Some(1));
        assert_eq!(info.exec.pid_namespace_level, 1);
        assert_eq!(info.exec.systemd_unit.as_deref(), Some("docker-0123.scope"));
        table.on_fork(&ForkEvent { ktime_ns: 2, parent_pid: 100, child_pid: 101, cgroup_id: 1 });
        let child = table.get(101).unwrap();
        assert_eq!(child.exec.namespace_pid, None);
        assert_eq!(child.exec.systemd_unit.as_deref(), Some("docker-0123.scope"));

        let mut host = exec(200, "/usr/sbin/nginx");
        host.namespace_pid = Some((200, 0));
        table.on_exec(&host, "/system.slice/nginx.service".into());
        table.on_fork(&ForkEvent { ktime_ns: 3, parent_pid: 200, child_pid: 201, cgroup_id: 1 });
        let worker = table.get(201).unwrap();
        assert_eq!(worker.exec.namespace_pid, Some(201));
        assert_eq!(worker.exec.pid_namespace_level, 0);
    }

    #[test]
    fn stat_start_time_survives_odd_command_names() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(98765));
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
