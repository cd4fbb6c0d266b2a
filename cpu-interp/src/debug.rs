//! Debug registers: instruction breakpoints, data watchpoints and general
//! detect (SDM Vol. 3B, 17.2–17.3).
//!
//! DR7 enables breakpoint `n` with its L`n`/G`n` bits; R/W`n` says what it
//! watches (00 execution, 01 data writes, 11 data reads and writes, 10 I/O
//! with CR4.DE) and LEN`n` how many bytes (00 = 1, 01 = 2, 11 = 4, 10 = 8;
//! the address is aligned down to the length).
//!
//! How the interpreter honours them:
//! - While any breakpoint is enabled the CPU runs one instruction at a time
//!   (as under TF), so every #DB comes at its exact boundary.
//! - **Instruction breakpoints** are faults: checked before the instruction
//!   at CS:RIP executes, unless RFLAGS.RF is set or the instruction sits in
//!   a MOV SS/POP SS shadow. RF is cleared after the next instruction
//!   completes (IRETD/IRETQ load it from their image).
//! - **Data watchpoints** are traps: a TLB entry for a page a watchpoint
//!   overlaps carries [`crate::mmu::TLB_WATCH`], which sends every access
//!   to that page down the slow path, where the accessed bytes are compared
//!   with the watched ranges; hits of an instruction that completes raise
//!   #DB after it, together with its single-step trap (DR6.B`n` and BS in
//!   one exception). Hits of a MOV SS/POP SS wait until the instruction
//!   after it has completed — if that instruction is INT3/INT1/INT n, the
//!   #DB arrives at the first instruction of its handler, as on hardware.
//!   REP string instructions stop after each iteration meanwhile.
//! - **General detect** (DR7.GD): a MOV to or from a debug register raises
//!   a #DB fault with DR6.BD; delivering a #DB clears GD.
//! - **I/O breakpoints** (R/W = 10 with CR4.DE) trap after IN/OUT/INS/OUTS
//!   touching a watched port.
//!
//! A #DB from breakpoints replaces DR6.B0–B3 with the breakpoints that
//! fired (as KVM reports them); BS, BD and BT accumulate until software
//! clears them.
//!
//! **Breakpoints that are not enabled.** The SDM (17.2.3) lets B0–B3 "be
//! set or not" for a condition that matches while its L`n`/G`n` are clear,
//! and tells handlers to look only at enabled ones. The interpreter never
//! sets them: that is what a guest sees on KVM (which loads the guest's
//! DR0–DR3 into the hardware only while DR7 enables one, and reports only
//! enabled hits), so the built-in guests read the same DR6 on both
//! backends. QEMU's TCG sets them for matching instruction breakpoints.
//! **BT** needs a hardware task switch to a TSS with its T flag; the
//! interpreter implements no task switches (task gates and far transfers
//! through a TSS raise #GP), so BT is never set by it.

use crate::cpu::{Cpu, CR4_DE};

/// DR6.B0–B3: breakpoint `n` fired.
pub const DR6_B_MASK: u64 = 0xf;
/// DR6.BD: general detect (a debug-register access with DR7.GD set).
pub const DR6_BD: u64 = 1 << 13;
/// DR6.BS: single-step trap.
pub const DR6_BS: u64 = 1 << 14;
/// DR6.BT: task switch with the TSS's T flag.
pub const DR6_BT: u64 = 1 << 15;
/// DR7.GD: general detect enable.
pub const DR7_GD: u64 = 1 << 13;
/// DR7 L0/G0..L3/G3.
pub const DR7_ENABLES: u64 = 0xff;

/// What a breakpoint watches (DR7.R/W`n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakKind {
    Execute,
    Write,
    Io,
    ReadWrite,
}

/// Breakpoint `n` as DR7 and DR`n` configure it: (kind, first byte, length),
/// or `None` when it is not enabled.
pub fn breakpoint(dr7: u64, addr: &[u64; 4], n: usize) -> Option<(BreakKind, u64, u64)> {
    if (dr7 >> (2 * n)) & 3 == 0 {
        return None;
    }
    let kind = match (dr7 >> (16 + 4 * n)) & 3 {
        0 => BreakKind::Execute,
        1 => BreakKind::Write,
        2 => BreakKind::Io,
        _ => BreakKind::ReadWrite,
    };
    let len = match (dr7 >> (18 + 4 * n)) & 3 {
        0 => 1,
        1 => 2,
        2 => 8,
        _ => 4,
    };
    Some((kind, addr[n] & !(len - 1), len))
}

