//! Network backends for the NICs: `tap` ([`tap`]), `user` ([`slirp`]),
//! `loopback` for the built-in guests ([`loopback`]), and
//! the `pcap=` capture any of them can be wrapped in ([`pcap`]).
//!
//! A backend is a [`NetBackend`]: the device hands it the guest's frames
//! and pulls received ones from it. Received frames wait in an inbox that
//! a host thread fills; they enter the guest only when the machine polls
//! the device (see `src/virtio.rs`), which is the point a recorder logs.

use std::sync::Arc;

use devices::virtio::inbox::InputNotifier;
use devices::virtio::net::NetBackend;
use devices::Clock;

use crate::device_args::{NetBackendSpec, NetSpec};

pub mod loopback;
pub mod pcap;
pub mod slirp;
pub mod tap;

/// Errors setting up a network backend (host side; the caller adds the flag).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Tap(String),
    #[error("{0}")]
    User(String),
    #[error("pcap={path}: cannot create it: {reason}")]
    Pcap { path: String, reason: String },
}

/// The MAC address of the `index`th NIC when none is given: QEMU's
/// default, 52:54:00:12:34:56, counting up.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Open the backend `spec` names, wrapped in a capture if it asks for one.
pub fn open(
    spec: &NetSpec,
    notifier: Arc<dyn InputNotifier>,
    clock: Arc<dyn Clock>,
    epoch: u64,
) -> Result<Box<dyn NetBackend>, NetError> {
    let backend: Box<dyn NetBackend> = match &spec.backend {
        NetBackendSpec::User { hostfwd } => Box::new(slirp::SlirpBackend::open(hostfwd, notifier)?),
        NetBackendSpec::Tap { ifname } => Box::new(tap::TapBackend::open(ifname, notifier)?),
        NetBackendSpec::Loopback => Box::new(loopback::LoopbackBackend::new()),
    };
    Ok(match &spec.pcap {
        Some(path) => {
            let w = pcap::PcapWriter::create(path, clock, epoch).map_err(|e| NetError::Pcap {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            Box::new(pcap::PcapBackend::new(backend, w))
        }
        None => backend,
    })
}
