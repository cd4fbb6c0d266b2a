//! The observation point: every guest access to a device passes through
//! [`DeviceIo`], which routes it to the port or MMIO bus, counts it for
//! `--stats`, and writes it to the `--trace` file.
//!
//! A trace line is backend-neutral, so traces from KVM and from the
//! interpreter can be compared byte for byte:
//!
//! ```text
//! pio  w 0x03f8 1 0x48 com1
//! pio  r 0x03fd 1 0x60 com1
//! mmio r 0xfee00030 4 0x00050014 lapic
//! ```
//!
//! (kind, r/w, address, size in bytes, value as little-endian integer, the
//! device's name or `-` for unmapped addresses).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use devices::{Bus, BusKind, VmControl};

use crate::backend::IoHandler;

/// Errors of the trace writer.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot create trace file {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write trace file: {0}")]
    Write(#[from] std::io::Error),
}

/// Access counters for one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCount {
    pub reads: u64,
    pub writes: u64,
}

/// Writes trace lines; a no-op when no file was given.
pub struct Tracer {
    out: Option<BufWriter<File>>,
    error: Option<std::io::Error>,
}

impl Tracer {
    pub fn disabled() -> Self {
        Tracer {
            out: None,
            error: None,
        }
    }

    pub fn to_file(path: &Path) -> Result<Self, TraceError> {
        let f = File::create(path).map_err(|source| TraceError::Create {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Tracer {
            out: Some(BufWriter::new(f)),
            error: None,
        })
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    fn record(&mut self, kind: BusKind, write: bool, addr: u64, data: &[u8], device: &str) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let r = match kind {
            BusKind::Pio => writeln!(
                out,
                "pio  {} {:#06x} {} {:#0w$x} {}",
                if write { 'w' } else { 'r' },
                addr,
                data.len(),
                value,
                device,
                w = 2 + 2 * n
            ),
            BusKind::Mmio => writeln!(
                out,
                "mmio {} {:#010x} {} {:#0w$x} {}",
                if write { 'w' } else { 'r' },
                addr,
                data.len(),
                value,
                device,
                w = 2 + 2 * n
            ),
        };
        if let Err(e) = r {
            // Stop tracing on the first error, remember it for finish().
            self.error = Some(e);
            self.out = None;
        }
    }

    /// Flush the file; reports any error met while tracing.
    pub fn finish(&mut self) -> Result<(), TraceError> {
        if let Some(e) = self.error.take() {
            return Err(TraceError::Write(e));
        }
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
        }
        Ok(())
    }
}

/// The VMM side of device I/O: buses, tracer, counters, VM control.
pub struct DeviceIo {
    pub pio: Bus,
    pub mmio: Bus,
    pub tracer: Tracer,
    pub control: VmControl,
    counts: BTreeMap<(BusKind, String), AccessCount>,
    unmapped: AccessCount,
}

impl DeviceIo {
    pub fn new(pio: Bus, mmio: Bus, tracer: Tracer, control: VmControl) -> Self {
        DeviceIo {
            pio,
            mmio,
            tracer,
            control,
            counts: BTreeMap::new(),
            unmapped: AccessCount::default(),
        }
    }

    fn access(&mut self, kind: BusKind, addr: u64, data: &mut [u8], write: bool) {
        let bus = match kind {
            BusKind::Pio => &self.pio,
            BusKind::Mmio => &self.mmio,
        };
        let name = bus.resolve(addr, data.len()).map(|r| r.name.to_string());
        if write {
            bus.write(addr, data);
        } else {
            bus.read(addr, data);
        }
        let c = match &name {
            Some(n) => {
                // Avoid allocating a key on the hot path when it exists.
                match self.counts.get_mut(&(kind, n.clone())) {
                    Some(c) => c,
                    None => self.counts.entry((kind, n.clone())).or_default(),
                }
            }
            None => &mut self.unmapped,
        };
        if write {
            c.writes += 1;
        } else {
            c.reads += 1;
        }
        if self.tracer.enabled() {
            self.tracer
                .record(kind, write, addr, data, name.as_deref().unwrap_or("-"));
        }
    }

    /// Per-device access counts (bus, device name) → counts, plus the
    /// unmapped total.
    pub fn counts(&self) -> (&BTreeMap<(BusKind, String), AccessCount>, AccessCount) {
        (&self.counts, self.unmapped)
    }
}

impl IoHandler for DeviceIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.access(BusKind::Pio, u64::from(port), data, false);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.access(BusKind::Pio, u64::from(port), &mut buf[..n], true);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.access(BusKind::Mmio, addr, data, false);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.access(BusKind::Mmio, addr, &mut buf[..n], true);
    }
    fn exit_requested(&self) -> bool {
        self.control.is_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn trace_lines_and_counts() {
        let mut pio = Bus::new(BusKind::Pio);
        pio.insert("echo", 0x3f8, 8, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("duet-trace-test-{}", std::process::id()));
        let tracer = Tracer::to_file(&dir).unwrap();
        let mut io = DeviceIo::new(pio, Bus::new(BusKind::Mmio), tracer, VmControl::new());
        io.pio_write(0x3f8, &[0x48]);
        let mut b = [0u8; 1];
        io.pio_read(0x3fd, &mut b);
        let mut w = [0u8; 4];
        io.mmio_read(0xfec0_0000, &mut w);
        io.tracer.finish().unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(
            text,
            "pio  w 0x03f8 1 0x48 echo\npio  r 0x03fd 1 0x48 echo\nmmio r 0xfec00000 4 0xffffffff -\n"
        );
        let (counts, unmapped) = io.counts();
        assert_eq!(
            counts[&(BusKind::Pio, "echo".to_string())],
            AccessCount {
                reads: 1,
                writes: 1
            }
        );
        assert_eq!(unmapped.reads, 1);
    }
}
