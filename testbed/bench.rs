//! `duet bench`: guest MIPS of the interpreter (or KVM) on three loops, and
//! the same loops under QEMU for comparison.
//!
//! Each workload is a small multiboot (v1, "a.out kludge") kernel, so the
//! very same bytes boot on duet and under `qemu-system-x86_64 -kernel`. It
//! enters at 1 MiB in 32-bit protected mode (as a multiboot loader leaves
//! it), switches to 64-bit long mode, runs its loop N times and ends by
//! writing 0 to the isa-debug-exit port.
//!
//! - `alu`: `add/xor/sub/dec/jnz` on registers (5 instructions per iteration).
//! - `mem`: a load and a read-modify-write per iteration, strided over a
//!   1 MiB array mapped with 4 KiB pages (6 instructions per iteration).
//! - `syscall`: ring 3 `syscall` → ring 0 `inc; sysretq` → ring 3 `dec; jnz`
//!   (5 instructions per iteration).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

use cpu_interp::state::{CpuState, DescriptorTable, Segment};

use crate::backend::BackendKind;
use crate::guests::GuestImage;
use crate::machine::{Machine, MachineConfig, Outcome};

/// Where the image is loaded (and where the multiboot header sits).
pub const LOAD_ADDR: u64 = 0x10_0000;
const GDT_ADDR: u64 = 0x8000;
const PML4: u64 = 0x20_0000;
/// Page tables for the workloads: PML4, PDPT, PD (2 MiB pages for the
/// first GiB), and a PT mapping the 1 MiB array with 4 KiB pages.
const PDPT: u64 = PML4 + 0x1000;
const PD: u64 = PML4 + 0x2000;
const PT_ARRAY: u64 = PML4 + 0x3000;
/// Virtual address of the array (its own 2 MiB region, 4 KiB pages).
const ARRAY_VIRT: u64 = 0x4000_0000;
/// Physical backing of the array.
const ARRAY_PHYS: u64 = 0x40_0000;
const KERNEL_STACK: u64 = 0x30_0000;
const USER_STACK: u64 = 0x31_0000;

/// A benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Alu,
    Mem,
    Syscall,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Alu, Workload::Mem, Workload::Syscall];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Alu => "alu",
            Workload::Mem => "mem",
            Workload::Syscall => "syscall",
        }
    }

    /// Guest instructions per loop iteration.
    pub fn insns_per_iteration(self) -> u64 {
        match self {
            Workload::Alu => 5,
            Workload::Mem => 6,
            Workload::Syscall => 5,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Workload::Alu => "tight ALU loop (add/xor/sub/dec/jnz)",
            Workload::Mem => "memory loop with paging (load + RMW over 1 MiB in 4 KiB pages)",
            Workload::Syscall => "syscall/sysret loop (ring 3 <-> ring 0)",
        }
    }
}

fn gdt() -> [u64; 6] {
    [
        0,
        0x00af_9b00_0000_ffff, // 0x08: 64-bit code, DPL 0
        0x00cf_9300_0000_ffff, // 0x10: data, DPL 0
        0x00cf_9b00_0000_ffff, // 0x18: 32-bit code, DPL 0
        0x00cf_f300_0000_ffff, // 0x20 (+3): data, DPL 3   (SYSRET SS = STAR[63:48] + 8)
        0x00af_fb00_0000_ffff, // 0x28 (+3): 64-bit code, DPL 3 (SYSRET CS = STAR[63:48] + 16)
    ]
}

/// The 64-bit part starts this far into the image.
const CODE64_OFFSET: u64 = 0x1000;

/// Assemble a workload image running `iterations` loop iterations.
pub fn image(w: Workload, iterations: u64) -> Result<Vec<u8>, BenchError> {
    assemble(w, iterations).map_err(|e| BenchError::Assemble(w.name(), e))
}

fn assemble(w: Workload, iterations: u64) -> Result<Vec<u8>, String> {
    let (code32, code64) = assemble_parts(w, iterations).map_err(|e| e.to_string())?;
    if code32.len() as u64 > CODE64_OFFSET {
        return Err(format!(
            "32-bit part is {} bytes, more than {CODE64_OFFSET}",
            code32.len()
        ));
    }
    let mut bytes = code32;
    bytes.resize(CODE64_OFFSET as usize, 0);
    bytes.extend_from_slice(&code64);
    let end = LOAD_ADDR + bytes.len() as u64;
    let fields = [
        LOAD_ADDR,
        LOAD_ADDR,
        end,
        end,
        LOAD_ADDR + ENTRY_OFFSET as u64,
    ];
    for (k, f) in fields.iter().enumerate() {
        bytes[12 + 4 * k..16 + 4 * k].copy_from_slice(&(*f as u32).to_le_bytes());
    }
    Ok(bytes)
}

