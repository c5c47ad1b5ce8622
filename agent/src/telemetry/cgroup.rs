//! cgroup v2 lookups: where the unified hierarchy is mounted, the id of a cgroup directory, and
//! the reverse lookup from the id that kernel records carry back to a path.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory in the cgroup2 mount. The mount is
//! read from `/proc/self/mountinfo` because it is not always at `/sys/fs/cgroup`: hosts with the
//! hybrid layout mount it at `/sys/fs/cgroup/unified`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Failure to find or read a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("failed to read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("no cgroup2 file system is mounted (see /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NotMounted,
    #[error("{path} is not inside the cgroup2 mount {mount}")]
    OutsideMount { path: PathBuf, mount: PathBuf },
    #[error("{path} is not a cgroup v2 directory (it has no cgroup.procs)")]
    NotCgroup { path: PathBuf },
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Returns the mount point of the cgroup v2 (unified) hierarchy.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_cgroup2_mount(&mountinfo).ok_or(CgroupError::NotMounted)
}

/// Finds the first cgroup2 mount of the hierarchy root in mountinfo text (proc(5)).
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let fs_type = fs_fields.split(' ').next()?;
        let mut fields = mount_fields.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fs_type == "cgroup2" && root == "/")
            .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Decodes the octal escapes (`\040` for a space) that mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 4);
        match escape {
            Some(digits)
                if bytes[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)) =>
            {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                index += 4;
            }
            _ => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Returns the cgroup v2 id of the cgroup directory at `path`.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|metadata| metadata.ino())
        .map_err(|source| CgroupError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// A cgroup directory checked to be inside the cgroup2 mount, with what the kernel programs need
/// to test membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupScope {
    pub path: PathBuf,
    pub id: u64,
    /// Depth below the hierarchy root, which is level 0.
    pub level: u32,
}

impl CgroupScope {
    /// Resolves `path`, which must be a directory inside the cgroup2 mount `mount`.
    pub fn resolve(mount: &Path, path: &Path) -> Result<Self, CgroupError> {
        let canonical = fs::canonicalize(path).map_err(|source| CgroupError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let relative = canonical
            .strip_prefix(mount)
            .map_err(|_| CgroupError::OutsideMount {
                path: canonical.clone(),
                mount: mount.to_path_buf(),
            })?;
        if !canonical.join("cgroup.procs").exists() {
            return Err(CgroupError::NotCgroup { path: canonical });
        }
        Ok(Self {
            id: cgroup_id(&canonical)?,
            level: relative.components().count() as u32,
            path: canonical,
        })
    }
}

/// Walks the cgroup2 mount for the directory whose id is `id`. Returns `None` when no cgroup has
/// it (the cgroup was removed since the record was written).
pub fn cgroup_path_by_id(mount: &Path, id: u64) -> Result<Option<PathBuf>, CgroupError> {
    let mut pending = vec![mount.to_path_buf()];
    while let Some(directory) = pending.pop() {
        if cgroup_id(&directory)? == id {
            return Ok(Some(directory));
        }
        let entries = match fs::read_dir(&directory) {
            Ok(entries) => entries,
            // A cgroup removed during the walk is not an error.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(CgroupError::Io {
                    path: directory,
                    source,
                })
            }
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    Ok(None)
}

/// Cached [`cgroup_path_by_id`] with a bounded number of entries.
///
/// Ids that were not found are remembered too (up to the same capacity), because a removed cgroup
/// keeps appearing in records of processes that ran in it, and each miss would walk the whole
/// hierarchy again. On 64-bit kernels a cgroup id is not reused before reboot (kernfs ids carry a
/// generation number), so a miss stays a miss.
pub struct CgroupPaths {
    mount: PathBuf,
    capacity: usize,
    cache: HashMap<u64, PathBuf>,
    missing: HashSet<u64>,
    evictions: u64,
}

impl CgroupPaths {
    /// Creates a cache over the cgroup2 mount `mount` that keeps at most `capacity` paths.
    pub fn new(mount: PathBuf, capacity: usize) -> Self {
        Self {
            mount,
            capacity: capacity.max(1),
            cache: HashMap::new(),
            missing: HashSet::new(),
            evictions: 0,
        }
    }

    /// Returns the path of cgroup `id`, walking the mount on a miss or when a cached path no
    /// longer has that id.
    pub fn path_by_id(&mut self, id: u64) -> Result<Option<PathBuf>, CgroupError> {
        if let Some(path) = self.cache.get(&id) {
            if cgroup_id(path).is_ok_and(|current| current == id) {
                return Ok(Some(path.clone()));
            }
            self.cache.remove(&id);
        }
        if self.missing.contains(&id) {
            return Ok(None);
        }
        let found = cgroup_path_by_id(&self.mount, id)?;
        if found.is_none() {
            if self.missing.len() >= self.capacity {
                self.evictions += self.missing.len() as u64;
                self.missing.clear();
            }
            self.missing.insert(id);
        }
        if let Some(path) = &found {
            if self.cache.len() >= self.capacity {
                // Any entry will do: a miss only costs one more walk.
                if let Some(&victim) = self.cache.keys().next() {
                    self.cache.remove(&victim);
                    self.evictions += 1;
                }
            }
            self.cache.insert(id, path.clone());
        }
        Ok(found)
    }

    /// Number of entries dropped from the cache to stay within its capacity.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:29 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu
";

    #[test]
    fn cgroup2_mount_found_in_hybrid_layout() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID_MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cgroup2_mount_skips_bind_mounts_of_subtrees() {
        let mountinfo = "\
40 30 0:28 /docker/abc /mnt/sub rw - cgroup2 cgroup2 rw
41 30 0:28 / /mnt/cgroup\\040v2 rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/cgroup v2"))
        );
    }

    #[test]
    fn cgroup2_mount_absent_without_cgroup2() {
        let mountinfo = "33 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(mountinfo), None);
    }

    #[test]
    fn path_by_id_finds_own_cgroup() {
        let Ok(mount) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount on this host");
            return;
        };
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap();
        let path = mount.join(relative.trim_start_matches('/'));
        let id = cgroup_id(&path).unwrap();

        let mut paths = CgroupPaths::new(mount, 4);
        assert_eq!(paths.path_by_id(id).unwrap(), Some(path.clone()));
        assert_eq!(paths.path_by_id(id).unwrap(), Some(path));
    }

    #[test]
    fn path_by_id_remembers_unknown_ids() {
        let Ok(mount) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount on this host");
            return;
        };
        let mut paths = CgroupPaths::new(mount, 1);
        assert_eq!(paths.path_by_id(u64::MAX).unwrap(), None);
        assert_eq!(paths.path_by_id(u64::MAX).unwrap(), None);
        assert_eq!(paths.path_by_id(u64::MAX - 1).unwrap(), None);
        assert_eq!(paths.evictions(), 1);
    }
}
