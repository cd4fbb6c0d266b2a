//! Event delivery: exceptions, external interrupts, NMIs and software
//! interrupts through the IVT (real mode) or the IDT (protected and long
//! mode), with stack switches, IST, the #DF rules and triple fault; and IRET.

use crate::cpu::{sreg, Cpu};
use crate::exception::{self, Class, Exception, XResult};
use crate::flags;
use crate::platform::Platform;
use crate::segment::{is_code, parse_descriptor};
use crate::state::Segment;

/// What kind of event is being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A fault or trap raised by an instruction (or by delivery itself).
    Exception,
    /// An external (maskable) interrupt.
    External,
    /// A non-maskable interrupt.
    Nmi,
    /// `INT n`: gate DPL checked against CPL, EXT = 0.
    Software,
    /// `INT3` / `INTO`: software exceptions, gate DPL checked.
    SoftException,
    /// `INT1` (ICEBP): no DPL check.
    Icebp,
}

impl EventKind {
    fn ext(self) -> u32 {
        match self {
            EventKind::Software | EventKind::SoftException | EventKind::Icebp => 0,
            _ => 1,
        }
    }
    fn dpl_checked(self) -> bool {
        matches!(self, EventKind::Software | EventKind::SoftException)
    }
}

/// Is `vector` a fault (RIP points at the faulting instruction, RF pushed set)?
fn is_fault(vector: u8) -> bool {
    use exception::*;
    matches!(
        vector,
        DE | BR | UD | NM | TS | NP | SS | GP | PF | MF | AC | XM
    )
}

impl Cpu {
    /// Deliver exception `exc` raised by the current instruction (RIP at the
    /// instruction for faults, after it for traps), applying the double-fault
    /// rules. A triple fault sets `triple_fault`.
    pub(crate) fn raise(&mut self, p: &mut dyn Platform, exc: Exception) {
        log::debug!(
            "interpreter: {exc} at {:04x}:{:#x} (cr2 {:#x})",
            self.seg[sreg::CS].selector,
            self.rip,
            self.cr2
        );
        self.deliver_with_nesting(p, exc, EventKind::Exception);
    }

    /// Deliver any event, handling faults raised during its delivery.
    pub(crate) fn deliver_with_nesting(
        &mut self,
        p: &mut dyn Platform,
        first: Exception,
        kind: EventKind,
    ) {
        let mut cur = first;
        let mut cur_kind = kind;
        // At most: original, (serial benign), #DF, then shutdown.
        for _ in 0..4 {
            let Err(second) = self.deliver(p, cur.vector, cur.error_code, cur_kind) else {
                return;
            };
            let c1 = if cur_kind == EventKind::Exception {
                Exception::class(cur.vector)
            } else {
                Class::Benign
            };
            let c2 = Exception::class(second.vector);
            if c1 == Class::DoubleFault {
                self.triple_fault = true;
                return;
            }
            let double = (c1 == Class::Contributory && c2 == Class::Contributory)
                || (c1 == Class::PageFault && matches!(c2, Class::Contributory | Class::PageFault));
            cur = if double {
                Exception::with_code(exception::DF, 0)
            } else {
                second
            };
            cur_kind = EventKind::Exception;
        }
        self.triple_fault = true;
    }

    /// Deliver one event. `Err` is a fault raised during delivery; no
    /// register has changed then.
    pub(crate) fn deliver(
        &mut self,
        p: &mut dyn Platform,
        vector: u8,
        error_code: Option<u32>,
        kind: EventKind,
    ) -> XResult<()> {
        self.events.halted = false;
        self.deliveries = self.deliveries.wrapping_add(1);
        let r = if !self.protected() {
            self.deliver_real(p, vector)
        } else if self.long_mode() {
            self.deliver_long(p, vector, error_code, kind)
        } else {
            self.deliver_protected(p, vector, error_code, kind)
        };
        if r.is_ok() {
            self.end_block = true;
            if vector == exception::DB && kind != EventKind::Software {
                // Entering the #DB handler clears general detect, so the
                // handler can use the debug registers.
                self.dr.dr7 &= !crate::debug::DR7_GD;
            }
        }
        r
    }

    fn pushed_flags(&self, vector: u8, kind: EventKind) -> u64 {
        let f = self.flags.get();
        if kind == EventKind::Exception && is_fault(vector) {
            f | flags::RF
        } else {
            f
        }
    }

