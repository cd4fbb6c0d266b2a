//! Random bytes as guest code, for robustness rather than equivalence.
//!
//! Each case writes random bytes (or an "opcode soup": a real opcode of a
//! random iced `Code` followed by random ModRM/SIB/displacement/immediate
//! bytes) into the code page and runs them from the mode's initial state on
//! KVM (with the interpreter fallback ON, through the normal backend API)
//! and on the interpreter alone, each with a time/instruction budget.
//! Outcomes may differ and any ending is fine (a stop port, HLT, a triple
//! fault, a timeout, KVM refusing an instruction); what must not happen is
//! a panic or a host-side error that leaves the backend unusable.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use iced_x86::{Code, EncodingKind, OpCodeTableKind};
use vm_memory::{Bytes, GuestAddress};

use super::env;
use super::gen::Generator;
use super::harness::{End, InterpSide};
use super::rng::Rng;
use super::{DifftestError, Mode};

/// What a fuzz run saw.
#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    pub cases: u64,
    /// How runs ended, per side ("kvm: stop", "interp: timeout", ...).
    pub ends: BTreeMap<String, u64>,
    /// Panics (side, mode, code bytes, message): must stay empty.
    pub panics: Vec<String>,
    /// Host-side errors from the KVM backend (the VM was recreated).
    pub kvm_errors: Vec<String>,
}

impl FuzzReport {
    pub fn render(&self) -> String {
        let mut t = format!("fuzz: {} cases\n", self.cases);
        for (k, n) in &self.ends {
            t.push_str(&format!("  {n:>7}x {k}\n"));
        }
        for p in &self.panics {
            t.push_str(&format!("  PANIC {p}\n"));
        }
        for e in &self.kvm_errors {
            t.push_str(&format!("  kvm error {e}\n"));
        }
        t
    }
}

fn end_key(e: &End) -> &'static str {
    match e {
        End::Stop => "stop",
        End::Halted => "hlt",
        End::TripleFault => "triple fault",
        End::Refused { .. } => "refused",
        End::Timeout => "timeout",
        End::Failed(_) => "failed",
    }
}

/// Random guest code: plain random bytes, or a real opcode (with its
/// mandatory prefix and escape bytes) followed by random operand bytes.
pub fn random_code(rng: &mut Rng, mode: Mode, codes: &[Code]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let n = rng.range(1, 6);
    for _ in 0..n {
        if rng.chance(1, 3) {
            let mut b = vec![0u8; rng.range(1, 16) as usize];
            rng.fill(&mut b);
            out.extend(b);
            continue;
        }
        let Some(&c) = rng.pick(codes) else { break };
        let oc = c.op_code();
        // Random legacy prefixes now and then (segment, 66, 67, F2/F3, LOCK, REX).
        if rng.chance(1, 4) {
            let pfx = [
                0x26u8, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf0, 0xf2, 0xf3,
            ];
            out.push(*rng.pick(&pfx).unwrap_or(&0x66));
        }
        match oc.mandatory_prefix() {
            iced_x86::MandatoryPrefix::P66 => out.push(0x66),
            iced_x86::MandatoryPrefix::PF3 => out.push(0xf3),
            iced_x86::MandatoryPrefix::PF2 => out.push(0xf2),
            _ => {}
        }
        if mode.bits() == 64 && rng.chance(1, 3) {
            out.push(0x40 | rng.below(16) as u8);
        }
        match oc.table() {
            OpCodeTableKind::T0F => out.push(0x0f),
            OpCodeTableKind::T0F38 => out.extend([0x0f, 0x38]),
            OpCodeTableKind::T0F3A => out.extend([0x0f, 0x3a]),
            _ => {}
        }
        let op = oc.op_code();
        if oc.op_code_len() == 2 {
            out.push((op >> 8) as u8);
        }
        out.push(op as u8);
        let mut tail = vec![0u8; rng.range(0, 10) as usize];
        rng.fill(&mut tail);
        if oc.is_group() && !tail.is_empty() {
            tail[0] = (tail[0] & !0x38) | ((oc.group_index().max(0) as u8 & 7) << 3);
        }
        out.extend(tail);
    }
    out.truncate(0xf00);
    out
}

