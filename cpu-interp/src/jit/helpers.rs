//! Functions translated code calls: the interpreter for one instruction.

use crate::block::Insn;
use crate::cpu::Cpu;

/// Run `insn` (at `cpu.rip`, with the guest state written back) exactly as
/// the interpreter's block loop would. Returns 0 to continue in translated
/// code, 1 to leave it (an event was delivered, the instruction ends the
/// block, did I/O, wrote code, halted, ...). Flags are left eager, so
/// translated code can load them directly.
///
/// # Safety
/// Called only by translated code, with `cpu` the CPU running it and
/// `insn` an instruction owned by the running translation.
pub unsafe extern "C" fn exec_insn(cpu: *mut Cpu, insn: *const Insn) -> u32 {
    // SAFETY: translated code passes the `Cpu` it runs on (RBP), which is
    // exclusively borrowed by `Jit::run` for the duration, and a pointer
    // into its translation's instruction copy, alive while it runs.
    let (cpu, insn) = unsafe { (&mut *cpu, &*insn) };
    let p = cpu.jit_platform();
    // SAFETY: `jit_platform` was set by `Jit::run` from a live `&mut dyn
    // Platform` that outlives this call.
    let p = unsafe { &mut *p };
    let rip = cpu.rip;
    cpu.rip = insn.next;
    let t0 = crate::jit::profile_start(cpu);
    let r = (insn.h)(cpu, p, insn);
    let leave = match r {
        Ok(()) => {
            cpu.retired += 1;
            let leave = cpu.end_block
                | cpu.code_written
                | cpu.io_happened
                | cpu.triple_fault
                | cpu.pending_exit.is_some();
            cpu.end_block = false;
            cpu.code_written = false;
            leave
        }
        Err(exc) => {
            cpu.rip = rip;
            cpu.end_block = false;
            cpu.code_written = false;
            cpu.raise(p, exc);
            true
        }
    };
    // Translated code reads the arithmetic flags from `bits`.
    cpu.flags.set(cpu.flags.get());
    crate::jit::profile_helper(cpu, t0, insn);
    u32::from(leave)
}