fn assemble_parts(w: Workload, iterations: u64) -> Result<(Vec<u8>, Vec<u8>), IcedError> {
    let code64_addr = LOAD_ADDR + CODE64_OFFSET;
    let mut a = CodeAssembler::new(32)?;

    // Multiboot header (a.out kludge: flags bit 16 = address fields valid);
    // header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr are
    // patched once the image size is known.
    let magic = 0x1bad_b002u32;
    let flags = 0x0001_0000u32;
    a.dd(&[magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))])?;
    a.dd(&[0, 0, 0, 0, 0])?;
    a.dw(&[(gdt().len() * 8 - 1) as u16])?;
    a.dd(&[GDT_ADDR as u32])?;
    a.dw(&[0])?;

    // Entry (offset ENTRY_OFFSET): 32-bit protected mode, flat, no paging,
    // no stack (multiboot gives none).
    a.cli()?;
    a.mov(esp, KERNEL_STACK as u32)?;
    for (k, d) in gdt().iter().enumerate() {
        let at = GDT_ADDR as u32 + 8 * k as u32;
        a.mov(dword_ptr(at), *d as u32)?;
        a.mov(dword_ptr(at + 4), (*d >> 32) as u32)?;
    }
    a.lgdt(ptr(LOAD_ADDR as u32 + 32))?;
    // Page tables: zero 20 KiB, then fill.
    a.cld()?;
    a.mov(edi, PML4 as u32)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 0x5000u32 / 4)?;
    a.rep().stosd()?;
    a.mov(dword_ptr(PML4 as u32), (PDPT | 7) as u32)?;
    a.mov(dword_ptr(PDPT as u32), (PD | 7) as u32)?;
    // PD: 512 x 2 MiB pages, user-accessible (the syscall loop runs in ring 3).
    let mut fill = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 21)?;
    a.or(eax, 0x87)?;
    a.mov(dword_ptr(ecx * 8 + PD as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(fill)?;
    // Second GiB: a PD whose first entry is a PT of 4 KiB pages for the array.
    let pd_array = PT_ARRAY + 0x1000;
    a.mov(dword_ptr(PDPT as u32 + 8), (pd_array | 7) as u32)?;
    a.mov(dword_ptr(pd_array as u32), (PT_ARRAY | 7) as u32)?;
    let mut fill_pt = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill_pt)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.add(eax, (ARRAY_PHYS | 7) as u32)?;
    a.mov(dword_ptr(ecx * 8 + PT_ARRAY as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 256)?;
    a.jb(fill_pt)?;
    // Long mode.
    a.mov(eax, 0x20u32)?; // CR4.PAE
    a.mov(cr4, eax)?;
    a.mov(eax, PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 0x101u32)?; // LME | SCE
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0001u32)?;
    a.mov(cr0, eax)?;
    // Far return to the 64-bit code segment.
    a.push(0x08u32)?;
    a.push(code64_addr as u32)?;
    a.retf()?;

    let mut b = CodeAssembler::new(64)?;
    b.mov(ax, 0x10)?;
    b.mov(ds, ax)?;
    b.mov(es, ax)?;
    b.mov(ss, ax)?;
    b.mov(rsp, KERNEL_STACK)?;
    match w {
        Workload::Alu => {
            let mut l = b.create_label();
            b.mov(rcx, iterations)?;
            b.mov(rbx, 0x1234_5678u64)?;
            b.xor(eax, eax)?;
            b.set_label(&mut l)?;
            b.add(rax, rbx)?;
            b.xor(rdx, rax)?;
            b.sub(rbx, 3)?;
            b.dec(rcx)?;
            b.jnz(l)?;
        }
        Workload::Mem => {
            let mut l = b.create_label();
            b.mov(rcx, iterations)?;
            b.mov(rsi, ARRAY_VIRT)?;
            b.lea(rdi, qword_ptr(rsi + 0x80000))?;
            b.xor(edx, edx)?;
            b.set_label(&mut l)?;
            b.mov(eax, dword_ptr(rsi + rdx * 4))?;
            b.add(dword_ptr(rdi + rdx * 4), eax)?;
            b.add(edx, 1031)?;
            b.and(edx, 0x1ffff)?;
            b.dec(rcx)?;
            b.jnz(l)?;
        }
        Workload::Syscall => {
            let mut kernel = b.create_label();
            let mut user = b.create_label();
            // STAR: kernel CS 0x08 (SS 0x10); user base 0x18 -> SS 0x23, CS 0x2b.
            b.mov(ecx, 0xc000_0081u32)?;
            b.xor(eax, eax)?;
            b.mov(edx, (0x18u32 << 16) | 0x08)?;
            b.wrmsr()?;
            b.mov(ecx, 0xc000_0082u32)?;
            b.lea(rax, ptr(kernel))?;
            b.mov(rdx, rax)?;
            b.shr(rdx, 32)?;
            b.wrmsr()?;
            b.mov(ecx, 0xc000_0084u32)?; // SFMASK: clear IF, DF
            b.mov(eax, 0x600u32)?;
            b.xor(edx, edx)?;
            b.wrmsr()?;
            // iretq to ring 3 with IOPL 3 so the user loop can exit with OUT.
            b.push(0x23)?;
            b.push(USER_STACK as i32)?;
            b.push(0x3002)?;
            b.push(0x2b)?;
            b.lea(rax, ptr(user))?;
            b.push(rax)?;
            b.mov(rbx, iterations)?;
            b.iretq()?;
            b.set_label(&mut kernel)?;
            b.inc(r12)?;
            b.sysretq()?;
            b.set_label(&mut user)?;
            b.syscall()?;
            b.dec(rbx)?;
            b.jnz(user)?;
        }
    }
    b.xor(eax, eax)?;
    b.out(0xf4, al)?;
    b.cli()?;
    b.hlt()?;

    Ok((a.assemble(LOAD_ADDR)?, b.assemble(code64_addr)?))
}

