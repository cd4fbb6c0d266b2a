#![no_main]
//! See `duet_fuzz::cpu_exec`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::cpu_exec(data));
