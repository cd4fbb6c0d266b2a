//! Conversions between kvm-bindings structures and the neutral [`CpuState`] parts; no KVM type leaves this backend.

use super::*;

pub(super) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    use cpu_interp::state::gpr::*;
    let g = &r.gpr;
    kvm_regs {
        rax: g[RAX],
        rbx: g[RBX],
        rcx: g[RCX],
        rdx: g[RDX],
        rsi: g[RSI],
        rdi: g[RDI],
        rsp: g[RSP],
        rbp: g[RBP],
        r8: g[R8],
        r9: g[R9],
        r10: g[R10],
        r11: g[R11],
        r12: g[R12],
        r13: g[R13],
        r14: g[R14],
        r15: g[R15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn regs_from_kvm(k: &kvm_regs) -> Regs {
    Regs {
        gpr: [
            k.rax, k.rcx, k.rdx, k.rbx, k.rsp, k.rbp, k.rsi, k.rdi, k.r8, k.r9, k.r10, k.r11,
            k.r12, k.r13, k.r14, k.r15,
        ],
        rip: k.rip,
        rflags: k.rflags,
    }
}

/// kvm_segment's limit is byte-granular like [`Segment::limit`], and its
/// `unusable` flag means the same thing.
pub(super) fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

pub(super) fn segment_from_kvm(k: &kvm_segment) -> Segment {
    Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        type_: k.type_ & 0xf,
        s: k.s != 0,
        dpl: k.dpl & 3,
        present: k.present != 0,
        avl: k.avl != 0,
        l: k.l != 0,
        db: k.db != 0,
        g: k.g != 0,
        unusable: k.unusable != 0,
    }
}

pub(super) fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub(super) fn dtable_from_kvm(k: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: k.base,
        limit: k.limit,
    }
}

/// `interrupt_bitmap` stays empty: a queued interrupt travels in the vCPU
/// events instead.
pub(super) fn sregs_to_kvm(s: &Sregs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

pub(super) fn sregs_from_kvm(k: &kvm_sregs) -> Sregs {
    Sregs {
        cs: segment_from_kvm(&k.cs),
        ds: segment_from_kvm(&k.ds),
        es: segment_from_kvm(&k.es),
        fs: segment_from_kvm(&k.fs),
        gs: segment_from_kvm(&k.gs),
        ss: segment_from_kvm(&k.ss),
        tr: segment_from_kvm(&k.tr),
        ldt: segment_from_kvm(&k.ldt),
        gdt: dtable_from_kvm(&k.gdt),
        idt: dtable_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

/// x87 tag of an 80-bit register's contents, as FXRSTOR / FSTENV compute
/// it: 0 valid, 1 zero, 2 special (NaN, infinity, denormal, unnormal).
pub(super) fn x87_tag(v: &[u8; 10]) -> u16 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&v[..8]);
    let mant = u64::from_le_bytes(m);
    let exp = u16::from_le_bytes([v[8], v[9]]) & 0x7fff;
    match exp {
        0x7fff => 2,
        0 if mant == 0 => 1,
        0 => 2,
        _ if mant >> 63 == 0 => 2,
        _ => 0,
    }
}

/// Full tag word → FXSAVE's abridged tag byte (bit i set: R_i not empty).
pub(super) fn abridged_tag(ftw: u16) -> u8 {
    (0..8).fold(0u8, |acc, r| {
        if (ftw >> (2 * r)) & 3 != 3 {
            acc | (1 << r)
        } else {
            acc
        }
    })
}

/// Abridged tag byte → full tag word, classifying every non-empty physical
/// register by its contents (`st` in physical order).
pub(super) fn full_tag(abridged: u8, st: &[[u8; 10]; 8]) -> u16 {
    (0..8).fold(0u16, |acc, r| {
        let tag = if abridged & (1 << r) == 0 {
            3
        } else {
            x87_tag(&st[r])
        };
        acc | (tag << (2 * r))
    })
}

/// `kvm_fpu` (FXSAVE layout) from the neutral state.
///
/// `kvm_fpu.fpr[i]` holds ST(i), i.e. by stack position, while
/// [`FpuState::st`] holds the physical registers R0..R7. With TOP = FSW
/// bits 13:11, ST(i) = R[(TOP + i) % 8]. The tag word is abridged (one
/// "not empty" bit per physical register); converting back recomputes the
/// full tags from the register contents the way FXRSTOR does, so a full tag
/// word that disagrees with the contents (e.g. "valid" for a zero) does not
/// survive the round trip — exactly as on hardware.
pub(super) fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    let top = usize::from((f.fsw >> 11) & 7);
    let mut fpr = [[0u8; 16]; 8];
    for (i, slot) in fpr.iter_mut().enumerate() {
        slot[..10].copy_from_slice(&f.st[(top + i) % 8]);
    }
    let mut xmm = [[0u8; 16]; 16];
    for (dst, src) in xmm.iter_mut().zip(f.xmm.iter()) {
        *dst = src.to_le_bytes();
    }
    kvm_fpu {
        fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: abridged_tag(f.ftw),
        pad1: 0,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm,
        mxcsr: f.mxcsr,
        pad2: 0,
    }
}

