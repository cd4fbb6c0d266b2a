//! Panic containment: a bug in duet (a device model, the interpreter, a
//! backend, a host I/O thread) must not leave a hung or half-dead VMM.
//!
//! - On the thread that runs the vCPU and the devices, [`Machine::run`]
//!   catches the panic (`catch_unwind`) and ends the run with
//!   [`Outcome::Crashed`](crate::machine::Outcome::Crashed): the panic
//!   message and where it happened, the guest's RIP, mode and the
//!   instruction there, and the instructions retired so far. duet exits
//!   with its own status ([`CRASH_EXIT_STATUS`]).
//! - duet's host threads (named `duet-*`: console and socket input, network
//!   back ends, the KVM ticker) that panic are recorded by the panic hook;
//!   the run loop notices at its next return to the VMM (an idle vCPU waits
//!   at most 100 ms) and stops the VM the same way.
//!
//! The hook chains to the previous one (the default hook prints the panic
//! with its location; the console's hook restores the terminal first).
//!
//! [`Machine::run`]: crate::machine::Machine::run

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use cpu_interp::recent::RecentEntry;
use cpu_interp::state::CpuState;
use cpu_interp::{Cpu, Ram};

use crate::backend::GuestMemory;

/// The process exit status after a contained panic (duet's own statuses
/// are even; a guest's debug-exit statuses odd).
pub const CRASH_EXIT_STATUS: i32 = 8;

/// What the panic hook saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PanicRecord {
    /// The thread's name.
    pub thread: String,
    /// The panic message.
    pub message: String,
    /// `file:line:column`, when known.
    pub location: Option<String>,
}

impl std::fmt::Display for PanicRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panic in thread '{}'", self.thread)?;
        if let Some(l) = &self.location {
            write!(f, " at {l}")?;
        }
        write!(f, ": {}", self.message)
    }
}

thread_local! {
    /// The last panic on this thread (read after `catch_unwind`).
    static LAST: RefCell<Option<PanicRecord>> = const { RefCell::new(None) };
}

/// A panic on one of duet's host threads, not yet reported.
static HOST_THREAD_PANICKED: AtomicBool = AtomicBool::new(false);
static HOST_THREAD_PANIC: Mutex<Option<PanicRecord>> = Mutex::new(None);

/// Install the recording hook (once per process; chains to the hook that
/// was in place).
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = payload_text(info.payload());
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string();
            let rec = PanicRecord {
                thread,
                message,
                location: info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())),
            };
            if rec.thread.starts_with("duet-") {
                let mut g = HOST_THREAD_PANIC.lock().unwrap_or_else(|e| e.into_inner());
                if g.is_none() {
                    *g = Some(rec.clone());
                }
                HOST_THREAD_PANICKED.store(true, Ordering::Release);
            }
            LAST.with(|l| *l.borrow_mut() = Some(rec));
            prev(info);
        }));
    });
}

/// The panic the hook recorded on this thread, taken.
pub fn take_last_on_this_thread() -> Option<PanicRecord> {
    LAST.with(|l| l.borrow_mut().take())
}

