#![no_main]
//! See `duet_fuzz::loader_elf_pvh`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::loader_elf_pvh(data));
