//! KVM's in-kernel interrupt controllers behind [`IrqChip`]: lines go to
//! the backend's GSIs (wired-OR here, since the kernel sees one source for
//! all of userspace), messages to `KVM_SIGNAL_MSI`; the kernel injects by
//! itself, waits in HLT, and owns the LAPIC MSRs and the PIT.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::interrupt::{InterruptMessage, MsiMessage, MsiSink};
use devices::irq::SharedLine;
use devices::{IrqLine, Timed};

use super::{ChipDevice, HaltWait, IrqChip};
use crate::backend::{self, GsiSink, Vcpu};

/// The in-kernel chip's number of GSIs (KVM's IOAPIC pins).
const LINES: u32 = 24;

pub struct KernelIrqChip {
    sink: Arc<dyn GsiSink>,
    lines: Vec<Arc<SharedLine>>,
}

/// Messages for the in-kernel chip.
struct KernelMsi(Arc<dyn GsiSink>);

impl MsiSink for KernelMsi {
    fn signal_msi(&self, msi: MsiMessage) {
        self.0.signal_msi(msi);
    }
}

impl KernelIrqChip {
    pub fn create(sink: Arc<dyn GsiSink>) -> Arc<dyn IrqChip> {
        let lines = (0..LINES)
            .map(|gsi| {
                let s = sink.clone();
                SharedLine::new(Box::new(move |level| s.set_gsi(gsi, level)))
            })
            .collect();
        Arc::new(KernelIrqChip { sink, lines })
    }
}

impl IrqChip for KernelIrqChip {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn irq_line(&self, gsi: u32) -> Box<dyn IrqLine> {
        match self.lines.get(gsi as usize) {
            // The in-kernel PIT owns IRQ0.
            Some(l) if gsi != 0 => Box::new(l.source()),
            _ => Box::new(devices::NullIrq),
        }
    }

    fn msi_sink(&self) -> Arc<dyn MsiSink> {
        Arc::new(KernelMsi(self.sink.clone()))
    }

    fn deliver(&self, msg: InterruptMessage) {
        self.sink.signal_msi(msg.to_msi());
    }

    fn bus_devices(&self) -> Vec<ChipDevice> {
        Vec::new()
    }

    fn timed(&self) -> Vec<Arc<Mutex<dyn Timed + Send>>> {
        Vec::new()
    }

    fn pump(&self) {}

    fn attention(&self) -> bool {
        false
    }

    fn service(&self, _vcpu_id: usize, _vcpu: &mut dyn Vcpu) -> backend::Result<bool> {
        Ok(false)
    }

    fn nmi_pending(&self, _vcpu_id: usize) -> bool {
        false
    }

    fn halt_wait(&self) -> HaltWait {
        HaltWait::InBackend
    }

    fn wait(&self, _timeout: Duration) {}

    fn kick_period(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}
