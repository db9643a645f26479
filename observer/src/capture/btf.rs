//! The few kernel struct offsets the kernel programs need, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`) at load time instead of being compiled in.
//!
//! The kernel side reads a task's descriptor table (`task->files->fdt->fd[fd]`) to tell which
//! open file an fd refers to now (see `observer-ebpf/src/fds.rs`). Those four members have had
//! the same names since Linux 2.6; only their offsets differ between builds, and BTF says what
//! they are on this one. A minimal reader of the BTF type section is enough for that: structs
//! and unions by name, their members (anonymous ones followed), through typedefs and
//! qualifiers.
//!
//! Must not: guess an offset. A kernel without BTF, or a layout that does not match, is
//! reported and the capture runs without descriptor checks.

use std::borrow::Cow;

use anyhow::{Context as _, bail};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Offsets (bytes) of the descriptor-table members the kernel programs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdLayout {
    /// `struct task_struct.files` (`struct files_struct *`).
    pub task_files: u32,
    /// `struct files_struct.fdt` (`struct fdtable *`).
    pub files_fdt: u32,
    /// `struct fdtable.max_fds` (`unsigned int`).
    pub fdt_max_fds: u32,
    /// `struct fdtable.fd` (`struct file **`).
    pub fdt_fd: u32,
}

impl FdLayout {
    /// The layout of the running kernel.
    pub fn of_running_kernel() -> anyhow::Result<FdLayout> {
        let bytes = std::fs::read(VMLINUX_BTF)
            .with_context(|| format!("reading {VMLINUX_BTF} (a kernel without BTF?)"))?;
        FdLayout::from_btf(&bytes)
    }

    /// The layout described by a BTF blob.
    pub fn from_btf(bytes: &[u8]) -> anyhow::Result<FdLayout> {
        let btf = Btf::parse(bytes)?;
        let offset = |strukt: &str, member: &str| btf.required_offset(strukt, member);
        Ok(FdLayout {
            task_files: offset("task_struct", "files")?,
            files_fdt: offset("files_struct", "fdt")?,
            fdt_max_fds: offset("fdtable", "max_fds")?,
            fdt_fd: offset("fdtable", "fd")?,
        })
    }
}

/// Offsets (bytes) of what the kernel programs read of a TCP socket: its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SockLayout {
    /// `struct file.private_data` (`struct socket *` for a socket).
    pub file_private_data: u32,
    /// `struct socket.sk` (`struct sock *`).
    pub socket_sk: u32,
    /// `struct sock.__sk_common.skc_num`: the local port, host order.
    pub sock_num: u32,
    /// `struct sock.__sk_common.skc_dport`: the remote port, network order.
    pub sock_dport: u32,
}

impl SockLayout {
    /// The layout described by a BTF blob.
    pub fn from_btf(bytes: &[u8]) -> anyhow::Result<SockLayout> {
        let btf = Btf::parse(bytes)?;
        let offset = |strukt: &str, member: &str| btf.required_offset(strukt, member);
        let common = offset("sock", "__sk_common")?;
        Ok(SockLayout {
            file_private_data: offset("file", "private_data")?,
            socket_sk: offset("socket", "sk")?,
            sock_num: common + offset("sock_common", "skc_num")?,
            sock_dport: common + offset("sock_common", "skc_dport")?,
        })
    }
}

/// Offsets (bytes) of what the kernel programs read of the current task besides its
/// descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TaskLayout {
    /// `struct task_struct.signal` (`struct signal_struct *`).
    pub task_signal: u32,
    /// `struct signal_struct.live` (`atomic_t`): the process's threads not yet exiting.
    pub signal_live: u32,
    /// `task_struct.thread_info.status` on x86-64 (its `TS_COMPAT` bit marks a 32-bit system
    /// call); `None` where the architecture has none.
    pub compat_status: Option<u32>,
}

impl TaskLayout {
    /// The layout described by a BTF blob.
    pub fn from_btf(bytes: &[u8]) -> anyhow::Result<TaskLayout> {
        let btf = Btf::parse(bytes)?;
        let offset = |strukt: &str, member: &str| btf.required_offset(strukt, member);
        let compat_status = if cfg!(target_arch = "x86_64") {
            Some(offset("task_struct", "thread_info")? + offset("thread_info", "status")?)
        } else {
            None
        };
        Ok(TaskLayout {
            task_signal: offset("task_struct", "signal")?,
            signal_live: offset("signal_struct", "live")?,
            compat_status,
        })
    }
}

