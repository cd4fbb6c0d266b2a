#![no_main]
//! See `duet_fuzz::loader_multiboot`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::loader_multiboot(data));
