//! An Intel 82540EM gigabit Ethernet controller ("e1000", PCI 8086:100e),
//! the NIC QEMU emulates by default, as Linux's `e1000` driver uses it.
//! Written from Intel's 8254x Software Developer's Manual (register map,
//! descriptor formats, EEPROM and PHY behaviour).
//!
//! ```text
//!  BAR0 128 KiB MMIO ─┐
//!  BAR1 64 B I/O ─────┤ (IOADDR/IODATA window onto the same registers)
//!                     ▼
//!   registers ── EECD Microwire bit-bang / EERD ──► EEPROM (MAC, IDs, checksum 0xBABA)
//!             ── MDIC ──► PHY (M88E1011: link up, auto-negotiation done)
//!             ── ICR/ICS/IMS/IMC/ITR ──► INTA# (level, throttled by ITR)
//!             ── TDT/TCTL ──► TX ring ──► legacy/context/data descriptors,
//!                                         checksum insertion, TSO ──► NetBackend
//!             ── RDT/RCTL, poll() ──► RX ring ◄── filter (RA, MTA, BAM, UPE/MPE) ◄── NetBackend
//! ```
//!
//! Everything the guest controls is hostile input: ring lengths, heads and
//! tails are checked against the ring before use, every descriptor walk is
//! bounded by the ring size, a frame being assembled never grows past
//! [`MAX_TX_FRAME`], TSO never makes more than [`MAX_TSO_SEGMENTS`]
//! segments, and a descriptor or buffer outside guest RAM stops the ring
//! (logged once) instead of faulting. Unknown registers read zero and
//! ignore writes, as on hardware.
//!
//! Work happens synchronously on the vCPU thread: on writes to TDT/TCTL
//! (transmit) and RDT/RCTL (receive), and when the machine calls
//! [`E1000::poll`] after the backend signalled a received frame. Interrupt
//! throttling (ITR) uses the injected clock and [`Timed`], so it is as
//! deterministic as the VM clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::{Clock, Timed};
use crate::inet::{check_ipv4, fold, get_be16, ones_sum};
use crate::irq::IrqLine;
use crate::pci::config::{command, status, Bar, BarKind, ConfigSpace, ConfigSpaceState, PciId};
use crate::pci::{IntxPin, PciDevice};
use crate::ratelimit::LogOnce;
use crate::state::StateError;
use crate::virtio::net::{GuestOffloads, NetBackend, NetHeader, RxFrame};
use crate::virtio::GuestMemory;

pub const VENDOR_ID: u16 = 0x8086;
/// 82540EM (desktop).
pub const DEVICE_ID: u16 = 0x100e;
pub const REVISION: u8 = 3;
/// Network controller, Ethernet.
pub const CLASS: u32 = 0x02_0000;
pub const SUBSYSTEM_ID: u16 = 0x001e;

/// BAR 0: the registers.
pub const MMIO_BAR: u8 = 0;
pub const MMIO_BAR_LEN: u64 = 0x2_0000;
/// BAR 1: IOADDR (0) and IODATA (4).
pub const IO_BAR: u8 = 1;
pub const IO_BAR_LEN: u64 = 0x40;

/// Largest frame the transmit path assembles (a 64 KiB TSO payload and
/// its headers); longer frames are dropped.
pub const MAX_TX_FRAME: usize = 0x1_0000 + 0x400;
/// Most segments one TSO frame may be cut into (64 KiB / the smallest MSS
/// Linux uses, with room to spare).
pub const MAX_TSO_SEGMENTS: usize = 2048;
/// Frames shorter than this are padded on receive (a minimal Ethernet
/// frame without its FCS).
const MIN_FRAME: usize = 60;
/// Bytes of a descriptor (every kind).
const DESC_LEN: u64 = 16;
/// Most frames received per poll (the backend's queue is finite anyway).
const RX_BURST: usize = 512;

/// Register offsets (8254x SDM, 13.4).
pub mod reg {
    pub const CTRL: u32 = 0x0000;
    pub const STATUS: u32 = 0x0008;
    pub const EECD: u32 = 0x0010;
    pub const EERD: u32 = 0x0014;
    pub const CTRL_EXT: u32 = 0x0018;
    pub const FLA: u32 = 0x001c;
    pub const MDIC: u32 = 0x0020;
    pub const FCAL: u32 = 0x0028;
    pub const FCAH: u32 = 0x002c;
    pub const FCT: u32 = 0x0030;
    pub const VET: u32 = 0x0038;
    pub const ICR: u32 = 0x00c0;
    pub const ITR: u32 = 0x00c4;
    pub const ICS: u32 = 0x00c8;
    pub const IMS: u32 = 0x00d0;
    pub const IMC: u32 = 0x00d8;
    pub const RCTL: u32 = 0x0100;
    pub const FCTTV: u32 = 0x0170;
    pub const TXCW: u32 = 0x0178;
    pub const RXCW: u32 = 0x0180;
    pub const TCTL: u32 = 0x0400;
    pub const TIPG: u32 = 0x0410;
    pub const LEDCTL: u32 = 0x0e00;
    pub const PBA: u32 = 0x1000;
    pub const FCRTL: u32 = 0x2160;
    pub const FCRTH: u32 = 0x2168;
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    pub const RDTR: u32 = 0x2820;
    pub const RXDCTL: u32 = 0x2828;
    pub const RADV: u32 = 0x282c;
    pub const RSRPD: u32 = 0x2c00;
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    pub const TIDV: u32 = 0x3820;
    pub const TXDCTL: u32 = 0x3828;
    pub const TADV: u32 = 0x382c;
    pub const TSPMT: u32 = 0x3830;
    /// Statistics: 64 clear-on-read dwords.
    pub const STATS: u32 = 0x4000;
    pub const STATS_END: u32 = 0x4100;
    pub const RXCSUM: u32 = 0x5000;
    pub const MTA: u32 = 0x5200;
    pub const MTA_END: u32 = 0x5400;
    pub const RA: u32 = 0x5400;
    pub const RA_END: u32 = 0x5480;
    pub const VFTA: u32 = 0x5600;
    pub const VFTA_END: u32 = 0x5800;
    pub const WUC: u32 = 0x5800;
    pub const WUFC: u32 = 0x5808;
    pub const WUS: u32 = 0x5810;
    pub const MANC: u32 = 0x5820;
    pub const IPAV: u32 = 0x5838;
    pub const WUPL: u32 = 0x5900;
}

/// Registers whose writes act at once or are read back at once: never
/// coalesced (QEMU's list, plus CTRL for its reset, the EEPROM interfaces
/// and IMC). Writes to every other register of BAR 0 may wait.
pub const NOT_COALESCED: [u32; 11] = [
    reg::CTRL,
    reg::EECD,
    reg::EERD,
    reg::MDIC,
    reg::ICR,
    reg::ICS,
    reg::IMS,
    reg::IMC,
    reg::RCTL,
    reg::TCTL,
    reg::TDT,
];

/// The ranges of BAR 0 (offset, length) whose writes may be coalesced.
pub fn coalesced_ranges() -> Vec<(u64, u64)> {
    let mut cut: Vec<u64> = NOT_COALESCED.iter().map(|&r| u64::from(r)).collect();
    cut.sort_unstable();
    let mut v = Vec::new();
    let mut start = 0u64;
    for c in cut {
        if c > start {
            v.push((start, c - start));
        }
        start = c + 4;
    }
    v.push((start, MMIO_BAR_LEN - start));
    v
}

