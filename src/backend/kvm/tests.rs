use super::*;
use vm_memory::{Bytes, GuestAddress};

// ---- conversion round trips (no KVM needed) -------------------------

fn sample_segment(n: u8) -> Segment {
    Segment {
        selector: 0x10 + u16::from(n) * 8,
        base: 0x1000 * u64::from(n) + 0x123,
        limit: 0xfffff + u32::from(n),
        type_: 0x3 | (n & 0x8),
        s: n % 2 == 0,
        dpl: n % 4,
        present: true,
        avl: n % 3 == 0,
        l: n == 1,
        db: n != 1,
        g: n % 2 == 1,
        unusable: n == 7,
    }
}

fn sample_sregs() -> Sregs {
    Sregs {
        cs: sample_segment(1),
        ds: sample_segment(2),
        es: sample_segment(3),
        fs: sample_segment(4),
        gs: sample_segment(5),
        ss: sample_segment(6),
        tr: sample_segment(7),
        ldt: sample_segment(8),
        gdt: DescriptorTable {
            base: 0xffff_8000_0000_1000,
            limit: 0x7f,
        },
        idt: DescriptorTable {
            base: 0xffff_8000_0000_2000,
            limit: 0xfff,
        },
        cr0: 0x8005_0033,
        cr2: 0xdead_beef_0000,
        cr3: 0x12_3000,
        cr4: 0x3606f0,
        cr8: 0xa,
        efer: 0xd01,
        apic_base: 0xfee0_0d00,
    }
}

/// An 80-bit value with the given sign/exponent and mantissa.
fn f80(se: u16, mant: u64) -> [u8; 10] {
    let mut v = [0u8; 10];
    v[..8].copy_from_slice(&mant.to_le_bytes());
    v[8..].copy_from_slice(&se.to_le_bytes());
    v
}

/// An FPU state whose full tag word agrees with the register contents.
fn sample_fpu() -> FpuState {
    let mut st = [[0u8; 10]; 8];
    st[0] = f80(0x3fff, 0x8000_0000_0000_0000); // 1.0: valid
    st[1] = f80(0x0000, 0); // +0: zero
    st[2] = f80(0x7fff, 0xc000_0000_0000_0000); // QNaN: special
    st[3] = f80(0x0000, 0x1234); // denormal: special
    st[4] = f80(0x4000, 0x1234); // unnormal: special
    st[5] = f80(0xc000, 0xc90f_daa2_2168_c235); // -pi: valid
    st[6] = f80(0x1234, 0x5678); // empty (contents kept anyway)
    st[7] = f80(0x3ffe, 0x8000_0000_0000_0001); // valid
                                                // R0 valid, R1 zero, R2 special, R3 special, R4 special, R5 valid,
                                                // R6 empty, R7 valid.
    let ftw = 0b00_11_00_10_10_10_01_00;
    let mut xmm = [0u128; 16];
    for (i, x) in xmm.iter_mut().enumerate() {
        *x = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeffu128.rotate_left(8 * i as u32);
    }
    FpuState {
        st,
        fcw: 0x027f,
        fsw: 5 << 11 | 0x0041, // TOP = 5
        ftw,
        fop: 0x5d9,
        fip: 0xffff_8000_1234_5678,
        fdp: 0x7fff_0000_9abc,
        xmm,
        mxcsr: 0x1fa0,
        ymm_hi: [0; 16],
    }
}

#[test]
fn regs_round_trip() {
    let mut r = Regs::default();
    for (i, g) in r.gpr.iter_mut().enumerate() {
        *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64 + 1) ^ 0x5a;
    }
    r.rip = 0xffff_ffff_8100_0000;
    r.rflags = 0x246;
    let k = regs_to_kvm(&r);
    assert_eq!(k.rbx, r.gpr[cpu_interp::state::gpr::RBX]);
    assert_eq!(k.rsp, r.gpr[cpu_interp::state::gpr::RSP]);
    assert_eq!(regs_from_kvm(&k), r);
}

#[test]
fn segment_and_sregs_round_trip() {
    for n in 0..9 {
        let s = sample_segment(n);
        assert_eq!(segment_from_kvm(&segment_to_kvm(&s)), s);
    }
    let s = sample_sregs();
    let k = sregs_to_kvm(&s);
    assert_eq!(k.interrupt_bitmap, [0; 4]);
    assert_eq!(sregs_from_kvm(&k), s);
}

#[test]
fn fpu_round_trip_and_layout() {
    let f = sample_fpu();
    let k = fpu_to_kvm(&f);
    // ST(0) is R[TOP] = R5, ST(3) is R0.
    assert_eq!(&k.fpr[0][..10], &f.st[5]);
    assert_eq!(&k.fpr[3][..10], &f.st[0]);
    assert_eq!(k.ftwx, 0b1011_1111);
    assert_eq!(k.xmm[1], f.xmm[1].to_le_bytes());
    assert_eq!(fpu_from_kvm(&k), f);
    // The reset state: everything empty.
    let d = FpuState::default();
    assert_eq!(fpu_to_kvm(&d).ftwx, 0);
    assert_eq!(fpu_from_kvm(&fpu_to_kvm(&d)), d);
}

#[test]
fn fxsave_image_round_trip() {
    let f = sample_fpu();
    let mut region = [0u32; 1024];
    region[7] = 0xffff; // MXCSR_MASK: kept
    region[128] = 0x4; // XSTATE_BV: AVX present, kept
    region[200] = 0xdead_beef; // an extended component: untouched
    kvm_fpu_to_fxsave(&fpu_to_kvm(&f), &mut region);
    assert_eq!(region[6], f.mxcsr);
    assert_eq!(region[7], 0xffff);
    assert_eq!(region[128], 0x7);
    assert_eq!(region[200], 0xdead_beef);
    assert_eq!(region[0], u32::from(f.fcw) | u32::from(f.fsw) << 16);
    assert_eq!(fpu_from_kvm(&fxsave_to_kvm_fpu(&region)), f);
}

#[test]
fn xsave_image_round_trip_carries_avx_and_avx512() {
    let mut f = sample_fpu();
    for (i, y) in f.ymm_hi.iter_mut().enumerate() {
        *y = 0xfeed_0000_0000_0000_0000_0000_0000_0000 | i as u128;
    }
    let mut x = XState {
        opmask: [1, 2, 3, 4, 5, 6, 7, u64::MAX],
        ..Default::default()
    };
    x.zmm_hi256[3] = [0x33, 0x34];
    x.hi16_zmm[15] = [1, 2, 3, u128::MAX];
    x.pkru = 0x5555_5554;
    let mut region = [0u32; 1024];
    region[700] = 0xdead_beef; // beyond every carried component: kept
    state_to_xsave_image(&f, &x, &XsaveLayout::STANDARD, &mut region);
    let bv = u64::from(region[128]) | u64::from(region[129]) << 32;
    assert_eq!(bv, xcomp::CARRIED);
    assert_eq!(region[700], 0xdead_beef);
    assert_eq!(region[576 / 4], 0);
    assert_eq!(region[592 / 4 + 3], 0xfeed_0000);
    let (f2, x2) = xsave_image_to_state(&region, &XsaveLayout::STANDARD);
    assert_eq!(f2, f);
    assert_eq!(x2.xinuse, xcomp::CARRIED);
    assert_eq!(XState { xinuse: 0, ..x2 }, x);
    // Components in their initial configuration and not in use stay
    // marked init (so KVM keeps the upper state clean).
    let mut f = sample_fpu();
    f.ymm_hi = [0; 16];
    state_to_xsave_image(&f, &XState::default(), &XsaveLayout::STANDARD, &mut region);
    let bv = u64::from(region[128]) | u64::from(region[129]) << 32;
    assert_eq!(bv, 0b11);
    // A clear XSTATE_BV bit reads as the initial configuration.
    region[576 / 4] = 0x1234;
    let (f3, _) = xsave_image_to_state(&region, &XsaveLayout::STANDARD);
    assert_eq!(f3.ymm_hi, [0; 16]);
}

#[test]
fn full_tags_are_recomputed_from_contents() {
    // A "valid" tag on a zero register comes back as "zero", as FXRSTOR
    // would compute it.
    let mut f = sample_fpu();
    f.ftw &= !(3 << 2); // R1 (which holds +0) tagged valid
    let back = fpu_from_kvm(&fpu_to_kvm(&f));
    assert_eq!((back.ftw >> 2) & 3, 1);
}

#[test]
fn debugregs_round_trip() {
    let d = DebugRegs {
        db: [0x1000, 0x2000, 0xffff_8000_0000_3000, 0x4000],
        dr6: 0xffff_4ff1,
        dr7: 0x0f0f_0455,
    };
    assert_eq!(debugregs_from_kvm(&debugregs_to_kvm(&d)), d);
}

#[test]
fn xcr0_round_trip() {
    for x in [1u64, 3, 7, 0xe7] {
        assert_eq!(xcr0_from_kvm(&xcr0_to_kvm(x)), x);
    }
    assert_eq!(xcr0_from_kvm(&kvm_xcrs::default()), 1);
}

#[test]
fn msrs_round_trip() {
    let m = Msrs {
        star: 0x0023_0010_0000_0000,
        lstar: 0xffff_ffff_8100_0000,
        cstar: 0xffff_ffff_8100_1000,
        sfmask: 0x4_7700,
        kernel_gs_base: 0xffff_8880_0000_0000,
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_0000,
        sysenter_eip: 0xffff_ffff_8100_2000,
        pat: 0x0007_0406_0007_0406,
        tsc_aux: 3,
        misc_enable: 0x851,
        mtrr: Default::default(),
    };
    let entries = msrs_to_entries(&m, Some(123_456));
    assert_eq!(entries.len(), STATE_MSRS.len());
    assert_eq!(
        msrs_from_entries(&entries, Msrs::default()),
        (m, Some(123_456))
    );
    // Without the TSC and with a missing MSR, the base value stays.
    let partial: Vec<_> = msrs_to_entries(&m, None)
        .into_iter()
        .filter(|e| e.index != msr::CSTAR)
        .collect();
    let (back, tsc) = msrs_from_entries(&partial, Msrs::default());
    assert_eq!(tsc, None);
    assert_eq!(back.cstar, Msrs::default().cstar);
    assert_eq!(back.lstar, m.lstar);
}

#[test]
fn events_round_trip() {
    for bits in 0u32..32 {
        let e = PendingEvents {
            interrupt: (bits & 1 != 0).then_some(0x20 + bits as u8),
            nmi_pending: bits & 2 != 0,
            nmi_masked: bits & 4 != 0,
            sti_shadow: bits & 8 != 0,
            mov_ss_shadow: bits & 16 != 0,
            halted: false,
            single_step_pending: bits & 1 == 0 && bits & 2 != 0,
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&e)), e);
    }
}

#[test]
fn cpuid_fixup() {
    let mut entries = [
        kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0008_0800,
            ecx: 0xffff_ffff,
            ..Default::default()
        },
        kvm_bindings::kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            edx: 0,
            ..Default::default()
        },
    ];
    fixup_cpuid(&mut entries, 3, false, false);
    assert_eq!(entries[0].ebx, 0x0308_0800);
    assert_eq!(entries[0].ecx & (1 << 21), 0);
    assert_eq!(entries[0].ecx & (1 << 24), 0);
    assert_eq!(entries[0].ecx | (1 << 21) | (1 << 24), 0xffff_ffff);
    assert_eq!(entries[1].edx, 3);
    entries[0].ecx = 0;
    fixup_cpuid(&mut entries, 3, true, true);
    assert_eq!(entries[0].ecx, (1 << 21) | (1 << 24));
    fixup_cpuid(&mut entries, 3, true, false);
    assert_eq!(entries[0].ecx, 1 << 21);
}

// ---- guests on KVM --------------------------------------------------

/// Returns false (after saying why) when KVM is not usable here.
fn kvm_usable() -> bool {
    crate::backend::kvm_or_skip("kvm backend test")
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Access {
    In(u16, usize),
    Out(u16, Vec<u8>),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    /// An MSR read that reached the machine, and its answer.
    Rdmsr(u32, MsrResult),
    /// An MSR write that reached the machine, and its answer.
    Wrmsr(u32, u64, MsrResult),
}

/// Records every access; requests an exit on writes to `exit_port`.
/// MSRs: the machine owns those in `msrs` (reads return the stored
/// value, writes store) and faults those in `msr_faults`.
#[derive(Default)]
struct Recorder {
    log: Vec<Access>,
    in_value: u32,
    exit_port: Option<u16>,
    requested: bool,
    msrs: BTreeMap<u32, u64>,
    msr_faults: BTreeSet<u32>,
}

impl Recorder {
    fn outs(&self, port: u16) -> Vec<Vec<u8>> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Access::Out(p, d) if *p == port => Some(d.clone()),
                _ => None,
            })
            .collect()
    }
    fn out_bytes(&self, port: u16) -> Vec<u8> {
        self.outs(port).concat()
    }
}

