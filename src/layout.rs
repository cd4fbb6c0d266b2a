//! The PC memory map and every device address and port duet uses, in one
//! place.
//!
//! ```text
//! 0x0000_0000 .. 0x000a_0000   low RAM (640 KiB)
//! 0x000a_0000 .. 0x0010_0000   legacy hole (VGA window, option ROMs, BIOS)
//! 0x0010_0000 .. min(RAM, 3 GiB)  RAM
//! 0xc000_0000 .. 0x1_0000_0000  32-bit MMIO gap:
//!     0xc000_0000 .. 0xe000_0000  PCI 32-bit memory window (BARs)
//!     0xe000_0000 .. 0xe010_0000  PCI ECAM (MMCONFIG) for bus 0
//!     0xfe00_0000 .. 0xfe02_0000  virtio-mmio devices (4 KiB each, in the DSDT)
//!     0xfec0_0000                 IOAPIC
//!     0xfed0_0000                 HPET (1 KiB, in the ACPI HPET table)
//!     0xfee0_0000                 local APIC (and the MSI window)
//! 0x1_0000_0000 ..               RAM that did not fit below the gap
//! ```

use vm_memory::GuestAddress;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// End of conventional memory.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Start of extended memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 3 * GIB;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// Where RAM resumes above the gap.
pub const HIGH_MEM_START: u64 = 4 * GIB;

/// Smallest guest memory duet accepts.
pub const MIN_MEMORY: u64 = 2 * MIB;
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 * MIB;

/// IOAPIC and local APIC (used from issue 4 on; reserved in the gap now).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The HPET's register block.
pub const HPET_BASE: u64 = devices::hpet::DEFAULT_BASE;

/// PCI: the windows BARs are placed in, ECAM, and the buses.
pub mod pci {
    /// The 32-bit memory window of the host bridge (`_CRS`).
    pub const MEM32_BASE: u64 = 0xc000_0000;
    pub const MEM32_SIZE: u64 = 0x2000_0000;
    /// ECAM (MMCONFIG): 1 MiB per bus; bus 0 only.
    pub const ECAM_BASE: u64 = 0xe000_0000;
    pub const ECAM_SIZE: u64 = devices::pci::root::ECAM_BUS_LEN * (LAST_BUS as u64 + 1);
    pub const LAST_BUS: u8 = 0;
    /// The I/O window BARs are placed in (above the legacy ports, below
    /// the end of the 16-bit port space).
    pub const IO_BASE: u16 = 0xc000;
    pub const IO_SIZE: u16 = 0x4000;
}

/// virtio-mmio: one 4 KiB register block per device, described to the
/// guest in the DSDT (`LNRO0005`), each with an interrupt line.
pub mod virtio_mmio {
    pub const BASE: u64 = 0xfe00_0000;
    pub const SLOT_SIZE: u64 = 0x1000;
    pub const SLOTS: u64 = 32;
    /// The lines: IOAPIC pins 20–23 (level-triggered, active-low, like
    /// the PCI INTx lines 16–19), shared round-robin beyond four devices.
    pub const GSI_BASE: u32 = 20;
    pub const GSI_COUNT: u32 = 4;

    /// Register block and line of the `n`th virtio-mmio device.
    pub fn slot(n: u64) -> Option<(u64, u32)> {
        (n < SLOTS).then(|| (BASE + n * SLOT_SIZE, GSI_BASE + (n as u32 % GSI_COUNT)))
    }
}

