//! Opening KVM, its capabilities, the VM (`KvmBackend`: memory, irqchip, CPUID) and the in-kernel irqchip's inputs.

use super::*;

/// A `BackendError::Kvm` for ioctl `op`.
pub(super) fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError {
    move |e| BackendError::Kvm {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM device: `/dev/kvm`, or `$DUET_KVM_DEVICE` when set (tests use it
/// to simulate a host without KVM).
pub(super) fn kvm_device() -> String {
    std::env::var("DUET_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Open the KVM device, explaining failures in terms a user can act on.
pub(super) fn open_kvm() -> std::result::Result<Kvm, String> {
    let path = kvm_device();
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| format!("bad KVM device path {path:?}"))?;
    Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => format!(
            "{path} does not exist: the kvm module is not loaded or the CPU has no hardware \
             virtualization (use --backend interp)"
        ),
        libc::EACCES | libc::EPERM => format!(
            "permission denied opening {path}: add your user to the group owning it (usually \
             `kvm`) or run with access to it (or use --backend interp)"
        ),
        libc::ENXIO | libc::ENODEV => {
            format!("{path} exists but no KVM driver answers behind it (module not loaded?)")
        }
        n => format!("cannot open {path}: {}", io::Error::from_raw_os_error(n)),
    })
}

/// Does this KVM offer coalesced MMIO (`KVM_CAP_COALESCED_MMIO`)?
pub fn coalesced_mmio_supported() -> bool {
    open_kvm().is_ok_and(|k| k.check_extension(Cap::CoalescedMmio))
}

/// Is KVM usable? Opens `/dev/kvm` and checks the API version.
pub fn probe() -> std::result::Result<(), String> {
    let kvm = open_kvm()?;
    check_api_version(&kvm)
}

pub(super) fn check_api_version(kvm: &Kvm) -> std::result::Result<(), String> {
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(()),
        v => Err(format!(
            "/dev/kvm speaks KVM API version {v}; duet needs version {KVM_API_VERSION}"
        )),
    }
}

/// How the x87/SSE state is transferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FpuApi {
    /// KVM_GET/SET_XSAVE with a buffer of this many bytes (KVM_CAP_XSAVE2).
    Xsave2(usize),
    /// KVM_GET/SET_XSAVE with the classic 4 KiB `kvm_xsave` (pre-5.17).
    Xsave,
    /// KVM_GET/SET_FPU, which does not transfer MXCSR.
    Fpu,
}

/// Optional KVM capabilities the vCPUs use.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caps {
    /// KVM_GET/SET_XCRS.
    pub(super) xcrs: bool,
    pub(super) fpu: FpuApi,
    /// Where the XSAVE components beyond x87/SSE sit in KVM's XSAVE image.
    pub(super) xsave_layout: XsaveLayout,
    /// KVM_CAP_SYNC_REGS covers regs, sregs and events: KVM stores them in
    /// kvm_run on every exit, so reading them costs no ioctl.
    pub(super) sync_regs: bool,
    /// KVM's PIC/IOAPIC/LAPIC/PIT serve the guest (`IrqchipKind::Kernel`).
    pub(super) kernel_irqchip: bool,
    /// The machine's MSRs exit to userspace (see [`MACHINE_MSR_RANGES`]).
    pub(super) machine_msrs: bool,
}

/// One VM on KVM.
pub struct KvmBackend {
    // Field order is drop order: the VM fd goes before the memory it maps.
    pub(super) vm: Arc<VmFd>,
    pub(super) caps: Caps,
    pub(super) supported_cpuid: CpuId,
    pub(super) run_size: usize,
    pub(super) irqchip: IrqchipKind,
    /// The CPU model the guest's CPUID is cut down to (`--cpu`).
    pub(super) model: cpu_interp::cpuid::CpuModel,
    /// CPUID.1:ECX.TSC_DEADLINE may be advertised with the kernel irqchip.
    pub(super) kernel_tsc_deadline: bool,
    /// The guest's TSC for duet's LAPIC model (userspace irqchip with the
    /// machine's MSRs): its TSC-deadline timer compares against it, and
    /// TSC-deadline is offered once KVM's TSC frequency is known.
    pub(super) guest_tsc: Option<Arc<KvmGuestTsc>>,
    /// KVM's TSC frequency in kHz; 0 until known (from the VM, else from the
    /// first vCPU).
    pub(super) tsc_khz: AtomicU32,
    /// The guest memory the slots point into (kept alive as long as the VM).
    pub(super) mem: GuestMemory,
}

