//! What the capture needs of the running kernel, and what to tell an operator whose kernel
//! lacks it.
//!
//! The floor is Linux 5.8: the programs report through a BPF ring buffer
//! (`BPF_MAP_TYPE_RINGBUF`, 5.8) and read user and kernel memory with `bpf_probe_read_user` /
//! `bpf_probe_read_kernel` (5.5). A kernel's version is only a hint (RHEL 8's 4.18 carries ring
//! buffers back-ported), so `observer check` probes each feature for itself: the map type, the
//! program types, and every helper the embedded object calls ([`helpers_called`], checked
//! against [`HELPERS`] by a test). A program the verifier rejects is explained by
//! [`load_failure`] in a sentence, not a verifier dump; the full log goes to the debug log.

use std::collections::BTreeSet;

use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType},
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// The oldest kernel the capture runs on, as `(major, minor)`.
pub const MINIMUM: (u32, u32) = (5, 8);

/// Where the kernel says whether it is locked down (securityfs).
const LOCKDOWN_PATH: &str = "/sys/kernel/security/lockdown";

/// A BPF helper the kernel object calls: its id, its name, and the first kernel that has it.
pub struct Helper {
    pub id: BpfHelper,
    pub name: &'static str,
    pub since: &'static str,
}

/// Every helper the kernel object calls (a test reads the object's calls and checks that
/// each is here).
pub const HELPERS: &[Helper] = &[
    helper(
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem",
        "3.19",
    ),
    helper(
        BpfHelper::BPF_FUNC_map_update_elem,
        "bpf_map_update_elem",
        "3.19",
    ),
    helper(
        BpfHelper::BPF_FUNC_map_delete_elem,
        "bpf_map_delete_elem",
        "3.19",
    ),
    helper(BpfHelper::BPF_FUNC_ktime_get_ns, "bpf_ktime_get_ns", "4.1"),
    helper(
        BpfHelper::BPF_FUNC_get_smp_processor_id,
        "bpf_get_smp_processor_id",
        "4.1",
    ),
    helper(
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
        "bpf_get_current_pid_tgid",
        "4.2",
    ),
    helper(
        BpfHelper::BPF_FUNC_get_current_comm,
        "bpf_get_current_comm",
        "4.2",
    ),
    helper(
        BpfHelper::BPF_FUNC_get_current_task,
        "bpf_get_current_task",
        "4.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_probe_read_user,
        "bpf_probe_read_user",
        "5.5",
    ),
    helper(
        BpfHelper::BPF_FUNC_probe_read_kernel,
        "bpf_probe_read_kernel",
        "5.5",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_reserve,
        "bpf_ringbuf_reserve",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_submit,
        "bpf_ringbuf_submit",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_discard,
        "bpf_ringbuf_discard",
        "5.8",
    ),
    helper(
        BpfHelper::BPF_FUNC_ringbuf_query,
        "bpf_ringbuf_query",
        "5.8",
    ),
];

const fn helper(id: BpfHelper, name: &'static str, since: &'static str) -> Helper {
    Helper { id, name, since }
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|err| format!("unknown ({err})"))
}

/// `(major, minor)` of a release string: `6.1.0-57-amd64` → (6, 1), `5.14.0-427.el9.x86_64`
/// → (5, 14). `None` when it does not start with two numbers.
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether `release` is older than [`MINIMUM`] (`None`: cannot tell).
pub fn older_than_minimum(release: &str) -> Option<bool> {
    version_of(release).map(|version| version < MINIMUM)
}

/// The kernel lockdown mode (`none`, `integrity`, `confidentiality`), `None` where the kernel
/// has no lockdown or securityfs is not mounted.
pub fn lockdown() -> Option<String> {
    parse_lockdown(&std::fs::read_to_string(LOCKDOWN_PATH).ok()?)
}

/// The bracketed word of `[none] integrity confidentiality`.
fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// One feature of the kernel the capture uses, probed on this kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Feature {
    pub name: String,
    /// `None` when the probe itself failed (no privileges to load a probe program).
    pub available: Option<bool>,
    /// The first kernel version with it.
    pub since: &'static str,
}