/// A panic on a duet host thread, taken (cheap when there was none).
pub fn take_host_thread_panic() -> Option<PanicRecord> {
    if !HOST_THREAD_PANICKED.load(Ordering::Acquire) {
        return None;
    }
    HOST_THREAD_PANICKED.store(false, Ordering::Release);
    HOST_THREAD_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

/// The text of a panic payload that the hook did not see.
pub fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// The guest's mode, in words.
pub fn guest_mode(s: &CpuState) -> String {
    use cpu_interp::cpu::{CR0_PE, EFER_LMA};
    let cpl = s.sregs.cs.selector & 3;
    if s.sregs.cr0 & CR0_PE == 0 {
        return "real mode".into();
    }
    if s.regs.rflags & cpu_interp::flags::VM != 0 {
        return "virtual-8086 mode".into();
    }
    let what = if s.sregs.efer & EFER_LMA != 0 {
        if s.sregs.cs.l {
            "64-bit long mode"
        } else if s.sregs.cs.db {
            "32-bit compatibility mode"
        } else {
            "16-bit compatibility mode"
        }
    } else if s.sregs.cs.db {
        "32-bit protected mode"
    } else {
        "16-bit protected mode"
    };
    format!("{what}, ring {cpl}")
}

/// The code size of the state's CS: 16, 32 or 64.
fn code_bits(s: &CpuState) -> u32 {
    let pe = s.sregs.cr0 & cpu_interp::cpu::CR0_PE != 0;
    if pe && s.sregs.efer & cpu_interp::cpu::EFER_LMA != 0 && s.sregs.cs.l {
        64
    } else if pe && s.regs.rflags & cpu_interp::flags::VM == 0 && s.sregs.cs.db {
        32
    } else {
        16
    }
}

/// Up to `n` bytes of code at `rip` (CS base `cs_base` outside 64-bit
/// code), read from RAM through the guest's page tables as `cpu` has them;
/// never a device access. Shorter where the code leaves RAM.
fn code_bytes(cpu: &mut Cpu, bits: u32, cs_base: u64, rip: u64, n: u64) -> Vec<u8> {
    let lin0 = if bits == 64 {
        rip
    } else {
        cs_base.wrapping_add(rip) & 0xffff_ffff
    };
    let mut bytes = Vec::new();
    for k in 0..n {
        let Some(pa) = cpu.translate_debug(&mut cpu_interp::NullPlatform, lin0.wrapping_add(k))
        else {
            break;
        };
        let mut b = [0u8];
        if !cpu.ram().read(pa, &mut b) {
            break;
        }
        bytes.push(b[0]);
    }
    bytes
}

/// Where the guest was: RIP, mode and the instruction there (read from
/// RAM through the guest's page tables; never a device access).
pub fn describe_guest(s: &CpuState, mem: &GuestMemory) -> String {
    let mut cpu = Cpu::new(Ram::new(mem.clone()));
    cpu.set_state(s);
    let bits = code_bits(s);
    let bytes = code_bytes(&mut cpu, bits, s.sregs.cs.base, s.regs.rip, 15);
    let insn = if bytes.is_empty() {
        "(not in RAM)".to_string()
    } else {
        cpu_interp::disasm_bytes(bits, s.regs.rip, &bytes)
    };
    format!(
        "guest RIP {:#x} (CS {:#06x}), {}, instruction there: {insn}",
        s.regs.rip,
        s.sregs.cs.selector,
        guest_mode(s)
    )
}

/// Instructions shown per block entered, at most.
const PER_BLOCK: usize = 8;

/// The last blocks the CPU entered (oldest first) with their instructions:
/// each block from its start to its first control transfer, the last one
/// up to the current RIP. Disassembled from RAM through the current page
/// tables (code that a page-table change or a code write replaced since
/// shows as it is now). Empty when the backend keeps no history.
pub fn describe_recent(s: &CpuState, mem: &GuestMemory, recent: &[RecentEntry]) -> String {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    if recent.is_empty() {
        return String::new();
    }
    let mut cpu = Cpu::new(Ram::new(mem.clone()));
    cpu.set_state(s);
    let mut t = format!(
        "last {} blocks entered (oldest first; from RAM through the current page tables):",
        recent.len()
    );
    for (k, e) in recent.iter().enumerate() {
        let last = k + 1 == recent.len();
        let bytes = code_bytes(&mut cpu, e.bits, e.cs_base, e.rip, 15 * PER_BLOCK as u64);
        let mut d = Decoder::with_ip(e.bits, &bytes, e.rip, DecoderOptions::NONE);
        let mut insns = Vec::new();
        while d.can_decode() && insns.len() < PER_BLOCK {
            let i = d.decode();
            if i.is_invalid() {
                insns.push("(invalid)".to_string());
                break;
            }
            let here = last && i.ip() == s.regs.rip;
            insns.push(format!(
                "{}{}",
                cpu_interp::disasm(&i),
                if here { "  <- RIP" } else { "" }
            ));
            let ends = if last {
                i.ip() >= s.regs.rip
            } else {
                i.flow_control() != FlowControl::Next
            };
            if ends {
                break;
            }
        }
        if bytes.is_empty() {
            insns.push("(not in RAM)".to_string());
        }
        t.push_str(&format!("\n    {:#x}: {}", e.rip, insns.join("; ")));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_records_the_message_and_where() {
        install_hook();
        let r = std::panic::catch_unwind(|| panic!("device model bug {}", 42));
        assert!(r.is_err());
        let rec = take_last_on_this_thread().expect("recorded");
        assert_eq!(rec.message, "device model bug 42");
        assert!(rec
            .location
            .as_deref()
            .is_some_and(|l| l.contains("crash.rs")));
        assert!(take_last_on_this_thread().is_none());
    }

    #[test]
    fn a_panic_on_a_duet_host_thread_is_noticed() {
        install_hook();
        let t = std::thread::Builder::new()
            .name("duet-test-host-thread".into())
            .spawn(|| panic!("host thread bug"))
            .unwrap();
        assert!(t.join().is_err());
        let rec = take_host_thread_panic().expect("recorded");
        assert_eq!(rec.thread, "duet-test-host-thread");
        assert_eq!(rec.message, "host thread bug");
        assert!(take_host_thread_panic().is_none());
    }
}
