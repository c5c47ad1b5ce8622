//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The kernel programs are built without CO-RE relocations, so the one kernel struct they read
//! (the socket's network namespace) needs offsets that match the running kernel. This module
//! parses just enough of the BTF format (kernel `Documentation/bpf/btf.rst`) to find them: type
//! records, struct and union members, and the typedef/qualifier chains in between.

use std::path::Path;

use agent_common::{AcceptOffsets, KernelOffsets, UringOffsets};

/// Path of the kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Failure to read or understand a BTF blob.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid BTF: {0}")]
    Invalid(String),
    #[error("struct {0} not found in BTF")]
    StructNotFound(String),
    #[error("member {member} not found in struct {owner}")]
    MemberNotFound { owner: String, member: String },
    #[error("member {0} is a bitfield; only byte-aligned members can be read")]
    Bitfield(String),
}

#[derive(Debug, Clone)]
struct Member {
    name_offset: u32,
    type_id: u32,
    bit_offset: u32,
    /// Width in bits of a bitfield member, 0 for a whole member.
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name_offset: u32,
    /// The referenced type id for typedefs, pointers and qualifiers.
    referenced: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: its types (index = type id, id 0 is `void`) and string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    /// Reads and parses the BTF at `path`.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (the layout of `/sys/kernel/btf/vmlinux` on x86_64 and
    /// arm64).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = read_u16(data, 0)?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Invalid(format!(
                "magic {magic:#x}, expected {BTF_MAGIC:#x}"
            )));
        }
        let header_len = read_u32(data, 4)? as usize;
        let type_offset = read_u32(data, 8)? as usize;
        let type_len = read_u32(data, 12)? as usize;
        let string_offset = read_u32(data, 16)? as usize;
        let string_len = read_u32(data, 20)? as usize;

        let type_start = header_len + type_offset;
        let type_section = data
            .get(type_start..type_start + type_len)
            .ok_or_else(|| BtfError::Invalid("type section out of bounds".into()))?;
        let string_start = header_len + string_offset;
        let strings = data
            .get(string_start..string_start + string_len)
            .ok_or_else(|| BtfError::Invalid("string section out of bounds".into()))?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name_offset: 0,
            referenced: 0,
            members: Vec::new(),
        }];
        let mut position = 0;
        while position < type_section.len() {
            let (parsed, length) = parse_type(type_section, position)?;
            types.push(parsed);
            position += length;
        }
        Ok(Self { types, strings })
    }

    /// Returns the byte offset of a member path inside struct `owner`, following named members
    /// through nested structs and unions (`["ns", "inum"]` in `net` is `net.ns.inum`). Members of
    /// anonymous structs and unions are found as if they were direct members.
    pub fn member_offset(&self, owner: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut type_id = self
            .find_struct(owner)
            .ok_or_else(|| BtfError::StructNotFound(owner.to_string()))?;
        let mut owner_name = owner.to_string();
        let mut bit_offset = 0u32;
        let mut bitfield = false;
        for member in path {
            let (offset, member_type, bits) =
                self.find_member(type_id, member)
                    .ok_or_else(|| BtfError::MemberNotFound {
                        owner: owner_name.clone(),
                        member: member.to_string(),
                    })?;
            bit_offset += offset;
            bitfield = bits != 0;
            type_id = self.strip_modifiers(member_type);
            owner_name = format!("{owner_name}.{member}");
        }
        // A bitfield can start on a byte boundary and still share its bytes with its neighbours,
        // so a whole read of it would take theirs too.
        if bitfield || !bit_offset.is_multiple_of(8) {
            return Err(BtfError::Bitfield(owner_name));
        }
        Ok(bit_offset / 8)
    }

    /// Returns the size in bytes of struct `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self
            .find_struct(name)
            .ok_or_else(|| BtfError::StructNotFound(name.to_string()))?;
        Ok(self.types[id as usize].referenced)
    }

    fn name(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Returns the type id of the function `name`, which programs attached to it (fentry, LSM)
    /// name when they load.
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.find_kind(KIND_FUNC, name)
    }

    /// Returns the type id of the typedef `name` (`btf_trace_<tracepoint>` for a `tp_btf` program).
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        self.find_kind(KIND_TYPEDEF, name)
    }

    fn find_kind(&self, kind: u32, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|ty| ty.kind == kind && self.name(ty.name_offset) == name)
            .map(|index| index as u32)
    }

    fn find_struct(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|ty| {
                ty.kind == KIND_STRUCT
                    && !ty.members.is_empty()
                    && self.name(ty.name_offset) == name
            })
            .map(|index| index as u32)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip_modifiers(&self, mut type_id: u32) -> u32 {
        // A bounded walk, so that a malformed cycle cannot hang start-up.
        for _ in 0..32 {
            match self.types.get(type_id as usize) {
                Some(ty)
                    if matches!(
                        ty.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    type_id = ty.referenced;
                }
                _ => break,
            }
        }
        type_id
    }

    /// Finds `name` among the members of struct or union `type_id`, descending into anonymous
    /// members; returns its bit offset, type and bitfield width (0 for a whole member).
    fn find_member(&self, type_id: u32, name: &str) -> Option<(u32, u32, u32)> {
        let ty = self.types.get(self.strip_modifiers(type_id) as usize)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return None;
        }
        for member in &ty.members {
            let member_name = self.name(member.name_offset);
            if member_name == name {
                return Some((member.bit_offset, member.type_id, member.bitfield_size));
            }
            if member_name.is_empty() {
                if let Some((inner, inner_type, bits)) = self.find_member(member.type_id, name) {
                    return Some((member.bit_offset + inner, inner_type, bits));
                }
            }
        }
        None
    }
}

