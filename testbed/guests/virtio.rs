//! `virtio`: tiny virtio drivers in 64-bit long mode, for virtio-blk and
//! virtio-net on both transports, so that the device models run on KVM as
//! well as on the interpreter with identical serial output and device
//! traces.
//!
//! The image plugs in four devices (after any the command line added):
//! a 64 KiB in-memory disk and a NIC whose frames loop back, once on
//! virtio-pci and once on virtio-mmio. The guest finds them as a driver
//! would: on PCI by scanning bus 0 through ECAM for vendor 0x1af4 and
//! walking the vendor capabilities to the common, notify and device
//! configuration structures, then the MSI-X capability; on MMIO by probing
//! the register blocks of [`layout::virtio_mmio`] for the magic value. The
//! first disk and the first NIC on each transport are driven (a `--disk`
//! given on the command line comes before the built-in one).
//!
//! For each device: reset, ACKNOWLEDGE, DRIVER, feature negotiation
//! (VERSION_1 and the bits the driver knows, ANDed with what the device
//! offers), FEATURES_OK checked, interrupts set up (MSI-X one vector per
//! queue on PCI; the device's IOAPIC line, level-triggered, active-low on
//! MMIO, acknowledged through the interrupt status register), queues of 16
//! entries, DRIVER_OK.
//!
//! - **virtio-blk** (EVENT_IDX and INDIRECT_DESC negotiated): five
//!   requests published at once and one notification: write sector 1
//!   with a pattern, read it back, read sector 0 through an indirect
//!   descriptor table, GET_ID, FLUSH. The guest waits for the interrupt,
//!   then prints the status bytes, whether the read-back matches, the
//!   first bytes of sector 0 and the ID.
//! - **virtio-net**: two receive buffers, then one Ethernet frame (source
//!   MAC read from the configuration space) on the transmit queue; the
//!   loopback brings it back into the first receive buffer; the guest
//!   compares it with what it sent.
//!
//! The guest then powers off (ACPI S5); `virtio-wait` waits instead.
//!
//! Device accesses happen with interrupts disabled and the guest waits
//! with `sti; hlt` for a known number of interrupts, so everything is
//! deterministic.

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::{BuiltinVirtio, BuiltinVirtioKind, GuestImage};
use crate::layout;
use crate::machine::VirtioTransport;

pub const NAME: &str = "virtio";
pub const DESCRIPTION: &str =
    "64-bit long mode: tiny virtio-blk and virtio-net drivers on virtio-pci (MSI-X) and virtio-mmio (IOAPIC line)";

/// The built-in disk: its size, its first bytes and the ID each reports.
pub const DISK_BYTES: usize = 64 * 1024;
pub const DISK_MAGIC: &[u8; 8] = b"DUETDISK";
pub fn disk_id(transport: VirtioTransport) -> &'static str {
    match transport {
        VirtioTransport::Pci => "duet-builtin-pci",
        VirtioTransport::Mmio => "duet-builtin-mmio",
    }
}

/// Sector the guest writes and reads back, and its pattern.
pub const TEST_SECTOR: u64 = 1;
pub fn sector_pattern(region: u32) -> Vec<u8> {
    (0..512u32)
        .map(|i| (i.wrapping_mul(7) ^ (region >> 16)) as u8)
        .collect()
}

const QUEUE_SIZE: u16 = 16;
const ECAM: u32 = layout::pci::ECAM_BASE as u32;
const PCI_VENDOR: u32 = devices::virtio::pci::VENDOR_ID as u32;
const MMIO_MAGIC: u32 = devices::virtio::mmio::MAGIC;

/// Offsets in a device record (one per device the guest drives).
mod rec {
    /// 0: virtio-pci, 1: virtio-mmio.
    pub const KIND: i32 = 0;
    /// Common configuration (PCI) or the register block (MMIO).
    pub const BASE: i32 = 8;
    pub const DEVCFG: i32 = 16;
    /// Per-queue notification addresses (PCI).
    pub const NOTIFY: i32 = 24;
    pub const NOTIFY_BASE: i32 = 40;
    pub const NOTIFY_MULT: i32 = 48;
    pub const MSIX_TABLE: i32 = 56;
    /// ECAM address of the MSI-X capability.
    pub const MSIX_CAP: i32 = 64;
    pub const IRQ_COUNT: i32 = 72;
    /// Guest-physical base of the device's rings and buffers.
    pub const REGION: i32 = 80;
    /// First vector (PCI: one per queue; MMIO: the line's).
    pub const VECTOR: i32 = 88;
    pub const GSI: i32 = 96;
    pub const NAME: i32 = 104;
    pub const FOUND: i32 = 112;
    /// Interrupts to wait for after the test's notifications.
    pub const EXPECTED_IRQS: i32 = 120;
    pub const LEN: usize = 128;
}

/// Layout of a device region (offsets from its base).
mod region {
    pub const DESC0: u32 = 0x0000;
    pub const AVAIL0: u32 = 0x0200;
    pub const USED0: u32 = 0x0400;
    pub const INDIRECT: u32 = 0x0800;
    pub const DESC1: u32 = 0x1000;
    pub const AVAIL1: u32 = 0x1200;
    pub const USED1: u32 = 0x1400;
    /// Request headers (blk) or the frame to send (net).
    pub const HEADERS: u32 = 0x2000;
    pub const STATUS: u32 = 0x2100;
    pub const WRITE_BUF: u32 = 0x2200;
    pub const ID_BUF: u32 = 0x2400;
    /// Everything below is a data blob; from here on the device writes.
    pub const BLOB_END: u32 = 0x3000;
    pub const BUF_A: u32 = 0x3000;
    pub const BUF_B: u32 = 0x4000;
    pub const END: u32 = 0x5000;
}

// The buffers fit their places.
const _: () = assert!(FRAME_TEXT_LEN + 14 <= FRAME_LEN as usize);
const _: () = assert!(region::WRITE_BUF + 512 <= region::ID_BUF);
const _: () = assert!(region::ID_BUF + 32 <= region::BLOB_END);
const FRAME_TEXT_LEN: usize = FRAME_TEXT.len();

/// A device the guest drives: (kind, transport, region base, first
/// vector, interrupts expected).
type DeviceEntry = (BuiltinVirtioKind, VirtioTransport, u32, u8, u32);

/// The four devices of the self-test.
const DEVICES: [DeviceEntry; 4] = [
    (
        BuiltinVirtioKind::Block,
        VirtioTransport::Pci,
        0x20000,
        0x40,
        1,
    ),
    // Two MSI-X vectors: receive and transmit.
    (
        BuiltinVirtioKind::NetLoopback,
        VirtioTransport::Pci,
        0x30000,
        0x44,
        2,
    ),
    (
        BuiltinVirtioKind::Block,
        VirtioTransport::Mmio,
        0x40000,
        0x48,
        1,
    ),
    (
        BuiltinVirtioKind::NetLoopback,
        VirtioTransport::Mmio,
        0x50000,
        0x4c,
        1,
    ),
];

/// Data of the test: where the frame payload sits and how long it is.
const FRAME_LEN: u32 = 60;
const NET_HDR: u32 = devices::virtio::net::HDR_LEN as u32;
const FRAME_TEXT: &[u8] = b"duet virtio-net built-in guest: a frame";
const ETHERTYPE_LOCAL: u16 = 0x88b5;

// virtio ring and feature constants.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;
const F_BLK_FLUSH: u32 = 1 << 9;
const F_NET_MAC: u32 = 1 << 5;
const F_INDIRECT: u32 = 1 << 28;
const F_EVENT_IDX: u32 = 1 << 29;
/// VERSION_1, bit 32: bit 0 of the high word.
const F_HIGH_VERSION_1: u32 = 1;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
const BLK_REQUESTS: u32 = 5;

/// `virtio-wait`: the same drivers, then the guest waits with interrupts
/// on instead of powering off, until Ctrl-A x or a signal stops duet (the
/// data-safety tests stop it that way).
pub const WAIT_NAME: &str = "virtio-wait";
pub const WAIT_DESCRIPTION: &str =
    "the virtio guest, then waiting (for Ctrl-A x or a signal) instead of powering off";

/// The self-test's first line.
const SELF_TEST_HEADER: &str =
    "virtio: virtio-blk and virtio-net on virtio-pci and virtio-mmio\r\n";

/// `virtio-console`: the same driver on two virtio-consoles (one port
/// each, no MULTIPORT), one on virtio-pci and one on virtio-mmio, each
/// with the loopback host side
/// ([`devices::virtio::console::LoopbackConsole`]): the host greets with
/// [`CONSOLE_GREETING`], then gives back what the guest writes. For each:
/// one receive buffer posted (the greeting arrives), a line written on the
/// transmit queue ([`console_line`]), a second receive buffer posted (the
/// line comes back); the guest waits for the interrupt of each step, then
/// prints the greeting, its line and whether the echo matches.
pub const CONSOLE_NAME: &str = "virtio-console";
pub const CONSOLE_DESCRIPTION: &str =
    "64-bit long mode: a line each way through virtio-console on virtio-pci (MSI-X) and virtio-mmio (IOAPIC line)";
