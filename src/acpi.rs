//! ACPI tables, built with the `acpi_tables` crate: RSDP → XSDT → FADT
//! (with FACS and DSDT) and MADT. They describe what duet's machine has:
//! one local APIC per vCPU, the IOAPIC with the ISA interrupt source
//! overrides, the PM1 registers and PM timer (a time reference Linux
//! trusts on a slow CPU), the S5 sleep state for power-off, the reset
//! register, the legacy devices and the PCI host bridge (`PCI0`, with its
//! windows and INTx routing) in the DSDT, and ECAM in the MCFG (reserved
//! by a motherboard-resources device and in the E820 map, so that Linux
//! uses it).
//!
//! Everything lives in the BIOS area at [`boot::RSDP`] (0xe0000), where the
//! legacy RSDP scan also finds it.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, Aml};
use acpi_tables::{facs::FACS, rsdp::Rsdp, xsdt::XSDT};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::GuestMemory;
use crate::layout::{self, boot, ports};

const OEM_ID: [u8; 6] = *b"DUET  ";
const OEM_TABLE: [u8; 8] = *b"DUETVM  ";
const OEM_REVISION: u32 = 1;

/// The SCI interrupt (ISA IRQ 9, level, active high).
pub const SCI_IRQ: u8 = 9;

/// What the tables describe.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    pub cpus: u32,
    /// virtio-mmio devices, in the order Linux should find them.
    pub virtio_mmio: Vec<VirtioMmioAcpi>,
    /// The HPET's event timer block ID (the low half of its capabilities
    /// register), when the machine has one at [`layout::HPET_BASE`].
    pub hpet_block_id: Option<u32>,
}

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioAcpi {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// A virtio-mmio device (`LNRO0005`, the ID Linux's virtio_mmio driver
/// matches through ACPI): its register block and its interrupt,
/// level-triggered, active-low and shareable like the PCI lines it sits
/// beside on the IOAPIC.
fn virtio_mmio_device(index: usize, d: &VirtioMmioAcpi) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
    let irq = aml::Interrupt::new(true, false, true, true, d.gsi);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    let one = aml::ONE;
    bytes_of(&aml::Device::new(
        format!("VR{index:02X}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &one),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(usize),
    #[error("writing ACPI tables into guest memory: {0}")]
    Memory(String),
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16, bits: u8) -> GAS {
    let size = match bits {
        8 => AccessSize::ByteAccess,
        16 => AccessSize::WordAccess,
        _ => AccessSize::DwordAccess,
    };
    GAS::new(AddressSpace::SystemIo, bits, 0, size, u64::from(port))
}

/// A legacy ISA device: `_HID` (EISA id), optional `_UID`, and `_CRS` with
/// fixed I/O ranges and one interrupt.
fn isa_device(name: &str, hid: &str, uid: Option<u8>, io: &[(u16, u8)], irq: u32) -> Vec<u8> {
    let ios: Vec<aml::IO> = io
        .iter()
        .map(|&(port, len)| aml::IO::new(port, port, 1, len))
        .collect();
    let irq = aml::Interrupt::new(true, true, false, false, irq);
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    res.push(&irq);
    let crs = aml::ResourceTemplate::new(res);
    let hid = aml::EISAName::new(hid);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let uid_value = uid.unwrap_or(0);
    let uid_obj = aml::Name::new("_UID".into(), &uid_value);
    let mut children: Vec<&dyn Aml> = vec![&hid_name];
    if uid.is_some() {
        children.push(&uid_obj);
    }
    children.push(&crs_name);
    bytes_of(&aml::Device::new(name.into(), children))
}

/// The PCI host bridge of segment 0, bus 0: `_CRS` with the bus number,
/// the configuration ports, the I/O windows around them and the 32-bit
/// memory window, and a `_PRT` routing every slot's INTA#–INTD# to the
/// IOAPIC's PCI lines (the swizzle of [`crate::irqchip::pci_intx_gsi`];
/// GSIs named in a `_PRT` are level-triggered, active-low).
fn pci_host_bridge() -> Vec<u8> {
    use crate::layout::pci;
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, u16::from(pci::LAST_BUS));
    let config = aml::IO::new(ports::PCI_CONFIG, ports::PCI_CONFIG, 1, 8);
    let io_low = aml::AddressSpace::<u16>::new_io(0, ports::PCI_CONFIG - 1, None);
    let io_high = aml::AddressSpace::<u16>::new_io(ports::PCI_CONFIG + 8, 0xffff, None);
    let mem32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MEM32_BASE as u32,
        (pci::MEM32_BASE + pci::MEM32_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config, &io_low, &io_high, &mem32]);
    // _PRT entries: (address: slot << 16 | 0xffff, pin 0-3, source 0, GSI).
    let entries: Vec<(u32, u8, u32)> = (0..32u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                (
                    u32::from(slot) << 16 | 0xffff,
                    pin,
                    crate::irqchip::pci_intx_gsi(slot, pin + 1),
                )
            })
        })
        .collect();
    let zero = 0u8;
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &zero, gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());
    let zero_u = 0u8;
    let children: Vec<aml::Name> = vec![
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &zero_u),
        aml::Name::new("_SEG".into(), &zero_u),
        aml::Name::new("_UID".into(), &zero_u),
        aml::Name::new("_BBN".into(), &zero_u),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    bytes_of(&aml::Device::new(
        "PCI0".into(),
        children.iter().map(|c| c as &dyn Aml).collect(),
    ))
}