    fn deliver_real(&mut self, p: &mut dyn Platform, vector: u8) -> XResult<()> {
        let off = u64::from(vector) * 4;
        if off + 3 > u64::from(self.idtr.limit) {
            return Err(Exception::gp(u32::from(vector) * 8 + 2));
        }
        let ent = self.read_lin(p, self.idtr.base.wrapping_add(off) & 0xffff_ffff, 4, false)?;
        let f = self.flags.get();
        let cs = u64::from(self.seg[sreg::CS].selector);
        let ip = self.rip & 0xffff;
        let sp = self.push_values(p, &[f & 0xffff, cs, ip], 2)?;
        self.set_sp(sp);
        self.flags.set_bit(flags::IF, false);
        self.flags.set_bit(flags::TF, false);
        self.flags.set_bit(flags::AC, false);
        self.flags.set_bit(flags::RF, false);
        self.load_cs_real((ent >> 16) as u16);
        self.rip = ent & 0xffff;
        Ok(())
    }

    /// Push `vals` (each `size` bytes) on the current stack, checking every
    /// slot before anything is written. Returns the new stack pointer
    /// (already masked to the stack width); the caller commits it.
    pub(crate) fn push_values(
        &mut self,
        p: &mut dyn Platform,
        vals: &[u64],
        size: usize,
    ) -> XResult<u64> {
        let ss = self.seg[sreg::SS];
        let wide = self.stack_width();
        let mut sp = self.gpr[crate::state::gpr::RSP];
        let user = self.user();
        // ENTER with nesting level 31 pushes 32 values, the most of anyone.
        let mut lins = [0u64; 32];
        debug_assert!(vals.len() <= lins.len());
        for (k, _) in vals.iter().enumerate().take(lins.len()) {
            sp = sp.wrapping_sub(size as u64) & wide;
            lins[k] = self.stack_linear(&ss, sp, size, self.bits == 64)?;
            self.probe_lin_write(p, lins[k], size, user)?;
        }
        for (&lin, &v) in lins.iter().zip(vals) {
            self.write_lin(p, lin, size, v, user)?;
        }
        Ok(sp)
    }