const CONSOLE_HEADER: &str = "virtio-console: a line each way on virtio-pci and virtio-mmio\r\n";
/// What the built-in console's host side supplies first.
pub const CONSOLE_GREETING: &[u8] = b"hello from the host side of hvc0\n";
/// The line the guest writes on the console of `transport`.
pub fn console_line(transport: VirtioTransport) -> String {
    let t = match transport {
        VirtioTransport::Pci => "pci",
        VirtioTransport::Mmio => "mmio",
    };
    format!("a line from the guest on virtio-console over {t}\n")
}
/// Bytes of each receive buffer of the console guest.
const CONSOLE_RX_LEN: u32 = 64;
const _: () = assert!(CONSOLE_GREETING.len() < CONSOLE_RX_LEN as usize);

/// `virtio-rng`: the same driver on two virtio-rngs, on virtio-pci and on
/// virtio-mmio, each on the seeded generator `--rng` uses under `--clock
/// virtual` ([`crate::virtio::DEFAULT_RNG_SEED`]); two requests published
/// at once, [`RNG_REQUEST`] bytes each (one buffer; a chain of two
/// halves), one notification, one interrupt; the bytes are printed. Both
/// devices start from the same seed: both transports print the same bytes.
pub const RNG_NAME: &str = "virtio-rng";
pub const RNG_DESCRIPTION: &str =
    "64-bit long mode: random bytes from virtio-rng (seeded) on virtio-pci (MSI-X) and virtio-mmio (IOAPIC line)";
const RNG_HEADER: &str = "virtio-rng: seeded random bytes on virtio-pci and virtio-mmio\r\n";
/// Bytes per request.
pub const RNG_REQUEST: u32 = 16;
/// Requests published at once.
pub const RNG_REQUESTS: u32 = 2;

/// The two consoles of `virtio-console` and the two RNGs of `virtio-rng`
/// (three interrupts per console: greeting, line sent, echo).
const CONSOLE_DEVICES: [DeviceEntry; 2] = [
    (
        BuiltinVirtioKind::ConsoleLoopback,
        VirtioTransport::Pci,
        0x20000,
        0x40,
        3,
    ),
    (
        BuiltinVirtioKind::ConsoleLoopback,
        VirtioTransport::Mmio,
        0x30000,
        0x44,
        3,
    ),
];
const RNG_DEVICES: [DeviceEntry; 2] = [
    (
        BuiltinVirtioKind::Rng,
        VirtioTransport::Pci,
        0x20000,
        0x40,
        1,
    ),
    (
        BuiltinVirtioKind::Rng,
        VirtioTransport::Mmio,
        0x30000,
        0x44,
        1,
    ),
];

pub fn build_console() -> GuestImage {
    image_of(console_program(), &CONSOLE_DEVICES)
}

pub fn build_rng() -> GuestImage {
    image_of(rng_program(), &RNG_DEVICES)
}

pub fn console_program() -> GuestProgram {
    assemble_program(
        &CONSOLE_DEVICES,
        Workload::SelfTest(End::PowerOff, CONSOLE_HEADER),
    )
    .expect("virtio-console guest assembles")
}

pub fn rng_program() -> GuestProgram {
    assemble_program(&RNG_DEVICES, Workload::SelfTest(End::PowerOff, RNG_HEADER))
        .expect("virtio-rng guest assembles")
}

/// The transport of the table's device at `base`.
fn transport_of(table: &[DeviceEntry], base: u32) -> VirtioTransport {
    table
        .iter()
        .find(|e| e.2 == base)
        .map_or(VirtioTransport::Pci, |e| e.1)
}

/// How the guest ends once its drivers are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// ACPI S5 through PM1a_CNT.
    PowerOff,
    /// `sti; hlt` forever.
    Wait,
    /// `cli; hlt` (the frame loop: the run stops).
    Halt,
}

/// What the guest does with its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Exercise every device once, then end (the header line names them).
    SelfTest(End, &'static str),
    /// Loop `frames` frames of `frame_len` bytes through one virtio-net.
    NetLoop { frames: u32, frame_len: u32 },
}

pub fn build() -> GuestImage {
    build_with(End::PowerOff)
}

pub fn build_wait() -> GuestImage {
    build_with(End::Wait)
}

fn build_with(end: End) -> GuestImage {
    image_of(program_with(end), &DEVICES)
}

fn image_of(program: GuestProgram, table: &[DeviceEntry]) -> GuestImage {
    let mut image = program.into_image();
    image.virtio_devices = table
        .iter()
        .map(|&(kind, transport, ..)| BuiltinVirtio { kind, transport })
        .collect();
    image
}

pub fn program() -> GuestProgram {
    program_with(End::PowerOff)
}

pub fn program_with(end: End) -> GuestProgram {
    assemble_program(&DEVICES, Workload::SelfTest(end, SELF_TEST_HEADER))
        .expect("virtio guest assembles")
}

