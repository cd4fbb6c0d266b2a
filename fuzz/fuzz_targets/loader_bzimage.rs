#![no_main]
//! See `duet_fuzz::loader_bzimage`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::loader_bzimage(data));
