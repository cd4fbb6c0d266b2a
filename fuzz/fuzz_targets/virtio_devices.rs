#![no_main]
//! See `duet_fuzz::virtio_devices`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| duet_fuzz::virtio_devices(data));
