//! `irq-boundary`: an interrupt the guest makes deliverable by its own
//! action is taken at the very next instruction boundary (after the
//! one-instruction shadow of STI), never some instructions later. (The
//! STI/MOV SS shadows, POPF/IRET setting IF and MOV to CR8 are covered by
//! the interpreter's unit tests: KVM on hosts that emulate ring 0 reports
//! an interrupt window late and does not exit on a MOV to CR8, so a guest
//! cannot check them on both backends.)
//!
//! In 64-bit long mode, with the PICs masked and the local APIC enabled,
//! first in xAPIC mode (registers in the MMIO page) and then in x2APIC mode
//! (the same registers as MSRs), the guest:
//!
//! 1. executes `sti`, sends itself vector 0x21 through the ICR with the
//!    destination shorthand "self", runs a short busy loop and `cli`;
//! 2. the same with vector 0x22, physical destination = its own APIC ID;
//! 3. with interrupts enabled raises the TPR to 0x40, sends itself 0x31
//!    (priority class 3, held back by the TPR) and 0x61 (class 6): exactly
//!    0x61 must arrive, right after its ICR write, and nothing during a
//!    busy loop; then it lowers the TPR to 0 and 0x31 must arrive right
//!    after that write;
//!
//! Every handler logs its vector and the return RIP of its interrupt frame
//! (the boundary where the interrupt was taken) and writes EOI; the main
//! code compares each RIP with the address of the instruction right after
//! the action that made the interrupt deliverable.
//!
//! Memory map: as [`super::self_ipi`] (code16 at 0x7c00, code64 at
//! 0x9000, data at 0xa000, IDT at 0xb000, APIC pages mapped by the PD at
//! 0xc000).

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "irq-boundary";
pub const DESCRIPTION: &str =
    "64-bit long mode: self-IPIs, TPR/CR8 and STI taken at the exact instruction boundary (xAPIC and x2APIC)";

/// Shorthand-self IPI.
pub const VECTOR_SELF: u8 = 0x21;
/// Physical-destination IPI.
pub const VECTOR_PHYSICAL: u8 = 0x22;
/// Below the TPR (class 3 under TPR 0x40), then above it.
pub const VECTOR_LOW: u8 = 0x31;
/// Above the TPR (class 6).
pub const VECTOR_HIGH: u8 = 0x61;

/// Iterations of each busy loop (two instructions each).
const BUSY_LOOP: u32 = 200;
/// Log capacity (interrupts per phase).
const LOG_SLOTS: u32 = 8;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EXTD: u32 = 1 << 10;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("irq-boundary guest assembles")
}

/// How the guest reaches its local APIC.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ApicMode {
    Xapic,
    X2apic,
}

impl ApicMode {
    fn name(self) -> &'static str {
        match self {
            ApicMode::Xapic => "xAPIC",
            ApicMode::X2apic => "x2APIC",
        }
    }
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    unexpected: u32,
    line_end: u32,
    taken: u32,
    late: u32,
    late_end: u32,
    after_icr: u32,
    after_tpr: u32,
    done: u32,
    /// Per-mode phase titles: [mode][phase].
    titles: [[u32; 4]; 2],
    /// x2APIC mode on (the handler's EOI path).
    x2apic: u32,
    apic_id: u32,
    /// Interrupts logged in the current phase.
    count: u32,
    log_vector: u32,
    log_rip: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let mut titles = [[0u32; 4]; 2];
    for (m, mode) in [ApicMode::Xapic, ApicMode::X2apic].into_iter().enumerate() {
        let n = mode.name();
        let texts = [
            format!("irq-boundary: {n}: sti; ICR self-IPI {VECTOR_SELF:#04x} (shorthand self); busy loop; cli: "),
            format!("irq-boundary: {n}: sti; ICR self-IPI {VECTOR_PHYSICAL:#04x} (physical, own APIC ID); busy loop; cli: "),
            format!("irq-boundary: {n}: sti; TPR 0x40; self-IPI {VECTOR_LOW:#04x} (held back by the TPR), then {VECTOR_HIGH:#04x}; busy loop: "),
            format!("irq-boundary: {n}: TPR 0x00; busy loop; cli: "),
        ];
        for (k, t) in texts.iter().enumerate() {
            titles[m][k] = data.cstr(t);
        }
    }
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("irq-boundary: 64-bit long mode, local APIC enabled; each line: interrupts taken, vector and where\r\n"),
        unexpected: data.cstr("irq-boundary: unexpected interrupt or exception, stopping\r\n"),
        line_end: data.cstr("\r\n"),
        taken: data.cstr(" taken:"),
        late: data.cstr(" LATE (taken at rip 0x"),
        late_end: data.cstr(")"),
        after_icr: data.cstr(" right after the ICR write"),
        after_tpr: data.cstr(" right after the TPR write"),
        done: data.cstr("irq-boundary: done\r\n"),
        titles,
        x2apic: data.zeroed(4, 4),
        apic_id: data.zeroed(4, 4),
        count: data.zeroed(4, 4),
        log_vector: data.zeroed(4 * LOG_SLOTS as usize, 4),
        log_rip: data.zeroed(8 * LOG_SLOTS as usize, 8),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

