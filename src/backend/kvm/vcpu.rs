//! A vCPU on KVM (`KvmVcpu`): the run loop, exits, the interpreter fallback and the state transfers.

use super::*;

/// A vCPU on KVM.
pub struct KvmVcpu {
    /// KVM's coalesced MMIO ring, a page of `fd`'s mapping (declared
    /// before `fd`: it points into it).
    pub(super) coalesced: Option<CoalescedRing>,
    pub(super) fd: VcpuFd,
    pub(super) id: u32,
    pub(super) caps: Caps,
    /// Shared with the kickers (see [`KvmKick`]).
    pub(super) kick: Arc<KvmKick>,
    /// The thread on which the kick signal was last made sure to be
    /// unblocked (vCPUs may move between threads).
    pub(super) kick_unblocked_on: Option<libc::pthread_t>,
    /// Size of the kvm_run mapping (bounds the PIO data area).
    pub(super) run_size: usize,
    /// The VMM asked for [`VcpuExit::InterruptWindow`].
    pub(super) window_requested: bool,
    /// An interrupt accepted while the guest could not take it; queued in
    /// KVM at the first exit that finds the guest able to take it (an
    /// interrupt window is requested meanwhile).
    pub(super) deferred_irq: Option<u8>,
    /// KVM_INTERRUPT was issued since the last exit (kvm_run's readiness
    /// flag is stale).
    pub(super) irq_queued: bool,
    /// kvm_run's `ready_for_interrupt_injection` / `if_flag` describe the
    /// current state (false after `set_state`).
    pub(super) run_valid: bool,
    /// kvm_run's sync-regs area holds the current regs, sregs and events
    /// (set by KVM_RUN, cleared by any write through ioctls).
    pub(super) sync_fresh: bool,
    /// The guest executed HLT and no interrupt has been queued since.
    pub(super) halted: bool,
    pub(super) fallback_enabled: bool,
    /// The interpreter used for instructions KVM refuses (created on first use).
    pub(super) interp: Option<Box<Cpu>>,
    /// The guest TSC duet's LAPIC model reads (shared with the machine);
    /// its offset is re-read at every IA32_TSC_DEADLINE access.
    pub(super) guest_tsc: Option<Arc<KvmGuestTsc>>,
    /// The XSAVE state components the guest's CPUID (leaf 0xD) offers, as
    /// KVM finally set it up.
    pub(super) guest_xcr0: u64,
    /// The guest's MAXPHYADDR (its CPUID as KVM finally set it up).
    pub(super) phys_addr_bits: u32,
    pub(super) exits: BTreeMap<&'static str, u64>,
    pub(super) fallbacks: u64,
    pub(super) fallback_mnemonics: HashMap<Mnemonic, u64>,
    pub(super) logged_codes: HashSet<Code>,
    /// MSRs this KVM refused to read or write.
    pub(super) bad_msrs: BTreeSet<u32>,
    /// MSRs that exited to userspace and that the machine did not own (#GP).
    pub(super) unowned_msrs: BTreeSet<u32>,
    /// Once-only log keys.
    pub(super) logged: BTreeSet<&'static str>,
    // Last: the memory KVM's slots point into outlives the vCPU fd.
    pub(super) mem: GuestMemory,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Kickers may outlive the vCPU: keep them off the kvm_run mapping,
        // which goes away with `fd` right after this.
        self.kick.detach();
    }
}

/// The page of the vCPU mapping that holds the coalesced MMIO ring on x86
/// (`KVM_COALESCED_MMIO_PAGE_OFFSET`).
pub(super) const COALESCED_RING_PAGE: usize = kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET as usize;
pub(super) const PAGE_SIZE: usize = 4096;

/// KVM's coalesced MMIO ring: `u32 first, last` then entries; KVM appends
/// at `last`, the VMM consumes from `first`.
pub(super) struct CoalescedRing(pub(super) NonNull<u8>);

// SAFETY: the ring is a page of the vCPU's own mapping, used only by the
// thread running the vCPU (the KvmVcpu is moved between threads whole).
unsafe impl Send for CoalescedRing {}

impl CoalescedRing {
    pub(super) const ENTRIES: u32 =
        ((PAGE_SIZE - 8) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;

    /// Hand every queued write to `io`, oldest first.
    pub(super) fn drain(&self, io: &mut dyn Platform) {
        let base = self.0.as_ptr();
        // SAFETY: `base` points at the ring page (see its construction),
        // whose first two dwords are the indices KVM updates; they are
        // accessed atomically, as the kernel does with its barriers.
        let (first, last) = unsafe {
            (
                &*(base as *const std::sync::atomic::AtomicU32),
                &*(base.add(4) as *const std::sync::atomic::AtomicU32),
            )
        };
        loop {
            let end = last.load(Ordering::Acquire);
            let at = first.load(Ordering::Relaxed);
            if at == end || at >= Self::ENTRIES {
                return;
            }
            // SAFETY: `at` < ENTRIES, so the entry lies inside the page.
            let e: kvm_coalesced_mmio = unsafe {
                std::ptr::read_volatile(
                    base.add(8 + at as usize * std::mem::size_of::<kvm_coalesced_mmio>())
                        as *const kvm_coalesced_mmio,
                )
            };
            let len = (e.len as usize).min(e.data.len());
            io.mmio_write(e.phys_addr, &e.data[..len]);
            first.store((at + 1) % Self::ENTRIES, Ordering::Release);
        }
    }
}

/// A KVM exit, once the borrow of kvm_run it came with has ended.
pub(super) enum Raw {
    /// KVM_EXIT_IO: the details are in kvm_run.
    Pio,
    /// KVM_EXIT_MMIO, already serviced.
    Mmio,
    /// KVM_EXIT_X86_RDMSR of this MSR.
    Rdmsr(u32),
    /// KVM_EXIT_X86_WRMSR of this MSR and value.
    Wrmsr(u32, u64),
    Hlt,
    IrqWindow,
    Shutdown,
    Intr,
    /// KVM_EXIT_SET_TPR: the guest lowered CR8 (synced at every exit).
    SetTpr,
    /// KVM_EXIT_INTERNAL_ERROR: the details are in kvm_run.
    Internal,
    /// Anything else, as kvm-ioctls describes it.
    Other(String),
}

/// What the run loop does after an exit.
pub(super) enum Next {
    /// Keep running the guest.
    Continue,
    /// I/O was serviced; check whether the VMM wants the vCPU back.
    Serviced,
    /// Return this to the VMM.
    Return(VcpuExit),
}

impl KvmVcpu {
    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Enable or disable the interpreter fallback. Disabled, an instruction
    /// KVM cannot emulate ends the run with
    /// `Shutdown(Unrecoverable)` describing KVM's refusal.
    pub fn set_interp_fallback(&mut self, on: bool) {
        self.fallback_enabled = on;
    }