/// The neutral FPU state from `kvm_fpu`; see [`fpu_to_kvm`].
pub(super) fn fpu_from_kvm(k: &kvm_fpu) -> FpuState {
    let top = usize::from((k.fsw >> 11) & 7);
    let mut st = [[0u8; 10]; 8];
    for (i, slot) in k.fpr.iter().enumerate() {
        st[(top + i) % 8].copy_from_slice(&slot[..10]);
    }
    let mut xmm = [0u128; 16];
    for (dst, src) in xmm.iter_mut().zip(k.xmm.iter()) {
        *dst = u128::from_le_bytes(*src);
    }
    FpuState {
        ftw: full_tag(k.ftwx, &st),
        st,
        fcw: k.fcw,
        fsw: k.fsw,
        fop: k.last_opcode,
        fip: k.last_ip,
        fdp: k.last_dp,
        xmm,
        mxcsr: k.mxcsr,
        ymm_hi: [0; 16],
    }
}

/// Byte offsets in the FXSAVE image (the legacy region of an XSAVE area).
pub(super) mod fx {
    pub const FCW: usize = 0;
    pub const FSW: usize = 2;
    pub const FTW: usize = 4;
    pub const FOP: usize = 6;
    pub const FIP: usize = 8;
    pub const FDP: usize = 16;
    pub const MXCSR: usize = 24;
    pub const ST: usize = 32;
    pub const XMM: usize = 160;
    pub const LEGACY_END: usize = 512;
    /// XSTATE_BV in the XSAVE header.
    pub const XSTATE_BV: usize = 512;
    /// XSTATE_BV bits of the legacy components: x87 and SSE.
    pub const BV_LEGACY: u64 = 0b11;
}

/// The first `n` bytes of an XSAVE region given as little-endian words.
pub(super) fn region_bytes(region: &[u32], n: usize) -> Vec<u8> {
    region
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(n)
        .collect()
}

/// The legacy (FXSAVE-format, 64-bit FIP/FDP) part of an XSAVE region as a
/// `kvm_fpu`, MXCSR included.
pub(super) fn fxsave_to_kvm_fpu(region: &[u32]) -> kvm_fpu {
    let b = region_bytes(region, fx::LEGACY_END);
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let mut k = kvm_fpu {
        fcw: u16_at(fx::FCW),
        fsw: u16_at(fx::FSW),
        ftwx: b[fx::FTW],
        last_opcode: u16_at(fx::FOP),
        last_ip: u64_at(fx::FIP),
        last_dp: u64_at(fx::FDP),
        mxcsr: u32_at(fx::MXCSR),
        ..Default::default()
    };
    for (i, r) in k.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[fx::ST + 16 * i..fx::ST + 16 * i + 16]);
    }
    for (i, r) in k.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[fx::XMM + 16 * i..fx::XMM + 16 * i + 16]);
    }
    k
}

