//! A local APIC (xAPIC, plus the x2APIC register interface through MSRs), as
//! register and interrupt-priority logic only.
//!
//! One [`Lapic`] per vCPU; nothing is global. The model never calls another
//! device: what it has to say to the rest of the machine (IPIs, EOIs for the
//! IOAPIC) goes into an outbox of [`LapicMessage`]s that the VMM drains with
//! [`Lapic::take_messages`] after each access and routes (to other LAPICs
//! with [`Lapic::matches_destination`] / [`Lapic::apr`], to the IOAPIC).
//! What comes in goes through [`Lapic::accept`] (fixed and lowest-priority
//! interrupts from the IOAPIC or routed IPIs), [`Lapic::accept_nmi`],
//! [`Lapic::accept_extint`] and the two pins [`Lapic::set_lint0`] /
//! [`Lapic::set_lint1`]. The vCPU loop asks [`Lapic::pending_interrupt`]
//! when the guest can take an interrupt and confirms with
//! [`Lapic::acknowledge`] (the INTA cycle).
//!
//! # Interfaces
//!
//! * **MMIO.** `Lapic` is the [`BusDevice`] of the 4 KiB xAPIC page
//!   ([`MMIO_SIZE`]). The machine maps it at [`Lapic::mmio_base`] (initially
//!   [`DEFAULT_BASE`], 0xfee00000) and must move or unmap it whenever the
//!   guest's write of IA32_APIC_BASE (routed to [`Lapic::set_apic_base`] or
//!   [`Lapic::write_msr`]) changes that: it is `None` while the APIC is
//!   globally disabled or in x2APIC mode. Registers are 32 bits wide at
//!   16-byte aligned offsets. Reads of any size are served byte by byte: the
//!   4 bytes at a register offset hold the register, the other 12 bytes of
//!   each 16-byte slot and undefined registers read 0. Writes must be 4 bytes
//!   at a 16-byte aligned offset; other writes, writes to read-only or
//!   undefined registers are ignored (rate-limited debug log). ESR bit 7
//!   (illegal register address) is never set, as in KVM. If the page is
//!   still mapped while the APIC is disabled or in x2APIC mode, reads return
//!   all ones and writes are dropped, as for unmapped memory.
//! * **MSRs.** [`Lapic::read_msr`] / [`Lapic::write_msr`] serve
//!   IA32_APIC_BASE (0x1b), IA32_TSC_DEADLINE (0x6e0) and the x2APIC range
//!   0x800-0x8ff; `None` / `false` means "raise #GP". Any other MSR number
//!   also answers `None` / `false` ([`Lapic::handles_msr`] tells them apart).
//!   The x2APIC registers exist only in x2APIC mode (#GP otherwise). In
//!   x2APIC mode: ID and LDR are read-only (x2APIC ID = the initial APIC ID,
//!   LDR derived from it as the SDM says: cluster `id >> 4` in bits 31:16,
//!   bit `id & 15` in bits 15:0); DFR (0x80e), APR (0x809), RRD (0x80c) and
//!   ICR high (0x831) do not exist; ICR is one 64-bit MSR (0x830) with the
//!   32-bit destination in bits 63:32; SELF IPI (0x83f) is write-only and
//!   delivers its vector to this LAPIC directly. #GP also for: reads of
//!   write-only registers (EOI, SELF IPI), writes to read-only ones, bits
//!   63:32 set (except ICR), a non-zero write to EOI or ESR. Other reserved
//!   bits are ignored.
//!
//! # IA32_APIC_BASE
//!
//! Bits 12-51 base address, 11 global enable (EN), 10 x2APIC enable (EXTD),
//! 8 BSP. Any other bit set, or a base bit at or above the guest's MAXPHYADDR
//! ([`Lapic::set_phys_addr_bits`]),
//! → #GP. The legal transitions are those of SDM
//! figure "x2APIC State Transitions": disabled ↔ xAPIC → x2APIC → disabled;
//! EN=0 with EXTD=1, x2APIC → xAPIC and disabled → x2APIC are #GP. The BSP
//! bit is hardware's: a guest write cannot change it (ignored, as in QEMU).
//! Entering the disabled state resets every register to the SDM power-up
//! state (all LVTs masked, SVR 0xff, DFR all ones, ID = initial ID, timer
//! stopped); while disabled the APIC accepts nothing, and LINT0 / LINT1 act
//! as the processor's INTR and NMI pins directly (LINT0 high reports
//! [`InterruptRequest::ExtInt`], a LINT1 rising edge an NMI).
//!
//! # Reset state
//!
//! [`Lapic::new`] and [`Lapic::reset`] give the state firmware leaves behind,
//! as KVM and QEMU do: base 0xfee00000 enabled (plus BSP on the BSP), the
//! registers at their power-up values, except that the BSP's LVT LINT0 is
//! 0x700 (ExtINT, unmasked: "virtual wire" mode), so the 8259 PIC reaches
//! the BSP before the OS programs its APIC. The APIC is software-disabled
//! (SVR 0xff) at that point; LINT delivery follows only the LVT mask bits
//! (software disable sets them all when the guest clears SVR bit 8).
//! [`Lapic::init`] is the INIT signal: registers reset, ID, base MSR and
//! mode kept.
//!
//! # Registers
//!
//! Version 0x00050014: version 0x14, max LVT entry 5 (timer, thermal, perf,
//! LINT0, LINT1, error), no EOI-broadcast suppression (SVR bit 12 is
//! reserved, not stored). The LVT CMCI register (0x2f0 / 0x82f) is there for
//! software that touches it anyway but never fires; neither do thermal and
//! perf (no sources). SVR keeps bits 0-9 (vector, software enable, focus
//! check disable - the focus bit is stored and has no effect). xAPIC ID and
//! LDR are writable (bits 24-31), DFR bits 28-31 (the rest read as ones).
//! ESR has the SDM's write-then-read semantics: errors accumulate in a
//! hidden latch, a write copies the latch to the readable ESR and clears it.
//! Each error also sends the LVT error interrupt (if unmasked; an illegal
//! vector there only adds "receive illegal vector" to the latch). Illegal
//! vectors (0-15): in a fixed or lowest-priority ICR send or a SELF IPI,
//! "send illegal vector" (ESR bit 5) and nothing is sent; in an interrupt
//! received or generated by an LVT, "receive illegal vector" (bit 6) and it
//! is dropped. ICR's delivery status is always 0 (delivery is instant).
//!
//! # Interrupts
//!
//! * **Acceptance.** Fixed / lowest-priority vectors set IRR and set or
//!   clear TMR by trigger mode; they are dropped while the APIC is
//!   hardware- or software-disabled (as KVM). IRR bits held while software
//!   disabled stay, but are not delivered until the APIC is re-enabled.
//! * **Priority.** [`Lapic::pending_interrupt`] reports, in this order, a
//!   latched NMI, an ExtINT request (latched by [`Lapic::accept_extint`] or
//!   a LINT pin in ExtINT mode held high - level semantics, the PIC's INTR
//!   output), then the highest IRR vector whose priority class (vector >> 4)
//!   exceeds PPR's. PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV & 0xf0.
//!   APR is computed as the SDM says (for lowest-priority arbitration).
//! * **INTA.** [`Lapic::acknowledge`] moves the highest deliverable IRR
//!   vector to ISR (whatever the caller saw earlier: the INTA cycle takes
//!   what is highest now). If nothing is deliverable any more - the guest
//!   raised TPR, or the vector went away, between `pending_interrupt` and
//!   `acknowledge` - it returns the spurious vector (SVR bits 0-7), which is
//!   not put in ISR and needs no EOI. NMI and ExtINT do not touch ISR; for
//!   ExtINT the VMM then asks the PIC for the vector.
//! * **EOI.** Clears the highest ISR bit; if that vector's TMR bit is set,
//!   queues [`LapicMessage::Eoi`] for the IOAPIC (EOI broadcast) and clears
//!   the remote IRR of a level-triggered fixed LINT entry with that vector.
//! * **LINT pins** take the asserted level (polarity is stored, not
//!   applied: the caller passes the logical level). By LVT delivery mode:
//!   fixed edge (rising edge sets IRR), fixed level (sets IRR and remote IRR
//!   while high; again after EOI if still high), NMI (rising edge), ExtINT
//!   (level, reported as [`InterruptRequest::ExtInt`]); SMI, INIT and
//!   reserved modes are ignored (logged once in a while).
//! * **IPIs.** A write to ICR low (xAPIC) or ICR (x2APIC) sends. Shorthand
//!   "self" with fixed delivery is delivered to this LAPIC directly; other
//!   modes with "self" are invalid and dropped. Everything else, including
//!   "all including self", becomes a [`LapicMessage::Ipi`] for the VMM to
//!   route. Delivery modes 3 and 7 are reserved in ICR: dropped. The outbox
//!   holds at most [`OUTBOX_LIMIT`] messages (a VMM drains it after every
//!   access, so only a VMM bug fills it; beyond that messages are dropped
//!   and logged).
//!
//! # Timer
//!
//! The counter decrements at `timer_hz / divide` (constructor's `timer_hz`
//! is the APIC bus clock; [`DEFAULT_TIMER_HZ`] is 1 GHz, KVM's choice, which
//! makes one tick of divide-by-1 exactly one nanosecond; Linux calibrates
//! the rate, so any value works). The count is computed from the clock,
//! never stepped: the state keeps the VM time the counter held a known
//! value, so the current count (which marks the [`TimeTaint`]) and the
//! deadlines are exact: expiry `k` of a count started at `t0` with `c0`
//! is at the first nanosecond at which `c0 + k * initial` ticks have
//! elapsed. One-shot stops at 0; periodic reloads. **Lost ticks:** periodic
//! expiries the VMM was late for, and expiries that find the timer's vector
//! still pending in IRR, would merge into one interrupt; like KVM's
//! `reinject` and QEMU's lost-tick policies, the model counts them (at most
//! [`MAX_LOST_TICKS`]) and delivers one each time the guest takes the timer
//! interrupt (IRR is set again as the vector moves to ISR, so the next one
//! follows the guest's EOI). Reprogramming the timer forgets them. Mode 3
//! (reserved)
//! counts as one-shot. Writing the divide configuration or switching
//! between one-shot and periodic keeps the current count and continues from
//! it (the fraction of a tick in progress is lost); switching to or from
//! TSC-deadline mode disarms the timer and clears the initial count and the
//! deadline (as KVM). An expiry while the LVT is masked generates nothing;
//! [`Timed::next_deadline`] reports no deadline then (the expiries are
//! caught up without interrupts at the next access or `advance`).
//!
//! **TSC-deadline mode.** The guest's TSC comes from an injected
//! [`TscSource`]: by default ([`ClockTsc`]) `ns_to_ticks(now_ns, tsc_hz)`
//! (`tsc_hz` from the constructor), i.e. it counts from 0 at VM creation,
//! as the interpreter's RDTSC does; on KVM the VMM injects the guest's
//! hardware TSC (host TSC plus KVM's offset) with
//! [`Lapic::set_tsc_source`], and the timer is scheduled on the VM clock
//! from the source's estimate and fires when the source reads the deadline
//! or more. [`Lapic::tsc`] gives the source's value. The deadline fires at the first nanosecond whose TSC is >= the
//! MSR value, then the MSR reads 0. Writing 0 disarms; a deadline already
//! past fires at once. In other timer modes the MSR reads 0 and writes are
//! ignored. Reads of the MSR mark the [`TimeTaint`] (the value drops to 0
//! when time passes the deadline).
//!
//! Every access (MMIO, MSR, base write) first brings the timer up to the
//! clock's now, so the model is exact even when the VMM calls
//! [`Timed::advance`] late; the VMM must check
//! [`Lapic::pending_interrupt`] after every access and every `advance`.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::clock::{ns_to_ticks, ticks_to_ns_ceil, Clock, ClockTsc, TimeTaint, Timed, TscSource};
use crate::ratelimit::RateLimiter;

/// Where the xAPIC page is after reset.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC MMIO page.
pub const MMIO_SIZE: u64 = 0x1000;
/// A good timer (bus) clock: 1 GHz, as KVM's in-kernel LAPIC.
pub const DEFAULT_TIMER_HZ: u64 = 1_000_000_000;
/// Version register: version 0x14, max LVT entry 5, no EOI-broadcast
/// suppression.
pub const VERSION: u32 = 0x0005_0014;
/// Most messages the outbox keeps.
pub const OUTBOX_LIMIT: usize = 1024;

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC register MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC register MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: global enable.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: the base address bits (12-51).
pub const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The physical-address width (MAXPHYADDR) a LAPIC assumes until the
/// machine sets the one its guest's CPUID.80000008H:EAX[7:0] reports
/// ([`Lapic::set_phys_addr_bits`]); the SDM's width when that leaf is absent.
pub const DEFAULT_PHYS_ADDR_BITS: u32 = 36;

