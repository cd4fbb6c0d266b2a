//! duet: one x86-64 machine model, run on KVM or on duet's own interpreter.
//!
//! - [`backend`]: the `Backend`/`Vcpu` traits and the KVM and interpreter
//!   implementations.
//! - [`layout`]: the PC memory map and every device address.
//! - [`machine`]: builds guest memory, the buses and devices, and runs the
//!   vCPU loop.
//! - [`trace`]: the single observation point every device access passes.
//! - [`guests`]: built-in guest programs.

pub mod acpi;
pub mod backend;
pub mod bench;
pub mod bench_io;
pub mod clock;
pub mod console;
pub mod crash;
pub mod device_args;
pub mod difftest;
pub mod guests;
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