impl Platform for Recorder {
    fn io_read(&mut self, port: u16, data: &mut [u8]) {
        self.log.push(Access::In(port, data.len()));
        let v = self.in_value.to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
        self.in_value = self.in_value.wrapping_add(1);
    }
    fn io_write(&mut self, port: u16, data: &[u8]) {
        self.log.push(Access::Out(port, data.to_vec()));
        if Some(port) == self.exit_port {
            self.requested = true;
        }
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.log.push(Access::MmioRead(addr, data.len()));
        data.fill(0xab);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.log.push(Access::MmioWrite(addr, data.to_vec()));
    }
    fn stop_requested(&self) -> bool {
        self.requested
    }
    fn read_msr(&mut self, msr: u32) -> MsrResult {
        let r = if self.msr_faults.contains(&msr) {
            MsrResult::Fault
        } else {
            self.msrs
                .get(&msr)
                .map_or(MsrResult::Unhandled, |v| MsrResult::Done(*v))
        };
        self.log.push(Access::Rdmsr(msr, r));
        r
    }
    fn write_msr(&mut self, msr: u32, value: u64) -> MsrResult {
        let r = if self.msr_faults.contains(&msr) {
            MsrResult::Fault
        } else if let Some(v) = self.msrs.get_mut(&msr) {
            *v = value;
            MsrResult::Done(0)
        } else {
            MsrResult::Unhandled
        };
        self.log.push(Access::Wrmsr(msr, value, r));
        r
    }
}

const MEM_SIZE: usize = 4 << 20;
const CODE: u64 = 0x9000;
const HANDLERS: u64 = 0x8000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const IDT: u64 = 0xb000;
const TSS: u64 = 0xc000;
const STACK_TOP: u64 = 0x7000;
/// Port the handler stubs write their vector to.
const PORT_EXC: u16 = 0x80;
/// Port the returning handlers (INT3, INT 0x21) write their vector to.
const PORT_HANDLED: u16 = 0x81;
/// Port the main code writes 'E' to when it reaches its end.
const PORT_END: u16 = 0x82;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Real,
    Prot32,
    Long64,
}

struct Rig {
    vcpu: KvmVcpu,
    mem: GuestMemory,
    backend: KvmBackend,
}

/// A VM with default options and one vCPU.
fn rig() -> Rig {
    Rig::with_options(VmOptions::default()).expect("create KVM VM")
}

/// A rig whose vCPU starts in real mode at CODE, where `code` is.
fn real_mode_rig(code: &[u8]) -> Rig {
    let mut rig = rig();
    rig.write(CODE, code);
    rig.vcpu
        .set_state(&CpuState::real_mode_at(0, CODE as u16))
        .unwrap();
    rig
}

impl Rig {
    /// A VM with `opts` and one vCPU (the VM's creation error, so a test
    /// can skip visibly on a KVM without the feature).
    fn with_options(opts: VmOptions) -> Result<Rig> {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut backend = KvmBackend::with_options(&mem, opts)?;
        let vcpu = backend.create_kvm_vcpu(0).expect("create vCPU");
        Ok(Rig { vcpu, mem, backend })
    }

    /// [`Rig::setup`] for `mode`, `code` at CODE and the vCPU in `mode`'s
    /// ring-0 state there.
    fn start(&mut self, mode: Mode, code: &[u8]) {
        self.setup(mode);
        self.write(CODE, code);
        self.vcpu.set_state(&mode_state(mode)).unwrap();
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// Run until something other than an I/O request comes back.
    fn run(&mut self, io: &mut Recorder) -> VcpuExit {
        for _ in 0..100 {
            match self.vcpu.run(io).expect("KVM_RUN") {
                VcpuExit::IoRequest | VcpuExit::Interrupted => io.requested = false,
                e => return e,
            }
        }
        panic!("guest did not stop");
    }

    /// GDT, page tables, IDT and handler stubs for `mode`.
    fn setup(&self, mode: Mode) {
        let gdt: [u64; 4] = [
            0,
            0x00af_9b00_0000_ffff, // 0x08: 64-bit code
            0x00cf_9300_0000_ffff, // 0x10: flat data
            0x00cf_9b00_0000_ffff, // 0x18: 32-bit code
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.write(GDT + 8 * i as u64, &d.to_le_bytes());
        }
        // Identity map of the first 2 MiB with one large page.
        self.write(PML4, &(0x2000u64 | 3).to_le_bytes());
        self.write(0x2000, &(0x3000u64 | 3).to_le_bytes());
        self.write(0x3000, &0x83u64.to_le_bytes());
        for v in 0..256u64 {
            let h = HANDLERS + v * 16;
            let mut stub = vec![0xb0, v as u8]; // mov al, v
            if v == 3 || v == 0x21 {
                stub.extend([0xe6, PORT_HANDLED as u8]); // out PORT_HANDLED, al
                if mode == Mode::Long64 {
                    stub.push(0x48); // iretq
                }
                stub.push(0xcf);
            } else {
                stub.extend([0xe6, PORT_EXC as u8, 0xf4, 0xeb, 0xfd]); // out; hlt; jmp $-1
            }
            self.write(h, &stub);
            match mode {
                Mode::Real => {
                    // IVT at 0: offset, segment 0.
                    self.write(v * 4, &(h as u32).to_le_bytes());
                }
                Mode::Prot32 => {
                    let gate =
                        (h & 0xffff) | (0x18 << 16) | (0x8e00 << 32) | ((h >> 16) & 0xffff) << 48;
                    self.write(IDT + v * 8, &gate.to_le_bytes());
                }
                Mode::Long64 => {
                    let gate =
                        (h & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((h >> 16) & 0xffff) << 48;
                    self.write(IDT + v * 16, &gate.to_le_bytes());
                    self.write(IDT + v * 16 + 8, &(h >> 32).to_le_bytes());
                }
            }
        }
    }
}

fn flat(selector: u16, code: bool, long: bool) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        dpl: 0,
        present: true,
        avl: false,
        l: long,
        db: !long,
        g: true,
        unusable: false,
    }
}

/// Ring-0 state for `mode` starting at CODE.
fn mode_state(mode: Mode) -> CpuState {
    let mut s = CpuState::real_mode_at(0, CODE as u16);
    s.regs.gpr[cpu_interp::state::gpr::RSP] = STACK_TOP;
    s.sregs.idt = DescriptorTable {
        base: if mode == Mode::Real { 0 } else { IDT },
        limit: match mode {
            Mode::Real => 0x3ff,
            Mode::Prot32 => 0x7ff,
            Mode::Long64 => 0xfff,
        },
    };
    if mode == Mode::Real {
        return s;
    }
    let data = flat(0x10, false, false);
    s.sregs.ds = data;
    s.sregs.es = data;
    s.sregs.fs = data;
    s.sregs.gs = data;
    s.sregs.ss = data;
    s.sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 0x1f,
    };
    s.sregs.tr = Segment {
        selector: 0,
        base: TSS,
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    s.sregs.cr0 = 0x11 | 0x20; // PE, ET, NE
    if mode == Mode::Long64 {
        s.sregs.cs = flat(0x08, true, true);
        s.sregs.cr0 |= 1 << 31; // PG
        s.sregs.cr3 = PML4;
        s.sregs.cr4 = 0x20; // PAE
        s.sregs.efer = 0x500; // LME, LMA
    } else {
        s.sregs.cs = flat(0x18, true, false);
    }
    s
}

/// Run `snippet` followed by `mov al,'E'; out PORT_END,al; hlt` at CODE
/// in `mode`. Returns the exit and the recorded accesses.
fn run_snippet(mode: Mode, snippet: &[u8], fallback: bool, cr4: u64) -> (VcpuExit, Recorder, Rig) {
    run_snippet_with(mode, snippet, cr4, |v| v.set_interp_fallback(fallback))
}

/// `run_snippet` with a hook to adjust the vCPU first.
fn run_snippet_with(
    mode: Mode,
    snippet: &[u8],
    cr4: u64,
    tweak: impl FnOnce(&mut KvmVcpu),
) -> (VcpuExit, Recorder, Rig) {
    let mut rig = rig();
    rig.setup(mode);
    let mut code = snippet.to_vec();
    code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
    rig.write(CODE, &code);
    let mut s = mode_state(mode);
    s.sregs.cr4 |= cr4;
    rig.vcpu.set_state(&s).expect("set_state");
    tweak(&mut rig.vcpu);
    let mut io = Recorder::default();
    let exit = rig.run(&mut io);
    (exit, io, rig)
}

/// `--cpu x86-64-v2` on KVM: the guest's CPUID lacks AVX, or (KVM-PVM,
/// which forces the host's CPUID on its guests) duet says which
/// extensions the guest sees beyond the model. The guest executes
/// CPUID in ring 0 here (KVM's emulator answers from its table).
#[test]
fn cpu_model_reaches_the_kvm_guest_or_is_reported_overridden() {
    if !kvm_usable() {
        return;
    }
    let opts = VmOptions {
        cpu: cpu_interp::cpuid::CpuModel::V2,
        ..Default::default()
    };
    let mut rig = Rig::with_options(opts).expect("VM");
    // mov eax, 1 ; cpuid ; mov esi, ecx ; hlt
    rig.start(
        Mode::Long64,
        &[0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x89, 0xce, 0xf4],
    );
    let mut io = Recorder::default();
    assert_eq!(rig.run(&mut io), VcpuExit::Halted);
    let ecx = rig.vcpu.state().unwrap().regs.gpr[cpu_interp::state::gpr::RSI] as u32;
    let effective = rig.vcpu.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let overridden = model_overridden(effective.as_slice(), cpu_interp::cpuid::CpuModel::V2);
    println!("guest CPUID.1:ECX {ecx:#x}; beyond the model: {overridden:?}");
    let avx = ecx & cpu_interp::cpuid::leaf1_ecx::AVX != 0;
    assert_eq!(
        avx,
        overridden.as_deref().is_some_and(|x| x.contains("avx"))
    );
    assert_eq!(
        model_overridden(effective.as_slice(), cpu_interp::cpuid::CpuModel::Max),
        None
    );
}

/// Turn off KVM_CAP_SYNC_REGS use (every transfer through ioctls).
fn without_sync_regs(v: &mut KvmVcpu) {
    v.fd.clear_sync_valid_reg(SyncReg::Register);
    v.fd.clear_sync_valid_reg(SyncReg::SystemRegister);
    v.fd.clear_sync_valid_reg(SyncReg::VcpuEvents);
    v.caps.sync_regs = false;
    v.sync_fresh = false;
}

/// Real mode: single and string port I/O arrive one element at a time.
#[test]
fn real_mode_port_io_per_element() {
    if !kvm_usable() {
        return;
    }
    let code = [
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'A', // mov al, 'A'
        0xee, // out dx, al
        0xbe, 0x00, 0x95, // mov si, 0x9500
        0xb9, 0x05, 0x00, // mov cx, 5
        0xfc, // cld
        0xf3, 0x6e, // rep outsb
        0xb8, 0x34, 0x12, // mov ax, 0x1234
        0xef, // out dx, ax
        0xbe, 0x10, 0x95, // mov si, 0x9510
        0xb9, 0x02, 0x00, // mov cx, 2
        0xf3, 0x6f, // rep outsw
        0xbf, 0x00, 0x96, // mov di, 0x9600
        0xb9, 0x03, 0x00, // mov cx, 3
        0xf3, 0x6c, // rep insb
        0xec, // in al, dx
        0xf4, // hlt
    ];
    let mut rig = real_mode_rig(&code);
    rig.write(0x9500, b"hello");
    rig.write(0x9510, &[1, 2, 3, 4]);
    let mut io = Recorder {
        in_value: 0x41,
        ..Default::default()
    };
    assert_eq!(rig.run(&mut io), VcpuExit::Halted);
    let outs = rig_outs(&io);
    let expect: Vec<Vec<u8>> = vec![
        vec![b'A'],
        vec![b'h'],
        vec![b'e'],
        vec![b'l'],
        vec![b'l'],
        vec![b'o'],
        vec![0x34, 0x12],
        vec![1, 2],
        vec![3, 4],
    ];
    assert_eq!(outs, expect);
    let ins: Vec<&Access> = io
        .log
        .iter()
        .filter(|a| matches!(a, Access::In(..)))
        .collect();
    assert_eq!(ins.len(), 4, "{:?}", io.log);
    assert!(ins.iter().all(|a| **a == Access::In(0x3f8, 1)));
    let mut buf = [0u8; 3];
    rig.mem.read_slice(&mut buf, GuestAddress(0x9600)).unwrap();
    assert_eq!(buf, [0x41, 0x42, 0x43]);
    let s = rig.vcpu.state().unwrap();
    assert_eq!(s.regs.gpr[0] & 0xff, 0x44);
    assert_eq!(s.regs.rip, CODE + code.len() as u64);
    assert!(s.events.halted);
    // Halted stays halted until something wakes it.
    assert_eq!(rig.run(&mut io), VcpuExit::Halted);
    let st = rig.vcpu.stats();
    assert!(st.exits.iter().any(|(k, n)| k == "io" && *n >= 4), "{st:?}");
    assert_eq!(st.interp_fallbacks, 0);
}

fn rig_outs(io: &Recorder) -> Vec<Vec<u8>> {
    io.outs(0x3f8)
}