/// Offset of the entry point: after the 32-byte header and the 8-byte GDTR.
const ENTRY_OFFSET: usize = 40;

/// The CPU state a multiboot loader leaves: flat 32-bit protected mode.
pub fn multiboot_entry_state(entry: u64) -> CpuState {
    let mut s = CpuState::reset();
    let code = Segment {
        selector: 0x18,
        base: 0,
        limit: 0xffff_ffff,
        type_: 0xb,
        s: true,
        present: true,
        db: true,
        g: true,
        ..Default::default()
    };
    let data = Segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    s.sregs.cs = code;
    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (data, data, data, data, data);
    s.sregs.cr0 = 0x11;
    s.sregs.gdt = DescriptorTable { base: 0, limit: 0 };
    s.regs.rip = entry;
    s.regs.gpr[0] = 0x2bad_b002;
    s.regs.rflags = 0x2;
    s
}

/// The workload as a duet guest image.
pub fn guest_image(w: Workload, iterations: u64) -> Result<GuestImage, BenchError> {
    let bytes = image(w, iterations)?;
    let entry = u64::from(u32::from_le_bytes([
        bytes[28], bytes[29], bytes[30], bytes[31],
    ]));
    Ok(GuestImage {
        blobs: vec![(LOAD_ADDR, bytes)],
        entry: multiboot_entry_state(entry),
        pci_devices: Vec::new(),
        virtio_devices: Vec::new(),
    })
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub workload: Workload,
    pub iterations: u64,
    pub elapsed: Duration,
    /// Guest instructions the loop retired (iterations × per-iteration).
    pub loop_instructions: u64,
    /// Instructions retired in total, when the backend counts them.
    pub retired: Option<u64>,
}