/// Write APIC register `reg` (xAPIC offset) with EAX (and EDX: the high
/// half of the x2APIC ICR). The write is the last instruction emitted.
/// Clobbers ECX (x2APIC) or EDX (xAPIC: do not pass a high half).
fn apic_write_eax(a: &mut CodeAssembler, mode: ApicMode, reg: u32) -> Result<(), IcedError> {
    match mode {
        ApicMode::Xapic => {
            a.mov(edx, apic::LAPIC_BASE)?;
            a.mov(dword_ptr(rdx + reg), eax)
        }
        ApicMode::X2apic => {
            a.mov(ecx, 0x800 + (reg >> 4))?;
            a.wrmsr()
        }
    }
}

/// `apic_write_eax` of a constant (high half 0).
fn apic_write(a: &mut CodeAssembler, mode: ApicMode, reg: u32, v: u32) -> Result<(), IcedError> {
    a.mov(eax, v)?;
    if mode == ApicMode::X2apic {
        a.xor(edx, edx)?;
    }
    apic_write_eax(a, mode, reg)
}

/// ICR low: fixed delivery, physical, edge, assert, with `shorthand`.
const fn icr(shorthand: u32, vector: u8) -> u32 {
    shorthand | apic::ICR_ASSERT | vector as u32
}

fn busy_loop(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut again = a.create_label();
    a.mov(ecx, BUSY_LOOP)?;
    a.set_label(&mut again)?;
    a.dec(ecx)?;
    a.jnz(again)
}

/// The reporting subroutines.
struct Report {
    /// Print the title at ESI, the count of the log and " taken:".
    begin: CodeLabel,
    /// R12 = slot, R13 = expected RIP, R14 = "where" text: print
    /// " 0x<vector>" and the text, or that it came late and where.
    slot: CodeLabel,
}

impl Report {
    fn phase(
        &self,
        a: &mut CodeAssembler,
        title: u32,
        expected: &[(CodeLabel, u32)],
        d: &Data,
        routines: &Routines,
    ) -> Result<(), IcedError> {
        a.mov(esi, title)?;
        a.call(self.begin)?;
        for (k, (label, text)) in expected.iter().enumerate() {
            a.mov(r12d, k as u32)?;
            a.lea(r13, ptr(*label))?;
            a.mov(r14d, *text)?;
            a.call(self.slot)?;
        }
        routines.print(a, d.line_end)
    }
}

