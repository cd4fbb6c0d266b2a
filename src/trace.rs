//! The device trace (`--trace`): every guest access that
//! [`crate::io::DeviceIo`] routes is written here as one line.
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
//! device's name or `-` for unmapped addresses). A read whose value depends
//! on elapsed time (a PIT count, the LAPIC current count, RTC time, the TSC
//! through port 0x61 polling...) ends in ` time`; [`compare_traces`] masks
//! the value of such lines.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use devices::BusKind;

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

/// The default bound on a trace file (`--trace-limit`).
pub const DEFAULT_TRACE_LIMIT: u64 = 4 << 30;

/// A file that counts the bytes written to it.
struct Counted {
    file: File,
    written: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes trace lines; a no-op when no file was given. The file is bounded:
/// when it reaches its limit, tracing stops with a last line that says so
/// (`# trace stopped: ...`) and a warning, never silently.
pub struct Tracer {
    out: Option<BufWriter<Counted>>,
    error: Option<std::io::Error>,
    limit: u64,
    /// The replayable device-level trace (`--device-trace`).
    devices: Option<crate::replay::devtrace::DeviceTraceWriter>,
}

impl Tracer {
    pub fn disabled() -> Self {
        Tracer {
            out: None,
            error: None,
            limit: u64::MAX,
            devices: None,
        }
    }

    /// Trace to `path`, at most `limit` bytes (roughly: checked as the
    /// buffer is written out).
    pub fn to_file(path: &Path, limit: u64) -> Result<Self, TraceError> {
        let file = File::create(path).map_err(|source| TraceError::Create {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Tracer {
            out: Some(BufWriter::new(Counted { file, written: 0 })),
            error: None,
            limit,
            devices: None,
        })
    }

    /// Also write a replayable device-level trace.
    pub fn set_device_trace(&mut self, w: crate::replay::devtrace::DeviceTraceWriter) {
        self.devices = Some(w);
    }

    /// The device-level trace, when one is written.
    #[inline]
    pub fn devices(&mut self) -> Option<&mut crate::replay::devtrace::DeviceTraceWriter> {
        self.devices.as_mut()
    }

    /// The device trace's clock mark (0 without one); see
    /// [`crate::replay::devtrace::DeviceTraceWriter::mark`].
    #[inline]
    pub fn mark(&self) -> u64 {
        self.devices.as_ref().map_or(0, |d| d.mark())
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    pub(crate) fn record(
        &mut self,
        kind: BusKind,
        write: bool,
        addr: u64,
        data: &[u8],
        device: &str,
        timed: bool,
    ) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let mark = if timed { " time" } else { "" };
        let r = match kind {
            BusKind::Pio => writeln!(
                out,
                "pio  {} {:#06x} {} {:#0w$x} {}{mark}",
                if write { 'w' } else { 'r' },
                addr,
                data.len(),
                value,
                device,
                w = 2 + 2 * n
            ),
            BusKind::Mmio => writeln!(
                out,
                "mmio {} {:#010x} {} {:#0w$x} {}{mark}",
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
            return;
        }
        if out.get_ref().written >= self.limit {
            let note = format!(
                "# trace stopped: the file reached its limit of {} bytes (--trace-limit)",
                self.limit
            );
            log::warn!("{note}");
            if let Err(e) = writeln!(out, "{note}").and_then(|()| out.flush()) {
                self.error = Some(e);
            }
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
        if let Some(d) = self.devices.as_mut() {
            d.finish()?;
        }
        Ok(())
    }
}

/// Compare two traces, masking the value of time-dependent reads. Returns
/// the first difference (1-based line number and both lines).
pub fn compare_traces(a: &str, b: &str) -> Option<(usize, String, String)> {
    fn mask(l: &str) -> String {
        if let Some(stripped) = l.strip_suffix(" time") {
            let mut f: Vec<&str> = stripped.split_whitespace().collect();
            if f.len() >= 5 {
                f[4] = "<time>";
            }
            f.join(" ")
        } else {
            l.to_string()
        }
    }
    let (mut la, mut lb) = (a.lines(), b.lines());
    let mut n = 0;
    loop {
        n += 1;
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) => {
                let (x, y) = (x.unwrap_or("<end>"), y.unwrap_or("<end>"));
                if mask(x) != mask(y) {
                    return Some((n, x.to_string(), y.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_masks_time_dependent_values_only() {
        let a = "pio  r 0x0040 1 0x12 pit time\npio  w 0x03f8 1 0x41 com1\n";
        let b = "pio  r 0x0040 1 0x99 pit time\npio  w 0x03f8 1 0x41 com1\n";
        assert_eq!(compare_traces(a, b), None);
        let c = "pio  r 0x0040 1 0x12 pit time\npio  w 0x03f8 1 0x42 com1\n";
        assert_eq!(compare_traces(a, c).unwrap().0, 2);
        // A missing marker or a different address is a difference.
        let d = "pio  r 0x0041 1 0x12 pit time\npio  w 0x03f8 1 0x41 com1\n";
        assert_eq!(compare_traces(a, d).unwrap().0, 1);
        assert_eq!(compare_traces(a, "").unwrap().0, 1);
    }

    #[test]
    fn a_trace_stops_at_its_limit_and_says_so() {
        let path = std::env::temp_dir().join(format!("duet-trace-limit-{}", std::process::id()));
        let mut t = Tracer::to_file(&path, 64 << 10).unwrap();
        for k in 0..1_000_000u64 {
            t.record(BusKind::Pio, true, 0x3f8, &[k as u8], "com1", false);
        }
        t.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).ok();
        // The buffer (8 KiB) is written out whole: the bound holds within it.
        assert!(text.len() < (64 << 10) + (16 << 10), "{} bytes", text.len());
        assert!(text.lines().count() > 1000);
        assert_eq!(
            text.lines().last(),
            Some("# trace stopped: the file reached its limit of 65536 bytes (--trace-limit)")
        );
        assert!(!t.enabled());
    }
}