/// IA32_APIC_BASE bits a WRMSR may set for MAXPHYADDR `phys_bits`: BSP,
/// x2APIC enable, enable and the base bits below `phys_bits`; the rest are
/// reserved (#GP).
pub fn apic_base_writable(phys_bits: u32) -> u64 {
    let phys = if phys_bits >= 52 {
        APIC_BASE_ADDR_MASK
    } else {
        APIC_BASE_ADDR_MASK & ((1u64 << phys_bits) - 1)
    };
    phys | APIC_BASE_ENABLE | APIC_BASE_EXTD | APIC_BASE_BSP
}

/// ESR: send illegal vector.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR: receive illegal vector.
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
pub const REG_ID: u32 = 0x020;
pub const REG_VERSION: u32 = 0x030;
pub const REG_TPR: u32 = 0x080;
pub const REG_APR: u32 = 0x090;
pub const REG_PPR: u32 = 0x0a0;
pub const REG_EOI: u32 = 0x0b0;
pub const REG_RRD: u32 = 0x0c0;
pub const REG_LDR: u32 = 0x0d0;
pub const REG_DFR: u32 = 0x0e0;
pub const REG_SVR: u32 = 0x0f0;
pub const REG_ISR: u32 = 0x100;
pub const REG_TMR: u32 = 0x180;
pub const REG_IRR: u32 = 0x200;
pub const REG_ESR: u32 = 0x280;
pub const REG_LVT_CMCI: u32 = 0x2f0;
pub const REG_ICR_LOW: u32 = 0x300;
pub const REG_ICR_HIGH: u32 = 0x310;
pub const REG_LVT_TIMER: u32 = 0x320;
pub const REG_LVT_THERMAL: u32 = 0x330;
pub const REG_LVT_PERF: u32 = 0x340;
pub const REG_LVT_LINT0: u32 = 0x350;
pub const REG_LVT_LINT1: u32 = 0x360;
pub const REG_LVT_ERROR: u32 = 0x370;
pub const REG_TIMER_INITIAL: u32 = 0x380;

/// Periodic-timer interrupts owed to the guest at most; more are dropped.
pub const MAX_LOST_TICKS: u32 = 1000;
pub const REG_TIMER_CURRENT: u32 = 0x390;
pub const REG_TIMER_DIVIDE: u32 = 0x3e0;
/// x2APIC only (MSR 0x83f).
pub const REG_SELF_IPI: u32 = 0x3f0;

/// Number of LVT entries, indexed by the `LVT_*` constants.
pub const LVT_COUNT: usize = 7;
pub const LVT_CMCI: usize = 0;
pub const LVT_TIMER: usize = 1;
pub const LVT_THERMAL: usize = 2;
pub const LVT_PERF: usize = 3;
pub const LVT_LINT0: usize = 4;
pub const LVT_LINT1: usize = 5;
pub const LVT_ERROR: usize = 6;

// LVT bits.
pub const LVT_MASKED: u32 = 1 << 16;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_TIMER_MODE_SHIFT: u32 = 17;

/// Writable bits of each LVT entry.
const LVT_WRITE_MASK: [u32; LVT_COUNT] = [
    0x0001_07ff, // CMCI: vector, delivery mode, mask
    0x0007_00ff, // timer: vector, mask, mode
    0x0001_07ff, // thermal
    0x0001_07ff, // perf
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];

// Delivery mode field values (bits 8-10).
const DM_FIXED: u32 = 0;
const DM_LOWEST: u32 = 1;
const DM_SMI: u32 = 2;
const DM_NMI: u32 = 4;
const DM_INIT: u32 = 5;
const DM_STARTUP: u32 = 6;
const DM_EXTINT: u32 = 7;

// SVR bits.
const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITE_MASK: u32 = 0x3ff;

// ICR low bits.
const ICR_LOW_MASK: u32 = 0x000c_cfff;
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;

const TIMER_DIVIDE_MASK: u32 = 0xb;
const DFR_FLAT: u32 = 0xffff_ffff;

/// What the LAPIC asks the vCPU to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterruptRequest {
    /// A fixed interrupt with this vector.
    Fixed(u8),
    /// An 8259-style interrupt: the vector comes from the PIC.
    ExtInt,
    /// A non-maskable interrupt (vector 2).
    Nmi,
}

/// ICR delivery modes that can be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
}

impl DeliveryMode {
    fn from_icr(bits: u32) -> Option<Self> {
        match bits {
            DM_FIXED => Some(DeliveryMode::Fixed),
            DM_LOWEST => Some(DeliveryMode::LowestPriority),
            DM_SMI => Some(DeliveryMode::Smi),
            DM_NMI => Some(DeliveryMode::Nmi),
            DM_INIT => Some(DeliveryMode::Init),
            DM_STARTUP => Some(DeliveryMode::StartUp),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DestMode {
    Physical,
    Logical,
}

/// ICR destination shorthand (bits 18-19).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TriggerMode {
    Edge,
    Level,
}

/// What the LAPIC asks the VMM to deliver elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LapicMessage {
    /// An interprocessor interrupt, as written to ICR.
    Ipi {
        vector: u8,
        delivery_mode: DeliveryMode,
        dest_mode: DestMode,
        shorthand: Shorthand,
        /// xAPIC sender: the 8-bit destination (0xff = broadcast);
        /// x2APIC sender: the 32-bit one (0xffffffff = broadcast).
        destination: u32,
        /// ICR bit 14 (assert; 0 only for the legacy INIT level de-assert).
        level: bool,
        trigger: TriggerMode,
        /// The sender was in x2APIC mode (destination format).
        x2apic: bool,
    },
    /// EOI of a level-triggered vector, for the IOAPIC(s).
    Eoi { vector: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disabled,
    XApic,
    X2Apic,
}

fn mode_of(base: u64) -> Option<Mode> {
    match (base & APIC_BASE_ENABLE != 0, base & APIC_BASE_EXTD != 0) {
        (false, false) => Some(Mode::Disabled),
        (true, false) => Some(Mode::XApic),
        (true, true) => Some(Mode::X2Apic),
        (false, true) => None,
    }
}

/// Everything a LAPIC holds, for snapshots. The timer is kept as the VM
/// time at which the counter held a known value, never as a count that
/// was stepped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LapicState {
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// The xAPIC ID register's ID (bits 24-31).
    pub xapic_id: u8,
    pub tpr: u8,
    /// xAPIC LDR (bits 24-31); in x2APIC mode the LDR is derived instead.
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    /// The readable ESR.
    pub esr: u32,
    /// Errors seen since the last ESR write.
    pub esr_latch: u32,
    /// LVT entries, indexed by `LVT_*`.
    pub lvt: [u32; LVT_COUNT],
    pub icr_low: u32,
    /// xAPIC: the ICR high register (destination in bits 24-31);
    /// x2APIC: the 32-bit destination.
    pub icr_high: u32,
    pub timer_initial: u32,
    /// Divide configuration register (bits 0, 1, 3).
    pub timer_divide: u32,
    /// VM time (ns) at which the counter held `timer_start_count`.
    pub timer_start_ns: u64,
    /// Count at `timer_start_ns`; 0 = timer stopped.
    pub timer_start_count: u32,
    /// Expiries delivered since `timer_start_ns`.
    pub timer_expiries: u64,
    /// Periodic expiries merged into others, owed to the guest.
    #[serde(default)]
    pub timer_lost: u32,
    /// IA32_TSC_DEADLINE (0 = disarmed).
    pub tsc_deadline: u64,
    /// Asserted levels of LINT0 and LINT1.
    pub lint: [bool; 2],
    pub nmi_pending: bool,
    /// An ExtINT message was accepted and not acknowledged yet.
    pub extint_pending: bool,
    /// Messages not yet taken by the VMM.
    pub outbox: VecDeque<LapicMessage>,
}

impl LapicState {
    /// The state at power-on, as firmware leaves it (see the module
    /// documentation): enabled at the default base, virtual wire on the BSP.
    pub fn power_on(apic_id: u32, bsp: bool) -> Self {
        let mut s = LapicState {
            apic_base: DEFAULT_BASE | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 },
            xapic_id: apic_id as u8,
            tpr: 0,
            ldr: 0,
            dfr: DFR_FLAT,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_latch: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            icr_low: 0,
            icr_high: 0,
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: 0,
            timer_start_count: 0,
            timer_expiries: 0,
            timer_lost: 0,
            tsc_deadline: 0,
            lint: [false; 2],
            nmi_pending: false,
            extint_pending: false,
            outbox: VecDeque::new(),
        };
        if bsp {
            s.lvt[LVT_LINT0] = DM_EXTINT << 8;
        }
        s
    }

    /// Registers to their power-up values; base MSR, ID and pin levels kept.
    fn reset_registers(&mut self, virtual_wire: bool) {
        let fresh = LapicState::power_on(u32::from(self.xapic_id), virtual_wire);
        *self = LapicState {
            apic_base: self.apic_base,
            lint: self.lint,
            outbox: std::mem::take(&mut self.outbox),
            ..fresh
        };
    }
}

/// A local APIC. See the module documentation for the model.
pub struct Lapic {
    s: LapicState,
    initial_id: u32,
    clock: Arc<dyn Clock>,
    taint: TimeTaint,
    timer_hz: u64,
    tsc: Arc<dyn TscSource>,
    log_limit: RateLimiter,
    /// The guest's MAXPHYADDR.
    phys_addr_bits: u32,
}

fn bit_test(bits: &[u32; 8], v: u8) -> bool {
    bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bit_set(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] |= 1 << (v & 31);
}

fn bit_clear(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] &= !(1 << (v & 31));
}

/// The highest vector set in a 256-bit register.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8usize)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8)
}

impl Lapic {
    /// The LAPIC of the vCPU with initial APIC ID `apic_id` (xAPIC mode
    /// shows its low 8 bits; larger IDs need x2APIC). `timer_hz` is the
    /// timer's bus clock before the divider ([`DEFAULT_TIMER_HZ`]), `tsc_hz`
    /// the guest TSC frequency for the TSC-deadline mode. Reads of
    /// time-dependent values mark `taint`.
    pub fn new(
        apic_id: u32,
        bsp: bool,
        clock: Arc<dyn Clock>,
        taint: TimeTaint,
        timer_hz: u64,
        tsc_hz: u64,
    ) -> Self {
        Lapic {
            s: LapicState::power_on(apic_id, bsp),
            initial_id: apic_id,
            clock,
            taint,
            timer_hz: timer_hz.max(1),
            tsc: Arc::new(ClockTsc::new(tsc_hz)),
            log_limit: RateLimiter::new(10),
            phys_addr_bits: DEFAULT_PHYS_ADDR_BITS,
        }
    }

    /// The guest's MAXPHYADDR: IA32_APIC_BASE bits from here up #GP.
    pub fn set_phys_addr_bits(&mut self, bits: u32) {
        self.phys_addr_bits = bits.clamp(32, 52);
    }

    /// Power-on / machine reset: the state of [`Lapic::new`] (the BSP bit
    /// is kept). Pin levels are inputs and stay.
    pub fn reset(&mut self) {
        let bsp = self.is_bsp();
        let lint = self.s.lint;
        self.s = LapicState::power_on(self.initial_id, bsp);
        self.s.lint = lint;
    }

    /// The INIT signal: registers to their power-up values, but the APIC
    /// ID, the base MSR and the mode (xAPIC / x2APIC) are kept.
    pub fn init(&mut self) {
        self.s.reset_registers(false);
    }

    /// A copy of the state, for snapshots.
    pub fn state(&self) -> LapicState {
        self.s.clone()
    }

    /// Load a state (from [`Lapic::state`]). Reserved bits are cleared and
    /// an invalid base MSR is made valid, so any value is safe.
    pub fn restore(&mut self, s: &LapicState) {
        let mut s = s.clone();
        s.apic_base &= APIC_BASE_ADDR_MASK | APIC_BASE_ENABLE | APIC_BASE_EXTD | APIC_BASE_BSP;
        if mode_of(s.apic_base).is_none() {
            s.apic_base &= !APIC_BASE_EXTD;
        }
        s.ldr &= 0xff00_0000;
        s.dfr |= 0x0fff_ffff;
        s.svr &= SVR_WRITE_MASK;
        for (i, l) in s.lvt.iter_mut().enumerate() {
            let keep = if i == LVT_LINT0 || i == LVT_LINT1 {
                LVT_REMOTE_IRR
            } else {
                0
            };
            *l &= LVT_WRITE_MASK[i] | keep;
        }
        s.icr_low &= ICR_LOW_MASK;
        s.timer_divide &= TIMER_DIVIDE_MASK;
        s.timer_lost = s.timer_lost.min(MAX_LOST_TICKS);
        s.esr &= 0xff;
        s.esr_latch &= 0xff;
        s.outbox.truncate(OUTBOX_LIMIT);
        self.s = s;
    }