/// An I/O request completes the instruction and returns IoRequest.
#[test]
fn io_request_completes_the_instruction() {
    if !kvm_usable() {
        return;
    }
    let code = [
        0xb0, 0x07, // mov al, 7
        0xe6, 0xf4, // out 0xf4, al
        0xb0, b'Z', // mov al, 'Z'
        0xe6, 0xe9, // out 0xe9, al
        0xf4, // hlt
    ];
    let mut rig = real_mode_rig(&code);
    let mut io = Recorder {
        exit_port: Some(0xf4),
        ..Default::default()
    };
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
    assert_eq!(rig.vcpu.regs().unwrap().rip, CODE + 4);
    assert_eq!(io.out_bytes(0xf4), vec![7]);
    assert!(io.outs(0xe9).is_empty());
    io.requested = false;
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(0xe9), b"Z");
}

/// External interrupts: injected into a halted CPU, and held back while
/// IF=0 until the interrupt window opens.
#[test]
fn interrupt_injection_and_window() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    rig.setup(Mode::Real);
    // Vector 0x21's stub writes 0x21 to PORT_HANDLED and IRETs.
    let code = [
        0xfb, // sti
        0xf4, // hlt
        0xb0,
        b'B', // mov al, 'B'
        0xe6,
        PORT_END as u8, // out PORT_END, al
        0xfa,           // cli
        0xe6,
        0xf4, // out 0xf4, al (exit request, IF=0)
        0xfb, // sti
        0x90, // nop
        0xb0,
        b'C', // mov al, 'C'
        0xe6,
        PORT_END as u8, // out
        0xfa,           // cli
        0xf4,           // hlt
    ];
    rig.write(CODE, &code);
    let mut s = mode_state(Mode::Real);
    s.regs.rflags = 0x2;
    rig.vcpu.set_state(&s).unwrap();
    let mut io = Recorder {
        exit_port: Some(0xf4),
        ..Default::default()
    };
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert!(rig.vcpu.state().unwrap().events.halted);
    assert!(rig.vcpu.ready_for_interrupt());
    rig.vcpu.inject_interrupt(0x21).unwrap();
    assert!(!rig.vcpu.ready_for_interrupt());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
    assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
    assert_eq!(io.out_bytes(PORT_END), b"B");
    io.requested = false;
    // IF=0 now: the interrupt is held and injected when the window opens.
    assert!(!rig.vcpu.ready_for_interrupt());
    rig.vcpu.inject_interrupt(0x21).unwrap();
    assert_eq!(rig.vcpu.state().unwrap().events.interrupt, Some(0x21));
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21, 0x21]);
    assert_eq!(io.out_bytes(PORT_END), b"BC");
    assert_eq!(rig.vcpu.state().unwrap().events.interrupt, None);
    // Halted with IF=0: only an NMI wakes it (vector 2's stub halts).
    assert!(!rig.vcpu.ready_for_interrupt());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert!(io.outs(PORT_EXC).is_empty());
    rig.vcpu.inject_nmi().unwrap();
    assert!(rig.vcpu.state().unwrap().events.nmi_pending);
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(PORT_EXC), vec![2]);
    let s = rig.vcpu.state().unwrap();
    assert!(
        s.events.nmi_masked && !s.events.nmi_pending,
        "{:?}",
        s.events
    );
}

/// A requested interrupt window comes back once IF is set and the STI
/// shadow has passed; an interrupt injected then is taken at once.
#[test]
fn requested_interrupt_window() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    rig.setup(Mode::Real);
    // The window opens after the STI shadow; hosts that emulate ring 0
    // may report it late, hence the loop.
    #[rustfmt::skip]
    let code = [
        0xb0, b'1', 0xe6, PORT_END as u8, // out '1'
        0xfb, // sti
        0x66, 0xb9, 0x40, 0x0d, 0x03, 0x00, // mov ecx, 200000
        0x66, 0x49, // dec ecx
        0x75, 0xfc, // jnz dec
        0xb0, b'2', 0xe6, PORT_END as u8, // out '2'
        0xfa, // cli
        0xf4, // hlt
    ];
    rig.write(CODE, &code);
    let mut s = mode_state(Mode::Real);
    s.regs.rflags = 0x2;
    rig.vcpu.set_state(&s).unwrap();
    rig.vcpu.request_interrupt_window(true);
    let mut io = Recorder::default();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::InterruptWindow);
    assert!(rig.vcpu.ready_for_interrupt());
    let st = rig.vcpu.state().unwrap();
    assert!(st.regs.rflags & cpu_interp::flags::IF != 0);
    assert!(!st.events.sti_shadow);
    rig.vcpu.request_interrupt_window(false);
    rig.vcpu.inject_interrupt(0x21).unwrap();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    let order: Vec<&Access> = io
        .log
        .iter()
        .filter(|a| matches!(a, Access::Out(p, _) if *p == PORT_END || *p == PORT_HANDLED))
        .collect();
    assert_eq!(
        order,
        [
            &Access::Out(PORT_END, vec![b'1']),
            &Access::Out(PORT_HANDLED, vec![0x21]),
            &Access::Out(PORT_END, vec![b'2']),
        ]
    );
    assert!(rig
        .vcpu
        .stats()
        .exits
        .iter()
        .any(|(k, _)| k == "irq-window"));
}

/// A short window (STI; NOP; OUT; CLI) is still seen: if KVM does not
/// report it itself, the OUT's exit does, after completing the OUT.
#[test]
fn short_interrupt_window_seen_at_an_exit() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    rig.setup(Mode::Real);
    #[rustfmt::skip]
    let code = [
        0xfb, // sti
        0x90, // nop
        0xb0, b'2', 0xe6, PORT_END as u8, // out '2'
        0xfa, // cli
        0xf4, // hlt
    ];
    rig.write(CODE, &code);
    let mut s = mode_state(Mode::Real);
    s.regs.rflags = 0x2;
    rig.vcpu.set_state(&s).unwrap();
    rig.vcpu.request_interrupt_window(true);
    let mut io = Recorder::default();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::InterruptWindow);
    rig.vcpu.request_interrupt_window(false);
    assert!(rig.vcpu.ready_for_interrupt());
    rig.vcpu.inject_interrupt(0x21).unwrap();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
    assert_eq!(io.out_bytes(PORT_END), b"2");
}

/// A kick (immediate_exit) returns Interrupted and is consumed.
#[test]
fn immediate_exit_returns_interrupted() {
    if !kvm_usable() {
        return;
    }
    let mut rig = real_mode_rig(&[0xb0, b'K', 0xe6, PORT_END as u8, 0xf4]);
    rig.vcpu.fd.set_kvm_immediate_exit(1);
    let mut io = Recorder::default();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
    assert!(io.log.is_empty());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(PORT_END), b"K");
    assert!(rig.vcpu.stats().exits.iter().any(|(k, _)| k == "intr"));
}

// ---- kicks ----------------------------------------------------------

/// A kick from another thread ends an in-progress KVM_RUN of a guest
/// spinning on `jmp $` (in real mode and in 64-bit ring 0); the vCPU
/// then runs on. Prints the latency.
#[test]
fn kick_interrupts_a_spinning_guest() {
    use std::time::{Duration, Instant};
    if !kvm_usable() {
        return;
    }
    // (mode, ring 3): KVM-PVM emulates ring-0 code in the host kernel
    // and runs ring 3 natively.
    for (mode, user) in [
        (Mode::Real, false),
        (Mode::Long64, false),
        (Mode::Long64, true),
    ] {
        let mut rig = rig();
        rig.setup(mode);
        // jmp $; mov al, 'E'; out PORT_END, al; hlt
        rig.write(CODE, &[0xeb, 0xfe, 0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        let mut s = mode_state(mode);
        if user {
            // User pages, ring-3 segments, IOPL 3 for the OUT; the HLT
            // at the end faults (#GP stub: out 13, hlt in ring 0).
            rig.write(PML4, &(0x2000u64 | 7).to_le_bytes());
            rig.write(0x2000, &(0x3000u64 | 7).to_le_bytes());
            rig.write(0x3000, &0x87u64.to_le_bytes());
            rig.write(GDT + 0x20, &0x00af_fb00_0000_ffffu64.to_le_bytes());
            rig.write(GDT + 0x28, &0x00cf_f300_0000_ffffu64.to_le_bytes());
            rig.write(TSS + 4, &STACK_TOP.to_le_bytes()); // RSP0
            s.sregs.gdt.limit = 0x2f;
            s.sregs.cs = Segment {
                dpl: 3,
                ..flat(0x23, true, true)
            };
            let data = Segment {
                dpl: 3,
                ..flat(0x2b, false, false)
            };
            s.sregs.ss = data;
            s.sregs.ds = data;
            s.sregs.es = data;
            s.regs.rflags = 0x3002; // IOPL 3
            s.regs.gpr[cpu_interp::state::gpr::RSP] = STACK_TOP - 0x800;
        }
        let mode = format!("{mode:?}{}", if user { " ring 3" } else { "" });
        rig.vcpu.set_state(&s).unwrap();
        let mut io = Recorder::default();
        let mut latencies = Vec::new();
        for round in 0..5 {
            let kicker = rig.vcpu.kicker();
            let (tx, rx) = std::sync::mpsc::channel();
            let done = Arc::new(AtomicBool::new(false));
            let done2 = done.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let at = Instant::now();
                kicker.kick();
                tx.send(at).unwrap();
                // Watchdog: a lost kick fails the test instead of
                // hanging it.
                for _ in 0..200 {
                    if done2.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                kicker.kick();
            });
            let start = Instant::now();
            let exit = rig.vcpu.run(&mut io).unwrap();
            let back = Instant::now();
            done.store(true, Ordering::Relaxed);
            t.join().unwrap();
            let kicked_at = rx.recv().unwrap();
            assert_eq!(exit, VcpuExit::Interrupted, "{mode} round {round}");
            assert!(
                back - start >= Duration::from_millis(40),
                "{mode} round {round}: run returned after {:?}, before the kick",
                back - start
            );
            latencies.push(back.saturating_duration_since(kicked_at));
            assert_eq!(rig.vcpu.regs().unwrap().rip, CODE, "still spinning");
        }
        latencies.sort();
        println!(
            "{mode}: kick latency (kick() to run() returning), 5 rounds: min {:?} median \
             {:?} max {:?}",
            latencies[0], latencies[2], latencies[4]
        );
        assert!(
            latencies[4] < Duration::from_secs(1),
            "{mode}: a kick was lost (the watchdog's kick ended the run): {latencies:?}"
        );
        // No kick is left over: with the loop patched away the guest
        // runs to its end.
        rig.write(CODE, &[0x90, 0x90]);
        assert_eq!(rig.run(&mut io), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_END), b"E", "{mode}: {:?}", io.log);
        let stub = if user { vec![13] } else { vec![] };
        assert_eq!(io.out_bytes(PORT_EXC), stub, "{mode}: {:?}", io.log);
    }
}

/// `run` unblocks the kick signal on a thread that blocked it (here a
/// thread that blocks it before running the vCPU).
#[test]
fn kick_reaches_a_thread_that_blocked_the_signal() {
    use std::time::Duration;
    if !kvm_usable() {
        return;
    }
    let Some(sig) = kick_signal() else {
        println!("kick_reaches_a_thread_that_blocked_the_signal: SKIPPED (no kick signal)");
        return;
    };
    let mut rig = real_mode_rig(&[0xeb, 0xfe]); // jmp $
    let kicker = rig.vcpu.kicker();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        vmm_sys_util::signal::block_signal(sig).unwrap();
        tx.send(()).unwrap();
        let mut io = Recorder::default();
        rig.vcpu.run(&mut io).unwrap()
    });
    rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    kicker.kick();
    for _ in 0..200 {
        if t.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished = t.is_finished();
    if !finished {
        kicker.kick(); // would not help: fail instead of hanging
    }
    assert!(finished, "the kick did not interrupt KVM_RUN");
    assert_eq!(t.join().unwrap(), VcpuExit::Interrupted);
}

