//! duet: one x86-64 machine model, run on KVM or on duet's own interpreter.
//!
//! - [`backend`]: the `Backend`/`Vcpu` traits and the KVM and interpreter
//!   implementations.
//! - [`layout`]: the PC memory map and every device address.
//! - [`machine`]: builds guest memory, the buses and devices, and runs the
//!   vCPU loop.
//! - [`trace`]: the single observation point every device access passes.
//! - [`guests`]: built-in guest programs.
//!
//! The test bed around the VMM lives outside `src/`, in `testbed/`, and is
//! compiled in here as its own module tree (the CLI reaches it): the
//! built-in guests ([`guests`]), the differential tester ([`difftest`]) and
//! the benchmarks ([`bench`], [`bench_io`]). The VMM's modules do not use
//! it, except the machine builder loading a built-in guest's image.

pub mod acpi;
pub mod backend;
pub mod clock;
pub mod console;
pub mod crash;
pub mod device_args;
pub mod hvc;
pub mod io;
pub mod irqchip;
pub mod layout;
pub mod loader;
pub mod machine;
pub mod mptable;
pub mod net;
pub mod replay;
pub mod sandbox;
pub mod serial_port;
pub mod signals;
pub mod state;
pub mod stats;
pub mod ticker;
pub mod timers;
pub mod trace;
pub mod virtio;

// The test bed (testbed/): guests, differential tester, benchmarks.
#[path = "../testbed/bench.rs"]
pub mod bench;
#[path = "../testbed/bench_io/mod.rs"]
pub mod bench_io;
#[path = "../testbed/difftest/mod.rs"]
pub mod difftest;
#[path = "../testbed/guests/mod.rs"]
pub mod guests;
