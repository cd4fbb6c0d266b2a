//! The fuzz targets' bodies, shared by the cargo-fuzz binaries
//! (`fuzz_targets/`) and the corpus replay test (`tests/replay.rs`, run on
//! the stable toolchain in CI).
//!
//! Each function takes arbitrary bytes and must neither panic, hang nor
//! allocate without bound, whatever the bytes are: a guest or an input
//! file can only ever cause an error, an architectural event or a clean VM
//! stop (BRIEF: "guest-caused conditions are architectural").
//!
//! - [`loader_bzimage`], [`loader_elf_pvh`], [`loader_multiboot`]: the
//!   bytes as a kernel file (shaped so that format detection picks the
//!   loader under test), sometimes with an initrd, into a small guest.
//! - [`cpu_exec`]: the bytes as code (and the registers) in each of the
//!   six CPU modes the difftest environment sets up, on the interpreter.
//! - [`device_registers`]: a sequence of register reads/writes, clock
//!   advances and interrupt-controller actions against one device model.
//! - [`virtio_devices`]: register accesses, bring-ups, descriptor chains,
//!   notifications and host input against one virtio device on one
//!   transport (see `virtio.rs`).
//! - [`replay_log`]: the bytes as a record/replay log (`duet replay`'s
//!   parser: header, frames, events) and as a device trace
//!   (`duet replay-devices`' parser and replay).

mod virtio;
pub use virtio::virtio_devices;

use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress};

use cpu_interp::state::gpr;
use cpu_interp::{Cpu, CpuExit, Platform, Ram};
use devices::clock::ManualClock;
use devices::{Bus, BusKind, Clock, NullIrq, TimeTaint, Timed, VmControl};
use duet::difftest::{env, Mode};

// ---- loaders -----------------------------------------------------------------

/// A per-process scratch file for the kernel (and the initrd): the loaders
/// read files, as duet does.
fn scratch(name: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("duet-fuzz-{}-{name}", std::process::id()))
}

thread_local! {
    /// Guest memories by size, reused across inputs (allocation is the
    /// expensive part; the loaders overwrite what they use).
    static MEMS: RefCell<Vec<(u64, duet::backend::GuestMemory)>> = const { RefCell::new(Vec::new()) };
}

/// Guest memory sizes a loader input may pick (the smallest duet accepts,
/// one below and one above the 16 MiB the kernels usually want).
const MEM_SIZES: [u64; 3] = [2 << 20, 8 << 20, 40 << 20];

fn with_memory<R>(size: u64, f: impl FnOnce(&duet::backend::GuestMemory) -> R) -> R {
    MEMS.with(|m| {
        let mut m = m.borrow_mut();
        if !m.iter().any(|(s, _)| *s == size) {
            let mem = duet::machine::create_memory(size).expect("guest memory");
            m.push((size, mem));
        }
        let (_, mem) = m.iter().find(|(s, _)| *s == size).expect("just added");
        f(mem)
    })
}

/// Run the loader over `kernel` (and an initrd of `initrd` bytes, if any)
/// in guest memory of `mem_size` bytes. Errors are fine; panics are not.
fn load(kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str, mem_size: u64) {
    let kpath = scratch("kernel");
    let ipath = scratch("initrd");
    if std::fs::write(&kpath, kernel).is_err() {
        return;
    }
    let initrd = initrd.and_then(|b| std::fs::write(&ipath, b).ok().map(|_| ipath.clone()));
    let spec = duet::loader::KernelSpec {
        kernel: kpath,
        initrd: initrd
            .map(|p| p.display().to_string())
            .into_iter()
            .collect(),
        cmdline: cmdline.to_string(),
    };
    with_memory(mem_size, |mem| {
        let _ = duet::loader::load(mem, &spec);
    });
}

/// The loader options an input starts with: memory size, initrd, command
/// line.
struct LoadOpts<'a> {
    mem_size: u64,
    initrd: Option<&'a [u8]>,
    cmdline: &'static str,
    rest: &'a [u8],
}

