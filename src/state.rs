//! The machine's typed device list and its whole saved state.
//!
//! Every device model the machine builds is kept here with its concrete
//! type ([`DeviceHandle`]), under the name the trace and `--stats` use, so
//! the machine can enumerate, save and restore them. [`MachineState`] is
//! the whole machine: the vCPU's [`CpuState`], the VM clock's time and
//! every device's versioned [`Stateful`] state. Record/replay hashes it at
//! checkpoints and compares it at the end of a replay; snapshots will
//! store it.
//!
//! The encoding is JSON (`serde_json`): self-describing, so a difference
//! can be shown field by field, and deterministic (device states are
//! structs, sequences and `BTreeMap`s), so equal states give equal bytes.

use std::sync::{Arc, Mutex, MutexGuard};

use cpu_interp::state::CpuState;
use devices::acpi_pm::AcpiPm;
use devices::debug_exit::DebugExit;
use devices::i8042::I8042;
use devices::ioapic::Ioapic;
use devices::lapic::Lapic;
use devices::pci::host_bridge::HostBridge;
use devices::pci::root::PciConfigIo;
use devices::pci::test_device::PciTestDevice;
use devices::pic8259::Pic8259Pair;
use devices::pit8254::Pit8254;
use devices::post_code::PostCode;
use devices::rtc_cmos::RtcCmos;
use devices::state::{StateError, Stateful, Versioned};
use devices::uart16550::Uart16550;
use devices::virtio::mmio::VirtioMmio;
use devices::virtio::pci::VirtioPci;
use serde::{Deserialize, Serialize};

use crate::clock::ClockState;

/// Errors saving or restoring the machine's state.
#[derive(Debug, thiserror::Error)]
pub enum MachineStateError {
    #[error("machine state format {found}, this duet reads format {expected}")]
    Format { found: u32, expected: u32 },
    #[error(
        "the saved state has no device '{0}' (it was saved from another machine configuration)"
    )]
    MissingDevice(String),
    #[error("the saved state has a device '{0}' this machine does not have")]
    ExtraDevice(String),
    #[error("device '{name}': {source}")]
    Device { name: String, source: StateError },
    #[error("device '{name}': its state cannot be encoded or decoded: {reason}")]
    Encoding { name: String, reason: String },
    #[error("device '{0}' cannot restore a saved state yet")]
    NotRestorable(String),
    #[error("vCPU state: {0}")]
    Cpu(String),
    #[error("machine state is not valid JSON: {0}")]
    Decode(String),
}

/// A device model with its concrete type.
#[derive(Clone)]
pub enum DeviceHandle {
    Uart(Arc<Mutex<Uart16550>>),
    Rtc(Arc<Mutex<RtcCmos>>),
    I8042(Arc<Mutex<I8042>>),
    AcpiPm(Arc<Mutex<AcpiPm>>),
    PostCode(Arc<Mutex<PostCode>>),
    DebugExit(Arc<Mutex<DebugExit>>),
    PciConfigIo(Arc<Mutex<PciConfigIo>>),
    HostBridge(Arc<Mutex<HostBridge>>),
    PciTest(Arc<Mutex<PciTestDevice>>),
    Pic(Arc<Mutex<Pic8259Pair>>),
    Ioapic(Arc<Mutex<Ioapic>>),
    Lapic(Arc<Mutex<Lapic>>),
    Pit(Arc<Mutex<Pit8254>>),
    Hpet(Arc<Mutex<devices::hpet::Hpet>>),
    VirtioPci(Arc<Mutex<VirtioPci>>),
    VirtioMmio(Arc<Mutex<VirtioMmio>>),
    E1000(Arc<Mutex<devices::e1000::E1000>>),
}

/// One entry of the machine's device list.
#[derive(Clone)]
pub struct MachineDevice {
    /// Unique within the machine (the trace's name for its registers
    /// where it has one range).
    pub name: String,
    pub handle: DeviceHandle,
}

