//! Multiboot kernels that are not duet's own: small 32-bit ELF kernels
//! with a multiboot header (flag 16 clear, as GRUB- and QEMU-bootable
//! kernels are), built here, loaded at several addresses (0x8000 among
//! them), with several modules and their command lines, ending through
//! isa-debug-exit with 1-, 2- and 4-byte writes — on both backends and
//! through the command line.

mod common;

use std::path::PathBuf;

use common::*;
use duet::backend::BackendKind;
use duet::loader::KernelSpec;
use duet::machine::{Machine, MachineConfig, Outcome};
use iced_x86::code_asm::*;

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u8 = 0xf4;
const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

/// How the kernel ends.
#[derive(Clone, Copy, Debug)]
enum ExitWidth {
    Byte,
    Word,
    Dword,
}

/// A multiboot ELF32 kernel: code (with the multiboot header first) in a
/// PT_LOAD at `load`, a second PT_LOAD holding the stack as bss. It checks
/// EAX, prints its command line, then for each module its command line and
/// contents, and writes `exit_value` to isa-debug-exit.
fn kernel(load: u32, width: ExitWidth, exit_value: u32) -> Vec<u8> {
    let stack_base = load + 0x1000;
    let stack_len = 0x1000u32;
    let code = assemble(load, stack_base + stack_len, width, exit_value);
    elf32(
        &[
            (load, code.clone(), code.len() as u32),
            (stack_base, Vec::new(), stack_len),
        ],
        load + 12,
    )
}

fn assemble(load: u32, stack_top: u32, width: ExitWidth, exit_value: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let flags = 0x3u32; // page-aligned modules, memory information
    a.dd(&[
        MULTIBOOT_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags),
    ])
    .unwrap();
    let mut fail = a.create_label();
    let mut putc = a.create_label();
    let mut puts = a.create_label();
    let mut next_module = a.create_label();
    let mut modules_done = a.create_label();
    let mut contents = a.create_label();
    let mut contents_done = a.create_label();
    // entry (load + 12)
    a.mov(esp, stack_top).unwrap();
    a.cmp(eax, BOOTLOADER_MAGIC).unwrap();
    a.jne(fail).unwrap();
    a.mov(esi, dword_ptr(ebx + 16)).unwrap();
    a.call(puts).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.call(putc).unwrap();
    a.mov(ecx, dword_ptr(ebx + 20)).unwrap();
    a.mov(edi, dword_ptr(ebx + 24)).unwrap();
    a.set_label(&mut next_module).unwrap();
    a.test(ecx, ecx).unwrap();
    a.jz(modules_done).unwrap();
    a.mov(esi, dword_ptr(edi + 8)).unwrap();
    a.call(puts).unwrap();
    a.mov(al, b'=' as u32).unwrap();
    a.call(putc).unwrap();
    a.mov(esi, dword_ptr(edi)).unwrap();
    a.mov(ebp, dword_ptr(edi + 4)).unwrap();
    a.set_label(&mut contents).unwrap();
    a.cmp(esi, ebp).unwrap();
    a.jae(contents_done).unwrap();
    a.lodsb().unwrap();
    a.call(putc).unwrap();
    a.jmp(contents).unwrap();
    a.set_label(&mut contents_done).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.call(putc).unwrap();
    a.add(edi, 16).unwrap();
    a.dec(ecx).unwrap();
    a.jmp(next_module).unwrap();
    a.set_label(&mut modules_done).unwrap();
    a.mov(eax, exit_value).unwrap();
    match width {
        ExitWidth::Byte => a.out(DEBUG_EXIT as u32, al).unwrap(),
        ExitWidth::Word => a.out(DEBUG_EXIT as u32, ax).unwrap(),
        ExitWidth::Dword => a.out(DEBUG_EXIT as u32, eax).unwrap(),
    }
    a.cli().unwrap();
    a.hlt().unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(al, b'!' as u32).unwrap();
    a.call(putc).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    // puts: ESI -> NUL-terminated string
    let mut puts_done = a.create_label();
    a.set_label(&mut puts).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(puts_done).unwrap();
    a.call(putc).unwrap();
    a.jmp(puts).unwrap();
    a.set_label(&mut puts_done).unwrap();
    a.ret().unwrap();
    // putc: AL -> COM1
    a.set_label(&mut putc).unwrap();
    a.push(edx).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.out(dx, al).unwrap();
    a.pop(edx).unwrap();
    a.ret().unwrap();
    a.assemble(u64::from(load)).unwrap()
}