fn load_opts(data: &[u8]) -> LoadOpts<'_> {
    let (&sel, rest) = data.split_first().unwrap_or((&0, &[]));
    let mem_size = MEM_SIZES[usize::from(sel & 3) % MEM_SIZES.len()];
    let cmdline = match (sel >> 2) & 3 {
        0 => "",
        1 => "console=ttyS0",
        2 => "console=ttyS0 panic=-1 quiet loglevel=8 earlyprintk=serial",
        _ => "x",
    };
    let (initrd, rest) = if sel & 0x10 != 0 && rest.len() >= 2 {
        // An initrd of up to 64 KiB taken from the end of the input.
        let n = (usize::from(rest[0]) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let (k, i) = rest[2..].split_at(rest.len() - 2 - n);
        (Some(i), k)
    } else {
        (None, rest)
    };
    LoadOpts {
        mem_size,
        initrd,
        cmdline,
        rest,
    }
}

/// The bytes as a bzImage: the boot-protocol signature forced at 0x202
/// (and the boot flag at 0x1fe) so that detection picks the bzImage loader.
pub fn loader_bzimage(data: &[u8]) {
    let o = load_opts(data);
    let mut k = o.rest.to_vec();
    if k.len() < 0x260 {
        k.resize(0x260, 0);
    }
    k[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    k[0x202..0x206].copy_from_slice(b"HdrS");
    if k[..4] == *b"\x7fELF" {
        k[0] = 0;
    }
    load(&k, o.initrd, o.cmdline, o.mem_size);
}

/// The bytes as an ELF file (the magic forced), for the PVH loader.
pub fn loader_elf_pvh(data: &[u8]) {
    let o = load_opts(data);
    let mut k = o.rest.to_vec();
    if k.len() < 4 {
        k.resize(4, 0);
    }
    k[..4].copy_from_slice(b"\x7fELF");
    load(&k, o.initrd, o.cmdline, o.mem_size);
}

/// The bytes behind a multiboot v1 header (magic, the input's flags, a
/// valid checksum), then the input's address fields and image.
pub fn loader_multiboot(data: &[u8]) {
    const MAGIC: u32 = 0x1bad_b002;
    let o = load_opts(data);
    let (flags, rest) = if o.rest.len() >= 4 {
        let f = u32::from_le_bytes([o.rest[0], o.rest[1], o.rest[2], o.rest[3]]);
        (f, &o.rest[4..])
    } else {
        (0, o.rest)
    };
    let mut k = Vec::with_capacity(rest.len() + 12);
    k.extend_from_slice(&MAGIC.to_le_bytes());
    k.extend_from_slice(&flags.to_le_bytes());
    k.extend_from_slice(&(0u32.wrapping_sub(MAGIC).wrapping_sub(flags)).to_le_bytes());
    k.extend_from_slice(rest);
    // Not ELF and no HdrS: detection must pick multiboot.
    if k.len() >= 0x206 && k[0x202..0x206] == *b"HdrS" {
        k[0x202] = 0;
    }
    load(&k, o.initrd, o.cmdline, o.mem_size);
}

// ---- the interpreter ---------------------------------------------------------

/// A platform with nothing behind it: reads return all ones, writes go
/// nowhere.
#[derive(Default)]
struct NullPlatform {
    accesses: u64,
}

impl Platform for NullPlatform {
    fn io_read(&mut self, _port: u16, data: &mut [u8]) {
        self.accesses += 1;
        data.fill(0xff);
    }
    fn io_write(&mut self, _port: u16, _data: &[u8]) {
        self.accesses += 1;
    }
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        self.accesses += 1;
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {
        self.accesses += 1;
    }
    fn stop_requested(&self) -> bool {
        // A string instruction over ports must not run forever.
        self.accesses > 100_000
    }
}

thread_local! {
    static CPU: RefCell<Option<(duet::difftest::GuestMemory, Cpu)>> = const { RefCell::new(None) };
}

/// Instructions per input.
const CPU_BUDGET: u64 = 20_000;

/// Random bytes as code in one of the six modes of the difftest
/// environment (real mode; 16/32-bit protected/compatibility; 64-bit; ring
/// 0 and 3), with random general registers and arithmetic flags.
///
/// Input: mode selector, flags byte, 16 × 8 register bytes, then code (up
/// to a page) — shorter inputs are zero-padded where needed.
pub fn cpu_exec(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let sel: u8 = u.arbitrary().unwrap_or(0);
    let flags: u8 = u.arbitrary().unwrap_or(0);
    let mode = Mode::ALL[usize::from(sel) % Mode::ALL.len()];
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = u.arbitrary().unwrap_or(0);
    }
    let code = u.take_rest();
    CPU.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            let mem = env::new_memory().expect("difftest memory");
            let cpu = Cpu::new(Ram::new(mem.clone()));
            *c = Some((mem, cpu));
        }
        let (mem, cpu) = c.as_mut().expect("set above");
        env::install(mem).expect("environment");
        // The code page: the input, then HLT.
        let mut page = vec![0xf4u8; 0x1000];
        let n = code.len().min(0x1000);
        page[..n].copy_from_slice(&code[..n]);
        let _ = mem.write_slice(&page, GuestAddress(env::CODE));
        // The window pages: a pattern derived from the code (so that
        // loads see varied data).
        let mut window = vec![0u8; 0x4000];
        for (k, b) in window.iter_mut().enumerate() {
            *b = code.get(k % code.len().max(1)).copied().unwrap_or(0) ^ (k as u8);
        }
        let _ = mem.write_slice(&window, GuestAddress(env::W_RO));
        let mut s = env::base_state(mode);
        for (k, v) in regs.iter().enumerate() {
            if k == gpr::RSP && sel & 0x80 == 0 {
                continue; // usually a valid stack
            }
            s.regs.gpr[k] = if mode.bits() == 64 {
                *v
            } else {
                *v & 0xffff_ffff
            };
        }
        // Arithmetic flags, DF, TF (single-step), AC.
        s.regs.rflags |= u64::from(flags) & 0xd5 | (u64::from(flags >> 6 & 1) << 10);
        if flags & 0x20 != 0 {
            s.regs.rflags |= 1 << 8;
        }
        cpu.set_state(&s);
        let mut p = NullPlatform::default();
        let start = cpu.retired();
        loop {
            let left = CPU_BUDGET.saturating_sub(cpu.retired() - start);
            if left == 0 {
                break;
            }
            match cpu.run(&mut p, left) {
                CpuExit::BudgetExhausted | CpuExit::InterruptWindow => {
                    if cpu.retired() - start >= CPU_BUDGET {
                        break;
                    }
                }
                CpuExit::Halted | CpuExit::TripleFault | CpuExit::StopRequested => break,
            }
            if p.stop_requested() {
                break;
            }
        }
    });
}