impl MachineDevice {
    pub fn new(name: impl Into<String>, handle: DeviceHandle) -> Self {
        MachineDevice {
            name: name.into(),
            handle,
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One device's saved state: its kind and version (from [`Stateful`]) and
/// the state as a JSON value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedDevice {
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub state: serde_json::Value,
}

fn save_one<T: Stateful>(name: &str, d: &Mutex<T>) -> Result<SavedDevice, MachineStateError> {
    let v = lock(d).save_versioned();
    Ok(SavedDevice {
        name: name.to_string(),
        kind: v.kind,
        version: v.version,
        state: serde_json::to_value(&v.state).map_err(|e| MachineStateError::Encoding {
            name: name.to_string(),
            reason: e.to_string(),
        })?,
    })
}

fn load_one<T: Stateful>(d: &Mutex<T>, s: &SavedDevice) -> Result<(), MachineStateError> {
    let state: T::State =
        serde_json::from_value(s.state.clone()).map_err(|e| MachineStateError::Encoding {
            name: s.name.clone(),
            reason: e.to_string(),
        })?;
    lock(d)
        .load_versioned(&Versioned {
            kind: s.kind.clone(),
            version: s.version,
            state,
        })
        .map_err(|source| MachineStateError::Device {
            name: s.name.clone(),
            source,
        })
}

/// A save-only state (a model that does not implement [`Stateful`] yet).
fn save_plain<S: Serialize>(
    name: &str,
    kind: &str,
    state: &S,
) -> Result<SavedDevice, MachineStateError> {
    Ok(SavedDevice {
        name: name.to_string(),
        kind: kind.to_string(),
        version: 0,
        state: serde_json::to_value(state).map_err(|e| MachineStateError::Encoding {
            name: name.to_string(),
            reason: e.to_string(),
        })?,
    })
}

impl MachineDevice {
    /// The device's state, or `None` for a model that keeps none.
    pub fn save(&self) -> Result<Option<SavedDevice>, MachineStateError> {
        let n = self.name.as_str();
        Ok(Some(match &self.handle {
            DeviceHandle::Uart(d) => save_one(n, d)?,
            DeviceHandle::Rtc(d) => save_one(n, d)?,
            DeviceHandle::I8042(d) => save_one(n, d)?,
            DeviceHandle::AcpiPm(d) => save_one(n, d)?,
            DeviceHandle::PostCode(d) => save_one(n, d)?,
            DeviceHandle::DebugExit(_) => return Ok(None),
            DeviceHandle::PciConfigIo(d) => save_one(n, d)?,
            DeviceHandle::HostBridge(d) => save_one(n, d)?,
            DeviceHandle::PciTest(d) => save_one(n, d)?,
            DeviceHandle::Pic(d) => save_one(n, d)?,
            DeviceHandle::Ioapic(d) => save_one(n, d)?,
            DeviceHandle::Lapic(d) => save_one(n, d)?,
            DeviceHandle::Pit(d) => save_one(n, d)?,
            DeviceHandle::Hpet(d) => save_one(n, d)?,
            DeviceHandle::VirtioPci(d) => save_plain(n, "virtio-pci", &lock(d).state())?,
            DeviceHandle::VirtioMmio(d) => save_plain(n, "virtio-mmio", &lock(d).state())?,
            DeviceHandle::E1000(d) => save_one(n, d)?,
        }))
    }

    /// Restore a state saved by [`MachineDevice::save`].
    pub fn load(&self, s: &SavedDevice) -> Result<(), MachineStateError> {
        match &self.handle {
            DeviceHandle::Uart(d) => load_one(d, s),
            DeviceHandle::Rtc(d) => load_one(d, s),
            DeviceHandle::I8042(d) => load_one(d, s),
            DeviceHandle::AcpiPm(d) => load_one(d, s),
            DeviceHandle::PostCode(d) => load_one(d, s),
            DeviceHandle::DebugExit(_) => Ok(()),
            DeviceHandle::PciConfigIo(d) => load_one(d, s),
            DeviceHandle::HostBridge(d) => load_one(d, s),
            DeviceHandle::PciTest(d) => load_one(d, s),
            DeviceHandle::Pic(d) => load_one(d, s),
            DeviceHandle::Ioapic(d) => load_one(d, s),
            DeviceHandle::Lapic(d) => load_one(d, s),
            DeviceHandle::Pit(d) => load_one(d, s),
            DeviceHandle::Hpet(d) => load_one(d, s),
            DeviceHandle::E1000(d) => load_one(d, s),
            DeviceHandle::VirtioPci(_) | DeviceHandle::VirtioMmio(_) => {
                Err(MachineStateError::NotRestorable(self.name.clone()))
            }
        }
    }
}

/// Bumped when [`MachineState`] changes shape or meaning.
pub const MACHINE_STATE_FORMAT: u32 = 1;

/// The whole machine: vCPU, clock and every device that keeps state, in
/// the machine's device order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    pub format: u32,
    pub cpu: CpuState,
    pub clock: ClockState,
    pub devices: Vec<SavedDevice>,
}

impl MachineState {
    /// The canonical bytes (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, MachineStateError> {
        let s: MachineState =
            serde_json::from_slice(b).map_err(|e| MachineStateError::Decode(e.to_string()))?;
        if s.format != MACHINE_STATE_FORMAT {
            return Err(MachineStateError::Format {
                found: s.format,
                expected: MACHINE_STATE_FORMAT,
            });
        }
        Ok(s)
    }

