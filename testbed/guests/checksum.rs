//! `checksum`: integer and string instructions in 32-bit protected mode.
//! Real mode loads the GDT and jumps to flat 32-bit code (no paging), which
//! fills a 4 KiB buffer with a generated pattern, copies and verifies it,
//! checksums it, prints `checksum: 0x%08x\r\n` and writes the checksum's
//! low byte to the debug-exit port: the VM exits with status
//! `((low_byte << 1) | 1) & 0xff`.
//!
//! The algorithm ([`expected_checksum`] is the same thing in Rust):
//!
//! 1. `rep stosd`: DST[0 .. 4096] = 0xdeadbeef (so the copy must overwrite).
//! 2. LCG (`mul`, `stosd`): SRC dwords 0 .. 960 are successive states of
//!    `x = x * 1664525 + 1013904223` from seed 0x2545f491 (state after each
//!    step is stored, little-endian).
//! 3. `rep stosb`: SRC[3840 .. 4096] = 0x5a (a trailer).
//! 4. Copy SRC to DST: `rep movsd` for 1023 dwords, `rep movsb` for the last
//!    4 bytes. 5. `repe cmpsb` over 4096 bytes: on a mismatch the guest
//!    prints `checksum: copy mismatch\r\n` and stops.
//! 6. `repne scasb`: `index` = offset of the first 0x5a byte in DST.
//! 7. Dword pass (`lodsd`): `h = rol(h, 5) ^ w` from h = 0x811c9dc5
//!    (`rol`, `xor`), and a 64-bit sum `hi:lo += w` (`add`, `adc`).
//! 8. Byte pass (`lodsb`): `g = g * 33 + b` from g = 5381 (`imul`).
//! 9. Mix: `x = h ^ (lo << 3) ^ hi` (`shl`); `x = shld(x, g, 7)`;
//!    `x ^= g sar 4` (`sar`); `x ^= x >> 16` (`shr`); `q, r = (hi:x) / 0x10007`
//!    (`div`); `x = q ^ (r << 16)`; `qs, rs = g idiv -7` (signed, `cdq`,
//!    `idiv`); `x = (x ^ qs) + rs`; checksum = `x + index`.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_8000  32-bit code           0x0000_a000  data: GDTR, strings, slots
//! 0x0001_0000 .. 0x0001_1000  SRC buffer   0x0002_0000 .. 0x0002_1000  DST buffer
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, DataBlock, GuestProgram, Routines};
use super::GuestImage;
use crate::layout::ports;

pub const NAME: &str = "checksum";
pub const DESCRIPTION: &str =
    "32-bit protected mode: string, shift and multiply/divide instructions over a 4 KiB buffer; exits via port 0xf4";

/// Source buffer (filled with the pattern).
pub const SRC: u64 = 0x1_0000;
/// Destination buffer (the copy that is checksummed).
pub const DST: u64 = 0x2_0000;
/// Buffer length in bytes.
pub const LEN: u32 = 4096;
/// Bytes of LCG output at the start of SRC; the rest is [`TRAILER_BYTE`].
pub const PATTERN_LEN: u32 = 3840;
pub const TRAILER_BYTE: u8 = 0x5a;
/// What DST holds before the copy.
const DST_FILL: u32 = 0xdead_beef;

const LCG_SEED: u32 = 0x2545_f491;
const LCG_MULTIPLIER: u32 = 1_664_525;
const LCG_INCREMENT: u32 = 1_013_904_223;
const DWORD_HASH_SEED: u32 = 0x811c_9dc5;
const DWORD_HASH_ROTATE: u32 = 5;
const BYTE_HASH_SEED: u32 = 5381;
const BYTE_HASH_MULTIPLIER: i32 = 33;
const SUM_LO_SHIFT: u32 = 3;
const SHLD_COUNT: u32 = 7;
const SAR_COUNT: u32 = 4;
const SHR_COUNT: u32 = 16;
const UNSIGNED_DIVISOR: u32 = 0x1_0007;
const REMAINDER_SHIFT: u32 = 16;
const SIGNED_DIVISOR: i32 = -7;

const CHECKSUM_PREFIX: &str = "checksum: 0x";
const LINE_END: &str = "\r\n";
const MISMATCH_LINE: &str = "checksum: copy mismatch\r\n";

/// The buffer contents the guest generates (SRC, and DST after the copy).
pub fn pattern() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(LEN as usize);
    let mut state = LCG_SEED;
    for _ in 0..PATTERN_LEN / 4 {
        state = state
            .wrapping_mul(LCG_MULTIPLIER)
            .wrapping_add(LCG_INCREMENT);
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.resize(LEN as usize, TRAILER_BYTE);
    bytes
}

