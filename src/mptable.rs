//! The Intel MultiProcessor Specification 1.4 table, for kernels booted
//! with `acpi=off` (Debian's generic kernel has MP-table support; its cloud
//! kernel does not and relies on the ACPI MADT). It describes the same
//! machine as the MADT: the local APICs, the IOAPIC, the ISA bus and every
//! ISA IRQ's route (IRQ0 → INTIN2), ExtINT on LINT0 and NMI on LINT1.

use vm_memory::{Bytes, GuestAddress};

use crate::backend::GuestMemory;
use crate::layout::{self, boot};

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("writing the MP table into guest memory: {0}")]
    Memory(String),
    #[error("{0} CPUs do not fit in the MP table area")]
    TooManyCpus(u32),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

const IOAPIC_ID: u8 = 0;
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

/// Build the floating pointer and the configuration table for `cpus`
/// processors, to live at `at`.
pub fn build(cpus: u32, at: u64) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // EN, BP
        entries.extend_from_slice(&[0, cpu as u8, 0x14, flags]);
        entries.extend_from_slice(&0x0000_06f1u32.to_le_bytes()); // family 6 model 15 stepping 1
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, IOAPIC_ID, 0x20, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    // The 8259's output on INTIN0 (ExtINT), then every ISA IRQ.
    let mut io_int = |kind: u8, irq: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, IOAPIC_ID, pin]);
        count += 1;
    };
    io_int(EXTINT, 0, 0);
    for irq in 0..16u8 {
        if irq == 2 {
            continue;
        }
        io_int(INT, irq, crate::irqchip::isa_to_gsi(irq) as u8);
    }
    // Local interrupts: ExtINT → LINT0, NMI → LINT1 on every local APIC.
    entries.extend_from_slice(&[4, EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_at = at + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"DUET    ");
    table.extend_from_slice(b"DUET VM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_at as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Write the MP table into the EBDA.
pub fn write(mem: &GuestMemory, cpus: u32) -> Result<(), MpTableError> {
    let bytes = build(cpus, boot::MPTABLE);
    if boot::MPTABLE + bytes.len() as u64 > layout::LOW_RAM_END {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    mem.write_slice(&bytes, GuestAddress(boot::MPTABLE))
        .map_err(|e| MpTableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let b = build(1, boot::MPTABLE);
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let ptr = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64;
        assert_eq!(ptr, boot::MPTABLE + 16);
    }

    #[test]
    fn irq0_goes_to_intin2() {
        let b = build(1, boot::MPTABLE);
        let found = b
            .windows(8)
            .any(|w| w == [3, INT, 0, 0, 0, 0, IOAPIC_ID, 2]);
        assert!(found);
    }
}