/// Write `k` into the legacy part of an XSAVE region and mark the x87 and
/// SSE components as present in XSTATE_BV (otherwise XRSTOR would load
/// their initial state instead). MXCSR_MASK and the reserved bytes are kept.
pub(super) fn kvm_fpu_to_fxsave(k: &kvm_fpu, region: &mut [u32]) {
    let mut b = region_bytes(region, fx::XSTATE_BV + 8);
    b[fx::FCW..fx::FCW + 2].copy_from_slice(&k.fcw.to_le_bytes());
    b[fx::FSW..fx::FSW + 2].copy_from_slice(&k.fsw.to_le_bytes());
    b[fx::FTW] = k.ftwx;
    b[fx::FTW + 1] = 0;
    b[fx::FOP..fx::FOP + 2].copy_from_slice(&k.last_opcode.to_le_bytes());
    b[fx::FIP..fx::FIP + 8].copy_from_slice(&k.last_ip.to_le_bytes());
    b[fx::FDP..fx::FDP + 8].copy_from_slice(&k.last_dp.to_le_bytes());
    b[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&k.mxcsr.to_le_bytes());
    for (i, r) in k.fpr.iter().enumerate() {
        b[fx::ST + 16 * i..fx::ST + 16 * i + 16].copy_from_slice(r);
    }
    for (i, r) in k.xmm.iter().enumerate() {
        b[fx::XMM + 16 * i..fx::XMM + 16 * i + 16].copy_from_slice(r);
    }
    let mut bv = [0u8; 8];
    bv.copy_from_slice(&b[fx::XSTATE_BV..fx::XSTATE_BV + 8]);
    let bv = u64::from_le_bytes(bv) | fx::BV_LEGACY;
    b[fx::XSTATE_BV..fx::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (w, chunk) in region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

/// XSAVE state components duet moves beyond x87 and SSE.
pub mod xcomp {
    pub const AVX: usize = 2;
    pub const OPMASK: usize = 5;
    pub const ZMM_HI256: usize = 6;
    pub const HI16_ZMM: usize = 7;
    pub const PKRU: usize = 9;
    /// Every component duet carries (x87, SSE and the above).
    pub const CARRIED: u64 = 0b10_1110_0111;
}

/// Offsets and sizes of XSAVE state components in the standard-format
/// image KVM_GET/SET_XSAVE use (CPUID.(0xD, i):EBX / EAX of the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveLayout {
    /// (offset, size) per component; size 0 when absent.
    pub(super) comps: [(usize, usize); 10],
}

impl XsaveLayout {
    /// The architectural offsets (the same on Intel and AMD processors).
    pub const STANDARD: XsaveLayout = XsaveLayout {
        comps: [
            (0, 160),
            (160, 256),
            (576, 256),
            (0, 0),
            (0, 0),
            (1088, 64),
            (1152, 512),
            (1664, 1024),
            (0, 0),
            (2688, 8),
        ],
    };

    /// From CPUID leaf 0xD as KVM reports it; components with an
    /// unexpected size are dropped (never carried).
    pub(super) fn from_cpuid(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Self {
        let mut l = XsaveLayout {
            comps: [(0, 0); 10],
        };
        l.comps[0] = (0, 160);
        l.comps[1] = (160, 256);
        for i in [
            xcomp::AVX,
            xcomp::OPMASK,
            xcomp::ZMM_HI256,
            xcomp::HI16_ZMM,
            xcomp::PKRU,
        ] {
            let want = Self::STANDARD.comps[i].1;
            if let Some(e) = entries
                .iter()
                .find(|e| e.function == 0xd && e.index == i as u32)
            {
                if e.eax as usize == want && e.ebx as usize >= 576 {
                    l.comps[i] = (e.ebx as usize, want);
                }
            }
        }
        l
    }

    /// The byte range of component `i` in the image, if carried.
    pub(super) fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let (off, size) = self.comps[i];
        (size > 0 && i >= 2).then_some(off..off + size)
    }
}

/// Little-endian `u128`s from bytes.
pub(super) fn u128s(b: &[u8]) -> impl Iterator<Item = u128> + '_ {
    b.chunks_exact(16).map(|c| {
        let mut a = [0u8; 16];
        a.copy_from_slice(c);
        u128::from_le_bytes(a)
    })
}

