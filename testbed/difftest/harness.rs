//! Runs a case on KVM and on the interpreter and snapshots both results.
//!
//! One KVM VM with one vCPU and one interpreter `Cpu` live as long as the
//! harness, each over its own guest memory. Per case only the case area
//! (kernel stack, code, stack and window pages) is rewritten; the
//! environment pages are checked against their pristine image and
//! rewritten only if a case changed them.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use cpu_interp::state::CpuState;
use cpu_interp::{Cpu, CpuExit, Platform, Ram};

use super::case::{assemble, Assembled, Case};
use super::env;
use super::{DifftestError, GuestMemory, Mode};

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
use crate::backend::kvm::{KvmBackend, KvmVcpu};
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
use crate::backend::{ShutdownReason, Vcpu, VcpuExit};

/// Ports below this stop a case (the terminator and the exception stubs
/// write the port numbered like their vector); ports from here up are
/// ordinary, compared I/O.
pub const STOP_PORTS_BELOW: u16 = 0x100;
/// What port reads return (per byte, the low byte of the port plus a
/// running counter), so both sides read the same.
fn in_value(port: u16, n: u32) -> u8 {
    (port as u8).wrapping_add(n as u8).wrapping_mul(0x1d) ^ 0x5a
}

/// Instructions the interpreter may run per case before it counts as a
/// timeout.
pub const INTERP_BUDGET: u64 = 200_000;

/// A port or MMIO access made by a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// The stop port (terminator or exception stub); its data (AL) is not
    /// compared.
    Stop(u16),
    Out(u16, Vec<u8>),
    In(u16, usize),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    /// This many more events were not recorded.
    Dropped(u64),
}

/// How one side's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// A stop port was written (terminator or exception stub).
    Stop,
    /// HLT (ring 0 only).
    Halted,
    TripleFault,
    /// KVM could not emulate an instruction (no oracle).
    Refused {
        rip: u64,
        message: String,
    },
    /// The run did not stop in time.
    Timeout,
    /// Something else went wrong on this side.
    Failed(String),
}

/// One side's result.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub end: End,
    pub state: CpuState,
    /// Guest memory `[0, env::SPACE)` after the run.
    pub mem: Vec<u8>,
    pub io: Vec<IoEvent>,
}

/// The results of a case on both sides.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub asm: Assembled,
    pub kvm: Snapshot,
    pub interp: Snapshot,
}

/// Events a run records before it only counts them (a string instruction
/// over MMIO can make billions).
pub const MAX_IO_EVENTS: usize = 4096;

/// Records I/O and asks for the vCPU back at a stop port.
#[derive(Default)]
struct Recorder {
    io: Vec<IoEvent>,
    stop: bool,
    reads: u32,
    /// Events beyond [`MAX_IO_EVENTS`].
    dropped: u64,
}

impl Recorder {
    fn record(&mut self, e: IoEvent) {
        if self.io.len() < MAX_IO_EVENTS {
            self.io.push(e);
        } else {
            self.dropped += 1;
        }
    }
    fn read(&mut self, port: u16, data: &mut [u8]) {
        self.record(IoEvent::In(port, data.len()));
        for b in data.iter_mut() {
            *b = in_value(port, self.reads);
            self.reads = self.reads.wrapping_add(1);
        }
    }
    fn write(&mut self, port: u16, data: &[u8]) {
        if port < STOP_PORTS_BELOW {
            self.record(IoEvent::Stop(port));
            self.stop = true;
        } else {
            self.record(IoEvent::Out(port, data.to_vec()));
        }
    }
    fn finish(mut self) -> Vec<IoEvent> {
        if self.dropped > 0 {
            self.io.push(IoEvent::Dropped(self.dropped));
        }
        self.io
    }
}

impl Platform for Recorder {
    fn io_read(&mut self, port: u16, data: &mut [u8]) {
        self.read(port, data);
    }
    fn io_write(&mut self, port: u16, data: &[u8]) {
        self.write(port, data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.record(IoEvent::MmioRead(addr, data.len()));
        data.fill(0xff);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.record(IoEvent::MmioWrite(addr, data.to_vec()));
    }
    fn stop_requested(&self) -> bool {
        self.stop
    }
}

/// Where processors differ, the interpreter plays the oracle's part
/// (`cpu_interp::quirks`): on the hardware oracle what the start-up probes
/// saw the CPU do (`hardware`, see [`super::probe`]); Intel's behaviour,
/// which KVM's instruction emulator follows in these corners (REP
/// CMPS/SCAS faults restore RFLAGS, a null selector load clears the base),
/// on the emulator oracle.
pub fn oracle_quirks(
    mode: Mode,
    hardware: cpu_interp::quirks::Quirks,
) -> cpu_interp::quirks::Quirks {
    match mode.oracle() {
        super::Oracle::Hardware => hardware,
        super::Oracle::Emulator => cpu_interp::quirks::Quirks::INTEL,
    }
}

/// The interpreter side.
pub struct InterpSide {
    pub cpu: Cpu,
    pub mem: GuestMemory,
}

impl InterpSide {
    pub fn new() -> Result<Self, DifftestError> {
        let mem = env::new_memory()?;
        let mut cpu = Cpu::new(Ram::new(mem.clone()));
        // The XSAVE components of the oracle's XCR0 (AVX-512 included).
        cpu.set_xsave_components(env::oracle_xcr0());
        Ok(InterpSide { cpu, mem })
    }