fn desc(addr: u32, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&u64::from(addr).to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

fn put(buf: &mut [u8], at: u32, bytes: &[u8]) {
    buf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// The avail ring's entries (its index stays 0 until the driver runs).
fn avail(buf: &mut [u8], at: u32, heads: &[u16]) {
    for (i, h) in heads.iter().enumerate() {
        put(buf, at + 4 + 2 * i as u32, &h.to_le_bytes());
    }
}

/// The prepared rings and buffers of a disk at `base`.
fn blk_region(base: u32) -> Vec<u8> {
    use region::*;
    let mut b = vec![0u8; BLOB_END as usize];
    let hdr = |i: u32| base + HEADERS + 16 * i;
    let status = |i: u32| base + STATUS + i;
    let chains: [[u8; 16]; 12] = [
        // Write TEST_SECTOR.
        desc(hdr(0), 16, DESC_NEXT, 1),
        desc(base + WRITE_BUF, 512, DESC_NEXT, 2),
        desc(status(0), 1, DESC_WRITE, 0),
        // Read it back.
        desc(hdr(1), 16, DESC_NEXT, 4),
        desc(base + BUF_A, 512, DESC_WRITE | DESC_NEXT, 5),
        desc(status(1), 1, DESC_WRITE, 0),
        // Read sector 0 through an indirect table.
        desc(base + INDIRECT, 48, DESC_INDIRECT, 0),
        // GET_ID.
        desc(hdr(3), 16, DESC_NEXT, 8),
        desc(base + ID_BUF, 20, DESC_WRITE | DESC_NEXT, 9),
        desc(status(3), 1, DESC_WRITE, 0),
        // FLUSH.
        desc(hdr(4), 16, DESC_NEXT, 11),
        desc(status(4), 1, DESC_WRITE, 0),
    ];
    for (i, d) in chains.iter().enumerate() {
        put(&mut b, DESC0 + 16 * i as u32, d);
    }
    avail(&mut b, AVAIL0, &[0, 3, 6, 7, 10]);
    let indirect = [
        desc(hdr(2), 16, DESC_NEXT, 1),
        desc(base + BUF_B, 512, DESC_WRITE | DESC_NEXT, 2),
        desc(status(2), 1, DESC_WRITE, 0),
    ];
    for (i, d) in indirect.iter().enumerate() {
        put(&mut b, INDIRECT + 16 * i as u32, d);
    }
    let headers = [
        (BLK_T_OUT, TEST_SECTOR),
        (BLK_T_IN, TEST_SECTOR),
        (BLK_T_IN, 0),
        (BLK_T_GET_ID, 0),
        (BLK_T_FLUSH, 0),
    ];
    for (i, (kind, sector)) in headers.iter().enumerate() {
        put(&mut b, HEADERS + 16 * i as u32, &kind.to_le_bytes());
        put(&mut b, HEADERS + 16 * i as u32 + 8, &sector.to_le_bytes());
    }
    put(&mut b, STATUS, &[0xff; BLK_REQUESTS as usize]);
    put(&mut b, WRITE_BUF, &sector_pattern(base));
    b
}

/// The prepared rings of a console at `base`: two receive buffers
/// ([`region::BUF_A`], [`region::BUF_B`]) in the receive queue's
/// available ring, the guest's line at [`region::HEADERS`] in the
/// transmit queue's (the indexes are published by the driver); the line
/// without its newline at [`region::WRITE_BUF`], for printing.
fn console_region(base: u32, transport: VirtioTransport) -> Vec<u8> {
    use region::*;
    let line = console_line(transport);
    let mut b = vec![0u8; BLOB_END as usize];
    put(
        &mut b,
        DESC0,
        &desc(base + BUF_A, CONSOLE_RX_LEN, DESC_WRITE, 0),
    );
    put(
        &mut b,
        DESC0 + 16,
        &desc(base + BUF_B, CONSOLE_RX_LEN, DESC_WRITE, 0),
    );
    avail(&mut b, AVAIL0, &[0, 1]);
    put(
        &mut b,
        DESC1,
        &desc(base + HEADERS, line.len() as u32, 0, 0),
    );
    avail(&mut b, AVAIL1, &[0]);
    put(&mut b, HEADERS, line.as_bytes());
    put(&mut b, WRITE_BUF, line.trim_end().as_bytes());
    b
}

/// The prepared rings of an RNG at `base`: request 0 one buffer of
/// [`RNG_REQUEST`] bytes at [`region::BUF_A`], request 1 a chain of two
/// halves at [`region::BUF_B`].
fn rng_region(base: u32) -> Vec<u8> {
    use region::*;
    let half = RNG_REQUEST / 2;
    let mut b = vec![0u8; BLOB_END as usize];
    put(
        &mut b,
        DESC0,
        &desc(base + BUF_A, RNG_REQUEST, DESC_WRITE, 0),
    );
    put(
        &mut b,
        DESC0 + 16,
        &desc(base + BUF_B, half, DESC_WRITE | DESC_NEXT, 2),
    );
    put(
        &mut b,
        DESC0 + 32,
        &desc(base + BUF_B + half, half, DESC_WRITE, 0),
    );
    avail(&mut b, AVAIL0, &[0, 1]);
    b
}

/// The prepared rings and the frame of a NIC at `base`.
fn net_region(base: u32) -> Vec<u8> {
    use region::*;
    let mut b = vec![0u8; BLOB_END as usize];
    put(&mut b, DESC0, &desc(base + BUF_A, 2048, DESC_WRITE, 0));
    put(&mut b, DESC0 + 16, &desc(base + BUF_B, 2048, DESC_WRITE, 0));
    avail(&mut b, AVAIL0, &[0, 1]);
    put(
        &mut b,
        DESC1,
        &desc(base + HEADERS, NET_HDR + FRAME_LEN, 0, 0),
    );
    avail(&mut b, AVAIL1, &[0]);
    // virtio-net header (zero), broadcast destination, source filled in
    // by the guest, a local ethertype, the text.
    let frame = HEADERS + NET_HDR;
    put(&mut b, frame, &[0xff; 6]);
    put(&mut b, frame + 12, &ETHERTYPE_LOCAL.to_be_bytes());
    put(&mut b, frame + 14, FRAME_TEXT);
    b
}

struct Strings {
    gdtr: u32,
    idtr: u32,
    header: u32,
    blk: u32,
    net: u32,
    on: u32,
    not_found: u32,
    features: u32,
    refused: u32,
    capacity: u32,
    sectors: u32,
    statuses: u32,
    readback: u32,
    same: u32,
    different: u32,
    sector0: u32,
    id: u32,
    mac: u32,
    colon: u32,
    space: u32,
    quote: u32,
    frame_sent: u32,
    received: u32,
    length: u32,
    intact: u32,
    interrupts: u32,
    line_end: u32,
    done: u32,
    waiting: u32,
    unexpected: u32,
    console: u32,
    rng: u32,
    received_quote: u32,
    paren_open: u32,
    sent_quote: u32,
    echoed: u32,
    requests: u32,
    plus: u32,
    bytes_colon: u32,
    semicolon: u32,
    records: Vec<u32>,
    /// The frame loop's strings (its workload only).
    looped: Option<LoopStrings>,
}

struct LoopStrings {
    sent: u32,
    bytes: u32,
    irqs: u32,
    sum: u32,
    bad: u32,
}

fn assemble_program(table: &[DeviceEntry], work: Workload) -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let pci_name = data.cstr("pci");
    let mmio_name = data.cstr("mmio");
    let mut s = Strings {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(match work {
            Workload::SelfTest(_, header) => header,
            Workload::NetLoop { .. } => "virtio-net: looping frames through a loopback backend\r\n",
        }),
        blk: data.cstr("virtio-blk on "),
        net: data.cstr("virtio-net on "),
        on: data.cstr(": "),
        not_found: data.cstr(": not found\r\n"),
        features: data.cstr(": features 0x"),
        refused: data.cstr(", FEATURES_OK refused\r\n"),
        capacity: data.cstr(", capacity "),
        sectors: data.cstr(" sectors\r\n"),
        statuses: data.cstr(" requests done, statuses "),
        readback: data.cstr("; sector 1 written and read back: "),
        same: data.cstr("same"),
        different: data.cstr("DIFFERENT"),
        sector0: data.cstr("; sector 0 (indirect) starts 0x"),
        id: data.cstr("; id '"),
        mac: data.cstr(", MAC "),
        colon: data.cstr(":"),
        space: data.cstr(" "),
        quote: data.cstr("'"),
        frame_sent: data.cstr(" frame(s) of 60 bytes sent; received "),
        received: data.cstr(" frame(s)"),
        length: data.cstr(" of "),
        intact: data.cstr(" bytes, contents intact: "),
        interrupts: data.cstr("; interrupts "),
        line_end: data.cstr("\r\n"),
        done: data.cstr("virtio: done\r\n"),
        waiting: data.cstr("virtio: waiting for Ctrl-A x or a signal\r\n"),
        unexpected: data.cstr("virtio: unexpected interrupt or exception, stopping\r\n"),
        console: data.cstr("virtio-console on "),
        rng: data.cstr("virtio-rng on "),
        received_quote: data.cstr("received '"),
        paren_open: data.cstr("' ("),
        sent_quote: data.cstr(" bytes); sent '"),
        echoed: data.cstr(" bytes); echoed back: "),
        requests: data.cstr(" requests done, "),
        plus: data.cstr(" + "),
        bytes_colon: data.cstr(" bytes: "),
        semicolon: data.cstr("; "),
        records: Vec::new(),
        looped: match work {
            Workload::SelfTest(..) => None,
            Workload::NetLoop { .. } => Some(LoopStrings {
                sent: data.cstr("virtio-net: frames looped back: "),
                bytes: data.cstr(", bytes: "),
                irqs: data.cstr(", receive interrupts: "),
                sum: data.cstr(", checksum 0x"),
                bad: data.cstr("virtio-net: received frame did not match, stopping at frame "),
            }),
        },
    };
    for &(_, transport, region, vector, irqs) in table {
        let mut r = vec![0u8; rec::LEN];
        let mut set = |off: i32, v: u64| {
            r[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        };
        let (kind, name) = match transport {
            VirtioTransport::Pci => (0, pci_name),
            VirtioTransport::Mmio => (1, mmio_name),
        };
        set(rec::KIND, kind);
        set(rec::REGION, u64::from(region));
        set(rec::VECTOR, u64::from(vector));
        set(rec::NAME, u64::from(name));
        set(rec::EXPECTED_IRQS, u64::from(irqs));
        s.records.push(data.bytes(&r, 8));
    }
    let code16 = asm::long_mode_entry(s.gdtr, true)?;
    let code64 = long_mode_code(&s, table, work)?;
    let mut blobs = vec![asm::gdt_blob(), data.finish()];
    let mut work_areas = vec![
        (map::PML4, map::PAGE_TABLES_END, "page tables"),
        (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
        (map::IDT, map::IDT_END, "IDT"),
        (map::PD_MMIO, map::PD_MMIO_END, "PD for the MMIO gap"),
    ];
    for &(kind, _, base, ..) in table {
        let (bytes, end) = match (kind, work) {
            (BuiltinVirtioKind::Block, _) => (blk_region(base), region::END),
            (BuiltinVirtioKind::NetLoopback, Workload::SelfTest(..)) => {
                (net_region(base), region::END)
            }
            (BuiltinVirtioKind::ConsoleLoopback, _) => {
                (console_region(base, transport_of(table, base)), region::END)
            }
            (BuiltinVirtioKind::Rng, _) => (rng_region(base), region::END),
            (BuiltinVirtioKind::NetLoopback, Workload::NetLoop { frame_len, .. }) => {
                (net_loop_region(base, frame_len), net_loop::END)
            }
        };
        blobs.push((u64::from(base), bytes));
        work_areas.push((
            u64::from(base + region::BUF_A),
            u64::from(base + end),
            "device buffers",
        ));
    }
    Ok(GuestProgram {
        code: vec![code16, code64],
        data: blobs,
        work_areas,
        entry: asm::real_mode_entry(),
    })
}

/// Subroutine labels of the driver (RBX points at a device record).
struct Driver {
    pci_find: CodeLabel,
    mmio_scan: CodeLabel,
    status_write: CodeLabel,
    status_read: CodeLabel,
    features_read: CodeLabel,
    features_write: CodeLabel,
    config_read: CodeLabel,
    queue_setup: CodeLabel,
    notify: CodeLabel,
    irq_setup: CodeLabel,
    bring_up: CodeLabel,
    wait_irqs: CodeLabel,
    blk_test: CodeLabel,
    net_test: CodeLabel,
    console_test: CodeLabel,
    rng_test: CodeLabel,
    irq_common: CodeLabel,
}

fn long_mode_code(
    s: &Strings,
    table: &[DeviceEntry],
    work: Workload,
) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = asm::DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut d = Driver {
        pci_find: a.create_label(),
        mmio_scan: a.create_label(),
        status_write: a.create_label(),
        status_read: a.create_label(),
        features_read: a.create_label(),
        features_write: a.create_label(),
        config_read: a.create_label(),
        queue_setup: a.create_label(),
        notify: a.create_label(),
        irq_setup: a.create_label(),
        bring_up: a.create_label(),
        wait_irqs: a.create_label(),
        blk_test: a.create_label(),
        net_test: a.create_label(),
        console_test: a.create_label(),
        rng_test: a.create_label(),
        irq_common: a.create_label(),
    };
    let mut stubs: Vec<CodeLabel> = Vec::new();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, s.header)?;
    idt.emit_clear(&mut a)?;
    idt.emit_install_all(&mut a, unexpected)?;
    for &(_, transport, _, vector, _) in table {
        let vectors = match transport {
            VirtioTransport::Pci => 2,
            VirtioTransport::Mmio => 1,
        };
        for v in 0..vectors {
            let l = a.create_label();
            idt.emit_install(&mut a, vector + v, l)?;
            stubs.push(l);
        }
    }
    a.lidt(ptr(s.idtr))?;
    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;

    // Find the devices.
    for (i, &(kind, transport, ..)) in table.iter().enumerate() {
        if transport != VirtioTransport::Pci {
            continue;
        }
        let id = u32::from(devices::virtio::pci::DEVICE_ID_BASE) + kind.device_type();
        a.mov(ebx, s.records[i])?;
        a.mov(edx, id << 16 | PCI_VENDOR)?;
        a.call(d.pci_find)?;
    }
    if table.iter().any(|e| e.1 == VirtioTransport::Mmio) {
        a.call(d.mmio_scan)?;
    }
    // Drive them.
    let end = match work {
        Workload::SelfTest(end, _) => {
            for (i, &(kind, ..)) in table.iter().enumerate() {
                a.mov(ebx, s.records[i])?;
                match kind {
                    BuiltinVirtioKind::Block => a.call(d.blk_test)?,
                    BuiltinVirtioKind::NetLoopback => a.call(d.net_test)?,
                    BuiltinVirtioKind::ConsoleLoopback => a.call(d.console_test)?,
                    BuiltinVirtioKind::Rng => a.call(d.rng_test)?,
                }
            }
            routines.print(&mut a, s.done)?;
            end
        }
        Workload::NetLoop { frames, frame_len } => {
            a.mov(ebx, s.records[0])?;
            emit_net_loop(&mut a, &mut d, s, &routines, &decimal, frames, frame_len)?;
            End::Halt
        }
    };
    match end {
        End::Halt => asm::emit_halt(&mut a)?,
        End::PowerOff => {
            use devices::acpi_pm::S5_SLP_TYP;
            const PM1A_CNT: u16 = layout::boot::ACPI_PM_BASE + 4;
            const SLP_EN: u16 = 1 << 13;
            a.mov(dx, u32::from(PM1A_CNT))?;
            a.mov(ax, u32::from(S5_SLP_TYP << 10 | SLP_EN))?;
            a.out(dx, ax)?;
            asm::emit_halt(&mut a)?;
        }
        End::Wait => {
            let mut wait = a.create_label();
            routines.print(&mut a, s.waiting)?;
            a.set_label(&mut wait)?;
            a.sti()?;
            a.hlt()?;
            a.jmp(wait)?;
        }
    }

    emit_discovery(&mut a, &mut d, s, table)?;
    emit_transport(&mut a, &mut d)?;
    emit_bring_up(&mut a, &mut d, s, &routines)?;
    if let Workload::SelfTest(..) = work {
        let has = |k: BuiltinVirtioKind| table.iter().any(|e| e.0 == k);
        if has(BuiltinVirtioKind::Block) {
            emit_blk_test(&mut a, &mut d, s, &routines, &decimal)?;
        }
        if has(BuiltinVirtioKind::NetLoopback) {
            emit_net_test(&mut a, &mut d, s, &routines, &decimal)?;
        }
        if has(BuiltinVirtioKind::ConsoleLoopback) {
            emit_console_test(&mut a, &mut d, s, &routines, &decimal)?;
        }
        if has(BuiltinVirtioKind::Rng) {
            emit_rng_test(&mut a, &mut d, s, &routines, &decimal)?;
        }
    }

    // Interrupt stubs: RBX = the device's record, then the common part.
    let mut stub_iter = stubs.into_iter();
    for (i, &(_, transport, ..)) in table.iter().enumerate() {
        let vectors = match transport {
            VirtioTransport::Pci => 2,
            VirtioTransport::Mmio => 1,
        };
        for _ in 0..vectors {
            let mut l = stub_iter.next().expect("one stub per vector");
            a.set_label(&mut l)?;
            a.push(rbx)?;
            a.mov(ebx, s.records[i])?;
            a.jmp(d.irq_common)?;
        }
    }
    // Common handler: on MMIO read and acknowledge the interrupt status;
    // count; EOI.
    let mut counted = a.create_label();
    a.set_label(&mut d.irq_common)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.push(rdi)?;
    a.cmp(qword_ptr(rbx + rec::KIND), 0)?;
    a.je(counted)?;
    a.mov(rdi, qword_ptr(rbx + rec::BASE))?;
    a.mov(
        eax,
        dword_ptr(rdi + devices::virtio::mmio::reg::INTERRUPT_STATUS),
    )?;
    a.mov(
        dword_ptr(rdi + devices::virtio::mmio::reg::INTERRUPT_ACK),
        eax,
    )?;
    a.set_label(&mut counted)?;
    a.inc(dword_ptr(rbx + rec::IRQ_COUNT))?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdi)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.pop(rbx)?;
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    routines.print(&mut a, s.unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    decimal.emit(&mut a, &routines)?;
    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE64)?.blob)
}

