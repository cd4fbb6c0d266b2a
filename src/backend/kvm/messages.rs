//! Descriptions of guest state and instructions for error messages.

use super::*;

pub(super) fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

pub(super) fn hex_words(data: &[u64]) -> String {
    if data.is_empty() {
        return "(none)".into();
    }
    data.iter()
        .map(|w| format!("{w:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Default code size for `s`, as the interpreter decides it.
pub(super) fn code_bits(s: &CpuState) -> u32 {
    let pe = s.sregs.cr0 & cpu_interp::cpu::CR0_PE != 0;
    if pe && s.sregs.efer & cpu_interp::cpu::EFER_LMA != 0 && s.sregs.cs.l {
        64
    } else if s.regs.rflags & cpu_interp::flags::VM != 0 {
        16
    } else if s.sregs.cs.db {
        32
    } else {
        16
    }
}

/// Linear address of CS:RIP.
pub(super) fn code_linear(s: &CpuState) -> u64 {
    if code_bits(s) == 64 {
        s.regs.rip
    } else {
        s.sregs.cs.base.wrapping_add(s.regs.rip) & 0xffff_ffff
    }
}

/// The instruction bytes at CS:RIP as hex, for messages (RAM only: page
/// tables or code outside RAM show as `??` rather than cause device reads).
pub(super) fn code_bytes(cpu: &mut Cpu, s: &CpuState, len: usize) -> String {
    let lin0 = code_linear(s);
    let mut out = Vec::new();
    for k in 0..len as u64 {
        let Some(pa) = cpu.translate_debug(&mut cpu_interp::NullPlatform, lin0.wrapping_add(k))
        else {
            out.push("??".to_string());
            continue;
        };
        let mut b = [0u8];
        if cpu.ram().read(pa, &mut b) {
            out.push(format!("{:02x}", b[0]));
        } else {
            out.push("??".to_string());
        }
    }
    out.join(" ")
}

/// Registers for an error message.
pub(super) fn describe_state(s: &CpuState) -> String {
    use cpu_interp::state::gpr::*;
    let g = &s.regs.gpr;
    let sr = &s.sregs;
    format!(
        "  RIP={:#018x} RSP={:#018x} RFLAGS={:#010x}\n  CR0={:#010x} CR2={:#x} CR3={:#x} \
         CR4={:#x} EFER={:#x}\n  CS={:#06x} (base {:#x} limit {:#x} type {:#x} dpl {} l {} db {}) \
         SS={:#06x} DS={:#06x} ES={:#06x} FS={:#06x} GS={:#06x}\n  RAX={:#018x} RBX={:#018x} \
         RCX={:#018x} RDX={:#018x}\n  RSI={:#018x} RDI={:#018x} RBP={:#018x} R8={:#018x}\n  \
         R9={:#018x} R10={:#018x} R11={:#018x} R12={:#018x}\n  R13={:#018x} R14={:#018x} \
         R15={:#018x}",
        s.regs.rip,
        g[RSP],
        s.regs.rflags,
        sr.cr0,
        sr.cr2,
        sr.cr3,
        sr.cr4,
        sr.efer,
        sr.cs.selector,
        sr.cs.base,
        sr.cs.limit,
        sr.cs.type_,
        sr.cs.dpl,
        u8::from(sr.cs.l),
        u8::from(sr.cs.db),
        sr.ss.selector,
        sr.ds.selector,
        sr.es.selector,
        sr.fs.selector,
        sr.gs.selector,
        g[RAX],
        g[RBX],
        g[RCX],
        g[RDX],
        g[RSI],
        g[RDI],
        g[RBP],
        g[R8],
        g[R9],
        g[R10],
        g[R11],
        g[R12],
        g[R13],
        g[R14],
        g[R15],
    )
}