impl Measurement {
    pub fn mips(&self) -> f64 {
        self.loop_instructions as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Errors of the benchmark runner.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("assembling the {0} workload failed: {1}")]
    Assemble(&'static str, String),
    #[error("machine: {0}")]
    Machine(#[from] crate::machine::MachineError),
    #[error("the {workload} workload ended unexpectedly: {outcome}")]
    BadOutcome {
        workload: &'static str,
        outcome: String,
    },
    #[error("running {cmd}: {err}")]
    Spawn { cmd: String, err: std::io::Error },
    #[error("writing {path}: {err}")]
    Write { path: String, err: std::io::Error },
}

/// Run a workload on a duet backend and time `Machine::run`.
pub fn run_duet(
    kind: BackendKind,
    tier: cpu_interp::Tier,
    w: Workload,
    iterations: u64,
) -> Result<Measurement, BenchError> {
    let img = guest_image(w, iterations)?;
    let cfg = MachineConfig {
        memory: 64 << 20,
        tier,
        ..MachineConfig::new(kind, Box::new(std::io::sink()))
    };
    let mut m = Machine::new(cfg)?;
    m.load(&img)?;
    let t = Instant::now();
    let outcome = m.run()?;
    let elapsed = t.elapsed();
    if outcome != Outcome::DebugExit(1) {
        return Err(BenchError::BadOutcome {
            workload: w.name(),
            outcome: outcome.describe(),
        });
    }
    Ok(Measurement {
        workload: w,
        iterations,
        elapsed,
        loop_instructions: iterations * w.insns_per_iteration(),
        retired: m.vcpu_stats().instructions,
    })
}

/// Run a workload under QEMU (`qemu_cmd` is the binary and any -accel
/// options) twice, with `iterations` and 10× that, and attribute the time
/// difference to the extra iterations (this cancels QEMU's start-up).
pub fn run_qemu(
    qemu: &[String],
    w: Workload,
    iterations: u64,
    dir: &Path,
) -> Result<Measurement, BenchError> {
    let time_one = |n: u64| -> Result<Duration, BenchError> {
        let img = image(w, n)?;
        let path = dir.join(format!("duet-bench-{}-{n}.bin", w.name()));
        let mut f = std::fs::File::create(&path).map_err(|err| BenchError::Write {
            path: path.display().to_string(),
            err,
        })?;
        f.write_all(&img).map_err(|err| BenchError::Write {
            path: path.display().to_string(),
            err,
        })?;
        drop(f);
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let mut cmd = Command::new(&qemu[0]);
            cmd.args(&qemu[1..]).args([
                "-m",
                "64M",
                "-display",
                "none",
                "-no-reboot",
                "-nodefaults",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x01",
                "-kernel",
            ]);
            cmd.arg(&path);
            let t = Instant::now();
            let st = cmd.status().map_err(|err| BenchError::Spawn {
                cmd: qemu.join(" "),
                err,
            })?;
            let e = t.elapsed();
            if st.code() != Some(1) {
                return Err(BenchError::BadOutcome {
                    workload: w.name(),
                    outcome: format!("qemu exited with {st}"),
                });
            }
            best = best.min(e);
        }
        std::fs::remove_file(&path).ok();
        Ok(best)
    };
    let t1 = time_one(iterations)?;
    let t2 = time_one(iterations * 10)?;
    let extra = iterations * 9;
    Ok(Measurement {
        workload: w,
        iterations: extra,
        elapsed: t2.saturating_sub(t1).max(Duration::from_micros(1)),
        loop_instructions: extra * w.insns_per_iteration(),
        retired: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_have_a_valid_multiboot_header() {
        for w in Workload::ALL {
            let b = image(w, 10).unwrap();
            let word =
                |k: usize| u32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]);
            assert_eq!(word(0), 0x1bad_b002);
            assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
            assert_eq!(u64::from(word(4)), LOAD_ADDR);
            assert_eq!(u64::from(word(6)), LOAD_ADDR + b.len() as u64);
            assert_eq!(
                b[(u64::from(word(7)) - LOAD_ADDR) as usize],
                0xfa,
                "entry is the CLI"
            );
        }
    }

    #[test]
    fn workloads_run_on_the_interpreter_and_retire_the_expected_count() {
        for tier in [cpu_interp::Tier::Interp, cpu_interp::Tier::best()] {
            for w in Workload::ALL {
                let small = run_duet(BackendKind::Interp, tier, w, 1000).unwrap();
                let big = run_duet(BackendKind::Interp, tier, w, 3000).unwrap();
                let diff = big.retired.unwrap() - small.retired.unwrap();
                assert_eq!(
                    diff,
                    2000 * w.insns_per_iteration(),
                    "{} {tier:?}",
                    w.name()
                );
            }
        }
    }
}
