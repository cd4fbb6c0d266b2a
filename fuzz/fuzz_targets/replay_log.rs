#![no_main]
//! See `duet_fuzz::replay_log`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::replay_log(data));