/// An ELF32 executable with one PT_LOAD per `(paddr, bytes, memsz)`.
fn elf32(segments: &[(u32, Vec<u8>, u32)], entry: u32) -> Vec<u8> {
    let phoff = 52u32;
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // 32-bit
    f[5] = 1; // little-endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&phoff.to_le_bytes());
    f[40..42].copy_from_slice(&52u16.to_le_bytes());
    f[42..44].copy_from_slice(&32u16.to_le_bytes());
    f[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    // The multiboot header must lie in the first 8 KiB: the first
    // segment's bytes go right after the headers page.
    for (k, (paddr, bytes, memsz)) in segments.iter().enumerate() {
        let offset = f.len() as u32;
        let ph = [
            1,
            offset,
            *paddr,
            *paddr,
            bytes.len() as u32,
            *memsz,
            7,
            0x1000,
        ];
        let o = phoff as usize + 32 * k;
        for (j, w) in ph.iter().enumerate() {
            f[o + 4 * j..o + 4 * j + 4].copy_from_slice(&w.to_le_bytes());
        }
        f.extend_from_slice(bytes);
    }
    f
}

fn temp(tag: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("duet-mb-{}-{tag}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

struct Boot {
    serial: String,
    outcome: Outcome,
}

fn boot(kind: BackendKind, kernel: &std::path::Path, initrd: Vec<String>, cmdline: &str) -> Boot {
    let out = SharedBuf::default();
    let cfg = MachineConfig {
        memory: 64 << 20,
        ..MachineConfig::new(kind, Box::new(out.clone()))
    };
    let mut m = Machine::new(cfg).expect("machine");
    m.load_kernel(&KernelSpec {
        kernel: kernel.to_path_buf(),
        initrd,
        cmdline: cmdline.into(),
    })
    .expect("load");
    let outcome = m.run().expect("run");
    let serial = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    Boot { serial, outcome }
}

fn backends(test: &str) -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Interp];
    if kvm_or_skip(test) {
        v.push(BackendKind::Kvm);
    }
    v
}

/// The kernel at each load address, with two modules, on each backend:
/// the info structure reached it intact (EAX magic, command line, module
/// command lines and contents) and it exited through a 4-byte write.
#[test]
fn multiboot_elf_kernels_load_at_any_address() {
    let m1 = temp("m1", b"first module");
    let m2 = temp("m2", b"second,module");
    for load in [0x8000u32, 0x10_0000, 0x20_0000, 0x70_0000] {
        let k = temp(
            &format!("k{load:x}"),
            &kernel(load, ExitWidth::Dword, 0x1234_5621),
        );
        for kind in backends("multiboot_elf_kernels_load_at_any_address") {
            let r = boot(
                kind,
                &k,
                vec![format!("{} arg=1", m1.display()), m2.display().to_string()],
                "hello=world",
            );
            let expected = format!(
                "{} hello=world\n{} arg=1=first module\n{}=second,module\n",
                k.display(),
                m1.display(),
                m2.display()
            );
            assert_eq!(r.serial, expected, "load {load:#x} on {kind:?}");
            assert_eq!(
                r.outcome,
                Outcome::DebugExit(0x2468_ac43),
                "load {load:#x} on {kind:?}: {}",
                r.serial
            );
        }
        std::fs::remove_file(k).ok();
    }
    std::fs::remove_file(m1).ok();
    std::fs::remove_file(m2).ok();
}

/// isa-debug-exit takes 1-, 2- and 4-byte writes at its base.
#[test]
fn debug_exit_accepts_every_write_width() {
    for (width, value, status) in [
        (ExitWidth::Byte, 0x21u32, 0x43u32),
        (ExitWidth::Word, 0x4321, 0x8643),
        (ExitWidth::Dword, 0x8765_4321, 0x0eca_8643),
    ] {
        let k = temp(&format!("w{value:x}"), &kernel(0x10_0000, width, value));
        for kind in backends("debug_exit_accepts_every_write_width") {
            let r = boot(kind, &k, vec![], "");
            assert_eq!(
                r.outcome,
                Outcome::DebugExit(status),
                "{width:?} on {kind:?}"
            );
        }
        std::fs::remove_file(k).ok();
    }
}

/// The command line: `--initrd` in QEMU's comma form, and the exit status
/// is the debug-exit status.
#[test]
fn multiboot_kernel_through_the_command_line() {
    let k = temp("cli-k", &kernel(0x8000, ExitWidth::Dword, 0x20));
    let m1 = temp("cli-m1", b"one");
    let m2 = temp("cli,m2", b"two");
    let initrd = format!(
        "{} x=1 y=2,{}",
        m1.display(),
        m2.display().to_string().replace(',', ",,")
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["run", "--backend", "interp", "--kernel"])
        .arg(&k)
        .args(["--initrd", &initrd, "--cmdline", "a b"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!(
            "{} a b\n{} x=1 y=2=one\n{}=two\n",
            k.display(),
            m1.display(),
            m2.display()
        ),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0x41));
    for p in [k, m1, m2] {
        std::fs::remove_file(p).ok();
    }
}

/// A kernel that checks the machine-check MSRs CPUID advertises: it exits
/// with MCG_CAP's low 12 bits, plus bit 12 if bank 9's status is not 0 and
/// bit 13 if MC0_CTL did not keep the all-ones it wrote.
fn machine_check_kernel(load: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let flags = 0x3u32;
    a.dd(&[
        MULTIBOOT_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags),
    ])
    .unwrap();
    a.mov(ecx, 0x179u32).unwrap(); // IA32_MCG_CAP
    a.rdmsr().unwrap();
    a.mov(esi, eax).unwrap();
    a.and(esi, 0xfffu32).unwrap();
    a.mov(ecx, 0x400u32 + 4 * 9 + 1).unwrap(); // IA32_MC9_STATUS
    a.rdmsr().unwrap();
    a.or(eax, edx).unwrap();
    let mut status_zero = a.create_label();
    a.jz(status_zero).unwrap();
    a.or(esi, 0x1000u32).unwrap();
    a.set_label(&mut status_zero).unwrap();
    a.mov(ecx, 0x400u32).unwrap(); // IA32_MC0_CTL
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.mov(edx, 0xffff_ffffu32).unwrap();
    a.wrmsr().unwrap();
    a.xor(eax, eax).unwrap();
    a.xor(edx, edx).unwrap();
    a.rdmsr().unwrap();
    a.and(eax, edx).unwrap();
    a.cmp(eax, 0xffff_ffffu32).unwrap();
    let mut ctl_kept = a.create_label();
    a.je(ctl_kept).unwrap();
    a.or(esi, 0x2000u32).unwrap();
    a.set_label(&mut ctl_kept).unwrap();
    a.mov(eax, esi).unwrap();
    a.out(DEBUG_EXIT as u32, eax).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(u64::from(load)).unwrap();
    elf32(&[(load, code.clone(), code.len() as u32)], load + 12)
}

/// IA32_MCG_CAP reads the same banks on both backends (10, MCG_CTL_P),
/// bank status reads 0 and bank control takes all ones.
#[test]
fn machine_check_msrs_are_consistent_on_both_backends() {
    let k = temp("mce", &machine_check_kernel(0x10_0000));
    for kind in backends("machine_check_msrs_are_consistent_on_both_backends") {
        let r = boot(kind, &k, vec![], "");
        assert_eq!(
            r.outcome,
            Outcome::DebugExit((0x10a << 1) | 1),
            "{kind:?}: MCG_CAP or the banks differ"
        );
    }
    std::fs::remove_file(k).ok();
}