/// A kick while the vCPU is outside `run` is answered by the next `run`
/// (once, however many kicks), and a kicker outliving its vCPU is
/// harmless.
#[test]
fn kick_outside_run_is_kept_once() {
    if !kvm_usable() {
        return;
    }
    let mut rig = real_mode_rig(&[0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
    let kicker = rig.vcpu.kicker();
    kicker.kick();
    kicker.kick();
    let mut io = Recorder::default();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
    assert!(io.log.is_empty());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.out_bytes(PORT_END), b"E");
    // A kick while halted is answered by the next return, Halted; it
    // leaves nothing behind.
    kicker.kick();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    drop(rig);
    kicker.kick();
}

/// A kick from inside an I/O handler (as a device thread's kick may
/// land between exits): the instruction completes, then `run` returns.
#[test]
fn kick_between_exits_completes_the_instruction() {
    if !kvm_usable() {
        return;
    }
    struct KickOnOut {
        rec: Recorder,
        kick: Arc<dyn Kick>,
    }
    impl Platform for KickOnOut {
        fn io_read(&mut self, port: u16, data: &mut [u8]) {
            self.rec.io_read(port, data)
        }
        fn io_write(&mut self, port: u16, data: &[u8]) {
            self.rec.io_write(port, data);
            if port == 0x83 {
                self.kick.kick();
            }
        }
        fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
            self.rec.mmio_read(addr, data)
        }
        fn mmio_write(&mut self, addr: u64, data: &[u8]) {
            self.rec.mmio_write(addr, data)
        }
        fn stop_requested(&self) -> bool {
            false
        }
    }
    // out 0x83, al; mov al, 'E'; out PORT_END, al; hlt
    let mut rig = real_mode_rig(&[0xe6, 0x83, 0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
    let mut io = KickOnOut {
        rec: Recorder::default(),
        kick: rig.vcpu.kicker(),
    };
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
    assert_eq!(rig.vcpu.regs().unwrap().rip, CODE + 2);
    assert!(io.rec.outs(PORT_END).is_empty());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.rec.out_bytes(PORT_END), b"E");
}

// ---- the machine's MSRs ---------------------------------------------

/// A real-mode program using the machine's MSRs; results go to port
/// 0x83 as dwords.
fn msr_program() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(16).unwrap();
    let body = |a: &mut CodeAssembler| -> std::result::Result<(), IcedError> {
        // TSC deadline: write, read back.
        a.mov(ecx, MSR_TSC_DEADLINE)?;
        a.mov(eax, 0x1122_3344)?;
        a.mov(edx, 0x55)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.rdmsr()?;
        a.out(0x83, eax)?;
        a.mov(eax, edx)?;
        a.out(0x83, eax)?;
        // x2APIC: read the APIC ID register, write the ICR.
        a.mov(ecx, 0x802)?;
        a.rdmsr()?;
        a.out(0x83, eax)?;
        a.mov(ecx, 0x830)?;
        a.mov(eax, 0x4000)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        // APIC base: read, relocate, read back.
        a.mov(ecx, msr::APIC_BASE)?;
        a.rdmsr()?;
        a.out(0x83, eax)?;
        a.mov(eax, 0xfed0_0900u32 as i32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.rdmsr()?;
        a.out(0x83, eax)?;
        // STAR: KVM's (the interpreter asks the machine first).
        a.mov(ecx, msr::STAR as i32)?;
        a.rdmsr()?;
        a.mov(al, u32::from(b'E'))?;
        a.out(PORT_END as u32, al)?;
        a.hlt()
    };
    body(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// `rdmsr` of `index` (or `wrmsr` of 0 to it), then 'E' and HLT; a #GP
/// shows as vector 13 on PORT_EXC instead.
fn msr_access_program(index: u32, write: bool) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend(index.to_le_bytes()); // mov ecx, index
    code.extend([0x66, 0x31, 0xc0, 0x66, 0x31, 0xd2]); // xor eax,eax; xor edx,edx
    code.extend(if write { [0x0f, 0x30] } else { [0x0f, 0x32] });
    code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
    code
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MsrPath {
    /// KVM with MSR exits.
    KvmExits,
    /// Every instruction through the KVM backend's interpreter fallback
    /// (the machine seen through `IoPlatform`).
    Fallback,
    /// The interpreter backend.
    Interp,
}

/// Run `code` (real mode, IVT stubs) on `path`; the recorder and the
/// final IA32_APIC_BASE as the vCPU state has it. On KVM, checks that
/// the MSRs came through MSR exits.
fn run_msr_path(path: MsrPath, code: &[u8], io: Recorder) -> (Recorder, u64) {
    let (io, apic_base, stats) = run_msr_path_stats(path, code, io);
    if path == MsrPath::KvmExits {
        // Through MSR exits, not through the fallback.
        assert_eq!(stats.interp_fallbacks, 0, "{stats:?}");
        assert!(
            stats
                .exits
                .iter()
                .any(|(k, _)| k == "rdmsr" || k == "wrmsr"),
            "{stats:?}"
        );
    }
    (io, apic_base)
}

/// [`run_msr_path`] plus the KVM vCPU's stats.
fn run_msr_path_stats(path: MsrPath, code: &[u8], mut io: Recorder) -> (Recorder, u64, VcpuStats) {
    let mut rig = rig();
    rig.setup(Mode::Real);
    rig.write(CODE, code);
    let s = mode_state(Mode::Real);
    let apic_base = match path {
        MsrPath::KvmExits => {
            rig.vcpu.set_state(&s).unwrap();
            assert_eq!(rig.run(&mut io), VcpuExit::Halted);
            rig.vcpu.state().unwrap().sregs.apic_base
        }
        MsrPath::Fallback => {
            rig.vcpu.set_state(&s).unwrap();
            let mut steps = 0;
            loop {
                match rig.vcpu.fallback(&mut io, &[]).unwrap() {
                    Next::Continue => {}
                    Next::Return(VcpuExit::Halted) => break,
                    Next::Return(e) => panic!("fallback path: {e:?}"),
                    Next::Serviced => unreachable!(),
                }
                steps += 1;
                assert!(
                    steps < 10_000,
                    "fallback path did not halt: {:?}\n{:?}",
                    &io.log[..io.log.len().min(20)],
                    rig.vcpu.state().unwrap().regs
                );
            }
            rig.vcpu.state().unwrap().sregs.apic_base
        }
        MsrPath::Interp => {
            let mut b = crate::backend::interp::InterpBackend::new(rig.mem.clone());
            let mut v = b.create_vcpu(0).unwrap();
            v.set_state(&s).unwrap();
            loop {
                match v.run(&mut io).unwrap() {
                    VcpuExit::Halted => break,
                    VcpuExit::Interrupted | VcpuExit::IoRequest => {}
                    e => panic!("interpreter: {e:?}"),
                }
            }
            v.state().unwrap().sregs.apic_base
        }
    };
    (io, apic_base, rig.vcpu.stats())
}

/// What the machine saw, without the MSRs KVM implements itself (the
/// interpreter asks the machine about every MSR first; KVM only about
/// the machine's and those it does not know).
fn machine_view(io: &Recorder) -> Vec<Access> {
    io.log
        .iter()
        .filter(|a| !matches!(a, Access::Rdmsr(i, _) | Access::Wrmsr(i, _, _) if *i == msr::STAR))
        .cloned()
        .collect()
}

/// The machine's MSRs reach the Platform through MSR exits, with the
/// same accesses, answers and results as on the KVM fallback path and
/// on the interpreter. Prints which path this host's KVM takes.
#[test]
fn machine_msrs_reach_the_handler() {
    if !kvm_usable() {
        return;
    }
    let supported = rig().backend.machine_msrs_supported();
    println!(
        "this KVM: machine MSR exits {}",
        if supported {
            "supported (KVM_CAP_X86_USER_SPACE_MSR + KVM_X86_SET_MSR_FILTER)"
        } else {
            "NOT supported: the machine's MSRs stay with KVM"
        }
    );
    // CPUID.1:ECX advertises x2APIC exactly then, and TSC-deadline when
    // KVM's TSC frequency is known too (see create_kvm_vcpu).
    // mov eax, 1; cpuid; mov eax, ecx; out 0x83, eax
    let cpuid = [
        0x66, 0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x66, 0x89, 0xc8, 0x66, 0xe7, 0x83,
    ];
    let (exit, io, rig) = run_snippet(Mode::Real, &cpuid, true, 0);
    assert_eq!(exit, VcpuExit::Halted);
    let b = io.out_bytes(0x83);
    let ecx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    assert_eq!(
        ecx & (CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE),
        match (supported, rig.backend.tsc_khz().is_some()) {
            (false, _) => 0,
            (true, false) => CPUID1_ECX_X2APIC,
            (true, true) => CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE,
        },
        "CPUID.1:ECX {ecx:#x}"
    );
    if !supported {
        return;
    }

    let code = msr_program();
    for own_apic_base in [false, true] {
        let recorder = || {
            let mut r = Recorder::default();
            r.msrs.insert(MSR_TSC_DEADLINE, 0);
            r.msrs.insert(0x802, 0x0300_0000);
            r.msrs.insert(0x830, 0);
            if own_apic_base {
                r.msrs.insert(msr::APIC_BASE, 0xfee0_0900);
            }
            r
        };
        let mut results = Vec::new();
        for path in [MsrPath::KvmExits, MsrPath::Fallback, MsrPath::Interp] {
            let (io, apic_base) = run_msr_path(path, &code, recorder());
            assert_eq!(io.out_bytes(PORT_END), b"E", "{path:?}: {:?}", io.log);
            assert!(io.outs(PORT_EXC).is_empty(), "{path:?}: {:?}", io.log);
            let outs: Vec<u32> = io
                .outs(0x83)
                .iter()
                .map(|d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
                .collect();
            assert_eq!(
                outs,
                [0x1122_3344, 0x55, 0x0300_0000, 0xfee0_0900, 0xfed0_0900],
                "{path:?} (machine owns APIC base: {own_apic_base})"
            );
            assert_eq!(apic_base, 0xfed0_0900, "{path:?}");
            assert_eq!(io.msrs.get(&0x830), Some(&0x4000), "{path:?}");
            let star_asked = io
                .log
                .iter()
                .any(|a| matches!(a, Access::Rdmsr(i, _) if *i == msr::STAR));
            assert_eq!(star_asked, path != MsrPath::KvmExits, "{path:?}");
            results.push((path, machine_view(&io)));
        }
        for (path, view) in &results[1..] {
            assert_eq!(
                view, &results[0].1,
                "{path:?} and KvmExits disagree (machine owns APIC base: {own_apic_base})"
            );
        }
        if own_apic_base {
            assert!(results[0].1.contains(&Access::Wrmsr(
                msr::APIC_BASE,
                0xfed0_0900,
                MsrResult::Done(0)
            )));
        }
    }

    // Faults: the machine's Fault, and an MSR nobody implements, are
    // #GP on every path.
    for (index, write) in [(0x8ff, false), (0x8ff, true), (0x1234_5678, false)] {
        let code = msr_access_program(index, write);
        let mut views = Vec::new();
        for path in [MsrPath::KvmExits, MsrPath::Fallback, MsrPath::Interp] {
            let mut r = Recorder::default();
            r.msr_faults.insert(0x8ff);
            let (io, _) = run_msr_path(path, &code, r);
            assert_eq!(io.out_bytes(PORT_EXC), vec![13], "{path:?} {index:#x}");
            assert!(io.outs(PORT_END).is_empty(), "{path:?} {index:#x}");
            views.push(machine_view(&io));
        }
        assert_eq!(views[0].len(), 2, "{index:#x}: {:?}", views[0]);
        assert!(
            views.iter().all(|v| *v == views[0]),
            "{index:#x}: {views:?}"
        );
    }
}

// ---- the in-kernel irqchip ------------------------------------------

/// `--irqchip kernel`: the VM gets KVM's PIC (its ports never reach the
/// handler), an interrupt line raised from another thread wakes a
/// guest halted in the kernel, and userspace injection is refused.
#[test]
fn kernel_irqchip_runs_a_guest() {
    use std::time::Duration;
    if !kvm_usable() {
        return;
    }
    let opts = VmOptions {
        irqchip: IrqchipKind::Kernel,
        ..VmOptions::default()
    };
    let mut rig = match Rig::with_options(opts) {
        Ok(r) => r,
        Err(e) => {
            println!("this KVM has no in-kernel irqchip: {e}");
            assert!(matches!(e, BackendError::Unsupported(ref m) if m.contains("irqchip")));
            return;
        }
    };
    println!("this KVM: in-kernel irqchip and PIT created");
    assert_eq!(rig.backend.irqchip(), IrqchipKind::Kernel);
    assert!(!rig.backend.machine_msrs_supported());
    #[rustfmt::skip]
    let code = [
        0xb0, 0x11, 0xe6, 0x20, // ICW1
        0xb0, 0x20, 0xe6, 0x21, // ICW2: vectors 0x20..
        0xb0, 0x04, 0xe6, 0x21, // ICW3
        0xb0, 0x01, 0xe6, 0x21, // ICW4
        0xb0, 0xfd, 0xe6, 0x21, // mask all but IRQ1
        0xe4, 0x21, 0xe6, 0x83, // in al, 0x21; out 0x83, al
        0xb0, b'R', 0xe6, PORT_END as u8, // ready
        0xfb, 0xf4, // sti; hlt (in the kernel)
        0xb0, b'E', 0xe6, PORT_END as u8,
        0xe6, 0xf4, // exit request
        0xfa, 0xf4,
    ];
    rig.start(Mode::Real, &code);
    assert!(!rig.vcpu.ready_for_interrupt());
    assert!(matches!(
        rig.vcpu.inject_interrupt(0x21),
        Err(BackendError::Unsupported(_))
    ));
    let mut io = Recorder {
        exit_port: Some(0xf4),
        ..Default::default()
    };
    let kicker = rig.vcpu.kicker();
    let (backend, vcpu) = (&rig.backend, &mut rig.vcpu);
    let done = AtomicBool::new(false);
    let done = &done;
    let exit = std::thread::scope(|sc| {
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            backend.set_irq_line(1, true).unwrap();
            backend.set_irq_line(1, false).unwrap();
            // Watchdog: a guest that never wakes is kicked out.
            for _ in 0..500 {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            kicker.kick();
        });
        let exit = vcpu.run(&mut io);
        done.store(true, Ordering::Relaxed);
        exit
    })
    .unwrap();
    assert_eq!(exit, VcpuExit::IoRequest, "{:?}", io.log);
    assert_eq!(io.out_bytes(0x83), vec![0xfd], "PIC mask read back");
    assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
    assert_eq!(io.out_bytes(PORT_END), b"RE");
    assert!(
        !io.log.iter().any(|a| matches!(a,
            Access::In(p, _) | Access::Out(p, _) if matches!(p, 0x20 | 0x21))),
        "PIC ports reached userspace: {:?}",
        io.log
    );
    assert!(!rig.vcpu.stats().exits.iter().any(|(k, _)| k == "hlt"));
    assert!(rig.backend.tsc_khz().is_some());

    // `cli; hlt` waits in the kernel for good; a kick shows it halted.
    io.requested = false;
    let kicker = rig.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    let exit = rig.vcpu.run(&mut io).unwrap();
    t.join().unwrap();
    assert_eq!(exit, VcpuExit::Halted);
    let s = rig.vcpu.state().unwrap();
    assert!(s.events.halted, "{:?}", s.events);
    assert_eq!(s.regs.rflags & cpu_interp::flags::IF, 0);
    assert_eq!(s.regs.rip, CODE + code.len() as u64);
    // Running on is the same wait.
    let kicker = rig.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        kicker.kick();
    });
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    t.join().unwrap();
    // An NMI wakes it (vector 2's stub reports and halts again).
    rig.vcpu.inject_nmi().unwrap();
    let kicker = rig.vcpu.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    t.join().unwrap();
    assert_eq!(io.out_bytes(PORT_EXC), vec![2]);
}

/// set_irq_line needs the kernel irqchip.
#[test]
fn set_irq_line_needs_the_kernel_irqchip() {
    if !kvm_usable() {
        return;
    }
    let rig = rig();
    let e = rig.backend.set_irq_line(4, true).unwrap_err();
    assert!(matches!(e, BackendError::Unsupported(_)), "{e}");
}

/// KVM's TSC frequency is known and plausible.
#[test]
fn tsc_khz_is_plausible() {
    if !kvm_usable() {
        return;
    }
    let rig = rig();
    let khz = rig.backend.tsc_khz().expect("TSC frequency");
    println!("this KVM: TSC {khz} kHz");
    assert!(khz > 100_000, "{khz} kHz");
}

/// MMIO from KVM and from the fallback reaches the same handler.
#[test]
fn mmio_from_kvm_and_from_the_fallback() {
    if !kvm_usable() {
        return;
    }
    let code = [
        0xa1, 0x00, 0x00, 0x00, 0xc0, // mov eax, [0xc0000000]
        0xa3, 0x10, 0x00, 0x00, 0xc0, // mov [0xc0000010], eax
        0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x00, 0x00, 0xc0, // popcnt eax, [0xc0000000]
        0xe7, 0x83, // out 0x83, eax
    ];
    let (exit, io, rig) = run_snippet(Mode::Prot32, &code, true, 0);
    assert_eq!(exit, VcpuExit::Halted);
    let mmio: Vec<&Access> = io
        .log
        .iter()
        .filter(|a| matches!(a, Access::MmioRead(..) | Access::MmioWrite(..)))
        .collect();
    assert_eq!(
        mmio,
        [
            &Access::MmioRead(0xc000_0000, 4),
            &Access::MmioWrite(0xc000_0010, vec![0xab; 4]),
            &Access::MmioRead(0xc000_0000, 4),
        ]
    );
    assert_eq!(io.out_bytes(0x83), vec![20, 0, 0, 0]);
    assert_eq!(io.out_bytes(PORT_END), b"E");
    let st = rig.vcpu.stats();
    assert!(
        st.exits.iter().any(|(k, n)| k == "mmio" && *n >= 2),
        "{st:?}"
    );
    assert!(rig
        .vcpu
        .fallback_counts()
        .contains(&("popcnt".to_string(), 1)));
}

/// The fallback completes an instruction whose I/O asks for the VMM.
#[test]
fn fallback_io_request_returns_at_once() {
    if !kvm_usable() {
        return;
    }
    // popcnt eax, [0xc0000000] (refused, MMIO read); then 'E'.
    let code = [0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x00, 0x00, 0xc0];
    let mut rig = rig();
    let mut bytes = code.to_vec();
    bytes.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
    rig.start(Mode::Prot32, &bytes);
    struct ExitOnMmio(Recorder);
    impl Platform for ExitOnMmio {
        fn io_read(&mut self, port: u16, data: &mut [u8]) {
            self.0.io_read(port, data)
        }
        fn io_write(&mut self, port: u16, data: &[u8]) {
            self.0.io_write(port, data)
        }
        fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
            self.0.mmio_read(addr, data);
            self.0.requested = true;
        }
        fn mmio_write(&mut self, addr: u64, data: &[u8]) {
            self.0.mmio_write(addr, data)
        }
        fn stop_requested(&self) -> bool {
            self.0.requested
        }
    }
    let mut io = ExitOnMmio(Recorder::default());
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
    let s = rig.vcpu.state().unwrap();
    assert_eq!(s.regs.rip, CODE + code.len() as u64);
    assert_eq!(s.regs.gpr[0], 20);
    io.0.requested = false;
    // The write-back may still sit in kvm_run's sync area: an NMI queued
    // now must neither be lost nor undo it.
    rig.vcpu.inject_nmi().unwrap();
    assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.0.out_bytes(PORT_EXC), vec![2]);
    let mut frame = [0u8; 4];
    rig.mem
        .read_slice(&mut frame, GuestAddress(STACK_TOP - 12))
        .unwrap();
    assert_eq!(u32::from_le_bytes(frame) as u64, CODE + code.len() as u64);
    assert_eq!(
        rig.vcpu.state().unwrap().regs.gpr[0],
        2,
        "AL from the NMI stub"
    );
}