/// Probes the map type, the program types and every helper the capture uses. Needs the
/// privileges to load BPF programs; without them each answer is `None`.
pub fn probe_features() -> Vec<Feature> {
    let mut features = vec![
        Feature {
            name: "BPF ring buffer maps".into(),
            available: is_map_supported(MapType::RingBuf).ok(),
            since: "5.8",
        },
        Feature {
            name: "raw tracepoint programs".into(),
            available: is_program_supported(ProgramType::RawTracePoint).ok(),
            since: "4.17",
        },
        Feature {
            name: "tracepoint programs".into(),
            available: is_program_supported(ProgramType::TracePoint).ok(),
            since: "4.7",
        },
    ];
    features.extend(HELPERS.iter().map(|helper| Feature {
        name: format!("helper {}", helper.name),
        available: is_helper_supported(ProgramType::RawTracePoint, helper.id).ok(),
        since: helper.since,
    }));
    features
}

/// The helper ids the kernel object calls: every `call` instruction whose source register is
/// 0 (a helper; 1 is a call of a function of the object, 2 a kfunc) in its code sections.
pub fn helpers_called(object: &[u8]) -> anyhow::Result<BTreeSet<u32>> {
    use object::{Object as _, ObjectSection as _, SectionKind};
    /// `BPF_JMP | BPF_CALL`.
    const CALL: u8 = 0x85;
    let file = object::File::parse(object)?;
    let mut ids = BTreeSet::new();
    for section in file.sections() {
        if section.kind() != SectionKind::Text {
            continue;
        }
        for insn in section.data()?.chunks_exact(8) {
            if insn[0] == CALL && insn[1] >> 4 == 0 {
                ids.insert(u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
            }
        }
    }
    Ok(ids)
}

/// The error for a program the kernel would not load: a sentence naming what the kernel lacks
/// (a helper it does not offer, the verifier's limits, the privileges), the verifier's last
/// lines when the cause is not recognised, and the full verifier output at debug level.
pub fn load_failure(program: &str, err: ProgramError) -> anyhow::Error {
    let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
    else {
        return anyhow::Error::new(err).context(format!("loading the program {program}"));
    };
    let log = verifier_log.to_string();
    tracing::debug!(program, "the verifier's output:\n{log}");
    anyhow::anyhow!(
        "the kernel would not load the program {program}: {}",
        explain(io_error, &log, lockdown().as_deref())
    )
}

/// The error for an object whose maps the kernel would not create: a kernel without ring
/// buffers is named as such (the commonest cause, and the floor), else the privileges.
pub fn object_failure(err: aya::EbpfError) -> anyhow::Error {
    let release = release();
    if matches!(is_map_supported(MapType::RingBuf), Ok(false)) {
        return anyhow::Error::new(err).context(format!(
            "this kernel ({release}) has no BPF ring buffers, which came with Linux 5.8: the capture needs Linux {}.{} or newer (use `observer proxy` here)",
            MINIMUM.0, MINIMUM.1
        ));
    }
    anyhow::Error::new(err)
        .context("loading the kernel object (needs root, or CAP_BPF with CAP_PERFMON)")
}

/// Why a load failed, from the system call's error and the verifier's log.
fn explain(io_error: &std::io::Error, log: &str, lockdown: Option<&str>) -> String {
    if let Some(name) = unknown_helper(log) {
        let known = HELPERS.iter().find(|helper| helper.name == name);
        if lockdown == Some("confidentiality") && name == "bpf_probe_read_kernel" {
            return format!(
                "the kernel is locked down (lockdown=confidentiality), which forbids BPF programs to read kernel memory ({name}); boot without lockdown=confidentiality (Secure Boot's default, integrity, allows it), or use `observer proxy`"
            );
        }
        return match known {
            Some(helper) => format!(
                "this kernel does not offer the helper {name}, which came with Linux {}; the capture needs Linux {}.{} or newer (use `observer proxy` here)",
                helper.since, MINIMUM.0, MINIMUM.1
            ),
            None => format!("this kernel does not offer the helper {name}"),
        };
    }
    if log.contains("program is too large") || log.contains("too complex") {
        return format!(
            "the program is more than this kernel's verifier accepts ({}): each kernel's verifier has its own limits, and this one's were not met: a bug of the observer's, to report with the output of `observer check --json` (use `observer proxy` meanwhile)",
            log.lines()
                .find(|l| l.contains("too large") || l.contains("too complex"))
                .unwrap_or_default()
                .trim(),
        );
    }
    match io_error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) if log.trim().is_empty() => format!(
            "permission denied ({io_error}): loading BPF programs needs root, or CAP_BPF with CAP_PERFMON (CAP_SYS_ADMIN before Linux 5.8)"
        ),
        _ if log.trim().is_empty() => format!("{io_error}, and the verifier said nothing"),
        _ => format!(
            "the verifier rejected it ({io_error}); its last lines: {} (`--log debug` prints all of it)",
            last_lines(log, 3)
        ),
    }
}