/// `pci_find` (RBX = record, EDX = device:vendor ID dword): the first
/// function of bus 0 with that ID; its structures from the vendor
/// capabilities, its MSI-X table; memory decoding and bus mastering on.
/// `mmio_scan`: probe the virtio-mmio register blocks until one lacks the
/// magic value; the first disk and NIC fill the MMIO records.
fn emit_discovery(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    table: &[DeviceEntry],
) -> Result<(), IcedError> {
    use devices::pci::config::cap_id;
    use devices::virtio::pci::cap_type;
    let mut next_slot = a.create_label();
    let mut found = a.create_label();
    let mut cap_loop = a.create_label();
    let mut not_msix = a.create_label();
    let mut not_common = a.create_label();
    let mut not_notify = a.create_label();
    let mut next_cap = a.create_label();
    let mut caps_done = a.create_label();
    let mut absent = a.create_label();
    a.set_label(&mut d.pci_find)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut next_slot)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 15)?;
    a.add(eax, ECAM as i32)?;
    a.mov(r12, rax)?;
    a.cmp(dword_ptr(r12), edx)?;
    a.je(found)?;
    a.inc(ecx)?;
    a.cmp(ecx, 32)?;
    a.jb(next_slot)?;
    a.jmp(absent)?;
    a.set_label(&mut found)?;
    a.or(word_ptr(r12 + 4), 6)?;
    // BAR0 (64-bit memory) in R13.
    a.mov(r13d, dword_ptr(r12 + 0x14))?;
    a.shl(r13, 32)?;
    a.mov(eax, dword_ptr(r12 + 0x10))?;
    a.and(eax, -16)?;
    a.or(r13, rax)?;
    a.movzx(r15d, byte_ptr(r12 + 0x34))?;
    a.set_label(&mut cap_loop)?;
    a.test(r15d, r15d)?;
    a.jz(caps_done)?;
    a.movzx(eax, byte_ptr(r12 + r15))?;
    a.cmp(eax, i32::from(cap_id::MSIX))?;
    a.jne(not_msix)?;
    a.lea(rax, qword_ptr(r12 + r15))?;
    a.mov(qword_ptr(rbx + rec::MSIX_CAP), rax)?;
    a.mov(eax, dword_ptr(r12 + r15 + 4))?;
    a.and(eax, -8)?;
    a.add(rax, r13)?;
    a.mov(qword_ptr(rbx + rec::MSIX_TABLE), rax)?;
    a.jmp(next_cap)?;
    a.set_label(&mut not_msix)?;
    a.cmp(eax, i32::from(cap_id::VENDOR))?;
    a.jne(next_cap)?;
    a.mov(eax, dword_ptr(r12 + r15 + 8))?;
    a.add(rax, r13)?;
    a.movzx(r8d, byte_ptr(r12 + r15 + 3))?;
    a.cmp(r8d, i32::from(cap_type::COMMON_CFG))?;
    a.jne(not_common)?;
    a.mov(qword_ptr(rbx + rec::BASE), rax)?;
    a.jmp(next_cap)?;
    a.set_label(&mut not_common)?;
    a.cmp(r8d, i32::from(cap_type::NOTIFY_CFG))?;
    a.jne(not_notify)?;
    a.mov(qword_ptr(rbx + rec::NOTIFY_BASE), rax)?;
    a.mov(eax, dword_ptr(r12 + r15 + 16))?;
    a.mov(qword_ptr(rbx + rec::NOTIFY_MULT), rax)?;
    a.jmp(next_cap)?;
    a.set_label(&mut not_notify)?;
    a.cmp(r8d, i32::from(cap_type::DEVICE_CFG))?;
    a.jne(next_cap)?;
    a.mov(qword_ptr(rbx + rec::DEVCFG), rax)?;
    a.set_label(&mut next_cap)?;
    a.movzx(r15d, byte_ptr(r12 + r15 + 1))?;
    a.jmp(cap_loop)?;
    a.set_label(&mut caps_done)?;
    a.mov(qword_ptr(rbx + rec::FOUND), 1)?;
    a.set_label(&mut absent)?;
    a.ret()?;

    // mmio_scan. Records: the first device of each kind on MMIO.
    let mut mmio_kinds: Vec<(BuiltinVirtioKind, u32)> = Vec::new();
    for (i, &(k, t, ..)) in table.iter().enumerate() {
        if t == VirtioTransport::Mmio && !mmio_kinds.iter().any(|e| e.0 == k) {
            mmio_kinds.push((k, s.records[i]));
        }
    }
    use devices::virtio::mmio::reg;
    use layout::virtio_mmio as slots;
    let mut next = a.create_label();
    let mut claim = a.create_label();
    let mut skip = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut d.mmio_scan)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut next)?;
    a.mov(eax, ecx)?;
    a.shl(eax, slots::SLOT_SIZE.trailing_zeros())?;
    a.add(eax, slots::BASE as u32 as i32)?;
    a.mov(rdi, rax)?;
    a.cmp(dword_ptr(rdi + reg::MAGIC), MMIO_MAGIC as i32)?;
    a.jne(done)?;
    a.mov(eax, dword_ptr(rdi + reg::DEVICE_ID))?;
    for &(kind, record) in &mmio_kinds {
        let mut other = a.create_label();
        a.cmp(eax, kind.device_type() as i32)?;
        a.jne(other)?;
        a.mov(r8d, record)?;
        a.jmp(claim)?;
        a.set_label(&mut other)?;
    }
    a.jmp(skip)?;
    a.set_label(&mut claim)?;
    a.cmp(qword_ptr(r8 + rec::FOUND), 0)?;
    a.jne(skip)?;
    a.mov(qword_ptr(r8 + rec::BASE), rdi)?;
    a.lea(rax, qword_ptr(rdi + reg::CONFIG))?;
    a.mov(qword_ptr(r8 + rec::DEVCFG), rax)?;
    a.mov(eax, ecx)?;
    a.and(eax, (slots::GSI_COUNT - 1) as i32)?;
    a.add(eax, slots::GSI_BASE as i32)?;
    a.mov(qword_ptr(r8 + rec::GSI), rax)?;
    a.mov(qword_ptr(r8 + rec::FOUND), 1)?;
    a.set_label(&mut skip)?;
    a.inc(ecx)?;
    a.cmp(ecx, slots::SLOTS as i32)?;
    a.jb(next)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// Branch to `mmio` when the record in RBX is a virtio-mmio device; RDI =