/// A distinctive protected-mode state survives KVM unchanged.
#[test]
fn state_round_trip_through_kvm() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    let mut s = mode_state(Mode::Prot32);
    for (i, g) in s.regs.gpr.iter_mut().enumerate() {
        *g = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);
    }
    s.regs.rip = 0x9123;
    s.regs.rflags = 0x2 | 0x1 | 0x40 | 0x800; // CF ZF OF, IF clear
    s.sregs.ldt = Segment {
        selector: 0,
        base: 0x5000,
        limit: 0xff,
        type_: 2,
        present: true,
        ..Default::default()
    };
    s.sregs.gdt = DescriptorTable {
        base: 0x500,
        limit: 0x1f,
    };
    s.sregs.idt = DescriptorTable {
        base: 0xb000,
        limit: 0x7ff,
    };
    s.sregs.cr2 = 0x1234_5678;
    s.sregs.cr3 = 0x40_3000;
    s.sregs.cr4 = 0x610; // PSE? no: OSFXSR | OSXMMEXCPT | PSE-less
    s.sregs.cr8 = 5;
    s.sregs.efer = 0x1; // SCE
    s.msrs = Msrs {
        star: 0x0023_0010_0000_0000,
        lstar: 0xffff_ffff_8100_0000,
        cstar: 0xffff_ffff_8100_1000,
        sfmask: 0x4_7700,
        kernel_gs_base: 0xffff_8880_0000_0000,
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_0000,
        sysenter_eip: 0xffff_ffff_8100_2000,
        pat: 0x0007_0106_0007_0406,
        tsc_aux: 3,
        misc_enable: 1,
        mtrr: Default::default(),
    };
    s.fpu = sample_fpu();
    s.debug = DebugRegs {
        db: [0x1000, 0x2000, 0x3000, 0x4000],
        dr6: 0xffff_0ff1,
        dr7: 0x0000_0401,
    };
    s.events.nmi_masked = true;
    s.events.mov_ss_shadow = true;
    s.tsc = 1_000_000_000;
    rig.vcpu.set_state(&s).unwrap();
    let back = rig.vcpu.state().unwrap();
    assert_eq!(back.regs, s.regs);
    assert_eq!(back.sregs, s.sregs, "sregs");
    assert_eq!(back.msrs, s.msrs, "msrs");
    assert_eq!(back.fpu, s.fpu, "fpu");
    assert_eq!(back.debug, s.debug, "debug");
    assert_eq!(back.xcr0, s.xcr0);
    assert_eq!(back.events, s.events, "events");
    // KVM-PVM accepts TSC writes but ignores them (the guest reads the
    // host TSC); elsewhere the written value must come back.
    if back.tsc < s.tsc || back.tsc > s.tsc + 100_000_000_000 {
        let mut again = s;
        again.tsc = s.tsc * 7;
        rig.vcpu.set_state(&again).unwrap();
        let t2 = rig.vcpu.state().unwrap().tsc;
        assert!(
            t2 >= back.tsc && t2 < back.tsc + 100_000_000_000,
            "TSC writes neither take effect nor are ignored consistently: wrote {}, read {}; \
             wrote {}, read {t2}",
            s.tsc,
            back.tsc,
            again.tsc
        );
        println!(
            "note: this KVM ignores TSC writes (read {} after writing {})",
            back.tsc, s.tsc
        );
    }
}

/// A long-mode state with XCR0, high segment bases and a queued
/// interrupt (IF set: handed to KVM) survives KVM unchanged.
#[test]
fn long_mode_state_round_trip_through_kvm() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    let mut s = mode_state(Mode::Long64);
    s.regs.rip = 0xffff_ffff_8000_1234;
    s.regs.rflags = 0x202;
    s.regs.gpr[cpu_interp::state::gpr::R13] = 0x1313_1313_1313_1313;
    s.sregs.fs.base = 0x7fff_1234_5000;
    s.sregs.gs.base = 0xffff_8880_0001_0000;
    s.sregs.ds = Segment {
        unusable: true,
        ..Segment::default()
    };
    s.sregs.cr4 |= (1 << 9) | (1 << 10) | (1 << 18) | (1 << 7); // OSFXSR OSXMMEXCPT OSXSAVE PGE
    s.sregs.efer |= 0x800 | 0x1; // NXE SCE
    s.sregs.cr8 = 0xf;
    s.xcr0 = 3;
    s.events.interrupt = Some(0x30);
    s.msrs.lstar = 0xffff_ffff_8100_0040;
    rig.vcpu.set_state(&s).unwrap();
    let back = rig.vcpu.state().unwrap();
    assert_eq!(back.regs, s.regs);
    assert_eq!(back.sregs, s.sregs);
    assert_eq!(back.xcr0, 3);
    assert_eq!(back.msrs, s.msrs);
    assert_eq!(back.events, s.events);
    assert!(!rig.vcpu.ready_for_interrupt(), "an interrupt is queued");
}

/// INT3 and INT n, which KVM-PVM refuses in ring 0 of protected and
/// long mode, run on the interpreter; the handlers (on KVM) IRET back.
#[test]
fn fallback_executes_refused_instructions() {
    if !kvm_usable() {
        return;
    }
    for (mode, sync) in [Mode::Real, Mode::Prot32, Mode::Long64]
        .into_iter()
        .flat_map(|m| [(m, true), (m, false)])
    {
        // int3; int 0x21; xor ecx,ecx; xgetbv; out 0x83, al
        let snippet = [0xcc, 0xcd, 0x21, 0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xe6, 0x83];
        let (exit, io, rig) = run_snippet_with(mode, &snippet, 1 << 18, |v| {
            if !sync {
                without_sync_regs(v)
            }
        });
        let real = mode == Mode::Real;
        let mode = format!("{mode:?} sync regs {sync}");
        assert_eq!(exit, VcpuExit::Halted, "{mode:?}");
        assert_eq!(io.out_bytes(PORT_HANDLED), vec![3, 0x21], "{mode:?}");
        assert_eq!(io.out_bytes(0x83), vec![1], "{mode:?}: XCR0 low byte");
        assert_eq!(io.out_bytes(PORT_END), b"E", "{mode:?}");
        assert!(io.outs(PORT_EXC).is_empty(), "{mode:?}: {:?}", io.log);
        let st = rig.vcpu.stats();
        assert!(st.interp_fallbacks >= 1, "{mode:?}: {st:?}");
        assert!(
            st.exits.iter().any(|(k, _)| k == "fallback:xgetbv"),
            "{mode:?}: {st:?}"
        );
        if !real {
            assert!(st.interp_fallbacks >= 3, "{mode:?}: {st:?}");
            let counts = rig.vcpu.fallback_counts();
            assert!(counts.contains(&("int3".to_string(), 1)), "{counts:?}");
            assert!(counts.contains(&("int".to_string(), 1)), "{counts:?}");
        }
    }
}

