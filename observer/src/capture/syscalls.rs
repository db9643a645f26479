//! What the kernel programs need to know of the running architecture: which system call number
//! is which call, and where a call's arguments and number lie in the saved registers.
//!
//! The raw `sys_enter`/`sys_exit` tracepoints pass every call with its number and the saved
//! `struct pt_regs`; the loader fills the `SYSCALLS` array (number → what the programs do
//! with it) and the register offsets. Both are ABI: the numbers never change on an
//! architecture, and `pt_regs` is what `ptrace(2)` exposes.

use observer_common::syscall;

/// Where a system call's first three arguments and its number are in `struct pt_regs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegsLayout {
    pub arg0: u32,
    pub arg1: u32,
    pub arg2: u32,
    /// The call's number (the kernel sets it at entry; it survives until exit).
    pub nr: u32,
}

/// The layout on this architecture, or why the capture cannot run here.
pub fn regs_layout() -> anyhow::Result<RegsLayout> {
    #[cfg(target_arch = "x86_64")]
    {
        // di, si, dx, orig_ax (arch/x86/include/asm/ptrace.h; `struct user_regs_struct`).
        Ok(RegsLayout {
            arg0: 14 * 8,
            arg1: 13 * 8,
            arg2: 12 * 8,
            nr: 15 * 8,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        // x0 holds the return value by the exit: the first argument is kept in orig_x0, after
        // regs[31], sp, pc and pstate; syscallno follows (arch/arm64/include/asm/ptrace.h).
        Ok(RegsLayout {
            arg0: 34 * 8,
            arg1: 8,
            arg2: 2 * 8,
            nr: 35 * 8,
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        anyhow::bail!(
            "the kernel capture knows the system call registers of x86-64 and arm64 only: use `observer proxy` on this architecture"
        )
    }
}

/// `(number, kind)` of every call the programs follow, on this architecture.
pub fn table() -> Vec<(u32, u32)> {
    let mut calls = vec![
        (libc::SYS_read, syscall::READ),
        (libc::SYS_write, syscall::WRITE),
        (libc::SYS_recvfrom, syscall::RECVFROM),
        (libc::SYS_sendto, syscall::SENDTO),
        (libc::SYS_readv, syscall::READV),
        (libc::SYS_writev, syscall::WRITEV),
        (libc::SYS_recvmsg, syscall::RECVMSG),
        (libc::SYS_sendmsg, syscall::SENDMSG),
        (libc::SYS_connect, syscall::CONNECT),
        (libc::SYS_listen, syscall::LISTEN),
        (libc::SYS_accept, syscall::ACCEPT),
        (libc::SYS_accept4, syscall::ACCEPT),
        (libc::SYS_dup, syscall::DUP),
        (libc::SYS_fcntl, syscall::FCNTL),
        (libc::SYS_close, syscall::CLOSE),
        (libc::SYS_close_range, syscall::CLOSE_RANGE),
        (libc::SYS_dup3, syscall::DUP2),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.push((libc::SYS_dup2, syscall::DUP2));
    calls
        .into_iter()
        .map(|(nr, kind)| (nr as u32, kind))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_fits_the_table_once_and_every_kind_is_used() {
        let table = table();
        let mut numbers: Vec<u32> = table.iter().map(|&(nr, _)| nr).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), table.len(), "a number listed twice");
        assert!(numbers.iter().all(|&nr| nr < syscall::TABLE_LEN));
        for kind in 1..syscall::KINDS {
            assert!(
                table.iter().any(|&(_, k)| k == kind),
                "kind {kind} has no call"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_numbers_and_registers_are_the_abi() {
        let table = table();
        let kind_of = |nr: u32| table.iter().find(|&&(n, _)| n == nr).map(|&(_, k)| k);
        assert_eq!(kind_of(0), Some(syscall::READ));
        assert_eq!(kind_of(3), Some(syscall::CLOSE));
        assert_eq!(kind_of(42), Some(syscall::CONNECT));
        assert_eq!(kind_of(288), Some(syscall::ACCEPT));
        let regs = regs_layout().unwrap();
        assert_eq!(
            (regs.arg0, regs.arg1, regs.arg2, regs.nr),
            (112, 104, 96, 120)
        );
    }
}