    /// Instructions executed by the interpreter fallback, by mnemonic.
    pub fn fallback_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .fallback_mnemonics
            .iter()
            .map(|(m, n)| (mnemonic_name(*m), *n))
            .collect();
        v.sort();
        v
    }

    pub(super) fn count(&mut self, what: &'static str) {
        *self.exits.entry(what).or_default() += 1;
    }

    pub(super) fn log_once(&mut self, key: &'static str) -> bool {
        self.logged.insert(key)
    }

    // ---- the run loop ---------------------------------------------------

    pub(super) fn run_loop(&mut self, io: &mut dyn Platform) -> Result<VcpuExit> {
        if self.halted && !self.caps.kernel_irqchip {
            if !self.wake_pending()? {
                return Ok(VcpuExit::Halted);
            }
            self.halted = false;
        }
        if self.kick.is_pending() {
            // Kicked while not in KVM_RUN: answer without entering.
            self.count("intr");
            return self.interrupted();
        }
        // Set when the VMM is to get the vCPU back after an I/O exit: KVM
        // completes the pending instruction and, because of immediate_exit,
        // returns EINTR instead of re-entering the guest.
        let mut exiting: Option<VcpuExit> = None;
        loop {
            if exiting.is_none() && self.deferred_irq.is_some() && self.ready_for_interrupt_kvm() {
                if let Some(v) = self.deferred_irq.take() {
                    self.kvm_interrupt(v)?;
                }
            }
            let want_window = self.window_requested || self.deferred_irq.is_some();
            self.fd.get_kvm_run().request_interrupt_window = u8::from(want_window);
            if exiting.is_some() {
                self.kick.set_immediate_exit();
            }
            // With duet's LAPIC, CR8 is its TPR's priority class: KVM loads
            // kvm_run.cr8 at entry and stores the guest's CR8 there at exit.
            let cr8_in = if self.caps.kernel_irqchip {
                None
            } else {
                io.read_cr8()
            };
            if let Some(c) = cr8_in {
                self.fd.get_kvm_run().cr8 = c;
            }
            // A kick from here on sets immediate_exit (KVM_RUN then returns
            // before entering the guest) or signals this thread (an
            // in-progress KVM_RUN returns EINTR).
            self.kick.enter();
            let result = self.fd.run();
            self.kick.leave();
            // Writes KVM queued without exiting come first, in order.
            if let Some(ring) = &self.coalesced {
                ring.drain(io);
            }
            let raw = match result {
                Ok(KvmExit::SetTpr) => Raw::SetTpr,
                Ok(KvmExit::IoIn(..) | KvmExit::IoOut(..)) => Raw::Pio,
                Ok(KvmExit::MmioRead(addr, data)) => {
                    io.mmio_read(addr, data);
                    Raw::Mmio
                }
                Ok(KvmExit::MmioWrite(addr, data)) => {
                    io.mmio_write(addr, data);
                    Raw::Mmio
                }
                Ok(KvmExit::X86Rdmsr(m)) => Raw::Rdmsr(m.index),
                Ok(KvmExit::X86Wrmsr(m)) => Raw::Wrmsr(m.index, m.data),
                Ok(KvmExit::Hlt) => Raw::Hlt,
                Ok(KvmExit::IrqWindowOpen) => Raw::IrqWindow,
                Ok(KvmExit::Shutdown) => Raw::Shutdown,
                Ok(KvmExit::Intr) => Raw::Intr,
                Ok(KvmExit::InternalError) => Raw::Internal,
                Ok(other) => Raw::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick (signal and/or immediate_exit), or our own
                    // immediate_exit after completing the I/O. `run`
                    // clears immediate_exit and the kick on return.
                    self.sync_cr8(io, cr8_in);
                    self.run_valid = true;
                    self.sync_fresh = self.caps.sync_regs;
                    self.irq_queued = false;
                    self.count(match exiting {
                        Some(VcpuExit::IoRequest) => "io-request",
                        Some(_) => "irq-window",
                        None => "intr",
                    });
                    return match exiting {
                        Some(e) => Ok(e),
                        None => self.interrupted(),
                    };
                }
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            // (An MMIO exit was serviced above already: a TPR write through
            // the MMIO page right after a MOV to CR8 with no exit between
            // lands before it. Guests do not mix the two.)
            let cr8_changed = self.sync_cr8(io, cr8_in);
            self.run_valid = true;
            self.sync_fresh = self.caps.sync_regs;
            self.irq_queued = false;
            let next = match raw {
                Raw::SetTpr => {
                    self.count("set-tpr");
                    Next::Serviced
                }
                Raw::Pio => {
                    self.count("io");
                    self.service_pio(io)?;
                    Next::Serviced
                }
                Raw::Mmio => {
                    self.count("mmio");
                    Next::Serviced
                }
                Raw::Rdmsr(index) => {
                    self.count("rdmsr");
                    self.service_msr(io, index, None)?;
                    Next::Serviced
                }
                Raw::Wrmsr(index, value) => {
                    self.count("wrmsr");
                    self.service_msr(io, index, Some(value))?;
                    Next::Serviced
                }
                Raw::Hlt => {
                    self.count("hlt");
                    self.halted = true;
                    Next::Return(VcpuExit::Halted)
                }
                Raw::IrqWindow => {
                    self.count("irq-window");
                    if let Some(v) = self.deferred_irq.take() {
                        self.kvm_interrupt(v)?;
                        Next::Continue
                    } else if self.window_requested {
                        Next::Return(VcpuExit::InterruptWindow)
                    } else {
                        Next::Continue
                    }
                }
                Raw::Shutdown => {
                    self.count("shutdown");
                    Next::Return(VcpuExit::Shutdown(ShutdownReason::TripleFault))
                }
                Raw::Intr => {
                    self.count("intr");
                    Next::Return(VcpuExit::Interrupted)
                }
                Raw::Internal => self.internal_error(io)?,
                Raw::Other(what) => {
                    let exit_reason = self.fd.get_kvm_run().exit_reason;
                    Next::Return(self.unexpected_exit(exit_reason, &what))
                }
            };
            let next = match next {
                Next::Continue if cr8_changed => Next::Serviced,
                n => n,
            };
            match next {
                Next::Continue => {}
                Next::Serviced => {
                    if io.stop_requested() {
                        exiting = Some(VcpuExit::IoRequest);
                    } else if exiting.is_none() && self.window_requested && self.window_open() {
                        // Hosts that emulate ring 0 (KVM-PVM) raise the
                        // interrupt-window exit late or miss a short window
                        // entirely: report it at any exit that sees it open.
                        exiting = Some(VcpuExit::InterruptWindow);
                    }
                }
                Next::Return(e) => {
                    if let Some(pending) = exiting {
                        // What the vCPU was leaving for stands, unless the
                        // guest itself ended.
                        if !matches!(e, VcpuExit::Shutdown(_)) {
                            return Ok(pending);
                        }
                    }
                    return Ok(e);
                }
            }
        }
    }