/// KVM-PVM refuses the XSAVE family in ring 0; the fallback runs it over
/// every state component the guest's CPUID offers (AVX-512 included
/// where KVM forces it in), and the state survives the trips between
/// KVM's XSAVE image and the interpreter.
#[test]
fn fallback_runs_xsave_and_xrstor_over_every_component() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    rig.setup(Mode::Long64);
    let xcr0 = rig.vcpu.guest_xcr0 & xcomp::CARRIED;
    println!("guest XCR0 components: {xcr0:#x}");
    #[rustfmt::skip]
    let mut code = vec![
        0xbb, 0x00, 0x00, 0x01, 0x00, // mov ebx, 0x10000
        0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, -1
        0x89, 0xc2, // mov edx, eax
        0x48, 0x0f, 0xae, 0x23, // xsave64 [rbx]
        0x48, 0x0f, 0xae, 0xab, 0x00, 0x10, 0x00, 0x00, // xrstor64 [rbx+0x1000]
    ];
    // xor ecx, ecx ; xgetbv ; mov esi, eax (XCR0 after the init restore)
    code.extend([0x31, 0xc9, 0x0f, 0x01, 0xd0, 0x89, 0xc6]);
    // mov eax, -1 ; xrstor64 [rbx] ; hlt
    code.extend([0xb8, 0xff, 0xff, 0xff, 0xff, 0x48, 0x0f, 0xae, 0x2b, 0xf4]);
    rig.write(CODE, &code);
    rig.write(0x10000, &[0u8; 0x3000]);
    let mut s = mode_state(Mode::Long64);
    s.sregs.cr4 |= (1 << 9) | (1 << 18); // OSFXSR, OSXSAVE
    s.xcr0 = xcr0;
    s.fpu = sample_fpu();
    for (k, y) in s.fpu.ymm_hi.iter_mut().enumerate() {
        *y = (0xa5a5_u128 << 112) | k as u128;
    }
    if xcr0 & 0xe0 == 0xe0 {
        s.xstate.opmask = [1, 2, 3, 4, 5, 6, 7, 8];
        s.xstate.zmm_hi256[2] = [0x22, 0x23];
        s.xstate.hi16_zmm[9] = [9, 10, 11, 12];
    }
    if xcr0 & (1 << 9) != 0 {
        s.xstate.pkru = 0x55;
    }
    rig.vcpu.set_state(&s).unwrap();
    let mut io = Recorder::default();
    assert_eq!(rig.run(&mut io), VcpuExit::Halted, "{:?}", io.log);
    let back = rig.vcpu.state().unwrap();
    assert_eq!(
        back.regs.gpr[cpu_interp::state::gpr::RSI],
        xcr0 & 0xffff_ffff
    );
    assert_eq!(back.fpu.xmm, s.fpu.xmm);
    assert_eq!(back.fpu.ymm_hi, s.fpu.ymm_hi);
    assert_eq!(back.fpu.mxcsr, s.fpu.mxcsr);
    assert_eq!(back.fpu.st, s.fpu.st);
    assert_eq!(
        XState {
            xinuse: 0,
            ..back.xstate
        },
        XState {
            xinuse: 0,
            ..s.xstate
        }
    );
    // The image the guest saved has AVX (and AVX-512) where the
    // standard format puts them.
    let mut img = vec![0u8; 2696];
    rig.mem.read_slice(&mut img, GuestAddress(0x10000)).unwrap();
    let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
    assert_eq!(bv & 7, 7);
    assert_eq!(img[576 + 16 * 3 + 15], 0xa5);
    if xcr0 & 0xe0 == 0xe0 {
        assert_eq!(bv & 0xe0, 0xe0);
        assert_eq!(img[1088 + 8 * 7], 8);
        assert_eq!(img[1152 + 32 * 2 + 16], 0x23);
        assert_eq!(img[1664 + 64 * 9 + 48], 12);
    }
    let counts = rig.vcpu.fallback_counts();
    println!("{counts:?}");
    assert!(counts.iter().any(|(m, _)| m == "xsave64"), "{counts:?}");
    assert!(
        counts.iter().any(|(m, n)| m == "xrstor64" && *n == 2),
        "{counts:?}"
    );
}

/// An instruction neither KVM nor the interpreter executes ends the run
/// with a message naming it.
#[test]
fn unimplemented_everywhere_is_unrecoverable() {
    if !kvm_usable() {
        return;
    }
    // RDPRU: KVM-PVM refuses it in ring 0 and the interpreter does not
    // implement it (an AMD instruction duet never advertises).
    assert!(!cpu_interp::dispatch::implemented(Code::Rdpru));
    for mode in [Mode::Real, Mode::Long64] {
        let (exit, io, rig) = run_snippet(mode, &[0x0f, 0x01, 0xfd], true, 0);
        let VcpuExit::Shutdown(ShutdownReason::Unrecoverable(msg)) = exit else {
            panic!("{mode:?}: expected an unrecoverable shutdown, got {exit:?}");
        };
        println!("{msg}");
        assert!(msg.contains("`rdpru"), "{msg}");
        assert!(msg.contains("0f 01 fd"), "{msg}");
        assert!(msg.contains(&format!("RIP={CODE:#018x}")), "{msg}");
        assert!(msg.contains("CR0="), "{msg}");
        assert!(msg.contains("RAX="), "{msg}");
        assert!(io.outs(PORT_END).is_empty());
        assert_eq!(rig.vcpu.stats().interp_fallbacks, 0);
    }
}

/// The x87/SSE state set through the backend is what the guest sees
/// (FXSAVE), and what the guest loads (FXRSTOR) is what the backend reads.
#[test]
fn fpu_state_reaches_the_guest_and_back() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    rig.setup(Mode::Long64);
    let code = [
        0xbb, 0x00, 0x98, 0x00, 0x00, // mov ebx, 0x9800
        0x48, 0x0f, 0xae, 0x03, // fxsave64 [rbx]
        0x48, 0x0f, 0xae, 0x8b, 0x00, 0x02, 0x00, 0x00, // fxrstor64 [rbx+0x200]
        0xf4, // hlt
    ];
    rig.write(CODE, &code);
    let mut loaded = sample_fpu();
    loaded.xmm.reverse();
    loaded.mxcsr = 0x1f80 | 0x3f;
    loaded.fsw = 2 << 11;
    loaded.fcw = 0x037f;
    let mut image = [0u32; 1024];
    kvm_fpu_to_fxsave(&fpu_to_kvm(&loaded), &mut image);
    rig.write(0x9a00, &region_bytes(&image, 512));
    let mut s = mode_state(Mode::Long64);
    s.sregs.cr4 |= 1 << 9; // OSFXSR
    s.fpu = sample_fpu();
    rig.vcpu.set_state(&s).unwrap();
    let mut io = Recorder::default();
    assert_eq!(rig.run(&mut io), VcpuExit::Halted);
    let mut saved = [0u8; 512];
    rig.mem
        .read_slice(&mut saved, GuestAddress(0x9800))
        .unwrap();
    let words: Vec<u32> = saved
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let seen = fpu_from_kvm(&fxsave_to_kvm_fpu(&words));
    assert_eq!(seen.xmm, s.fpu.xmm, "XMM as the guest saw them");
    assert_eq!(seen.mxcsr, s.fpu.mxcsr, "MXCSR as the guest saw it");
    assert_eq!(seen.st, s.fpu.st);
    assert_eq!(
        (seen.fcw, seen.fsw, seen.ftw),
        (s.fpu.fcw, s.fpu.fsw, s.fpu.ftw)
    );
    let back = rig.vcpu.state().unwrap().fpu;
    assert_eq!(back.xmm, loaded.xmm);
    assert_eq!(back.mxcsr, loaded.mxcsr);
    assert_eq!(back.st, loaded.st);
    assert_eq!(
        (back.fcw, back.fsw, back.ftw),
        (loaded.fcw, loaded.fsw, loaded.ftw)
    );
}

/// The three ways of transferring the x87/SSE state agree (KVM_GET/SET_FPU
/// except for MXCSR, which that interface does not carry).
#[test]
fn fpu_transfer_interfaces_agree() {
    if !kvm_usable() {
        return;
    }
    let mut rig = rig();
    let native = rig.vcpu.caps.fpu;
    println!("this KVM: {native:?}");
    for (round, api) in [FpuApi::Xsave2(4096), FpuApi::Xsave, FpuApi::Fpu]
        .into_iter()
        .enumerate()
    {
        if matches!(api, FpuApi::Xsave2(_)) && !matches!(native, FpuApi::Xsave2(_)) {
            continue;
        }
        if api == FpuApi::Xsave && native == FpuApi::Fpu {
            continue;
        }
        let api = match api {
            FpuApi::Xsave2(_) => native,
            a => a,
        };
        let mut f = sample_fpu();
        f.xmm[0] = 0x1234_0000 + round as u128; // differs per round
        rig.vcpu.caps.fpu = api;
        rig.vcpu.write_fpu(&f, &XState::default()).unwrap();
        rig.vcpu.caps.fpu = native;
        let mut back = rig.vcpu.read_fpu().unwrap().0;
        if api == FpuApi::Fpu {
            back.mxcsr = f.mxcsr;
        }
        assert_eq!(back, f, "written with {api:?}");
        rig.vcpu.caps.fpu = api;
        let mut again = rig.vcpu.read_fpu().unwrap().0;
        rig.vcpu.caps.fpu = native;
        if api == FpuApi::Fpu {
            again.mxcsr = f.mxcsr;
        }
        assert_eq!(again, f, "read with {api:?}");
    }
}

/// Cost of one fallback, against the same loop without it.
/// `cargo test -p duet --lib fallback_cost -- --ignored --nocapture`.
#[test]
#[ignore = "timing; prints numbers"]
fn fallback_cost() {
    if !kvm_usable() {
        return;
    }
    const N: u32 = 20_000;
    for (name, body) in [
        ("add", [0x01u8, 0xd0, 0x90, 0x90]),  // add eax, edx
        ("popcnt", [0xf3, 0x0f, 0xb8, 0xc2]), // popcnt eax, edx
    ] {
        let mut code = vec![0xb9];
        code.extend(N.to_le_bytes()); // mov ecx, N
        code.extend(body);
        code.extend([0xff, 0xc9, 0x75, 0xf8]); // dec ecx; jnz body
        for mode in [Mode::Prot32, Mode::Long64] {
            let t = std::time::Instant::now();
            let (exit, _io, rig) = run_snippet(mode, &code, true, 0);
            let dt = t.elapsed();
            assert_eq!(exit, VcpuExit::Halted);
            println!(
                "{mode:?} {name} x{N}: {:.1} µs/iteration, fallbacks {}",
                dt.as_secs_f64() * 1e6 / f64::from(N),
                rig.vcpu.stats().interp_fallbacks
            );
        }
    }
}