/// Statistics registers the device counts (offsets into the block).
pub mod stat {
    pub const GPRC: u32 = 0x4074;
    pub const BPRC: u32 = 0x4078;
    pub const MPRC: u32 = 0x407c;
    pub const GPTC: u32 = 0x4080;
    pub const GORCL: u32 = 0x4088;
    pub const GOTCL: u32 = 0x4090;
    pub const RNBC: u32 = 0x40a0;
    pub const TORL: u32 = 0x40c0;
    pub const TOTL: u32 = 0x40c8;
    pub const TPR: u32 = 0x40d0;
    pub const TPT: u32 = 0x40d4;
    pub const MPTC: u32 = 0x40f0;
    pub const BPTC: u32 = 0x40f4;
    pub const TSCTC: u32 = 0x40f8;
}

/// CTRL bits.
pub mod ctrl {
    pub const FD: u32 = 1 << 0;
    pub const SLU: u32 = 1 << 6;
    pub const SPEED_1000: u32 = 2 << 8;
    pub const RST: u32 = 1 << 26;
    pub const VME: u32 = 1 << 30;
    pub const PHY_RST: u32 = 1 << 31;
}

/// STATUS bits.
pub mod status_bits {
    pub const FD: u32 = 1 << 0;
    pub const LU: u32 = 1 << 1;
    pub const SPEED_1000: u32 = 2 << 6;
    pub const ASDV_1000: u32 = 2 << 8;
    pub const MTXCKOK: u32 = 1 << 10;
    pub const GIO_MASTER_EN: u32 = 1 << 19;
}

/// EECD bits.
pub mod eecd {
    pub const SK: u32 = 1 << 0;
    pub const CS: u32 = 1 << 1;
    pub const DI: u32 = 1 << 2;
    pub const DO: u32 = 1 << 3;
    pub const FWE: u32 = 3 << 4;
    pub const REQ: u32 = 1 << 6;
    pub const GNT: u32 = 1 << 7;
    pub const PRES: u32 = 1 << 8;
    /// Clear: a 64-word Microwire part (6 address bits).
    pub const SIZE: u32 = 1 << 9;
}

/// EERD fields.
pub mod eerd {
    pub const START: u32 = 1 << 0;
    pub const DONE: u32 = 1 << 4;
    pub const ADDR_SHIFT: u32 = 8;
    pub const DATA_SHIFT: u32 = 16;
}

/// MDIC fields.
pub mod mdic {
    pub const DATA_MASK: u32 = 0xffff;
    pub const REG_SHIFT: u32 = 16;
    pub const PHY_SHIFT: u32 = 21;
    pub const OP_WRITE: u32 = 1 << 26;
    pub const OP_READ: u32 = 2 << 26;
    pub const READY: u32 = 1 << 28;
    pub const INT_EN: u32 = 1 << 29;
    pub const ERROR: u32 = 1 << 30;
}

/// Interrupt cause bits (ICR, ICS, IMS, IMC).
pub mod icr {
    pub const TXDW: u32 = 1 << 0;
    pub const TXQE: u32 = 1 << 1;
    pub const LSC: u32 = 1 << 2;
    pub const RXSEQ: u32 = 1 << 3;
    pub const RXDMT0: u32 = 1 << 4;
    pub const RXO: u32 = 1 << 6;
    pub const RXT0: u32 = 1 << 7;
    pub const MDAC: u32 = 1 << 9;
    /// Causes the 82540EM implements.
    pub const ALL: u32 = 0x0001_f6df;
}

/// RCTL bits.
pub mod rctl {
    pub const EN: u32 = 1 << 1;
    pub const UPE: u32 = 1 << 3;
    pub const MPE: u32 = 1 << 4;
    pub const LPE: u32 = 1 << 5;
    pub const RDMTS_SHIFT: u32 = 8;
    pub const MO_SHIFT: u32 = 12;
    pub const BAM: u32 = 1 << 15;
    pub const BSIZE_SHIFT: u32 = 16;
    pub const BSEX: u32 = 1 << 25;
    pub const SECRC: u32 = 1 << 26;
}

/// TCTL bits.
pub mod tctl {
    pub const EN: u32 = 1 << 1;
    pub const PSP: u32 = 1 << 3;
}

/// Transmit descriptor command bits (legacy CMD, extended DCMD/TUCMD).
pub mod txd {
    pub const EOP: u8 = 1 << 0;
    pub const IFCS: u8 = 1 << 1;
    /// Legacy: insert checksum (CSO/CSS). Context: TUCMD.IP (IPv4).
    pub const IC: u8 = 1 << 2;
    pub const RS: u8 = 1 << 3;
    pub const RPS: u8 = 1 << 4;
    pub const DEXT: u8 = 1 << 5;
    pub const VLE: u8 = 1 << 6;
    /// TUCMD: TCP (set) or UDP (clear).
    pub const TUCMD_TCP: u8 = 1 << 0;
    /// TUCMD: the IP header is IPv4.
    pub const TUCMD_IP: u8 = 1 << 1;
    /// TUCMD/DCMD: TCP segmentation.
    pub const TSE: u8 = 1 << 2;
    /// POPTS: insert the IP checksum.
    pub const POPTS_IXSM: u8 = 1 << 0;
    /// POPTS: insert the TCP/UDP checksum.
    pub const POPTS_TXSM: u8 = 1 << 1;
    /// Descriptor type (DTYP): context 0, data 1.
    pub const DTYP_DATA: u8 = 1;
    /// Status: descriptor done.
    pub const STA_DD: u8 = 1 << 0;
}

/// Receive descriptor status bits.
pub mod rxd {
    pub const DD: u8 = 1 << 0;
    pub const EOP: u8 = 1 << 1;
    /// Ignore the checksum indication: the driver checks in software.
    pub const IXSM: u8 = 1 << 2;
    pub const VP: u8 = 1 << 3;
    /// The TCP/UDP checksum was checked (RXCSUM.TUOFL).
    pub const TCPCS: u8 = 1 << 5;
    /// The IPv4 header checksum was checked (RXCSUM.IPOFL).
    pub const IPCS: u8 = 1 << 6;
    /// Errors byte: the checked TCP/UDP checksum is wrong.
    pub const ERR_TCPE: u8 = 1 << 5;
    /// Errors byte: the checked IPv4 header checksum is wrong.
    pub const ERR_IPE: u8 = 1 << 6;
}

/// RXCSUM: receive checksum offload control. (Its packet checksum start,
/// PCSS, is kept but unused: the descriptor's packet checksum field reads
/// 0, as before; Linux's driver ignores it on this part.)
pub mod rxcsum {
    /// Check IPv4 header checksums.
    pub const IPOFL: u32 = 1 << 8;
    /// Check TCP and UDP checksums (over IPv4).
    pub const TUOFL: u32 = 1 << 9;
}

/// PHY registers (IEEE 802.3 clause 22 and the M88E1011's own).
pub mod phy {
    pub const ADDRESS: u32 = 1;
    pub const BMCR: usize = 0;
    pub const BMSR: usize = 1;
    pub const ID1: usize = 2;
    pub const ID2: usize = 3;
    pub const ANAR: usize = 4;
    pub const ANLPAR: usize = 5;
    pub const ANER: usize = 6;
    pub const GTCR: usize = 9;
    pub const GTSR: usize = 10;
    pub const EXT_STATUS: usize = 15;
    pub const SPEC_CTRL: usize = 16;
    pub const SPEC_STATUS: usize = 17;
    pub const EXT_SPEC_CTRL: usize = 20;
    pub const BMCR_RESET: u16 = 1 << 15;
    pub const BMCR_RESTART_AN: u16 = 1 << 9;
    pub const BMSR_LINK: u16 = 1 << 2;
    pub const BMSR_AN_COMPLETE: u16 = 1 << 5;
    /// M88E1011's identifier (Linux checks it against M88E1011_I_PHY_ID).
    pub const M88E1011_ID1: u16 = 0x0141;
    pub const M88E1011_ID2: u16 = 0x0c20;
}