/// Where the kernel loaders and firmware tables put things in low memory.
pub mod boot {
    /// GDT for the 32-bit boot entry (0x10 code, 0x18 data).
    pub const GDT: u64 = 0x500;
    /// PVH hvm_start_info, its module list and memory map.
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_MODLIST: u64 = 0x6040;
    pub const PVH_MEMMAP: u64 = 0x6100;
    /// Linux zero page (boot_params).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Multiboot information, module list and memory map.
    pub const MULTIBOOT_INFO: u64 = 0x8000;
    pub const MULTIBOOT_MODS: u64 = 0x8100;
    pub const MULTIBOOT_MMAP: u64 = 0x8200;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 0x1_0000;
    /// Extended BIOS data area: the MP table lives here.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// The BIOS area 0xe0000..0x100000: ACPI tables, RSDP at its start.
    pub const BIOS_START: u64 = 0xe_0000;
    pub const RSDP: u64 = 0xe_0000;
    /// ACPI PM1a event/control blocks and PM timer (12 ports).
    pub const ACPI_PM_BASE: u16 = 0x600;
    /// The MP floating pointer and configuration table (in the EBDA).
    pub const MPTABLE: u64 = EBDA_START;
}

/// Port I/O.
pub mod ports {
    /// 8259A PIC pair: master command/data, slave command/data, and the
    /// edge/level control registers.
    pub const PIC_MASTER: u16 = 0x20;
    pub const PIC_SLAVE: u16 = 0xa0;
    pub const ELCR: u16 = 0x4d0;
    /// 8254 PIT: channels 0-2 and the mode register.
    pub const PIT: u16 = 0x40;
    /// System control port B (speaker gate, PIT channel 2 output, refresh).
    pub const SYSTEM_CONTROL_B: u16 = 0x61;
    /// RTC/CMOS index and data.
    pub const RTC: u16 = 0x70;
    /// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8 (with the
    /// reset control register at 0xcf9 inside it) and CONFIG_DATA at 0xcfc.
    pub const PCI_CONFIG: u16 = 0xcf8;
    /// COM1 16550A UART.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_LEN: u16 = 8;
    /// i8042 keyboard controller data and command/status ports.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// POST code port (ignored).
    pub const POST_CODE: u16 = 0x80;
    /// QEMU isa-debug-exit compatible ports: 4 wide (QEMU's `iosize=4`),
    /// so 1-, 2- and 4-byte writes at the base all reach it.
    pub const DEBUG_EXIT: u16 = 0xf4;
    pub const DEBUG_EXIT_LEN: u16 = 4;
    /// Reset control register (the FADT's RESET_REG).
    pub const RESET_CONTROL: u16 = 0xcf9;
}

/// The guest-physical RAM ranges for `size` bytes of memory.
///
/// RAM is one range from 0 (the legacy hole stays RAM-backed, as in QEMU,
/// where ROM shadows live; nothing is mapped over it yet) up to the MMIO
/// gap, and the remainder above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let below = size.min(MMIO_GAP_START);
    let mut v = vec![(GuestAddress(0), below as usize)];
    if size > below {
        v.push((GuestAddress(HIGH_MEM_START), (size - below) as usize));
    }
    v
}

/// The e820-style view of RAM the guest should be told about: usable RAM
/// excludes the legacy hole.
pub fn usable_ram(size: u64) -> Vec<(u64, u64)> {
    let below = size.min(MMIO_GAP_START);
    let mut v = vec![(0, LOW_RAM_END.min(below))];
    if below > HIGH_RAM_START {
        v.push((HIGH_RAM_START, below - HIGH_RAM_START));
    }
    if size > below {
        v.push((HIGH_MEM_START, size - below));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        let r = ram_ranges(256 * MIB);
        assert_eq!(r, vec![(GuestAddress(0), (256 * MIB) as usize)]);
        assert_eq!(
            usable_ram(256 * MIB),
            vec![(0, LOW_RAM_END), (HIGH_RAM_START, 255 * MIB)]
        );
    }

    #[test]
    fn large_memory_splits_around_the_gap() {
        let r = ram_ranges(5 * GIB);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize)
            ]
        );
        let u = usable_ram(5 * GIB);
        assert_eq!(u[2], (4 * GIB, 2 * GIB));
        // Nothing usable overlaps the gap or the legacy hole.
        for (s, l) in u {
            assert!(s + l <= MMIO_GAP_START || s >= MMIO_GAP_END);
            assert!(s + l <= LOW_RAM_END || s >= HIGH_RAM_START);
        }
    }
}