// ---- devices -----------------------------------------------------------------

/// The device under test.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Device {
    Uart,
    Pic,
    Pit,
    Rtc,
    I8042,
    Ioapic,
    Lapic,
    AcpiPm,
    PostCode,
    DebugExit,
    ResetControl,
}

/// One action against it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Op {
    /// Read `size` bytes at `offset` from the device's base (offsets run a
    /// little past both ends of its range).
    Read {
        offset: i16,
        size: u8,
    },
    Write {
        offset: i16,
        size: u8,
        value: u64,
    },
    /// Let VM time pass and run the device's timers.
    Advance {
        ns: u32,
    },
    /// Drive an interrupt input (PIC, IOAPIC) or an i8042/UART input byte.
    Input {
        line: u8,
        level: bool,
    },
    /// The CPU's interrupt acknowledge (PIC, LAPIC) or an x2APIC MSR.
    Ack,
    Msr {
        index: u16,
        value: u64,
        write: bool,
    },
}

/// A device-register session.
#[derive(Arbitrary, Debug)]
pub struct Session {
    pub device: Device,
    pub ops: Vec<Op>,
}

/// Most operations per input (a long session adds nothing a loop in the
/// fuzzer would not).
const MAX_OPS: usize = 512;

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Run a device-register session decoded from the bytes.
pub fn device_registers(data: &[u8]) {
    let Ok(s) = Session::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_session(&s);
}