    /// Run on execution tier `tier`; on the translation tier every 64-bit
    /// block is translated the first time it runs, so each case's code runs
    /// as host code (cases are short and run once).
    pub fn set_tier(&mut self, tier: cpu_interp::Tier) -> Result<(), DifftestError> {
        self.cpu
            .set_tier(tier)
            .map_err(|e| DifftestError::Config(e.to_string()))?;
        self.cpu.set_jit_threshold(1);
        Ok(())
    }

    /// Run from `init` until a stop port, HLT, triple fault or `budget`
    /// instructions.
    /// A panic inside the interpreter ends the run as `End::Failed`.
    pub fn run(&mut self, init: &CpuState, budget: u64) -> (End, Vec<IoEvent>) {
        self.cpu.set_state(init);
        let mut rec = Recorder::default();
        let start = self.cpu.retired();
        let cpu = &mut self.cpu;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
            let left = budget.saturating_sub(cpu.retired() - start);
            if left == 0 {
                break End::Timeout;
            }
            match cpu.run(&mut rec, left) {
                CpuExit::StopRequested => break End::Stop,
                CpuExit::Halted => break End::Halted,
                CpuExit::TripleFault => break End::TripleFault,
                CpuExit::BudgetExhausted | CpuExit::InterruptWindow => {}
            }
        }));
        let end = r.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            End::Failed(format!("interpreter panicked: {msg}"))
        });
        (end, rec.finish())
    }

    /// Run `case` alone (environment reinstalled, case area written)
    /// playing `quirks`, and snapshot the result.
    pub fn run_case(
        &mut self,
        case: &Case,
        quirks: cpu_interp::quirks::Quirks,
    ) -> Result<Snapshot, DifftestError> {
        let asm = assemble(case.mode, &case.items)?;
        env::install(&self.mem)?;
        self.mem
            .write_slice(&area_with_code(case, &asm), GuestAddress(env::CASE_AREA))
            .map_err(|e| DifftestError::Memory(e.to_string()))?;
        self.cpu.set_quirks(quirks);
        let (end, io) = self.run(&case.init, INTERP_BUDGET);
        Ok(Snapshot {
            end,
            state: self.cpu.state(),
            mem: snapshot_mem(&self.mem)?,
            io,
        })
    }
}

/// The KVM side: one VM, one vCPU, fallback off.
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub struct KvmSide {
    // Drop order: the vCPU before the VM.
    pub vcpu: KvmVcpu,
    _backend: KvmBackend,
    pub mem: GuestMemory,
    watchdog: super::watchdog::Watchdog,
}

#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
impl KvmSide {
    /// A VM over fresh memory; `fallback` enables the interpreter fallback
    /// (off for differential testing).
    pub fn new(fallback: bool, timeout: Duration) -> Result<Self, DifftestError> {
        super::kvm_usable().map_err(DifftestError::KvmUnavailable)?;
        let mem = env::new_memory()?;
        let mut backend = KvmBackend::new(&mem)?;
        let mut vcpu = backend.create_kvm_vcpu(0)?;
        vcpu.set_interp_fallback(fallback);
        Ok(KvmSide {
            vcpu,
            _backend: backend,
            mem,
            watchdog: super::watchdog::Watchdog::new(timeout)?,
        })
    }

    /// Run from `init` until a stop port (or another end).
    pub fn run(&mut self, init: &CpuState) -> (End, Vec<IoEvent>) {
        if let Err(e) = self.vcpu.set_state(init) {
            return (End::Failed(format!("KVM set_state: {e}")), Vec::new());
        }
        let mut rec = Recorder::default();
        self.watchdog.arm();
        let end = loop {
            match self.vcpu.run(&mut rec) {
                Ok(VcpuExit::IoRequest) => break End::Stop,
                Ok(VcpuExit::Halted) => break End::Halted,
                Ok(VcpuExit::Shutdown(ShutdownReason::TripleFault)) => break End::TripleFault,
                Ok(VcpuExit::Shutdown(ShutdownReason::Unrecoverable(m))) => {
                    if m.starts_with("KVM could not emulate") {
                        let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                        break End::Refused { rip, message: m };
                    }
                    break End::Failed(m);
                }
                Ok(VcpuExit::Shutdown(other)) => break End::Failed(other.to_string()),
                Ok(VcpuExit::Interrupted) => {
                    if self.watchdog.fired() {
                        break End::Timeout;
                    }
                }
                Ok(VcpuExit::InterruptWindow) => {}
                Err(e) => break End::Failed(format!("KVM_RUN: {e}")),
            }
        };
        self.watchdog.disarm();
        (end, rec.finish())
    }
}

/// Both sides plus the pristine environment.
pub struct Harness {
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    pub kvm: KvmSide,
    pub interp: InterpSide,
    pristine: Vec<u8>,
    scratch: Vec<u8>,
    /// The hardware oracle's quirks and where each came from.
    pub probe: super::probe::ProbeReport,
}