/// Every layout of the running kernel, its BTF read once.
pub struct KernelLayouts {
    pub fd: anyhow::Result<FdLayout>,
    pub sock: anyhow::Result<SockLayout>,
    pub task: anyhow::Result<TaskLayout>,
}

/// The layouts of the running kernel.
pub fn running_kernel_layouts() -> KernelLayouts {
    match std::fs::read(VMLINUX_BTF) {
        Ok(bytes) => KernelLayouts {
            fd: FdLayout::from_btf(&bytes),
            sock: SockLayout::from_btf(&bytes),
            task: TaskLayout::from_btf(&bytes),
        },
        Err(err) => {
            let why = || {
                anyhow::Error::new(std::io::Error::new(err.kind(), err.to_string()))
                    .context(format!("reading {VMLINUX_BTF} (a kernel without BTF?)"))
            };
            KernelLayouts {
                fd: Err(why()),
                sock: Err(why()),
                task: Err(why()),
            }
        }
    }
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

mod btf_kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// One type of the type section, as far as this reader needs it.
#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size_or_type`: the referenced type of typedefs and qualifiers.
    target: u32,
    /// Struct and union members: (name offset, type id, bit offset).
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob: types by id (id 0 is `void`) and the string section.
struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

impl<'a> Btf<'a> {
    fn parse(bytes: &'a [u8]) -> anyhow::Result<Btf<'a>> {
        if bytes.len() < HEADER_LEN {
            bail!("BTF of {} bytes is shorter than its header", bytes.len());
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        if u16_at(0) != MAGIC {
            bail!("not little-endian BTF (magic {:#06x})", u16_at(0));
        }
        let u32_at = |at: usize| -> u32 {
            u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
        };
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let section = |off: usize, len: usize, what: &str| -> anyhow::Result<&'a [u8]> {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() => Ok(&bytes[start..end]),
                _ => bail!("BTF {what} section runs past the end of the blob"),
            }
        };
        let type_section = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        let word = |at: usize| -> anyhow::Result<u32> {
            type_section
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
                .context("BTF type section ends inside a type")
        };
        while at < type_section.len() {
            let name_off = word(at)?;
            let info = word(at + 4)?;
            let target = word(at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                btf_kind::INT | btf_kind::VAR | btf_kind::DECL_TAG => 4,
                btf_kind::ARRAY => 12,
                btf_kind::STRUCT | btf_kind::UNION => {
                    for i in 0..vlen {
                        let member = at + i * 12;
                        let offset = word(member + 8)?;
                        // With kind_flag the top byte is a bitfield's size.
                        let bits = if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        };
                        members.push((word(member)?, word(member + 4)?, bits));
                    }
                    vlen * 12
                }
                btf_kind::ENUM | btf_kind::FUNC_PROTO => vlen * 8,
                btf_kind::DATASEC | btf_kind::ENUM64 => vlen * 12,
                0..=btf_kind::TYPE_TAG => 0,
                other => bail!("unknown BTF kind {other} (a newer BTF format?)"),
            };
            at += extra;
            types.push(Type {
                name_off,
                kind,
                target,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> Cow<'a, str> {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end])
    }

    /// The struct or union a type id stands for, through typedefs and qualifiers.
    fn composite(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                btf_kind::STRUCT | btf_kind::UNION => return Some(ty),
                btf_kind::TYPEDEF
                | btf_kind::VOLATILE
                | btf_kind::CONST
                | btf_kind::RESTRICT
                | btf_kind::TYPE_TAG => id = ty.target,
                _ => return None,
            }
        }
        None
    }

    /// [`Btf::member_offset`], an error naming the member when there is none.
    fn required_offset(&self, strukt: &str, member: &str) -> anyhow::Result<u32> {
        self.member_offset(strukt, member)?
            .with_context(|| format!("struct {strukt} has no member {member} in the BTF"))
    }

    /// The byte offset of `member` in the struct named `strukt` (members of anonymous structs
    /// and unions inside it included); `None` when there is no such member.
    fn member_offset(&self, strukt: &str, member: &str) -> anyhow::Result<Option<u32>> {
        let Some(ty) = self.types.iter().find(|t| {
            t.kind == btf_kind::STRUCT && !t.members.is_empty() && self.name(t.name_off) == strukt
        }) else {
            bail!("the BTF has no struct {strukt}");
        };
        Ok(self.find_member(ty, member, 0, 0).map(|bits| bits / 8))
    }

    fn find_member(&self, ty: &Type, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for &(name_off, type_id, bits) in &ty.members {
            if name_off == 0 {
                if let Some(inner) = self.composite(type_id)
                    && let Some(found) =
                        self.find_member(inner, member, base_bits + bits, depth + 1)
                {
                    return Some(found);
                }
            } else if self.name(name_off) == member {
                return Some(base_bits + bits);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of `types` (each its 12-byte header and trailing data, as words) and
    /// `strings` (NUL-separated, starting with the empty name).
    fn blob(types: &[Vec<u32>], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types
            .iter()
            .flatten()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for word in [
            HEADER_LEN as u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(word.to_le_bytes());
        }
        out.extend(type_bytes);
        out.extend(strings);
        out
    }

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (u32::from(kind_flag) << 31) | (kind << 24) | vlen
    }

    #[test]
    fn finds_members_directly_and_inside_anonymous_unions() {
        // Strings: 1 "int", 5 "fdtable", 13 "max_fds", 21 "fd", 24 "files_struct", 37 "fdt",
        // 41 "task_struct", 53 "files", 59 "t".
        let strings = b"\0int\0fdtable\0max_fds\0fd\0files_struct\0fdt\0task_struct\0files\0t\0";
        let types = vec![
            // 1: int
            vec![1, info(btf_kind::INT, 0, false), 4, 32],
            // 2: struct fdtable { unsigned int max_fds; <bitfield pad>; struct file **fd @ 64 }
            vec![
                5,
                info(btf_kind::STRUCT, 2, true),
                16,
                13,
                1,
                0,
                21,
                1,
                (8 << 24) | 64,
            ],
            // 3: anonymous union { int fdt @ 0 }
            vec![0, info(btf_kind::UNION, 1, false), 8, 37, 1, 0],
            // 4: typedef t = the union
            vec![59, info(btf_kind::TYPEDEF, 0, false), 3],
            // 5: struct files_struct { int count; <anon t> @ 192 }
            vec![24, info(btf_kind::STRUCT, 2, false), 32, 1, 1, 0, 0, 4, 192],
            // 6: struct task_struct { int x; int files @ 2048 }
            vec![
                41,
                info(btf_kind::STRUCT, 2, false),
                512,
                1,
                1,
                0,
                53,
                1,
                2048,
            ],
        ];
        let layout = FdLayout::from_btf(&blob(&types, strings)).unwrap();
        assert_eq!(
            layout,
            FdLayout {
                task_files: 256,
                files_fdt: 24,
                fdt_max_fds: 0,
                fdt_fd: 8,
            }
        );
    }

    #[test]
    fn missing_structs_and_members_and_bad_blobs_are_errors() {
        let strings = b"\0int\0task_struct\0x\0";
        let types = vec![
            vec![1, info(btf_kind::INT, 0, false), 4, 32],
            vec![5, info(btf_kind::STRUCT, 1, false), 4, 17, 1, 0],
        ];
        let err = FdLayout::from_btf(&blob(&types, strings)).unwrap_err();
        assert!(err.to_string().contains("no member files"), "{err:#}");
        let err = FdLayout::from_btf(&blob(&types[..1], strings)).unwrap_err();
        assert!(err.to_string().contains("no struct task_struct"), "{err:#}");
        assert!(FdLayout::from_btf(b"short").is_err());
        let mut bad = blob(&types, strings);
        bad[0] = 0;
        assert!(FdLayout::from_btf(&bad).is_err());
        let mut truncated = blob(&types, strings);
        truncated.truncate(HEADER_LEN + 10);
        assert!(FdLayout::from_btf(&truncated).is_err());
    }

    #[test]
    fn reads_the_running_kernel_when_it_has_btf() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: {VMLINUX_BTF} is missing (a kernel without BTF)");
            return;
        }
        let layout = FdLayout::of_running_kernel().unwrap();
        // `max_fds` opens struct fdtable and the `fd` array follows it on every kernel.
        assert_eq!((layout.fdt_max_fds, layout.fdt_fd), (0, 8), "{layout:?}");
        assert!(layout.task_files > 0 && layout.files_fdt > 0, "{layout:?}");
        let layouts = running_kernel_layouts();
        let sock = layouts.sock.unwrap();
        // skc_portpair: the remote port, then the local one (include/net/sock.h).
        assert_eq!(sock.sock_num, sock.sock_dport + 2, "{sock:?}");
        assert!(sock.file_private_data > 0, "{sock:?}");
        let task = layouts.task.unwrap();
        assert!(task.task_signal > 0, "{task:?}");
        // thread_info opens task_struct on x86-64; status follows flags (and syscall_work).
        if cfg!(target_arch = "x86_64") {
            assert!(matches!(task.compat_status, Some(8 | 16)), "{task:?}");
        }
    }
}
