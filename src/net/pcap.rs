//! `pcap=FILE`: every frame a NIC sends or receives, in the classic
//! libpcap format (LINKTYPE_ETHERNET, microsecond timestamps), stamped
//! with the VM clock. Under `--clock virtual` the timestamps follow the
//! guest's instruction count, so a repeated run writes the same capture.
//!
//! [`PcapBackend`] wraps any network backend; a frame is written when the
//! device takes it, in the order the guest sees them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use devices::virtio::net::{GuestOffloads, NetBackend, NetHeader, RxFrame};
use devices::Clock;

/// The classic pcap magic (microsecond timestamps), version 2.4.
const MAGIC: u32 = 0xa1b2_c3d4;
const LINKTYPE_ETHERNET: u32 = 1;
pub const SNAPLEN: u32 = 65_535 + 18;

/// Writes pcap records.
pub struct PcapWriter {
    out: BufWriter<File>,
    clock: Arc<dyn Clock>,
    /// Unix time (seconds) of VM time 0.
    epoch: u64,
    failed: bool,
}

impl PcapWriter {
    /// Create `path` and write the file header.
    pub fn create(path: &Path, clock: Arc<dyn Clock>, epoch: u64) -> std::io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        out.flush()?;
        Ok(PcapWriter {
            out,
            clock,
            epoch,
            failed: false,
        })
    }

    /// Record one frame (a write error stops the capture, logged once).
    pub fn record(&mut self, frame: &[u8]) {
        if self.failed {
            return;
        }
        let ns = self.clock.now_ns();
        let secs = self.epoch + ns / 1_000_000_000;
        let usecs = (ns % 1_000_000_000) / 1000;
        let incl = (frame.len() as u32).min(SNAPLEN);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(secs as u32).to_le_bytes());
        h[4..8].copy_from_slice(&(usecs as u32).to_le_bytes());
        h[8..12].copy_from_slice(&incl.to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        let r = self
            .out
            .write_all(&h)
            .and_then(|()| self.out.write_all(&frame[..incl as usize]))
            .and_then(|()| self.out.flush());
        if let Err(e) = r {
            self.failed = true;
            log::error!("pcap: writing the capture failed, capture stopped: {e}");
        }
    }
}

/// A network backend whose traffic is also written to a capture.
pub struct PcapBackend {
    inner: Box<dyn NetBackend>,
    pcap: PcapWriter,
    /// A received frame the device gave back (already captured).
    requeued: Option<RxFrame>,
}

impl PcapBackend {
    pub fn new(inner: Box<dyn NetBackend>, pcap: PcapWriter) -> Self {
        PcapBackend {
            inner,
            pcap,
            requeued: None,
        }
    }
}

impl NetBackend for PcapBackend {
    fn send(&mut self, header: &NetHeader, frame: &[u8]) {
        self.pcap.record(frame);
        self.inner.send(header, frame);
    }

    fn recv(&mut self) -> Option<RxFrame> {
        if let Some(f) = self.requeued.take() {
            return Some(f);
        }
        let f = self.inner.recv()?;
        self.pcap.record(&f.data);
        Some(f)
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.requeued = Some(frame);
    }

    fn recycle(&mut self, buffer: Vec<u8>) {
        self.inner.recycle(buffer);
    }

    fn offloads(&self) -> bool {
        self.inner.offloads()
    }

    fn set_guest_offloads(&mut self, o: GuestOffloads) {
        self.inner.set_guest_offloads(o);
    }

    fn describe(&self) -> String {
        format!("{} (captured)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::ManualClock;

    #[test]
    fn records_carry_vm_time_and_lengths() {
        let path = std::env::temp_dir().join(format!("duet-pcap-{}.pcap", std::process::id()));
        let clock = Arc::new(ManualClock::new());
        let mut w = PcapWriter::create(&path, clock.clone(), 1000).unwrap();
        clock.set(2_500_000_000);
        w.record(&[1, 2, 3]);
        drop(w);
        let b = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(&b[0..4], &MAGIC.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 1);
        let rec = &b[24..];
        assert_eq!(u32::from_le_bytes(rec[0..4].try_into().unwrap()), 1002);
        assert_eq!(u32::from_le_bytes(rec[4..8].try_into().unwrap()), 500_000);
        assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), 3);
        assert_eq!(&rec[16..], &[1, 2, 3]);
    }
}
