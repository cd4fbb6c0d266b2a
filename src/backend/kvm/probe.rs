//! Probes of what this host's in-kernel irqchip (`--irqchip kernel`)
//! actually does, for behaviour that differs between KVM implementations
//! and cannot be read from a capability.
//!
//! [`probe_kernel_lapic`] runs a tiny 32-bit guest on KVM's in-kernel local
//! APIC: it sends itself a fixed interrupt (a self-IPI through the ICR) and
//! its handler reads the vector's ISR bit through the xAPIC page before its
//! EOI. An APIC (SDM Vol. 3A 11.8.4) moves the vector from IRR to ISR when
//! it dispatches it and keeps it there until the handler's EOI, so the bit
//! reads 1. KVM-PVM hosts (guest ring 0 emulated by the host kernel) end
//! the interrupt as they deliver it — the kernel trace shows an `APIC_EOI`
//! write before the handler's first instruction — so the bit reads 0,
//! the guest's own EOI finds nothing in service, and a level-triggered
//! IOAPIC line is re-sampled at delivery rather than at the guest's EOI
//! (docs/IO.md, "Level-triggered lines on the in-kernel irqchip").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::{KvmBackend, KvmVcpu};
use crate::backend::{
    BackendError, CpuState, DescriptorTable, GuestMemory, IrqchipKind, Platform, Result, Segment,
    Vcpu, VcpuExit, VmOptions,
};

/// What [`probe_kernel_lapic`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLapicFacts {
    /// The vector was in service (its ISR bit set) inside its handler,
    /// as on an APIC. False: the host ended the interrupt as it delivered
    /// it (KVM-PVM).
    pub in_service_in_handler: bool,
}

impl KernelLapicFacts {
    /// The host EOIs an interrupt as it delivers it.
    pub fn eoi_at_delivery(&self) -> bool {
        !self.in_service_in_handler
    }
}

const MEM_SIZE: usize = 1 << 20;
const GDT: u64 = 0x500;
const IDT: u64 = 0x1000;
const STACK_TOP: u64 = 0x7000;
const CODE: u64 = 0x8000;
const HANDLER: u64 = 0x8800;
/// Where the handler stores the ISR word it read.
const RESULT: u64 = 0x9000;
const VECTOR: u32 = 0x40;
const LAPIC: u64 = devices::lapic::DEFAULT_BASE;
const LAPIC_EOI: u64 = devices::lapic::REG_EOI as u64;
const LAPIC_SVR: u64 = devices::lapic::REG_SVR as u64;
const LAPIC_ISR: u64 = devices::lapic::REG_ISR as u64;
const LAPIC_ICR_LOW: u64 = devices::lapic::REG_ICR_LOW as u64;
/// ICR: fixed, edge, destination shorthand "self".
const ICR_SELF: u32 = 1 << 18;
/// The handler writes here when it is done.
const PORT_DONE: u16 = 0x86;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;

/// Run the probe guest on KVM's in-kernel irqchip. `Ok(None)` when KVM or
/// its in-kernel irqchip is not available here.
pub fn probe_kernel_lapic() -> Result<Option<KernelLapicFacts>> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| BackendError::Memory(format!("probe guest memory: {e}")))?;
    let opts = VmOptions {
        irqchip: IrqchipKind::Kernel,
        ..VmOptions::default()
    };
    let mut backend = match KvmBackend::with_options(&mem, opts) {
        Ok(b) => b,
        Err(e) => {
            log::debug!("kvm: in-kernel irqchip probe not run: {e}");
            return Ok(None);
        }
    };
    let mut vcpu = backend.create_kvm_vcpu(0)?;
    write_guest(&mem).map_err(|e| BackendError::Memory(format!("probe guest: {e}")))?;
    vcpu.set_state(&protected_mode_state())?;
    let isr = run_to_done(&mut vcpu, &mem)?;
    Ok(Some(KernelLapicFacts {
        in_service_in_handler: isr & (1 << (VECTOR % 32)) != 0,
    }))
}