/// its BASE either way.
fn on_mmio(a: &mut CodeAssembler, mmio: CodeLabel) -> Result<(), IcedError> {
    a.mov(rdi, qword_ptr(rbx + rec::BASE))?;
    a.cmp(qword_ptr(rbx + rec::KIND), 0)?;
    a.jne(mmio)
}

/// The register accesses, per transport (RBX = record; clobber RDI and
/// the registers named):
/// - `status_write` (AL), `status_read` (-> EAX);
/// - `features_read` (ECX = select -> EAX), `features_write` (ECX =
///   select, EAX = bits);
/// - `config_read` (ECX = offset -> EAX, a dword of device configuration);
/// - `queue_setup` (ECX = queue; size [`QUEUE_SIZE`], rings in the
///   region, MSI-X vector = queue index on PCI); clobbers RAX, R8, R9;
/// - `notify` (ECX = queue);
/// - `irq_setup` (ECX = queues): MSI-X entries and enable, or the IOAPIC
///   entry of the MMIO line; clobbers RAX, RCX, RDX, R8.
fn emit_transport(a: &mut CodeAssembler, d: &mut Driver) -> Result<(), IcedError> {
    use devices::virtio::mmio::reg;
    use devices::virtio::pci::common as c;
    let c = |off: u64| off as i32;
    let r = |off: u64| off as i32;

    let mut mmio = a.create_label();
    a.set_label(&mut d.status_write)?;
    on_mmio(a, mmio)?;
    a.mov(byte_ptr(rdi + c(c::DEVICE_STATUS)), al)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.movzx(eax, al)?;
    a.mov(dword_ptr(rdi + r(reg::STATUS)), eax)?;
    a.ret()?;

    let mut mmio = a.create_label();
    a.set_label(&mut d.status_read)?;
    on_mmio(a, mmio)?;
    a.movzx(eax, byte_ptr(rdi + c(c::DEVICE_STATUS)))?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(eax, dword_ptr(rdi + r(reg::STATUS)))?;
    a.ret()?;

    let mut mmio = a.create_label();
    a.set_label(&mut d.features_read)?;
    on_mmio(a, mmio)?;
    a.mov(dword_ptr(rdi + c(c::DEVICE_FEATURE_SELECT)), ecx)?;
    a.mov(eax, dword_ptr(rdi + c(c::DEVICE_FEATURE)))?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(dword_ptr(rdi + r(reg::DEVICE_FEATURES_SEL)), ecx)?;
    a.mov(eax, dword_ptr(rdi + r(reg::DEVICE_FEATURES)))?;
    a.ret()?;

    let mut mmio = a.create_label();
    a.set_label(&mut d.features_write)?;
    on_mmio(a, mmio)?;
    a.mov(dword_ptr(rdi + c(c::DRIVER_FEATURE_SELECT)), ecx)?;
    a.mov(dword_ptr(rdi + c(c::DRIVER_FEATURE)), eax)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(dword_ptr(rdi + r(reg::DRIVER_FEATURES_SEL)), ecx)?;
    a.mov(dword_ptr(rdi + r(reg::DRIVER_FEATURES)), eax)?;
    a.ret()?;

    a.set_label(&mut d.config_read)?;
    a.mov(rdi, qword_ptr(rbx + rec::DEVCFG))?;
    a.mov(eax, dword_ptr(rdi + rcx))?;
    a.ret()?;

    // queue_setup: RAX = the queue's descriptor table.
    let mut mmio = a.create_label();
    a.set_label(&mut d.queue_setup)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.add(rax, qword_ptr(rbx + rec::REGION))?;
    on_mmio(a, mmio)?;
    a.mov(word_ptr(rdi + c(c::QUEUE_SELECT)), cx)?;
    a.mov(word_ptr(rdi + c(c::QUEUE_SIZE)), u32::from(QUEUE_SIZE))?;
    a.mov(word_ptr(rdi + c(c::QUEUE_MSIX_VECTOR)), cx)?;
    for (field, ring) in [
        (c::QUEUE_DESC, region::DESC0),
        (c::QUEUE_DRIVER, region::AVAIL0),
        (c::QUEUE_DEVICE, region::USED0),
    ] {
        a.lea(r9, qword_ptr(rax + ring))?;
        a.mov(dword_ptr(rdi + c(field)), r9d)?;
        a.mov(dword_ptr(rdi + c(field + 4)), 0)?;
    }
    // Where to notify: notify base + queue_notify_off * multiplier.
    a.movzx(r9d, word_ptr(rdi + c(c::QUEUE_NOTIFY_OFF)))?;
    a.imul_2(r9, qword_ptr(rbx + rec::NOTIFY_MULT))?;
    a.add(r9, qword_ptr(rbx + rec::NOTIFY_BASE))?;
    a.mov(qword_ptr(rbx + rcx * 8 + rec::NOTIFY), r9)?;
    a.mov(word_ptr(rdi + c(c::QUEUE_ENABLE)), 1u32)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(dword_ptr(rdi + r(reg::QUEUE_SEL)), ecx)?;
    a.mov(dword_ptr(rdi + r(reg::QUEUE_NUM)), u32::from(QUEUE_SIZE))?;
    for (low, ring) in [
        (reg::QUEUE_DESC_LOW, region::DESC0),
        (reg::QUEUE_DRIVER_LOW, region::AVAIL0),
        (reg::QUEUE_DEVICE_LOW, region::USED0),
    ] {
        a.lea(r9, qword_ptr(rax + ring))?;
        a.mov(dword_ptr(rdi + r(low)), r9d)?;
        a.mov(dword_ptr(rdi + r(low + 4)), 0)?;
    }
    a.mov(dword_ptr(rdi + r(reg::QUEUE_READY)), 1)?;
    a.ret()?;

    let mut mmio = a.create_label();
    a.set_label(&mut d.notify)?;
    on_mmio(a, mmio)?;
    a.mov(rdi, qword_ptr(rbx + rcx * 8 + rec::NOTIFY))?;
    a.mov(word_ptr(rdi), cx)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(dword_ptr(rdi + r(reg::QUEUE_NOTIFY)), ecx)?;
    a.ret()?;

    // irq_setup.
    let mut mmio = a.create_label();
    let mut entry = a.create_label();
    a.set_label(&mut d.irq_setup)?;
    on_mmio(a, mmio)?;
    a.mov(rdi, qword_ptr(rbx + rec::MSIX_TABLE))?;
    a.mov(r8d, dword_ptr(rbx + rec::VECTOR))?;
    a.set_label(&mut entry)?;
    a.mov(dword_ptr(rdi), apic::LAPIC_BASE)?;
    a.mov(dword_ptr(rdi + 4), 0)?;
    a.mov(dword_ptr(rdi + 8), r8d)?;
    a.mov(dword_ptr(rdi + 12), 0)?;
    a.add(rdi, 16)?;
    a.inc(r8d)?;
    a.dec(ecx)?;
    a.jnz(entry)?;
    a.mov(rdi, qword_ptr(rbx + rec::MSIX_CAP))?;
    a.or(word_ptr(rdi + 2), 0x8000)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    // IOAPIC entry: high dword (destination APIC 0), then the low one.
    a.mov(edx, apic::IOAPIC_BASE)?;
    a.mov(eax, dword_ptr(rbx + rec::GSI))?;
    a.lea(eax, dword_ptr(rax * 2 + 0x11))?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(dword_ptr(rdx + apic::IOWIN), 0)?;
    a.dec(eax)?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(eax, dword_ptr(rbx + rec::VECTOR))?;
    a.or(eax, (apic::RTE_LEVEL | 1 << 13) as i32)?;
    a.mov(dword_ptr(rdx + apic::IOWIN), eax)?;
    a.ret()?;

    // wait_irqs: sti; hlt until the record counts the expected interrupts.
    let mut done = a.create_label();
    a.set_label(&mut d.wait_irqs)?;
    a.mov(eax, dword_ptr(rbx + rec::IRQ_COUNT))?;
    a.cmp(eax, dword_ptr(rbx + rec::EXPECTED_IRQS))?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.jmp(d.wait_irqs)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `bring_up` (RBX = record, R14D = feature bits wanted in the low word,
/// R15D = queues): reset, ACKNOWLEDGE | DRIVER, features (printed),
/// FEATURES_OK, interrupts, queues, DRIVER_OK. Carry set when the device
/// refused the features.
fn emit_bring_up(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
) -> Result<(), IcedError> {
    use devices::virtio::status;
    let mut refused = a.create_label();
    let mut next_queue = a.create_label();
    a.set_label(&mut d.bring_up)?;
    a.xor(eax, eax)?;
    a.call(d.status_write)?;
    a.mov(al, i32::from(status::ACKNOWLEDGE))?;
    a.call(d.status_write)?;
    a.mov(al, i32::from(status::ACKNOWLEDGE | status::DRIVER))?;
    a.call(d.status_write)?;
    a.xor(ecx, ecx)?;
    a.call(d.features_read)?;
    a.and(r14d, eax)?;
    a.mov(eax, r14d)?;
    a.xor(ecx, ecx)?;
    a.call(d.features_write)?;
    a.mov(eax, F_HIGH_VERSION_1)?;
    a.mov(ecx, 1)?;
    a.call(d.features_write)?;
    routines.print(a, s.features)?;
    a.mov(eax, r14d)?;
    hex(a, routines, 8)?;
    a.mov(
        al,
        i32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
    )?;
    a.call(d.status_write)?;
    a.call(d.status_read)?;
    a.test(al, i32::from(status::FEATURES_OK))?;
    a.jz(refused)?;
    a.mov(ecx, r15d)?;
    a.call(d.irq_setup)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut next_queue)?;
    a.push(rcx)?;
    a.call(d.queue_setup)?;
    a.pop(rcx)?;
    a.inc(ecx)?;
    a.cmp(ecx, r15d)?;
    a.jb(next_queue)?;
    a.mov(
        al,
        i32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
    )?;
    a.call(d.status_write)?;
    a.clc()?;
    a.ret()?;
    a.set_label(&mut refused)?;
    routines.print(a, s.refused)?;
    a.stc()?;
    a.ret()
}

/// `print_hex` keeping RBX (the record pointer), which it clobbers.
fn hex(a: &mut CodeAssembler, routines: &Routines, digits: u32) -> Result<(), IcedError> {
    a.push(rbx)?;
    routines.print_hex(a, digits)?;
    a.pop(rbx)
}

/// Print `count` bytes at R12 + `offset` in hex, separated by `sep`.
/// Clobbers R13 and what printing does.
fn emit_hex_bytes(
    a: &mut CodeAssembler,
    routines: &Routines,
    offset: u32,
    count: u32,
    sep: u32,
) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut last = a.create_label();
    a.xor(r13d, r13d)?;
    a.set_label(&mut next)?;
    a.movzx(eax, byte_ptr(r12 + r13 + offset as i32))?;
    hex(a, routines, 2)?;
    a.inc(r13d)?;
    a.cmp(r13d, count as i32)?;
    a.je(last)?;
    routines.print(a, sep)?;
    a.jmp(next)?;
    a.set_label(&mut last)
}

