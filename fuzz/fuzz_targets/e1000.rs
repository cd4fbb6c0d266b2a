#![no_main]
//! See `duet_fuzz::e1000`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::e1000(data));
