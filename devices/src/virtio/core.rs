//! The transport-independent half of a virtio device: feature
//! negotiation, the status register, the queue registers, activation on
//! DRIVER_OK, reset, and NEEDS_RESET when the guest breaks the rules.
//! Both transports keep one [`VirtioCore`] and map their registers onto it.

use serde::{Deserialize, Serialize};

use super::queue::QueueConfig;
use super::{feature, status, DeviceFault, GuestMemory, Signals, VirtioDevice, Virtqueue};
use crate::ratelimit::LogOnce;

/// The registers of a virtio function, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioCoreState {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    /// Per queue: size, ready, desc, driver, device.
    pub queues: Vec<(u16, bool, u64, u64, u64)>,
}

/// Feature negotiation, status and queue registers of one device.
pub struct VirtioCore {
    name: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    offered: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    pub queue_select: u16,
    queues: Vec<QueueConfig>,
    active: bool,
    fault_log: LogOnce,
}

impl VirtioCore {
    pub fn new(name: &str, device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(QueueConfig::new)
            .collect();
        let offered = device.features() | feature::VERSION_1;
        VirtioCore {
            name: name.to_string(),
            device,
            mem,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            active: false,
            fault_log: LogOnce::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The 32 feature bits the device-feature selector points at.
    pub fn device_features_word(&self) -> u32 {
        match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    pub fn driver_features_word(&self) -> u32 {
        match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 feature bits (only before FEATURES_OK).
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = self.driver_features & !0xffff_ffff | u64::from(value),
            1 => self.driver_features = self.driver_features & 0xffff_ffff | u64::from(value) << 32,
            _ => {}
        }
    }

    /// The selected queue's registers (a dummy for an out-of-range select:
    /// its size reads 0, which tells the driver the queue does not exist).
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue's registers for writing; none while the device
    /// runs (the specification forbids changing them then) or when the
    /// select is out of range.
    pub fn selected_mut(&mut self) -> Option<&mut QueueConfig> {
        if self.active {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub fn queue(&self, index: usize) -> Option<&QueueConfig> {
        self.queues.get(index)
    }

    /// A status write: feature negotiation, activation, reset. Returns what
    /// to signal (activation may already produce used buffers; a fault a
    /// configuration interrupt).
    pub fn write_status(&mut self, value: u8) -> Signals {
        if value == 0 {
            self.reset();
            return Signals::default();
        }
        let old = self.status;
        let mut new = value & !status::NEEDS_RESET | old & status::NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            // Only offered features, and VERSION_1 (this is a modern device).
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & feature::VERSION_1 != 0;
            if !ok {
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FEATURES_OK != 0
            && new & status::NEEDS_RESET == 0
        {
            return self.activate();
        }
        Signals::default()
    }

    fn activate(&mut self) -> Signals {
        let event_idx = self.driver_features & feature::EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready {
                queues.push(None);
                continue;
            }
            match Virtqueue::new(q, event_idx, self.mem.clone()) {
                Ok(v) => queues.push(Some(v)),
                Err(error) => return self.fault(DeviceFault::Queue { queue: i, error }),
            }
        }
        self.active = true;
        match self
            .device
            .activate(self.mem.clone(), self.driver_features, queues)
        {
            Ok(s) => s,
            Err(f) => self.fault(f),
        }
    }

    /// The driver notified `queue`.
    pub fn notify(&mut self, queue: usize) -> Signals {
        if !self.active || self.status & status::NEEDS_RESET != 0 || queue >= self.queues.len() {
            return Signals::default();
        }
        match self.device.notify(queue) {
            Ok(s) => s,
            Err(f) => self.fault(f),
        }
    }

    /// Host input may be pending.
    pub fn poll(&mut self) -> Signals {
        if !self.active || self.status & status::NEEDS_RESET != 0 {
            return Signals::default();
        }
        match self.device.poll() {
            Ok(s) => s,
            Err(f) => self.fault(f),
        }
    }

    /// The guest broke the rules: NEEDS_RESET, a configuration interrupt,
    /// one log line per device.
    pub fn fault(&mut self, f: DeviceFault) -> Signals {
        if self.fault_log.first() {
            log::warn!(
                "{}: {f}; device needs a reset (logged once per device)",
                self.name
            );
        }
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        Signals::config()
    }

    /// Device reset: registers to their initial values, the device idle.
    pub fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }

    /// Read device configuration; accesses outside it read zero.
    pub fn read_config(&self, offset: usize, data: &mut [u8]) {
        let len = self.device.config_len();
        if offset.checked_add(data.len()).is_some_and(|e| e <= len) {
            self.device.read_config(offset, data);
        } else {
            data.fill(0);
        }
    }

    pub fn write_config(&mut self, offset: usize, data: &[u8]) {
        let len = self.device.config_len();
        if offset.checked_add(data.len()).is_some_and(|e| e <= len) {
            self.device.write_config(offset, data);
        }
    }

    pub fn state(&self) -> VirtioCoreState {
        VirtioCoreState {
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| (q.size, q.ready, q.desc, q.driver, q.device))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::memory;

    /// A device that counts notifications and returns a used-buffer signal.
    struct Dummy {
        notified: Vec<usize>,
        active: bool,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8, 8]
        }
        fn features(&self) -> u64 {
            feature::COMMON | 1
        }
        fn config_len(&self) -> usize {
            4
        }
        fn read_config(&self, offset: usize, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(
            &mut self,
            _m: GuestMemory,
            _f: u64,
            _q: Vec<Option<Virtqueue>>,
        ) -> Result<Signals, DeviceFault> {
            self.active = true;
            Ok(Signals::default())
        }
        fn reset(&mut self) {
            self.active = false;
        }
        fn notify(&mut self, q: usize) -> Result<Signals, DeviceFault> {
            self.notified.push(q);
            Ok(Signals::queue(q))
        }
    }

    fn core() -> VirtioCore {
        VirtioCore::new(
            "dummy",
            Box::new(Dummy {
                notified: Vec::new(),
                active: false,
            }),
            memory(),
        )
    }

    fn negotiate(c: &mut VirtioCore, features: u64) {
        c.write_status(status::ACKNOWLEDGE | status::DRIVER);
        c.driver_feature_select = 0;
        c.write_driver_features(features as u32);
        c.driver_feature_select = 1;
        c.write_driver_features((features >> 32) as u32);
        c.write_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits_only() {
        let mut c = core();
        negotiate(&mut c, 1);
        assert_eq!(c.status() & status::FEATURES_OK, 0, "no VERSION_1");
        c.write_status(0);
        negotiate(&mut c, feature::VERSION_1 | 1 << 40);
        assert_eq!(c.status() & status::FEATURES_OK, 0, "not offered");
        c.write_status(0);
        negotiate(&mut c, feature::VERSION_1 | feature::EVENT_IDX | 1);
        assert_ne!(c.status() & status::FEATURES_OK, 0);
        c.device_feature_select = 1;
        assert_eq!(c.device_features_word(), 1, "VERSION_1 is bit 32");
    }

    #[test]
    fn a_bad_queue_at_driver_ok_means_needs_reset() {
        let mut c = core();
        negotiate(&mut c, feature::VERSION_1);
        c.queue_select = 0;
        let q = c.selected_mut().unwrap();
        q.size = 3;
        q.ready = true;
        let s = c.write_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(s.config);
        assert_ne!(c.status() & status::NEEDS_RESET, 0);
        assert!(c.notify(0).is_empty(), "no work after a fault");
        c.write_status(0);
        assert_eq!(c.status(), 0);
        assert_eq!(c.queue(0).unwrap().size, 8);
    }

    #[test]
    fn notifications_reach_an_active_device_only() {
        let mut c = core();
        assert!(c.notify(0).is_empty());
        negotiate(&mut c, feature::VERSION_1);
        c.write_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(c.is_active());
        assert_eq!(c.notify(1), Signals::queue(1));
        assert!(c.notify(7).is_empty(), "no such queue");
        assert!(
            c.selected_mut().is_none(),
            "queue registers locked while running"
        );
    }
}