/// The neutral state from a standard-format XSAVE image (KVM_GET_XSAVE):
/// the legacy area, then every carried component whose XSTATE_BV bit is
/// set (a clear bit means the component is in its initial configuration:
/// zeros for these).
pub(super) fn xsave_image_to_state(region: &[u32], layout: &XsaveLayout) -> (FpuState, XState) {
    let n = region.len() * 4;
    let b = region_bytes(region, n);
    let mut f = fpu_from_kvm(&fxsave_to_kvm_fpu(region));
    let bv = u64::from_le_bytes(
        b[fx::XSTATE_BV..fx::XSTATE_BV + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mut x = XState {
        xinuse: bv,
        ..Default::default()
    };
    let present = |i: usize| layout.range(i).filter(|r| bv & (1 << i) != 0 && r.end <= n);
    if let Some(r) = present(xcomp::AVX) {
        for (d, v) in f.ymm_hi.iter_mut().zip(u128s(&b[r])) {
            *d = v;
        }
    }
    if let Some(r) = present(xcomp::OPMASK) {
        for (d, c) in x.opmask.iter_mut().zip(b[r].chunks_exact(8)) {
            *d = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
    }
    if let Some(r) = present(xcomp::ZMM_HI256) {
        let v: Vec<u128> = u128s(&b[r]).collect();
        for (k, z) in x.zmm_hi256.iter_mut().enumerate() {
            *z = [v[2 * k], v[2 * k + 1]];
        }
    }
    if let Some(r) = present(xcomp::HI16_ZMM) {
        let v: Vec<u128> = u128s(&b[r]).collect();
        for (k, z) in x.hi16_zmm.iter_mut().enumerate() {
            *z = [v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]];
        }
    }
    if let Some(r) = present(xcomp::PKRU) {
        x.pkru = u32::from_le_bytes(b[r.start..r.start + 4].try_into().unwrap_or([0; 4]));
    }
    (f, x)
}

/// Write the neutral state into a standard-format XSAVE image read from
/// KVM: the legacy area (x87 and SSE marked present, as before), and each
/// carried component, whose XSTATE_BV bit is set when XINUSE says so or
/// its contents are not the initial ones (a clear bit makes KVM load the
/// initial configuration). Components duet does not carry are kept.
pub(super) fn state_to_xsave_image(
    f: &FpuState,
    x: &XState,
    layout: &XsaveLayout,
    region: &mut [u32],
) {
    kvm_fpu_to_fxsave(&fpu_to_kvm(f), region);
    let n = region.len() * 4;
    let mut b = region_bytes(region, n);
    let mut bv = u64::from_le_bytes(
        b[fx::XSTATE_BV..fx::XSTATE_BV + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mut put = |i: usize, data: Vec<u8>, b: &mut Vec<u8>| {
        let Some(r) = layout.range(i).filter(|r| r.end <= n) else {
            return;
        };
        let live = x.xinuse & (1 << i) != 0 || data.iter().any(|&v| v != 0);
        if live {
            b[r].copy_from_slice(&data);
            bv |= 1 << i;
        } else {
            b[r].fill(0);
            bv &= !(1 << i);
        }
    };
    put(
        xcomp::AVX,
        f.ymm_hi.iter().flat_map(|v| v.to_le_bytes()).collect(),
        &mut b,
    );
    put(
        xcomp::OPMASK,
        x.opmask.iter().flat_map(|v| v.to_le_bytes()).collect(),
        &mut b,
    );
    put(
        xcomp::ZMM_HI256,
        x.zmm_hi256
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        &mut b,
    );
    put(
        xcomp::HI16_ZMM,
        x.hi16_zmm
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        &mut b,
    );
    let mut pk = x.pkru.to_le_bytes().to_vec();
    pk.extend_from_slice(&[0; 4]);
    put(xcomp::PKRU, pk, &mut b);
    b[fx::XSTATE_BV..fx::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (w, chunk) in region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

pub(super) fn debugregs_to_kvm(d: &DebugRegs) -> kvm_debugregs {
    kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        ..Default::default()
    }
}

pub(super) fn debugregs_from_kvm(k: &kvm_debugregs) -> DebugRegs {
    DebugRegs {
        db: k.db,
        dr6: k.dr6,
        dr7: k.dr7,
    }
}

pub(super) fn xcr0_to_kvm(xcr0: u64) -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = xcr0 | 1; // x87 state is always enabled
    x
}

pub(super) fn xcr0_from_kvm(k: &kvm_xcrs) -> u64 {
    let n = (k.nr_xcrs as usize).min(k.xcrs.len());
    k.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value)
}

/// The MSR entries for `m` (plus the TSC if given), in [`STATE_MSRS`] order.
pub(super) fn msrs_to_entries(m: &Msrs, tsc: Option<u64>) -> Vec<kvm_msr_entry> {
    let mut v: Vec<kvm_msr_entry> = STATE_MSRS
        .iter()
        .filter(|&&i| i != msr::TSC)
        .map(|&index| kvm_msr_entry {
            index,
            reserved: 0,
            data: match index {
                msr::STAR => m.star,
                msr::LSTAR => m.lstar,
                msr::CSTAR => m.cstar,
                msr::SFMASK => m.sfmask,
                msr::KERNEL_GS_BASE => m.kernel_gs_base,
                msr::SYSENTER_CS => m.sysenter_cs,
                msr::SYSENTER_ESP => m.sysenter_esp,
                msr::SYSENTER_EIP => m.sysenter_eip,
                msr::PAT => m.pat,
                msr::TSC_AUX => m.tsc_aux,
                msr::MISC_ENABLE => m.misc_enable,
                _ => 0,
            },
        })
        .collect();
    if let Some(t) = tsc {
        v.push(kvm_msr_entry {
            index: msr::TSC,
            reserved: 0,
            data: t,
        });
    }
    v
}

/// The neutral MSRs (starting from `base` for MSRs absent from `entries`)
/// and the TSC, if present.
pub(super) fn msrs_from_entries(entries: &[kvm_msr_entry], base: Msrs) -> (Msrs, Option<u64>) {
    let mut m = base;
    let mut tsc = None;
    for e in entries {
        match e.index {
            msr::STAR => m.star = e.data,
            msr::LSTAR => m.lstar = e.data,
            msr::CSTAR => m.cstar = e.data,
            msr::SFMASK => m.sfmask = e.data,
            msr::KERNEL_GS_BASE => m.kernel_gs_base = e.data,
            msr::SYSENTER_CS => m.sysenter_cs = e.data,
            msr::SYSENTER_ESP => m.sysenter_esp = e.data,
            msr::SYSENTER_EIP => m.sysenter_eip = e.data,
            msr::PAT => m.pat = e.data,
            msr::TSC_AUX => m.tsc_aux = e.data,
            msr::MISC_ENABLE => m.misc_enable = e.data,
            msr::TSC => tsc = Some(e.data),
            _ => {}
        }
    }
    (m, tsc)
}

/// vCPU events from the neutral state. `halted` is not part of them (see
/// the module docs).
pub(super) fn events_to_kvm(e: &PendingEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    if let Some(v) = e.interrupt {
        k.interrupt.injected = 1;
        k.interrupt.nr = v;
    }
    let mut shadow = 0;
    if e.sti_shadow {
        shadow |= KVM_X86_SHADOW_INT_STI;
    }
    if e.mov_ss_shadow {
        shadow |= KVM_X86_SHADOW_INT_MOV_SS;
    }
    k.interrupt.shadow = shadow as u8;
    k.nmi.pending = u8::from(e.nmi_pending);
    k.nmi.masked = u8::from(e.nmi_masked);
    if e.single_step_pending {
        // A #DB trap KVM delivers as it resumes (DR6.BS travels in the
        // debug registers).
        k.exception.injected = 1;
        k.exception.nr = 1;
    }
    k
}

/// The neutral events from KVM's. An NMI KVM is in the middle of injecting
/// counts as pending (and not yet masking); a software interrupt being
/// re-injected is dropped (RIP still points at the INT, which re-executes).
pub(super) fn events_from_kvm(k: &kvm_vcpu_events) -> PendingEvents {
    let shadow = u32::from(k.interrupt.shadow);
    PendingEvents {
        interrupt: (k.interrupt.injected != 0 && k.interrupt.soft == 0).then_some(k.interrupt.nr),
        nmi_pending: k.nmi.pending != 0 || k.nmi.injected != 0,
        nmi_masked: k.nmi.masked != 0 && k.nmi.injected == 0,
        sti_shadow: shadow & KVM_X86_SHADOW_INT_STI != 0,
        mov_ss_shadow: shadow & KVM_X86_SHADOW_INT_MOV_SS != 0,
        halted: false,
        single_step_pending: k.exception.injected != 0
            && k.exception.nr == 1
            && k.exception.has_error_code == 0,
    }
}