/// The checksum the guest prints, computed independently in Rust.
pub fn expected_checksum() -> u32 {
    let buffer = pattern();
    let index = buffer
        .iter()
        .position(|&b| b == TRAILER_BYTE)
        .expect("the trailer contains the searched byte") as u32;

    let mut h = DWORD_HASH_SEED;
    let mut sum: u64 = 0;
    for chunk in buffer.chunks_exact(4) {
        let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        h = h.rotate_left(DWORD_HASH_ROTATE) ^ word;
        sum += u64::from(word);
    }
    let (lo, hi) = (sum as u32, (sum >> 32) as u32);

    let mut g = BYTE_HASH_SEED;
    for &b in &buffer {
        g = g
            .wrapping_mul(BYTE_HASH_MULTIPLIER as u32)
            .wrapping_add(u32::from(b));
    }

    let mut x = h ^ (lo << SUM_LO_SHIFT) ^ hi;
    x = (x << SHLD_COUNT) | (g >> (32 - SHLD_COUNT));
    x ^= ((g as i32) >> SAR_COUNT) as u32;
    x ^= x >> SHR_COUNT;
    let dividend = (u64::from(hi) << 32) | u64::from(x);
    let quotient = (dividend / u64::from(UNSIGNED_DIVISOR)) as u32;
    let remainder = (dividend % u64::from(UNSIGNED_DIVISOR)) as u32;
    x = quotient ^ (remainder << REMAINDER_SHIFT);
    let signed_quotient = (g as i32) / SIGNED_DIVISOR;
    let signed_remainder = (g as i32) % SIGNED_DIVISOR;
    x = (x ^ signed_quotient as u32).wrapping_add(signed_remainder as u32);
    x.wrapping_add(index)
}

/// Everything the guest writes to COM1.
pub fn expected_serial() -> String {
    format!("{CHECKSUM_PREFIX}{:08x}{LINE_END}", expected_checksum())
}

/// The VM's exit status: the debug-exit device turns the byte V written to
/// port 0xf4 into `(V << 1) | 1`.
pub fn expected_exit_status() -> i32 {
    let low_byte = (expected_checksum() & 0xff) as i32;
    ((low_byte << 1) | 1) & 0xff
}

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("checksum guest assembles")
}

struct Data {
    gdtr: u32,
    checksum_prefix: u32,
    line_end: u32,
    mismatch: u32,
    h_slot: u32,
    sum_lo_slot: u32,
    sum_hi_slot: u32,
    checksum_slot: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let addresses = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        checksum_prefix: data.cstr(CHECKSUM_PREFIX),
        line_end: data.cstr(LINE_END),
        mismatch: data.cstr(MISMATCH_LINE),
        h_slot: data.zeroed(4, 4),
        sum_lo_slot: data.zeroed(4, 4),
        sum_hi_slot: data.zeroed(4, 4),
        checksum_slot: data.zeroed(4, 4),
    };

    let mut a = CodeAssembler::new(16)?;
    asm::emit_real_mode_prologue(&mut a)?;
    asm::emit_load_gdt(&mut a, addresses.gdtr)?;
    asm::emit_enter_protected_mode(&mut a)?;
    let code16 = asm::assemble(&mut a, map::CODE16)?.blob;

    let code32 = protected_mode_code(&addresses)?;

    Ok(GuestProgram {
        code: vec![code16, code32],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (SRC, SRC + u64::from(LEN), "source buffer"),
            (DST, DST + u64::from(LEN), "destination buffer"),
        ],
        entry: asm::real_mode_entry(),
    })
}

