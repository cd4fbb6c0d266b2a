//! duet's x86-64 interpreter.
//!
//! Instructions are decoded with iced-x86 once per block ([`block`]) and
//! executed through a dispatch table indexed by iced's `Code`
//! ([`dispatch`]). Arithmetic flags are lazy ([`flags`]); faults travel as
//! `Result<_, Exception>` ([`exception`]) and are delivered through the IVT
//! or IDT ([`interrupt`]). Memory goes through segmentation ([`segment`])
//! and paging with a software TLB ([`mmu`]) straight to the host mapping of
//! guest RAM ([`memory`]); everything else reaches the machine through the
//! [`Platform`] trait. The crate knows nothing of devices.

pub mod block;
pub mod cpu;
pub mod cpuid;
pub mod debug;
pub mod dispatch;
pub mod exception;
mod exec;
pub mod flags;
pub mod fpu;
pub mod insn;
pub mod interrupt;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod jit;
pub mod mca;
pub mod memory;
pub mod mmu;
#[cfg(test)]
mod msr_audit;
pub mod platform;
pub mod profile;
pub mod quirks;
pub mod recent;
pub mod segment;
pub mod softfloat80;
pub mod state;

pub use cpu::{Cpu, CpuExit};
pub use exception::Exception;
pub use memory::Ram;
pub use platform::{MsrResult, NullPlatform, Platform};

/// Which engine executes guest code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tier {
    /// The interpreter alone.
    #[default]
    Interp,
    /// Hot 64-bit blocks translated to host code, the interpreter for the
    /// rest (x86-64 Linux hosts).
    Jit,
}

impl Tier {
    /// The fastest tier this host supports.
    pub fn best() -> Tier {
        if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            Tier::Jit
        } else {
            Tier::Interp
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Interp => "interp",
            Tier::Jit => "jit",
        }
    }
}

/// Why a tier cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("the translation tier is unavailable: {0}")]
    Unavailable(String),
}

/// Intel-syntax disassembly of one instruction, for messages.
pub fn disasm(i: &iced_x86::Instruction) -> String {
    use iced_x86::Formatter;
    let mut f = iced_x86::IntelFormatter::new();
    let mut s = String::new();
    f.format(i, &mut s);
    s
}

/// Disassemble `bytes` as one instruction at `ip` in `bits`-bit code.
pub fn disasm_bytes(bits: u32, ip: u64, bytes: &[u8]) -> String {
    let mut d = iced_x86::Decoder::with_ip(bits, bytes, ip, iced_x86::DecoderOptions::NONE);
    let i = d.decode();
    if i.is_invalid() {
        "(invalid)".to_string()
    } else {
        disasm(&i)
    }
}
