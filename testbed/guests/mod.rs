//! Built-in guests: small programs assembled at run time with iced-x86's
//! code assembler, each exercising one part of the machine. They talk to the
//! outside world only through the UART (COM1, port 0x3f8) and end with
//! `cli; hlt` (a clean stop, exit status 0) or through the debug-exit port.

use cpu_interp::state::CpuState;

pub mod apic_base;
pub mod asm;
pub mod checksum;
pub mod debug_regs;
pub mod e1000_loop;
pub mod fault;
pub mod hello_real;
pub mod hpet;
pub mod irq_boundary;
pub mod irq_level_eoi;
pub mod irq_masking;
pub mod irq_pit_ioapic;
pub mod irq_pit_pic;
pub mod lapic_timer;
pub mod long_mode;
pub mod pci;
pub mod real_mode_return;
pub mod rtc;
pub mod self_ipi;
pub mod serial_echo;
pub mod swint;
pub mod tsc_pit;
pub mod virtio;

/// A guest program ready to load: byte blobs at guest-physical addresses
/// and the CPU state to start from.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// (guest-physical address, bytes) to copy into RAM before start.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Initial vCPU state (all built-in guests start in real mode).
    pub entry: CpuState,
    /// PCI devices the guest expects (plugged in when it is loaded).
    pub pci_devices: Vec<crate::machine::PciDeviceSpec>,
    /// virtio devices the guest drives (plugged in when it is loaded,
    /// after those of the command line).
    pub virtio_devices: Vec<BuiltinVirtio>,
}

/// A virtio device a built-in guest brings along, backed by memory only
/// (so that runs repeat exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinVirtioKind {
    /// virtio-blk on a 64 KiB disk in memory starting with "DUETDISK".
    Block,
    /// virtio-net whose sent frames come back as received ones.
    NetLoopback,
    /// virtio-console whose host side greets with a fixed line, then
    /// gives back what the guest writes
    /// ([`devices::virtio::console::LoopbackConsole`]).
    ConsoleLoopback,
    /// virtio-rng on the seeded generator `--rng` gets under `--clock
    /// virtual` (whatever the clock: built-in devices repeat exactly).
    Rng,
}

impl BuiltinVirtioKind {
    pub const fn device_type(self) -> u32 {
        match self {
            BuiltinVirtioKind::Block => devices::virtio::device_type::BLOCK,
            BuiltinVirtioKind::NetLoopback => devices::virtio::device_type::NET,
            BuiltinVirtioKind::ConsoleLoopback => devices::virtio::device_type::CONSOLE,
            BuiltinVirtioKind::Rng => devices::virtio::device_type::RNG,
        }
    }
}

/// A built-in guest's virtio device and its transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinVirtio {
    pub kind: BuiltinVirtioKind,
    pub transport: crate::machine::VirtioTransport,
}

/// An entry of the built-in guest list.
pub struct BuiltinGuest {
    pub name: &'static str,
    pub description: &'static str,
    pub build: fn() -> GuestImage,
    /// The guest waits for serial input and never stops without it (runs
    /// that feed it nothing must leave it out).
    pub needs_input: bool,
}

/// Every built-in guest, in the order `duet guests` lists them.
pub fn all() -> &'static [BuiltinGuest] {
    &[
        BuiltinGuest {
            name: hello_real::NAME,
            description: hello_real::DESCRIPTION,
            build: hello_real::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: long_mode::NAME,
            description: long_mode::DESCRIPTION,
            build: long_mode::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: checksum::NAME,
            description: checksum::DESCRIPTION,
            build: checksum::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: fault::NAME,
            description: fault::DESCRIPTION,
            build: fault::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: swint::NAME,
            description: swint::DESCRIPTION,
            build: swint::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: irq_pit_pic::NAME,
            description: irq_pit_pic::DESCRIPTION,
            build: irq_pit_pic::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: irq_pit_ioapic::NAME,
            description: irq_pit_ioapic::DESCRIPTION,
            build: irq_pit_ioapic::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: lapic_timer::NAME,
            description: lapic_timer::DESCRIPTION,
            build: lapic_timer::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: self_ipi::NAME,
            description: self_ipi::DESCRIPTION,
            build: self_ipi::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: irq_boundary::NAME,
            description: irq_boundary::DESCRIPTION,
            build: irq_boundary::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: irq_level_eoi::NAME,
            description: irq_level_eoi::DESCRIPTION,
            build: irq_level_eoi::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: irq_masking::NAME,
            description: irq_masking::DESCRIPTION,
            build: irq_masking::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: rtc::NAME,
            description: rtc::DESCRIPTION,
            build: rtc::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: tsc_pit::NAME,
            description: tsc_pit::DESCRIPTION,
            build: tsc_pit::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: debug_regs::NAME,
            description: debug_regs::DESCRIPTION,
            build: debug_regs::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: apic_base::NAME,
            description: apic_base::DESCRIPTION,
            build: apic_base::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: hpet::NAME,
            description: hpet::DESCRIPTION,
            build: hpet::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: real_mode_return::NAME,
            description: real_mode_return::DESCRIPTION,
            build: real_mode_return::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: pci::NAME,
            description: pci::DESCRIPTION,
            build: pci::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::NAME,
            description: virtio::DESCRIPTION,
            build: virtio::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::WAIT_NAME,
            description: virtio::WAIT_DESCRIPTION,
            build: virtio::build_wait,
            needs_input: true,
        },
        BuiltinGuest {
            name: e1000_loop::NAME,
            description: e1000_loop::DESCRIPTION,
            build: e1000_loop::build,
            needs_input: false,
        },
        BuiltinGuest {
            name: e1000_loop::MOVED_NAME,
            description: e1000_loop::MOVED_DESCRIPTION,
            build: e1000_loop::build_moved,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::NET_LOOP_PCI_NAME,
            description: virtio::NET_LOOP_PCI_DESCRIPTION,
            build: virtio::build_net_loop_pci,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::NET_LOOP_MMIO_NAME,
            description: virtio::NET_LOOP_MMIO_DESCRIPTION,
            build: virtio::build_net_loop_mmio,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::CONSOLE_NAME,
            description: virtio::CONSOLE_DESCRIPTION,
            build: virtio::build_console,
            needs_input: false,
        },
        BuiltinGuest {
            name: virtio::RNG_NAME,
            description: virtio::RNG_DESCRIPTION,
            build: virtio::build_rng,
            needs_input: false,
        },
        BuiltinGuest {
            name: serial_echo::NAME,
            description: serial_echo::DESCRIPTION,
            build: serial_echo::build,
            needs_input: true,
        },
    ]
}

/// Look up a built-in guest by name.
pub fn find(name: &str) -> Option<&'static BuiltinGuest> {
    all().iter().find(|g| g.name == name)
}

/// The guest `duet run` boots when none is named.
pub const DEFAULT_GUEST: &str = "long-mode";