fn protected_mode_code(addresses: &Data) -> Result<asm::CodeBlob, IcedError> {
    let src = SRC as u32;
    let dst = DST as u32;
    let mut a = CodeAssembler::new(32)?;
    let routines = Routines::new(&mut a);
    asm::emit_load_flat_segments(&mut a)?;
    asm::emit_uart_init(&mut a)?;

    // 1. DST = 0xdeadbeef repeated.
    a.mov(edi, dst)?;
    a.mov(eax, DST_FILL)?;
    a.mov(ecx, LEN / 4)?;
    a.rep().stosd()?;

    // 2. LCG pattern into SRC: EDX:EAX = state * multiplier, keep EAX.
    let mut lcg_step = a.create_label();
    a.mov(edi, src)?;
    a.mov(esi, LCG_SEED)?;
    a.mov(ebx, LCG_MULTIPLIER)?;
    a.mov(ecx, PATTERN_LEN / 4)?;
    a.set_label(&mut lcg_step)?;
    a.mov(eax, esi)?;
    a.mul(ebx)?;
    a.add(eax, LCG_INCREMENT)?;
    a.mov(esi, eax)?;
    a.stosd()?;
    a.dec(ecx)?;
    a.jnz(lcg_step)?;

    // 3. Trailer: EDI already points just past the pattern.
    a.mov(al, i32::from(TRAILER_BYTE))?;
    a.mov(ecx, LEN - PATTERN_LEN)?;
    a.rep().stosb()?;

    // 4. Copy: all but the last dword by dwords, the rest by bytes.
    a.mov(esi, src)?;
    a.mov(edi, dst)?;
    a.mov(ecx, LEN / 4 - 1)?;
    a.rep().movsd()?;
    a.mov(ecx, 4)?;
    a.rep().movsb()?;

    // 5. Verify the copy.
    let mut copy_mismatch = a.create_label();
    a.mov(esi, src)?;
    a.mov(edi, dst)?;
    a.mov(ecx, LEN)?;
    a.repe().cmpsb()?;
    a.jne(copy_mismatch)?;

    // 6. EBP = offset of the first trailer byte value in DST.
    a.mov(edi, dst)?;
    a.mov(al, i32::from(TRAILER_BYTE))?;
    a.mov(ecx, LEN)?;
    a.repne().scasb()?;
    a.lea(ebp, ptr(edi - (dst + 1) as i32))?;

    // 7. Dword pass: EBX = rotate-xor hash, EDX:EDI = 64-bit sum.
    let mut dword_step = a.create_label();
    a.mov(esi, dst)?;
    a.mov(ecx, LEN / 4)?;
    a.mov(ebx, DWORD_HASH_SEED)?;
    a.xor(edi, edi)?;
    a.xor(edx, edx)?;
    a.set_label(&mut dword_step)?;
    a.lodsd()?;
    a.rol(ebx, DWORD_HASH_ROTATE)?;
    a.xor(ebx, eax)?;
    a.add(edi, eax)?;
    a.adc(edx, 0)?;
    a.dec(ecx)?;
    a.jnz(dword_step)?;
    a.mov(dword_ptr(addresses.h_slot), ebx)?;
    a.mov(dword_ptr(addresses.sum_lo_slot), edi)?;
    a.mov(dword_ptr(addresses.sum_hi_slot), edx)?;

    // 8. Byte pass: EBX = g * 33 + b.
    let mut byte_step = a.create_label();
    a.mov(esi, dst)?;
    a.mov(ecx, LEN)?;
    a.mov(ebx, BYTE_HASH_SEED)?;
    a.set_label(&mut byte_step)?;
    a.lodsb()?;
    a.movzx(eax, al)?;
    a.imul_3(ebx, ebx, BYTE_HASH_MULTIPLIER)?;
    a.add(ebx, eax)?;
    a.dec(ecx)?;
    a.jnz(byte_step)?;

    // 9. Mix into EAX.
    a.mov(eax, dword_ptr(addresses.h_slot))?;
    a.mov(edx, dword_ptr(addresses.sum_lo_slot))?;
    a.shl(edx, SUM_LO_SHIFT)?;
    a.xor(eax, edx)?;
    a.xor(eax, dword_ptr(addresses.sum_hi_slot))?;
    a.shld(eax, ebx, SHLD_COUNT)?;
    a.mov(edx, ebx)?;
    a.sar(edx, SAR_COUNT)?;
    a.xor(eax, edx)?;
    a.mov(edx, eax)?;
    a.shr(edx, SHR_COUNT)?;
    a.xor(eax, edx)?;
    // The high half of the sum is far below the divisor: no #DE.
    a.mov(edx, dword_ptr(addresses.sum_hi_slot))?;
    a.mov(ecx, UNSIGNED_DIVISOR)?;
    a.div(ecx)?;
    a.shl(edx, REMAINDER_SHIFT)?;
    a.xor(eax, edx)?;
    a.mov(esi, eax)?;
    a.mov(eax, ebx)?;
    a.cdq()?;
    a.mov(ecx, SIGNED_DIVISOR)?;
    a.idiv(ecx)?;
    a.xor(esi, eax)?;
    a.add(esi, edx)?;
    a.add(esi, ebp)?;
    a.mov(dword_ptr(addresses.checksum_slot), esi)?;

    routines.print(&mut a, addresses.checksum_prefix)?;
    a.mov(eax, dword_ptr(addresses.checksum_slot))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, addresses.line_end)?;
    a.mov(eax, dword_ptr(addresses.checksum_slot))?;
    a.out(u32::from(ports::DEBUG_EXIT), al)?;
    asm::emit_halt(&mut a)?;

    a.set_label(&mut copy_mismatch)?;
    routines.print(&mut a, addresses.mismatch)?;
    asm::emit_halt(&mut a)?;

    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE32)?.blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::asm::testing;

    #[test]
    fn assembles_and_decodes() {
        testing::check_program(&program());
    }

    #[test]
    fn golden_matches_the_rust_model() {
        assert_eq!(
            include_str!("../../golden/checksum.serial.txt"),
            expected_serial()
        );
    }

    #[test]
    fn pattern_has_the_trailer_and_no_early_surprises() {
        let buffer = pattern();
        assert_eq!(buffer.len(), LEN as usize);
        assert!(buffer[PATTERN_LEN as usize..]
            .iter()
            .all(|&b| b == TRAILER_BYTE));
        // The first LCG state after the seed.
        let first = LCG_SEED
            .wrapping_mul(LCG_MULTIPLIER)
            .wrapping_add(LCG_INCREMENT);
        assert_eq!(&buffer[..4], &first.to_le_bytes());
    }

    #[test]
    fn exit_status_follows_the_low_byte() {
        let status = expected_exit_status();
        assert_eq!(status & 1, 1);
        assert_eq!(
            status,
            (((expected_checksum() & 0xff) << 1) | 1) as i32 & 0xff
        );
    }
}
