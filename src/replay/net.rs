//! Network frames through the door: a recording wrapper around a NIC's
//! backend logs every frame it delivers with the number of the receive
//! call that got it; the replay backend hands the same frames back on the
//! same calls and drops what the guest sends (no network at all).
//!
//! The device asks for frames only when the machine polls it (host input,
//! logged) or when the guest notifies a queue (deterministic), so the
//! receive calls are numbered the same in both runs. A frame the device
//! cannot take yet (`unrecv`) is kept by the wrapper itself and returned by
//! the next call, unlogged, in both runs alike.

use std::sync::{Arc, Mutex};

use devices::virtio::net::{GuestOffloads, NetBackend, NetHeader, RxFrame};

use super::log::Event;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records what `inner` delivers.
pub struct RecordingNet {
    inner: Box<dyn NetBackend>,
    device: u8,
    calls: u64,
    stash: Option<RxFrame>,
    log: Arc<Mutex<Vec<Event>>>,
}

impl RecordingNet {
    pub fn new(inner: Box<dyn NetBackend>, device: u8, log: Arc<Mutex<Vec<Event>>>) -> Self {
        RecordingNet {
            inner,
            device,
            calls: 0,
            stash: None,
            log,
        }
    }
}

impl NetBackend for RecordingNet {
    fn send(&mut self, header: &NetHeader, frame: &[u8]) {
        self.inner.send(header, frame);
    }

    fn recv(&mut self) -> Option<RxFrame> {
        if let Some(f) = self.stash.take() {
            return Some(f);
        }
        self.calls += 1;
        let f = self.inner.recv()?;
        lock(&self.log).push(Event::NetRx {
            device: self.device,
            call: self.calls,
            header: f.header.to_vec(),
            frame: f.data.clone(),
        });
        Some(f)
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.stash = Some(frame);
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
        format!("{} (recorded)", self.inner.describe())
    }
}

/// A received frame: the receive call that got it, its virtio-net header
/// and the frame.
pub type RxEntry = (u64, Vec<u8>, Vec<u8>);

/// The frames one NIC received, by receive call.
pub struct RxScript {
    frames: std::collections::VecDeque<RxEntry>,
}

impl RxScript {
    pub fn new(mut frames: Vec<RxEntry>) -> Self {
        frames.sort_by_key(|f| f.0);
        RxScript {
            frames: frames.into(),
        }
    }
}

/// Plays a recorded NIC's received frames back; sends go nowhere.
pub struct ReplayNet {
    script: Arc<Mutex<RxScript>>,
    calls: u64,
    stash: Option<RxFrame>,
    offloads: bool,
}

impl ReplayNet {
    /// `offloads`: whether the recorded backend offered offloads (tap).
    pub fn new(script: Arc<Mutex<RxScript>>, offloads: bool) -> Self {
        ReplayNet {
            script,
            calls: 0,
            stash: None,
            offloads,
        }
    }
}

impl NetBackend for ReplayNet {
    fn send(&mut self, _header: &NetHeader, _frame: &[u8]) {}

    fn recv(&mut self) -> Option<RxFrame> {
        if let Some(f) = self.stash.take() {
            return Some(f);
        }
        self.calls += 1;
        let mut s = lock(&self.script);
        if s.frames.front().is_some_and(|f| f.0 == self.calls) {
            let (_, h, data) = s.frames.pop_front()?;
            let mut header: NetHeader = Default::default();
            let n = h.len().min(header.len());
            header[..n].copy_from_slice(&h[..n]);
            return Some(RxFrame { header, data });
        }
        None
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.stash = Some(frame);
    }

    fn offloads(&self) -> bool {
        self.offloads
    }

    fn describe(&self) -> String {
        "replayed frames (no network)".into()
    }
}