/// Codes valid in `mode` (any legacy encoding, system instructions too).
pub fn legacy_codes(mode: Mode) -> Vec<Code> {
    Code::values()
        .filter(|c| {
            let oc = c.op_code();
            oc.encoding() == EncodingKind::Legacy
                && oc.is_instruction()
                && match mode.bits() {
                    64 => oc.mode64(),
                    32 => oc.mode32(),
                    _ => oc.mode16(),
                }
        })
        .collect()
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fuzz `modes` with `cases` cases each. `kvm` false skips the KVM side.
pub fn fuzz(seed: u64, cases: u64, modes: &[Mode], kvm: bool) -> Result<FuzzReport, DifftestError> {
    let mut report = FuzzReport::default();
    let mut interp = InterpSide::new()?;
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    let mut kvm_side = if kvm {
        Some(super::harness::KvmSide::new(
            true,
            Duration::from_millis(300),
        )?)
    } else {
        None
    };
    #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
    let _ = (kvm, Duration::from_millis(0));
    let pristine = env::image();
    for &mode in modes {
        let codes = legacy_codes(mode);
        let g = Generator::new(mode);
        for k in 0..cases {
            report.cases += 1;
            let mut rng = Rng::derive(seed ^ 0xf022, (mode as u64) << 40 | k);
            let code = random_code(&mut rng, mode, &codes);
            let init = g.init_state(&mut rng);
            let mut area = g.init_area(&mut rng);
            let at = (env::CODE - env::CASE_AREA) as usize;
            area[at..at + 0x1000].fill(0xf4);
            area[at..at + code.len()].copy_from_slice(&code);
            let install = |mem: &super::GuestMemory| -> Result<(), DifftestError> {
                for (a, bytes) in &pristine {
                    mem.write_slice(bytes, GuestAddress(*a))
                        .map_err(|e| DifftestError::Memory(e.to_string()))?;
                }
                mem.write_slice(&area, GuestAddress(env::CASE_AREA))
                    .map_err(|e| DifftestError::Memory(e.to_string()))
            };
            // The interpreter alone.
            install(&interp.mem)?;
            let r = catch_unwind(AssertUnwindSafe(|| interp.run(&init, 100_000)));
            match r {
                Ok((End::Failed(m), _)) if m.starts_with("interpreter panicked") => {
                    report
                        .panics
                        .push(format!("interp {}: code {}: {m}", mode.name(), hex(&code)));
                }
                Ok((end, _)) => {
                    *report
                        .ends
                        .entry(format!("interp: {}", end_key(&end)))
                        .or_default() += 1;
                }
                Err(p) => report.panics.push(format!(
                    "interp {}: code {}: {}",
                    mode.name(),
                    hex(&code),
                    panic_message(p.as_ref())
                )),
            }
            // KVM with the interpreter fallback.
            #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
            if let Some(side) = kvm_side.as_mut() {
                install(&side.mem)?;
                let r = catch_unwind(AssertUnwindSafe(|| side.run(&init)));
                let mut recreate = false;
                match r {
                    // A host-side failure (an ioctl error): recorded, and
                    // the VM is recreated.
                    Ok((End::Failed(m), _))
                        if m.starts_with("KVM_RUN") || m.starts_with("KVM set_state") =>
                    {
                        if report.kvm_errors.len() < 20 {
                            report.kvm_errors.push(format!(
                                "{}: code {}: {m}",
                                mode.name(),
                                hex(&code)
                            ));
                        }
                        *report.ends.entry("kvm: host error".into()).or_default() += 1;
                        recreate = true;
                    }
                    // The backend gave up on the guest (neither KVM nor the
                    // interpreter has the instruction): a normal ending.
                    Ok((End::Failed(_), _)) => {
                        *report.ends.entry("kvm: unrecoverable".into()).or_default() += 1;
                    }
                    Ok((end, _)) => {
                        *report
                            .ends
                            .entry(format!("kvm: {}", end_key(&end)))
                            .or_default() += 1;
                    }
                    Err(p) => {
                        report.panics.push(format!(
                            "kvm+fallback {}: code {}: {}",
                            mode.name(),
                            hex(&code),
                            panic_message(p.as_ref())
                        ));
                        recreate = true;
                    }
                }
                if recreate {
                    *side = super::harness::KvmSide::new(true, Duration::from_millis(300))?;
                }
            }
        }
    }
    Ok(report)
}