/// Parses the type record at `position`; returns it and its length in bytes.
fn parse_type(section: &[u8], position: usize) -> Result<(Type, usize), BtfError> {
    let name_offset = read_u32(section, position)?;
    let info = read_u32(section, position + 4)?;
    let size_or_type = read_u32(section, position + 8)?;
    let vlen = (info & 0xffff) as usize;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 == 1;
    let header = 12;

    let extra = match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        other => return Err(BtfError::Invalid(format!("unknown type kind {other}"))),
    };

    let mut members = Vec::new();
    if kind == KIND_STRUCT || kind == KIND_UNION {
        members.reserve(vlen);
        for index in 0..vlen {
            let base = position + header + index * 12;
            let offset = read_u32(section, base + 8)?;
            members.push(Member {
                name_offset: read_u32(section, base)?,
                type_id: read_u32(section, base + 4)?,
                // With kind_flag set, the top 8 bits hold a bitfield size.
                bit_offset: if kind_flag {
                    offset & 0x00ff_ffff
                } else {
                    offset
                },
                bitfield_size: if kind_flag { offset >> 24 } else { 0 },
            });
        }
    }
    let parsed = Type {
        kind,
        name_offset,
        referenced: size_or_type,
        members,
    };
    Ok((parsed, header + extra))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| BtfError::Invalid(format!("truncated at byte {at}")))
}

fn read_u16(data: &[u8], at: usize) -> Result<u16, BtfError> {
    data.get(at..at + 2)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| BtfError::Invalid(format!("truncated at byte {at}")))
}

/// Offsets the TCP program needs to read a socket's network namespace inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsOffsets {
    /// Offset of the `struct net *` inside `struct sock_common` (`skc_net.net`).
    pub skc_net: u32,
    /// Offset of `ns.inum` inside `struct net`.
    pub net_inum: u32,
}

/// Resolves [`NetnsOffsets`] from the BTF at `path`.
pub fn netns_offsets(path: &Path) -> Result<NetnsOffsets, BtfError> {
    netns_offsets_in(&Btf::from_file(path)?)
}

