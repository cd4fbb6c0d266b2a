//! The VMM's seccomp filter: once the machine is built (memory mapped,
//! files and sockets opened, threads started), every thread of the process
//! is limited to the system calls that running a VM needs, as Firecracker
//! and Cloud Hypervisor do. A guest that finds a bug in a device model then
//! cannot make duet open files, start programs, trace other processes or
//! mount anything.
//!
//! Anything outside the list is refused with `EPERM` (the caller sees an
//! error it reports, rather than the process dying on a code path the list
//! missed). `duet run --seccomp off` runs without the filter (debugging,
//! `strace`-style investigations).
//!
//! The list: memory management (the allocator, thread stacks), threads and
//! their synchronisation (`futex`, `clone` for the per-connection console
//! threads), signals (the vCPU kick), time, file-descriptor I/O on what is
//! already open (virtio-blk's positioned I/O and flushes, the trace, the
//! console, sockets accepted on the listening console socket, TAP),
//! polling, `ioctl` (KVM, termios, TAP), the user-mode network's sockets
//! (it opens host sockets as the guest connects out), `unlink` (the console
//! socket's file is removed at exit), and exit. Not on it,
//! among others: `execve`/`execveat`, `fork`/`vfork`, `open`/`openat`/
//! `creat`, `ptrace`, `mount`, `kexec_load`, `init_module`, `bpf`,
//! `process_vm_writev`, `setuid`, `chroot`, `unshare`, `reboot`.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Errors of the sandbox module.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter (give --seccomp off to run without it): {0}")]
    Install(#[from] seccompiler::Error),
}

/// The system calls the VMM's threads may make after set-up.
pub const ALLOWED: &[i64] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Threads, their synchronisation and scheduling.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Signals (the vCPU kick, Ctrl-C handling, the terminal restore).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // The stop-signal thread waits in sigwait.
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    // I/O on descriptors that are already open.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_ioctl,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_getrandom,
    // Removing the console's socket file at exit.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // Waiting for descriptors.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // Sockets: the console socket's clients, the user-mode network.
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// The filter as a BPF program for this architecture.
pub fn program() -> Result<BpfProgram, SandboxError> {
    let rules = ALLOWED
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Install the filter on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC;
/// threads started later inherit it). Irreversible.
pub fn apply_to_all_threads() -> Result<(), SandboxError> {
    let p = program()?;
    seccompiler::apply_filter_all_threads(&p)?;
    Ok(())
}

/// Install the filter on the calling thread only (tests).
pub fn apply_to_this_thread() -> Result<(), SandboxError> {
    let p = program()?;
    seccompiler::apply_filter(&p)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under the filter a forbidden call (opening a file, starting a
    /// program) is refused with EPERM, while the VMM's own calls work.
    #[test]
    fn forbidden_syscalls_are_refused_and_allowed_ones_work() {
        let r = std::thread::spawn(|| {
            // Before: opening works.
            assert!(std::fs::File::open("/proc/self/status").is_ok());
            apply_to_this_thread().expect("install");
            let open = std::fs::File::open("/proc/self/status").map_err(|e| e.raw_os_error());
            // SAFETY: execve with null pointers; refused by the filter (and
            // would fail with EFAULT without it).
            let exec = unsafe {
                libc::syscall(
                    libc::SYS_execve,
                    std::ptr::null::<libc::c_char>(),
                    std::ptr::null::<*const libc::c_char>(),
                    std::ptr::null::<*const libc::c_char>(),
                )
            };
            let exec_errno = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: getppid has no arguments; not on the list.
            let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
            let ppid_errno = std::io::Error::last_os_error().raw_os_error();
            // Allowed: a pipe, a write and a read through it.
            let mut fds = [0i32; 2];
            // SAFETY: fds has room for the two descriptors.
            let piped = unsafe { libc::pipe2(fds.as_mut_ptr(), 0) };
            // SAFETY: fds[1] was just opened; the buffer is valid.
            let wrote = unsafe { libc::write(fds[1], b"ok".as_ptr().cast(), 2) };
            let mut buf = [0u8; 2];
            // SAFETY: fds[0] was just opened; the buffer is valid.
            let read = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 2) };
            (
                open.err(),
                (exec, exec_errno),
                (ppid, ppid_errno),
                (piped, wrote, read, buf),
            )
        })
        .join()
        .unwrap();
        assert_eq!(r.0, Some(Some(libc::EPERM)), "open");
        assert_eq!(r.1, (-1, Some(libc::EPERM)), "execve");
        assert_eq!(r.2, (-1, Some(libc::EPERM)), "getppid");
        assert_eq!(r.3, (0, 2, 2, *b"ok"), "pipe, write, read");
        // Other threads are not affected by a per-thread filter.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