/// Motherboard resources (`PNP0C02`): the ECAM window, which Linux wants
/// reserved here before it trusts the MCFG.
fn motherboard_resources() -> Vec<u8> {
    use crate::layout::pci;
    let hid = aml::EISAName::new("PNP0C02");
    let ecam = aml::Memory32Fixed::new(false, pci::ECAM_BASE as u32, pci::ECAM_SIZE as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    let uid = 0u8;
    bytes_of(&aml::Device::new(
        "MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The MCFG: ECAM for segment 0, buses 0 to [`crate::layout::pci::LAST_BUS`].
pub fn mcfg() -> Vec<u8> {
    use crate::layout::pci;
    let mut t = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    t.add_ecam(pci::ECAM_BASE, 0, 0, pci::LAST_BUS);
    bytes_of(&t)
}

/// The DSDT: the S5 sleep package, the legacy devices, the PCI host bridge
/// and the motherboard resources.
pub fn dsdt() -> Vec<u8> {
    dsdt_with(&AcpiConfig::default())
}

/// The DSDT for `cfg` (its virtio-mmio devices).
pub fn dsdt_with(cfg: &AcpiConfig) -> Vec<u8> {
    let slp = u8::try_from(devices::acpi_pm::S5_SLP_TYP).unwrap_or(5);
    let s5 = bytes_of(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&slp, &slp, &0u8, &0u8]),
    ));
    let mut devices = Vec::new();
    devices.extend(isa_device(
        "COM1",
        "PNP0501",
        Some(1),
        &[(ports::COM1, ports::COM1_LEN as u8)],
        4,
    ));
    devices.extend(isa_device("RTC_", "PNP0B00", None, &[(ports::RTC, 2)], 8));
    devices.extend(isa_device(
        "KBD_",
        "PNP0303",
        None,
        &[(ports::I8042_DATA, 1), (ports::I8042_COMMAND, 1)],
        1,
    ));
    devices.extend(pci_host_bridge());
    devices.extend(motherboard_resources());
    for (i, d) in cfg.virtio_mmio.iter().enumerate() {
        devices.extend(virtio_mmio_device(i, d));
    }
    let sb = aml::Scope::raw("\\_SB_".into(), devices);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    let mut body = s5;
    body.extend(sb);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The MADT: local APICs, the IOAPIC, ISA overrides and the LINT1 NMI.
pub fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_BASE as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259 present
    let mut s = Vec::new();
    for cpu in 0..cfg.cpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags enabled.
        s.extend_from_slice(&[0, 8, cpu as u8, cpu as u8, 1, 0, 0, 0]);
    }
    // IOAPIC: type 1, length 12, ID, reserved, address, GSI base.
    s.extend_from_slice(&[1, 12, 0, 0]);
    s.extend_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides: IRQ0 → GSI2 (conforming), SCI on IRQ9
    // level-triggered active-high.
    for (irq, gsi, flags) in [(0u8, 2u32, 0u16), (SCI_IRQ, u32::from(SCI_IRQ), 0x000d)] {
        s.extend_from_slice(&[2, 10, 0, irq]);
        s.extend_from_slice(&gsi.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
    }
    // Local APIC NMI: all processors (0xff), flags conforming, LINT1.
    s.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&s);
    t.as_slice().to_vec()
}