/// Log `msg` at info level once per process for `key`.
pub(super) fn info_once(key: &'static str, msg: impl FnOnce() -> String) {
    static SEEN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    if SEEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key)
    {
        log::info!("{}", msg());
    }
}

/// Turn on MSR exits for the machine's MSRs (`KVM_CAP_X86_USER_SPACE_MSR`
/// plus an MSR filter over [`MACHINE_MSR_RANGES`]). `Err` says why not;
/// nothing is left enabled then.
pub(super) fn enable_machine_msrs(vm: &VmFd) -> std::result::Result<(), String> {
    if !vm.check_extension(Cap::X86UserSpaceMsr) {
        return Err("this KVM lacks KVM_CAP_X86_USER_SPACE_MSR".into());
    }
    if !vm.check_extension(Cap::X86MsrFilter) {
        return Err("this KVM lacks KVM_CAP_X86_MSR_FILTER".into());
    }
    let user_space_msr = |reasons: u32| kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(reasons), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&user_space_msr(USER_SPACE_MSR_REASONS))
        .map_err(|e| format!("enabling KVM_CAP_X86_USER_SPACE_MSR failed: {e}"))?;
    // A clear bit denies the access, i.e. sends it to userspace.
    let deny = [0u8; 0x100 / 8];
    let ranges = MACHINE_MSR_RANGES.map(|(base, count)| MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base,
        msr_count: count,
        bitmap: &deny[..count.div_ceil(8) as usize],
    });
    if let Err(e) = vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges) {
        let _ = vm.enable_cap(&user_space_msr(0));
        return Err(format!("KVM_X86_SET_MSR_FILTER failed: {e}"));
    }
    Ok(())
}

impl KvmBackend {
    /// Open KVM, create a VM with the default options (userspace irqchip)
    /// and register every region of `mem` as a memory slot.
    pub fn new(mem: &GuestMemory) -> Result<Self> {
        Self::with_options(mem, VmOptions::default())
    }

    /// Whether the machine's MSRs (IA32_APIC_BASE, IA32_TSC_DEADLINE,
    /// x2APIC 0x800–0x8ff) reach the [`Platform`] on this VM. True with the
    /// userspace irqchip on a KVM with `KVM_CAP_X86_USER_SPACE_MSR` and
    /// `KVM_CAP_X86_MSR_FILTER`; only then do the vCPUs' CPUID advertise
    /// x2APIC and TSC-deadline (implemented by the machine's LAPIC model).
    /// False with the kernel irqchip (KVM's LAPIC owns them).
    pub fn machine_msrs_supported(&self) -> bool {
        self.caps.machine_msrs
    }

    /// The interrupt controllers this VM uses.
    pub fn irqchip(&self) -> IrqchipKind {
        self.irqchip
    }