/// The device's bus (port or MMIO), its base, and its timers.
struct Rig {
    bus: Bus,
    base: u64,
    len: u64,
    timed: Vec<Arc<Mutex<dyn Timed + Send>>>,
    pic: Option<Arc<Mutex<devices::pic8259::Pic8259Pair>>>,
    ioapic: Option<Arc<Mutex<devices::ioapic::Ioapic>>>,
    lapic: Option<Arc<Mutex<devices::lapic::Lapic>>>,
    uart: Option<Arc<Mutex<devices::uart16550::Uart16550>>>,
}

fn rig(d: Device, clock: &ManualClock) -> Rig {
    let clk: Arc<dyn Clock> = Arc::new(clock.clone());
    let taint = TimeTaint::new();
    let ctl = VmControl::new();
    let mut r = Rig {
        bus: Bus::new(BusKind::Pio),
        base: 0,
        len: 0,
        timed: Vec::new(),
        pic: None,
        ioapic: None,
        lapic: None,
        uart: None,
    };
    let ins = |r: &mut Rig, base: u64, len: u64, dev: devices::SharedDevice| {
        r.bus
            .insert(devices::DeviceId(0), "dut", base, len, dev)
            .expect("one device");
        if r.len == 0 {
            r.base = base;
            r.len = len;
        }
    };
    match d {
        Device::Uart => {
            let u = Arc::new(Mutex::new(devices::uart16550::Uart16550::new(
                Box::new(NullIrq),
                Box::new(Sink),
            )));
            ins(&mut r, 0x3f8, 8, u.clone());
            r.uart = Some(u);
        }
        Device::Pic => {
            let pic = Arc::new(Mutex::new(devices::pic8259::Pic8259Pair::new()));
            ins(
                &mut r,
                0x20,
                2,
                Arc::new(Mutex::new(devices::pic8259::pic_master_port(pic.clone()))),
            );
            ins(
                &mut r,
                0xa0,
                2,
                Arc::new(Mutex::new(devices::pic8259::pic_slave_port(pic.clone()))),
            );
            ins(
                &mut r,
                0x4d0,
                2,
                Arc::new(Mutex::new(devices::pic8259::elcr_port(pic.clone()))),
            );
            r.pic = Some(pic);
        }
        Device::Pit => {
            let pit = Arc::new(Mutex::new(devices::pit8254::Pit8254::new(
                clk,
                Box::new(NullIrq),
                taint,
            )));
            ins(
                &mut r,
                0x40,
                4,
                Arc::new(Mutex::new(devices::pit8254::pit_ports(pit.clone()))),
            );
            ins(
                &mut r,
                0x61,
                1,
                Arc::new(Mutex::new(devices::pit8254::port61(pit.clone()))),
            );
            r.timed.push(pit);
        }
        Device::Rtc => {
            let mut rtc =
                devices::rtc_cmos::RtcCmos::new(clk, taint, Box::new(NullIrq), 1_767_225_600);
            rtc.set_memory_size(256 << 20, 0);
            let rtc = Arc::new(Mutex::new(rtc));
            ins(&mut r, 0x70, devices::rtc_cmos::PORT_COUNT, rtc.clone());
            r.timed.push(rtc);
        }
        Device::I8042 => {
            let k = Arc::new(Mutex::new(devices::i8042::I8042::new(
                ctl,
                Box::new(NullIrq),
                Box::new(NullIrq),
            )));
            ins(
                &mut r,
                0x60,
                1,
                Arc::new(Mutex::new(devices::i8042::data_port(k.clone()))),
            );
            ins(
                &mut r,
                0x64,
                1,
                Arc::new(Mutex::new(devices::i8042::command_port(k))),
            );
            r.len = 5;
        }
        Device::Ioapic => {
            r.bus = Bus::new(BusKind::Mmio);
            let io = Arc::new(Mutex::new(devices::ioapic::Ioapic::new()));
            ins(&mut r, 0xfec0_0000, 0x1000, io.clone());
            r.ioapic = Some(io);
        }
        Device::Lapic => {
            r.bus = Bus::new(BusKind::Mmio);
            let l = Arc::new(Mutex::new(devices::lapic::Lapic::new(
                0,
                true,
                clk,
                taint,
                100_000_000,
                1_000_000_000,
            )));
            ins(&mut r, 0xfee0_0000, 0x1000, l.clone());
            r.timed.push(l.clone());
            r.lapic = Some(l);
        }
        Device::AcpiPm => {
            let pm = devices::acpi_pm::AcpiPm::new(clk, taint, ctl);
            ins(
                &mut r,
                0x600,
                devices::acpi_pm::BLOCK_LEN,
                Arc::new(Mutex::new(pm)),
            );
        }
        Device::PostCode => {
            ins(
                &mut r,
                0x80,
                1,
                Arc::new(Mutex::new(devices::post_code::PostCode::default())),
            );
        }
        Device::DebugExit => {
            ins(
                &mut r,
                0xf4,
                1,
                Arc::new(Mutex::new(devices::debug_exit::DebugExit::new(ctl))),
            );
        }
        Device::ResetControl => {
            ins(
                &mut r,
                0xcf9,
                1,
                Arc::new(Mutex::new(devices::reset_control::ResetControl::new(ctl))),
            );
        }
    }
    r
}