/// Resolves [`NetnsOffsets`] from parsed BTF.
pub fn netns_offsets_in(btf: &Btf) -> Result<NetnsOffsets, BtfError> {
    Ok(NetnsOffsets {
        skc_net: btf.member_offset("sock_common", &["skc_net", "net"])?,
        net_inum: btf.member_offset("net", &["ns", "inum"])?,
    })
}

/// Resolves every group of [`KernelOffsets`] that this kernel's BTF has. A group with a missing
/// member stays invalid (its `*_valid` field 0) and the error is returned next to it, so that the
/// other groups are still used.
pub fn kernel_offsets(btf: &Btf) -> (KernelOffsets, Vec<BtfError>) {
    let mut offsets = KernelOffsets::default();
    let mut errors = Vec::new();
    let task = (|| {
        Ok::<_, BtfError>((
            btf.member_offset("task_struct", &["real_parent"])?,
            btf.member_offset("task_struct", &["group_leader"])?,
            btf.member_offset("task_struct", &["tgid"])?,
            btf.member_offset("task_struct", &["start_boottime"])?,
        ))
    })();
    match task {
        Ok((real_parent, group_leader, tgid, start_boottime)) => {
            offsets.task_valid = 1;
            offsets.task_real_parent = real_parent;
            offsets.task_group_leader = group_leader;
            offsets.task_tgid = tgid;
            offsets.task_start_boottime = start_boottime;
        }
        Err(error) => errors.push(error),
    }
    let exe = (|| {
        Ok::<_, BtfError>((
            btf.member_offset("task_struct", &["mm"])?,
            btf.member_offset("mm_struct", &["exe_file"])?,
            btf.member_offset("file", &["f_path", "dentry"])?,
            btf.member_offset("dentry", &["d_name", "name"])?,
            btf.member_offset("dentry", &["d_inode"])?,
            btf.member_offset("inode", &["i_nlink"])?,
        ))
    })();
    match exe {
        Ok((mm, exe_file, dentry, name, inode, nlink)) => {
            offsets.exe_valid = 1;
            offsets.task_mm = mm;
            offsets.mm_exe_file = exe_file;
            offsets.file_dentry = dentry;
            offsets.dentry_name = name;
            offsets.dentry_inode = inode;
            offsets.inode_nlink = nlink;
        }
        Err(error) => errors.push(error),
    }
    let tcp = (|| {
        Ok::<_, BtfError>((
            btf.member_offset("tcp_sock", &["bytes_sent"])?,
            btf.member_offset("tcp_sock", &["bytes_retrans"])?,
            btf.member_offset("tcp_sock", &["bytes_received"])?,
            btf.member_offset("sock", &["sk_err"])?,
            btf.member_offset("sock", &["sk_shutdown"])?,
        ))
    })();
    match tcp {
        Ok((sent, retransmitted, received, error, shutdown)) => {
            offsets.tcp_valid = 1;
            offsets.tcp_bytes_sent = sent;
            offsets.tcp_bytes_retrans = retransmitted;
            offsets.tcp_bytes_received = received;
            offsets.sock_err = error;
            offsets.sock_shutdown = shutdown;
        }
        Err(error) => errors.push(error),
    }
    let pid = (|| {
        Ok::<_, BtfError>((
            btf.member_offset("task_struct", &["thread_pid"])?,
            btf.member_offset("pid", &["level"])?,
            btf.member_offset("pid", &["numbers"])?,
            btf.member_offset("upid", &["nr"])?,
            btf.struct_size("upid")?,
        ))
    })();
    match pid {
        Ok((thread_pid, level, numbers, nr, size)) => {
            offsets.pid_valid = 1;
            offsets.task_thread_pid = thread_pid;
            offsets.pid_level = level;
            offsets.pid_numbers = numbers;
            offsets.upid_nr = nr;
            offsets.upid_size = size;
        }
        Err(error) => errors.push(error),
    }
    let cred = (|| {
        Ok::<_, BtfError>((
            btf.member_offset("task_struct", &["cred"])?,
            btf.member_offset("cred", &["uid"])?,
            btf.member_offset("cred", &["euid"])?,
            btf.member_offset("cred", &["gid"])?,
            btf.member_offset("cred", &["egid"])?,
            btf.member_offset("cred", &["cap_effective"])?,
        ))
    })();
    match cred {
        Ok((task_cred, uid, euid, gid, egid, caps)) => {
            offsets.cred_valid = 1;
            offsets.task_cred = task_cred;
            offsets.cred_uid = uid;
            offsets.cred_euid = euid;
            offsets.cred_gid = gid;
            offsets.cred_egid = egid;
            offsets.cred_cap_effective = caps;
        }
        Err(error) => errors.push(error),
    }
    (offsets, errors)
}