    /// The initial APIC ID (the x2APIC ID).
    pub fn initial_id(&self) -> u32 {
        self.initial_id
    }

    /// The ID this LAPIC answers to in physical destination mode: the
    /// x2APIC ID in x2APIC mode, the xAPIC ID register otherwise.
    pub fn id(&self) -> u32 {
        if self.mode() == Mode::X2Apic {
            self.initial_id
        } else {
            u32::from(self.s.xapic_id)
        }
    }

    pub fn is_bsp(&self) -> bool {
        self.s.apic_base & APIC_BASE_BSP != 0
    }

    pub fn timer_hz(&self) -> u64 {
        self.timer_hz
    }

    pub fn tsc_hz(&self) -> u64 {
        self.tsc.hz()
    }

    /// Take the guest's TSC from `tsc` (instead of the VM clock at
    /// `tsc_hz`): the KVM backend's view of the vCPU's hardware TSC.
    pub fn set_tsc_source(&mut self, tsc: Arc<dyn TscSource>) {
        self.tsc = tsc;
    }

    /// The guest TSC now, as the TSC-deadline timer sees it.
    pub fn tsc(&self) -> u64 {
        self.tsc.tsc_at(self.clock.now_ns())
    }

    // ----- IA32_APIC_BASE -----

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.s.apic_base
    }

    /// Where the xAPIC page must be mapped: `None` while the APIC is
    /// disabled or in x2APIC mode.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == Mode::XApic).then_some(self.s.apic_base & APIC_BASE_ADDR_MASK)
    }

    /// Globally enabled (IA32_APIC_BASE bit 11).
    pub fn hw_enabled(&self) -> bool {
        self.mode() != Mode::Disabled
    }

    /// Software enabled (SVR bit 8) - and globally enabled.
    pub fn sw_enabled(&self) -> bool {
        self.hw_enabled() && self.s.svr & SVR_ENABLE != 0
    }

    pub fn is_x2apic(&self) -> bool {
        self.mode() == Mode::X2Apic
    }

    /// A guest write of IA32_APIC_BASE. Returns false for #GP (reserved bits,
    /// illegal transition); nothing changes then. The caller remaps the
    /// page per [`Lapic::mmio_base`] afterwards.
    pub fn set_apic_base(&mut self, value: u64) -> bool {
        if value & !apic_base_writable(self.phys_addr_bits) != 0 {
            return false;
        }
        let Some(new) = mode_of(value) else {
            return false;
        };
        let old = self.mode();
        match (old, new) {
            (Mode::X2Apic, Mode::XApic) | (Mode::Disabled, Mode::X2Apic) => return false,
            _ => {}
        }
        let now = self.clock.now_ns();
        self.sync_timer(now);
        let bsp = self.s.apic_base & APIC_BASE_BSP;
        self.s.apic_base = (value & !APIC_BASE_BSP) | bsp;
        if new == Mode::Disabled && old != Mode::Disabled {
            self.s.reset_registers(false);
            self.s.xapic_id = self.initial_id as u8;
        }
        true
    }

    fn mode(&self) -> Mode {
        // The base is only ever set to valid values.
        mode_of(self.s.apic_base).unwrap_or(Mode::Disabled)
    }

    // ----- Registers that the VMM needs directly -----

    /// TPR (CR8 is TPR bits 7:4).
    pub fn tpr(&self) -> u8 {
        self.s.tpr
    }

    /// Set TPR (a MOV to CR8 writes `cr8 << 4`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.s.tpr = tpr;
    }

    /// Processor priority.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.s.isr).unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 {
            self.s.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Arbitration priority (for lowest-priority delivery: the VMM picks
    /// the matching LAPIC with the lowest APR).
    pub fn apr(&self) -> u8 {
        let tpr = self.s.tpr;
        let isrv = highest(&self.s.isr).unwrap_or(0);
        let irrv = highest(&self.s.irr).unwrap_or(0);
        if tpr >> 4 >= irrv >> 4 && tpr >> 4 > isrv >> 4 {
            tpr
        } else {
            (tpr & 0xf0).max(isrv & 0xf0).max(irrv & 0xf0)
        }
    }

    /// The spurious interrupt vector (SVR bits 0-7).
    pub fn spurious_vector(&self) -> u8 {
        self.s.svr as u8
    }

    /// The LDR as the current mode shows it.
    fn ldr(&self) -> u32 {
        if self.mode() == Mode::X2Apic {
            let id = self.initial_id;
            ((id >> 4) << 16) | (1 << (id & 0xf))
        } else {
            self.s.ldr
        }
    }

    /// Whether an interrupt message with this destination reaches this
    /// LAPIC (ignoring shorthands, which the router applies itself).
    /// `x2apic_format` says how the sender encoded `destination` (see
    /// [`LapicMessage::Ipi`]); the IOAPIC sends the xAPIC format.
    pub fn matches_destination(
        &self,
        destination: u32,
        dest_mode: DestMode,
        x2apic_format: bool,
    ) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        let broadcast = if x2apic_format { u32::MAX } else { 0xff };
        if destination == broadcast {
            return true;
        }
        match dest_mode {
            DestMode::Physical => destination == self.id(),
            DestMode::Logical if self.mode() == Mode::X2Apic => {
                let ldr = self.ldr();
                destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0
            }
            DestMode::Logical => {
                let dest = destination & 0xff;
                let ldr = self.s.ldr >> 24;
                if self.s.dfr >> 28 == 0xf {
                    dest & ldr != 0
                } else {
                    dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0
                }
            }
        }
    }

    // ----- Outbox -----

    /// Take the queued messages, oldest first.
    pub fn take_messages(&mut self) -> Vec<LapicMessage> {
        self.s.outbox.drain(..).collect()
    }

    fn post(&mut self, m: LapicMessage) {
        if self.s.outbox.len() < OUTBOX_LIMIT {
            self.s.outbox.push_back(m);
        } else if self.log_limit.allow() {
            log::warn!("lapic {}: outbox full, {m:?} dropped", self.initial_id);
        }
    }

    // ----- Interrupt acceptance -----

    /// A fixed (or lowest-priority) interrupt from the IOAPIC or another
    /// LAPIC: sets IRR, and TMR if `level_triggered`. Returns whether it was
    /// accepted (not while disabled; illegal vectors 0-15 are refused and
    /// flagged in ESR).
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.sw_enabled() {
            return false;
        }
        if vector < 16 {
            self.signal_error(ESR_RECV_ILLEGAL_VECTOR);
            return false;
        }
        bit_set(&mut self.s.irr, vector);
        if level_triggered {
            bit_set(&mut self.s.tmr, vector);
        } else {
            bit_clear(&mut self.s.tmr, vector);
        }
        true
    }

    /// An NMI message. Returns false (dropped) while globally disabled.
    pub fn accept_nmi(&mut self) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        self.s.nmi_pending = true;
        true
    }

    /// An ExtINT message (an IOAPIC entry in ExtINT mode): latched until
    /// acknowledged. Returns false (dropped) while globally disabled.
    pub fn accept_extint(&mut self) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        self.s.extint_pending = true;
        true
    }

    /// Drive the LINT0 pin (the 8259's INTR in virtual-wire mode).
    pub fn set_lint0(&mut self, level: bool) {
        self.set_lint(0, level);
    }

    /// Drive the LINT1 pin (usually NMI).
    pub fn set_lint1(&mut self, level: bool) {
        self.set_lint(1, level);
    }

    fn set_lint(&mut self, pin: usize, level: bool) {
        let rising = level && !self.s.lint[pin];
        self.s.lint[pin] = level;
        if !self.hw_enabled() {
            // The pins are the processor's INTR (read in
            // `pending_interrupt`) and NMI.
            if pin == 1 && rising {
                self.s.nmi_pending = true;
            }
            return;
        }
        self.lint_deliver(pin, rising);
    }

    /// Apply the LVT of a LINT pin to its level (and rising edge).
    fn lint_deliver(&mut self, pin: usize, rising: bool) {
        let idx = LVT_LINT0 + pin;
        let lvt = self.s.lvt[idx];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        let vector = lvt as u8;
        match (lvt >> 8) & 7 {
            DM_FIXED if lvt & LVT_LEVEL != 0 => {
                if self.s.lint[pin] && lvt & LVT_REMOTE_IRR == 0 && self.accept(vector, true) {
                    self.s.lvt[idx] |= LVT_REMOTE_IRR;
                }
            }
            DM_FIXED => {
                if rising {
                    self.accept(vector, false);
                }
            }
            DM_NMI => {
                if rising {
                    self.s.nmi_pending = true;
                }
            }
            // Level: seen by `pending_interrupt`.
            DM_EXTINT => {}
            mode => {
                if rising && self.log_limit.allow() {
                    log::debug!(
                        "lapic {}: LINT{pin} delivery mode {mode} not supported, ignored",
                        self.initial_id
                    );
                }
            }
        }
    }

    /// Is a LINT pin in ExtINT mode asserted (or LINT0 as INTR while the
    /// APIC is globally disabled)?
    fn lint_extint(&self) -> bool {
        if !self.hw_enabled() {
            return self.s.lint[0];
        }
        (0..2).any(|pin| {
            let lvt = self.s.lvt[LVT_LINT0 + pin];
            self.s.lint[pin] && lvt & LVT_MASKED == 0 && (lvt >> 8) & 7 == DM_EXTINT
        })
    }

    /// The highest IRR vector above the processor priority class.
    fn deliverable_fixed(&self) -> Option<u8> {
        if !self.sw_enabled() {
            return None;
        }
        let v = highest(&self.s.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// What the LAPIC would have the vCPU take now (no side effects).
    pub fn pending_interrupt(&self) -> Option<InterruptRequest> {
        if self.s.nmi_pending {
            Some(InterruptRequest::Nmi)
        } else if self.s.extint_pending || self.lint_extint() {
            Some(InterruptRequest::ExtInt)
        } else {
            self.deliverable_fixed().map(InterruptRequest::Fixed)
        }
    }

    /// The INTA cycle for `req` (what [`Lapic::pending_interrupt`]
    /// returned). For `Fixed`, returns `Fixed(v)` with the vector to deliver:
    /// the highest deliverable IRR vector, now moved to ISR, or the spurious
    /// vector (ISR untouched) if nothing is deliverable any more. `Nmi` and
    /// `ExtInt` clear their latch and come back unchanged; for `ExtInt` the
    /// caller asks the PIC for the vector.
    pub fn acknowledge(&mut self, req: InterruptRequest) -> InterruptRequest {
        match req {
            InterruptRequest::Nmi => {
                self.s.nmi_pending = false;
                InterruptRequest::Nmi
            }
            InterruptRequest::ExtInt => {
                self.s.extint_pending = false;
                InterruptRequest::ExtInt
            }
            InterruptRequest::Fixed(_) => match self.deliverable_fixed() {
                Some(v) => {
                    bit_clear(&mut self.s.irr, v);
                    bit_set(&mut self.s.isr, v);
                    self.reinject_timer_tick(v);
                    InterruptRequest::Fixed(v)
                }
                None => InterruptRequest::Fixed(self.spurious_vector()),
            },
        }
    }

    /// The guest took vector `v`: if it is the periodic timer's and ticks
    /// are owed, the next one waits in IRR (taken after the EOI).
    fn reinject_timer_tick(&mut self, v: u8) {
        let lvt = self.s.lvt[LVT_TIMER];
        if self.s.timer_lost > 0
            && lvt & LVT_MASKED == 0
            && lvt as u8 == v
            && self.timer_mode() == TimerMode::Periodic
        {
            self.s.timer_lost -= 1;
            bit_set(&mut self.s.irr, v);
            bit_clear(&mut self.s.tmr, v);
        }
    }

    fn eoi(&mut self) {
        let Some(v) = highest(&self.s.isr) else {
            return;
        };
        bit_clear(&mut self.s.isr, v);
        if !bit_test(&self.s.tmr, v) {
            return;
        }
        self.post(LapicMessage::Eoi { vector: v });
        for pin in 0..2 {
            let idx = LVT_LINT0 + pin;
            let lvt = self.s.lvt[idx];
            if lvt & LVT_REMOTE_IRR != 0 && lvt as u8 == v {
                self.s.lvt[idx] &= !LVT_REMOTE_IRR;
                self.lint_deliver(pin, false);
            }
        }
    }

    /// Log an error in the ESR latch and send the LVT error interrupt.
    fn signal_error(&mut self, bits: u32) {
        self.s.esr_latch |= bits;
        let lvt = self.s.lvt[LVT_ERROR];
        if lvt & LVT_MASKED != 0 || !self.sw_enabled() {
            return;
        }
        let vector = lvt as u8;
        if vector < 16 {
            // No second error interrupt for the error interrupt.
            self.s.esr_latch |= ESR_RECV_ILLEGAL_VECTOR;
        } else {
            bit_set(&mut self.s.irr, vector);
            bit_clear(&mut self.s.tmr, vector);
        }
    }

    // ----- IPIs -----

    fn send_ipi(&mut self) {
        let lo = self.s.icr_low;
        let vector = lo as u8;
        let Some(delivery_mode) = DeliveryMode::from_icr((lo >> 8) & 7) else {
            if self.log_limit.allow() {
                log::debug!(
                    "lapic {}: IPI with reserved delivery mode, ICR {lo:#x}, dropped",
                    self.initial_id
                );
            }
            return;
        };
        if matches!(
            delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && vector < 16
        {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        let trigger = if lo & ICR_TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        if shorthand == Shorthand::SelfOnly {
            if delivery_mode == DeliveryMode::Fixed {
                self.accept(vector, trigger == TriggerMode::Level);
            } else if self.log_limit.allow() {
                log::debug!(
                    "lapic {}: self IPI with delivery mode {delivery_mode:?} is invalid, dropped",
                    self.initial_id
                );
            }
            return;
        }
        let x2apic = self.mode() == Mode::X2Apic;
        let destination = if x2apic {
            self.s.icr_high
        } else {
            self.s.icr_high >> 24
        };
        self.post(LapicMessage::Ipi {
            vector,
            delivery_mode,
            dest_mode: if lo & ICR_DEST_LOGICAL != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            shorthand,
            destination,
            level: lo & ICR_LEVEL_ASSERT != 0,
            trigger,
            x2apic,
        });
    }

    fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
        } else {
            self.accept(vector, false);
        }
    }

    // ----- Timer -----

    fn timer_mode(&self) -> TimerMode {
        match (self.s.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// The divide value of the divide configuration register.
    pub fn timer_divisor(&self) -> u32 {
        let d = self.s.timer_divide;
        let v = ((d & 8) >> 1) | (d & 3);
        1 << ((v + 1) & 7)
    }

    /// Counter ticks since `timer_start_ns`.
    fn counter_ticks(&self, now: u64) -> u64 {
        ns_to_ticks(now.saturating_sub(self.s.timer_start_ns), self.timer_hz)
            / u64::from(self.timer_divisor())
    }

    /// The current count at `now`.
    fn current_count(&self, now: u64) -> u32 {
        let sc = u64::from(self.s.timer_start_count);
        if sc == 0 {
            return 0;
        }
        let ct = self.counter_ticks(now);
        match self.timer_mode() {
            TimerMode::TscDeadline => 0,
            TimerMode::OneShot => sc.saturating_sub(ct) as u32,
            TimerMode::Periodic => {
                let n = u64::from(self.s.timer_initial);
                if ct < sc {
                    (sc - ct) as u32
                } else if n == 0 {
                    0
                } else {
                    (n - (ct - sc) % n) as u32
                }
            }
        }
    }

    /// Is the count running (one-shot not yet expired, or periodic)?
    fn timer_counting(&self) -> bool {
        self.s.timer_start_count != 0
            && match self.timer_mode() {
                TimerMode::OneShot => self.s.timer_expiries == 0,
                TimerMode::Periodic => self.s.timer_initial != 0,
                TimerMode::TscDeadline => false,
            }
    }

    /// The VM time of the next timer expiry, whatever the mask says.
    fn timer_expiry_ns(&self) -> Option<u64> {
        if !self.hw_enabled() {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                if self.s.tsc_deadline == 0 {
                    None
                } else {
                    self.tsc.ns_when(self.s.tsc_deadline, self.clock.now_ns())
                }
            }
            _ if !self.timer_counting() => None,
            mode => {
                let mut target = u128::from(self.s.timer_start_count);
                if mode == TimerMode::Periodic {
                    target += u128::from(self.s.timer_expiries) * u128::from(self.s.timer_initial);
                }
                let ns =
                    ticks_to_ns_ceil(target * u128::from(self.timer_divisor()), self.timer_hz)?;
                self.s.timer_start_ns.checked_add(ns)
            }
        }
    }

    /// Bring the timer up to `now`: fire what fell due (one interrupt for
    /// any number of missed periodic expiries).
    fn sync_timer(&mut self, now: u64) {
        if !self.hw_enabled() {
            return;
        }
        let fired = match self.timer_mode() {
            TimerMode::TscDeadline => {
                let d = self.s.tsc_deadline;
                if d != 0 && self.tsc.tsc_at(now) >= d {
                    self.s.tsc_deadline = 0;
                    true
                } else {
                    false
                }
            }
            _ if !self.timer_counting() => false,
            TimerMode::OneShot => {
                if self.counter_ticks(now) >= u64::from(self.s.timer_start_count) {
                    self.s.timer_expiries = 1;
                    true
                } else {
                    false
                }
            }
            TimerMode::Periodic => {
                let ct = self.counter_ticks(now);
                let sc = u64::from(self.s.timer_start_count);
                let n = u64::from(self.s.timer_initial);
                let passed = if ct >= sc { (ct - sc) / n + 1 } else { 0 };
                if passed > self.s.timer_expiries {
                    let merged = passed - self.s.timer_expiries - 1;
                    self.s.timer_expiries = passed;
                    self.owe_timer_ticks(merged);
                    true
                } else {
                    false
                }
            }
        };
        let lvt = self.s.lvt[LVT_TIMER];
        if fired && lvt & LVT_MASKED == 0 {
            let vector = lvt as u8;
            if self.timer_mode() == TimerMode::Periodic && bit_test(&self.s.irr, vector) {
                // The previous expiry is still pending: this one merges.
                self.owe_timer_ticks(1);
            }
            self.accept(vector, false);
        }
    }

    /// Count `n` periodic expiries as lost (bounded).
    fn owe_timer_ticks(&mut self, n: u64) {
        let owed = u64::from(self.s.timer_lost) + n;
        self.s.timer_lost = owed.min(u64::from(MAX_LOST_TICKS)) as u32;
    }

    /// Restart the count from its current value at `now` (for a divide or
    /// one-shot/periodic change); a stopped count stays stopped.
    fn rebase_timer(&mut self, now: u64) {
        let c = if self.timer_counting() {
            self.current_count(now)
        } else {
            0
        };
        self.s.timer_start_ns = now;
        self.s.timer_start_count = c;
        self.s.timer_expiries = 0;
        self.s.timer_lost = 0;
    }

    fn write_lvt_timer(&mut self, value: u32, now: u64) {
        let old_mode = self.timer_mode();
        let new_mode = match (value >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        };
        if (old_mode == TimerMode::TscDeadline) != (new_mode == TimerMode::TscDeadline) {
            self.s.timer_initial = 0;
            self.s.timer_start_count = 0;
            self.s.timer_expiries = 0;
            self.s.timer_lost = 0;
            self.s.tsc_deadline = 0;
        } else if old_mode != new_mode {
            self.rebase_timer(now);
        }
        self.s.lvt[LVT_TIMER] = value;
    }

    fn write_timer_initial(&mut self, value: u32, now: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.s.timer_initial = value;
        self.s.timer_start_ns = now;
        self.s.timer_start_count = value;
        self.s.timer_expiries = 0;
        self.s.timer_lost = 0;
    }

    // ----- Register file -----

    /// Read the register at `off`; `None` if it does not exist (or is
    /// write-only) in the current mode.
    fn read_reg(&mut self, off: u32, now: u64) -> Option<u32> {
        let x2 = self.mode() == Mode::X2Apic;
        let v = match off {
            REG_ID if x2 => self.initial_id,
            REG_ID => u32::from(self.s.xapic_id) << 24,
            REG_VERSION => VERSION,
            REG_TPR => u32::from(self.s.tpr),
            REG_APR if !x2 => u32::from(self.apr()),
            REG_PPR => u32::from(self.ppr()),
            REG_RRD if !x2 => 0,
            REG_LDR => self.ldr(),
            REG_DFR if !x2 => self.s.dfr,
            REG_SVR => self.s.svr,
            0x100..=0x170 => self.s.isr[((off - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.s.tmr[((off - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.s.irr[((off - REG_IRR) >> 4) as usize],
            REG_ESR => self.s.esr,
            REG_LVT_CMCI => self.s.lvt[LVT_CMCI],
            REG_ICR_LOW => self.s.icr_low,
            REG_ICR_HIGH if !x2 => self.s.icr_high,
            REG_LVT_TIMER..=REG_LVT_ERROR if off & 0xf == 0 => {
                self.s.lvt[LVT_TIMER + ((off - REG_LVT_TIMER) >> 4) as usize]
            }
            REG_TIMER_INITIAL => self.s.timer_initial,
            REG_TIMER_CURRENT => {
                self.taint.mark();
                self.current_count(now)
            }
            REG_TIMER_DIVIDE => self.s.timer_divide,
            _ => return None,
        };
        Some(v)
    }

    /// Write the register at `off`; false if it is not writable in the
    /// current mode (nothing changes then).
    fn write_reg(&mut self, off: u32, value: u32, now: u64) -> bool {
        let x2 = self.mode() == Mode::X2Apic;
        match off {
            REG_ID if !x2 => self.s.xapic_id = (value >> 24) as u8,
            REG_TPR => self.s.tpr = value as u8,
            REG_EOI => self.eoi(),
            REG_LDR if !x2 => self.s.ldr = value & 0xff00_0000,
            REG_DFR if !x2 => self.s.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.s.svr = value & SVR_WRITE_MASK;
                if value & SVR_ENABLE == 0 {
                    for l in &mut self.s.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.s.esr = self.s.esr_latch;
                self.s.esr_latch = 0;
            }
            REG_ICR_LOW => {
                self.s.icr_low = value & ICR_LOW_MASK;
                self.send_ipi();
            }
            REG_ICR_HIGH if !x2 => self.s.icr_high = value & 0xff00_0000,
            REG_LVT_CMCI | REG_LVT_TIMER..=REG_LVT_ERROR if off & 0xf == 0 => {
                let idx = if off == REG_LVT_CMCI {
                    LVT_CMCI
                } else {
                    LVT_TIMER + ((off - REG_LVT_TIMER) >> 4) as usize
                };
                let mut v = value & LVT_WRITE_MASK[idx];
                if !self.sw_enabled() {
                    v |= LVT_MASKED;
                }
                match idx {
                    LVT_TIMER => self.write_lvt_timer(v, now),
                    LVT_LINT0 | LVT_LINT1 => {
                        // Remote IRR is read-only and only means something
                        // for level-triggered fixed entries.
                        if v & LVT_LEVEL != 0 && (v >> 8) & 7 == DM_FIXED {
                            v |= self.s.lvt[idx] & LVT_REMOTE_IRR;
                        }
                        self.s.lvt[idx] = v;
                        self.lint_deliver(idx - LVT_LINT0, false);
                    }
                    _ => self.s.lvt[idx] = v,
                }
            }
            REG_TIMER_INITIAL => self.write_timer_initial(value, now),
            REG_TIMER_DIVIDE => {
                self.rebase_timer(now);
                self.s.timer_divide = value & TIMER_DIVIDE_MASK;
            }
            _ => return false,
        }
        true
    }

    // ----- MSRs -----

    /// Whether `msr` is one this model serves (the VMM routes those here).
    pub fn handles_msr(msr: u32) -> bool {
        matches!(
            msr,
            MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST
        )
    }

    /// RDMSR. `None` = #GP.
    pub fn read_msr(&mut self, msr: u32) -> Option<u64> {
        match msr {
            MSR_APIC_BASE => Some(self.s.apic_base),
            MSR_TSC_DEADLINE => {
                self.sync_timer(self.clock.now_ns());
                self.taint.mark();
                Some(if self.timer_mode() == TimerMode::TscDeadline {
                    self.s.tsc_deadline
                } else {
                    0
                })
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                if self.mode() != Mode::X2Apic {
                    return None;
                }
                let now = self.clock.now_ns();
                self.sync_timer(now);
                let off = (msr - MSR_X2APIC_FIRST) << 4;
                if off == REG_ICR_LOW {
                    return Some(u64::from(self.s.icr_high) << 32 | u64::from(self.s.icr_low));
                }
                self.read_reg(off, now).map(u64::from)
            }
            _ => None,
        }
    }

    /// WRMSR. `false` = #GP (nothing changed).
    pub fn write_msr(&mut self, msr: u32, value: u64) -> bool {
        match msr {
            MSR_APIC_BASE => self.set_apic_base(value),
            MSR_TSC_DEADLINE => {
                let now = self.clock.now_ns();
                self.sync_timer(now);
                if self.hw_enabled() && self.timer_mode() == TimerMode::TscDeadline {
                    self.s.tsc_deadline = value;
                    // A deadline in the past fires at once.
                    self.sync_timer(now);
                }
                true
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                if self.mode() != Mode::X2Apic {
                    return false;
                }
                let now = self.clock.now_ns();
                self.sync_timer(now);
                let off = (msr - MSR_X2APIC_FIRST) << 4;
                if off == REG_ICR_LOW {
                    self.s.icr_low = value as u32 & ICR_LOW_MASK;
                    self.s.icr_high = (value >> 32) as u32;
                    self.send_ipi();
                    return true;
                }
                if value >> 32 != 0 {
                    return false;
                }
                let v = value as u32;
                match off {
                    REG_EOI | REG_ESR if v != 0 => false,
                    REG_SELF_IPI => {
                        self.self_ipi(v as u8);
                        true
                    }
                    _ => self.write_reg(off, v, now),
                }
            }
            _ => false,
        }
    }

    fn log_ignored(&self, what: &str, offset: u64, len: usize) {
        if self.log_limit.allow() {
            log::debug!(
                "lapic {}: {what} of {len} byte(s) at offset {offset:#x} ignored",
                self.initial_id
            );
        }
    }
}

impl Timed for Lapic {
    fn next_deadline(&self) -> Option<u64> {
        if self.s.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        self.timer_expiry_ns()
    }

    fn advance(&mut self, now: u64) {
        self.sync_timer(now);
    }
}

impl BusDevice for Lapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.mode() != Mode::XApic {
            data.fill(0xff);
            return;
        }
        let now = self.clock.now_ns();
        self.sync_timer(now);
        let mut cached: Option<(u64, u32)> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let Some(addr) = offset.checked_add(i as u64).filter(|&a| a < MMIO_SIZE) else {
                *b = 0;
                continue;
            };
            let within = addr & 0xf;
            if within >= 4 {
                *b = 0;
                continue;
            }
            let reg = addr & !0xf;
            let value = match cached {
                Some((r, v)) if r == reg => v,
                _ => {
                    let v = self.read_reg(reg as u32, now).unwrap_or(0);
                    cached = Some((reg, v));
                    v
                }
            };
            *b = value.to_le_bytes()[within as usize];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.mode() != Mode::XApic {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log_ignored("write", offset, data.len());
            return;
        };
        if offset & 0xf != 0 || offset >= MMIO_SIZE {
            self.log_ignored("misaligned write", offset, data.len());
            return;
        }
        let now = self.clock.now_ns();
        self.sync_timer(now);
        if !self.write_reg(offset as u32, u32::from_le_bytes(bytes), now) {
            self.log_ignored("write to read-only or undefined register", offset, 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use proptest::prelude::*;

    const TSC_HZ: u64 = 2_000_000_000;

    struct Rig {
        apic: Lapic,
        clock: ManualClock,
        taint: TimeTaint,
    }

    fn rig_with(id: u32, bsp: bool, timer_hz: u64) -> Rig {
        let clock = ManualClock::new();
        let taint = TimeTaint::new();
        let apic = Lapic::new(
            id,
            bsp,
            Arc::new(clock.clone()),
            taint.clone(),
            timer_hz,
            TSC_HZ,
        );
        Rig { apic, clock, taint }
    }

    /// The BSP, software-enabled with spurious vector 0xff.
    fn rig() -> Rig {
        let mut r = rig_with(0, true, DEFAULT_TIMER_HZ);
        r.wr(REG_SVR, 0x1ff);
        r
    }

    impl Rig {
        fn rd(&mut self, reg: u32) -> u32 {
            let mut b = [0u8; 4];
            self.apic.read(u64::from(reg), &mut b);
            u32::from_le_bytes(b)
        }
        fn wr(&mut self, reg: u32, v: u32) {
            self.apic.write(u64::from(reg), &v.to_le_bytes());
        }
        /// pending + acknowledge, as the vCPU loop does.
        fn take(&mut self) -> Option<InterruptRequest> {
            let p = self.apic.pending_interrupt()?;
            Some(self.apic.acknowledge(p))
        }
        fn at(&mut self, ns: u64) {
            self.clock.set(ns);
            self.apic.advance(ns);
        }
        fn x2apic(&mut self) {
            let base = self.apic.apic_base();
            assert!(self.apic.write_msr(MSR_APIC_BASE, base | APIC_BASE_EXTD));
        }
    }

    #[test]
    fn register_reset_values() {
        let mut r = rig_with(3, false, DEFAULT_TIMER_HZ);
        assert_eq!(r.apic.apic_base(), 0xfee0_0800);
        assert_eq!(r.apic.mmio_base(), Some(DEFAULT_BASE));
        assert_eq!(r.rd(REG_ID), 3 << 24);
        assert_eq!(r.rd(REG_VERSION), 0x0005_0014);
        for reg in [REG_TPR, REG_APR, REG_PPR, REG_RRD, REG_LDR, REG_ESR] {
            assert_eq!(r.rd(reg), 0, "reg {reg:#x}");
        }
        assert_eq!(r.rd(REG_DFR), 0xffff_ffff);
        assert_eq!(r.rd(REG_SVR), 0xff);
        for i in 0..8 {
            assert_eq!(r.rd(REG_ISR + i * 16), 0);
            assert_eq!(r.rd(REG_TMR + i * 16), 0);
            assert_eq!(r.rd(REG_IRR + i * 16), 0);
        }
        for reg in [
            REG_LVT_CMCI,
            REG_LVT_TIMER,
            REG_LVT_THERMAL,
            REG_LVT_PERF,
            REG_LVT_LINT0,
            REG_LVT_LINT1,
            REG_LVT_ERROR,
        ] {
            assert_eq!(r.rd(reg), LVT_MASKED, "reg {reg:#x}");
        }
        for reg in [
            REG_ICR_LOW,
            REG_ICR_HIGH,
            REG_TIMER_INITIAL,
            REG_TIMER_CURRENT,
            REG_TIMER_DIVIDE,
        ] {
            assert_eq!(r.rd(reg), 0, "reg {reg:#x}");
        }
        assert_eq!(r.apic.timer_divisor(), 2);
        // Undefined registers and the other bytes of a slot read 0.
        assert_eq!(r.rd(0x040), 0);
        assert_eq!(r.rd(REG_SELF_IPI), 0);
        assert_eq!(r.rd(0xff0), 0);
        let mut b = [0xaau8; 8];
        r.apic.read(u64::from(REG_VERSION), &mut b);
        assert_eq!(b, [0x14, 0, 5, 0, 0, 0, 0, 0]);
        // A byte read inside a register.
        let mut b = [0u8; 1];
        r.apic.read(u64::from(REG_VERSION) + 2, &mut b);
        assert_eq!(b, [5]);
        // The BSP: BSP flag and virtual wire on LINT0.
        let mut b = rig_with(0, true, DEFAULT_TIMER_HZ);
        assert_eq!(b.apic.apic_base(), 0xfee0_0900);
        assert_eq!(b.rd(REG_LVT_LINT0), 0x700);
        assert_eq!(b.rd(REG_LVT_LINT1), LVT_MASKED);
        assert!(!b.apic.sw_enabled());
        assert_eq!(b.apic.pending_interrupt(), None);
    }

    #[test]
    fn writable_bits_and_read_only_registers() {
        let mut r = rig_with(1, false, DEFAULT_TIMER_HZ);
        r.wr(REG_ID, 0xffff_ffff);
        assert_eq!(r.rd(REG_ID), 0xff00_0000);
        assert_eq!(r.apic.id(), 0xff);
        r.wr(REG_VERSION, 0);
        assert_eq!(r.rd(REG_VERSION), VERSION);
        r.wr(REG_TPR, 0xffff_ff35);
        assert_eq!(r.rd(REG_TPR), 0x35);
        r.wr(REG_LDR, 0x1234_5678);
        assert_eq!(r.rd(REG_LDR), 0x1200_0000);
        r.wr(REG_DFR, 0x0000_0000);
        assert_eq!(r.rd(REG_DFR), 0x0fff_ffff);
        r.wr(REG_SVR, 0xffff_ffff);
        assert_eq!(r.rd(REG_SVR), 0x3ff, "no EOI-broadcast suppression bit");
        r.wr(REG_ICR_HIGH, 0xffff_ffff);
        assert_eq!(r.rd(REG_ICR_HIGH), 0xff00_0000);
        r.wr(REG_TIMER_DIVIDE, 0xffff_ffff);
        assert_eq!(r.rd(REG_TIMER_DIVIDE), 0xb);
        assert_eq!(r.apic.timer_divisor(), 1);
        for lvt in [REG_LVT_TIMER, REG_LVT_LINT0, REG_LVT_ERROR, REG_LVT_PERF] {
            r.wr(lvt, 0xffff_ffff);
        }
        assert_eq!(r.rd(REG_LVT_TIMER), 0x0007_00ff);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x0001_a7ff);
        assert_eq!(r.rd(REG_LVT_ERROR), 0x0001_00ff);
        assert_eq!(r.rd(REG_LVT_PERF), 0x0001_07ff);
        // Read-only ones ignore writes.
        r.wr(REG_PPR, 0xff);
        r.wr(REG_IRR, 0xffff_ffff);
        r.wr(REG_TIMER_CURRENT, 5);
        assert_eq!(r.rd(REG_IRR), 0);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 0);
        // Misaligned and non-32-bit writes are ignored.
        r.apic.write(u64::from(REG_TPR) + 4, &[0x77, 0, 0, 0]);
        r.apic.write(u64::from(REG_TPR), &[0x77]);
        r.apic
            .write(u64::from(REG_TPR), &[0x77, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.rd(REG_TPR), 0x35);
    }

    #[test]
    fn tpr_ppr_with_isr() {
        let mut r = rig();
        r.wr(REG_TPR, 0x45);
        assert_eq!(r.rd(REG_PPR), 0x45);
        r.apic.accept(0x61, false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x61)));
        assert_eq!(r.rd(REG_ISR + 3 * 16), 1 << 1);
        // ISR class 6 > TPR class 4: PPR = ISRV & 0xf0.
        assert_eq!(r.rd(REG_PPR), 0x60);
        // TPR class equal to the ISR class: TPR wins (with its low bits).
        r.wr(REG_TPR, 0x6a);
        assert_eq!(r.rd(REG_PPR), 0x6a);
        r.wr(REG_TPR, 0x10);
        r.wr(REG_EOI, 0);
        assert_eq!(r.rd(REG_PPR), 0x10);
        assert_eq!(r.rd(REG_ISR + 3 * 16), 0);
        // CR8 view.
        r.apic.set_tpr(0x20);
        assert_eq!(r.apic.tpr(), 0x20);
        assert_eq!(r.rd(REG_TPR), 0x20);
    }

    #[test]
    fn apr_follows_the_sdm_formula() {
        let mut r = rig();
        r.wr(REG_TPR, 0x35);
        assert_eq!(r.rd(REG_APR), 0x35);
        r.apic.accept(0x50, false);
        assert_eq!(r.rd(REG_APR), 0x50);
        assert_eq!(r.apic.apr(), 0x50);
    }

    #[test]
    fn irr_priority_classes() {
        let mut r = rig();
        // Two vectors of one class and one of a higher one.
        r.apic.accept(0x41, false);
        r.apic.accept(0x4f, false);
        r.apic.accept(0x52, false);
        assert_eq!(
            r.apic.pending_interrupt(),
            Some(InterruptRequest::Fixed(0x52))
        );
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x52)));
        // 0x4f is a lower class than the in-service 0x52: blocked.
        assert_eq!(r.apic.pending_interrupt(), None);
        r.wr(REG_EOI, 0);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x4f)));
        // Same class as the in-service 0x4f: blocked too.
        assert_eq!(r.apic.pending_interrupt(), None);
        r.wr(REG_EOI, 0);
        // TPR class 4 blocks class 4 but not class 5.
        r.wr(REG_TPR, 0x40);
        assert_eq!(r.apic.pending_interrupt(), None);
        r.apic.accept(0x50, false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
        r.wr(REG_EOI, 0);
        r.wr(REG_TPR, 0x3f);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)));
        r.wr(REG_EOI, 0);
        assert_eq!(r.take(), None);
    }

    #[test]
    fn accept_pending_acknowledge_eoi_sequence_and_nesting() {
        let mut r = rig();
        assert!(r.apic.accept(0x30, false));
        assert_eq!(r.rd(REG_IRR + 16), 1 << 16);
        assert_eq!(
            r.apic.pending_interrupt(),
            Some(InterruptRequest::Fixed(0x30))
        );
        // pending has no side effects.
        assert_eq!(r.rd(REG_IRR + 16), 1 << 16);
        assert_eq!(
            r.apic.acknowledge(InterruptRequest::Fixed(0x30)),
            InterruptRequest::Fixed(0x30)
        );
        assert_eq!(r.rd(REG_IRR + 16), 0);
        assert_eq!(r.rd(REG_ISR + 16), 1 << 16);
        // A higher one nests.
        r.apic.accept(0xe0, false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0xe0)));
        assert_eq!(r.rd(REG_PPR), 0xe0);
        // EOI clears the highest ISR bit first.
        r.wr(REG_EOI, 0);
        assert_eq!(r.rd(REG_ISR + 7 * 16), 0);
        assert_eq!(r.rd(REG_ISR + 16), 1 << 16);
        assert_eq!(r.rd(REG_PPR), 0x30);
        r.wr(REG_EOI, 0);
        assert_eq!(r.rd(REG_PPR), 0);
        // An EOI with nothing in service is harmless.
        r.wr(REG_EOI, 0);
        // Accepting an already pending vector collapses.
        r.apic.accept(0x80, false);
        r.apic.accept(0x80, false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x80)));
        assert_eq!(r.take(), None);
        assert!(r.apic.take_messages().is_empty());
    }

    #[test]
    fn eoi_broadcast_only_for_level_triggered_vectors() {
        let mut r = rig();
        r.apic.accept(0x40, true);
        assert_eq!(r.rd(REG_TMR + 2 * 16), 1);
        r.apic.accept(0x41, false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)));
        r.wr(REG_EOI, 0);
        assert!(r.apic.take_messages().is_empty());
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x40)));
        r.wr(REG_EOI, 0);
        assert_eq!(
            r.apic.take_messages(),
            vec![LapicMessage::Eoi { vector: 0x40 }]
        );
        // An edge acceptance of the vector clears its TMR bit.
        r.apic.accept(0x40, false);
        assert_eq!(r.rd(REG_TMR + 2 * 16), 0);
        r.take();
        r.wr(REG_EOI, 0);
        assert!(r.apic.take_messages().is_empty());
    }

    #[test]
    fn spurious_vector_when_tpr_rises_before_inta() {
        let mut r = rig();
        r.wr(REG_SVR, 0x1e7);
        r.apic.accept(0x55, false);
        let p = r.apic.pending_interrupt().unwrap();
        assert_eq!(p, InterruptRequest::Fixed(0x55));
        r.wr(REG_TPR, 0x60);
        assert_eq!(r.apic.acknowledge(p), InterruptRequest::Fixed(0xe7));
        // Not put in service; still pending in IRR.
        assert_eq!(r.rd(REG_ISR + 2 * 16), 0);
        assert_eq!(r.rd(REG_IRR + 2 * 16), 1 << 21);
        r.wr(REG_TPR, 0);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x55)));
    }

    #[test]
    fn illegal_vectors_set_esr_and_send_the_error_interrupt() {
        let mut r = rig();
        r.wr(REG_LVT_ERROR, 0xfe);
        // A fixed IPI with vector 5.
        r.wr(REG_ICR_LOW, 0x0000_4005);
        assert!(r.apic.take_messages().is_empty());
        // ESR reads the old value until written.
        assert_eq!(r.rd(REG_ESR), 0);
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), ESR_SEND_ILLEGAL_VECTOR);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0xfe)));
        r.wr(REG_EOI, 0);
        // Receiving vector 3.
        assert!(!r.apic.accept(3, false));
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), ESR_RECV_ILLEGAL_VECTOR);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0xfe)));
        r.wr(REG_EOI, 0);
        // A timer LVT with an illegal vector.
        r.wr(REG_LVT_TIMER, 0x0f);
        r.wr(REG_TIMER_INITIAL, 10);
        r.at(20);
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), ESR_RECV_ILLEGAL_VECTOR);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0xfe)));
        // A second ESR write clears it.
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), 0);
        // An illegal error vector flags itself, no interrupt, no loop.
        r.wr(REG_EOI, 0);
        r.wr(REG_LVT_ERROR, 0x02);
        r.wr(REG_ICR_LOW, 0x0000_4001);
        assert_eq!(r.take(), None);
        r.wr(REG_ESR, 0);
        assert_eq!(
            r.rd(REG_ESR),
            ESR_SEND_ILLEGAL_VECTOR | ESR_RECV_ILLEGAL_VECTOR
        );
        // Masked error LVT: only the ESR.
        r.wr(REG_LVT_ERROR, LVT_MASKED | 0xfe);
        r.wr(REG_ICR_LOW, 0x0004_4001);
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), ESR_SEND_ILLEGAL_VECTOR);
        assert_eq!(r.take(), None);
    }

    #[test]
    fn self_ipi_by_shorthand_is_delivered_directly() {
        let mut r = rig();
        r.wr(REG_ICR_HIGH, 0x0500_0000);
        r.wr(REG_ICR_LOW, 0x0004_4042);
        assert!(r.apic.take_messages().is_empty());
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x42)));
        // Self with NMI is invalid: dropped.
        r.wr(REG_ICR_LOW, 0x0004_4400);
        assert_eq!(r.take(), None);
        assert!(r.apic.take_messages().is_empty());
        // Delivery status reads idle.
        assert_eq!(r.rd(REG_ICR_LOW) & (1 << 12), 0);
        assert_eq!(r.rd(REG_ICR_LOW), 0x0004_4400);
    }

    #[test]
    fn ipis_go_to_the_outbox() {
        let mut r = rig();
        r.wr(REG_ICR_HIGH, 0x0300_0000);
        r.wr(REG_ICR_LOW, 0x0000_4031);
        // INIT assert (level), logical, then SIPI to all but self.
        r.wr(REG_ICR_LOW, 0x0000_cd00);
        r.wr(REG_ICR_LOW, 0x000c_4698);
        // All including self: routed by the VMM too.
        r.wr(REG_ICR_LOW, 0x0008_4131);
        // Reserved delivery modes are dropped.
        r.wr(REG_ICR_LOW, 0x0000_4331);
        r.wr(REG_ICR_LOW, 0x0000_4731);
        let msgs = r.apic.take_messages();
        assert_eq!(
            msgs,
            vec![
                LapicMessage::Ipi {
                    vector: 0x31,
                    delivery_mode: DeliveryMode::Fixed,
                    dest_mode: DestMode::Physical,
                    shorthand: Shorthand::None,
                    destination: 3,
                    level: true,
                    trigger: TriggerMode::Edge,
                    x2apic: false,
                },
                LapicMessage::Ipi {
                    vector: 0,
                    delivery_mode: DeliveryMode::Init,
                    dest_mode: DestMode::Logical,
                    shorthand: Shorthand::None,
                    destination: 3,
                    level: true,
                    trigger: TriggerMode::Level,
                    x2apic: false,
                },
                LapicMessage::Ipi {
                    vector: 0x98,
                    delivery_mode: DeliveryMode::StartUp,
                    dest_mode: DestMode::Physical,
                    shorthand: Shorthand::AllExcludingSelf,
                    destination: 3,
                    level: true,
                    trigger: TriggerMode::Edge,
                    x2apic: false,
                },
                LapicMessage::Ipi {
                    vector: 0x31,
                    delivery_mode: DeliveryMode::LowestPriority,
                    dest_mode: DestMode::Physical,
                    shorthand: Shorthand::AllIncludingSelf,
                    destination: 3,
                    level: true,
                    trigger: TriggerMode::Edge,
                    x2apic: false,
                },
            ]
        );
        // Not delivered locally.
        assert_eq!(r.take(), None);
        assert!(r.apic.take_messages().is_empty());
        // INIT and SIPI carry vector < 16 legally: no ESR.
        r.wr(REG_ESR, 0);
        assert_eq!(r.rd(REG_ESR), 0);
    }

    #[test]
    fn destination_matching() {
        let mut r = rig_with(2, false, DEFAULT_TIMER_HZ);
        let a = &mut r.apic;
        assert!(a.matches_destination(2, DestMode::Physical, false));
        assert!(!a.matches_destination(3, DestMode::Physical, false));
        assert!(a.matches_destination(0xff, DestMode::Physical, false));
        // Flat logical.
        a.write(u64::from(REG_LDR), &0x0400_0000u32.to_le_bytes());
        assert!(a.matches_destination(0x06, DestMode::Logical, false));
        assert!(!a.matches_destination(0x09, DestMode::Logical, false));
        // Cluster logical: cluster 1, member bit 2.
        a.write(u64::from(REG_DFR), &0x0fff_ffffu32.to_le_bytes());
        a.write(u64::from(REG_LDR), &0x1400_0000u32.to_le_bytes());
        assert!(a.matches_destination(0x14, DestMode::Logical, false));
        assert!(!a.matches_destination(0x24, DestMode::Logical, false));
        // x2APIC: ID 2 -> cluster 0, bit 2.
        let base = a.apic_base();
        assert!(a.write_msr(MSR_APIC_BASE, base | APIC_BASE_EXTD));
        assert_eq!(a.read_msr(0x80d), Some(0x4));
        assert!(a.matches_destination(0x4, DestMode::Logical, true));
        assert!(!a.matches_destination(0x1_0004, DestMode::Logical, true));
        assert!(a.matches_destination(2, DestMode::Physical, true));
        assert!(a.matches_destination(u32::MAX, DestMode::Physical, true));
        // Disabled: nothing matches.
        assert!(a.write_msr(MSR_APIC_BASE, DEFAULT_BASE));
        assert!(!a.matches_destination(0xff, DestMode::Physical, false));
    }

    #[test]
    fn lint0_extint_virtual_wire() {
        let mut r = rig_with(0, true, DEFAULT_TIMER_HZ);
        // Reset state: virtual wire, even while software-disabled.
        r.apic.set_lint0(true);
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::ExtInt));
        assert_eq!(r.take(), Some(InterruptRequest::ExtInt));
        // Level semantics: still there while the PIC holds INTR.
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::ExtInt));
        // Fixed interrupts come after ExtINT.
        r.wr(REG_SVR, 0x1ff);
        r.wr(REG_LVT_LINT0, 0x700);
        r.apic.accept(0x90, false);
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::ExtInt));
        r.apic.set_lint0(false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x90)));
        // Masked: nothing.
        r.wr(REG_LVT_LINT0, 0x10700);
        r.apic.set_lint0(true);
        assert_eq!(r.apic.pending_interrupt(), None);
        // Software disable masks the LVT (and it stays masked).
        r.wr(REG_LVT_LINT0, 0x700);
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::ExtInt));
        r.wr(REG_SVR, 0xff);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x10700);
        r.wr(REG_LVT_LINT0, 0x700);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x10700);
        assert_eq!(r.apic.pending_interrupt(), None);
        // An ExtINT message is latched until acknowledged.
        r.apic.set_lint0(false);
        assert!(r.apic.accept_extint());
        assert_eq!(r.take(), Some(InterruptRequest::ExtInt));
        assert_eq!(r.take(), None);
    }

    #[test]
    fn lint1_nmi_and_fixed_lint_modes() {
        let mut r = rig();
        r.wr(REG_LVT_LINT1, 0x400);
        r.apic.set_lint1(true);
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::Nmi));
        // NMI outranks everything and does not touch ISR.
        r.apic.accept(0xf0, false);
        assert_eq!(r.take(), Some(InterruptRequest::Nmi));
        assert_eq!(r.rd(REG_ISR + 7 * 16), 0);
        // Edge: holding the line high gives one NMI only.
        r.apic.set_lint1(true);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0xf0)));
        r.wr(REG_EOI, 0);
        r.apic.set_lint1(false);
        r.apic.set_lint1(true);
        assert_eq!(r.take(), Some(InterruptRequest::Nmi));
        assert!(r.apic.accept_nmi());
        assert_eq!(r.take(), Some(InterruptRequest::Nmi));
        assert_eq!(r.take(), None);
        // Fixed, edge-triggered on LINT1.
        r.apic.set_lint1(false);
        r.wr(REG_LVT_LINT1, 0x0000_0061);
        r.apic.set_lint1(true);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x61)));
        r.wr(REG_EOI, 0);
        r.apic.set_lint1(true);
        assert_eq!(r.take(), None);
        // Fixed, level-triggered on LINT0: remote IRR until EOI, and again
        // after EOI while the line stays high.
        r.wr(REG_LVT_LINT0, 0x0000_8062);
        r.apic.set_lint0(true);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x0000_c062);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x62)));
        r.wr(REG_EOI, 0);
        assert_eq!(
            r.apic.take_messages(),
            vec![LapicMessage::Eoi { vector: 0x62 }]
        );
        assert_eq!(r.rd(REG_LVT_LINT0), 0x0000_c062);
        r.apic.set_lint0(false);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x62)));
        r.wr(REG_EOI, 0);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x0000_8062);
        assert_eq!(r.take(), None);
    }

    #[test]
    fn lvt_masking() {
        let mut r = rig();
        r.wr(REG_LVT_LINT1, LVT_MASKED | 0x400);
        r.apic.set_lint1(true);
        assert_eq!(r.take(), None);
        r.wr(REG_LVT_TIMER, LVT_MASKED | 0x40);
        r.wr(REG_TIMER_DIVIDE, 0xb);
        r.wr(REG_TIMER_INITIAL, 100);
        assert_eq!(r.apic.next_deadline(), None);
        r.at(150);
        assert_eq!(r.take(), None);
        // Unmasking later does not resurrect the expiry that was masked.
        r.wr(REG_LVT_TIMER, 0x40);
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.next_deadline(), None);
    }

    #[test]
    fn software_disable_via_svr() {
        let mut r = rig();
        r.wr(REG_LVT_TIMER, 0x40);
        r.wr(REG_LVT_ERROR, 0x41);
        r.apic.accept(0x50, false);
        r.wr(REG_SVR, 0x0ff);
        assert!(!r.apic.sw_enabled());
        for reg in [REG_LVT_TIMER, REG_LVT_ERROR, REG_LVT_LINT0] {
            assert_ne!(r.rd(reg) & LVT_MASKED, 0);
        }
        // Held, not delivered; new fixed interrupts are refused.
        assert_eq!(r.apic.pending_interrupt(), None);
        assert!(!r.apic.accept(0x60, false));
        // NMIs still come in.
        assert!(r.apic.accept_nmi());
        assert_eq!(r.take(), Some(InterruptRequest::Nmi));
        r.wr(REG_SVR, 0x1ff);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
        assert_eq!(r.take(), None);
        // The LVTs stay masked until rewritten.
        assert_ne!(r.rd(REG_LVT_TIMER) & LVT_MASKED, 0);
    }

    #[test]
    fn apic_base_disable_relocate_and_reset() {
        let mut r = rig();
        r.wr(REG_TPR, 0x20);
        r.wr(REG_LVT_TIMER, 0x40);
        r.wr(REG_TIMER_INITIAL, 1000);
        r.apic.accept(0x50, false);
        // Relocate.
        assert!(r.apic.set_apic_base(0xfed0_0000 | APIC_BASE_ENABLE));
        assert_eq!(r.apic.mmio_base(), Some(0xfed0_0000));
        // BSP bit is read-only.
        assert_eq!(r.apic.apic_base(), 0xfed0_0900);
        assert_eq!(r.rd(REG_TPR), 0x20);
        // Reserved bits: #GP, nothing changes.
        assert!(!r.apic.set_apic_base(0xfee0_0000 | APIC_BASE_ENABLE | 1));
        assert!(!r
            .apic
            .set_apic_base(0xfee0_0000 | APIC_BASE_ENABLE | (1 << 9)));
        assert!(!r.apic.set_apic_base(1 << 52 | APIC_BASE_ENABLE));
        // Base bits beyond the guest's physical-address width are reserved
        // too, whatever width the machine sets.
        for bits in [36, 40, 46, 52] {
            r.apic.set_phys_addr_bits(bits);
            assert!(
                !r.apic
                    .set_apic_base(1 << bits | 0xfee0_0000 | APIC_BASE_ENABLE),
                "MAXPHYADDR {bits}"
            );
            assert!(r
                .apic
                .set_apic_base(1 << (bits - 1) | 0xfed0_0000 | APIC_BASE_ENABLE));
        }
        assert_eq!(apic_base_writable(36), 0xf_ffff_fd00);
        assert!(r.apic.set_apic_base(0xfed0_0000 | APIC_BASE_ENABLE));
        assert_eq!(r.apic.apic_base(), 0xfed0_0900);
        // Disable: everything resets, the page goes away, accesses fall
        // through.
        assert!(r.apic.write_msr(MSR_APIC_BASE, 0xfee0_0000));
        assert_eq!(r.apic.mmio_base(), None);
        assert_eq!(r.apic.read_msr(MSR_APIC_BASE), Some(0xfee0_0100));
        assert_eq!(r.rd(REG_VERSION), 0xffff_ffff);
        assert!(!r.apic.accept(0x60, false));
        assert_eq!(r.apic.pending_interrupt(), None);
        assert_eq!(r.apic.next_deadline(), None);
        // LINT pins are INTR / NMI directly.
        r.apic.set_lint0(true);
        assert_eq!(r.apic.pending_interrupt(), Some(InterruptRequest::ExtInt));
        r.apic.set_lint0(false);
        r.apic.set_lint1(true);
        assert_eq!(r.take(), Some(InterruptRequest::Nmi));
        // Re-enable: power-up register values.
        assert!(r.apic.set_apic_base(0xfee0_0000 | APIC_BASE_ENABLE));
        assert_eq!(r.rd(REG_TPR), 0);
        assert_eq!(r.rd(REG_SVR), 0xff);
        assert_eq!(r.rd(REG_IRR + 2 * 16), 0);
        assert_eq!(r.rd(REG_LVT_TIMER), LVT_MASKED);
        assert_eq!(r.rd(REG_LVT_LINT0), LVT_MASKED);
        assert_eq!(r.rd(REG_TIMER_INITIAL), 0);
        assert_eq!(r.rd(REG_DFR), 0xffff_ffff);
    }

    #[test]
    fn x2apic_transitions_and_msr_interface() {
        let mut r = rig_with(0x123, false, DEFAULT_TIMER_HZ);
        r.wr(REG_SVR, 0x1ff);
        // Not in x2APIC mode yet: #GP.
        assert_eq!(r.apic.read_msr(0x802), None);
        assert!(!r.apic.write_msr(0x808, 0));
        // Disabled -> x2APIC directly is illegal; EN=0 EXTD=1 always is.
        assert!(r.apic.set_apic_base(DEFAULT_BASE));
        assert!(!r
            .apic
            .set_apic_base(DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD));
        assert!(!r.apic.set_apic_base(DEFAULT_BASE | APIC_BASE_EXTD));
        assert!(r.apic.set_apic_base(DEFAULT_BASE | APIC_BASE_ENABLE));
        r.wr(REG_SVR, 0x1ff);
        r.wr(REG_TPR, 0x30);
        r.x2apic();
        assert!(r.apic.is_x2apic());
        assert_eq!(r.apic.mmio_base(), None);
        // x2APIC -> xAPIC is illegal.
        assert!(!r.apic.set_apic_base(DEFAULT_BASE | APIC_BASE_ENABLE));
        // State survived the switch.
        assert_eq!(r.apic.read_msr(0x808), Some(0x30));
        assert_eq!(r.apic.read_msr(0x80f), Some(0x1ff));
        // ID and LDR: full 32-bit ID, derived LDR, both read-only.
        assert_eq!(r.apic.read_msr(0x802), Some(0x123));
        assert_eq!(r.apic.read_msr(0x80d), Some((0x12 << 16) | (1 << 3)));
        assert!(!r.apic.write_msr(0x802, 0));
        assert!(!r.apic.write_msr(0x80d, 0));
        assert_eq!(r.apic.read_msr(0x803), Some(u64::from(VERSION)));
        // xAPIC-only registers: DFR, APR, RRD, ICR high.
        for msr in [0x80e, 0x809, 0x80c, 0x831] {
            assert_eq!(r.apic.read_msr(msr), None, "{msr:#x}");
            assert!(!r.apic.write_msr(msr, 0), "{msr:#x}");
        }
        // Undefined ones too.
        assert_eq!(r.apic.read_msr(0x801), None);
        assert_eq!(r.apic.read_msr(0x8ff), None);
        // Write-only and read-only registers.
        assert_eq!(r.apic.read_msr(0x80b), None);
        assert_eq!(r.apic.read_msr(0x83f), None);
        assert!(!r.apic.write_msr(0x80a, 0));
        assert!(!r.apic.write_msr(0x839, 0));
        // Reserved upper bits, non-zero EOI / ESR writes.
        assert!(!r.apic.write_msr(0x808, 1 << 32));
        assert!(!r.apic.write_msr(0x80b, 1));
        assert!(!r.apic.write_msr(0x828, 1));
        assert!(r.apic.write_msr(0x828, 0));
        // Self IPI register.
        r.apic.write_msr(0x808, 0);
        assert!(r.apic.write_msr(0x83f, 0x45));
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x45)));
        assert!(r.apic.write_msr(0x80b, 0));
        assert_eq!(r.apic.read_msr(0x80a), Some(0));
        // A self IPI with an illegal vector.
        assert!(r.apic.write_msr(0x83f, 0x05));
        assert!(r.apic.write_msr(0x828, 0));
        assert_eq!(
            r.apic.read_msr(0x828),
            Some(u64::from(ESR_SEND_ILLEGAL_VECTOR))
        );
        // ICR is one 64-bit register with a 32-bit destination.
        assert!(r.apic.write_msr(0x830, 0x0000_1234_0000_4050));
        assert_eq!(r.apic.read_msr(0x830), Some(0x0000_1234_0000_4050));
        assert_eq!(
            r.apic.take_messages(),
            vec![LapicMessage::Ipi {
                vector: 0x50,
                delivery_mode: DeliveryMode::Fixed,
                dest_mode: DestMode::Physical,
                shorthand: Shorthand::None,
                destination: 0x1234,
                level: true,
                trigger: TriggerMode::Edge,
                x2apic: true,
            }]
        );
        // The MMIO page is gone.
        let mut b = [0u8; 4];
        r.apic.read(u64::from(REG_VERSION), &mut b);
        assert_eq!(b, [0xff; 4]);
        // Timer registers through MSRs.
        assert!(r.apic.write_msr(0x83e, 0xb));
        assert!(r.apic.write_msr(0x832, 0x40));
        assert!(r.apic.write_msr(0x838, 1000));
        r.clock.set(400);
        assert_eq!(r.apic.read_msr(0x839), Some(600));
        assert!(r.taint.take());
        // x2APIC -> disabled is legal and resets; back to xAPIC.
        assert!(r.apic.set_apic_base(DEFAULT_BASE));
        assert!(r.apic.set_apic_base(DEFAULT_BASE | APIC_BASE_ENABLE));
        assert_eq!(r.rd(REG_ID), 0x23 << 24);
        assert_eq!(r.rd(REG_LVT_TIMER), LVT_MASKED);
        // Not ours.
        assert!(!Lapic::handles_msr(0x10));
        assert_eq!(r.apic.read_msr(0x10), None);
        assert!(Lapic::handles_msr(0x830));
    }

    #[test]
    fn timer_one_shot_with_divide_values_and_exact_deadlines() {
        for (tdcr, div) in [
            (0x0u32, 2u64),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xa, 128),
            (0xb, 1),
        ] {
            let mut r = rig();
            r.clock.set(1_000);
            r.wr(REG_TIMER_DIVIDE, tdcr);
            assert_eq!(u64::from(r.apic.timer_divisor()), div);
            r.wr(REG_LVT_TIMER, 0x40);
            r.wr(REG_TIMER_INITIAL, 50);
            // 1 GHz: one tick of divide-by-1 is 1 ns.
            let deadline = 1_000 + 50 * div;
            assert_eq!(r.apic.next_deadline(), Some(deadline), "div {div}");
            r.at(deadline - 1);
            assert_eq!(r.take(), None);
            assert_eq!(r.rd(REG_TIMER_CURRENT), 1);
            r.at(deadline);
            assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x40)));
            assert_eq!(r.rd(REG_TIMER_CURRENT), 0);
            assert_eq!(r.apic.next_deadline(), None);
            r.at(deadline * 10);
            r.wr(REG_EOI, 0);
            assert_eq!(r.take(), None);
        }
    }

    #[test]
    fn timer_deadline_rounds_up_at_odd_frequencies() {
        // 3 MHz bus, divide by 1: 10 ticks = 3333.33 ns.
        let mut r = rig_with(0, true, 3_000_000);
        r.wr(REG_SVR, 0x1ff);
        r.wr(REG_TIMER_DIVIDE, 0xb);
        r.wr(REG_LVT_TIMER, 0x1_0040);
        r.wr(REG_LVT_TIMER, 0x0_0040);
        r.wr(REG_TIMER_INITIAL, 10);
        assert_eq!(r.apic.next_deadline(), Some(3334));
        r.at(3333);
        assert_eq!(r.take(), None);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 1);
        r.at(3334);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x40)));
    }

    #[test]
    fn timer_periodic_reloads_without_drift() {
        let mut r = rig();
        r.wr(REG_TIMER_DIVIDE, 0x1); // 4
        r.wr(REG_LVT_TIMER, 0x2_0041);
        r.wr(REG_TIMER_INITIAL, 25); // 100 ns period
        for k in 1..=5u64 {
            assert_eq!(r.apic.next_deadline(), Some(k * 100));
            r.at(k * 100);
            assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)), "k {k}");
            r.wr(REG_EOI, 0);
            assert_eq!(r.rd(REG_TIMER_CURRENT), 25);
        }
        r.clock.set(530);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 25 - 30 / 4);
        // Late by several periods (expiries at 600 .. 1200): one interrupt
        // now, the six merged ones follow each EOI; the next deadline is
        // the next period boundary.
        r.at(1_250);
        for k in 0..7 {
            assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)), "{k}");
            r.wr(REG_EOI, 0);
        }
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.state().timer_lost, 0);
        assert_eq!(r.apic.next_deadline(), Some(1_300));
        // An expiry while the previous one is still in IRR is owed too.
        r.at(1_300);
        r.at(1_400);
        r.apic.advance(1_400);
        assert_eq!(r.apic.state().timer_lost, 1);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)));
        r.wr(REG_EOI, 0);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x41)));
        r.wr(REG_EOI, 0);
        assert_eq!(r.take(), None);
        // Reprogramming forgets owed ticks.
        r.at(2_000);
        r.apic.advance(2_000);
        assert!(r.apic.state().timer_lost > 0);
        r.wr(REG_TIMER_INITIAL, 25);
        assert_eq!(r.apic.state().timer_lost, 0);
        r.take();
        r.wr(REG_EOI, 0);
        // Initial count 0 stops it.
        r.wr(REG_TIMER_INITIAL, 0);
        assert_eq!(r.apic.next_deadline(), None);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 0);
    }

    #[test]
    fn timer_divide_change_mid_count_continues_from_the_current_count() {
        let mut r = rig();
        r.wr(REG_TIMER_DIVIDE, 0xb);
        r.wr(REG_LVT_TIMER, 0x40);
        r.wr(REG_TIMER_INITIAL, 100);
        r.clock.set(40);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 60);
        r.wr(REG_TIMER_DIVIDE, 0x0); // 2
        assert_eq!(r.apic.next_deadline(), Some(40 + 120));
        // One-shot to periodic keeps counting, then reloads the initial.
        r.clock.set(60);
        r.wr(REG_LVT_TIMER, 0x2_0040);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 50);
        r.at(160);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x40)));
        assert_eq!(r.apic.next_deadline(), Some(160 + 200));
    }

    #[test]
    fn current_count_reads_mark_time_taint() {
        let mut r = rig();
        r.wr(REG_TIMER_INITIAL, 1_000);
        assert!(!r.taint.take());
        r.clock.set(500);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 750);
        assert!(r.taint.take());
        assert_eq!(r.rd(REG_TIMER_INITIAL), 1_000);
        assert!(!r.taint.take());
        // Masked: counts anyway.
        r.clock.set(2_100);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 0);
        assert_eq!(r.take(), None);
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut r = rig();
        // Not in TSC-deadline mode: MSR reads 0, writes ignored.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 500));
        assert_eq!(r.apic.read_msr(MSR_TSC_DEADLINE), Some(0));
        r.wr(REG_TIMER_INITIAL, 1_000);
        r.wr(REG_LVT_TIMER, 0x4_0050);
        // Switching to TSC-deadline disarms the count timer.
        assert_eq!(r.rd(REG_TIMER_INITIAL), 0);
        r.wr(REG_TIMER_INITIAL, 77);
        assert_eq!(r.rd(REG_TIMER_INITIAL), 0);
        assert_eq!(r.apic.next_deadline(), None);
        // 2 GHz TSC: TSC 1001 is reached at ns 500.5 -> 501.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 1_001));
        assert_eq!(r.apic.read_msr(MSR_TSC_DEADLINE), Some(1_001));
        assert!(r.taint.take());
        assert_eq!(r.apic.next_deadline(), Some(501));
        r.at(500);
        assert_eq!(r.apic.tsc(), 1_000);
        assert_eq!(r.take(), None);
        r.at(501);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
        // Fired: the MSR reads 0 and nothing more is scheduled.
        assert_eq!(r.apic.read_msr(MSR_TSC_DEADLINE), Some(0));
        assert_eq!(r.apic.next_deadline(), None);
        assert_eq!(r.rd(REG_TIMER_CURRENT), 0);
        r.wr(REG_EOI, 0);
        // A deadline in the past fires at once.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 10));
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
        r.wr(REG_EOI, 0);
        // Writing 0 disarms.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 5_000));
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 0));
        assert_eq!(r.apic.next_deadline(), None);
        // Leaving TSC-deadline mode clears the deadline.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 5_000));
        r.wr(REG_LVT_TIMER, 0x0_0050);
        r.wr(REG_LVT_TIMER, 0x4_0050);
        assert_eq!(r.apic.read_msr(MSR_TSC_DEADLINE), Some(0));
        // A far-future deadline does not overflow.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, u64::MAX));
        assert_eq!(r.apic.next_deadline(), Some(u64::MAX / 2 + 1));
    }

    /// A guest TSC that is not the VM clock (KVM: the hardware TSC plus
    /// KVM's offset), 1 GHz, set by hand.
    struct HardwareTsc(Arc<std::sync::atomic::AtomicU64>);

    impl TscSource for HardwareTsc {
        fn hz(&self) -> u64 {
            1_000_000_000
        }
        fn tsc_at(&self, _now_ns: u64) -> u64 {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn ns_when(&self, tsc: u64, now_ns: u64) -> Option<u64> {
            Some(now_ns + tsc.saturating_sub(self.tsc_at(now_ns)))
        }
    }

    #[test]
    fn tsc_deadline_compares_against_the_injected_tsc() {
        let mut r = rig();
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(7_000_000));
        r.apic
            .set_tsc_source(Arc::new(HardwareTsc(counter.clone())));
        assert_eq!(r.apic.tsc(), 7_000_000);
        assert_eq!(r.apic.tsc_hz(), 1_000_000_000);
        r.wr(REG_LVT_TIMER, 0x4_0050);
        // 500 ticks ahead of the guest's TSC (not of the clock's 0).
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 7_000_500));
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.next_deadline(), Some(500));
        // The clock got there but the guest's TSC lags: not yet, and the
        // timer is rescheduled from the source's new estimate.
        r.at(500);
        assert_eq!(r.take(), None);
        assert_eq!(r.apic.next_deadline(), Some(1_000));
        counter.store(7_000_500, std::sync::atomic::Ordering::Relaxed);
        r.at(1_000);
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
        assert_eq!(r.apic.read_msr(MSR_TSC_DEADLINE), Some(0));
        r.wr(REG_EOI, 0);
        // Behind the guest's TSC (though far ahead of the clock's): at once.
        assert!(r.apic.write_msr(MSR_TSC_DEADLINE, 7_000_400));
        assert_eq!(r.take(), Some(InterruptRequest::Fixed(0x50)));
    }

    #[test]
    fn init_keeps_id_and_base() {
        let mut r = rig();
        r.wr(REG_ID, 0x0700_0000);
        r.wr(REG_TPR, 0x10);
        r.apic.accept(0x70, false);
        r.apic.init();
        assert_eq!(r.rd(REG_ID), 0x0700_0000);
        assert_eq!(r.apic.apic_base(), 0xfee0_0900);
        assert_eq!(r.rd(REG_TPR), 0);
        assert_eq!(r.rd(REG_LVT_LINT0), LVT_MASKED);
        r.apic.reset();
        assert_eq!(r.rd(REG_ID), 0);
        assert_eq!(r.rd(REG_LVT_LINT0), 0x700);
    }

    #[test]
    fn state_restore_round_trip() {
        let mut r = rig();
        r.wr(REG_TPR, 0x20);
        r.wr(REG_TIMER_DIVIDE, 0x3);
        r.wr(REG_LVT_TIMER, 0x2_0040);
        r.wr(REG_TIMER_INITIAL, 1_000);
        r.apic.accept(0x66, true);
        r.take();
        r.apic.accept(0x77, false);
        r.wr(REG_ICR_LOW, 0x4099);
        r.clock.set(5_000);
        let st = r.apic.state();
        let mut v = rig();
        v.clock.set(5_000);
        v.apic.restore(&st);
        assert_eq!(v.apic.state(), st);
        for reg in [
            REG_TPR,
            REG_PPR,
            REG_TIMER_CURRENT,
            REG_ISR + 48,
            REG_IRR + 48,
        ] {
            assert_eq!(r.rd(reg), v.rd(reg), "reg {reg:#x}");
        }
        assert_eq!(r.apic.next_deadline(), v.apic.next_deadline());
        assert_eq!(r.apic.take_messages(), v.apic.take_messages());
        // Garbage is sanitised.
        let bad = LapicState {
            apic_base: !APIC_BASE_ENABLE,
            svr: u32::MAX,
            lvt: [u32::MAX; LVT_COUNT],
            timer_divide: u32::MAX,
            ..LapicState::power_on(0, false)
        };
        v.apic.restore(&bad);
        let s = v.apic.state();
        assert_eq!(s.apic_base & APIC_BASE_EXTD, 0);
        assert_eq!(s.svr, 0x3ff);
        assert_eq!(s.lvt[LVT_ERROR], 0x1_00ff);
        assert_eq!(s.timer_divide, 0xb);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        Write32(u32, u32),
        ReadMsr(u32),
        WriteMsr(u32, u64),
        Accept(u8, bool),
        Nmi,
        ExtInt,
        Lint(bool, bool),
        Take,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let reg = (0u32..0x40).prop_map(|r| r << 4);
        let msr = prop_oneof![
            4 => 0x800u32..0x900,
            1 => Just(MSR_APIC_BASE),
            1 => Just(MSR_TSC_DEADLINE),
            1 => any::<u32>(),
        ];
        let msr_val = prop_oneof![
            3 => any::<u64>().prop_map(|v| v & 0xffff_ffff),
            1 => any::<u64>(),
            1 => prop_oneof![
                Just(DEFAULT_BASE),
                Just(DEFAULT_BASE | APIC_BASE_ENABLE),
                Just(DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD),
            ],
        ];
        prop_oneof![
            1 => (0u64..0x1010, 0usize..9).prop_map(|(o, n)| Op::Read(o, n)),
            1 => (
                prop_oneof![0u64..0x1010, any::<u64>()],
                proptest::collection::vec(any::<u8>(), 0..9)
            )
                .prop_map(|(o, d)| Op::Write(o, d)),
            4 => (reg, any::<u32>()).prop_map(|(r, v)| Op::Write32(r, v)),
            1 => msr.clone().prop_map(Op::ReadMsr),
            2 => (msr, msr_val).prop_map(|(m, v)| Op::WriteMsr(m, v)),
            2 => (any::<u8>(), any::<bool>()).prop_map(|(v, l)| Op::Accept(v, l)),
            1 => Just(Op::Nmi),
            1 => Just(Op::ExtInt),
            1 => (any::<bool>(), any::<bool>()).prop_map(|(p, l)| Op::Lint(p, l)),
            2 => Just(Op::Take),
            1 => (0u64..100_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_sequences_never_panic(
            ops in proptest::collection::vec(op(), 0..300)
        ) {
            let mut r = rig_with(1, true, 100_000_000);
            for op in ops {
                match op {
                    Op::Read(o, n) => {
                        let mut buf = vec![0u8; n];
                        r.apic.read(o, &mut buf);
                    }
                    Op::Write(o, d) => r.apic.write(o, &d),
                    Op::Write32(reg, v) => r.wr(reg, v),
                    Op::ReadMsr(m) => { r.apic.read_msr(m); }
                    Op::WriteMsr(m, v) => { r.apic.write_msr(m, v); }
                    Op::Accept(v, l) => { r.apic.accept(v, l); }
                    Op::Nmi => { r.apic.accept_nmi(); }
                    Op::ExtInt => { r.apic.accept_extint(); }
                    Op::Lint(p, l) => if p { r.apic.set_lint1(l) } else { r.apic.set_lint0(l) },
                    Op::Take => {
                        if let Some(p) = r.apic.pending_interrupt() {
                            let got = r.apic.acknowledge(p);
                            if let (InterruptRequest::Fixed(a), InterruptRequest::Fixed(b)) = (p, got) {
                                prop_assert!(a == b || b == r.apic.spurious_vector() || b > a);
                            }
                        }
                    }
                    Op::Advance(d) => {
                        r.clock.advance_by(d);
                        let now = r.clock.now_ns();
                        if let Some(dl) = r.apic.next_deadline() {
                            if dl <= now {
                                r.apic.advance(now);
                            }
                        }
                    }
                }
                let s = r.apic.state();
                prop_assert!(mode_of(s.apic_base).is_some());
                prop_assert!(s.outbox.len() <= OUTBOX_LIMIT);
                // A deliverable fixed vector is always above PPR's class.
                if let Some(InterruptRequest::Fixed(v)) = r.apic.pending_interrupt() {
                    prop_assert!(v >> 4 > r.apic.ppr() >> 4);
                    prop_assert!(v >= 16);
                }
                // Deadlines never lie in the past after an advance.
                let now = r.clock.now_ns();
                r.apic.advance(now);
                if let Some(dl) = r.apic.next_deadline() {
                    prop_assert!(dl > now);
                }
                r.apic.take_messages();
            }
            let mut v = rig_with(1, true, 100_000_000);
            v.apic.restore(&r.apic.state());
            prop_assert_eq!(v.apic.state(), r.apic.state());
        }
    }
}
