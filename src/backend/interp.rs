//! The interpreter backend: adapts `cpu_interp::Cpu` to the [`Vcpu`] trait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cpu_interp::{Cpu, CpuExit, Ram};

use super::{Backend, CpuState, GuestMemory, Platform, Result, Vcpu, VcpuExit, VcpuStats};

/// The interpreter's TSC frequency (kHz), reported in CPUID leaf 0x15/0x16.
pub const INTERP_TSC_KHZ: u32 = 2_000_000;
/// The local APIC timer's input clock, reported as the crystal in leaf 0x15.
pub const LAPIC_TIMER_HZ: u32 = 1_000_000_000;

/// Instructions the interpreter runs before returning `Interrupted`, so the
/// VMM gets regular chances to look at the outside world.
pub const DEFAULT_BUDGET: u64 = 4_000_000;

/// The VMM's [`Platform`] with the vCPU's kick added: the CPU stops when
/// either asks. Shared with the KVM backend's fallback path.
pub struct IoPlatform<'a> {
    pub io: &'a mut dyn Platform,
    /// Set by [`InterpKick`]; makes the CPU stop at the next check.
    pub kick: &'a AtomicBool,
}

/// The interpreter's kick: a flag the CPU polls at block boundaries.
pub struct InterpKick(pub Arc<AtomicBool>);