impl Cpu {
    /// Recompute what the enabled breakpoints need after DR0–DR3, DR7 or
    /// CR4.DE changed: the TLB is flushed so that pages under a watchpoint
    /// get their slow-path mark, and the current block ends so that the
    /// run loop switches to (or leaves) one instruction at a time.
    pub(crate) fn debug_regs_changed(&mut self) {
        let mut exec = false;
        let mut data = false;
        let mut io = false;
        for n in 0..4 {
            match breakpoint(self.dr.dr7, &self.dr.db, n) {
                Some((BreakKind::Execute, ..)) => exec = true,
                Some((BreakKind::Write | BreakKind::ReadWrite, ..)) => data = true,
                Some((BreakKind::Io, ..)) => io = self.cr4 & CR4_DE != 0 || io,
                None => {}
            }
        }
        self.dr_exec = exec;
        self.dr_watch = data;
        self.dr_io = io;
        self.tlb.flush_all();
        self.end_block = true;
    }

    /// Is any breakpoint enabled (the run loop steps one instruction at a
    /// time)?
    #[inline(always)]
    pub(crate) fn debug_active(&self) -> bool {
        self.dr_exec | self.dr_watch | self.dr_io
    }

    /// Instruction breakpoints at linear address `lin` (DR6.B bits).
    pub(crate) fn exec_breakpoint_hits(&self, lin: u64) -> u64 {
        if !self.dr_exec {
            return 0;
        }
        (0..4)
            .filter(|&n| {
                matches!(breakpoint(self.dr.dr7, &self.dr.db, n),
                    Some((BreakKind::Execute, ..)) if self.dr.db[n] == lin)
            })
            .fold(0, |b, n| b | 1 << n)
    }

    /// TLB marks for the page at linear `page`: (reads, writes) watched.
    pub(crate) fn watched_page(&self, page: u64) -> (bool, bool) {
        if !self.dr_watch {
            return (false, false);
        }
        let mut r = false;
        let mut w = false;
        for n in 0..4 {
            if let Some((kind, a, len)) = breakpoint(self.dr.dr7, &self.dr.db, n) {
                let overlaps = a < page.wrapping_add(0x1000) && page < a.wrapping_add(len);
                match kind {
                    BreakKind::Write if overlaps => w = true,
                    BreakKind::ReadWrite if overlaps => (r, w) = (true, true),
                    _ => {}
                }
            }
        }
        (r, w)
    }

    /// A data access of `size` bytes at linear `lin` on a watched page:
    /// remember the watchpoints it touches.
    pub(crate) fn note_data_access(&mut self, lin: u64, size: usize, write: bool) {
        for n in 0..4 {
            if let Some((kind, a, len)) = breakpoint(self.dr.dr7, &self.dr.db, n) {
                let hit = match kind {
                    BreakKind::Write => write,
                    BreakKind::ReadWrite => true,
                    _ => false,
                };
                if hit && a < lin.wrapping_add(size as u64) && lin < a.wrapping_add(len) {
                    self.dr_hits |= 1 << n;
                }
            }
        }
    }

    /// An IN/OUT/INS/OUTS of `size` bytes at `port`: remember the I/O
    /// breakpoints it touches.
    pub(crate) fn note_io_access(&mut self, port: u16, size: usize) {
        if !self.dr_io {
            return;
        }
        let port = u64::from(port);
        for n in 0..4 {
            if let Some((BreakKind::Io, a, len)) = breakpoint(self.dr.dr7, &self.dr.db, n) {
                if a < port + size as u64 && port < a.wrapping_add(len) {
                    self.dr_hits |= 1 << n;
                }
            }
        }
    }