/// The helper named in the verifier's `unknown func bpf_x#113`.
fn unknown_helper(log: &str) -> Option<&str> {
    let rest = &log[log.find("unknown func ")? + "unknown func ".len()..];
    let end = rest.find(['#', ' ', '\n']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The last `n` non-empty lines of a log, joined with ` / `, before the statistics the
/// verifier ends with (`verification time`, `stack depth`, `processed N insns`).
fn last_lines(log: &str, n: usize) -> String {
    let mut lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    while lines.last().is_some_and(|l| {
        [
            "verification time",
            "stack depth",
            "processed ",
            "max_states",
        ]
        .iter()
        .any(|stat| l.starts_with(stat))
    }) {
        lines.pop();
    }
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_distribution_releases() {
        assert_eq!(version_of("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(version_of("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(version_of("5.14.0-427.13.1.el9_4.x86_64"), Some((5, 14)));
        assert_eq!(version_of("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(version_of("unknown"), None);
        assert_eq!(older_than_minimum("5.4.0-1-generic"), Some(true));
        assert_eq!(older_than_minimum("5.8.0"), Some(false));
        assert_eq!(older_than_minimum("5.10.0-30-amd64"), Some(false));
        assert_eq!(older_than_minimum("garbage"), None);
    }

    #[test]
    fn lockdown_is_the_bracketed_mode() {
        assert_eq!(
            parse_lockdown("[none] integrity confidentiality\n").as_deref(),
            Some("none")
        );
        assert_eq!(
            parse_lockdown("none integrity [confidentiality]\n").as_deref(),
            Some("confidentiality")
        );
        assert_eq!(parse_lockdown(""), None);
    }

    #[test]
    fn every_helper_the_object_calls_is_listed_with_its_version() {
        let called = helpers_called(crate::capture::BPF_OBJECT).unwrap();
        assert!(
            called.contains(&(BpfHelper::BPF_FUNC_ringbuf_reserve as u32)),
            "{called:?}"
        );
        let listed: BTreeSet<u32> = HELPERS.iter().map(|h| h.id as u32).collect();
        let missing: Vec<&u32> = called.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "helpers called but not listed: {missing:?}"
        );
        let unused: Vec<&u32> = listed.difference(&called).collect();
        assert!(
            unused.is_empty(),
            "helpers listed but not called: {unused:?}"
        );
        // The floor is the newest helper's kernel.
        let newest = HELPERS
            .iter()
            .filter_map(|h| version_of(h.since))
            .max()
            .unwrap();
        assert_eq!(newest, MINIMUM);
    }

    fn einval() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    }

    #[test]
    fn a_helper_forbidden_by_lockdown_is_explained_as_lockdown() {
        let log = "0: R1=ctx() R10=fp0\n; 12: (85) call bpf_probe_read_kernel#113\nunknown func bpf_probe_read_kernel#113\nprocessed 12 insns";
        let text = explain(&einval(), log, Some("confidentiality"));
        assert!(text.contains("lockdown=confidentiality"), "{text}");
        assert!(text.contains("bpf_probe_read_kernel"), "{text}");
        let text = explain(&einval(), log, Some("none"));
        assert!(
            text.contains("came with Linux 5.5") && text.contains("needs Linux 5.8"),
            "{text}"
        );
    }

    #[test]
    fn other_rejections_name_the_limit_or_the_last_lines() {
        let text = explain(
            &std::io::Error::from_raw_os_error(libc::E2BIG),
            "...\nBPF program is too large. Processed 1000001 insn\n",
            None,
        );
        assert!(
            text.contains("more than this kernel's verifier accepts"),
            "{text}"
        );
        assert!(text.contains("Processed 1000001 insn"), "{text}");
        let text = explain(&std::io::Error::from_raw_os_error(libc::EPERM), "", None);
        assert!(text.contains("needs root"), "{text}");
        let long: String = (0..50).map(|i| format!("line {i}\n")).collect::<String>()
            + "verification time 435101 usec\nstack depth 32+104\nprocessed 48867 insns (limit 1000000) max_states_per_insn 18\n";
        let text = explain(
            &std::io::Error::from_raw_os_error(libc::EACCES),
            &long,
            None,
        );
        assert!(text.contains("line 47 / line 48 / line 49"), "{text}");
        assert!(!text.contains("line 46"), "{text}");
    }
}