    /// Mask of the stack pointer's width: SS.B in legacy modes, 64 in 64-bit.
    #[inline(always)]
    pub(crate) fn stack_width(&self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else if self.seg[sreg::SS].db {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    /// Set the stack pointer respecting its width (16-bit SP merges).
    #[inline(always)]
    pub(crate) fn set_sp(&mut self, v: u64) {
        let w = self.stack_width();
        let rsp = &mut self.gpr[crate::state::gpr::RSP];
        *rsp = (*rsp & !w) | (v & w);
        if w == 0xffff_ffff {
            *rsp = v & w;
        }
    }

    /// Linear address of a stack slot in segment `ss` (which may not be the
    /// current SS, during a stack switch).
    pub(crate) fn stack_linear(
        &self,
        ss: &Segment,
        off: u64,
        size: usize,
        mode64: bool,
    ) -> XResult<u64> {
        if mode64 {
            if !crate::segment::canonical(off)
                || !crate::segment::canonical(off.wrapping_add(size as u64 - 1))
            {
                return Err(Exception::ss(0));
            }
            return Ok(off);
        }
        let last = off.wrapping_add(size as u64 - 1);
        if self.protected() && !self.vm86() && ss.type_ & 0xc == 0x4 {
            let upper: u64 = if ss.db { 0xffff_ffff } else { 0xffff };
            if off <= u64::from(ss.limit) || last > upper {
                return Err(Exception::ss(0));
            }
        } else if last > u64::from(ss.limit) || last < off {
            return Err(Exception::ss(0));
        }
        Ok(ss.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Read the gate for `vector` and the code segment it names; common to
    /// protected and long mode. Returns (gate type, gate dpl, selector,
    /// offset, ist, code descriptor, raw descriptor).
    fn read_gate(&mut self, p: &mut dyn Platform, vector: u8, kind: EventKind) -> XResult<Gate> {
        let ext = kind.ext();
        let idt_err = u32::from(vector) * 8 + 2 + ext;
        let long = self.long_mode();
        let gsize: u64 = if long { 16 } else { 8 };
        let off = u64::from(vector) * gsize;
        if off + gsize - 1 > u64::from(self.idtr.limit) {
            return Err(Exception::gp(idt_err));
        }
        let base = self.idtr.base.wrapping_add(off);
        let lo = self.read_lin(p, base & self.lin_mask(), 8, false)?;
        let hi = if long {
            self.read_lin(p, base.wrapping_add(8) & self.lin_mask(), 8, false)?
        } else {
            0
        };
        let gtype = ((lo >> 40) & 0x1f) as u8;
        let ok = if long {
            matches!(gtype, 0xe | 0xf)
        } else {
            matches!(gtype, 0x5 | 0x6 | 0x7 | 0xe | 0xf)
        };
        if !ok {
            return Err(Exception::gp(idt_err));
        }
        let dpl = ((lo >> 45) & 3) as u8;
        if kind.dpl_checked() && dpl < self.cpl {
            return Err(Exception::gp(idt_err));
        }
        if lo & (1 << 47) == 0 {
            return Err(Exception::np(idt_err));
        }
        if gtype == 0x5 {
            log::warn!("interpreter: task gate for vector {vector} is not supported");
            return Err(Exception::gp(idt_err));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let mut offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if long {
            offset |= (hi & 0xffff_ffff) << 32;
        } else if gtype & 8 == 0 {
            offset &= 0xffff;
        }
        if sel & !3 == 0 {
            return Err(Exception::gp(ext));
        }
        let raw = self
            .read_descriptor(p, sel)
            .map_err(|_| Exception::gp(u32::from(sel & !3) + ext))?;
        let d = parse_descriptor(raw);
        let serr = u32::from(sel & !3) + ext;
        if !is_code(&d) || d.dpl > self.cpl {
            return Err(Exception::gp(serr));
        }
        if !d.present {
            return Err(Exception::np(serr));
        }
        if long && (!d.l || d.db) {
            return Err(Exception::gp(serr));
        }
        Ok(Gate {
            gtype,
            sel,
            offset,
            ist: (lo >> 32) as u8 & 7,
            code: d,
            raw,
        })
    }

    fn deliver_protected(
        &mut self,
        p: &mut dyn Platform,
        vector: u8,
        error_code: Option<u32>,
        kind: EventKind,
    ) -> XResult<()> {
        let g = self.read_gate(p, vector, kind)?;
        let ext = kind.ext();
        let size = if g.gtype & 8 != 0 { 4 } else { 2 };
        let conforming = g.code.type_ & 4 != 0;
        let new_cpl = if conforming { self.cpl } else { g.code.dpl };
        let old_flags = self.pushed_flags(vector, kind);
        let old_cs = u64::from(self.seg[sreg::CS].selector);
        let old_ip = self.rip;
        let vm86 = self.vm86();
        let err = error_code.filter(|_| kind == EventKind::Exception);

        if new_cpl < self.cpl {
            // Inner privilege: new stack from the TSS.
            if vm86 && new_cpl != 0 {
                return Err(Exception::gp(u32::from(g.sel & !3) + ext));
            }
            let (new_ss_sel, new_sp) = self.tss_stack(p, new_cpl)?;
            let new_ss = self.check_stack_descriptor(p, new_ss_sel, new_cpl, true)?;
            let old_ss = u64::from(self.seg[sreg::SS].selector);
            let old_sp = self.gpr[crate::state::gpr::RSP];
            let mut frame: Vec<u64> = Vec::with_capacity(10);
            if vm86 {
                for s in [sreg::GS, sreg::FS, sreg::DS, sreg::ES] {
                    frame.push(u64::from(self.seg[s].selector));
                }
            }
            frame.extend_from_slice(&[old_ss, old_sp, old_flags, old_cs, old_ip]);
            if let Some(e) = err {
                frame.push(u64::from(e));
            }
            let wide: u64 = if new_ss.db { 0xffff_ffff } else { 0xffff };
            // Build the frame on the new stack with the new privilege.
            let user = new_cpl == 3;
            let mut sp = new_sp;
            let mut lins = Vec::with_capacity(frame.len());
            for _ in &frame {
                sp = sp.wrapping_sub(size as u64) & wide;
                let lin = self.stack_linear(&new_ss, sp, size, false)?;
                self.probe_lin_write(p, lin, size, user)?;
                lins.push(lin);
            }
            for (k, v) in frame.iter().enumerate() {
                self.write_lin(p, lins[k], size, *v, user)?;
            }
            // Commit.
            self.seg[sreg::SS] = new_ss;
            let rsp = &mut self.gpr[crate::state::gpr::RSP];
            *rsp = if wide == 0xffff {
                (*rsp & !0xffff) | sp
            } else {
                sp
            };
            if vm86 {
                for s in [sreg::GS, sreg::FS, sreg::DS, sreg::ES] {
                    self.seg[s] = Segment {
                        unusable: true,
                        ..Default::default()
                    };
                }
            }
        } else {
            if vm86 {
                return Err(Exception::gp(u32::from(g.sel & !3) + ext));
            }
            let mut frame = vec![old_flags, old_cs, old_ip];
            if let Some(e) = err {
                frame.push(u64::from(e));
            }
            let sp = self.push_values(p, &frame, size)?;
            self.set_sp(sp);
        }
        if g.offset > u64::from(g.code.limit) {
            return Err(Exception::gp(ext));
        }
        self.flags.set_bit(flags::TF, false);
        self.flags.set_bit(flags::NT, false);
        self.flags.set_bit(flags::VM, false);
        self.flags.set_bit(flags::RF, false);
        if g.gtype & 1 == 0 {
            self.flags.set_bit(flags::IF, false);
        }
        self.commit_cs(p, g.sel, g.code, g.raw, new_cpl)?;
        self.rip = g.offset;
        Ok(())
    }

    /// The stack for privilege `cpl` from the current 32- or 16-bit TSS.
    fn tss_stack(&mut self, p: &mut dyn Platform, cpl: u8) -> XResult<(u16, u64)> {
        let tr = self.tr;
        let terr = u32::from(tr.selector & !3);
        let is32 = tr.type_ & 8 != 0;
        let (sp_off, ss_off, sp_size) = if is32 {
            (4 + u64::from(cpl) * 8, 8 + u64::from(cpl) * 8, 4)
        } else {
            (2 + u64::from(cpl) * 4, 4 + u64::from(cpl) * 4, 2)
        };
        if ss_off + 1 > u64::from(tr.limit) {
            return Err(Exception::ts(terr));
        }
        let sp = self.read_lin(
            p,
            tr.base.wrapping_add(sp_off) & 0xffff_ffff,
            sp_size,
            false,
        )?;
        let ss = self.read_lin(p, tr.base.wrapping_add(ss_off) & 0xffff_ffff, 2, false)? as u16;
        Ok((ss, sp))
    }

    fn deliver_long(
        &mut self,
        p: &mut dyn Platform,
        vector: u8,
        error_code: Option<u32>,
        kind: EventKind,
    ) -> XResult<()> {
        let g = self.read_gate(p, vector, kind)?;
        let conforming = g.code.type_ & 4 != 0;
        let new_cpl = if conforming { self.cpl } else { g.code.dpl };
        let terr = u32::from(self.tr.selector & !3);
        let mut rsp = if new_cpl < self.cpl || g.ist != 0 {
            let off = if g.ist != 0 {
                0x24 + (u64::from(g.ist) - 1) * 8
            } else {
                4 + u64::from(new_cpl) * 8
            };
            if off + 7 > u64::from(self.tr.limit) {
                return Err(Exception::ts(terr));
            }
            self.read_lin(p, self.tr.base.wrapping_add(off), 8, false)?
        } else {
            self.gpr[crate::state::gpr::RSP]
        };
        if new_cpl < self.cpl && g.ist == 0 && !crate::segment::canonical(rsp) {
            return Err(Exception::ss(0));
        }
        rsp &= !0xf;
        let mut frame = vec![
            u64::from(self.seg[sreg::SS].selector),
            self.gpr[crate::state::gpr::RSP],
            self.pushed_flags(vector, kind),
            u64::from(self.seg[sreg::CS].selector),
            self.rip,
        ];
        if let Some(e) = error_code.filter(|_| kind == EventKind::Exception) {
            frame.push(u64::from(e));
        }
        let user = new_cpl == 3;
        let mut lins = Vec::with_capacity(frame.len());
        for _ in &frame {
            rsp = rsp.wrapping_sub(8);
            if !crate::segment::canonical(rsp) {
                return Err(Exception::ss(0));
            }
            self.probe_lin_write(p, rsp, 8, user)?;
            lins.push(rsp);
        }
        if !crate::segment::canonical(g.offset) {
            return Err(Exception::gp(kind.ext()));
        }
        for (k, v) in frame.iter().enumerate() {
            self.write_lin(p, lins[k], 8, *v, user)?;
        }
        if new_cpl < self.cpl {
            // SS becomes a null selector with RPL = new CPL.
            self.seg[sreg::SS] = Segment {
                selector: u16::from(new_cpl),
                unusable: true,
                dpl: new_cpl,
                db: true,
                ..Default::default()
            };
        }
        self.gpr[crate::state::gpr::RSP] = rsp;
        self.flags.set_bit(flags::TF, false);
        self.flags.set_bit(flags::NT, false);
        self.flags.set_bit(flags::VM, false);
        self.flags.set_bit(flags::RF, false);
        if g.gtype & 1 == 0 {
            self.flags.set_bit(flags::IF, false);
        }
        self.commit_cs(p, g.sel, g.code, g.raw, new_cpl)?;
        self.rip = g.offset;
        Ok(())
    }

    /// IRET / IRETD / IRETQ with operand size `size` (2, 4, 8).
    pub(crate) fn iret(&mut self, p: &mut dyn Platform, size: usize) -> XResult<()> {
        self.events.nmi_masked = false;
        if !self.protected() {
            return self.iret_real(p, size, false);
        }
        if self.vm86() {
            if self.flags.iopl() < 3 {
                return Err(Exception::gp0());
            }
            return self.iret_real(p, size, true);
        }
        if self.flags.test(flags::NT) && !self.long_mode() {
            log::warn!("interpreter: IRET with NT (task return) is not supported");
            return Err(Exception::gp0());
        }
        let ss = self.seg[sreg::SS];
        let w = self.stack_width();
        let sp0 = self.gpr[crate::state::gpr::RSP];
        let mode64 = self.bits == 64;
        let frame = Frame {
            ss,
            sp0,
            w,
            size,
            mode64,
        };
        let pop = |cpu: &mut Cpu, p: &mut dyn Platform, k: u64| cpu.frame_read(p, &frame, k);
        let new_ip = pop(self, p, 0)?;
        let new_cs = pop(self, p, 1)? as u16;
        let new_flags = pop(self, p, 2)?;
        let new_flags = if size == 2 {
            (self.flags.get() & !0xffff) | (new_flags & 0xffff)
        } else {
            new_flags
        };
        if new_flags & flags::VM != 0 && self.cpl == 0 && size == 4 && !self.long_mode() {
            // Return to virtual-8086 mode.
            let mut vals = [0u64; 6];
            for (k, v) in vals.iter_mut().enumerate() {
                *v = pop(self, p, 3 + k as u64)?;
            }
            let (nsp, nss, nes, nds, nfs, ngs) =
                (vals[0], vals[1], vals[2], vals[3], vals[4], vals[5]);
            self.flags.set(new_flags);
            self.cpl = 3;
            for (s, v) in [
                (sreg::ES, nes),
                (sreg::DS, nds),
                (sreg::FS, nfs),
                (sreg::GS, ngs),
                (sreg::SS, nss),
            ] {
                self.load_sreg(p, s, v as u16)?;
            }
            self.gpr[crate::state::gpr::RSP] = nsp & 0xffff;
            self.load_cs_real(new_cs);
            self.rip = new_ip & 0xffff;
            return Ok(());
        }
        let (d, raw) = self.check_code_descriptor(p, new_cs, true)?;
        let rpl = (new_cs & 3) as u8;
        let mut new_sp = sp0.wrapping_add(3 * size as u64) & w;
        let outer = rpl > self.cpl;
        let mut new_ss_seg = None;
        if outer || mode64 {
            let nsp = pop(self, p, 3)?;
            let nss = pop(self, p, 4)? as u16;
            let s = if nss & !3 == 0 && self.long_mode() && d.l && rpl != 3 {
                Segment {
                    selector: nss,
                    unusable: true,
                    dpl: rpl,
                    db: true,
                    ..Default::default()
                }
            } else {
                self.check_stack_descriptor(p, nss, rpl, false)?
            };
            new_ss_seg = Some(s);
            new_sp = nsp;
        }
        if !self.long_mode() || !d.l {
            if new_ip > u64::from(d.limit) {
                return Err(Exception::gp0());
            }
        } else if !crate::segment::canonical(new_ip) {
            return Err(Exception::gp0());
        }
        // Flags: IOPL only at CPL 0, IF only when CPL <= IOPL; VIF/VIP as is.
        let mut mask =
            flags::ARITH | flags::TF | flags::DF | flags::NT | flags::RF | flags::AC | flags::ID;
        if self.cpl <= self.flags.iopl() {
            mask |= flags::IF;
        }
        if self.cpl == 0 {
            mask |= flags::IOPL | flags::VIF | flags::VIP;
        }
        if size == 2 {
            mask &= 0xffff;
        }
        let f = (self.flags.get() & !mask) | (new_flags & mask);
        self.commit_cs(p, new_cs, d, raw, rpl)?;
        self.flags.set(f);
        match new_ss_seg {
            Some(s) => {
                self.seg[sreg::SS] = s;
                if self.bits == 64 || s.db {
                    self.gpr[crate::state::gpr::RSP] = if self.bits == 64 {
                        new_sp
                    } else {
                        new_sp & 0xffff_ffff
                    };
                } else {
                    let r = &mut self.gpr[crate::state::gpr::RSP];
                    *r = (*r & !0xffff) | (new_sp & 0xffff);
                }
            }
            None => self.set_sp(new_sp),
        }
        if outer {
            // Data segments not accessible at the new privilege become null.
            for s in [sreg::ES, sreg::DS, sreg::FS, sreg::GS] {
                let seg = self.seg[s];
                let conforming_code = is_code(&seg) && seg.type_ & 4 != 0;
                if !seg.unusable && seg.dpl < rpl && !conforming_code {
                    self.seg[s].selector = 0;
                    self.seg[s].unusable = true;
                }
            }
        }
        self.rip = if self.bits == 64 {
            new_ip
        } else {
            new_ip & 0xffff_ffff
        };
        self.update_mode();
        Ok(())
    }

    fn iret_real(&mut self, p: &mut dyn Platform, size: usize, vm86: bool) -> XResult<()> {
        let ss = self.seg[sreg::SS];
        let w = self.stack_width();
        let sp0 = self.gpr[crate::state::gpr::RSP];
        let mut vals = [0u64; 3];
        for (k, v) in vals.iter_mut().enumerate() {
            let off = sp0.wrapping_add((k * size) as u64) & w;
            let lin = self.stack_linear(&ss, off, size, false)?;
            let user = self.user();
            *v = self.read_lin(p, lin, size, user)?;
        }
        let [ip, cs, f] = vals;
        if ip > u64::from(self.seg[sreg::CS].limit) && !vm86 {
            return Err(Exception::gp0());
        }
        let mut mask = flags::ARITH
            | flags::TF
            | flags::IF
            | flags::DF
            | flags::NT
            | flags::AC
            | flags::ID
            | flags::RF;
        if !vm86 {
            mask |= flags::IOPL;
        }
        if size == 2 {
            mask &= 0xffff;
        }
        let nf = (self.flags.get() & !mask) | (f & mask);
        self.set_sp(sp0.wrapping_add(3 * size as u64));
        self.flags.set(nf);
        self.load_cs_real(cs as u16);
        self.rip = ip & if size == 2 { 0xffff } else { 0xffff_ffff };
        Ok(())
    }
}

/// The stack a return frame is read from.
struct Frame {
    ss: Segment,
    sp0: u64,
    w: u64,
    size: usize,
    mode64: bool,
}

impl Cpu {
    /// Read slot `k` of a return frame.
    fn frame_read(&mut self, p: &mut dyn Platform, f: &Frame, k: u64) -> XResult<u64> {
        let off = f.sp0.wrapping_add(k * f.size as u64) & f.w;
        let lin = self.stack_linear(&f.ss, off, f.size, f.mode64)?;
        let user = self.user();
        self.read_lin(p, lin, f.size, user)
    }
}

struct Gate {
    gtype: u8,
    sel: u16,
    offset: u64,
    ist: u8,
    code: Segment,
    raw: u64,
}
