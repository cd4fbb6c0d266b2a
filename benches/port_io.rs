//! The cost of one guest port access through the machine's I/O path
//! (routing, counters, trace check, interrupt-controller pump, timer
//! deadline), without a CPU: `cargo bench --bench port_io`.
//!
//! Each figure is the median of 7 rounds of 1,000,000 accesses, in
//! nanoseconds per access, on a machine built exactly as `duet run` builds
//! it (interpreter backend, userspace irqchip, no trace file). BENCHMARKS.md
//! quotes the numbers.

use std::hint::black_box;
use std::time::Instant;

use duet::backend::BackendKind;
use duet::machine::{Machine, MachineConfig};

fn accesses() -> u32 {
    std::env::var("PORT_IO_ACCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}
const ROUNDS: usize = 7;

fn median_ns(mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..accesses() {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(accesses())
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

fn main() {
    let cfg = MachineConfig::new(BackendKind::Interp, Box::new(std::io::sink()));
    let mut machine = Machine::new(cfg).expect("machine builds");
    let io = machine.io_handler();
    // Warm up (counters' map entries, caches).
    for _ in 0..10_000 {
        io.io_write(0x80, &[1]);
    }
    let post = median_ns(|| io.io_write(black_box(0x80), black_box(&[0x55])));
    let unmapped = median_ns(|| io.io_write(black_box(0x2f0), black_box(&[0x55])));
    let mut byte = [0u8; 1];
    let lsr = median_ns(|| io.io_read(black_box(0x3fd), black_box(&mut byte)));
    println!("port write 0x80 (POST code):   {post:8.1} ns");
    println!("port write 0x2f0 (unmapped):   {unmapped:8.1} ns");
    println!("port read 0x3fd (COM1 LSR):    {lsr:8.1} ns");
}