/// Run `s` against a fresh device.
pub fn run_session(s: &Session) {
    let clock = ManualClock::new();
    let r = rig(s.device, &clock);
    let mmio = matches!(s.device, Device::Ioapic | Device::Lapic);
    for op in s.ops.iter().take(MAX_OPS) {
        match *op {
            Op::Read { offset, size } | Op::Write { offset, size, .. } => {
                let size = if mmio {
                    [1usize, 2, 4, 8][usize::from(size & 3)]
                } else {
                    [1usize, 2, 4][usize::from(size % 3)]
                };
                // Keep the offset near the device's range (PIC/PIT/i8042
                // have a second range further up: reach it too).
                let span = r.len as i64 + 16;
                let off = i64::from(offset).rem_euclid(span + 0x4c0) - 8;
                let addr = (r.base as i64 + off).max(0) as u64;
                let mut buf = [0u8; 8];
                if let Op::Write { value, .. } = *op {
                    buf = value.to_le_bytes();
                    r.bus.write(0, addr, &buf[..size]);
                } else {
                    r.bus.read(0, addr, &mut buf[..size]);
                }
            }
            Op::Advance { ns } => {
                clock.advance_by(u64::from(ns));
                let now = clock.now_ns();
                for t in &r.timed {
                    let mut t = t.lock().expect("timer lock");
                    // Fire whatever fell due, as the VMM's timer loop does
                    // (bounded: a periodic timer with a tiny period must not
                    // make this spin).
                    for _ in 0..64 {
                        match t.next_deadline() {
                            Some(d) if d <= now => t.advance(now),
                            _ => break,
                        }
                    }
                    t.advance(now);
                }
            }
            Op::Input { line, level } => {
                if let Some(p) = &r.pic {
                    p.lock().expect("pic").set_irq(line & 15, level);
                }
                if let Some(io) = &r.ioapic {
                    io.lock()
                        .expect("ioapic")
                        .set_irq(usize::from(line) % 24, level);
                }
                if let Some(u) = &r.uart {
                    u.lock().expect("uart").enqueue_input(&[line]);
                }
                if let Some(l) = &r.lapic {
                    l.lock().expect("lapic").accept(line, level);
                }
            }
            Op::Ack => {
                if let Some(p) = &r.pic {
                    let mut p = p.lock().expect("pic");
                    if p.interrupt_pending() {
                        let _ = p.acknowledge();
                    }
                }
                if let Some(l) = &r.lapic {
                    let mut l = l.lock().expect("lapic");
                    if let Some(req) = l.pending_interrupt() {
                        let _ = l.acknowledge(req);
                    }
                }
            }
            Op::Msr {
                index,
                value,
                write,
            } => {
                if let Some(l) = &r.lapic {
                    let mut l = l.lock().expect("lapic");
                    // x2APIC MSRs 0x800..0x8ff and IA32_APIC_BASE.
                    let msr = if index & 0x100 != 0 {
                        0x1b
                    } else {
                        0x800 | u32::from(index & 0xff)
                    };
                    if write {
                        let _ = l.write_msr(msr, value);
                    } else {
                        let _ = l.read_msr(msr);
                    }
                }
            }
        }
    }
}