fn clear_log(a: &mut CodeAssembler, d: &Data) -> Result<(), IcedError> {
    a.mov(dword_ptr(d.count), 0)?;
    a.mov(dword_ptr(d.log_vector), 0)?;
    a.mov(dword_ptr(d.log_vector + 4), 0)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut common = a.create_label();
    let mut report = Report {
        begin: a.create_label(),
        slot: a.create_label(),
    };
    let mut stubs: Vec<(CodeLabel, u8)> = [VECTOR_SELF, VECTOR_PHYSICAL, VECTOR_LOW, VECTOR_HIGH]
        .into_iter()
        .map(|v| (a.create_label(), v))
        .collect();

    asm::emit_load_flat_segments(&mut a)?;
    let gates = stubs.iter().map(|&(label, vector)| (vector, label));
    idt.emit_load(&mut a, d.idtr, Some(unexpected), gates)?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;
    apic::lapic_read(&mut a, apic::ID)?;
    a.shr(eax, 24)?;
    a.mov(dword_ptr(d.apic_id), eax)?;
    routines.print(&mut a, d.header)?;

    for (m, mode) in [ApicMode::Xapic, ApicMode::X2apic].into_iter().enumerate() {
        if mode == ApicMode::X2apic {
            // IA32_APIC_BASE.EXTD: x2APIC mode (the APIC ID stays).
            a.mov(ecx, MSR_APIC_BASE)?;
            a.rdmsr()?;
            a.or(eax, APIC_BASE_EXTD as i32)?;
            a.wrmsr()?;
            a.mov(dword_ptr(d.x2apic), 1)?;
        }
        let t = d.titles[m];

        // 1. sti; ICR shorthand self; busy loop; cli.
        clear_log(&mut a, d)?;
        let mut after = a.create_label();
        a.sti()?;
        a.mov(eax, icr(apic::ICR_SELF, VECTOR_SELF))?;
        if mode == ApicMode::X2apic {
            a.xor(edx, edx)?;
        }
        apic_write_eax(&mut a, mode, apic::ICR_LOW)?;
        a.set_label(&mut after)?;
        busy_loop(&mut a)?;
        a.cli()?;
        report.phase(&mut a, t[0], &[(after, d.after_icr)], d, &routines)?;

        // 2. sti; ICR physical destination = own APIC ID; busy loop; cli.
        clear_log(&mut a, d)?;
        let mut after = a.create_label();
        a.sti()?;
        match mode {
            ApicMode::Xapic => {
                a.mov(eax, dword_ptr(d.apic_id))?;
                a.shl(eax, 24)?;
                apic_write_eax(&mut a, mode, apic::ICR_HIGH)?;
                a.mov(eax, icr(0, VECTOR_PHYSICAL))?;
            }
            ApicMode::X2apic => {
                a.mov(edx, dword_ptr(d.apic_id))?;
                a.mov(eax, icr(0, VECTOR_PHYSICAL))?;
            }
        }
        apic_write_eax(&mut a, mode, apic::ICR_LOW)?;
        a.set_label(&mut after)?;
        busy_loop(&mut a)?;
        a.cli()?;
        report.phase(&mut a, t[1], &[(after, d.after_icr)], d, &routines)?;

        // 3. With IF set: TPR 0x40 holds 0x31 back but not 0x61; lowering
        //    it uncovers 0x31.
        clear_log(&mut a, d)?;
        let mut after_high = a.create_label();
        let mut after_tpr = a.create_label();
        a.sti()?;
        apic_write(&mut a, mode, apic::TPR, 0x40)?;
        apic_write(&mut a, mode, apic::ICR_LOW, icr(apic::ICR_SELF, VECTOR_LOW))?;
        apic_write(
            &mut a,
            mode,
            apic::ICR_LOW,
            icr(apic::ICR_SELF, VECTOR_HIGH),
        )?;
        a.set_label(&mut after_high)?;
        busy_loop(&mut a)?;
        report.phase(&mut a, t[2], &[(after_high, d.after_icr)], d, &routines)?;
        clear_log(&mut a, d)?;
        apic_write(&mut a, mode, apic::TPR, 0)?;
        a.set_label(&mut after_tpr)?;
        busy_loop(&mut a)?;
        a.cli()?;
        report.phase(&mut a, t[3], &[(after_tpr, d.after_tpr)], d, &routines)?;
    }
    routines.print(&mut a, d.done)?;
    asm::emit_halt(&mut a)?;

    // Stubs: push the vector, then the common handler.
    for (label, vector) in stubs.iter_mut() {
        a.set_label(label)?;
        a.push(i32::from(*vector))?;
        a.jmp(common)?;
    }
    // Common handler: [rsp] vector, [rsp+8] the frame's RIP. Logs both and
    // writes EOI.
    let mut full = a.create_label();
    let mut eoi_x2apic = a.create_label();
    let mut eoi_done = a.create_label();
    a.set_label(&mut common)?;
    a.push(rax)?;
    a.push(rbx)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(ebx, dword_ptr(d.count))?;
    a.cmp(ebx, LOG_SLOTS)?;
    a.jae(full)?;
    a.mov(rax, qword_ptr(rsp + 32))?;
    a.mov(dword_ptr(rbx * 4 + d.log_vector), eax)?;
    a.mov(rax, qword_ptr(rsp + 40))?;
    a.mov(qword_ptr(rbx * 8 + d.log_rip), rax)?;
    a.inc(dword_ptr(d.count))?;
    a.set_label(&mut full)?;
    a.cmp(dword_ptr(d.x2apic), 0)?;
    a.jne(eoi_x2apic)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.jmp(eoi_done)?;
    a.set_label(&mut eoi_x2apic)?;
    apic_write(&mut a, ApicMode::X2apic, apic::EOI, 0)?;
    a.set_label(&mut eoi_done)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.add(rsp, 8)?;
    a.iretq()?;

    // begin: title at ESI, then "<count> taken:".
    a.set_label(&mut report.begin)?;
    a.call(routines.print_str)?;
    a.mov(eax, dword_ptr(d.count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.taken)?;
    a.ret()?;

    // slot: R12 slot, R13 expected RIP, R14 "where" text.
    let mut late = a.create_label();
    let mut slot_done = a.create_label();
    a.set_label(&mut report.slot)?;
    a.mov(al, b' ' as u32)?;
    a.call(routines.putc)?;
    a.mov(al, b'0' as u32)?;
    a.call(routines.putc)?;
    a.mov(al, b'x' as u32)?;
    a.call(routines.putc)?;
    a.mov(eax, dword_ptr(r12 * 4 + d.log_vector))?;
    routines.print_hex(&mut a, 2)?;
    a.cmp(qword_ptr(r12 * 8 + d.log_rip), r13)?;
    a.jne(late)?;
    a.mov(esi, r14d)?;
    a.call(routines.print_str)?;
    a.jmp(slot_done)?;
    a.set_label(&mut late)?;
    routines.print(&mut a, d.late)?;
    a.mov(rax, qword_ptr(r12 * 8 + d.log_rip))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.late_end)?;
    a.set_label(&mut slot_done)?;
    a.ret()?;

    a.set_label(&mut unexpected)?;
    routines.print(&mut a, d.unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    decimal.emit(&mut a, &routines)?;
    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE64)?.blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::asm::testing;

    #[test]
    fn assembles_and_decodes() {
        testing::check_program(&program());
    }
}