/// Does `mem[0..pristine.len()]` still hold `pristine` up to the case area?
/// If not, restore it.
fn restore_env(
    mem: &GuestMemory,
    pristine: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), DifftestError> {
    let n = env::CASE_AREA as usize;
    scratch.resize(n, 0);
    mem.read_slice(&mut scratch[..n], GuestAddress(0))
        .map_err(|e| DifftestError::Memory(e.to_string()))?;
    if scratch[..n] != pristine[..n] {
        mem.write_slice(&pristine[..n], GuestAddress(0))
            .map_err(|e| DifftestError::Memory(e.to_string()))?;
    }
    Ok(())
}

fn snapshot_mem(mem: &GuestMemory) -> Result<Vec<u8>, DifftestError> {
    let mut v = vec![0u8; env::SPACE as usize];
    mem.read_slice(&mut v, GuestAddress(0))
        .map_err(|e| DifftestError::Memory(e.to_string()))?;
    Ok(v)
}

/// The case area with the code laid into the code page (rest of the page
/// HLT).
pub fn area_with_code(case: &Case, asm: &Assembled) -> Vec<u8> {
    let mut area = case.area.clone();
    area.resize((env::SPACE - env::CASE_AREA) as usize, 0);
    let at = (env::CODE - env::CASE_AREA) as usize;
    area[at..at + 0x1000].fill(0xf4);
    area[at..at + asm.code.len()].copy_from_slice(&asm.code);
    area
}

impl Harness {
    /// KVM (fallback off) and the interpreter, each over its own memory.
    pub fn new() -> Result<Self, DifftestError> {
        #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
        {
            let pristine = env::image()
                .into_iter()
                .find(|(a, _)| *a == 0)
                .map(|(_, b)| b)
                .unwrap_or_default();
            let cpu = cpu_interp::quirks::CpuModel::host();
            let mut h = Harness {
                kvm: KvmSide::new(false, Duration::from_secs(2))?,
                interp: InterpSide::new()?,
                pristine,
                scratch: Vec::new(),
                probe: super::probe::ProbeReport::table_only(cpu),
            };
            h.probe = super::probe::probe(&mut h, cpu)?;
            Ok(h)
        }
        #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
        {
            Err(DifftestError::KvmUnavailable(
                "this build has no KVM backend".into(),
            ))
        }
    }

    /// Lay `case` into both memories (environment pages restored where a
    /// case changed them).
    fn prepare(&mut self, case: &Case) -> Result<Assembled, DifftestError> {
        let asm = assemble(case.mode, &case.items)?;
        let area = area_with_code(case, &asm);
        let mut mems = vec![&self.interp.mem];
        #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
        mems.push(&self.kvm.mem);
        for mem in mems {
            restore_env(mem, &self.pristine, &mut self.scratch)?;
            mem.write_slice(&area, GuestAddress(env::CASE_AREA))
                .map_err(|e| DifftestError::Memory(e.to_string()))?;
        }
        Ok(asm)
    }

    /// Run `case` on KVM only (the start-up probes).
    pub fn run_kvm(&mut self, case: &Case) -> Result<Snapshot, DifftestError> {
        self.prepare(case)?;
        #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
        {
            let (end, io) = self.kvm.run(&case.init);
            let state = match &end {
                End::Failed(_) => case.init,
                _ => self.kvm.vcpu.state().unwrap_or(case.init),
            };
            Ok(Snapshot {
                end,
                state,
                mem: snapshot_mem(&self.kvm.mem)?,
                io,
            })
        }
        #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
        Err(DifftestError::KvmUnavailable(
            "this build has no KVM backend".into(),
        ))
    }

    /// Run `case` on both sides.
    pub fn run(&mut self, case: &Case) -> Result<Outcome, DifftestError> {
        let asm = self.prepare(case)?;
        #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
        let kvm = {
            let (end, io) = self.kvm.run(&case.init);
            let state = match &end {
                End::Failed(_) => case.init,
                _ => self.kvm.vcpu.state().unwrap_or(case.init),
            };
            Snapshot {
                end,
                state,
                mem: snapshot_mem(&self.kvm.mem)?,
                io,
            }
        };
        #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
        let kvm = Snapshot {
            end: End::Failed("no KVM".into()),
            state: case.init,
            mem: Vec::new(),
            io: Vec::new(),
        };
        let interp = if matches!(kvm.end, End::Refused { .. }) {
            // No oracle: don't spend time on the interpreter.
            Snapshot {
                end: End::Failed("not run".into()),
                state: case.init,
                mem: Vec::new(),
                io: Vec::new(),
            }
        } else {
            self.interp
                .cpu
                .set_quirks(oracle_quirks(case.mode, self.probe.quirks));
            let (end, io) = self.interp.run(&case.init, INTERP_BUDGET);
            Snapshot {
                end,
                state: self.interp.cpu.state(),
                mem: snapshot_mem(&self.interp.mem)?,
                io,
            }
        };
        Ok(Outcome { asm, kvm, interp })
    }
}