/// Which instructions does this KVM refuse, per mode, and does the
/// fallback cover them? Informational:
/// `cargo test -p duet --lib survey_refusals -- --ignored --nocapture`.
#[test]
#[ignore = "survey of the host's KVM; prints a table"]
fn survey_refusals() {
    use iced_x86::code_asm::*;
    if !kvm_usable() {
        return;
    }
    type Emit = fn(&mut CodeAssembler, u32) -> std::result::Result<(), IcedError>;
    fn m(bits: u32) -> AsmMemoryOperand {
        if bits == 64 {
            ptr(rbx)
        } else {
            ptr(ebx)
        }
    }
    const OSFXSR: u64 = 1 << 9;
    const OSXSAVE: u64 = 1 << 18;
    const ALL: u8 = 7;
    const NOT64: u8 = 3;
    const ONLY64: u8 = 4;
    let cases: Vec<(&str, u8, u64, u64, Emit)> = vec![
        ("nop", ALL, 0, 1, |a, _| a.nop()),
        ("add/sub/imul/div", ALL, 0, 1, |a, _| {
            a.mov(eax, 100)?;
            a.add(eax, 5)?;
            a.imul_3(eax, eax, 3)?;
            a.xor(edx, edx)?;
            a.mov(ecx, 7)?;
            a.div(ecx)
        }),
        ("int3", ALL, 0, 1, |a, _| a.int3()),
        ("int 0x21", ALL, 0, 1, |a, _| a.int(0x21)),
        ("int1", ALL, 0, 1, |a, _| a.int1()),
        ("into (OF=0)", NOT64, 0, 1, |a, _| a.into()),
        ("ud2", ALL, 0, 1, |a, _| a.ud2()),
        ("cpuid", ALL, 0, 1, |a, _| {
            a.xor(eax, eax)?;
            a.cpuid()
        }),
        ("rdtsc", ALL, 0, 1, |a, _| a.rdtsc()),
        ("rdtscp", ALL, 0, 1, |a, _| a.rdtscp()),
        ("rdpid", ALL, 0, 1, |a, b| {
            if b == 64 {
                a.rdpid(rax)
            } else {
                a.rdpid(eax)
            }
        }),
        ("rdrand", ALL, 0, 1, |a, _| a.rdrand(eax)),
        ("rdseed", ALL, 0, 1, |a, _| a.rdseed(eax)),
        ("rdpru", ALL, 0, 1, |a, _| {
            a.xor(ecx, ecx)?;
            a.rdpru()
        }),
        ("rdmsr STAR", ALL, 0, 1, |a, _| {
            a.mov(ecx, 0xc000_0081u32 as i32)?;
            a.rdmsr()
        }),
        ("wrmsr STAR", ALL, 0, 1, |a, _| {
            a.mov(ecx, 0xc000_0081u32 as i32)?;
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.wrmsr()
        }),
        ("mov cr3 (rw)", NOT64, 0, 1, |a, _| {
            a.mov(eax, cr3)?;
            a.mov(cr3, eax)
        }),
        ("mov cr3 (rw) 64", ONLY64, 0, 1, |a, _| {
            a.mov(rax, cr3)?;
            a.mov(cr3, rax)
        }),
        ("mov dr7", NOT64, 0, 1, |a, _| {
            a.mov(eax, dr7)?;
            a.mov(dr7, eax)
        }),
        ("sgdt+lgdt", ALL, 0, 1, |a, b| {
            a.sgdt(m(b))?;
            a.lgdt(m(b))
        }),
        ("sidt+lidt", ALL, 0, 1, |a, b| {
            a.sidt(m(b))?;
            a.lidt(m(b))
        }),
        ("smsw/str/sldt", ALL, 0, 1, |a, _| {
            a.smsw(eax)?;
            a.str(eax)?;
            a.sldt(eax)
        }),
        ("invlpg", ALL, 0, 1, |a, b| a.invlpg(m(b))),
        ("wbinvd", ALL, 0, 1, |a, _| a.wbinvd()),
        ("pushf/popf/cli/sti", ALL, 0, 1, |a, _| {
            a.pushf()?;
            a.cli()?;
            a.popf()?;
            a.sti()?;
            a.cli()
        }),
        ("pause/fences", ALL, 0, 1, |a, _| {
            a.pause()?;
            a.lfence()?;
            a.mfence()?;
            a.sfence()
        }),
        ("clflush", ALL, 0, 1, |a, b| a.clflush(m(b))),
        ("clflushopt", ALL, 0, 1, |a, b| a.clflushopt(m(b))),
        ("clwb", ALL, 0, 1, |a, b| a.clwb(m(b))),
        ("clac", ALL, 0, 1, |a, _| a.clac()),
        ("stac", ALL, 0, 1, |a, _| a.stac()),
        ("invpcid type 2", ALL, 0, 1, |a, b| {
            a.mov(eax, 2)?;
            a.xor(ecx, ecx)?;
            a.mov(dword_ptr(m(b)), ecx)?;
            a.mov(dword_ptr(m(b) + 4), ecx)?;
            a.mov(dword_ptr(m(b) + 8), ecx)?;
            a.mov(dword_ptr(m(b) + 12), ecx)?;
            if b == 64 {
                a.invpcid(rax, m(b))
            } else {
                a.invpcid(eax, m(b))
            }
        }),
        ("movbe", ALL, 0, 1, |a, b| a.movbe(eax, dword_ptr(m(b)))),
        ("cmpxchg8b", ALL, 0, 1, |a, b| a.cmpxchg8b(m(b))),
        ("lock cmpxchg8b", ALL, 0, 1, |a, b| a.lock().cmpxchg8b(m(b))),
        ("cmpxchg16b", ONLY64, 0, 1, |a, b| a.cmpxchg16b(m(b))),
        ("lock cmpxchg16b", ONLY64, 0, 1, |a, b| {
            a.lock().cmpxchg16b(m(b))
        }),
        ("lock xadd/bts/cmpxchg", ALL, 0, 1, |a, b| {
            a.lock().xadd(dword_ptr(m(b)), eax)?;
            a.lock().bts(dword_ptr(m(b)), 3)?;
            a.lock().cmpxchg(dword_ptr(m(b)), ecx)?;
            a.xchg(dword_ptr(m(b)), eax)
        }),
        ("rep movsb/stosd", ALL, 0, 1, |a, b| {
            a.cld()?;
            if b == 64 {
                a.mov(rsi, rbx)?;
                a.lea(rdi, ptr(rbx + 0x100))?;
            } else {
                a.mov(esi, ebx)?;
                a.lea(edi, ptr(ebx + 0x100))?;
            }
            a.mov(ecx, 16)?;
            if b == 16 {
                a.db(&[0x67, 0xf3, 0xa4])?; // rep movsb with 32-bit addresses
                a.mov(ecx, 4)?;
                a.db(&[0x67, 0x66, 0xf3, 0xab]) // rep stosd
            } else {
                a.rep().movsb()?;
                a.mov(ecx, 4)?;
                a.rep().stosd()
            }
        }),
        ("bsf/bsr/bswap/cmov/setcc", ALL, 0, 1, |a, _| {
            a.mov(eax, 0x80)?;
            a.bsf(ecx, eax)?;
            a.bsr(edx, eax)?;
            a.bswap(eax)?;
            a.cmovz(eax, ecx)?;
            a.setnz(al)
        }),
        ("popcnt", ALL, 0, 1, |a, _| a.popcnt(eax, ecx)),
        ("lzcnt/tzcnt", ALL, 0, 1, |a, _| {
            a.lzcnt(eax, ecx)?;
            a.tzcnt(eax, ecx)
        }),
        ("andn/bextr/shlx/rorx", ALL, 0, 1, |a, _| {
            a.andn(eax, ecx, edx)?;
            a.bextr(eax, ecx, edx)?;
            a.shlx(eax, ecx, edx)?;
            a.rorx(eax, ecx, 3)
        }),
        ("adcx/adox", ALL, 0, 1, |a, _| {
            a.adcx(eax, ecx)?;
            a.adox(eax, ecx)
        }),
        ("crc32", ALL, 0, 1, |a, _| a.crc32(eax, ecx)),
        ("fninit/fld1/fadd/fstp", ALL, 0, 1, |a, b| {
            a.fninit()?;
            a.fld1()?;
            a.fld1()?;
            a.faddp(st1, st0)?;
            a.fstp(qword_ptr(m(b)))
        }),
        ("fnstcw/fldcw", ALL, 0, 1, |a, b| {
            a.fnstcw(word_ptr(m(b)))?;
            a.fldcw(word_ptr(m(b)))
        }),
        ("fxsave/fxrstor", ALL, OSFXSR, 1, |a, b| {
            a.fxsave(m(b))?;
            a.fxrstor(m(b))
        }),
        ("movaps/pxor/paddd", ALL, OSFXSR, 1, |a, _| {
            a.movaps(xmm1, xmm0)?;
            a.pxor(xmm0, xmm0)?;
            a.paddd(xmm0, xmm1)
        }),
        ("movdqu mem", ALL, OSFXSR, 1, |a, b| {
            a.movdqu(xmm0, xmmword_ptr(m(b)))?;
            a.movdqu(xmmword_ptr(m(b)), xmm0)
        }),
        ("pshufb/aesenc/pclmul", ALL, OSFXSR, 1, |a, _| {
            a.pshufb(xmm0, xmm1)?;
            a.aesenc(xmm0, xmm1)?;
            a.pclmulqdq(xmm0, xmm1, 0)
        }),
        ("ldmxcsr/stmxcsr", ALL, OSFXSR, 1, |a, b| {
            a.stmxcsr(dword_ptr(m(b)))?;
            a.ldmxcsr(dword_ptr(m(b)))
        }),
        ("cvtsi2sd/sqrtsd/addsd", ALL, OSFXSR, 1, |a, _| {
            a.cvtsi2sd(xmm0, eax)?;
            a.sqrtsd(xmm1, xmm0)?;
            a.addsd(xmm0, xmm1)
        }),
        ("xgetbv", ALL, OSXSAVE, 1, |a, _| {
            a.xor(ecx, ecx)?;
            a.xgetbv()
        }),
        ("xsetbv 1", ALL, OSXSAVE, 1, |a, _| {
            a.xor(ecx, ecx)?;
            a.mov(eax, 1)?;
            a.xor(edx, edx)?;
            a.xsetbv()
        }),
        ("xsave", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
            a.mov(eax, 3)?;
            a.xor(edx, edx)?;
            a.xsave(m(b))
        }),
        ("xsaveopt", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
            a.mov(eax, 3)?;
            a.xor(edx, edx)?;
            a.xsaveopt(m(b))
        }),
        ("xrstor (zeroed area)", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
            a.mov(eax, 3)?;
            a.xor(edx, edx)?;
            a.xrstor(m(b))
        }),
        (
            "vpxor ymm / vzeroupper",
            ALL,
            OSXSAVE | OSFXSR,
            7,
            |a, _| {
                a.vpxor(ymm0, ymm1, ymm2)?;
                a.vzeroupper()
            },
        ),
        ("vmovdqu ymm mem", ALL, OSXSAVE | OSFXSR, 7, |a, b| {
            a.vmovdqu(ymm0, ymmword_ptr(m(b)))
        }),
        ("vpxord zmm", ONLY64, OSXSAVE | OSFXSR, 0xe7, |a, _| {
            a.vpxord(zmm0, zmm1, zmm2)
        }),
        ("swapgs", ONLY64, 0, 1, |a, _| {
            a.swapgs()?;
            a.swapgs()
        }),
        ("lar/lsl/verr", NOT64, 0, 1, |a, _| {
            a.mov(ecx, 0x10)?;
            a.lar(eax, ecx)?;
            a.lsl(eax, ecx)?;
            a.verr(cx)
        }),
        ("lahf/sahf/cbw/cwd/xlat", NOT64, 0, 1, |a, _| {
            a.lahf()?;
            a.sahf()?;
            a.cbw()?;
            a.cwd()?;
            a.xor(eax, eax)?;
            a.xlatb()
        }),
        ("enter/leave", ALL, 0, 1, |a, _| {
            a.enter(16, 0)?;
            a.leave()
        }),
        ("in al,0x61", ALL, 0, 1, |a, _| a.in_(al, 0x61)),
        ("hlt-less far ret? (call/ret)", ALL, 0, 1, |a, _| {
            let mut l = a.create_label();
            a.call(l)?;
            let mut end = a.create_label();
            a.jmp(end)?;
            a.set_label(&mut l)?;
            a.ret()?;
            a.set_label(&mut end)?;
            a.nop()
        }),
    ];
    let mut summary = Vec::new();
    for mode in [Mode::Real, Mode::Prot32, Mode::Long64] {
        let (bit, bits) = match mode {
            Mode::Real => (1u8, 16u32),
            Mode::Prot32 => (2, 32),
            Mode::Long64 => (4, 64),
        };
        for (name, modes, cr4_bits, xcr0_bits, emit) in &cases {
            if modes & bit == 0 {
                continue;
            }
            let mut a = CodeAssembler::new(bits).unwrap();
            a.mov(ebx, 0x9800).unwrap();
            if let Err(e) = emit(&mut a, bits) {
                println!("{mode:?} {name}: (does not assemble: {e})");
                continue;
            }
            let bytes = a.assemble(CODE).unwrap();
            let outcome = |fallback: bool| {
                let mut rig = rig();
                rig.setup(mode);
                let mut code = bytes.clone();
                code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
                rig.write(CODE, &code);
                let mut s = mode_state(mode);
                s.sregs.cr4 |= cr4_bits;
                s.xcr0 = *xcr0_bits;
                if let Err(e) = rig.vcpu.set_state(&s) {
                    return format!("set_state failed: {e}");
                }
                rig.vcpu.set_interp_fallback(fallback);
                let mut io = Recorder::default();
                let exit = rig.run(&mut io);
                let fb = rig.vcpu.fallback_counts();
                match exit {
                    VcpuExit::Shutdown(ShutdownReason::Unrecoverable(msg)) => {
                        let dis = msg
                            .lines()
                            .find_map(|l| l.trim().strip_prefix("instruction at RIP: "))
                            .map(str::to_string)
                            .unwrap_or_else(|| msg.lines().next().unwrap_or("").to_string());
                        if msg.starts_with("KVM could not emulate") {
                            format!("REFUSED `{dis}`")
                        } else {
                            format!("UNRECOVERABLE {}", msg.lines().next().unwrap_or(""))
                        }
                    }
                    VcpuExit::Halted if !io.outs(PORT_END).is_empty() => {
                        if fb.is_empty() {
                            "ok".into()
                        } else {
                            format!("ok via fallback {fb:?}")
                        }
                    }
                    VcpuExit::Halted if !io.outs(PORT_EXC).is_empty() => {
                        format!("exception {:?} fb {fb:?}", io.out_bytes(PORT_EXC))
                    }
                    e => format!("{e:?} {:?}", io.log),
                }
            };
            let raw = outcome(false);
            let line = if raw.starts_with("REFUSED") {
                format!("{raw} -> with fallback: {}", outcome(true))
            } else {
                raw
            };
            println!("{mode:?} {name}: {line}");
            summary.push(line);
        }
    }
    assert!(!summary.is_empty());
}

/// How a [`level_reassert_probe`] guest writes its local APIC's EOI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EoiPath {
    /// The xAPIC page (MMIO 0xfee000b0).
    XapicMmio,
    /// x2APIC mode, WRMSR 0x80b.
    X2apicMsr,
}

/// What [`level_reassert_probe`] saw.
#[derive(Debug)]
struct ReassertProbe {
    /// Interrupts the guest's handler took (2 = the EOI while the line
    /// was still asserted brought the second delivery).
    deliveries: u32,
    /// The guest hung in HLT waiting for the second one (the watchdog
    /// kicked it out).
    hung: bool,
    /// KVM's IOAPIC redirection entry for the pin afterwards, and its IRR bit.
    entry: u64,
    ioapic_irr: bool,
    /// KVM's local APIC: the vector's IRR, ISR and TMR bits afterwards.
    lapic_irr: bool,
    lapic_isr: bool,
    lapic_tmr: bool,
}