/// EEPROM words.
pub mod eeprom {
    pub const WORDS: usize = 64;
    /// Words 0..=2: the MAC address.
    pub const MAC: usize = 0;
    pub const INIT_CONTROL2: usize = 0x0f;
    pub const CHECKSUM: usize = 0x3f;
    /// The sum of every word, checksum included.
    pub const SUM: u16 = 0xbaba;
    /// Microwire READ opcode with its start bit ("110").
    pub const OP_READ: u32 = 0b110;
    pub const ADDR_BITS: u32 = 6;
}

/// The device's counters for `--stats` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct E1000Stats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_tso_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames the receive filter rejected.
    pub rx_filtered: u64,
    /// Frames dropped (too long for the ring, or receive disabled).
    pub rx_dropped: u64,
    pub interrupts: u64,
    /// Interrupts ITR delayed.
    pub throttled: u64,
}

/// The last TX context descriptor (offsets and commands as the driver
/// wrote them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxContext {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    pub tucmd: u8,
    pub hdrlen: u8,
    pub mss: u16,
}

/// The frame being assembled from data descriptors (a frame may span
/// several TDT writes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxFrame {
    pub data: Vec<u8>,
    /// Longer than [`MAX_TX_FRAME`]: dropped at EOP.
    pub oversize: bool,
    /// From the first data descriptor of the frame.
    pub tse: bool,
    pub popts: u8,
    /// Legacy checksum insertion (CSS, CSO) and VLAN tag.
    pub legacy_csum: Option<(u8, u8)>,
    pub vlan: Option<u16>,
    pub started: bool,
}

/// The EEPROM's Microwire interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Microwire {
    /// Last EECD value the driver wrote (SK, CS, DI).
    pub lines: u32,
    pub bits_in: u32,
    pub value_in: u32,
    /// Reading: the bit position (word * 16 + bit) DO presents.
    pub out_pos: Option<u32>,
}

/// Everything an 82540EM keeps, for snapshots and record/replay checks
/// (the EEPROM is rebuilt from the MAC; the backend's queue is host state
/// and not part of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E1000State {
    pub config: ConfigSpaceState,
    pub mac: [u8; 6],
    /// The register file: the non-zero dwords by offset into BAR 0.
    pub regs: BTreeMap<u32, u32>,
    pub phy: [u16; 32],
    pub microwire: Microwire,
    pub ctx: TxContext,
    pub tx: TxFrame,
    pub ioaddr: u32,
    pub line_level: bool,
    pub last_raise_ns: Option<u64>,
    pub throttle_deadline: Option<u64>,
    pub stats: E1000Stats,
}

/// An 82540EM.
pub struct E1000 {
    name: String,
    config: ConfigSpace,
    mem: GuestMemory,
    backend: Box<dyn NetBackend>,
    irq: Box<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    mac: [u8; 6],
    /// The register file, one dword per 4 bytes of BAR 0.
    regs: Vec<u32>,
    eeprom: [u16; eeprom::WORDS],
    phy: [u16; 32],
    microwire: Microwire,
    ctx: TxContext,
    tx: TxFrame,
    /// IOADDR of the I/O window.
    ioaddr: u32,
    line_level: bool,
    /// When INTA# was last raised (for ITR).
    last_raise_ns: Option<u64>,
    /// An interrupt ITR holds back until then.
    throttle_deadline: Option<u64>,
    stats: E1000Stats,
    dma_error: LogOnce,
    bad_ring: LogOnce,
    tso_error: LogOnce,
    /// The received frame as it goes into the ring (VLAN tag stripped,
    /// padded, FCS appended), kept between frames: growing the backend's
    /// buffer in place was a reallocation per frame, across threads.
    rx_frame: Vec<u8>,
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Insert the one's-complement checksum of `buf[css..=cse]` (to the end
/// when `cse` is 0) at `cso`. The field's current value is part of the sum
/// (it holds the pseudo-header sum for TCP/UDP, as the driver leaves it).
fn insert_checksum(buf: &mut [u8], css: usize, cso: usize, cse: usize) {
    let len = buf.len();
    if cso + 2 > len || css >= len {
        return;
    }
    let end = if cse == 0 { len } else { (cse + 1).min(len) };
    if end <= css {
        return;
    }
    let sum = !fold(ones_sum(0, &buf[css..end]));
    put_be16(buf, cso, sum);
}

/// What receive checksum offload reports for `frame` (as it goes to the
/// guest, without FCS): the descriptor's status and error bits. With
/// neither IPOFL nor TUOFL in `rxcsum`, only IXSM (the driver checks in
/// software). Otherwise an IPv4 header is checked under IPOFL, and a TCP
/// or UDP segment that is not a fragment under TUOFL (a UDP checksum of
/// zero means none was sent: not checked).
fn rx_checksum_offload(rxcsum: u32, vet: u16, frame: &[u8]) -> (u8, u8) {
    if rxcsum & (rxcsum::IPOFL | rxcsum::TUOFL) == 0 {
        return (rxd::IXSM, 0);
    }
    let checked = check_ipv4(frame, vet);
    let (mut status, mut errors) = (0u8, 0u8);
    if let (true, Some(ok)) = (rxcsum & rxcsum::IPOFL != 0, checked.header) {
        status |= rxd::IPCS;
        if !ok {
            errors |= rxd::ERR_IPE;
        }
    }
    if let (true, Some(ok)) = (rxcsum & rxcsum::TUOFL != 0, checked.transport) {
        status |= rxd::TCPCS;
        if !ok {
            errors |= rxd::ERR_TCPE;
        }
    }
    (status, errors)
}

/// CRC-32 (IEEE 802.3) of `data`, the frame check sequence (table- and
/// carry-less-multiply-driven: a bit-serial loop here cost a third of the
/// host's time on a received stream).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn default_phy() -> [u16; 32] {
    let mut p = [0u16; 32];
    p[phy::BMCR] = 0x1140; // auto-negotiation on, full duplex, 1000 Mb/s
    p[phy::BMSR] = 0x796d; // link up, auto-negotiation complete, abilities
    p[phy::ID1] = phy::M88E1011_ID1;
    p[phy::ID2] = phy::M88E1011_ID2;
    p[phy::ANAR] = 0x0de1;
    p[phy::ANLPAR] = 0x45e1;
    p[phy::ANER] = 0x000f;
    p[phy::GTCR] = 0x0e00;
    p[phy::GTSR] = 0x3c00; // partner 1000 full/half, receivers OK
    p[phy::EXT_STATUS] = 0x3000;
    p[phy::SPEC_CTRL] = 0x0360;
    p[phy::SPEC_STATUS] = 0xac00; // 1000 Mb/s, full duplex, resolved, link
    p[phy::EXT_SPEC_CTRL] = 0x0d60;
    p
}