    /// Open KVM, create a VM as `opts` says and register every region of
    /// `mem` as a memory slot. With [`IrqchipKind::Kernel`], KVM's irqchip
    /// and PIT are created here (before any vCPU, as KVM requires);
    /// `BackendError::Unsupported` explains a KVM that refuses them.
    pub fn with_options(mem: &GuestMemory, opts: VmOptions) -> Result<Self> {
        let kvm = open_kvm().map_err(BackendError::KvmUnavailable)?;
        check_api_version(&kvm).map_err(BackendError::KvmUnavailable)?;
        for (cap, name) in [
            (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
            (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(BackendError::KvmUnavailable(format!(
                    "this KVM lacks {name}, which duet needs (host kernel too old?)"
                )));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // KVM_GET/SET_FPU ignore MXCSR, and writing the legacy area without
        // touching XSTATE_BV may be undone by the next XRSTOR: prefer XSAVE.
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let fpu = if xsave2 > 0 {
            FpuApi::Xsave2(xsave2 as usize)
        } else if kvm.check_extension(Cap::Xsave) {
            FpuApi::Xsave
        } else {
            FpuApi::Fpu
        };
        let kernel_irqchip = opts.irqchip == IrqchipKind::Kernel;
        if kernel_irqchip {
            create_kernel_irqchip(&kvm, &vm)?;
        }
        let machine_msrs = !kernel_irqchip
            && match enable_machine_msrs(&vm) {
                Ok(()) => true,
                Err(why) => {
                    info_once("machine-msrs", || {
                        format!(
                            "kvm: {why}: the machine's MSRs (APIC base, TSC deadline, x2APIC) \
                             stay with KVM; x2APIC and TSC-deadline are not advertised to guests"
                        )
                    });
                    false
                }
            };
        let sync_all = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let caps = Caps {
            xcrs: kvm.check_extension(Cap::Xcrs),
            fpu,
            xsave_layout: XsaveLayout::from_cpuid(supported_cpuid.as_slice()),
            sync_regs: vm.check_extension_int(Cap::SyncRegs) as u32 & sync_all == sync_all,
            kernel_irqchip,
            machine_msrs,
        };

        // Real mode on VMX without unrestricted guest needs these; other
        // hosts (KVM-PVM, SVM) do not, and may refuse them.
        if let Err(e) = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR) {
            log::debug!("kvm: KVM_SET_IDENTITY_MAP_ADDR failed ({e}); not needed on this host");
        }
        if let Err(e) = vm.set_tss_address(KVM_TSS_ADDR as usize) {
            log::debug!("kvm: KVM_SET_TSS_ADDR failed ({e}); not needed on this host");
        }

        let max_slots = kvm.get_nr_memslots();
        if mem.num_regions() > max_slots {
            return Err(BackendError::Memory(format!(
                "guest memory has {} regions but KVM offers only {max_slots} memory slots",
                mem.num_regions()
            )));
        }
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| BackendError::Memory(format!("region has no host mapping: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` .. `host + len` is the live mmap of this region
            // of `mem`. A clone of `mem` (which keeps the mappings alive) is
            // held by this backend and by every vCPU created from it, so the
            // mapping outlives every file descriptor through which KVM can
            // reach it.
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| BackendError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        // The VM's TSC frequency (a VM ioctl since Linux 6.0); older
        // kernels answer it per vCPU, so the first vCPU fills it in.
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the
        // frequency or -1; `vm` is a VM fd.
        let khz = unsafe { vmm_sys_util::ioctl::ioctl(&vm, ioctls::KVM_GET_TSC_KHZ()) };
        let khz = u32::try_from(khz).unwrap_or(0);
        let guest_tsc = (!kernel_irqchip && caps.machine_msrs)
            .then(|| Arc::new(KvmGuestTsc::new(u64::from(khz) * 1000)));
        Ok(KvmBackend {
            vm: Arc::new(vm),
            caps,
            supported_cpuid,
            run_size,
            irqchip: opts.irqchip,
            model: opts.cpu,
            kernel_tsc_deadline: kernel_irqchip && kvm.check_extension(Cap::TscDeadlineTimer),
            tsc_khz: AtomicU32::new(khz),
            guest_tsc,
            mem: mem.clone(),
        })
    }

    /// Like [`Backend::create_vcpu`], returning the concrete type.
    pub fn create_kvm_vcpu(&mut self, id: u32) -> Result<KvmVcpu> {
        let mut fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if self.tsc_khz.load(Ordering::Relaxed) == 0 {
            match fd.get_tsc_khz() {
                Ok(khz) => self.tsc_khz.store(khz, Ordering::Relaxed),
                Err(e) => log::debug!("kvm: KVM_GET_TSC_KHZ failed: {e}"),
            }
        }
        let khz = self.tsc_khz.load(Ordering::Relaxed);
        if let Some(tsc) = self.guest_tsc.as_ref().filter(|t| !t.known()) {
            tsc.set_hz(u64::from(khz) * 1000);
        }
        let mut cpuid = self.supported_cpuid.clone();
        // TSC-deadline with duet's LAPIC: its timer compares against the
        // guest's TSC as the guest's RDTSC reads it (`KvmGuestTsc`).
        let (x2apic, tsc_deadline) = if self.caps.kernel_irqchip {
            (true, self.kernel_tsc_deadline)
        } else {
            (
                self.caps.machine_msrs,
                self.guest_tsc.as_ref().is_some_and(|t| t.known()),
            )
        };
        fixup_cpuid(cpuid.as_mut_slice(), id, x2apic, tsc_deadline);
        if !self.caps.kernel_irqchip {
            fixup_tsc_leaves(
                cpuid.as_mut_slice(),
                khz,
                crate::backend::interp::LAPIC_TIMER_HZ,
            );
        }

        apply_cpu_model(cpuid.as_mut_slice(), self.model);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        // What the guest will really see: KVM-PVM puts the host's
        // features back whatever duet asks for.
        let effective = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap_or(cpuid);
        let guest_xcr0 = effective
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .map_or(1, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
        if let Some(extra) = model_overridden(effective.as_slice(), self.model) {
            info_once("cpu-model-overridden", || {
                format!(
                    "kvm: this KVM overrides the guest's CPUID (KVM-PVM does): the guest sees \
                     {extra} beyond --cpu {}; use the interpreter backend for an exact model",
                    self.model
                )
            });
        }
        setup_machine_check(&fd);
        if self.caps.sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
            fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        let coalesced = (self.vm.check_extension(Cap::CoalescedMmio)
            && self.run_size >= (COALESCED_RING_PAGE + 1) * PAGE_SIZE)
            .then(|| {
                let base = NonNull::from(&mut *fd.get_kvm_run()).cast::<u8>();
                // SAFETY: the vCPU mapping is `run_size` bytes long (checked
                // above), so the ring page lies inside it.
                CoalescedRing(unsafe { base.add(COALESCED_RING_PAGE * PAGE_SIZE) })
            });
        let run = fd.get_kvm_run();
        let immediate_exit = NonNull::from(&mut run.immediate_exit);
        let mut vcpu = KvmVcpu {
            coalesced,
            kick: Arc::new(KvmKick::new(immediate_exit)),
            kick_unblocked_on: None,
            fd,
            id,
            caps: self.caps,
            run_size: self.run_size,
            window_requested: false,
            deferred_irq: None,
            irq_queued: false,
            run_valid: false,
            sync_fresh: false,
            halted: false,
            fallback_enabled: true,
            interp: None,
            guest_tsc: self.guest_tsc.clone(),
            guest_xcr0,
            phys_addr_bits: cpuid_phys_addr_bits(effective.as_slice()),
            exits: BTreeMap::new(),
            fallbacks: 0,
            fallback_mnemonics: HashMap::new(),
            logged_codes: HashSet::new(),
            bad_msrs: BTreeSet::new(),
            unowned_msrs: BTreeSet::new(),
            logged: BTreeSet::new(),
            mem: self.mem.clone(),
        };
        let mut reset = CpuState::reset();
        if id != 0 {
            reset.sregs.apic_base &= !(1 << 8); // BSP flag
        }
        vcpu.put_state(&reset, None)?;
        Ok(vcpu)
    }
}

/// Create KVM's PIC, IOAPIC and PIT for `IrqchipKind::Kernel`.
pub(super) fn create_kernel_irqchip(kvm: &Kvm, vm: &VmFd) -> Result<()> {
    let unsupported = |what: &str| {
        BackendError::Unsupported(format!(
            "--irqchip kernel: {what}; this host's KVM cannot provide the in-kernel \
             PIC/IOAPIC/LAPIC/PIT (use --irqchip userspace, duet's own models)"
        ))
    };
    if !kvm.check_extension(Cap::Irqchip) {
        return Err(unsupported("KVM lacks KVM_CAP_IRQCHIP"));
    }
    if !kvm.check_extension(Cap::Pit2) {
        return Err(unsupported("KVM lacks KVM_CAP_PIT2"));
    }
    vm.create_irq_chip()
        .map_err(|e| unsupported(&format!("KVM_CREATE_IRQCHIP failed ({e})")))?;
    let pit = kvm_pit_config {
        flags: KERNEL_PIT_FLAGS,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| unsupported(&format!("KVM_CREATE_PIT2 failed ({e})")))?;
    set_pc_gsi_routing(vm)
        .map_err(|e| unsupported(&format!("KVM_SET_GSI_ROUTING failed ({e})")))?;
    Ok(())
}

/// The PC routing (as on duet's userspace irqchip and in QEMU): GSI n < 16
/// drives PIC input n and IOAPIC pin n, except that GSI 0 (the PIT) drives
/// IOAPIC pin 2 — the MADT's IRQ0 override; GSIs 16–23 drive IOAPIC pins.
pub(super) fn set_pc_gsi_routing(vm: &VmFd) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    use kvm_bindings::{
        kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
        KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQ_ROUTING_IRQCHIP,
    };
    let entry = |gsi: u32, chip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in 0..24u32 {
        if gsi < 8 {
            entries.push(entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        if gsi == 0 {
            entries.push(entry(0, KVM_IRQCHIP_IOAPIC, 2));
        } else if gsi != 2 {
            entries.push(entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
    }
    let routing = KvmIrqRouting::from_entries(&entries)
        .map_err(|_| vmm_sys_util::errno::Error::new(libc::EINVAL))?;
    vm.set_gsi_routing(&routing)
}

/// Adjust KVM's supported CPUID for vCPU `id`: the APIC ID, and x2APIC /
/// TSC-deadline as whichever LAPIC the guest gets implements them.
pub(super) fn fixup_cpuid(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    id: u32,
    x2apic: bool,
    tsc_deadline: bool,
) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24);
                for (bit, on) in [
                    (CPUID1_ECX_X2APIC, x2apic),
                    (CPUID1_ECX_TSC_DEADLINE, tsc_deadline),
                ] {
                    if on {
                        e.ecx |= bit;
                    } else {
                        e.ecx &= !bit;
                    }
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}

/// Leaf 1 ECX bits that are instruction-set extensions (a CPU model
/// decides them): SSE3, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2, MOVBE,
/// POPCNT, AES, XSAVE, OSXSAVE, AVX, F16C, RDRAND.
pub(super) const LEAF1_ECX_ISA: u32 = 0x7ed8_3203;
/// 0x8000_0001 ECX bits that are instruction-set extensions: LAHF_LM, ABM
/// (LZCNT), SSE4A, MisalignSSE, 3DNowPrefetch, XOP, FMA4, TBM.
pub(super) const EXT1_ECX_ISA: u32 = 0x0021_09e1;

/// Cut KVM's CPUID down to CPU model `model` (QEMU's `-cpu x86-64-vN`
/// on KVM does the same): its extensions where the host has them, no
/// leaf-7 or AVX-512 feature beyond it, and only its XSAVE components.
/// `Max` keeps everything KVM offers.
pub(super) fn apply_cpu_model(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    model: cpu_interp::cpuid::CpuModel,
) {
    use cpu_interp::cpuid;
    if model == cpuid::CpuModel::Max {
        return;
    }
    let f = model.features();
    let (l1c, l7b, e1c, d1a) = cpuid::feature_bits(f);
    let xcr0 = cpuid::xcr0_supported(f);
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !LEAF1_ECX_ISA | l1c | cpuid::leaf1_ecx::OSXSAVE,
            (7, 0) => {
                e.ebx &= l7b;
                e.ecx = 0;
                // ARCH_CAPABILITIES is not an instruction-set level: keep
                // it (and KVM's MSR value) when KVM offers it, so a guest
                // on a host that is not affected still sees that.
                e.edx &= cpuid::leaf7_edx::ARCH_CAPABILITIES;
            }
            (7, _) => {
                *e = kvm_bindings::kvm_cpuid_entry2 {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    ..Default::default()
                }
            }
            (0x8000_0001, _) => e.ecx &= !EXT1_ECX_ISA | e1c,
            (0xd, 0) => {
                e.eax &= xcr0 as u32;
                e.edx = 0;
                e.ebx = cpuid::xsave_size(xcr0 & 1);
                e.ecx = cpuid::xsave_size(xcr0);
            }
            (0xd, 1) => {
                e.eax &= d1a;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0xd, i) if i >= 2 && (i >= 64 || xcr0 & (1 << i) == 0) => {
                *e = kvm_bindings::kvm_cpuid_entry2 {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    ..Default::default()
                };
            }
            _ => {}
        }
    }
}

/// The extensions the guest's CPUID (as KVM reports it after
/// KVM_SET_CPUID2) has beyond `model`, named; `None` when it has none.
pub(super) fn model_overridden(
    entries: &[kvm_bindings::kvm_cpuid_entry2],
    model: cpu_interp::cpuid::CpuModel,
) -> Option<String> {
    use cpu_interp::cpuid::{self, feat};
    if model == cpuid::CpuModel::Max {
        return None;
    }
    let get = |f: u32, i: u32| entries.iter().find(|e| e.function == f && e.index == i);
    let want = model.features();
    let names = [
        (feat::SSE3, "sse3"),
        (feat::SSSE3, "ssse3"),
        (feat::CX16, "cx16"),
        (feat::POPCNT, "popcnt"),
        (feat::SSE4_1, "sse4.1"),
        (feat::SSE4_2, "sse4.2"),
        (feat::XSAVE, "xsave"),
        (feat::AVX, "avx"),
        (feat::AVX2, "avx2"),
        (feat::FMA, "fma"),
        (feat::F16C, "f16c"),
        (feat::BMI1, "bmi1"),
        (feat::BMI2, "bmi2"),
        (feat::LZCNT, "lzcnt"),
        (feat::MOVBE, "movbe"),
        (feat::AES, "aes"),
        (feat::PCLMULQDQ, "pclmulqdq"),
    ];
    let l1 = get(1, 0).map_or(0, |e| e.ecx);
    let l7 = get(7, 0).map_or(0, |e| e.ebx);
    let e1 = get(0x8000_0001, 0).map_or(0, |e| e.ecx);
    let extra: Vec<&str> = names
        .iter()
        .filter(|(b, _)| want & b == 0)
        .filter(|(b, _)| {
            let (c, bx, x, _) = cpuid::feature_bits(*b);
            l1 & c != 0 || l7 & bx != 0 || e1 & x != 0
        })
        .map(|(_, n)| *n)
        .chain((l7 & (1 << 16) != 0).then_some("avx512f"))
        .collect();
    (!extra.is_empty()).then(|| extra.join(" "))
}

/// Leaves 0x15/0x16 describe the userspace LAPIC's timer clock as the
/// "core crystal" (Linux takes the APIC timer rate from it) and the host
/// TSC as crystal × EBX / EAX.
pub fn fixup_tsc_leaves(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    tsc_khz: u32,
    crystal_hz: u32,
) {
    if tsc_khz == 0 || crystal_hz < 1000 {
        return;
    }
    let gcd = |mut a: u32, mut b: u32| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a.max(1)
    };
    let crystal_khz = crystal_hz / 1000;
    let g = gcd(tsc_khz, crystal_khz);
    for e in entries.iter_mut() {
        match e.function {
            0x15 => {
                e.eax = crystal_khz / g;
                e.ebx = tsc_khz / g;
                e.ecx = crystal_hz;
                e.edx = 0;
            }
            0x16 => {
                e.eax = tsc_khz / 1000;
                e.ebx = tsc_khz / 1000;
                e.ecx = crystal_hz / 1_000_000;
                e.edx = 0;
            }
            0 => e.eax = e.eax.max(0x16),
            _ => {}
        }
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    /// `KVM_IRQ_LINE` on the in-kernel irqchip: GSIs 0–15 reach the PIC and
    /// the IOAPIC, 16–23 the IOAPIC (KVM's default routing).
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        if self.irqchip != IrqchipKind::Kernel {
            return Err(BackendError::Unsupported(
                "set_irq_line drives KVM's in-kernel irqchip, but this VM uses duet's userspace \
                 irqchip (create it with IrqchipKind::Kernel)"
                    .into(),
            ));
        }
        self.vm
            .set_irq_line(gsi, level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }

    fn irq_sink(&self) -> Option<Arc<dyn crate::backend::GsiSink>> {
        (self.irqchip == IrqchipKind::Kernel)
            .then(|| Arc::new(KvmGsiSink(self.vm.clone())) as Arc<dyn crate::backend::GsiSink>)
    }

    fn coalesced_zones(&self) -> Option<Arc<dyn crate::backend::CoalescedZones>> {
        // Without the capability every write exits; the VMM's own queue
        // still batches.
        self.vm
            .check_extension(Cap::CoalescedMmio)
            .then(|| Arc::new(KvmCoalescedZones(self.vm.clone())) as _)
    }

    fn tsc_khz(&self) -> Option<u32> {
        match self.tsc_khz.load(Ordering::Relaxed) {
            0 => None,
            khz => Some(khz),
        }
    }

    fn guest_tsc(&self) -> Option<Arc<dyn devices::TscSource>> {
        self.guest_tsc
            .clone()
            .map(|t| t as Arc<dyn devices::TscSource>)
    }

    fn phys_addr_bits(&self) -> u32 {
        cpuid_phys_addr_bits(self.supported_cpuid.as_slice())
    }
}

/// KVM's coalesced MMIO zones (`KVM_(UN)REGISTER_COALESCED_MMIO`).
pub(super) struct KvmCoalescedZones(pub(super) Arc<VmFd>);

impl KvmCoalescedZones {
    fn zone_len(len: u64) -> Result<u32> {
        u32::try_from(len).map_err(|_| {
            BackendError::Unsupported(format!("coalesced MMIO range of {len:#x} bytes"))
        })
    }
}

impl crate::backend::CoalescedZones for KvmCoalescedZones {
    fn register(&self, base: u64, len: u64) -> Result<()> {
        self.0
            .register_coalesced_mmio(IoEventAddress::Mmio(base), Self::zone_len(len)?)
            .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO"))
    }

    fn unregister(&self, base: u64, len: u64) -> Result<()> {
        self.0
            .unregister_coalesced_mmio(IoEventAddress::Mmio(base), Self::zone_len(len)?)
            .map_err(kvm_err("KVM_UNREGISTER_COALESCED_MMIO"))
    }
}

/// Drives the in-kernel irqchip's GSIs (`KVM_IRQ_LINE`) from device lines.
pub(super) struct KvmGsiSink(pub(super) Arc<VmFd>);

impl crate::backend::GsiSink for KvmGsiSink {
    fn set_gsi(&self, gsi: u32, level: bool) {
        if let Err(e) = self.0.set_irq_line(gsi, level) {
            log::warn!("kvm: KVM_IRQ_LINE {gsi} failed: {e}");
        }
    }

    fn signal_msi(&self, msi: devices::interrupt::MsiMessage) {
        let m = kvm_bindings::kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        // 0: the kernel's LAPICs refused it (e.g. software-disabled).
        if let Err(e) = self.0.signal_msi(m) {
            log::warn!(
                "kvm: KVM_SIGNAL_MSI {:#x}/{:#x} failed: {e}",
                msi.address,
                msi.data
            );
        }
    }
}