    /// 64-bit hashes of each part, for checkpoints.
    pub fn hashes(&self) -> StateHashes {
        StateHashes {
            cpu: hash(&serde_json::to_vec(&self.cpu).unwrap_or_default()),
            clock_ns: self.clock.now_ns,
            devices: self
                .devices
                .iter()
                .map(|d| hash(&serde_json::to_vec(d).unwrap_or_default()))
                .collect(),
        }
    }

    /// What differs from `other`, one line per difference (empty when
    /// equal): CPU register groups, the clock, and device fields by path.
    pub fn differences(&self, other: &MachineState) -> Vec<String> {
        let mut out = Vec::new();
        cpu_differences(&self.cpu, &other.cpu, &mut out);
        if self.clock != other.clock {
            out.push(format!(
                "clock: {} ns, then {} ns",
                self.clock.now_ns, other.clock.now_ns
            ));
        }
        for d in &self.devices {
            match other.devices.iter().find(|o| o.name == d.name) {
                None => out.push(format!("device {}: only in the first state", d.name)),
                Some(o) if o != d => {
                    let mut paths = Vec::new();
                    value_differences(&d.state, &o.state, String::new(), &mut paths);
                    if d.kind != o.kind || d.version != o.version {
                        paths.insert(
                            0,
                            format!(
                                "kind {} v{}, then {} v{}",
                                d.kind, d.version, o.kind, o.version
                            ),
                        );
                    }
                    for p in paths.into_iter().take(8) {
                        out.push(format!("device {}: {p}", d.name));
                    }
                }
                Some(_) => {}
            }
        }
        for o in &other.devices {
            if !self.devices.iter().any(|d| d.name == o.name) {
                out.push(format!("device {}: only in the second state", o.name));
            }
        }
        out
    }
}

/// Per-part hashes of a [`MachineState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateHashes {
    pub cpu: u64,
    pub clock_ns: u64,
    /// One per saved device, in order.
    pub devices: Vec<u64>,
}

/// The hash duet uses for states and images (XXH3, 64 bits).
pub fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn cpu_differences(a: &CpuState, b: &CpuState, out: &mut Vec<String>) {
    let ra = &a.regs;
    let rb = &b.regs;
    const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let mut named: Vec<(&str, u64, u64)> = NAMES
        .iter()
        .zip(ra.gpr.iter().zip(rb.gpr.iter()))
        .map(|(n, (x, y))| (*n, *x, *y))
        .collect();
    named.push(("rip", ra.rip, rb.rip));
    named.push(("rflags", ra.rflags, rb.rflags));
    for (n, x, y) in named {
        if x != y {
            out.push(format!("cpu {n}: {x:#x}, then {y:#x}"));
        }
    }
    if a.sregs != b.sregs {
        out.push("cpu segment, control or descriptor-table registers".into());
    }
    if a.msrs != b.msrs {
        out.push("cpu MSRs".into());
    }
    if a.fpu != b.fpu {
        out.push("cpu x87/SSE state".into());
    }
    if a.debug != b.debug || a.xcr0 != b.xcr0 {
        out.push("cpu debug registers or XCR0".into());
    }
    if a.events != b.events {
        out.push(format!(
            "cpu pending events: {:?}, then {:?}",
            a.events, b.events
        ));
    }
    if a.tsc != b.tsc {
        out.push(format!("cpu TSC: {}, then {}", a.tsc, b.tsc));
    }
}

/// Paths (`.field[3].x`) where two JSON values differ, with both values.
pub fn value_differences(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: String,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => value_differences(v, w, format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: only in the first")),
                }
            }
            for k in y.keys() {
                if !x.contains_key(k) {
                    out.push(format!("{path}.{k}: only in the second"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                value_differences(v, w, format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => {
            let p = if path.is_empty() {
                "state".into()
            } else {
                path
            };
            out.push(format!("{p}: {a}, then {b}"));
        }
        _ => {}
    }
}