/// The GDT, IDT gate, main code and handler.
fn write_guest(mem: &GuestMemory) -> std::result::Result<(), String> {
    let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        write(mem, GDT + 8 * i as u64, &d.to_le_bytes())?;
    }
    let gate = (HANDLER & 0xffff)
        | (u64::from(CODE_SELECTOR) << 16)
        | (0x8e00 << 32)
        | ((HANDLER >> 16) & 0xffff) << 48;
    write(mem, IDT + u64::from(VECTOR) * 8, &gate.to_le_bytes())?;
    let main = assemble(CODE, |a| {
        a.mov(dword_ptr(LAPIC + LAPIC_SVR), 0x1ff)?;
        a.mov(dword_ptr(LAPIC + LAPIC_ICR_LOW), ICR_SELF | VECTOR)?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.sti()?;
        a.hlt()?;
        a.jmp(wait)
    })?;
    let handler = assemble(HANDLER, |a| {
        a.mov(
            eax,
            dword_ptr(LAPIC + LAPIC_ISR + u64::from(VECTOR / 32) * 0x10),
        )?;
        a.mov(dword_ptr(RESULT), eax)?;
        a.mov(dword_ptr(LAPIC + LAPIC_EOI), 0)?;
        a.out(u32::from(PORT_DONE), al)?;
        let mut stop = a.create_label();
        a.set_label(&mut stop)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(stop)
    })?;
    write(mem, CODE, &main)?;
    write(mem, HANDLER, &handler)
}

fn write(mem: &GuestMemory, addr: u64, bytes: &[u8]) -> std::result::Result<(), String> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| e.to_string())
}

fn assemble(
    at: u64,
    body: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), IcedError>,
) -> std::result::Result<Vec<u8>, String> {
    let mut a = CodeAssembler::new(32).map_err(|e| e.to_string())?;
    body(&mut a).map_err(|e| e.to_string())?;
    a.assemble(at).map_err(|e| e.to_string())
}

/// Flat 32-bit ring-0 protected mode at [`CODE`], interrupts disabled.
fn protected_mode_state() -> CpuState {
    let flat = |selector: u16, code: bool| Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        present: true,
        db: true,
        g: true,
        ..Default::default()
    };
    let mut s = CpuState::real_mode_at(0, 0);
    s.regs.rip = CODE;
    s.regs.gpr[cpu_interp::state::gpr::RSP] = STACK_TOP;
    s.sregs.cs = flat(CODE_SELECTOR, true);
    let data = flat(DATA_SELECTOR, false);
    s.sregs.ds = data;
    s.sregs.es = data;
    s.sregs.fs = data;
    s.sregs.gs = data;
    s.sregs.ss = data;
    s.sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 0x17,
    };
    s.sregs.idt = DescriptorTable {
        base: IDT,
        limit: 0x7ff,
    };
    s.sregs.tr = Segment {
        base: 0xa000,
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    s.sregs.cr0 = 0x31; // PE, ET, NE
    s
}

/// Run until the handler reports (or a 2 s watchdog gives up) and return
/// the ISR word it read.
fn run_to_done(vcpu: &mut KvmVcpu, mem: &GuestMemory) -> Result<u32> {
    #[derive(Default)]
    struct Ports {
        done: bool,
    }
    impl Platform for Ports {
        fn io_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn io_write(&mut self, port: u16, _data: &[u8]) {
            self.done |= port == PORT_DONE;
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}
        fn stop_requested(&self) -> bool {
            self.done
        }
    }
    let mut io = Ports::default();
    let kicker = vcpu.kicker();
    let finished = AtomicBool::new(false);
    let timed_out = AtomicBool::new(false);
    let (finished, timed_out) = (&finished, &timed_out);
    let run = std::thread::scope(|sc| {
        sc.spawn(move || {
            for _ in 0..200 {
                if finished.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            timed_out.store(true, Ordering::Relaxed);
            kicker.kick();
        });
        let r = loop {
            if io.done {
                break Ok(());
            }
            if timed_out.load(Ordering::Relaxed) {
                break Err(BackendError::Unsupported(
                    "in-kernel irqchip probe: the self-IPI was not delivered within 2 s".into(),
                ));
            }
            match vcpu.run(&mut io) {
                Ok(VcpuExit::IoRequest | VcpuExit::Interrupted | VcpuExit::Halted) => {}
                Ok(e) => {
                    break Err(BackendError::Unsupported(format!(
                        "in-kernel irqchip probe guest stopped: {e:?}"
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        finished.store(true, Ordering::Relaxed);
        r
    });
    run?;
    let mut word = [0u8; 4];
    mem.read_slice(&mut word, GuestAddress(RESULT))
        .map_err(|e| BackendError::Memory(format!("probe result: {e}")))?;
    Ok(u32::from_le_bytes(word))
}