/// Print the record's transport name after `what`; jump to `absent` (after
/// printing "not found") when the record was not filled in.
fn emit_device_intro(
    a: &mut CodeAssembler,
    s: &Strings,
    routines: &Routines,
    what: u32,
    done: CodeLabel,
) -> Result<(), IcedError> {
    let mut found = a.create_label();
    routines.print(a, what)?;
    a.mov(rsi, qword_ptr(rbx + rec::NAME))?;
    a.call(routines.print_str)?;
    a.cmp(qword_ptr(rbx + rec::FOUND), 0)?;
    a.jne(found)?;
    routines.print(a, s.not_found)?;
    a.jmp(done)?;
    a.set_label(&mut found)
}

/// Print ", interrupts N" and the end of the line.
fn emit_irq_count(
    a: &mut CodeAssembler,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
) -> Result<(), IcedError> {
    routines.print(a, s.interrupts)?;
    a.mov(eax, dword_ptr(rbx + rec::IRQ_COUNT))?;
    decimal.print(a)?;
    routines.print(a, s.line_end)
}

/// `blk_test` (RBX = record).
fn emit_blk_test(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
) -> Result<(), IcedError> {
    let mut done = a.create_label();
    let mut differs = a.create_label();
    let mut compared = a.create_label();
    a.set_label(&mut d.blk_test)?;
    emit_device_intro(a, s, routines, s.blk, done)?;
    a.mov(r14d, F_BLK_FLUSH | F_INDIRECT | F_EVENT_IDX)?;
    a.mov(r15d, 1)?;
    a.call(d.bring_up)?;
    a.jc(done)?;
    routines.print(a, s.capacity)?;
    a.xor(ecx, ecx)?;
    a.call(d.config_read)?;
    decimal.print(a)?;
    routines.print(a, s.sectors)?;
    // Publish the five requests, notify once, wait for the interrupt.
    a.mov(r12, qword_ptr(rbx + rec::REGION))?;
    a.mov(word_ptr(r12 + (region::AVAIL0 + 2)), BLK_REQUESTS)?;
    a.xor(ecx, ecx)?;
    a.call(d.notify)?;
    a.call(d.wait_irqs)?;
    routines.print(a, s.blk)?;
    a.mov(rsi, qword_ptr(rbx + rec::NAME))?;
    a.call(routines.print_str)?;
    routines.print(a, s.on)?;
    a.movzx(eax, word_ptr(r12 + (region::USED0 + 2)))?;
    decimal.print(a)?;
    routines.print(a, s.statuses)?;
    emit_hex_bytes(a, routines, region::STATUS, BLK_REQUESTS, s.space)?;
    routines.print(a, s.readback)?;
    a.lea(rsi, qword_ptr(r12 + region::WRITE_BUF))?;
    a.lea(rdi, qword_ptr(r12 + region::BUF_A))?;
    a.mov(ecx, 512)?;
    a.repe().cmpsb()?;
    a.jne(differs)?;
    routines.print(a, s.same)?;
    a.jmp(compared)?;
    a.set_label(&mut differs)?;
    routines.print(a, s.different)?;
    a.set_label(&mut compared)?;
    routines.print(a, s.sector0)?;
    a.mov(rax, qword_ptr(r12 + region::BUF_B as i32))?;
    hex(a, routines, 16)?;
    routines.print(a, s.id)?;
    a.lea(rsi, qword_ptr(r12 + region::ID_BUF))?;
    a.call(routines.print_str)?;
    routines.print(a, s.quote)?;
    emit_irq_count(a, s, routines, decimal)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `net_test` (RBX = record).
fn emit_net_test(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
) -> Result<(), IcedError> {
    use devices::virtio::net::{RX_QUEUE, TX_QUEUE};
    let src_mac = region::HEADERS + NET_HDR + 6;
    let mut done = a.create_label();
    let mut differs = a.create_label();
    let mut compared = a.create_label();
    a.set_label(&mut d.net_test)?;
    emit_device_intro(a, s, routines, s.net, done)?;
    a.mov(r14d, F_NET_MAC)?;
    a.mov(r15d, 2)?;
    a.call(d.bring_up)?;
    a.jc(done)?;
    // The MAC into the frame's source address, then printed.
    a.mov(r12, qword_ptr(rbx + rec::REGION))?;
    a.xor(ecx, ecx)?;
    a.call(d.config_read)?;
    a.mov(dword_ptr(r12 + src_mac), eax)?;
    a.mov(ecx, 4)?;
    a.call(d.config_read)?;
    a.mov(word_ptr(r12 + (src_mac + 4)), ax)?;
    routines.print(a, s.mac)?;
    emit_hex_bytes(a, routines, src_mac, 6, s.colon)?;
    routines.print(a, s.line_end)?;
    // Two receive buffers, then the frame.
    a.mov(word_ptr(r12 + (region::AVAIL0 + 2)), 2u32)?;
    a.mov(ecx, RX_QUEUE as u32)?;
    a.call(d.notify)?;
    a.mov(word_ptr(r12 + (region::AVAIL1 + 2)), 1u32)?;
    a.mov(ecx, TX_QUEUE as u32)?;
    a.call(d.notify)?;
    a.call(d.wait_irqs)?;
    routines.print(a, s.net)?;
    a.mov(rsi, qword_ptr(rbx + rec::NAME))?;
    a.call(routines.print_str)?;
    routines.print(a, s.on)?;
    a.movzx(eax, word_ptr(r12 + (region::USED1 + 2)))?;
    decimal.print(a)?;
    routines.print(a, s.frame_sent)?;
    a.movzx(eax, word_ptr(r12 + (region::USED0 + 2)))?;
    decimal.print(a)?;
    routines.print(a, s.received)?;
    routines.print(a, s.length)?;
    // The first used element's length.
    a.mov(eax, dword_ptr(r12 + (region::USED0 + 8)))?;
    decimal.print(a)?;
    routines.print(a, s.intact)?;
    a.lea(rsi, qword_ptr(r12 + (region::HEADERS + NET_HDR)))?;
    a.lea(rdi, qword_ptr(r12 + (region::BUF_A + NET_HDR)))?;
    a.mov(ecx, FRAME_LEN)?;
    a.repe().cmpsb()?;
    a.jne(differs)?;
    routines.print(a, s.same)?;
    a.jmp(compared)?;
    a.set_label(&mut differs)?;
    routines.print(a, s.different)?;
    a.set_label(&mut compared)?;
    emit_irq_count(a, s, routines, decimal)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `console_test` (RBX = record): greeting in, a line out, the line back
/// in, one interrupt per step.
fn emit_console_test(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
) -> Result<(), IcedError> {
    use devices::virtio::console::{RX_QUEUE, TX_QUEUE};
    let mut done = a.create_label();
    let mut keep = a.create_label();
    let mut differs = a.create_label();
    let mut compared = a.create_label();
    a.set_label(&mut d.console_test)?;
    emit_device_intro(a, s, routines, s.console, done)?;
    a.xor(r14d, r14d)?;
    a.mov(r15d, 2)?;
    a.call(d.bring_up)?;
    a.jc(done)?;
    routines.print(a, s.line_end)?;
    a.mov(r12, qword_ptr(rbx + rec::REGION))?;
    // Post the first receive buffer (the greeting), send the line, post
    // the second receive buffer (the echo): each step waits for its
    // interrupt.
    for (avail_ring, index, queue, irqs) in [
        (region::AVAIL0, 1u32, RX_QUEUE, 1u32),
        (region::AVAIL1, 1, TX_QUEUE, 2),
        (region::AVAIL0, 2, RX_QUEUE, 3),
    ] {
        a.mov(word_ptr(r12 + (avail_ring + 2)), index)?;
        a.mov(ecx, queue as u32)?;
        a.call(d.notify)?;
        a.mov(dword_ptr(rbx + rec::EXPECTED_IRQS), irqs)?;
        a.call(d.wait_irqs)?;
    }
    routines.print(a, s.console)?;
    a.mov(rsi, qword_ptr(rbx + rec::NAME))?;
    a.call(routines.print_str)?;
    routines.print(a, s.on)?;
    routines.print(a, s.received_quote)?;
    // The greeting, printed without its newline.
    a.mov(eax, dword_ptr(r12 + (region::USED0 + 8)))?;
    a.test(eax, eax)?;
    a.jz(keep)?;
    a.cmp(eax, CONSOLE_RX_LEN as i32)?;
    a.ja(keep)?;
    a.cmp(byte_ptr(r12 + rax + (region::BUF_A - 1)), i32::from(b'\n'))?;
    a.jne(keep)?;
    a.mov(byte_ptr(r12 + rax + (region::BUF_A - 1)), 0)?;
    a.set_label(&mut keep)?;
    a.lea(rsi, qword_ptr(r12 + region::BUF_A))?;
    a.call(routines.print_str)?;
    routines.print(a, s.paren_open)?;
    a.mov(eax, dword_ptr(r12 + (region::USED0 + 8)))?;
    decimal.print(a)?;
    routines.print(a, s.sent_quote)?;
    a.lea(rsi, qword_ptr(r12 + region::WRITE_BUF))?;
    a.call(routines.print_str)?;
    routines.print(a, s.paren_open)?;
    // The line's length: its transmit descriptor's.
    a.mov(eax, dword_ptr(r12 + (region::DESC1 + 8)))?;
    decimal.print(a)?;
    routines.print(a, s.echoed)?;
    // The echo: the second used receive element, as long as the line and
    // equal to it.
    a.movzx(eax, word_ptr(r12 + (region::USED0 + 2)))?;
    a.cmp(eax, 2)?;
    a.jne(differs)?;
    a.mov(ecx, dword_ptr(r12 + (region::DESC1 + 8)))?;
    a.cmp(dword_ptr(r12 + (region::USED0 + 16)), ecx)?;
    a.jne(differs)?;
    a.lea(rsi, qword_ptr(r12 + region::HEADERS))?;
    a.lea(rdi, qword_ptr(r12 + region::BUF_B))?;
    a.repe().cmpsb()?;
    a.jne(differs)?;
    routines.print(a, s.same)?;
    a.jmp(compared)?;
    a.set_label(&mut differs)?;
    routines.print(a, s.different)?;
    a.set_label(&mut compared)?;
    emit_irq_count(a, s, routines, decimal)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `rng_test` (RBX = record): two requests, one notification, one
/// interrupt; the bytes printed.
fn emit_rng_test(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
) -> Result<(), IcedError> {
    let mut done = a.create_label();
    a.set_label(&mut d.rng_test)?;
    emit_device_intro(a, s, routines, s.rng, done)?;
    a.xor(r14d, r14d)?;
    a.mov(r15d, 1)?;
    a.call(d.bring_up)?;
    a.jc(done)?;
    routines.print(a, s.line_end)?;
    a.mov(r12, qword_ptr(rbx + rec::REGION))?;
    a.mov(word_ptr(r12 + (region::AVAIL0 + 2)), RNG_REQUESTS)?;
    a.xor(ecx, ecx)?;
    a.call(d.notify)?;
    a.call(d.wait_irqs)?;
    routines.print(a, s.rng)?;
    a.mov(rsi, qword_ptr(rbx + rec::NAME))?;
    a.call(routines.print_str)?;
    routines.print(a, s.on)?;
    a.movzx(eax, word_ptr(r12 + (region::USED0 + 2)))?;
    decimal.print(a)?;
    routines.print(a, s.requests)?;
    a.mov(eax, dword_ptr(r12 + (region::USED0 + 8)))?;
    decimal.print(a)?;
    routines.print(a, s.plus)?;
    a.mov(eax, dword_ptr(r12 + (region::USED0 + 16)))?;
    decimal.print(a)?;
    routines.print(a, s.bytes_colon)?;
    emit_hex_bytes(a, routines, region::BUF_A, RNG_REQUEST, s.space)?;
    routines.print(a, s.semicolon)?;
    emit_hex_bytes(a, routines, region::BUF_B, RNG_REQUEST, s.space)?;
    emit_irq_count(a, s, routines, decimal)?;
    a.set_label(&mut done)?;
    a.ret()
}

/// `virtio-net-pci` and `virtio-net-mmio`: the virtio-net side of the I/O
/// benchmark's loop (the e1000's is [`super::e1000_loop`]). The same
/// driver as the self-test (discovery, bring-up, interrupts), one NIC on
/// one transport, then [`super::e1000_loop::FRAMES`] frames of
/// [`super::e1000_loop::FRAME_LEN`] bytes, one at a time, each through the
/// loopback and back: the frames, the per-frame checks and the printed
/// checksum are the e1000 guest's, so the two guests print the same
/// checksum.
///
/// Per frame: bump the transmit ring's available index (its descriptors
/// and ring entries are set up once; its available ring says
/// NO_INTERRUPT, as Linux's virtio-net with its transmit interrupts
/// off), notify the transmit queue, `sti; hlt` until the receive
/// interrupt, check the used element (length, sequence number), give the
/// buffer back to the receive ring, and notify the receive queue once
/// every half ring (Linux refills in batches too).
pub const NET_LOOP_PCI_NAME: &str = "virtio-net-pci";
pub const NET_LOOP_PCI_DESCRIPTION: &str =
    "64-bit long mode: a small virtio-net driver loops frames through virtio-pci (MSI-X) and a loopback backend";
pub const NET_LOOP_MMIO_NAME: &str = "virtio-net-mmio";
pub const NET_LOOP_MMIO_DESCRIPTION: &str =
    "64-bit long mode: a small virtio-net driver loops frames through virtio-mmio (IOAPIC line) and a loopback backend";

/// The device region of the frame loop (after the self-test's rings and
/// transmit frame at [`region::HEADERS`]): the receive buffers.
mod net_loop {
    pub const RX_BUFS: u32 = super::region::BUF_A;
    pub const RX_BUF_LEN: u32 = 2048;
    pub const END: u32 = RX_BUFS + super::QUEUE_SIZE as u32 * RX_BUF_LEN;
    /// Where the region sits and the first vector.
    pub const BASE: u32 = 0x30000;
    pub const VECTOR: u8 = 0x44;
}

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const _: () = assert!(NET_HDR + super::e1000_loop::FRAME_LEN <= net_loop::RX_BUF_LEN);
const _: () = assert!(region::HEADERS + NET_HDR + super::e1000_loop::FRAME_LEN <= region::BLOB_END);

fn net_loop_table(transport: VirtioTransport) -> [DeviceEntry; 1] {
    [(
        BuiltinVirtioKind::NetLoopback,
        transport,
        net_loop::BASE,
        net_loop::VECTOR,
        0,
    )]
}

pub fn build_net_loop_pci() -> GuestImage {
    build_net_loop(
        VirtioTransport::Pci,
        super::e1000_loop::FRAMES,
        super::e1000_loop::FRAME_LEN,
    )
}

pub fn build_net_loop_mmio() -> GuestImage {
    build_net_loop(
        VirtioTransport::Mmio,
        super::e1000_loop::FRAMES,
        super::e1000_loop::FRAME_LEN,
    )
}

/// The frame loop with another frame count and length (the I/O
/// benchmark's runs); `frame_len` is clamped to 64..=1514.
pub fn build_net_loop(transport: VirtioTransport, frames: u32, frame_len: u32) -> GuestImage {
    image_of(
        net_loop_program(transport, frames, frame_len),
        &net_loop_table(transport),
    )
}

pub fn net_loop_program(transport: VirtioTransport, frames: u32, frame_len: u32) -> GuestProgram {
    let frame_len = frame_len.clamp(64, super::e1000_loop::FRAME_LEN);
    assemble_program(
        &net_loop_table(transport),
        Workload::NetLoop { frames, frame_len },
    )
    .expect("virtio-net loop guest assembles")
}

/// The prepared rings and the frame of the loop's NIC at `base`: every
/// receive descriptor on its own buffer and in the available ring (the
/// index is published by the driver), every transmit descriptor on the
/// one frame, transmit interrupts off.
fn net_loop_region(base: u32, frame_len: u32) -> Vec<u8> {
    use region::*;
    let mut b = vec![0u8; BLOB_END as usize];
    let all: Vec<u16> = (0..QUEUE_SIZE).collect();
    for i in 0..u32::from(QUEUE_SIZE) {
        let rx = base + net_loop::RX_BUFS + i * net_loop::RX_BUF_LEN;
        put(
            &mut b,
            DESC0 + 16 * i,
            &desc(rx, net_loop::RX_BUF_LEN, DESC_WRITE, 0),
        );
        put(
            &mut b,
            DESC1 + 16 * i,
            &desc(base + HEADERS, NET_HDR + frame_len, 0, 0),
        );
    }
    avail(&mut b, AVAIL0, &all);
    avail(&mut b, AVAIL1, &all);
    put(&mut b, AVAIL1, &AVAIL_F_NO_INTERRUPT.to_le_bytes());
    // The e1000 guest's frame: both addresses the NIC's MAC (the driver
    // writes them), a local ethertype, 0x5a up to the end, the sequence
    // number at 14.
    let frame = HEADERS + NET_HDR;
    put(&mut b, frame, &vec![0x5a; frame_len as usize]);
    put(&mut b, frame + 12, &ETHERTYPE_LOCAL.to_be_bytes());
    b
}

/// The frame loop (RBX = the NIC's record); falls through when done.
fn emit_net_loop(
    a: &mut CodeAssembler,
    d: &mut Driver,
    s: &Strings,
    routines: &Routines,
    decimal: &asm::DecimalPrinter,
    frames: u32,
    frame_len: u32,
) -> Result<(), IcedError> {
    use devices::virtio::net::{RX_QUEUE, TX_QUEUE};
    let l = s.looped.as_ref().expect("the loop's strings");
    let frame = region::HEADERS + NET_HDR;
    let used_len = NET_HDR + frame_len;
    let half = u32::from(QUEUE_SIZE / 2);
    let mut done = a.create_label();
    let mut bad = a.create_label();
    emit_device_intro(a, s, routines, s.net, done)?;
    a.mov(r14d, F_NET_MAC)?;
    a.mov(r15d, 2)?;
    a.call(d.bring_up)?;
    a.jc(done)?;
    // The MAC into both addresses of the frame, then printed.
    a.mov(r12, qword_ptr(rbx + rec::REGION))?;
    a.xor(ecx, ecx)?;
    a.call(d.config_read)?;
    a.mov(dword_ptr(r12 + frame), eax)?;
    a.mov(dword_ptr(r12 + (frame + 6)), eax)?;
    a.mov(ecx, 4)?;
    a.call(d.config_read)?;
    a.mov(word_ptr(r12 + (frame + 4)), ax)?;
    a.mov(word_ptr(r12 + (frame + 10)), ax)?;
    routines.print(a, s.mac)?;
    emit_hex_bytes(a, routines, frame, 6, s.colon)?;
    routines.print(a, s.line_end)?;
    // Every receive buffer, one notification.
    a.mov(word_ptr(r12 + (region::AVAIL0 + 2)), u32::from(QUEUE_SIZE))?;
    a.mov(ecx, RX_QUEUE as u32)?;
    a.call(d.notify)?;

    // R13 = frame number, R14 = checksum, R15 = interrupts before the send.
    let mut next = a.create_label();
    let mut wait = a.create_label();
    let mut arrived = a.create_label();
    let mut no_kick = a.create_label();
    a.xor(r13d, r13d)?;
    a.xor(r14d, r14d)?;
    a.set_label(&mut next)?;
    a.mov(dword_ptr(r12 + (frame + 14)), r13d)?;
    a.mov(r15d, dword_ptr(rbx + rec::IRQ_COUNT))?;
    a.inc(word_ptr(r12 + (region::AVAIL1 + 2)))?;
    a.mov(ecx, TX_QUEUE as u32)?;
    a.call(d.notify)?;
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(rbx + rec::IRQ_COUNT), r15d)?;
    a.jne(arrived)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.jmp(wait)?;
    a.set_label(&mut arrived)?;
    // The used ring has this frame: index = frame + 1, element frame % 16
    // = (buffer id, length).
    a.movzx(eax, word_ptr(r12 + (region::USED0 + 2)))?;
    a.lea(ecx, dword_ptr(r13 + 1))?;
    a.movzx(ecx, cx)?;
    a.cmp(eax, ecx)?;
    a.jne(bad)?;
    a.mov(eax, r13d)?;
    a.and(eax, i32::from(QUEUE_SIZE - 1))?;
    a.mov(esi, dword_ptr(r12 + rax * 8 + (region::USED0 + 4)))?;
    a.cmp(
        dword_ptr(r12 + rax * 8 + (region::USED0 + 8)),
        used_len as i32,
    )?;
    a.jne(bad)?;
    a.cmp(esi, i32::from(QUEUE_SIZE))?;
    a.jae(bad)?;
    // RDI = the buffer's frame.
    a.mov(edi, esi)?;
    a.shl(edi, net_loop::RX_BUF_LEN.trailing_zeros())?;
    a.add(rdi, r12)?;
    a.add(rdi, (net_loop::RX_BUFS + NET_HDR) as i32)?;
    a.mov(eax, dword_ptr(rdi + 14))?;
    a.cmp(eax, r13d)?;
    a.jne(bad)?;
    // checksum = rotl(checksum, 5) ^ (sequence + last byte), as the e1000's.
    a.rol(r14d, 5)?;
    a.movzx(ecx, byte_ptr(rdi + (frame_len - 1) as i32))?;
    a.add(eax, ecx)?;
    a.xor(r14d, eax)?;
    // The buffer back into the receive ring.
    a.movzx(eax, word_ptr(r12 + (region::AVAIL0 + 2)))?;
    a.and(eax, i32::from(QUEUE_SIZE - 1))?;
    a.mov(word_ptr(r12 + rax * 2 + (region::AVAIL0 + 4)), si)?;
    a.inc(word_ptr(r12 + (region::AVAIL0 + 2)))?;
    a.inc(r13d)?;
    a.test(r13d, (half - 1) as i32)?;
    a.jnz(no_kick)?;
    a.mov(ecx, RX_QUEUE as u32)?;
    a.call(d.notify)?;
    a.set_label(&mut no_kick)?;
    a.cmp(r13d, frames as i32)?;
    a.jb(next)?;

    routines.print(a, l.sent)?;
    a.mov(eax, frames)?;
    decimal.print(a)?;
    routines.print(a, l.bytes)?;
    a.mov(eax, frames.wrapping_mul(frame_len))?;
    decimal.print(a)?;
    routines.print(a, l.irqs)?;
    a.mov(eax, dword_ptr(rbx + rec::IRQ_COUNT))?;
    decimal.print(a)?;
    routines.print(a, l.sum)?;
    a.mov(eax, r14d)?;
    hex(a, routines, 8)?;
    routines.print(a, s.line_end)?;
    a.jmp(done)?;

    a.set_label(&mut bad)?;
    routines.print(a, l.bad)?;
    a.mov(eax, r13d)?;
    decimal.print(a)?;
    routines.print(a, s.line_end)?;
    a.set_label(&mut done)?;
    a.cli()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::asm::testing;

    #[test]
    fn assembles_and_decodes() {
        testing::check_program(&program());
        testing::check_program(&console_program());
        testing::check_program(&rng_program());
        for t in [VirtioTransport::Pci, VirtioTransport::Mmio] {
            testing::check_program(&net_loop_program(t, 16, 1514));
        }
    }
}