/// The EEPROM image: MAC, IDs, flow control, and the checksum word that
/// makes the words sum to 0xBABA.
pub fn eeprom_image(mac: [u8; 6]) -> [u16; eeprom::WORDS] {
    let mut w = [0u16; eeprom::WORDS];
    for i in 0..3 {
        w[eeprom::MAC + i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
    }
    w[0x05] = 0x0520; // image version
    w[0x0a] = 0x4408; // initialization control 1
    w[0x0b] = SUBSYSTEM_ID;
    w[0x0c] = VENDOR_ID; // subsystem vendor
    w[0x0d] = DEVICE_ID;
    w[0x0e] = VENDOR_ID;
    w[eeprom::INIT_CONTROL2] = 0x3040; // full flow control
    w[0x10] = 0x0008; // software-defined pins
    let sum = w[..eeprom::CHECKSUM]
        .iter()
        .fold(0u16, |a, &b| a.wrapping_add(b));
    w[eeprom::CHECKSUM] = eeprom::SUM.wrapping_sub(sum);
    w
}

/// Registers that read back what was written (masked), beyond those with
/// behaviour of their own.
fn plain_mask(offset: u32) -> Option<u32> {
    use reg::*;
    Some(match offset {
        CTRL_EXT | FCAL | FCAH | FCT | FCTTV | TXCW | RXCW | TIPG | LEDCTL | PBA | FCRTL
        | FCRTH | RDBAH | RDTR | RXDCTL | RADV | RSRPD | TDBAH | TIDV | TXDCTL | TADV | TSPMT
        | RXCSUM | WUC | WUFC | WUS | MANC | IPAV | TCTL => !0,
        VET => 0xffff,
        ITR => 0xffff,
        RDBAL | TDBAL => !0xf,
        RDLEN | TDLEN => 0x000f_ff80,
        RDH | RDT | TDH | TDT => 0xffff,
        o if (MTA..MTA_END).contains(&o) => !0,
        o if (RA..RA_END).contains(&o) => !0,
        o if (VFTA..VFTA_END).contains(&o) => !0,
        o if (WUPL..WUPL + 0x400).contains(&o) => !0,
        _ => return None,
    })
}

impl E1000 {
    /// An 82540EM called `name` with address `mac`, its frames going to
    /// `backend`, its INTA# driving `irq`, DMA into `mem`, time from
    /// `clock`.
    pub fn new(
        name: &str,
        mac: [u8; 6],
        mut backend: Box<dyn NetBackend>,
        mem: GuestMemory,
        irq: Box<dyn IrqLine>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut config = ConfigSpace::new(PciId {
            vendor: VENDOR_ID,
            device: DEVICE_ID,
            revision: REVISION,
            class: CLASS,
            subsystem_vendor: VENDOR_ID,
            subsystem: SUBSYSTEM_ID,
        });
        let bars = [
            (
                MMIO_BAR,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                MMIO_BAR_LEN,
            ),
            (IO_BAR, BarKind::Io, IO_BAR_LEN),
        ];
        for (index, kind, size) in bars {
            config
                .add_bar(usize::from(index), Bar { kind, size })
                .expect("e1000 BAR layout is valid");
        }
        config.set_interrupt_pin(IntxPin::IntA as u8);
        // The device does its own offloads: frames leave it complete.
        backend.set_guest_offloads(GuestOffloads::default());
        let mut d = E1000 {
            name: name.to_string(),
            config,
            mem,
            backend,
            irq,
            clock,
            mac,
            regs: vec![0; (MMIO_BAR_LEN / 4) as usize],
            eeprom: eeprom_image(mac),
            phy: default_phy(),
            microwire: Microwire::default(),
            ctx: TxContext::default(),
            tx: TxFrame::default(),
            ioaddr: 0,
            line_level: false,
            last_raise_ns: None,
            throttle_deadline: None,
            stats: E1000Stats::default(),
            dma_error: LogOnce::new(),
            bad_ring: LogOnce::new(),
            tso_error: LogOnce::new(),
            rx_frame: Vec::new(),
        };
        d.reset_registers();
        d
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> E1000Stats {
        self.stats
    }

    /// Counters as one line for `--stats`.
    pub fn describe(&self) -> String {
        let s = self.stats;
        format!(
            "tx {} frames {} B ({} TSO, {} dropped), rx {} frames {} B ({} filtered, {} dropped), \
             {} interrupts ({} throttled){}",
            s.tx_frames,
            s.tx_bytes,
            s.tx_tso_frames,
            s.tx_dropped,
            s.rx_frames,
            s.rx_bytes,
            s.rx_filtered,
            s.rx_dropped,
            s.interrupts,
            s.throttled,
            match self.backend.describe() {
                d if d.is_empty() => String::new(),
                d => format!(", {d}"),
            }
        )
    }

    fn r(&self, offset: u32) -> u32 {
        self.regs[(offset as usize / 4) % self.regs.len()]
    }

    fn set(&mut self, offset: u32, v: u32) {
        let n = self.regs.len();
        self.regs[(offset as usize / 4) % n] = v;
    }

    /// Power-on / CTRL.RST state of the MAC registers; the EEPROM is
    /// reloaded (RAL0/RAH0 get the MAC), the PHY keeps its state.
    fn reset_registers(&mut self) {
        self.regs.fill(0);
        self.set(reg::CTRL, ctrl::SLU | ctrl::FD | ctrl::SPEED_1000);
        self.set(reg::LEDCTL, 0x0706_0302);
        self.set(reg::PBA, 0x0010_0030);
        self.set(reg::VET, 0x8100);
        self.set(reg::TCTL, tctl::PSP);
        self.set(reg::TIPG, 0x0060_200a);
        self.set(reg::TXDCTL, 0x0001_0000);
        self.set(reg::RXDCTL, 0x0001_0000);
        self.set(reg::MANC, 0);
        let m = self.mac;
        self.set(reg::RA, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.set(
            reg::RA + 4,
            u32::from(u16::from_le_bytes([m[4], m[5]])) | 1 << 31,
        );
        self.microwire = Microwire::default();
        self.ctx = TxContext::default();
        self.tx = TxFrame::default();
        self.throttle_deadline = None;
        self.last_raise_ns = None;
        self.update_irq();
    }

    fn status(&self) -> u32 {
        use status_bits::*;
        let link = self.phy[phy::BMSR] & phy::BMSR_LINK != 0;
        FD | SPEED_1000 | ASDV_1000 | MTXCKOK | GIO_MASTER_EN | if link { LU } else { 0 }
    }

    // ---- interrupts -------------------------------------------------

    fn set_cause(&mut self, cause: u32) {
        if cause == 0 {
            return;
        }
        let icr = self.r(reg::ICR) | (cause & icr::ALL);
        self.set(reg::ICR, icr);
        self.update_irq();
    }

    /// Drive INTA# from ICR & IMS, the command register's interrupt
    /// disable bit and the throttling interval.
    fn update_irq(&mut self) {
        let pending = self.r(reg::ICR) & self.r(reg::IMS) != 0;
        self.config.set_status_bits(status::INTERRUPT, pending);
        let level = pending && self.config.command() & command::INTX_DISABLE == 0;
        if !level {
            self.throttle_deadline = None;
            if self.line_level {
                self.line_level = false;
                self.irq.set_level(false);
            }
            return;
        }
        if self.line_level || self.throttle_deadline.is_some() {
            return;
        }
        // ITR: at most one interrupt per ITR × 256 ns.
        let interval = u64::from(self.r(reg::ITR) & 0xffff) * 256;
        let now = self.clock.now_ns();
        if let Some(last) = self.last_raise_ns {
            if interval != 0 && now < last.saturating_add(interval) {
                self.throttle_deadline = Some(last.saturating_add(interval));
                self.stats.throttled += 1;
                return;
            }
        }
        self.last_raise_ns = Some(now);
        self.line_level = true;
        self.stats.interrupts += 1;
        self.irq.set_level(true);
    }

    // ---- EEPROM -----------------------------------------------------

    fn read_eecd(&self) -> u32 {
        let mw = &self.microwire;
        let mut v = (mw.lines & (eecd::SK | eecd::CS | eecd::DI | eecd::FWE | eecd::REQ))
            | eecd::PRES
            | eecd::GNT;
        if let Some(pos) = mw.out_pos {
            let word = self.eeprom[(pos / 16) as usize % eeprom::WORDS];
            if word >> (15 - pos % 16) & 1 != 0 {
                v |= eecd::DO;
            }
        }
        v
    }

    /// The driver bit-bangs the Microwire lines: DI is sampled on SK's
    /// rising edge; after the READ opcode and a 6-bit address, each rising
    /// edge presents the next data bit on DO (reads continue into the
    /// next words). Dropping CS ends the cycle.
    fn write_eecd(&mut self, v: u32) {
        let old = self.microwire.lines;
        self.microwire.lines = v;
        let mw = &mut self.microwire;
        if v & eecd::CS == 0 {
            mw.bits_in = 0;
            mw.value_in = 0;
            mw.out_pos = None;
            return;
        }
        let rising = v & eecd::SK != 0 && old & eecd::SK == 0;
        if !rising {
            return;
        }
        if let Some(pos) = mw.out_pos.as_mut() {
            *pos = pos.wrapping_add(1) % (eeprom::WORDS as u32 * 16);
            return;
        }
        mw.value_in = mw.value_in << 1 | u32::from(v & eecd::DI != 0);
        mw.bits_in += 1;
        if mw.bits_in == 3 + eeprom::ADDR_BITS {
            let op = mw.value_in >> eeprom::ADDR_BITS;
            let addr = mw.value_in & ((1 << eeprom::ADDR_BITS) - 1);
            if op == eeprom::OP_READ {
                // The next rising edge presents bit 15 of word `addr`.
                mw.out_pos =
                    Some((addr * 16 + eeprom::WORDS as u32 * 16 - 1) % (eeprom::WORDS as u32 * 16));
            }
            // Writes and erases are ignored (the part is write-protected).
        }
    }

    fn write_eerd(&mut self, v: u32) {
        if v & eerd::START == 0 {
            self.set(reg::EERD, v & !eerd::DONE);
            return;
        }
        let addr = (v >> eerd::ADDR_SHIFT) & 0xff;
        let data = self.eeprom.get(addr as usize).copied().unwrap_or(0);
        self.set(
            reg::EERD,
            (v & 0xff00) | eerd::DONE | u32::from(data) << eerd::DATA_SHIFT,
        );
    }

    // ---- PHY --------------------------------------------------------

    fn write_mdic(&mut self, v: u32) {
        let phy_addr = (v >> mdic::PHY_SHIFT) & 0x1f;
        let reg_addr = ((v >> mdic::REG_SHIFT) & 0x1f) as usize;
        let mut out = v & !(mdic::READY | mdic::ERROR);
        if phy_addr != phy::ADDRESS {
            out |= mdic::ERROR;
        } else if v & mdic::OP_READ == mdic::OP_READ && v & mdic::OP_WRITE == 0 {
            out = (out & !mdic::DATA_MASK) | u32::from(self.phy[reg_addr]);
        } else if v & mdic::OP_WRITE != 0 && v & mdic::OP_READ == 0 {
            self.write_phy(reg_addr, (v & mdic::DATA_MASK) as u16);
        } else {
            out |= mdic::ERROR;
        }
        out |= mdic::READY;
        self.set(reg::MDIC, out);
        if v & mdic::INT_EN != 0 {
            self.set_cause(icr::MDAC);
        }
    }

    fn write_phy(&mut self, r: usize, v: u16) {
        match r {
            phy::BMCR => {
                if v & phy::BMCR_RESET != 0 {
                    let bmsr = self.phy[phy::BMSR];
                    self.phy = default_phy();
                    self.phy[phy::BMSR] = bmsr;
                    return;
                }
                // Auto-negotiation completes at once; the link stays up.
                self.phy[phy::BMCR] = v & !(phy::BMCR_RESET | phy::BMCR_RESTART_AN);
                if v & phy::BMCR_RESTART_AN != 0 {
                    self.phy[phy::BMSR] |= phy::BMSR_AN_COMPLETE;
                }
            }
            phy::BMSR
            | phy::ID1
            | phy::ID2
            | phy::ANLPAR
            | phy::ANER
            | phy::GTSR
            | phy::EXT_STATUS
            | phy::SPEC_STATUS => {}
            _ => self.phy[r] = v,
        }
    }

    /// Bring the link up or down (the cable), with a link-change interrupt.
    pub fn set_link(&mut self, up: bool) {
        let was = self.phy[phy::BMSR] & phy::BMSR_LINK != 0;
        if was == up {
            return;
        }
        if up {
            self.phy[phy::BMSR] |= phy::BMSR_LINK | phy::BMSR_AN_COMPLETE;
        } else {
            self.phy[phy::BMSR] &= !(phy::BMSR_LINK | phy::BMSR_AN_COMPLETE);
        }
        self.set_cause(icr::LSC);
    }

    // ---- register file ----------------------------------------------

    /// A register as a side-effect-free read would see it (for narrow
    /// writes, which merge into it).
    fn peek(&self, offset: u32) -> u32 {
        match offset {
            reg::STATUS => self.status(),
            reg::EECD => self.read_eecd(),
            _ => self.r(offset),
        }
    }

    /// A dword read of register `offset` (4-aligned, inside BAR 0).
    pub fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            reg::CTRL | reg::EERD | reg::MDIC | reg::IMS | reg::RCTL => self.r(offset),
            reg::STATUS => self.status(),
            reg::EECD => self.read_eecd(),
            reg::ICR => {
                let v = self.r(reg::ICR);
                self.set(reg::ICR, 0);
                self.update_irq();
                v
            }
            reg::ICS | reg::IMC => 0,
            o if (reg::STATS..reg::STATS_END).contains(&o) => {
                let v = self.r(o);
                self.set(o, 0);
                v
            }
            o => match plain_mask(o) {
                Some(_) => self.r(o),
                None => 0,
            },
        }
    }

    /// A dword write of register `offset`.
    pub fn write_register(&mut self, offset: u32, v: u32) {
        match offset {
            reg::CTRL => {
                if v & ctrl::RST != 0 {
                    self.reset_registers();
                    return;
                }
                self.set(reg::CTRL, v & !(ctrl::RST | ctrl::PHY_RST));
            }
            reg::EECD => self.write_eecd(v),
            reg::EERD => self.write_eerd(v),
            reg::MDIC => self.write_mdic(v),
            reg::ICR => {
                let icr = self.r(reg::ICR) & !v;
                self.set(reg::ICR, icr);
                self.update_irq();
            }
            reg::ICS => self.set_cause(v),
            reg::IMS => {
                let ims = self.r(reg::IMS) | (v & icr::ALL);
                self.set(reg::IMS, ims);
                self.update_irq();
            }
            reg::IMC => {
                let ims = self.r(reg::IMS) & !v;
                self.set(reg::IMS, ims);
                self.update_irq();
            }
            reg::ITR => {
                self.set(reg::ITR, v & 0xffff);
            }
            reg::RCTL => {
                self.set(reg::RCTL, v);
                self.receive();
            }
            reg::RDT => {
                self.set(reg::RDT, v & 0xffff);
                self.receive();
            }
            reg::TCTL => {
                self.set(reg::TCTL, v);
                self.transmit();
            }
            reg::TDT => {
                self.set(reg::TDT, v & 0xffff);
                self.transmit();
            }
            o => {
                if let Some(mask) = plain_mask(o) {
                    self.set(o, v & mask);
                }
            }
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        let aligned = (offset & !3) as u32;
        let v = self.read_register(aligned);
        let lane = (offset % 4) as usize;
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(lane + i).copied().unwrap_or(0);
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        let aligned = (offset & !3) as u32;
        let lane = (offset % 4) as usize;
        let mut bytes = if data.len() >= 4 && lane == 0 {
            [0u8; 4]
        } else {
            self.peek(aligned).to_le_bytes()
        };
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(lane + i) {
                *slot = *b;
            }
        }
        self.write_register(aligned, u32::from_le_bytes(bytes));
    }

    fn dma_allowed(&self) -> bool {
        self.config.command() & command::BUS_MASTER != 0
    }

    fn dma_fault(&self, what: &str, addr: u64) {
        if self.dma_error.first() {
            log::warn!(
                "{}: {what} at {addr:#x} is outside guest memory; the ring stops there \
                 (logged once)",
                self.name
            );
        }
    }

    // ---- transmit ---------------------------------------------------

    /// Process descriptors from TDH to TDT (at most one ring's worth).
    fn transmit(&mut self) {
        if self.r(reg::TCTL) & tctl::EN == 0 || !self.dma_allowed() {
            return;
        }
        let count = u64::from(self.r(reg::TDLEN)) / DESC_LEN;
        let base = u64::from(self.r(reg::TDBAH)) << 32 | u64::from(self.r(reg::TDBAL));
        let mut head = u64::from(self.r(reg::TDH));
        let tail = u64::from(self.r(reg::TDT));
        if count == 0 || head >= count || tail >= count {
            if head != tail && self.bad_ring.first() {
                log::warn!(
                    "{}: transmit ring of {count} descriptors with head {head}, tail {tail}: \
                     ignored (logged once)",
                    self.name
                );
            }
            return;
        }
        let mut cause = 0;
        let mut steps = 0;
        while head != tail && steps < count {
            steps += 1;
            let addr = base.wrapping_add(head * DESC_LEN);
            let mut desc = [0u8; DESC_LEN as usize];
            if self.mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
                self.dma_fault("a transmit descriptor", addr);
                break;
            }
            let report = self.tx_descriptor(&desc);
            if report {
                // Write back DD in the status byte.
                let st = desc[12] | txd::STA_DD;
                if self
                    .mem
                    .write_slice(&[st], GuestAddress(addr + 12))
                    .is_err()
                {
                    self.dma_fault("a transmit descriptor", addr);
                    break;
                }
                cause |= icr::TXDW;
            }
            head = (head + 1) % count;
            self.set(reg::TDH, head as u32);
        }
        if head == tail {
            cause |= icr::TXQE;
        }
        self.set_cause(cause);
        // Frames the backend has ready now (a loopback answers at once).
        self.receive();
    }

    /// Handle one descriptor; true if it asks for status write-back.
    fn tx_descriptor(&mut self, d: &[u8; 16]) -> bool {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
        let lower = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        let cmd = d[11];
        let report = cmd & (txd::RS | txd::RPS) != 0;
        if cmd & txd::DEXT == 0 {
            // Legacy: length 15:0, CSO 23:16, CMD 31:24; CSS, special.
            let len = (lower & 0xffff) as usize;
            if !self.tx.started {
                self.tx.started = true;
                self.tx.tse = false;
                self.tx.popts = 0;
                self.tx.legacy_csum = (cmd & txd::IC != 0).then_some((d[13], d[10]));
                self.tx.vlan = (cmd & txd::VLE != 0).then_some(u16::from_le_bytes([d[14], d[15]]));
            }
            self.tx_append(addr, len);
            if cmd & txd::EOP != 0 {
                self.tx_finish();
            }
            return report;
        }
        let dtyp = (lower >> 20) & 0xf;
        if dtyp == 0 {
            // Context descriptor.
            self.ctx = TxContext {
                ipcss: d[0],
                ipcso: d[1],
                ipcse: u16::from_le_bytes([d[2], d[3]]),
                tucss: d[4],
                tucso: d[5],
                tucse: u16::from_le_bytes([d[6], d[7]]),
                tucmd: cmd,
                hdrlen: d[13],
                mss: u16::from_le_bytes([d[14], d[15]]),
            };
            return report;
        }
        if dtyp != u32::from(txd::DTYP_DATA) {
            // Reserved type: consumed, nothing sent.
            return report;
        }
        let len = (lower & 0xf_ffff) as usize;
        if !self.tx.started {
            self.tx.started = true;
            self.tx.tse = cmd & txd::TSE != 0;
            self.tx.popts = d[13];
            self.tx.legacy_csum = None;
            self.tx.vlan = (cmd & txd::VLE != 0).then_some(u16::from_le_bytes([d[14], d[15]]));
        }
        self.tx_append(addr, len);
        if cmd & txd::EOP != 0 {
            self.tx_finish();
        }
        report
    }

    fn tx_append(&mut self, addr: u64, len: usize) {
        if self.tx.oversize || len == 0 {
            return;
        }
        let have = self.tx.data.len();
        if have + len > MAX_TX_FRAME {
            self.tx.oversize = true;
            return;
        }
        self.tx.data.resize(have + len, 0);
        if self
            .mem
            .read_slice(&mut self.tx.data[have..], GuestAddress(addr))
            .is_err()
        {
            self.dma_fault("a transmit buffer", addr);
            self.tx.oversize = true;
        }
    }

    /// EOP: send the assembled frame (cut into segments for TSO).
    fn tx_finish(&mut self) {
        let mut frame = std::mem::take(&mut self.tx);
        if frame.oversize || frame.data.is_empty() {
            self.stats.tx_dropped += 1;
            self.tx.data = std::mem::take(&mut frame.data);
            self.tx.data.clear();
            return;
        }
        if frame.tse && self.ctx.tucmd & txd::TSE != 0 {
            self.tx_tso(&frame);
        } else {
            let mut data = std::mem::take(&mut frame.data);
            self.tx_checksums(&mut data, frame.popts, frame.legacy_csum);
            self.tx_send(&data, frame.vlan);
            frame.data = data;
        }
        // Keep the buffer's allocation for the next frame.
        frame.data.clear();
        self.tx.data = frame.data;
    }

    fn tx_checksums(&self, data: &mut [u8], popts: u8, legacy: Option<(u8, u8)>) {
        if let Some((css, cso)) = legacy {
            insert_checksum(data, usize::from(css), usize::from(cso), 0);
            return;
        }
        let c = self.ctx;
        if popts & txd::POPTS_IXSM != 0 {
            insert_checksum(
                data,
                usize::from(c.ipcss),
                usize::from(c.ipcso),
                usize::from(c.ipcse),
            );
        }
        if popts & txd::POPTS_TXSM != 0 {
            insert_checksum(
                data,
                usize::from(c.tucss),
                usize::from(c.tucso),
                usize::from(c.tucse),
            );
        }
    }

    /// TCP/UDP segmentation: the first HDRLEN bytes are the headers of
    /// every segment; each carries at most MSS bytes of payload, with the
    /// IP length and identification, the TCP sequence number and flags
    /// and the checksums fixed up.
    fn tx_tso(&mut self, frame: &TxFrame) {
        let c = self.ctx;
        let hdrlen = usize::from(c.hdrlen);
        let mss = usize::from(c.mss);
        let data = &frame.data;
        let payload_len = data.len().saturating_sub(hdrlen);
        let segments = payload_len.div_ceil(mss.max(1)).max(1);
        let ipcss = usize::from(c.ipcss);
        let tucss = usize::from(c.tucss);
        if hdrlen == 0
            || hdrlen > data.len()
            || mss == 0
            || segments > MAX_TSO_SEGMENTS
            || tucss + 14 > hdrlen
            || ipcss + 20 > hdrlen
        {
            if self.tso_error.first() {
                log::warn!(
                    "{}: TSO frame of {} bytes with header {hdrlen}, MSS {mss}: dropped \
                     (logged once)",
                    self.name,
                    data.len()
                );
            }
            self.stats.tx_dropped += 1;
            return;
        }
        let tcp = c.tucmd & txd::TUCMD_TCP != 0;
        let ipv4 = c.tucmd & txd::TUCMD_IP != 0;
        let ip_id = get_be16(data, ipcss + 4).unwrap_or(0);
        let seq = data
            .get(tucss + 4..tucss + 8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        let mut seg = Vec::with_capacity(hdrlen + mss);
        for i in 0..segments {
            let start = hdrlen + i * mss;
            let end = (start + mss).min(data.len());
            seg.clear();
            seg.extend_from_slice(&data[..hdrlen]);
            seg.extend_from_slice(&data[start.min(end)..end]);
            let len = seg.len();
            if ipv4 {
                put_be16(&mut seg, ipcss + 2, (len - ipcss) as u16);
                put_be16(&mut seg, ipcss + 4, ip_id.wrapping_add(i as u16));
            } else {
                put_be16(&mut seg, ipcss + 4, len.saturating_sub(ipcss + 40) as u16);
            }
            let l4_len = (len - tucss) as u32;
            if tcp {
                let s = seq.wrapping_add((i * mss) as u32);
                if let Some(b) = seg.get_mut(tucss + 4..tucss + 8) {
                    b.copy_from_slice(&s.to_be_bytes());
                }
                if i + 1 != segments {
                    // FIN and PSH only on the last segment.
                    if let Some(f) = seg.get_mut(tucss + 13) {
                        *f &= !0x09;
                    }
                }
            } else {
                put_be16(&mut seg, tucss + 4, l4_len as u16);
            }
            // The driver left the pseudo-header sum without the length in
            // the checksum field: add this segment's length.
            let tucso = usize::from(c.tucso);
            if let Some(ph) = get_be16(&seg, tucso) {
                put_be16(&mut seg, tucso, fold(u32::from(ph) + l4_len));
            }
            let popts = frame.popts;
            let mut s = std::mem::take(&mut seg);
            self.tx_checksums(&mut s, popts, None);
            self.tx_send(&s, frame.vlan);
            seg = s;
        }
        self.stats.tx_tso_frames += 1;
        self.add_stat(stat::TSCTC, 1);
    }

    fn tx_send(&mut self, data: &[u8], vlan: Option<u16>) {
        let tagged;
        let frame = match vlan {
            Some(tci) if self.r(reg::CTRL) & ctrl::VME != 0 && data.len() >= 12 => {
                let mut f = Vec::with_capacity(data.len() + 4);
                f.extend_from_slice(&data[..12]);
                f.extend_from_slice(&(self.r(reg::VET) as u16).to_be_bytes());
                f.extend_from_slice(&tci.to_be_bytes());
                f.extend_from_slice(&data[12..]);
                tagged = f;
                &tagged[..]
            }
            _ => data,
        };
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        self.count_tx(frame);
        let header: NetHeader = [0; crate::virtio::net::HDR_LEN];
        self.backend.send(&header, frame);
    }

    fn add_stat(&mut self, offset: u32, n: u32) {
        let v = self.r(offset).saturating_add(n);
        self.set(offset, v);
    }

    fn add_stat64(&mut self, low: u32, n: u64) {
        let v = (u64::from(self.r(low + 4)) << 32 | u64::from(self.r(low))).saturating_add(n);
        self.set(low, v as u32);
        self.set(low + 4, (v >> 32) as u32);
    }

    fn count_tx(&mut self, frame: &[u8]) {
        let len = frame.len() as u64 + 4;
        self.add_stat(stat::GPTC, 1);
        self.add_stat(stat::TPT, 1);
        self.add_stat64(stat::GOTCL, len);
        self.add_stat64(stat::TOTL, len);
        if frame.first().is_some_and(|b| b & 1 != 0) {
            if frame[..6.min(frame.len())] == [0xff; 6] {
                self.add_stat(stat::BPTC, 1);
            } else {
                self.add_stat(stat::MPTC, 1);
            }
        }
    }

    // ---- receive ----------------------------------------------------

    fn rx_buffer_size(&self) -> usize {
        let r = self.r(reg::RCTL);
        let bsize = (r >> rctl::BSIZE_SHIFT) & 3;
        match (r & rctl::BSEX != 0, bsize) {
            (false, 0) => 2048,
            (false, 1) => 1024,
            (false, 2) => 512,
            (false, _) => 256,
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            (true, _) => 2048,
        }
    }

    /// Does the receive filter take a frame for `dst`?
    fn accepts(&self, frame: &[u8]) -> bool {
        let Some(dst) = frame.get(..6) else {
            return false;
        };
        let r = self.r(reg::RCTL);
        if dst == [0xff; 6] {
            return r & rctl::BAM != 0 || r & rctl::MPE != 0;
        }
        if dst[0] & 1 != 0 {
            if r & rctl::MPE != 0 {
                return true;
            }
            const SHIFT: [u32; 4] = [4, 3, 2, 0];
            let shift = SHIFT[((r >> rctl::MO_SHIFT) & 3) as usize];
            let hash = ((u32::from(dst[5]) << 8 | u32::from(dst[4])) >> shift) & 0xfff;
            let word = self.r(reg::MTA + (hash >> 5) * 4);
            return word & (1 << (hash & 31)) != 0;
        }
        if r & rctl::UPE != 0 {
            return true;
        }
        (0..16).any(|i| {
            let low = self.r(reg::RA + i * 8);
            let high = self.r(reg::RA + i * 8 + 4);
            high & 1 << 31 != 0
                && low.to_le_bytes() == dst[..4]
                && (high as u16).to_le_bytes() == dst[4..6]
        })
    }

    /// Finish an offloaded checksum the backend left to the device
    /// (virtio-net header NEEDS_CSUM from a TAP with offloads).
    fn complete_rx_checksum(frame: &mut RxFrame) {
        let h = &frame.header;
        if h[0] & 1 == 0 {
            return;
        }
        let start = usize::from(u16::from_le_bytes([h[6], h[7]]));
        let offset = usize::from(u16::from_le_bytes([h[8], h[9]]));
        insert_checksum(&mut frame.data, start, start + offset, 0);
    }

    /// Move received frames into the ring while it has descriptors.
    fn receive(&mut self) {
        for _ in 0..RX_BURST {
            if !self.receive_one() {
                break;
            }
        }
    }

    /// One frame into the ring; false when nothing more can be done now.
    fn receive_one(&mut self) -> bool {
        if self.r(reg::RCTL) & rctl::EN == 0 || !self.dma_allowed() {
            return false;
        }
        let count = u64::from(self.r(reg::RDLEN)) / DESC_LEN;
        let head = u64::from(self.r(reg::RDH));
        let tail = u64::from(self.r(reg::RDT));
        if count == 0 || head >= count || tail >= count {
            if self.bad_ring.first() && count != 0 {
                log::warn!(
                    "{}: receive ring of {count} descriptors with head {head}, tail {tail}: \
                     ignored (logged once)",
                    self.name
                );
            }
            return false;
        }
        let free = (tail + count - head) % count;
        if free == 0 {
            return false;
        }
        let Some(mut frame) = self.backend.recv() else {
            return false;
        };
        if !self.accepts(&frame.data) {
            self.stats.rx_filtered += 1;
            return true;
        }
        let r = self.r(reg::RCTL);
        let vet = self.r(reg::VET) as u16;
        let strip = self.r(reg::CTRL) & ctrl::VME != 0
            && frame.data.len() >= 18
            && get_be16(&frame.data, 12) == Some(vet);
        let stripped_len = frame.data.len() - if strip { 4 } else { 0 };
        let max = if r & rctl::LPE != 0 { 16384 } else { 1522 };
        if stripped_len > max {
            self.stats.rx_dropped += 1;
            return true;
        }
        let fcs_len = if r & rctl::SECRC == 0 { 4 } else { 0 };
        let total = stripped_len.max(MIN_FRAME) + fcs_len;
        let bufsize = self.rx_buffer_size();
        let needed = total.div_ceil(bufsize) as u64;
        if needed > count - 1 {
            self.stats.rx_dropped += 1;
            return true;
        }
        if needed > free {
            // Wait for the driver to give more descriptors.
            self.backend.unrecv(frame);
            self.add_stat(stat::RNBC, 1);
            return false;
        }
        Self::complete_rx_checksum(&mut frame);
        let mut data = std::mem::take(&mut self.rx_frame);
        data.clear();
        let mut special = 0u16;
        if strip {
            special = get_be16(&frame.data, 14).unwrap_or(0);
            data.extend_from_slice(&frame.data[..12]);
            data.extend_from_slice(&frame.data[16..]);
        } else {
            data.extend_from_slice(&frame.data);
        }
        self.backend.recycle(frame.data);
        let vp = strip;
        let payload_len = data.len();
        let (csum_status, csum_errors) = rx_checksum_offload(self.r(reg::RXCSUM), vet, &data);
        if data.len() < MIN_FRAME {
            data.resize(MIN_FRAME, 0);
        }
        if fcs_len != 0 {
            let fcs = crc32(&data);
            data.extend_from_slice(&fcs.to_le_bytes());
        }
        let base = u64::from(self.r(reg::RDBAH)) << 32 | u64::from(self.r(reg::RDBAL));
        let mut head = head;
        for (i, chunk) in data.chunks(bufsize).enumerate() {
            let daddr = base.wrapping_add(head * DESC_LEN);
            let mut desc = [0u8; DESC_LEN as usize];
            if self.mem.read_slice(&mut desc, GuestAddress(daddr)).is_err() {
                self.dma_fault("a receive descriptor", daddr);
                return false;
            }
            let buf = u64::from_le_bytes(desc[0..8].try_into().unwrap_or_default());
            if self.mem.write_slice(chunk, GuestAddress(buf)).is_err() {
                self.dma_fault("a receive buffer", buf);
                return false;
            }
            let last = i as u64 + 1 == needed;
            desc[8..10].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            desc[10..12].fill(0);
            desc[12] = rxd::DD
                | if last {
                    rxd::EOP | csum_status | if vp { rxd::VP } else { 0 }
                } else {
                    csum_status & rxd::IXSM
                };
            desc[13] = if last { csum_errors } else { 0 };
            desc[14..16].copy_from_slice(&if last { special } else { 0 }.to_le_bytes());
            if self
                .mem
                .write_slice(&desc[8..], GuestAddress(daddr + 8))
                .is_err()
            {
                self.dma_fault("a receive descriptor", daddr);
                return false;
            }
            head = (head + 1) % count;
            self.set(reg::RDH, head as u32);
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += payload_len as u64;
        let len = data.len() as u64;
        self.add_stat(stat::GPRC, 1);
        self.add_stat(stat::TPR, 1);
        self.add_stat64(stat::GORCL, len);
        self.add_stat64(stat::TORL, len);
        if data[0] & 1 != 0 {
            if data[..6] == [0xff; 6] {
                self.add_stat(stat::BPRC, 1);
            } else {
                self.add_stat(stat::MPRC, 1);
            }
        }
        let mut cause = icr::RXT0;
        let left = (tail + count - head) % count;
        let rdmts = (r >> rctl::RDMTS_SHIFT) & 3;
        if left <= count >> (rdmts + 1) {
            cause |= icr::RXDMT0;
        }
        self.set_cause(cause);
        self.rx_frame = data;
        true
    }

    /// Host input may be pending: receive what fits.
    pub fn poll(&mut self) {
        self.receive();
    }

    // ---- saved state --------------------------------------------------

    /// The device's state (see [`E1000State`]).
    pub fn state(&self) -> E1000State {
        E1000State {
            config: self.config.state(),
            mac: self.mac,
            regs: self
                .regs
                .iter()
                .enumerate()
                .filter(|(_, &v)| v != 0)
                .map(|(i, &v)| (i as u32 * 4, v))
                .collect(),
            phy: self.phy,
            microwire: self.microwire,
            ctx: self.ctx,
            tx: self.tx.clone(),
            ioaddr: self.ioaddr,
            line_level: self.line_level,
            last_raise_ns: self.last_raise_ns,
            throttle_deadline: self.throttle_deadline,
            stats: self.stats,
        }
    }

    /// Replace the device's state with `s`, INTA# driven to the restored
    /// level. A state that cannot be this device's (another MAC, a
    /// register outside BAR 0, a frame longer than the device assembles)
    /// is refused and the device left as it was.
    pub fn restore(&mut self, s: &E1000State) -> Result<(), StateError> {
        let mismatch = |reason: String| StateError::Mismatch {
            kind: "e1000",
            reason,
        };
        if s.mac != self.mac {
            return Err(mismatch(format!(
                "saved for MAC {:02x?}, this device has {:02x?}",
                s.mac, self.mac
            )));
        }
        if let Some((&off, _)) = s
            .regs
            .iter()
            .find(|(&o, _)| o % 4 != 0 || u64::from(o) >= MMIO_BAR_LEN)
        {
            return Err(mismatch(format!("register offset {off:#x}")));
        }
        if s.tx.data.len() > MAX_TX_FRAME {
            return Err(mismatch(format!(
                "a transmit frame of {} bytes",
                s.tx.data.len()
            )));
        }
        self.config.restore(&s.config);
        self.regs.fill(0);
        for (&off, &v) in &s.regs {
            self.regs[off as usize / 4] = v;
        }
        self.phy = s.phy;
        self.microwire = s.microwire;
        self.ctx = s.ctx;
        self.tx = s.tx.clone();
        self.ioaddr = s.ioaddr;
        self.last_raise_ns = s.last_raise_ns;
        self.throttle_deadline = s.throttle_deadline;
        self.stats = s.stats;
        if self.line_level != s.line_level {
            self.line_level = s.line_level;
            self.irq.set_level(s.line_level);
        }
        Ok(())
    }
}

impl Timed for E1000 {
    fn next_deadline(&self) -> Option<u64> {
        self.throttle_deadline
    }

    fn advance(&mut self, now: u64) {
        if self.throttle_deadline.is_some_and(|d| d <= now) {
            self.throttle_deadline = None;
            self.last_raise_ns = None;
            self.update_irq();
        }
    }
}

impl PciDevice for E1000 {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if offset / 4 == crate::pci::config::reg::COMMAND / 4 {
            self.update_irq();
            // Bus mastering may just have been enabled.
            self.transmit();
            self.receive();
        }
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            MMIO_BAR => self.read_bar0(offset, data),
            IO_BAR => {
                let v = match offset & !3 {
                    0 => self.ioaddr,
                    4 if u64::from(self.ioaddr) < MMIO_BAR_LEN => {
                        self.read_register(self.ioaddr & !3)
                    }
                    _ => 0,
                };
                let lane = (offset % 4) as usize;
                let bytes = v.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(lane + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            MMIO_BAR => self.write_bar0(offset, data),
            IO_BAR => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let v = u32::from_le_bytes(v);
                match offset {
                    0 => self.ioaddr = v & 0x1_fffc,
                    4 if u64::from(self.ioaddr) < MMIO_BAR_LEN => {
                        self.write_bar0(u64::from(self.ioaddr), &data[..n])
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