    /// What a kicked `run` returns: `Interrupted`, except that with the
    /// kernel irqchip a vCPU KVM holds halted (waiting in the kernel for an
    /// interrupt) reports `Halted`, so that the VMM can tell a guest that
    /// stopped (`cli; hlt`) from one that is running: kick, then look at
    /// IF in [`Vcpu::state`].
    pub(super) fn interrupted(&mut self) -> Result<VcpuExit> {
        if self.caps.kernel_irqchip {
            let mp = self
                .fd
                .get_mp_state()
                .map_err(kvm_err("KVM_GET_MP_STATE"))?;
            if mp.mp_state == KVM_MP_STATE_HALTED {
                self.count("hlt-in-kernel");
                return Ok(VcpuExit::Halted);
            }
        }
        Ok(VcpuExit::Interrupted)
    }

    /// After an exit: hand a CR8 the guest changed (`kvm_run.cr8` differs
    /// from `entered`, what the VMM loaded at entry) to the LAPIC's TPR.
    /// True when it changed.
    pub(super) fn sync_cr8(&mut self, io: &mut dyn Platform, entered: Option<u64>) -> bool {
        let Some(before) = entered else {
            return false;
        };
        let now = self.fd.get_kvm_run().cr8;
        if now == before {
            return false;
        }
        io.write_cr8(now);
        true
    }

    /// Complete the current `KVM_EXIT_X86_RDMSR` (`write` None) or
    /// `KVM_EXIT_X86_WRMSR` with the machine's answer. `Unhandled` means
    /// what KVM would have done: IA32_APIC_BASE is stored in (and read
    /// from) KVM, anything else gets #GP.
    pub(super) fn service_msr(
        &mut self,
        io: &mut dyn Platform,
        index: u32,
        write: Option<u64>,
    ) -> Result<()> {
        if index == MSR_TSC_DEADLINE {
            self.refresh_guest_tsc()?;
        }
        let (data, fault) = match write {
            None => match io.read_msr(index) {
                MsrResult::Done(v) => (Some(v), false),
                MsrResult::Fault => (None, true),
                MsrResult::Unhandled if index == msr::APIC_BASE => {
                    (Some(self.kvm_apic_base()?), false)
                }
                MsrResult::Unhandled => {
                    self.note_unowned_msr(index, "read");
                    (None, true)
                }
            },
            Some(v) => match io.write_msr(index, v) {
                MsrResult::Done(_) => {
                    // As on the interpreter, the CPU's copy follows the
                    // machine's (so `state()` agrees).
                    if index == msr::APIC_BASE
                        && !self.store_apic_base(v)?
                        && self.log_once("apic-base-store")
                    {
                        log::debug!(
                            "kvm: KVM refused to store IA32_APIC_BASE {v:#x} accepted by the \
                             machine (logged once)"
                        );
                    }
                    (None, false)
                }
                MsrResult::Fault => (None, true),
                MsrResult::Unhandled if index == msr::APIC_BASE => {
                    (None, !self.store_apic_base(v)?)
                }
                MsrResult::Unhandled => {
                    self.note_unowned_msr(index, "write");
                    (None, true)
                }
            },
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_X86_RDMSR or
        // KVM_EXIT_X86_WRMSR, so `msr` is the active member of the exit
        // union; KVM reads `error` (and `data` for reads) at the next
        // KVM_RUN, which completes the instruction.
        let m = unsafe { &mut run.__bindgen_anon_1.msr };
        if let Some(v) = data {
            m.data = v;
        }
        m.error = u8::from(fault);
        Ok(())
    }

    /// Re-read the offset of the guest's TSC from the host's into
    /// [`KvmVcpu::guest_tsc`]: IA32_TSC as KVM reads it, against the host
    /// TSC read just after, so the estimate never runs ahead of the guest
    /// (a deadline fires at most one ioctl late, never early). Done at
    /// every IA32_TSC_DEADLINE access, so a write of IA32_TSC in between
    /// is followed. (KVM-PVM's guest reads the host's TSC itself: offset 0,
    /// which this finds too.)
    pub(super) fn refresh_guest_tsc(&mut self) -> Result<()> {
        let Some(tsc) = self.guest_tsc.clone() else {
            return Ok(());
        };
        let guest = self.get_msrs(&[msr::TSC])?;
        let after = host_tsc();
        match guest.first() {
            Some(e) if e.index == msr::TSC => tsc.set_offset(e.data.wrapping_sub(after)),
            _ => {
                if self.log_once("guest-tsc-unreadable") {
                    log::warn!(
                        "kvm: this KVM does not return IA32_TSC; the TSC-deadline timer \
                         assumes the guest reads the host's TSC (logged once)"
                    );
                }
            }
        }
        Ok(())
    }

    /// IA32_APIC_BASE as KVM holds it.
    pub(super) fn kvm_apic_base(&mut self) -> Result<u64> {
        if self.sync_fresh {
            return Ok(self.fd.sync_regs().sregs.apic_base);
        }
        Ok(self
            .fd
            .get_sregs()
            .map_err(kvm_err("KVM_GET_SREGS"))?
            .apic_base)
    }

    /// Store IA32_APIC_BASE in KVM as a guest WRMSR would (the interpreter's
    /// reserved-bit check). False if the value is refused (#GP).
    pub(super) fn store_apic_base(&mut self, v: u64) -> Result<bool> {
        if v & !devices::lapic::apic_base_writable(self.phys_addr_bits) != 0 {
            return Ok(false);
        }
        let entry = kvm_msr_entry {
            index: msr::APIC_BASE,
            data: v,
            ..Default::default()
        };
        let msrs = KvmMsrs::from_entries(&[entry]).map_err(fam_err("KVM_SET_MSRS"))?;
        if self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
            return Ok(false);
        }
        if self.sync_fresh {
            // Keep the copy in kvm_run's sync area (read instead of
            // ioctls until the next exit) current. Not marked dirty: KVM
            // already has the value.
            self.fd.sync_regs_mut().sregs.apic_base = v;
        }
        Ok(true)
    }

