//! virtio 1.x: the device-independent core, two transports and four
//! devices.
//!
//! ```text
//!  guest driver ──registers──► transport (pci.rs: virtio-pci modern, mmio.rs: virtio-mmio v2)
//!                                │  VirtioCore (core.rs): features, status, queue registers,
//!                                │  activation, reset, NEEDS_RESET on guest faults
//!                                ▼
//!                        dyn VirtioDevice (block.rs, net.rs, console.rs, rng.rs)
//!                                │  Virtqueue (queue.rs): split rings on rust-vmm's
//!                                │  virtio-queue, with every descriptor chain checked
//!                                ▼
//!                        Signals ──► transport raises MSI-X vectors, INTx or the MMIO line
//! ```
//!
//! Devices never raise interrupts themselves: every call into a device
//! returns [`Signals`] (which queues have new used buffers that the driver
//! wants to hear about, whether the configuration changed), and the
//! transport turns those into its own interrupt mechanism. Work happens
//! synchronously on the vCPU thread, when the driver notifies a queue or
//! when the machine calls [`VirtioDevice::poll`] after a host input (a
//! received frame, console input) became pending: every nondeterministic
//! input enters through the device's backend at those points only, which
//! is what a recorder needs.
//!
//! Guest mistakes (a descriptor loop, an index or address out of range,
//! a writable descriptor before a readable one, a malformed indirect
//! table, an available index more than a queue ahead) set the device
//! status bit `DEVICE_NEEDS_RESET` and raise a configuration interrupt, as
//! the specification asks (2.1.2); the device then does nothing until the
//! driver resets it. One log line per device says what happened.

pub mod block;
pub mod console;
pub mod core;
pub mod inbox;
pub mod mmio;
pub mod net;
pub mod overlay;
pub mod pci;
pub mod queue;
pub mod rng;

pub use self::core::VirtioCore;
pub use queue::{Chain, QueueError, Segment, Virtqueue};

/// Guest memory as the devices see it (with its write log, and a watcher
/// of every access when a device trace is written).
pub use crate::dma::DmaMemory as GuestMemory;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Feature bits every duet device offers or that the core interprets.
pub mod feature {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    pub const INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
    pub const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// What every device offers besides its own bits.
    pub const COMMON: u64 = VERSION_1 | INDIRECT_DESC | EVENT_IDX;
}

/// Device types (virtio 1.2, 5).
pub mod device_type {
    pub use virtio_bindings::virtio_ids::{
        VIRTIO_ID_BLOCK as BLOCK, VIRTIO_ID_CONSOLE as CONSOLE, VIRTIO_ID_NET as NET,
        VIRTIO_ID_RNG as RNG,
    };
}

/// What a device asks its transport to signal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// One bit per queue with used buffers the driver wants an interrupt for.
    pub queues: u64,
    /// The device configuration changed.
    pub config: bool,
}

impl Signals {
    pub fn queue(index: usize) -> Self {
        Signals {
            queues: 1u64 << (index % 64),
            config: false,
        }
    }

    pub fn config() -> Self {
        Signals {
            queues: 0,
            config: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queues == 0 && !self.config
    }
}

impl std::ops::BitOrAssign for Signals {
    fn bitor_assign(&mut self, o: Signals) {
        self.queues |= o.queues;
        self.config |= o.config;
    }
}

/// Something the guest did that the device cannot go on from: the core
/// sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceFault {
    #[error("queue {queue}: {error}")]
    Queue { queue: usize, error: QueueError },
    #[error("{0}")]
    Request(String),
}

/// A virtio device behind either transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; their number is the device's queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Features offered (with [`feature::COMMON`]).
    fn features(&self) -> u64;

    /// Bytes of device-specific configuration space.
    fn config_len(&self) -> usize;

    /// Read device configuration at `offset` (the transport checks the
    /// range against [`VirtioDevice::config_len`]).
    fn read_config(&self, offset: usize, data: &mut [u8]);

    /// Write device configuration (most fields are read-only).
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}

    /// The driver set DRIVER_OK: start with these queues (`None` for a
    /// queue the driver did not enable) and the negotiated features.
    fn activate(
        &mut self,
        mem: GuestMemory,
        features: u64,
        queues: Vec<Option<Virtqueue>>,
    ) -> Result<Signals, DeviceFault>;

    /// The driver reset the device: drop the queues and in-flight state.
    fn reset(&mut self);

    /// The driver notified queue `queue` (only called while active).
    fn notify(&mut self, queue: usize) -> Result<Signals, DeviceFault>;

    /// Host input may be pending (a frame arrived, console input): move it
    /// into the guest's buffers (only called while active).
    fn poll(&mut self) -> Result<Signals, DeviceFault> {
        Ok(Signals::default())
    }

    /// The device's state for snapshots and traces: a short text of its
    /// counters (devices that have more override it).
    fn describe(&self) -> String {
        String::new()
    }
}

/// Read `data.len()` bytes of a little-endian configuration structure
/// `bytes` at `offset`; bytes past its end read as zero.
pub fn read_config_bytes(bytes: &[u8], offset: usize, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i)
            .and_then(|o| bytes.get(o))
            .copied()
            .unwrap_or(0);
    }
}
