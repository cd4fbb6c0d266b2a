//! A reference oracle from the SDM's pseudo-code, for instructions KVM-PVM
//! gives no oracle for.
//!
//! AAA, AAS and DAA are refused by KVM's instruction emulator in ring 0 and
//! real mode and come back as #UD in compatibility mode; the flags of
//! AAM/AAD are wrong in the emulator (it sets SF/ZF/PF from AX). These
//! instructions are invalid in 64-bit mode, where the CPU itself runs. So
//! the interpreter is checked here, exhaustively, against the pseudo-code
//! of the SDM (vol. 2, AAA/AAS/DAA/DAS/AAM/AAD), in real mode and in 32-bit
//! protected mode: every AL with every AF/CF combination (and several AH
//! values and AAM/AAD bases, including 0: #DE), comparing AX and the flags
//! the SDM defines.

use iced_x86::code_asm::CodeAssembler;

use cpu_interp::state::gpr;

use super::case::{Case, Item, AF, CF, PF, SF, ZF};
use super::env;
use super::harness::{End, InterpSide};
use super::{DifftestError, Mode};

/// The BCD instructions checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bcd {
    Daa,
    Das,
    Aaa,
    Aas,
    Aam(u8),
    Aad(u8),
}

/// What the SDM says: the new AX and flags, and which flags it defines;
/// `None` for #DE (AAM by 0).
pub fn reference(op: Bcd, ax: u16, flags: u64) -> Option<(u16, u64, u64)> {
    let al = (ax & 0xff) as u8;
    let ah = (ax >> 8) as u8;
    let (af, cf) = (flags & AF != 0, flags & CF != 0);
    let szp = |v: u8| {
        let mut f = 0;
        if v == 0 {
            f |= ZF;
        }
        if v & 0x80 != 0 {
            f |= SF;
        }
        if v.count_ones() % 2 == 0 {
            f |= PF;
        }
        f
    };
    Some(match op {
        Bcd::Daa => {
            let (old_al, old_cf) = (al, cf);
            let mut al = al;
            let mut f = 0;
            if al & 0xf > 9 || af {
                al = al.wrapping_add(6);
                f |= AF;
            }
            if old_al > 0x99 || old_cf {
                al = al.wrapping_add(0x60);
                f |= CF;
            }
            (
                u16::from(ah) << 8 | u16::from(al),
                f | szp(al),
                CF | AF | SF | ZF | PF,
            )
        }
        Bcd::Das => {
            let (old_al, old_cf) = (al, cf);
            let mut al = al;
            let mut f = 0;
            if al & 0xf > 9 || af {
                let borrow = al < 6;
                al = al.wrapping_sub(6);
                if old_cf || borrow {
                    f |= CF;
                }
                f |= AF;
            }
            if old_al > 0x99 || old_cf {
                al = al.wrapping_sub(0x60);
                f |= CF;
            }
            (
                u16::from(ah) << 8 | u16::from(al),
                f | szp(al),
                CF | AF | SF | ZF | PF,
            )
        }
        Bcd::Aaa => {
            let (ax, f) = if al & 0xf > 9 || af {
                (ax.wrapping_add(0x106), AF | CF)
            } else {
                (ax, 0)
            };
            (ax & 0xff0f, f, AF | CF)
        }
        Bcd::Aas => {
            let (ax, f) = if al & 0xf > 9 || af {
                let ax = ax.wrapping_sub(6);
                (ax.wrapping_sub(0x100), AF | CF)
            } else {
                (ax, 0)
            };
            (ax & 0xff0f, f, AF | CF)
        }
        Bcd::Aam(base) => {
            if base == 0 {
                return None;
            }
            let (q, r) = (al / base, al % base);
            (u16::from(q) << 8 | u16::from(r), szp(r), SF | ZF | PF)
        }
        Bcd::Aad(base) => {
            let v = al.wrapping_add(ah.wrapping_mul(base));
            (u16::from(v), szp(v), SF | ZF | PF)
        }
    })
}

fn program(op: Bcd, bits: u32) -> Result<Vec<Item>, DifftestError> {
    let mut a = CodeAssembler::new(bits).map_err(|e| DifftestError::Assemble(e.to_string()))?;
    let r = match op {
        Bcd::Daa => a.daa(),
        Bcd::Das => a.das(),
        Bcd::Aaa => a.aaa(),
        Bcd::Aas => a.aas(),
        Bcd::Aam(b) => a.aam(u32::from(b)),
        Bcd::Aad(b) => a.aad(u32::from(b)),
    };
    r.map_err(|e| DifftestError::Assemble(e.to_string()))?;
    Ok(a.instructions()
        .iter()
        .enumerate()
        .map(|(k, i)| Item::new(k, *i))
        .collect())
}