/// Resolves the [`AcceptOffsets`] the accept programs need, all or nothing: without any one of
/// them no descriptor can be followed to its socket.
pub fn accept_offsets(btf: &Btf) -> Result<AcceptOffsets, BtfError> {
    Ok(AcceptOffsets {
        valid: 1,
        task_files: btf.member_offset("task_struct", &["files"])?,
        files_fdt: btf.member_offset("files_struct", &["fdt"])?,
        fdtable_max_fds: btf.member_offset("fdtable", &["max_fds"])?,
        fdtable_fd: btf.member_offset("fdtable", &["fd"])?,
        file_private_data: btf.member_offset("file", &["private_data"])?,
        socket_sk: btf.member_offset("socket", &["sk"])?,
        socket_file: btf.member_offset("socket", &["file"])?,
        skc_family: btf.member_offset("sock_common", &["skc_family"])?,
        skc_num: btf.member_offset("sock_common", &["skc_num"])?,
        skc_dport: btf.member_offset("sock_common", &["skc_dport"])?,
        skc_rcv_saddr: btf.member_offset("sock_common", &["skc_rcv_saddr"])?,
        skc_daddr: btf.member_offset("sock_common", &["skc_daddr"])?,
        skc_v6_rcv_saddr: btf.member_offset("sock_common", &["skc_v6_rcv_saddr"])?,
        skc_v6_daddr: btf.member_offset("sock_common", &["skc_v6_daddr"])?,
        skc_cookie: btf.member_offset("sock_common", &["skc_cookie"])?,
    })
}