impl super::Kick for InterpKick {
    fn kick(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Platform for IoPlatform<'_> {
    fn io_read(&mut self, port: u16, data: &mut [u8]) {
        self.io.io_read(port, data);
    }
    fn io_write(&mut self, port: u16, data: &[u8]) {
        self.io.io_write(port, data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.io.mmio_read(addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.io.mmio_write(addr, data);
    }
    fn read_msr(&mut self, msr: u32) -> cpu_interp::MsrResult {
        self.io.read_msr(msr)
    }
    fn write_msr(&mut self, msr: u32, value: u64) -> cpu_interp::MsrResult {
        self.io.write_msr(msr, value)
    }
    fn retired_hint(&mut self, retired: u64) {
        self.io.retired_hint(retired);
    }
    fn stop_requested(&self) -> bool {
        self.kick.load(std::sync::atomic::Ordering::Relaxed) || self.io.stop_requested()
    }
    fn tsc(&mut self) -> Option<u64> {
        self.io.tsc()
    }
    fn next_check(&mut self, retired: u64) -> u64 {
        self.io.next_check(retired)
    }
    fn read_cr8(&mut self) -> Option<u64> {
        self.io.read_cr8()
    }
    fn write_cr8(&mut self, cr8: u64) -> bool {
        self.io.write_cr8(cr8)
    }
}

/// The guest memory's write logs (device DMA, loaders, restores) as the
/// interpreter's view of who else wrote RAM: the CPU drops decoded and
/// translated code on those pages.
struct DeviceWrites(Vec<(u64, devices::guest_memory::WriteLog)>);

impl cpu_interp::memory::ForeignWrites for DeviceWrites {
    #[inline]
    fn take(&mut self, written: &mut dyn FnMut(u64, u64)) {
        for (base, log) in &self.0 {
            if log.pending() {
                log.drain(|offset, len| written(base + offset, len));
            }
        }
    }
}

/// One VM on the interpreter.
pub struct InterpBackend {
    mem: GuestMemory,
    tier: cpu_interp::Tier,
    model: cpu_interp::cpuid::CpuModel,
}

impl InterpBackend {
    /// On the default tier (`DUET_TIER`, else the fastest the host
    /// supports), with the highest CPU model the interpreter has.
    pub fn new(mem: GuestMemory) -> Self {
        Self::with_options(
            mem,
            super::default_tier(),
            cpu_interp::cpuid::CpuModel::default(),
        )
    }

    /// A VM on execution tier `tier` whose vCPUs are CPU model `model`
    /// (CPUID and instruction set).
    pub fn with_options(
        mem: GuestMemory,
        tier: cpu_interp::Tier,
        model: cpu_interp::cpuid::CpuModel,
    ) -> Self {
        InterpBackend { mem, tier, model }
    }
}

impl Backend for InterpBackend {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn tsc_khz(&self) -> Option<u32> {
        Some(INTERP_TSC_KHZ)
    }

    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        // One interpreter vCPU per VM: it alone drains the write logs.
        let writes = DeviceWrites(devices::guest_memory::write_logs(&self.mem));
        let mut cpu = Cpu::new(Ram::new(self.mem.clone()).with_foreign_writes(Box::new(writes)));
        cpu.set_cpuid_config(cpu_interp::cpuid::CpuidConfig {
            apic_id: id,
            apic: true,
            tsc_khz: Some(INTERP_TSC_KHZ),
            crystal_hz: LAPIC_TIMER_HZ,
            x2apic: true,
            tsc_deadline: true,
            model: self.model,
        });
        if let Err(e) = cpu.set_tier(self.tier) {
            log::warn!("{e}; running on the interpreter alone");
        }
        Ok(Box::new(InterpVcpu {
            cpu,
            budget: DEFAULT_BUDGET,
            exits: Default::default(),
            kick: Arc::new(AtomicBool::new(false)),
        }))
    }
}

/// A vCPU on the interpreter.
pub struct InterpVcpu {
    cpu: Cpu,
    budget: u64,
    exits: std::collections::BTreeMap<&'static str, u64>,
    kick: Arc<AtomicBool>,
}

impl InterpVcpu {
    /// Change how many instructions run between `Interrupted` returns.
    /// With 0 a run only delivers the pending events (a replay stopping
    /// where a recorded run was cut short before any instruction).
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    fn count(&mut self, what: &'static str) {
        *self.exits.entry(what).or_default() += 1;
    }
}

impl Vcpu for InterpVcpu {
    fn run(&mut self, io: &mut dyn Platform) -> Result<VcpuExit> {
        let mut plat = IoPlatform {
            io,
            kick: &self.kick,
        };
        let exit = match self.cpu.run(&mut plat, self.budget) {
            CpuExit::Halted => VcpuExit::Halted,
            CpuExit::InterruptWindow => VcpuExit::InterruptWindow,
            CpuExit::TripleFault => VcpuExit::Shutdown(super::ShutdownReason::TripleFault),
            CpuExit::BudgetExhausted => VcpuExit::Interrupted,
            CpuExit::StopRequested => {
                if self.kick.swap(false, Ordering::Relaxed) {
                    VcpuExit::Interrupted
                } else {
                    VcpuExit::IoRequest
                }
            }
        };
        self.count(match exit {
            VcpuExit::Halted => "hlt",
            VcpuExit::InterruptWindow => "irq-window",
            VcpuExit::Shutdown(_) => "shutdown",
            VcpuExit::IoRequest => "io-request",
            VcpuExit::Interrupted => "budget",
        });
        Ok(exit)
    }

    fn state(&mut self) -> Result<CpuState> {
        Ok(self.cpu.state())
    }

    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.cpu.set_state(state);
        Ok(())
    }

    fn ready_for_interrupt(&mut self) -> bool {
        self.cpu.interrupts_enabled() && self.cpu.events().interrupt.is_none()
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<()> {
        self.cpu.inject_interrupt(vector);
        Ok(())
    }

    fn inject_nmi(&mut self) -> Result<()> {
        self.cpu.inject_nmi();
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.cpu.request_interrupt_window(on);
    }

    fn set_profiling(&mut self, on: bool) {
        self.cpu.set_profiling(on);
    }

    fn profile_report(&self) -> Option<String> {
        Some(self.cpu.profile_report())
    }

    fn set_run_budget(&mut self, instructions: u64) {
        self.set_budget(instructions);
    }

    fn kicker(&self) -> Arc<dyn super::Kick> {
        Arc::new(InterpKick(self.kick.clone()))
    }

    fn recent_code(&self) -> Vec<cpu_interp::recent::RecentEntry> {
        self.cpu.recent_code()
    }

    fn stats(&self) -> VcpuStats {
        VcpuStats {
            instructions: Some(self.cpu.retired()),
            exits: self
                .exits
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            interp_fallbacks: 0,
            code_cache: Some(self.cpu.cache_stats()),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            jit: self.cpu.jit_stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::backend::MsrResult;
    use cpu_interp::state::{gpr, Segment};

    const CODE: u64 = 0x1000;
    /// The function the guest calls, on its own page.
    const FUNC: u64 = 0x4000;
    const STACK_TOP: u64 = 0x8000;
    const PML4: u64 = 0x10_000;
    /// More than the translation threshold (64): each FUNC the device
    /// overwrites has been translated.
    const CALLS: u32 = 100;

    fn func(k: u32) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(eax, k).unwrap();
        a.ret().unwrap();
        a.assemble(FUNC).unwrap()
    }

    /// A device that writes guest memory the way the virtio models do
    /// (through `GuestMemory`, so the write log sees it): on port 0x80 it
    /// DMA-writes a new FUNC; on port 0x81 it wants the VMM.
    struct Dma {
        mem: GuestMemory,
        exit: bool,
    }
    impl Dma {
        fn write(&self, k: u32) {
            self.mem.write_slice(&func(k), GuestAddress(FUNC)).unwrap();
        }
    }
    impl Platform for Dma {
        fn io_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn io_write(&mut self, port: u16, _data: &[u8]) {
            match port {
                0x80 => self.write(100),
                0x81 => self.exit = true,
                _ => {}
            }
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}
        fn stop_requested(&self) -> bool {
            self.exit
        }
        fn read_msr(&mut self, _msr: u32) -> MsrResult {
            MsrResult::Unhandled
        }
    }

    /// Three rounds of CALLS calls to FUNC summed in RBX; the device
    /// rewrites FUNC after the first (port write) and the second (while
    /// the VMM has the vCPU).
    fn program() -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        a.xor(ebx, ebx).unwrap();
        for round in 0..3 {
            let mut l = a.create_label();
            a.mov(ecx, CALLS).unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(rdx, FUNC).unwrap();
            a.call(rdx).unwrap();
            a.add(rbx, rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
            match round {
                0 => a.out(0x80, al).unwrap(),
                1 => a.out(0x81, al).unwrap(),
                _ => {}
            }
        }
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    }

    /// Flat 64-bit mode, the first 2 MiB identity-mapped.
    fn long_mode(vcpu: &mut dyn Vcpu, mem: &GuestMemory) {
        mem.write_obj((PML4 + 0x1000) | 3, GuestAddress(PML4))
            .unwrap();
        mem.write_obj((PML4 + 0x2000) | 3, GuestAddress(PML4 + 0x1000))
            .unwrap();
        mem.write_obj(0x83u64, GuestAddress(PML4 + 0x2000)).unwrap();
        let mut s = vcpu.state().unwrap();
        s.sregs.cr0 = cpu_interp::cpu::CR0_PE | cpu_interp::cpu::CR0_PG | cpu_interp::cpu::CR0_ET;
        s.sregs.cr3 = PML4;
        s.sregs.cr4 = cpu_interp::cpu::CR4_PAE;
        s.sregs.efer = cpu_interp::cpu::EFER_LME | cpu_interp::cpu::EFER_LMA;
        let seg = |code: bool, selector: u16| Segment {
            selector,
            limit: 0xffff_ffff,
            type_: if code { 0xb } else { 0x3 },
            s: true,
            present: true,
            l: code,
            db: !code,
            g: true,
            ..Default::default()
        };
        s.sregs.cs = seg(true, 0x8);
        let d = seg(false, 0x10);
        (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (d, d, d, d, d);
        s.regs.rip = CODE;
        s.regs.gpr[gpr::RSP] = STACK_TOP;
        vcpu.set_state(&s).unwrap();
    }

    #[test]
    fn device_dma_over_executed_code_runs_the_new_code_on_both_tiers() {
        for tier in [cpu_interp::Tier::Interp, cpu_interp::Tier::best()] {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            // The loader's writes are logged too (harmless: no code yet).
            mem.write_slice(&program(), GuestAddress(CODE)).unwrap();
            let mut dma = Dma {
                mem: mem.clone(),
                exit: false,
            };
            dma.write(1);
            let mut be = InterpBackend::with_options(mem.clone(), tier, Default::default());
            let mut vcpu = be.create_vcpu(0).unwrap();
            long_mode(vcpu.as_mut(), &mem);
            assert!(matches!(vcpu.run(&mut dma).unwrap(), VcpuExit::IoRequest));
            // The VMM's turn: a device completes a request (as after a
            // host input) and writes FUNC again.
            dma.exit = false;
            dma.write(10_000);
            assert!(matches!(vcpu.run(&mut dma).unwrap(), VcpuExit::Halted));
            let sum = vcpu.state().unwrap().regs.gpr[gpr::RBX];
            assert_eq!(sum, u64::from(CALLS) * (1 + 100 + 10_000), "{tier:?}");
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if tier == cpu_interp::Tier::Jit {
                let jit = vcpu.stats().jit.expect("JIT stats");
                assert!(jit.translations > 0, "{jit:?}");
            }
        }
    }
}