/// The result of the exhaustive check.
#[derive(Clone, Debug, Default)]
pub struct BcdReport {
    pub cases: u64,
    pub mismatches: Vec<String>,
}

/// Run every BCD instruction over all inputs on the interpreter in real
/// mode and 32-bit protected mode and compare with [`reference`].
pub fn check_bcd(side: &mut InterpSide) -> Result<BcdReport, DifftestError> {
    let mut ops = vec![Bcd::Daa, Bcd::Das, Bcd::Aaa, Bcd::Aas];
    for base in [0u8, 1, 2, 10, 16, 0x7f, 0xff] {
        ops.push(Bcd::Aam(base));
        ops.push(Bcd::Aad(base));
    }
    let mut rep = BcdReport::default();
    let quirks = cpu_interp::quirks::Quirks::INTEL;
    for mode in [Mode::Real16, Mode::Prot32Ring0] {
        for &op in &ops {
            let items = program(op, mode.bits())?;
            let mut case = Case {
                mode,
                init: env::base_state(mode),
                area: vec![0u8; (env::SPACE - env::CASE_AREA) as usize],
                items,
                origin: format!("sdm {op:?}"),
            };
            // Lay the program and environment out once; then only the
            // registers change between inputs.
            side.run_case(&case, quirks)?;
            for ah in [0u8, 0x01, 0x7f, 0xff] {
                for al in 0..=255u8 {
                    for fl in [0, AF, CF, AF | CF] {
                        let ax = u16::from(ah) << 8 | u16::from(al);
                        case.init.regs.gpr[gpr::RAX] = 0x1234_5678_0000_0000 | u64::from(ax);
                        case.init.regs.rflags = 2 | fl;
                        let (end, _) = side.run(&case.init, 64);
                        let st = side.cpu.state();
                        rep.cases += 1;
                        let got_ax = st.regs.gpr[gpr::RAX] as u16;
                        let got_flags = st.regs.rflags;
                        let de = env::stub_vector(st.sregs.cs.base, st.regs.rip) == Some(0);
                        let ok = match reference(op, ax, fl) {
                            None => de && end == End::Stop,
                            Some((want_ax, want_flags, defined)) => {
                                !de && end == End::Stop
                                    && got_ax == want_ax
                                    && (got_flags ^ want_flags) & defined == 0
                                    && st.regs.gpr[gpr::RAX] >> 16
                                        == case.init.regs.gpr[gpr::RAX] >> 16
                            }
                        };
                        if !ok && rep.mismatches.len() < 20 {
                            rep.mismatches.push(format!(
                                "{mode}: {op:?} AX={ax:#06x} AF={} CF={}: got AX={got_ax:#06x} flags={got_flags:#x} (#DE: {de}), SDM {:x?}",
                                u8::from(fl & AF != 0),
                                u8::from(fl & CF != 0),
                                reference(op, ax, fl)
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_follows_the_sdm_examples() {
        // DAA after 0x79 + 0x35 = 0xae: 0x14 with CF (SDM DAA example).
        assert_eq!(
            reference(Bcd::Daa, 0xae, 0).map(|r| (r.0, r.1 & CF)),
            Some((0x14, CF))
        );
        // DAS after 0x35 - 0x47 = 0xee (CF set): 0x88 with CF.
        assert_eq!(
            reference(Bcd::Das, 0xee, CF).map(|r| (r.0, r.1 & CF)),
            Some((0x88, CF))
        );
        // AAA of AX = 0x00fa: AX + 0x106 = 0x0200, AL masked: 0x0200.
        assert_eq!(reference(Bcd::Aaa, 0x00fa, 0).map(|r| r.0), Some(0x0200));
        // AAS of AX = 0x0205 with AF: 0x0205 - 6 - 0x100 = 0x00ff, AL & 0xf.
        assert_eq!(reference(Bcd::Aas, 0x0205, AF).map(|r| r.0), Some(0x000f));
        // AAM 10 of 0x3f (63): AH 6, AL 3; AAD 10 of 0x0603: 63.
        assert_eq!(reference(Bcd::Aam(10), 0x3f, 0).map(|r| r.0), Some(0x0603));
        assert_eq!(reference(Bcd::Aad(10), 0x0603, 0).map(|r| r.0), Some(0x3f));
        assert_eq!(reference(Bcd::Aam(0), 0x3f, 0), None);
    }

    #[test]
    fn the_interpreter_matches_the_sdm_on_every_bcd_input() {
        let mut side = InterpSide::new().unwrap();
        let rep = check_bcd(&mut side).unwrap();
        assert!(rep.cases > 100_000, "{} cases", rep.cases);
        assert!(rep.mismatches.is_empty(), "{:#?}", rep.mismatches);
    }
}