/// A 32-bit guest on KVM's in-kernel irqchip routes IOAPIC pin `gsi`
/// level-triggered to vector 0x40; the host asserts the line; the handler
/// writes the EOI *while the line is still asserted* (through `eoi`) and
/// only then asks the host to lower it. An IOAPIC must deliver the vector
/// a second time (remote IRR clears at the EOI with the line high); the
/// guest waits for that second delivery in `sti; hlt`, with a 2 s
/// watchdog. Returns what happened and KVM's irqchip state afterwards.
fn level_reassert_probe(
    gsi: u32,
    eoi: EoiPath,
    warmup: bool,
    read_entry: bool,
    lower_first: bool,
) -> Option<ReassertProbe> {
    use iced_x86::code_asm::*;
    use std::time::Duration;
    const VECTOR: u32 = 0x40;
    const COUNT: u64 = 0x9f00;
    const HANDLER: u64 = 0xa000;
    const WARMUP_VECTOR: u32 = 0x34;
    const WARMUP_COUNT: u64 = 0x9f10;
    const WARMUP_HANDLER: u64 = 0xa400;
    const PORT_LOWER_FIRST: u16 = 0x87;
    const PORT_ASSERT: u16 = 0x84;
    const PORT_LOWER: u16 = 0x85;
    const PORT_DONE: u16 = 0x86;
    const LAPIC: u64 = 0xfee0_0000;
    const IOAPIC: u64 = 0xfec0_0000;
    let opts = VmOptions {
        irqchip: IrqchipKind::Kernel,
        ..VmOptions::default()
    };
    let Ok(mut rig) = Rig::with_options(opts) else {
        return None;
    };
    let asm = |body: &dyn Fn(&mut CodeAssembler) -> std::result::Result<(), IcedError>, at: u64| {
        let mut a = CodeAssembler::new(32).unwrap();
        body(&mut a).unwrap();
        a.assemble(at).unwrap()
    };
    let main = asm(
        &|a| {
            a.mov(al, 0xff)?;
            a.out(0x21, al)?;
            a.out(0xa1, al)?;
            match eoi {
                EoiPath::XapicMmio => a.mov(dword_ptr(LAPIC + 0xf0), 0x1ff)?,
                EoiPath::X2apicMsr => {
                    a.mov(ecx, 0x1b)?;
                    a.rdmsr()?;
                    a.or(eax, 0xc00)?;
                    a.wrmsr()?;
                    a.mov(ecx, 0x80f)?;
                    a.mov(eax, 0x1ff)?;
                    a.xor(edx, edx)?;
                    a.wrmsr()?;
                }
            }
            let rte = 0x10 + 2 * gsi;
            a.mov(dword_ptr(IOAPIC), rte + 1)?;
            a.mov(dword_ptr(IOAPIC + 0x10), 0)?;
            if warmup {
                // One ordinary level interrupt first (source lowered, then
                // EOI) on another vector.
                a.mov(dword_ptr(IOAPIC), rte)?;
                a.mov(dword_ptr(IOAPIC + 0x10), 0x8000 | WARMUP_VECTOR)?;
                a.out(PORT_ASSERT as u32, al)?;
                let mut wait = a.create_label();
                a.set_label(&mut wait)?;
                a.sti()?;
                a.hlt()?;
                a.cli()?;
                a.cmp(dword_ptr(WARMUP_COUNT), 1)?;
                a.jb(wait)?;
            }
            a.mov(dword_ptr(IOAPIC), rte)?;
            a.mov(dword_ptr(IOAPIC + 0x10), 0x8000 | VECTOR)?;
            a.out(PORT_ASSERT as u32, al)?;
            let mut wait = a.create_label();
            a.set_label(&mut wait)?;
            a.sti()?;
            a.hlt()?;
            a.cli()?;
            a.cmp(dword_ptr(COUNT), if lower_first { 1 } else { 2 })?;
            a.jb(wait)?;
            if lower_first {
                // Give a second delivery (if any is pending) the chance
                // to arrive: interrupts enabled for a while, no HLT.
                a.mov(ecx, 10_000)?;
                let mut spin = a.create_label();
                a.sti()?;
                a.set_label(&mut spin)?;
                a.pause()?;
                a.dec(ecx)?;
                a.jnz(spin)?;
                a.cli()?;
            }
            a.out(PORT_DONE as u32, al)?;
            a.hlt()
        },
        CODE,
    );
    let handler = asm(
        &|a| {
            a.push(eax)?;
            a.push(ecx)?;
            a.push(edx)?;
            a.inc(dword_ptr(COUNT))?;
            if lower_first {
                // The usual order: end the source, then EOI.
                a.out(PORT_LOWER_FIRST as u32, al)?;
            }
            match eoi {
                EoiPath::XapicMmio => a.mov(dword_ptr(LAPIC + 0xb0), 0)?,
                EoiPath::X2apicMsr => {
                    a.mov(ecx, 0x80b)?;
                    a.xor(eax, eax)?;
                    a.xor(edx, edx)?;
                    a.wrmsr()?;
                }
            }
            if read_entry {
                // As irq-level-eoi's handler does: read the pin's
                // redirection entry between the EOI and the source's end.
                a.mov(dword_ptr(IOAPIC), 0x10 + 2 * gsi)?;
                a.mov(eax, dword_ptr(IOAPIC + 0x10))?;
            }
            a.mov(eax, dword_ptr(COUNT))?;
            a.out(PORT_LOWER as u32, al)?;
            a.pop(edx)?;
            a.pop(ecx)?;
            a.pop(eax)?;
            a.iretd()
        },
        HANDLER,
    );
    let warmup_handler = asm(
        &|a| {
            a.push(eax)?;
            a.push(ecx)?;
            a.push(edx)?;
            a.inc(dword_ptr(WARMUP_COUNT))?;
            a.out(PORT_LOWER_FIRST as u32, al)?;
            match eoi {
                EoiPath::XapicMmio => a.mov(dword_ptr(LAPIC + 0xb0), 0)?,
                EoiPath::X2apicMsr => {
                    a.mov(ecx, 0x80b)?;
                    a.xor(eax, eax)?;
                    a.xor(edx, edx)?;
                    a.wrmsr()?;
                }
            }
            a.pop(edx)?;
            a.pop(ecx)?;
            a.pop(eax)?;
            a.iretd()
        },
        WARMUP_HANDLER,
    );
    rig.start(Mode::Prot32, &main);
    rig.write(HANDLER, &handler);
    rig.write(WARMUP_HANDLER, &warmup_handler);
    let gate = (WARMUP_HANDLER & 0xffff)
        | (0x18 << 16)
        | (0x8e00 << 32)
        | ((WARMUP_HANDLER >> 16) & 0xffff) << 48;
    rig.write(IDT + u64::from(WARMUP_VECTOR) * 8, &gate.to_le_bytes());
    let gate =
        (HANDLER & 0xffff) | (0x18 << 16) | (0x8e00 << 32) | ((HANDLER >> 16) & 0xffff) << 48;
    rig.write(IDT + u64::from(VECTOR) * 8, &gate.to_le_bytes());

    /// Asks for the vCPU back on the probe's three ports.
    #[derive(Default)]
    struct Ports {
        last: Option<(u16, u8)>,
    }
    impl Platform for Ports {
        fn io_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn io_write(&mut self, port: u16, data: &[u8]) {
            if matches!(
                port,
                PORT_ASSERT | PORT_LOWER | PORT_LOWER_FIRST | PORT_DONE
            ) {
                self.last = Some((port, data[0]));
            }
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}
        fn stop_requested(&self) -> bool {
            self.last.is_some()
        }
    }
    let mut io = Ports::default();
    let kicker = rig.vcpu.kicker();
    let (backend, vcpu) = (&rig.backend, &mut rig.vcpu);
    let done = AtomicBool::new(false);
    let hung = AtomicBool::new(false);
    let (done, hung_ref) = (&done, &hung);
    std::thread::scope(|sc| {
        sc.spawn(move || {
            for _ in 0..200 {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            hung_ref.store(true, Ordering::Relaxed);
            kicker.kick();
        });
        while !hung_ref.load(Ordering::Relaxed) {
            match vcpu.run(&mut io).expect("KVM_RUN") {
                VcpuExit::IoRequest => match io.last.take() {
                    Some((PORT_ASSERT, _)) => backend.set_irq_line(gsi, true).unwrap(),
                    Some((PORT_LOWER, 1) | (PORT_LOWER_FIRST, _)) => {
                        backend.set_irq_line(gsi, false).unwrap()
                    }
                    Some((PORT_DONE, _)) => break,
                    _ => {}
                },
                VcpuExit::Interrupted | VcpuExit::Halted => {}
                e => panic!("probe guest: {e:?}"),
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    let mut count = [0u8; 4];
    rig.mem.read_slice(&mut count, GuestAddress(COUNT)).unwrap();
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    rig.backend
        .vm
        .get_irqchip(&mut chip)
        .expect("KVM_GET_IRQCHIP");
    // SAFETY: with chip_id KVM_IRQCHIP_IOAPIC KVM_GET_IRQCHIP fills the
    // union's `ioapic` member; its fields are plain integers.
    let (entry, irr) = unsafe {
        (
            chip.chip.ioapic.redirtbl[gsi as usize].bits,
            chip.chip.ioapic.irr,
        )
    };
    let lapic = rig.vcpu.fd.get_lapic().expect("KVM_GET_LAPIC");
    let bit = |base: usize| {
        let off = base + (VECTOR as usize / 32) * 0x10;
        let word = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
        word & (1 << (VECTOR % 32)) != 0
    };
    Some(ReassertProbe {
        deliveries: u32::from_le_bytes(count),
        hung: hung.load(Ordering::Relaxed),
        entry,
        ioapic_irr: irr & (1 << gsi) != 0,
        lapic_irr: bit(0x200),
        lapic_isr: bit(0x100),
        lapic_tmr: bit(0x180),
    })
}

/// Level-triggered re-delivery after an EOI on KVM's in-kernel irqchip,
/// for an ISA pin (4, also wired to the PIC) and a PCI pin (19), with the
/// EOI written through the xAPIC page and through the x2APIC MSR. (On a
/// host that EOIs at delivery — KVM-PVM, see
/// `kernel_lapic_probe_matches_a_level_line` — the second delivery is
/// caused by that early EOI, not by the handler's.)
#[test]
fn kernel_irqchip_redelivers_a_level_line_after_eoi() {
    if !kvm_usable() {
        return;
    }
    let pvm = crate::backend::select::HostFacts::probe().kvm_pvm;
    for gsi in [4, 19] {
        for (eoi, warmup) in [
            (EoiPath::XapicMmio, false),
            (EoiPath::X2apicMsr, false),
            (EoiPath::XapicMmio, true),
            (EoiPath::X2apicMsr, true),
        ] {
            let Some(p) = level_reassert_probe(gsi, eoi, warmup, false, false) else {
                println!("kernel_irqchip_redelivers_a_level_line_after_eoi: SKIPPED (no in-kernel irqchip)");
                return;
            };
            println!("GSI {gsi}, EOI {eoi:?}, warm-up {warmup}: {p:x?}");
            assert!(
                !p.hung && p.deliveries == 2,
                "GSI {gsi}, EOI {eoi:?}, warm-up {warmup}: no second delivery (KVM-PVM: {pvm}): {p:x?}"
            );
            // Remote IRR clear after the second EOI, nothing left pending.
            assert_eq!(p.entry & (1 << 14), 0, "{p:x?}");
            assert!(!p.ioapic_irr && !p.lapic_irr && !p.lapic_isr, "{p:x?}");
            // The LAPIC accepted the vector as level-triggered (TMR set).
            assert!(p.lapic_tmr, "{p:x?}");
        }
    }
    // Observation only: irq-level-eoi's handler also reads the IOAPIC
    // entry between its EOI and the source's end.
    for gsi in [4, 19] {
        if let Some(p) = level_reassert_probe(gsi, EoiPath::XapicMmio, true, true, false) {
            println!("GSI {gsi}, EOI XapicMmio, warm-up, entry read after the EOI: {p:x?}");
        }
    }
}

/// What this host's in-kernel local APIC does with an interrupt it
/// delivers (`probe_kernel_lapic`, which decides whether the guests test
/// runs `irq-level-eoi` on `--irqchip kernel`), cross-checked with a
/// level-triggered line: one assertion whose handler ends the source
/// *before* its EOI is one interrupt on an APIC (the vector in service
/// until the EOI, the line low by then), and two on a host that ends the
/// interrupt as it delivers it (KVM's IOAPIC sees that EOI while the
/// source is still high and sends the vector again).
#[test]
fn kernel_lapic_probe_matches_a_level_line() {
    if !kvm_usable() {
        return;
    }
    let Some(facts) = super::probe_kernel_lapic().expect("in-kernel LAPIC probe") else {
        println!("kernel_lapic_probe_matches_a_level_line: SKIPPED (no in-kernel irqchip)");
        return;
    };
    let pvm = crate::backend::select::HostFacts::probe().kvm_pvm;
    println!("in-kernel LAPIC: {facts:?} (KVM-PVM: {pvm})");
    let p =
        level_reassert_probe(4, EoiPath::XapicMmio, false, false, true).expect("in-kernel irqchip");
    println!("GSI 4, source ended before the EOI: {p:x?}");
    let expected = if facts.eoi_at_delivery() { 2 } else { 1 };
    assert_eq!(
        p.deliveries, expected,
        "deliveries for one assertion, {facts:?}: {p:x?}"
    );
    assert_eq!(p.entry & (1 << 14), 0, "remote IRR left set: {p:x?}");
}