/// The `HPET` table (IA-PC HPET specification 1.0a, 3.2.4): the event
/// timer block ID, the register block as a 64-bit system-memory GAS, HPET
/// number 0, the minimum periodic tick (in counter ticks: 100 µs at
/// 100 MHz) and no page protection.
pub fn hpet(block_id: u32) -> Vec<u8> {
    let mut t = Sdt::new(*b"HPET", 56, 1, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, block_id);
    // Generic address: system memory (0), 64 bits wide, offset 0, access
    // size undefined, the base.
    t.write_bytes(40, &[0, 64, 0, 0]);
    t.write_u64(44, layout::HPET_BASE);
    t.write_u8(52, 0);
    t.write_u16(53, HPET_MIN_TICK);
    t.write_u8(55, 0);
    t.as_slice().to_vec()
}

/// The minimum periodic tick the HPET table promises (100 µs).
const HPET_MIN_TICK: u16 = 10_000;

/// The FADT, pointing at the FACS and the DSDT.
pub fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let pm = boot::ACPI_PM_BASE;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::PwrButton)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    f.firmware_ctrl = (facs as u32).into();
    f.dsdt = (dsdt as u32).into();
    f.x_firmware_ctrl = facs.into();
    f.x_dsdt = dsdt.into();
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(pm).into();
    f.pm1a_cnt_blk = u32::from(pm + 4).into();
    f.pm_tmr_blk = u32::from(pm + 8).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io_gas(pm, 32);
    f.x_pm1a_cnt_blk = io_gas(pm + 4, 16);
    f.x_pm_tmr_blk = io_gas(pm + 8, 32);
    f.century = 0x32;
    // IA-PC boot architecture: legacy devices, 8042 present.
    f.iapc_boot_arch = 0x0003u16.into();
    f.reset_reg = io_gas(ports::RESET_CONTROL, 8);
    f.reset_value = devices::reset_control::RESET_VALUE;
    bytes_of(&f.finalize())
}