/// The bytes as a replay log and as a device trace: every outcome is a
/// value or an error naming where, never a panic or an unbounded
/// allocation.
pub fn replay_log(data: &[u8]) {
    match duet::replay::log::read_all(data) {
        Ok((_, events)) => {
            // A valid log re-encodes to the same events.
            let mut w = duet::replay::log::LogWriter::new(
                Box::new(std::io::sink()),
                &duet::replay::log::read_all(data).map(|(h, _)| h).unwrap(),
            )
            .unwrap();
            for e in &events {
                w.push(e).unwrap();
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if text.starts_with(duet::replay::devtrace::DEVICE_TRACE_MAGIC) && text.len() < 1 << 16 {
            let _ = duet::replay::devtrace::replay_devices(text, None);
        }
    }
}

// ---- e1000 -------------------------------------------------------------------

/// Registers the e1000 fuzzer aims at (any other offset is reachable too).
const E1000_REGS: [u32; 24] = [
    0x0000, 0x0010, 0x0014, 0x0020, 0x00c0, 0x00c4, 0x00c8, 0x00d0, 0x00d8, 0x0100, 0x0400, 0x2800,
    0x2804, 0x2808, 0x2810, 0x2818, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x5200, 0x5400, 0x5404,
];

/// Guest RAM of the e1000 fuzzer: rings and buffers live in its first
/// 64 KiB (so random addresses hit them), the rest is there to be pointed at.
const E1000_RAM: u64 = 1 << 20;

/// One action against an e1000.
#[derive(Arbitrary, Debug, Clone)]
pub enum E1000Op {
    /// Write a register: `which` picks one of [`E1000_REGS`] or, past
    /// them, a raw offset.
    Write {
        which: u16,
        value: u32,
        size: u8,
    },
    Read {
        which: u16,
        size: u8,
    },
    /// Through the I/O BAR (IOADDR/IODATA).
    IoWrite {
        offset: u8,
        value: u32,
    },
    IoRead {
        offset: u8,
    },
    /// The guest writes descriptors or data.
    Memory {
        at: u16,
        bytes: Vec<u8>,
    },
    /// A descriptor at `index` of a ring at 0x1000 or 0x2000.
    Descriptor {
        rx: bool,
        index: u8,
        addr: u16,
        word: u64,
    },
    /// A frame arrives from the network.
    Frame {
        bytes: Vec<u8>,
        broadcast: bool,
    },
    /// PCI command register (bus master, INTx disable).
    Command {
        value: u16,
    },
    /// VM time passes (interrupt throttling).
    Advance {
        ns: u32,
    },
}

/// A backend that records nothing and hands out queued frames.
struct FuzzWire(Arc<Mutex<std::collections::VecDeque<devices::virtio::net::RxFrame>>>);

impl devices::virtio::net::NetBackend for FuzzWire {
    fn send(&mut self, _h: &devices::virtio::net::NetHeader, frame: &[u8]) {
        assert!(
            frame.len() <= devices::e1000::MAX_TX_FRAME + 4,
            "frame too long"
        );
    }
    fn recv(&mut self) -> Option<devices::virtio::net::RxFrame> {
        self.0.lock().expect("wire").pop_front()
    }
    fn unrecv(&mut self, frame: devices::virtio::net::RxFrame) {
        self.0.lock().expect("wire").push_front(frame);
    }
}

thread_local! {
    static E1000_MEM: RefCell<Option<devices::virtio::GuestMemory>> = const { RefCell::new(None) };
}

/// An e1000 session: register accesses, descriptor memory, received
/// frames and time, against a fresh device. It must never panic, hang or
/// send a frame longer than the device allows.
pub fn e1000(data: &[u8]) {
    use devices::pci::PciDevice;
    let mut u = Unstructured::new(data);
    let Ok(ops) = Vec::<E1000Op>::arbitrary(&mut u) else {
        return;
    };
    let mem = E1000_MEM.with(|m| {
        m.borrow_mut()
            .get_or_insert_with(|| {
                devices::virtio::GuestMemory::from(
                    devices::guest_memory::GuestMemory::from_ranges(&[(
                        GuestAddress(0),
                        E1000_RAM as usize,
                    )])
                    .expect("guest memory"),
                )
            })
            .clone()
    });
    // Fresh contents for every input.
    let zero = vec![0u8; 0x10000];
    mem.write_slice(&zero, GuestAddress(0)).expect("clear");
    let clock = ManualClock::new();
    let wire = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let mut dev = devices::e1000::E1000::new(
        "e1000",
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Box::new(FuzzWire(wire.clone())),
        mem.clone(),
        Box::new(NullIrq),
        Arc::new(clock.clone()),
    );
    dev.write_config(4, &7u16.to_le_bytes());
    for op in ops.into_iter().take(MAX_OPS) {
        match op {
            E1000Op::Write { which, value, size } => {
                let off = match E1000_REGS.get(usize::from(which)) {
                    Some(&r) => u64::from(r),
                    None => u64::from(which) * 4 % devices::e1000::MMIO_BAR_LEN,
                };
                let n = [1usize, 2, 4][usize::from(size % 3)];
                dev.write_bar(0, off, &value.to_le_bytes()[..n]);
            }
            E1000Op::Read { which, size } => {
                let off = match E1000_REGS.get(usize::from(which)) {
                    Some(&r) => u64::from(r),
                    None => u64::from(which) * 4 % devices::e1000::MMIO_BAR_LEN,
                };
                let n = [1usize, 2, 4][usize::from(size % 3)];
                let mut b = [0u8; 4];
                dev.read_bar(0, off, &mut b[..n]);
            }
            E1000Op::IoWrite { offset, value } => {
                dev.write_bar(1, u64::from(offset % 64), &value.to_le_bytes())
            }
            E1000Op::IoRead { offset } => {
                let mut b = [0u8; 4];
                dev.read_bar(1, u64::from(offset % 64), &mut b);
            }
            E1000Op::Memory { at, bytes } => {
                let n = bytes.len().min(0x1_0000 - usize::from(at));
                let _ = mem.write_slice(&bytes[..n], GuestAddress(u64::from(at)));
            }
            E1000Op::Descriptor {
                rx,
                index,
                addr,
                word,
            } => {
                let ring = if rx { 0x2000u64 } else { 0x1000 };
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&u64::from(addr).to_le_bytes());
                d[8..].copy_from_slice(&word.to_le_bytes());
                let _ = mem.write_slice(&d, GuestAddress(ring + u64::from(index) * 16));
            }
            E1000Op::Frame {
                mut bytes,
                broadcast,
            } => {
                bytes.truncate(20_000);
                if broadcast && bytes.len() >= 6 {
                    bytes[..6].fill(0xff);
                }
                let mut w = wire.lock().expect("wire");
                if w.len() < 64 {
                    w.push_back(devices::virtio::net::RxFrame {
                        header: [0; devices::virtio::net::HDR_LEN],
                        data: bytes,
                    });
                }
            }
            E1000Op::Command { value } => dev.write_config(4, &value.to_le_bytes()),
            E1000Op::Advance { ns } => {
                clock.advance_by(u64::from(ns));
                let now = clock.now_ns();
                if dev.next_deadline().is_some_and(|d| d <= now) {
                    dev.advance(now);
                }
            }
        }
        dev.poll();
    }
}
