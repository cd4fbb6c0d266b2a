#![no_main]
//! See `duet_fuzz::device_registers`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::device_registers(data));
