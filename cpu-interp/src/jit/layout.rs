//! Offsets of the `Cpu` fields translated code reads and writes
//! (`[rbp + offset]`), computed by the compiler.

use std::mem::{offset_of, size_of};

use crate::cpu::Cpu;
use crate::flags::Flags;
use crate::mmu::{Tlb, TlbEntry, TLB_SIZE};
use crate::state::Segment;

const _: () = assert!(
    size_of::<TlbEntry>() == 64,
    "the JIT indexes TLB entries by << 6"
);

fn i(v: usize) -> i64 {
    v as i64
}

pub fn gpr(g: u8) -> i64 {
    i(offset_of!(Cpu, gpr) + 8 * g as usize)
}

pub fn rip() -> i64 {
    i(offset_of!(Cpu, rip))
}

pub fn flags_bits() -> i64 {
    i(offset_of!(Cpu, flags) + offset_of!(Flags, bits))
}

pub fn retired() -> i64 {
    i(offset_of!(Cpu, retired))
}

pub fn stop_at() -> i64 {
    i(offset_of!(Cpu, stop_at))
}

pub fn jit_budget() -> i64 {
    i(offset_of!(Cpu, jit_budget))
}

fn tlb_set(user: bool) -> usize {
    offset_of!(Cpu, tlb)
        + offset_of!(Tlb, sets)
        + usize::from(user) * TLB_SIZE * size_of::<TlbEntry>()
}

pub fn tlb_read(user: bool) -> i64 {
    i(tlb_set(user) + offset_of!(TlbEntry, read))
}

pub fn tlb_write(user: bool) -> i64 {
    i(tlb_set(user) + offset_of!(TlbEntry, write))
}

pub fn tlb_exec(user: bool) -> i64 {
    i(tlb_set(user) + offset_of!(TlbEntry, exec))
}

pub fn tlb_paddr(user: bool) -> i64 {
    i(tlb_set(user) + offset_of!(TlbEntry, paddr))
}

pub fn tlb_addend(user: bool) -> i64 {
    i(tlb_set(user) + offset_of!(TlbEntry, addend))
}

pub fn seg_base(s: usize) -> i64 {
    i(offset_of!(Cpu, seg) + s * size_of::<Segment>() + offset_of!(Segment, base))
}