    pub(super) fn note_unowned_msr(&mut self, index: u32, what: &str) {
        if self.unowned_msrs.len() < 1024 && self.unowned_msrs.insert(index) {
            log::debug!(
                "kvm: guest {what} of MSR {index:#x}, which neither KVM nor the machine \
                 implements: #GP (logged once per MSR)"
            );
        }
    }

    /// Hand the port I/O of the current `KVM_EXIT_IO` to `io`, one element
    /// (of `size` bytes) at a time.
    pub(super) fn service_pio(&mut self, io: &mut dyn Platform) -> Result<()> {
        let run_size = self.run_size;
        let run: &mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_IO, so `io` is the
        // active member of the exit union.
        let pio = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(pio.size);
        let count = pio.count as usize;
        let off = pio.data_offset as usize;
        let len = size.saturating_mul(count);
        if !matches!(size, 1 | 2 | 4) || off.checked_add(len).is_none_or(|end| end > run_size) {
            return Err(BackendError::Kvm {
                op: "KVM_RUN",
                source: io::Error::other(format!(
                    "malformed KVM_EXIT_IO: size {size}, count {count}, data offset {off:#x}"
                )),
            });
        }
        let base = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: KVM places the `count * size` data bytes at `data_offset`
        // inside the vCPU's kvm_run mapping, whose full `run_size` bytes
        // kvm-ioctls keeps mapped for the life of `self.fd`; the bounds were
        // checked above. Nothing else references those bytes while the slice
        // lives (`run` is not used again).
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), len) };
        let is_in = u32::from(pio.direction) == kvm_bindings::KVM_EXIT_IO_IN;
        for elem in data.chunks_exact_mut(size) {
            if is_in {
                io.io_read(pio.port, elem);
            } else {
                io.io_write(pio.port, elem);
            }
        }
        Ok(())
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: the interpreter fallback for emulation
    /// failures, a shutdown for everything else.
    pub(super) fn internal_error(&mut self, io: &mut dyn Platform) -> Result<Next> {
        self.count("internal-error");
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so
        // `internal` is the active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && self.fallback_enabled {
            return self.fallback(io, data);
        }
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "KVM could not emulate an instruction",
            KVM_INTERNAL_ERROR_SIMUL_EX => "KVM hit an exception while delivering another",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "KVM could not deliver an event to the guest",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "KVM got an unexpected exit reason",
            _ => "KVM internal error",
        };
        let msg = format!(
            "{what} (KVM_EXIT_INTERNAL_ERROR, suberror {}, data {})",
            internal.suberror,
            hex_words(data)
        );
        Ok(Next::Return(VcpuExit::Shutdown(
            ShutdownReason::Unrecoverable(self.with_registers(msg)),
        )))
    }

    /// Execute the instruction at RIP with the interpreter.
    pub(super) fn fallback(&mut self, io: &mut dyn Platform, kvm_data: &[u64]) -> Result<Next> {
        let mut cpu = match self.interp.take() {
            Some(cpu) => cpu,
            None => {
                let mut c = Cpu::new(Ram::new(self.mem.clone()));
                c.set_uncached(true);
                c.set_host_features(true);
                // The guest runs on the host CPU the rest of the time.
                c.set_quirks(cpu_interp::quirks::Quirks::host());
                c.set_cpuid_config(cpu_interp::cpuid::CpuidConfig {
                    apic_id: self.id,
                    ..Default::default()
                });
                // XSETBV/XRSTOR may use every component the guest was told
                // about (KVM-PVM forces the host's AVX-512 ones in).
                c.set_xsave_components(self.guest_xcr0);
                Box::new(c)
            }
        };
        let r = self.fallback_on(&mut cpu, io, kvm_data);
        self.interp = Some(cpu);
        r
    }

    pub(super) fn fallback_on(
        &mut self,
        cpu: &mut Cpu,
        io: &mut dyn Platform,
        kvm_data: &[u64],
    ) -> Result<Next> {
        let kvm_data = kvm_data.to_vec();
        // Every vCPU ioctl costs several microseconds on some hosts, so
        // only regs, sregs and events (free with sync regs) are read first;
        // the rest is read when the instruction may use it. Parts not read
        // keep the interpreter's previous values, which the write-back
        // below never sends to KVM unless the instruction changed them.
        let mut state = cpu.state();
        self.read_core(&mut state)?;
        cpu.set_state(&state);
        let kick = self.kick.clone();
        let mut plat = IoPlatform {
            io,
            kick: &kick.pending,
        };
        let decoded = cpu.decode_one(&mut plat);
        let full = match &decoded {
            Ok(insn) => needs_full_state(&insn.i, &state),
            Err(_) => true,
        };
        if full {
            self.read_extra(&mut state)?;
            cpu.set_state(&state);
        }
        let rip = state.regs.rip;
        let (code, mnemonic, text) = match decoded {
            Ok(insn) => {
                let (code, mnemonic) = (insn.i.code(), insn.i.mnemonic());
                let text = cpu_interp::disasm(&insn.i);
                if !cpu_interp::dispatch::implemented(code) {
                    let bytes = code_bytes(cpu, &state, insn.i.len());
                    let msg = format!(
                        "KVM cannot execute `{text}` ({code:?}) and duet's interpreter does \
                         not implement it either\n  instruction bytes: {bytes}\n  KVM \
                         emulation-failure data: {}\n{}",
                        hex_words(&kvm_data),
                        describe_state(&state)
                    );
                    return Ok(Next::Return(VcpuExit::Shutdown(
                        ShutdownReason::Unrecoverable(msg),
                    )));
                }
                (Some(code), Some(mnemonic), text)
            }
            // The interpreter cannot even fetch the instruction; `step`
            // delivers that fault to the guest as the CPU would.
            Err(exc) => (None, None, format!("(fetch fault {exc:?})")),
        };
        let exit = cpu.step(&mut plat);
        let io_requested = plat.io.stop_requested();
        let new_state = cpu.state();
        self.put_state(&new_state, Some(&state))?;
        self.fallbacks += 1;
        if let Some(m) = mnemonic {
            *self.fallback_mnemonics.entry(m).or_default() += 1;
        }
        match code {
            Some(c) if self.logged_codes.len() < 4096 && self.logged_codes.insert(c) => {
                log::info!(
                    "kvm: KVM cannot emulate `{text}` at {rip:#x}; the interpreter executes it \
                     (logged once per opcode)"
                );
            }
            None if self.log_once("fallback-fetch-fault") => {
                log::warn!(
                    "kvm: KVM failed to emulate at {rip:#x} and the interpreter could not fetch \
                     the instruction: {text}; delivered to the guest (logged once)"
                );
            }
            _ => {}
        }
        // A single step reports HLT in the state (`events.halted`).
        let halted = new_state.events.halted || matches!(exit, Some(CpuExit::Halted));
        Ok(match exit {
            Some(CpuExit::TripleFault) => {
                Next::Return(VcpuExit::Shutdown(ShutdownReason::TripleFault))
            }
            _ if halted && self.caps.kernel_irqchip => {
                // KVM's LAPIC does the waiting.
                self.flush_sync()?;
                self.sync_fresh = false;
                self.fd
                    .set_mp_state(kvm_bindings::kvm_mp_state {
                        mp_state: KVM_MP_STATE_HALTED,
                    })
                    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
                Next::Continue
            }
            _ if halted => {
                self.halted = true;
                Next::Return(VcpuExit::Halted)
            }
            // Any I/O the instruction did went through `io` and is
            // complete: nothing is pending in KVM, so a VMM request can be
            // answered at once.
            _ if io_requested => Next::Return(VcpuExit::IoRequest),
            _ => Next::Continue,
        })
    }

    /// A message for an exit duet does not handle.
    pub(super) fn unexpected_exit(&mut self, exit_reason: u32, what: &str) -> VcpuExit {
        let run = self.fd.get_kvm_run();
        let detail = match exit_reason {
            kvm_bindings::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says `fail_entry` is the active member.
                let f = unsafe { run.__bindgen_anon_1.fail_entry };
                self.count("fail-entry");
                format!(
                    "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY): \
                     hardware_entry_failure_reason {:#x} on host CPU {}; the vCPU state is \
                     probably invalid for this host",
                    f.hardware_entry_failure_reason, f.cpu
                )
            }
            kvm_bindings::KVM_EXIT_UNKNOWN => {
                // SAFETY: exit_reason says `hw` is the active member.
                let h = unsafe { run.__bindgen_anon_1.hw };
                self.count("unknown");
                format!(
                    "KVM exit with unknown reason (KVM_EXIT_UNKNOWN): hardware_exit_reason {:#x}",
                    h.hardware_exit_reason
                )
            }
            kvm_bindings::KVM_EXIT_EXCEPTION => {
                // SAFETY: exit_reason says `ex` is the active member.
                let x = unsafe { run.__bindgen_anon_1.ex };
                self.count("exception");
                format!(
                    "KVM exit KVM_EXIT_EXCEPTION: exception {} error code {:#x}",
                    x.exception, x.error_code
                )
            }
            r => {
                self.count("other");
                format!("unexpected KVM exit reason {r}: {what}")
            }
        };
        VcpuExit::Shutdown(ShutdownReason::Unrecoverable(self.with_registers(detail)))
    }

    /// Append the register dump to `msg` (or say why there is none).
    pub(super) fn with_registers(&mut self, msg: String) -> String {
        match self.get_state() {
            Ok(s) => {
                let bits = code_bits(&s);
                let bytes = self.read_code_bytes(&s, 15);
                let dis = bytes
                    .as_deref()
                    .map(|b| cpu_interp::disasm_bytes(bits, s.regs.rip, b))
                    .unwrap_or_else(|| "(unreadable)".into());
                format!("{msg}\n  instruction at RIP: {dis}\n{}", describe_state(&s))
            }
            Err(e) => format!("{msg}\n  (registers unavailable: {e})"),
        }
    }

    /// Up to `len` bytes at CS:RIP, through the interpreter's page walker
    /// (RAM only).
    pub(super) fn read_code_bytes(&mut self, s: &CpuState, len: usize) -> Option<Vec<u8>> {
        let mut cpu = Cpu::new(Ram::new(self.mem.clone()));
        cpu.set_state(s);
        let mut plat = cpu_interp::NullPlatform;
        let lin0 = code_linear(s);
        let mut out = Vec::with_capacity(len);
        for k in 0..len as u64 {
            let Some(pa) = cpu.translate_debug(&mut plat, lin0.wrapping_add(k)) else {
                break;
            };
            let mut b = [0u8];
            if !cpu.ram().read(pa, &mut b) {
                break;
            }
            out.push(b[0]);
        }
        (!out.is_empty()).then_some(out)
    }

    // ---- interrupts -----------------------------------------------------

    /// Issue KVM_INTERRUPT.
    pub(super) fn kvm_interrupt(&mut self, vector: u8) -> Result<()> {
        self.flush_sync()?;
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt`, which
        // `irq` is, from a vCPU fd, which `self.fd` is; it writes nothing.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, ioctls::KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(BackendError::Kvm {
                op: "KVM_INTERRUPT",
                source: io::Error::last_os_error(),
            });
        }
        self.irq_queued = true;
        self.sync_fresh = false;
        Ok(())
    }

    /// At an exit: do kvm_run's flags say an interrupt could be injected
    /// (and none is held back here)?
    pub(super) fn window_open(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        self.deferred_irq.is_none()
            && !self.irq_queued
            && run.ready_for_interrupt_injection != 0
            && run.if_flag != 0
    }

    /// Could KVM take an external interrupt now (ignoring `deferred_irq`)?
    pub(super) fn ready_for_interrupt_kvm(&mut self) -> bool {
        if self.irq_queued {
            return false;
        }
        if self.run_valid {
            let run = self.fd.get_kvm_run();
            return run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        }
        // kvm_run's flags are stale (the state was replaced): ask KVM.
        let Ok((regs, _, ev)) = self.read_core_kvm() else {
            return false;
        };
        regs.rflags & cpu_interp::flags::IF != 0
            && ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.exception.pending == 0
            && ev.nmi.injected == 0
    }

    /// After HLT: has something been queued that wakes the CPU?
    pub(super) fn wake_pending(&mut self) -> Result<bool> {
        let (_, _, ev) = self.read_core_kvm()?;
        let nmi = (ev.nmi.pending != 0 || ev.nmi.injected != 0) && ev.nmi.masked == 0;
        Ok(nmi || ev.interrupt.injected != 0)
    }

    // ---- state transfer -------------------------------------------------

    /// Regs, sregs and KVM's vCPU events: from kvm_run's sync area when
    /// it is current, else through ioctls.
    pub(super) fn read_core_kvm(&mut self) -> Result<(kvm_regs, kvm_sregs, kvm_vcpu_events)> {
        if self.sync_fresh {
            let sync = self.fd.sync_regs();
            return Ok((sync.regs, sync.sregs, sync.events));
        }
        Ok((
            self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            self.fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        ))
    }

    /// Fill `s.regs`, `s.sregs` and `s.events` (halted from our flag).
    pub(super) fn read_core(&mut self, s: &mut CpuState) -> Result<()> {
        let (regs, sregs, ev) = self.read_core_kvm()?;
        if (ev.exception.injected != 0 || ev.exception.pending != 0)
            && self.log_once("exception-dropped")
        {
            log::debug!(
                "kvm: vCPU state read while KVM holds exception {} for delivery; the neutral \
                 state cannot carry it (logged once)",
                ev.exception.nr
            );
        }
        s.regs = regs_from_kvm(&regs);
        s.sregs = sregs_from_kvm(&sregs);
        s.events = events_from_kvm(&ev);
        if s.events.interrupt.is_none() {
            s.events.interrupt = self.deferred_irq;
        }
        s.events.halted = self.halted;
        Ok(())
    }

    /// Fill the rest: FPU, debug registers, XCR0, MSRs and the TSC.
    pub(super) fn read_extra(&mut self, s: &mut CpuState) -> Result<()> {
        (s.fpu, s.xstate) = self.read_fpu()?;
        s.debug = debugregs_from_kvm(
            &self
                .fd
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        );
        s.xcr0 = if self.caps.xcrs {
            xcr0_from_kvm(&self.fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
        } else {
            1
        };
        let entries = self.get_msrs(&STATE_MSRS)?;
        let (msrs, tsc) = msrs_from_entries(&entries, Msrs::default());
        s.msrs = msrs;
        s.tsc = tsc.unwrap_or(0);
        Ok(())
    }

    pub(super) fn get_state(&mut self) -> Result<CpuState> {
        let mut s = CpuState::default();
        self.read_core(&mut s)?;
        self.read_extra(&mut s)?;
        let mp = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?;
        s.events.halted |= mp.mp_state == KVM_MP_STATE_HALTED;
        Ok(s)
    }

    /// Write `s` to KVM. With `current` (what KVM holds now, just read),
    /// only the parts that differ are written and the TSC is left running:
    /// the fallback's write-back after one interpreted instruction. That
    /// write-back goes through kvm_run's sync-regs area where possible
    /// (KVM applies it at the next KVM_RUN; see [`Self::flush_sync`]).
    pub(super) fn put_state(&mut self, s: &CpuState, current: Option<&CpuState>) -> Result<()> {
        // Through sync regs only right after an exit (the area is current).
        let via_sync = current.is_some() && self.sync_fresh;
        if current.is_none() {
            // Everything is rewritten below: pending sync writes are moot.
            self.fd.get_kvm_run().kvm_dirty_regs = 0;
        }

        // An interrupt the guest cannot take yet stays here: KVM would
        // inject whatever is queued at the next entry regardless of IF.
        let mut events = s.events;
        self.deferred_irq = None;
        let can_take = s.regs.rflags & cpu_interp::flags::IF != 0
            && !s.events.sti_shadow
            && !s.events.mov_ss_shadow;
        if let Some(v) = events.interrupt {
            if !can_take && !self.caps.kernel_irqchip {
                self.deferred_irq = Some(v);
                events.interrupt = None;
            }
        }
        let sregs_changed = current.is_none_or(|c| c.sregs != s.sregs);
        let regs_changed = current.is_none_or(|c| c.regs != s.regs);
        let events_changed = current.is_none_or(|c| {
            c.events != s.events || (c.regs.rflags ^ s.regs.rflags) & cpu_interp::flags::IF != 0
        });

        if via_sync {
            let sync = self.fd.sync_regs_mut();
            if sregs_changed {
                sync.sregs = sregs_to_kvm(&s.sregs);
            }
            if regs_changed {
                sync.regs = regs_to_kvm(&s.regs);
            }
            if events_changed {
                sync.events = events_to_kvm(&events);
            }
            for (changed, reg) in [
                (sregs_changed, SyncReg::SystemRegister),
                (regs_changed, SyncReg::Register),
                (events_changed, SyncReg::VcpuEvents),
            ] {
                if changed {
                    self.fd.set_sync_dirty_reg(reg);
                }
            }
        } else {
            if sregs_changed {
                self.fd
                    .set_sregs(&sregs_to_kvm(&s.sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
            }
            if regs_changed {
                self.fd
                    .set_regs(&regs_to_kvm(&s.regs))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        // Without an in-kernel LAPIC KVM_RUN loads CR8 from kvm_run.cr8
        // (the TPR userspace owns): a stale value there would overwrite the
        // CR8 just set with the sregs.
        if !self.caps.kernel_irqchip {
            self.fd.get_kvm_run().cr8 = s.sregs.cr8;
        }
        if current.is_none_or(|c| c.fpu != s.fpu || c.xstate != s.xstate) {
            self.write_fpu(&s.fpu, &s.xstate)?;
        }
        if self.caps.xcrs && current.is_none_or(|c| c.xcr0 != s.xcr0) {
            self.fd
                .set_xcrs(&xcr0_to_kvm(s.xcr0))
                .map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        let mut entries = msrs_to_entries(&s.msrs, current.is_none().then_some(s.tsc));
        if let Some(c) = current {
            let old = msrs_to_entries(&c.msrs, None);
            entries.retain(|e| !old.iter().any(|o| o.index == e.index && o.data == e.data));
        }
        self.set_msrs(&entries)?;
        if current.is_none_or(|c| c.debug != s.debug) {
            self.fd
                .set_debug_regs(&debugregs_to_kvm(&s.debug))
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if !via_sync && events_changed {
            self.fd
                .set_vcpu_events(&events_to_kvm(&events))
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        // Without an in-kernel LAPIC KVM only accepts RUNNABLE; halted is
        // kept in `self.halted`. With one, KVM keeps it.
        if current.is_none() {
            let kernel_halt = self.caps.kernel_irqchip && s.events.halted;
            if let Err(e) = self.fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: if kernel_halt {
                    KVM_MP_STATE_HALTED
                } else {
                    KVM_MP_STATE_RUNNABLE
                },
            }) {
                if self.log_once("mp-state") {
                    log::debug!("kvm: KVM_SET_MP_STATE failed: {e} (logged once)");
                }
            }
        }
        self.halted = s.events.halted && !self.caps.kernel_irqchip;
        self.run_valid = false;
        self.sync_fresh = via_sync;
        self.irq_queued = false;
        Ok(())
    }

    /// Hand writes still waiting in kvm_run's sync-regs area to KVM through
    /// ioctls, before an ioctl that would be overtaken by them at the next
    /// KVM_RUN (KVM_INTERRUPT, KVM_NMI) or that reads state behind them.
    pub(super) fn flush_sync(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.fd.get_kvm_run().kvm_dirty_regs);
        if dirty == 0 {
            return Ok(());
        }
        let sync = self.fd.sync_regs();
        if dirty & u64::from(KVM_SYNC_X86_SREGS) != 0 {
            self.fd
                .set_sregs(&sync.sregs)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        if dirty & u64::from(KVM_SYNC_X86_REGS) != 0 {
            self.fd
                .set_regs(&sync.regs)
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        if dirty & u64::from(KVM_SYNC_X86_EVENTS) != 0 {
            self.fd
                .set_vcpu_events(&sync.events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// A buffer of the size KVM_GET/SET_XSAVE2 use.
    pub(super) fn xsave_buffer(size: usize) -> Result<Xsave> {
        let words = size
            .saturating_sub(std::mem::size_of::<kvm_xsave>())
            .div_ceil(4);
        Xsave::new(words).map_err(fam_err("KVM_GET_XSAVE2"))
    }

    /// The x87/SSE/AVX state and the other XSAVE components (see
    /// [`FpuApi`]; KVM_GET_FPU carries no AVX state).
    pub(super) fn read_fpu(&mut self) -> Result<(FpuState, XState)> {
        let layout = self.caps.xsave_layout;
        match self.caps.fpu {
            FpuApi::Fpu => {
                let k = self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
                Ok((fpu_from_kvm(&k), XState::default()))
            }
            FpuApi::Xsave => {
                let x = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
                Ok(xsave_image_to_state(&x.region, &layout))
            }
            FpuApi::Xsave2(size) => {
                let mut x = Self::xsave_buffer(size)?;
                // SAFETY: `x` holds the `size` bytes KVM_CAP_XSAVE2 reported
                // for this VM (duet enables no XSTATE features dynamically
                // afterwards), so the kernel writes within it.
                unsafe { self.fd.get_xsave2(&mut x) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
                Ok(xsave_image_to_state(
                    &x.as_fam_struct_ref().xsave.region,
                    &layout,
                ))
            }
        }
    }

    /// Replace the x87/SSE/AVX state and the XSAVE components duet carries
    /// (AVX-512, PKRU). Components duet does not know are read first and
    /// written back unchanged.
    pub(super) fn write_fpu(&mut self, f: &FpuState, x: &XState) -> Result<()> {
        let layout = self.caps.xsave_layout;
        match self.caps.fpu {
            FpuApi::Fpu => self
                .fd
                .set_fpu(&fpu_to_kvm(f))
                .map_err(kvm_err("KVM_SET_FPU")),
            FpuApi::Xsave => {
                let mut img = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
                state_to_xsave_image(f, x, &layout, &mut img.region);
                // SAFETY: without KVM_CAP_XSAVE2 (pre-5.17 kernels) KVM
                // reads exactly `sizeof(struct kvm_xsave)` bytes, which `img` is.
                unsafe { self.fd.set_xsave(&img) }.map_err(kvm_err("KVM_SET_XSAVE"))
            }
            FpuApi::Xsave2(size) => {
                let mut img = Self::xsave_buffer(size)?;
                // SAFETY: as in `read_fpu`: `img` has the size KVM reported.
                unsafe { self.fd.get_xsave2(&mut img) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
                // SAFETY: only the fixed-size head of the structure is
                // modified; its length field is left alone.
                let region = unsafe { &mut img.as_mut_fam_struct().xsave.region };
                state_to_xsave_image(f, x, &layout, region);
                // SAFETY: `img` has the size KVM_CAP_XSAVE2 reported, so KVM
                // reads within it.
                unsafe { self.fd.set_xsave2(&img) }.map_err(kvm_err("KVM_SET_XSAVE2"))
            }
        }
    }

    /// Read the MSRs in `indices` that this KVM supports.
    pub(super) fn get_msrs(&mut self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
        let mut want: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| !self.bad_msrs.contains(i))
            .collect();
        loop {
            let entries: Vec<kvm_msr_entry> = want
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = KvmMsrs::from_entries(&entries).map_err(fam_err("KVM_GET_MSRS"))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err("KVM_GET_MSRS"))?;
            if n >= want.len() {
                return Ok(msrs.as_slice().to_vec());
            }
            let bad = want.remove(n);
            self.note_bad_msr(bad, "read");
        }
    }

    /// Write the MSRs in `entries` that this KVM supports.
    pub(super) fn set_msrs(&mut self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut todo: Vec<kvm_msr_entry> = entries
            .iter()
            .copied()
            .filter(|e| !self.bad_msrs.contains(&e.index))
            .collect();
        while !todo.is_empty() {
            let msrs = KvmMsrs::from_entries(&todo).map_err(fam_err("KVM_SET_MSRS"))?;
            let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n >= todo.len() {
                break;
            }
            let bad = todo.remove(n);
            if bad.data != 0 && !self.bad_msrs.contains(&bad.index) {
                // A value that matters is lost in the move to KVM: say so
                // (once per MSR), never drop it silently.
                log::warn!(
                    "kvm: this KVM refuses MSR {:#x} = {:#x}; the guest loses that value \
                     (logged once per MSR)",
                    bad.index,
                    bad.data
                );
            }
            self.note_bad_msr(bad.index, "write");
            todo.drain(..n);
        }
        Ok(())
    }

    pub(super) fn note_bad_msr(&mut self, index: u32, what: &str) {
        if self.bad_msrs.insert(index) {
            log::debug!(
                "kvm: this KVM refuses to {what} MSR {index:#x}; it is not transferred \
                 (logged once)"
            );
        }
    }
}

pub(super) fn fam_err(op: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> BackendError {
    move |e| BackendError::Kvm {
        op,
        source: io::Error::other(format!("{e:?}")),
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, io: &mut dyn Platform) -> Result<VcpuExit> {
        self.kick.unblock_here(&mut self.kick_unblocked_on);
        let r = self.run_loop(io);
        // Whatever this returns answers the kicks made so far; clearing
        // immediate_exit here also ends our own use of it.
        self.kick.consume();
        r
    }

    fn state(&mut self) -> Result<CpuState> {
        self.get_state()
    }

    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.put_state(state, None)
    }

    fn regs(&mut self) -> Result<Regs> {
        if self.sync_fresh {
            return Ok(regs_from_kvm(&self.fd.sync_regs().regs));
        }
        Ok(regs_from_kvm(
            &self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        ))
    }

    fn sregs(&mut self) -> Result<Sregs> {
        if self.sync_fresh {
            return Ok(sregs_from_kvm(&self.fd.sync_regs().sregs));
        }
        Ok(sregs_from_kvm(
            &self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        ))
    }

    /// Always false with the kernel irqchip (KVM injects by itself).
    fn ready_for_interrupt(&mut self) -> bool {
        !self.caps.kernel_irqchip && self.deferred_irq.is_none() && self.ready_for_interrupt_kvm()
    }

    /// An error with the kernel irqchip: raise a line with
    /// [`Backend::set_irq_line`] instead.
    fn inject_interrupt(&mut self, vector: u8) -> Result<()> {
        if self.caps.kernel_irqchip {
            return Err(BackendError::Unsupported(format!(
                "inject_interrupt({vector:#x}): this VM uses KVM's in-kernel irqchip, which \
                 injects interrupts itself; raise an interrupt line with set_irq_line"
            )));
        }
        if self.ready_for_interrupt() {
            self.kvm_interrupt(vector)
        } else {
            if let Some(old) = self.deferred_irq.replace(vector) {
                log::debug!("kvm: interrupt {old:#x} replaced by {vector:#x} before delivery");
            }
            Ok(())
        }
    }

    fn inject_nmi(&mut self) -> Result<()> {
        self.flush_sync()?;
        self.sync_fresh = false;
        self.fd.nmi().map_err(kvm_err("KVM_NMI"))
    }

    /// Ignored with the kernel irqchip (KVM opens its own windows; `run`
    /// never returns `InterruptWindow` then).
    fn request_interrupt_window(&mut self, on: bool) {
        self.window_requested = on && !self.caps.kernel_irqchip;
    }

    fn stats(&self) -> VcpuStats {
        let mut exits: Vec<(String, u64)> = self
            .exits
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        exits.extend(
            self.fallback_counts()
                .into_iter()
                .map(|(m, n)| (format!("fallback:{m}"), n)),
        );
        VcpuStats {
            instructions: None,
            exits,
            interp_fallbacks: self.fallbacks,
            ..Default::default()
        }
    }

    /// Sets `kvm_run.immediate_exit` and signals the vCPU thread if it is
    /// inside `KVM_RUN` (see `KvmKick` in this module); usable from any
    /// thread, also after the vCPU is gone (then it does nothing).
    fn kicker(&self) -> Arc<dyn Kick> {
        self.kick.clone()
    }
}

/// Might executing `i` (or delivering an exception it raises) read or
/// write state beyond regs, sregs and events — FPU/SSE, MSRs, the TSC,
/// debug registers, XCR0? Conservative: only plain integer and system
/// instructions that touch none of these answer false.
pub(super) fn needs_full_state(i: &iced_x86::Instruction, s: &CpuState) -> bool {
    use iced_x86::CpuidFeature as F;
    if s.regs.rflags & cpu_interp::flags::TF != 0 {
        return true; // single-step #DB updates DR6
    }
    let plain = i.cpuid_features().iter().all(|f| {
        matches!(
            f,
            F::INTEL8086
                | F::INTEL8086_ONLY
                | F::INTEL186
                | F::INTEL286
                | F::INTEL286_ONLY
                | F::INTEL386
                | F::INTEL386_ONLY
                | F::INTEL486
                | F::X64
                | F::CMOV
                | F::CX8
                | F::CMPXCHG16B
                | F::POPCNT
                | F::LZCNT
                | F::BMI1
                | F::BMI2
                | F::ADX
                | F::MOVBE
                | F::SMAP
                | F::INVPCID
                | F::CLFSH
                | F::CLFLUSHOPT
                | F::CLWB
                | F::PAUSE
                | F::MULTIBYTENOP
        )
    });
    let touches_dr = (0..i.op_count())
        .any(|n| i.op_kind(n) == iced_x86::OpKind::Register && i.op_register(n).is_dr());
    !plain || touches_dr || matches!(i.mnemonic(), Mnemonic::Swapgs)
}