/// Resolves where an io_uring accept request keeps its fixed-file slot: the accept's own data
/// lies in the request's `cmd` area.
pub fn uring_offsets(btf: &Btf) -> Result<UringOffsets, BtfError> {
    let command = btf.member_offset("io_kiocb", &["cmd"])?;
    let slot = btf.member_offset("io_accept", &["file_slot"])?;
    Ok(UringOffsets { valid: 1, accept_file_slot: command + slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob with: 1 = int, 2 = struct inner { int pad; int inum; },
    /// 3 = struct outer { int a; union { int b; }; struct inner ns; }, 4 = anonymous union { int b }.
    fn sample_btf() -> Vec<u8> {
        let strings = b"\0int\0inner\0pad\0inum\0outer\0a\0b\0ns\0flags\0proto\0".to_vec();
        let name = |s: &str| -> u32 {
            let needle = [s.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .enumerate()
                .find(|(i, w)| *w == needle.as_slice() && strings[i - 1] == 0)
                .map(|(i, _)| i as u32)
                .unwrap()
        };
        let mut types = Vec::new();
        let mut push = |values: &[u32]| {
            for value in values {
                types.extend_from_slice(&value.to_le_bytes());
            }
        };
        push(&[name("int"), KIND_INT << 24, 4, 32]);
        push(&[name("inner"), KIND_STRUCT << 24 | 2, 8]);
        push(&[name("pad"), 1, 0, name("inum"), 1, 32]);
        push(&[name("outer"), KIND_STRUCT << 24 | 3, 16]);
        push(&[name("a"), 1, 0, 0, 4, 32, name("ns"), 2, 64]);
        push(&[0, KIND_UNION << 24 | 1, 4]);
        push(&[name("b"), 1, 0]);
        // 5 = struct flags { int proto:8 at bit 8; }, a bitfield that starts on a byte boundary.
        push(&[name("flags"), 1 << 31 | KIND_STRUCT << 24 | 1, 4]);
        push(&[name("proto"), 1, 8 << 24 | 8]);

        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for value in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&value.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn member_offset_refuses_a_byte_aligned_bitfield() {
        let btf = Btf::parse(&sample_btf()).unwrap();
        let error = btf.member_offset("flags", &["proto"]).unwrap_err();
        assert!(matches!(&error, BtfError::Bitfield(name) if name == "flags.proto"), "{error}");
    }

    #[test]
    fn member_offset_follows_nested_structs() {
        let btf = Btf::parse(&sample_btf()).unwrap();
        assert_eq!(btf.member_offset("outer", &["ns", "inum"]).unwrap(), 12);
    }

    #[test]
    fn member_offset_finds_members_of_anonymous_unions() {
        let btf = Btf::parse(&sample_btf()).unwrap();
        assert_eq!(btf.member_offset("outer", &["b"]).unwrap(), 4);
    }

    #[test]
    fn member_offset_reports_missing_member() {
        let btf = Btf::parse(&sample_btf()).unwrap();
        let error = btf.member_offset("outer", &["missing"]).unwrap_err();
        assert!(matches!(error, BtfError::MemberNotFound { .. }), "{error}");
    }

    #[test]
    fn parse_rejects_wrong_magic() {
        let mut blob = sample_btf();
        blob[0] = 0;
        assert!(matches!(Btf::parse(&blob), Err(BtfError::Invalid(_))));
    }

    #[test]
    fn running_kernel_netns_offsets_resolve() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let offsets = netns_offsets(path).unwrap();
        assert!(offsets.skc_net > 0, "{offsets:?}");
        assert!(offsets.net_inum > 0, "{offsets:?}");
    }

    #[test]
    fn running_kernel_task_exe_and_tcp_offsets_resolve() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let (offsets, errors) = kernel_offsets(&Btf::from_file(path).unwrap());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            (
                offsets.task_valid,
                offsets.exe_valid,
                offsets.tcp_valid,
                offsets.pid_valid,
                offsets.cred_valid
            ),
            (1, 1, 1, 1, 1)
        );
        // struct upid is an int and a pointer.
        assert_eq!(offsets.upid_size, 16, "{offsets:?}");
        // tgid follows pid in task_struct on every kernel since 2.6.
        assert_eq!(offsets.task_tgid % 4, 0, "{offsets:?}");
        assert!(offsets.tcp_bytes_received > offsets.sock_err, "{offsets:?}");
    }

    #[test]
    fn running_kernel_accept_offsets_resolve() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let offsets = accept_offsets(&Btf::from_file(path).unwrap()).unwrap();
        // The port pair and the IPv4 address pair open struct sock_common on every kernel
        // since 4.x: daddr, rcv_saddr, then dport and num.
        assert_eq!(offsets.skc_daddr, 0, "{offsets:?}");
        assert_eq!(offsets.skc_rcv_saddr, 4, "{offsets:?}");
        assert_eq!(offsets.skc_dport, 12, "{offsets:?}");
        assert_eq!(offsets.skc_num, 14, "{offsets:?}");
        assert!(offsets.socket_sk > 0, "{offsets:?}");
        assert!(offsets.skc_cookie > offsets.skc_num, "{offsets:?}");
    }

    #[test]
    fn running_kernel_uring_offsets_resolve() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let offsets = uring_offsets(&Btf::from_file(path).unwrap()).unwrap();
        // `struct io_accept` opens with the file, the address and its length (three pointers),
        // then two ints; the slot comes after them.
        assert_eq!(offsets.valid, 1);
        assert!(offsets.accept_file_slot >= 32, "{offsets:?}");
    }
}