    /// DR6 for a #DB raised by breakpoints `bits` (B0–B3 replaced).
    pub(crate) fn report_breakpoints(&mut self, bits: u64) {
        self.dr.dr6 = (self.dr.dr6 & !DR6_B_MASK) | (bits & DR6_B_MASK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{Cpu, CR4_DE};
    use crate::flags::{RF, TF};
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    /// #DB handler: HLT here.
    const DB_HANDLER: u64 = 0x4000;
    /// #BP handler (INT3): HLT here.
    const BP_HANDLER: u64 = 0x5000;
    /// Data the tests watch.
    const DATA: u64 = 0x2010;

    /// A 64-bit interrupt gate for `vector` to `handler` (code selector 0x18).
    fn gate(c: &Cpu, vector: u8, handler: u64) {
        let lo =
            (handler & 0xffff) | (0x18 << 16) | (0x8e00 << 32) | (((handler >> 16) & 0xffff) << 48);
        let at = IDT + 16 * u64::from(vector);
        write_phys(c, at, &lo.to_le_bytes());
        write_phys(c, at + 8, &(handler >> 32).to_le_bytes());
    }

    /// Long mode with #DB and #BP handlers; `dr` = (DR0..DR3, DR7).
    fn prepare(c: &mut Cpu, db: [u64; 4], dr7: u64, rflags: u64) {
        gate(c, 1, DB_HANDLER);
        gate(c, 3, BP_HANDLER);
        write_phys(c, DB_HANDLER, &[0xf4]);
        write_phys(c, BP_HANDLER, &[0xf4]);
        let mut s = c.state();
        s.debug.db = db;
        s.debug.dr7 = dr7 | 0x400;
        s.regs.rflags |= rflags;
        s.regs.gpr[RBX] = DATA;
        c.set_state(&s);
    }

    /// Where a run ended: `Some((pushed RIP, pushed RFLAGS))` if the #DB
    /// handler ran, `None` if the code reached its own HLT.
    fn db_frame(c: &Cpu) -> Option<(u64, u64)> {
        (c.rip() == DB_HANDLER + 1).then(|| {
            (
                read_phys(c, c.gpr(RSP), 8),
                read_phys(c, c.gpr(RSP) + 16, 8),
            )
        })
    }

    fn dr7_for(n: usize, rw: u64, len: u64) -> u64 {
        let len_code = match len {
            1 => 0,
            2 => 1,
            8 => 2,
            _ => 3,
        };
        (1 << (2 * n)) | (rw << (16 + 4 * n)) | (len_code << (18 + 4 * n))
    }

    #[test]
    fn instruction_breakpoint_faults_before_the_instruction() {
        // nop ; inc eax (ff c0) ; hlt
        let code = [0x90, 0xff, 0xc0];
        for n in 0..4 {
            let mut db = [0u64; 4];
            db[n] = CODE + 1;
            let c = run(Mode::Long64, &code, |c| prepare(c, db, dr7_for(n, 0, 1), 0));
            let (rip, rflags) = db_frame(&c).expect("#DB");
            assert_eq!(rip, CODE + 1, "DR{n}");
            assert_eq!(rflags & RF, 0, "an instruction breakpoint pushes RF clear");
            assert_eq!(c.gpr(RAX), 0, "the instruction did not run");
            assert_eq!(c.state().debug.dr6 & 0xf, 1 << n);
        }
        // Disabled (L and G clear): no #DB.
        let c = run(Mode::Long64, &code, |c| {
            prepare(c, [CODE + 1, 0, 0, 0], 0, 0)
        });
        assert_eq!(db_frame(&c), None);
        // G0 alone enables it too.
        let c = run(Mode::Long64, &code, |c| {
            prepare(c, [CODE + 1, 0, 0, 0], 2, 0)
        });
        assert!(db_frame(&c).is_some());
    }

    #[test]
    fn rf_suppresses_one_instruction_breakpoint_and_clears() {
        // inc eax at CODE with RF set: runs; RF is clear afterwards.
        let code = [0xff, 0xc0, 0x90];
        let c = run(Mode::Long64, &code, |c| {
            prepare(c, [CODE, 0, 0, 0], dr7_for(0, 0, 1), RF)
        });
        assert_eq!(db_frame(&c), None);
        assert_eq!(c.gpr(RAX), 1);
        assert_eq!(c.rflags() & RF, 0);
        // The handler returns with RF set in the image (iretq): the
        // instruction runs once, no second #DB.
        // handler: or qword [rsp+16], 0x10000 (48 81 4c 24 10 00 00 01 00) ; iretq
        let c = run(Mode::Long64, &code, |c| {
            prepare(c, [CODE, 0, 0, 0], dr7_for(0, 0, 1), 0);
            write_phys(
                c,
                DB_HANDLER,
                &[
                    0x48, 0x81, 0x4c, 0x24, 0x10, 0x00, 0x00, 0x01, 0x00, 0x48, 0xcf,
                ],
            );
        });
        assert_eq!(c.rip(), CODE + 4, "ran to the final HLT");
        assert_eq!(c.gpr(RAX), 1);
        assert_eq!(c.rflags() & RF, 0);
    }

    /// Every watchpoint kind (write, read/write), length (1, 2, 4, 8) and
    /// register against reads and writes of every size at every offset
    /// around it: a #DB trap after the instruction exactly when the bytes
    /// overlap and the kind matches.
    #[test]
    fn data_watchpoints_every_kind_and_length() {
        let sizes: [(u64, [u8; 3], [u8; 3]); 4] = [
            // size, write [rbx] from rax, read [rbx] into rax (padded with nop)
            (1, [0x88, 0x03, 0x90], [0x8a, 0x03, 0x90]),
            (2, [0x66, 0x89, 0x03], [0x66, 0x8b, 0x03]),
            (4, [0x89, 0x03, 0x90], [0x8b, 0x03, 0x90]),
            (8, [0x48, 0x89, 0x03], [0x48, 0x8b, 0x03]),
        ];
        let mut checked = 0;
        for n in 0..4 {
            for len in [1u64, 2, 4, 8] {
                for rw in [1u64, 3] {
                    for &(size, wr, rd) in &sizes {
                        for (write, code) in [(true, wr), (false, rd)] {
                            for off in -8i64..=8 {
                                let addr = DATA.wrapping_add_signed(off);
                                let mut db = [0u64; 4];
                                // Low bits below the length are ignored.
                                db[n] = DATA | (len - 1);
                                let c = run(Mode::Long64, &code, |c| {
                                    prepare(c, db, dr7_for(n, rw, len), 0);
                                    c.set_gpr(RBX, addr);
                                });
                                let overlap = addr < DATA + len && DATA < addr + size;
                                let want = overlap && (write || rw == 3);
                                let got = db_frame(&c);
                                let what = format!(
                                    "DR{n} rw {rw} len {len}: {} of {size} at {off}",
                                    if write { "write" } else { "read" }
                                );
                                assert_eq!(got.is_some(), want, "{what}");
                                if want {
                                    let len = if code[2] == 0x90 { 2 } else { 3 };
                                    assert_eq!(got.unwrap().0, CODE + len, "{what}: a trap");
                                    assert_eq!(c.state().debug.dr6 & 0xf, 1 << n, "{what}");
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 4 * 2 * 4 * 2 * 17);
    }

    #[test]
    fn general_detect_faults_on_debug_register_access() {
        // mov rax, dr0 (0f 21 c0)
        let c = run(Mode::Long64, &[0x0f, 0x21, 0xc0], |c| {
            prepare(c, [0; 4], DR7_GD, 0)
        });
        let (rip, _) = db_frame(&c).expect("#DB");
        assert_eq!(rip, CODE, "a fault: RIP at the MOV");
        let s = c.state();
        assert_ne!(s.debug.dr6 & DR6_BD, 0);
        assert_eq!(s.debug.dr7 & DR7_GD, 0, "cleared on entry to the handler");
        // mov dr7, rax (0f 23 f8) too; without GD it just works.
        let c = run(Mode::Long64, &[0x0f, 0x23, 0xf8], |c| {
            prepare(c, [0; 4], DR7_GD, 0)
        });
        assert_eq!(db_frame(&c).map(|f| f.0), Some(CODE));
        let c = run(Mode::Long64, &[0x0f, 0x23, 0xf8], |c| {
            prepare(c, [0; 4], 0, 0);
            c.set_gpr(RAX, 0x401);
        });
        assert_eq!(db_frame(&c), None);
        assert_eq!(c.state().debug.dr7, 0x401);
    }

    #[test]
    fn single_step_and_watchpoint_in_one_debug_exception() {
        // mov [rbx], eax with TF and a write watchpoint on it: one #DB with
        // BS and B2.
        let c = run(Mode::Long64, &[0x89, 0x03], |c| {
            prepare(c, [0, 0, DATA, 0], dr7_for(2, 1, 4), TF)
        });
        let (rip, _) = db_frame(&c).expect("#DB");
        assert_eq!(rip, CODE + 2);
        let dr6 = c.state().debug.dr6;
        assert_eq!(dr6 & (DR6_BS | 0xf), DR6_BS | 4, "{dr6:#x}");
        // B0-B3 are replaced by the next breakpoint #DB, BS stays.
        let c = run(Mode::Long64, &[0x89, 0x03], |c| {
            prepare(c, [DATA, 0, 0, 0], dr7_for(0, 1, 4), 0);
            let mut s = c.state();
            s.debug.dr6 |= 0xe | DR6_BS;
            c.set_state(&s);
        });
        assert_eq!(c.state().debug.dr6 & (DR6_BS | 0xf), DR6_BS | 1);
    }

    /// Conditions that match breakpoints whose L/G bits are clear leave
    /// B0–B3 alone, in a single-step #DB and beside an enabled hit.
    #[test]
    fn breakpoints_not_enabled_set_no_b_bits() {
        // mov [rbx], eax with TF; DR0 an execute breakpoint on it and DR1 a
        // write watchpoint on the data, neither enabled (R/W and LEN set).
        let rw_len = (1u64 << 20) | (3 << 22); // DR1: write, 4 bytes
        let c = run(Mode::Long64, &[0x89, 0x03], |c| {
            prepare(c, [CODE, DATA, 0, 0], rw_len, TF)
        });
        assert!(db_frame(&c).is_some(), "single-step #DB");
        let dr6 = c.state().debug.dr6;
        assert_eq!(dr6 & (DR6_BS | DR6_BT | 0xf), DR6_BS, "{dr6:#x}");
        // An enabled DR2 on the same data: only B2, not B1.
        let c = run(Mode::Long64, &[0x89, 0x03], |c| {
            prepare(c, [CODE, DATA, DATA, 0], rw_len | dr7_for(2, 1, 4), 0)
        });
        assert!(db_frame(&c).is_some());
        assert_eq!(c.state().debug.dr6 & 0xf, 1 << 2);
    }

    #[test]
    fn mov_ss_defers_its_watchpoint_past_the_next_instruction() {
        // mov ss, [rbx] (8e 13) ; nop ; nop — watch [rbx] for reads.
        let c = run(Mode::Long64, &[0x8e, 0x13, 0x90, 0x90], |c| {
            prepare(c, [DATA, 0, 0, 0], dr7_for(0, 3, 2), 0);
            write_phys(c, DATA, &0x10u16.to_le_bytes());
        });
        let (rip, _) = db_frame(&c).expect("#DB");
        assert_eq!(rip, CODE + 3, "after the instruction in the shadow");
        assert_eq!(c.state().debug.dr6 & 0xf, 1);
        // mov ss, [rbx] ; int3: the #BP is delivered, then the #DB at the
        // first instruction of the #BP handler (in ring 0).
        for next in [&[0xcc][..], &[0xf1][..]] {
            let c = run(Mode::Long64, &[&[0x8e, 0x13][..], next].concat(), |c| {
                prepare(c, [DATA, 0, 0, 0], dr7_for(0, 3, 2), 0);
                gate(c, 1, DB_HANDLER);
                write_phys(c, DATA, &0x10u16.to_le_bytes());
            });
            let (rip, _) = db_frame(&c).expect("#DB");
            let handler = if next == [0xcc] {
                BP_HANDLER
            } else {
                DB_HANDLER
            };
            assert_eq!(rip, handler, "{next:x?}");
            assert_eq!(c.state().debug.dr6 & 0xf, 1);
        }
        // An instruction breakpoint on the instruction in the shadow is
        // not taken.
        let c = run(Mode::Long64, &[0x8e, 0x13, 0x90], |c| {
            prepare(c, [CODE + 2, 0, 0, 0], dr7_for(0, 0, 1), 0);
            write_phys(c, DATA, &0x10u16.to_le_bytes());
        });
        assert_eq!(db_frame(&c), None);
    }

    #[test]
    fn io_breakpoints_need_cr4_de() {
        // out 0x80, al (e6 80)
        for de in [false, true] {
            let c = run(Mode::Long64, &[0xe6, 0x80], |c| {
                prepare(c, [0x80, 0, 0, 0], dr7_for(0, 2, 1), 0);
                if de {
                    let mut s = c.state();
                    s.sregs.cr4 |= CR4_DE;
                    c.set_state(&s);
                }
            });
            assert_eq!(db_frame(&c).map(|f| f.0), de.then_some(CODE + 2));
        }
    }

    #[test]
    fn rep_string_traps_after_the_iteration_that_hits() {
        // rep stosb (f3 aa) over 32 bytes from DATA - 8; watch DATA + 4.
        let c = run(Mode::Long64, &[0xf3, 0xaa], |c| {
            prepare(c, [DATA + 4, 0, 0, 0], dr7_for(0, 1, 1), 0);
            c.set_gpr(RDI, DATA - 8);
            c.set_gpr(RCX, 32);
        });
        let (rip, _) = db_frame(&c).expect("#DB");
        assert_eq!(rip, CODE, "RIP stays at the REP instruction");
        assert_eq!(c.gpr(RCX), 32 - 13);
        assert_eq!(c.gpr(RDI), DATA + 5);
    }
}
