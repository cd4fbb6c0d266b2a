//! Differential testing of the interpreter against KVM.
//!
//! Every case is a short instruction sequence generated from iced-x86's
//! encoder tables, run from the same initial state over two identical
//! guest memories: once on one long-lived KVM vCPU (interpreter fallback
//! disabled, so KVM's own result is the oracle) and once on the
//! interpreter. Registers, flags (minus the ones the SDM leaves undefined),
//! the touched memory, the x87/SSE state, port I/O and the way the case
//! ended (its terminating `out`, an exception stub, a triple fault) are
//! compared. On these hosts /dev/kvm is KVM-PVM: ring-3 code runs on the
//! real CPU (a hardware oracle), ring-0 and real-mode code goes through the
//! host kernel's instruction emulator (a weaker oracle, reported
//! separately).
//!
//! - [`env`]: the fixed memory layout, descriptor tables, stubs, page
//!   tables and per-mode initial state.
//! - [`case`]: a case (items + initial state), its assembly and the static
//!   analysis of undefined flags and undefined results.
//! - [`gen`] and [`corpus`]: random sequences and targeted corpora.
//! - [`harness`]: runs a case on both sides and snapshots the outcome.
//! - [`compare`]: the comparison, with masking rules, and its report.
//! - [`minimize`]: delta debugging of a diverging case.
//! - [`probe`]: start-up probes of the hardware oracle's processor quirks.
//! - [`sdm`]: the SDM's pseudo-code as the oracle for BCD instructions.
//! - [`campaign`]: the `duet difftest` driver and its summary.
//! - [`fuzz`]: random bytes as guest code, for robustness.
//!
//! See docs/DIFFTEST.md for how to run it and the settled divergences.

use std::fmt;

pub mod campaign;
pub mod case;
pub mod compare;
pub mod corpus;
pub mod env;
pub mod fp;
pub mod fuzz;
pub mod gen;
pub mod harness;
pub mod minimize;
pub mod probe;
pub mod rng;
pub mod sdm;
pub mod watchdog;

pub use campaign::{run_campaign, CampaignConfig, Corpus, Summary};

/// Guest memory (the same type both backends use).
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// Host-side failures of the harness. A case that misbehaves is never an
/// error: it is a divergence, a refusal or a timeout in the summary.
#[derive(Debug, thiserror::Error)]
pub enum DifftestError {
    #[error("KVM is not usable: {0}")]
    KvmUnavailable(String),
    #[error("backend: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("cannot assemble case: {0}")]
    Assemble(String),
    #[error("{0}")]
    Config(String),
    #[error("watchdog: {0}")]
    Watchdog(String),
}

/// The CPU modes cases run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Long mode, 64-bit code, CPL 0 (KVM-PVM: emulator).
    Long64Ring0,
    /// Long mode, 64-bit code, CPL 3 (KVM-PVM: hardware).
    Long64Ring3,
    /// Legacy protected mode, flat, no paging (KVM-PVM cannot page there),
    /// CPL 0 (emulator).
    Prot32Ring0,
    /// Compatibility mode, 32-bit code segment, CPL 3 (emulator on
    /// KVM-PVM, see [`Mode::oracle`]).
    Compat32Ring3,
    /// Real-address mode (emulator).
    Real16,
    /// Compatibility mode, 16-bit code segment, CPL 3 (emulator on
    /// KVM-PVM).
    Compat16Ring3,
}

/// Which oracle KVM is for a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Oracle {
    /// The code runs natively on the CPU.
    Hardware,
    /// The host kernel's instruction emulator executes the code.
    Emulator,
}

impl fmt::Display for Oracle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Oracle::Hardware => "hardware oracle",
            Oracle::Emulator => "emulator oracle",
        })
    }
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Long64Ring3,
        Mode::Long64Ring0,
        Mode::Compat32Ring3,
        Mode::Prot32Ring0,
        Mode::Compat16Ring3,
        Mode::Real16,
    ];

    /// Default code size.
    pub fn bits(self) -> u32 {
        match self {
            Mode::Long64Ring0 | Mode::Long64Ring3 => 64,
            Mode::Prot32Ring0 | Mode::Compat32Ring3 => 32,
            Mode::Real16 | Mode::Compat16Ring3 => 16,
        }
    }

    pub fn ring(self) -> u8 {
        match self {
            Mode::Long64Ring3 | Mode::Compat32Ring3 | Mode::Compat16Ring3 => 3,
            _ => 0,
        }
    }

    /// On KVM-PVM only 64-bit ring-3 code runs on the CPU. Compatibility
    /// mode is emulated too: it #UDs exactly on what the host emulator
    /// lacks (DAA, AAA, AAS, POPCNT, nested ENTER, INT n) and its CMPS
    /// reads DS:[rSI] before ES:[rDI], the emulator's order, where the CPU
    /// reads ES:[rDI] first (docs/DIFFTEST.md).
    pub fn oracle(self) -> Oracle {
        if self == Mode::Long64Ring3 {
            Oracle::Hardware
        } else {
            Oracle::Emulator
        }
    }

    /// Long mode (64-bit or compatibility code): 64-bit IDT and frames.
    pub fn long(self) -> bool {
        matches!(
            self,
            Mode::Long64Ring0 | Mode::Long64Ring3 | Mode::Compat32Ring3 | Mode::Compat16Ring3
        )
    }

    pub fn real(self) -> bool {
        self == Mode::Real16
    }

    /// Paging on (the long modes; KVM-PVM cannot page in legacy
    /// protected mode).
    pub fn paged(self) -> bool {
        self.long()
    }

    /// The mode for `bits` and `ring`.
    pub fn from_bits_ring(bits: u32, ring: u8) -> Option<Mode> {
        Some(match (bits, ring) {
            (64, 0) => Mode::Long64Ring0,
            (64, 3) => Mode::Long64Ring3,
            (32, 0) => Mode::Prot32Ring0,
            (32, 3) => Mode::Compat32Ring3,
            (16, 0) => Mode::Real16,
            (16, 3) => Mode::Compat16Ring3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Long64Ring0 => "64-bit ring 0",
            Mode::Long64Ring3 => "64-bit ring 3",
            Mode::Prot32Ring0 => "32-bit ring 0 (legacy, no paging)",
            Mode::Compat32Ring3 => "32-bit ring 3 (compatibility)",
            Mode::Real16 => "16-bit real mode",
            Mode::Compat16Ring3 => "16-bit ring 3 (compatibility)",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Is KVM usable for the harness? `Err` says why not.
pub fn kvm_usable() -> Result<(), String> {
    crate::backend::kvm_available()
}