/// Write all tables at [`boot::RSDP`]. Returns the RSDP address.
pub fn write(mem: &GuestMemory, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let base = boot::RSDP;
    let align = |a: u64| (a + 15) & !15;
    let rsdp_len = Rsdp::len() as u64;
    let facs_addr = align(base + rsdp_len);
    let facs = bytes_of(&FACS::new());
    let dsdt_addr = align(facs_addr.max((facs_addr + facs.len() as u64 + 63) & !63));
    let dsdt = dsdt_with(cfg);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(facs_addr, dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cfg);
    let mcfg_addr = align(madt_addr + madt.len() as u64);
    let mcfg = mcfg();
    let hpet_addr = align(mcfg_addr + mcfg.len() as u64);
    let hpet = cfg.hpet_block_id.map(hpet).unwrap_or_default();
    let xsdt_addr = align(hpet_addr + hpet.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    if !hpet.is_empty() {
        xsdt.add_entry(hpet_addr);
    }
    let xsdt = bytes_of(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::HIGH_RAM_START {
        return Err(AcpiError::TooLarge((end - base) as usize));
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, data) in [
        (base, &rsdp),
        (facs_addr, &facs),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (hpet_addr, &hpet),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| AcpiError::Memory(e.to_string()))?;
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [
            dsdt(),
            mcfg(),
            madt(&AcpiConfig {
                cpus: 1,
                ..Default::default()
            }),
            fadt(0xe0040, 0xe0080),
        ] {
            assert!(checksum_ok(&t), "{:?}", &t[..4]);
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len());
        }
    }

    #[test]
    fn hpet_table_names_the_block_and_its_address() {
        let t = hpet(0x8086_a201);
        assert!(checksum_ok(&t));
        assert_eq!(&t[..4], b"HPET");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 56);
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            0x8086_a201
        );
        // GAS: system memory, 64 bits, address.
        assert_eq!((t[40], t[41]), (0, 64));
        let addr = u64::from_le_bytes(t[44..52].try_into().unwrap());
        assert_eq!(addr, layout::HPET_BASE);
        // Written into the XSDT only when the machine has one.
        let mem = crate::machine::create_memory(64 << 20).unwrap();
        let count_hpet = |cfg: &AcpiConfig| {
            write(&mem, cfg).unwrap();
            let mut bios = vec![0u8; 0x2_0000];
            mem.read_slice(&mut bios, GuestAddress(boot::RSDP)).unwrap();
            let xsdt_at = bios.windows(4).position(|w| w == b"XSDT").unwrap();
            let len = u32::from_le_bytes(bios[xsdt_at + 4..xsdt_at + 8].try_into().unwrap());
            bios[xsdt_at + 36..xsdt_at + len as usize]
                .chunks(8)
                .filter(|e| {
                    let a = u64::from_le_bytes((*e).try_into().unwrap()) - boot::RSDP;
                    &bios[a as usize..a as usize + 4] == b"HPET"
                })
                .count()
        };
        let mut cfg = AcpiConfig {
            cpus: 1,
            ..Default::default()
        };
        assert_eq!(count_hpet(&cfg), 0);
        cfg.hpet_block_id = Some(0x8086_a201);
        assert_eq!(count_hpet(&cfg), 1);
    }

    #[test]
    fn madt_lists_the_ioapic_and_the_irq0_override() {
        let m = madt(&AcpiConfig {
            cpus: 2,
            ..Default::default()
        });
        assert_eq!(&m[..4], b"APIC");
        let mut off = 44;
        let mut seen = Vec::new();
        while off < m.len() {
            seen.push((m[off], m.get(off + 3).copied()));
            off += m[off + 1] as usize;
        }
        assert_eq!(seen.iter().filter(|s| s.0 == 0).count(), 2);
        assert!(seen.iter().any(|s| s.0 == 1));
        assert!(seen.contains(&(2, Some(0))));
    }

    #[test]
    fn dsdt_contains_s5_and_com1() {
        let d = dsdt();
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        assert!(has(b"PCI0") && has(b"_PRT") && has(b"MBRD"));
    }

    #[test]
    fn virtio_mmio_devices_are_lnro0005_with_memory_and_interrupt() {
        let cfg = AcpiConfig {
            cpus: 1,
            virtio_mmio: vec![
                VirtioMmioAcpi {
                    base: 0xfe00_0000,
                    len: 0x1000,
                    gsi: 20,
                },
                VirtioMmioAcpi {
                    base: 0xfe00_1000,
                    len: 0x1000,
                    gsi: 21,
                },
            ],
            ..Default::default()
        };
        let d = dsdt_with(&cfg);
        assert!(checksum_ok(&d));
        let count = d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(d.windows(4).any(|w| w == b"VR01"));
        // Memory32Fixed descriptor (0x86) with the second base.
        let base = 0xfe00_1000u32.to_le_bytes();
        assert!(d.windows(8).any(|w| w[0] == 0x86 && w[4..8] == base));
        // Extended interrupt descriptor (0x89): level, active-low, shared.
        let irq = d
            .windows(9)
            .find(|w| w[0] == 0x89 && w[5..9] == 21u32.to_le_bytes());
        let flags = irq.expect("interrupt descriptor")[3];
        assert_eq!(
            flags, 0b1101,
            "shared, active-low, level, consumer: {flags:#x}"
        );
        assert_eq!(dsdt(), dsdt_with(&AcpiConfig::default()));
    }

    #[test]
    fn mcfg_points_at_ecam_for_bus_zero() {
        let m = mcfg();
        assert_eq!(&m[..4], b"MCFG");
        // Header (36) + reserved (8), then base, segment, start and end bus.
        let base = u64::from_le_bytes(m[44..52].try_into().unwrap());
        assert_eq!(base, crate::layout::pci::ECAM_BASE);
        assert_eq!((m[54], m[55]), (0, crate::layout::pci::LAST_BUS));
    }

    #[test]
    fn written_rsdp_points_to_a_valid_xsdt() {
        let mem = crate::machine::create_memory(64 << 20).unwrap();
        let rsdp = write(
            &mem,
            &AcpiConfig {
                cpus: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut h = [0u8; 4];
        mem.read_slice(&mut h, GuestAddress(xsdt)).unwrap();
        assert_eq!(&h, b"XSDT");
    }
}
