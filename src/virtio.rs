//! The machine's side of its virtio devices: which are plugged in on which
//! transport, where the virtio-mmio ones sit (for the DSDT), and the host
//! input notifier.
//!
//! Host threads (TAP readers, the user-mode network stack, console input)
//! never touch a device: they push into the device's inbox and call the
//! notifier, which marks input pending, kicks the vCPU out of guest code
//! and wakes a halted VMM. The run loop then polls the devices
//! ([`VirtioDevices::poll_if_pending`]) between two vCPU runs: the only
//! point where host input enters the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::inbox::InputNotifier;
use devices::virtio::mmio::VirtioMmio;
use devices::virtio::pci::VirtioPci;

use devices::virtio::block::{DiskFile, VirtioBlock};
use devices::virtio::console::{ConsoleInput, VirtioConsole};
use devices::virtio::inbox::Inbox;
use devices::virtio::net::VirtioNet;
use devices::virtio::rng::{EntropySource, VirtioRng};

use crate::acpi::VirtioMmioAcpi;
use crate::backend::Kick;
use crate::device_args::{ConsoleSpec, DiskSpec, NetSpec, RngSpec};
use crate::irqchip::{lock, IrqChip};
use crate::layout;
use crate::machine::Machine;

/// Marks host input pending and gets the VMM's attention.
pub struct HostInput {
    pending: AtomicBool,
    kick: Arc<dyn Kick>,
    chip: Arc<dyn IrqChip>,
}

impl InputNotifier for HostInput {
    fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.kick.kick();
        self.chip.wake();
    }
}

enum Plugged {
    Pci(Arc<Mutex<VirtioPci>>),
    Mmio(Arc<Mutex<VirtioMmio>>),
    /// An emulated NIC on the same host-input path.
    E1000(Arc<Mutex<devices::e1000::E1000>>),
}

/// The virtio devices of a machine.
pub struct VirtioDevices {
    plugged: Vec<(String, Plugged)>,
    mmio: Vec<VirtioMmioAcpi>,
    input: Arc<HostInput>,
}

impl VirtioDevices {
    pub fn new(kick: Arc<dyn Kick>, chip: Arc<dyn IrqChip>) -> Self {
        VirtioDevices {
            plugged: Vec::new(),
            mmio: Vec::new(),
            input: Arc::new(HostInput {
                pending: AtomicBool::new(false),
                kick,
                chip,
            }),
        }
    }

    pub fn notifier(&self) -> Arc<dyn InputNotifier> {
        self.input.clone()
    }

    pub fn add_pci(&mut self, name: &str, dev: Arc<Mutex<VirtioPci>>) {
        self.plugged.push((name.to_string(), Plugged::Pci(dev)));
    }

    /// An e1000 polled with the virtio devices when host input is pending.
    pub fn add_e1000(&mut self, name: &str, dev: Arc<Mutex<devices::e1000::E1000>>) {
        self.plugged.push((name.to_string(), Plugged::E1000(dev)));
    }

    /// Register block and line for the next virtio-mmio device.
    pub fn next_mmio_slot(&self) -> Option<(u64, u32)> {
        layout::virtio_mmio::slot(self.mmio.len() as u64)
    }

    pub fn add_mmio(&mut self, name: &str, dev: Arc<Mutex<VirtioMmio>>, base: u64, gsi: u32) {
        self.plugged.push((name.to_string(), Plugged::Mmio(dev)));
        self.mmio.push(VirtioMmioAcpi {
            base,
            len: devices::virtio::mmio::MMIO_LEN,
            gsi,
        });
    }

    /// The virtio-mmio devices as the DSDT lists them.
    pub fn acpi_entries(&self) -> Vec<VirtioMmioAcpi> {
        self.mmio.clone()
    }

    /// Poll every device when host input is pending; true if it was.
    pub fn poll_if_pending(&self) -> bool {
        if !self.input.pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        self.poll_devices();
        true
    }

    /// Poll every device (a replay, where the log says host input was
    /// pending).
    pub fn poll_all(&self) {
        self.input.pending.store(false, Ordering::Release);
        self.poll_devices();
    }

    fn poll_devices(&self) {
        for (_, p) in &self.plugged {
            match p {
                Plugged::Pci(d) => lock(d).poll(),
                Plugged::Mmio(d) => lock(d).poll(),
                Plugged::E1000(d) => lock(d).poll(),
            }
        }
    }

    /// Interrupts the emulated NICs raised (for the I/O benchmark).
    pub fn nic_interrupts(&self) -> u64 {
        self.plugged
            .iter()
            .map(|(_, p)| match p {
                Plugged::E1000(d) => lock(d).stats().interrupts,
                Plugged::Pci(d) => {
                    let d = lock(d);
                    if d.core().device().device_type() == devices::virtio::device_type::NET {
                        d.interrupts()
                    } else {
                        0
                    }
                }
                Plugged::Mmio(d) => {
                    let d = lock(d);
                    if d.core().device().device_type() == devices::virtio::device_type::NET {
                        d.interrupts()
                    } else {
                        0
                    }
                }
            })
            .sum()
    }

    /// `--stats` lines: each device's counters.
    pub fn report(&self) -> String {
        let mut s = String::new();
        if self.plugged.is_empty() {
            return s;
        }
        s.push_str("network and virtio devices:\n");
        for (name, p) in &self.plugged {
            let (transport, text) = match p {
                Plugged::Pci(d) => ("pci", lock(d).core().device().describe()),
                Plugged::Mmio(d) => ("mmio", lock(d).core().device().describe()),
                Plugged::E1000(d) => ("pci", lock(d).describe()),
            };
            s.push_str(&format!("  {name:<12} {transport:<4} {text}\n"));
        }
        s
    }
}

/// The virtio devices `duet run` was asked for.
#[derive(Clone, Debug, Default)]
pub struct DeviceArgs {
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    pub rng: Option<RngSpec>,
    pub console: Option<ConsoleSpec>,
    /// Record the host input of the NICs and the console, or replay it
    /// without a network or a console host.
    pub door: InputDoor,
}

/// Where the NICs' frames and the console's input come from (see
/// [`crate::replay::net`], [`crate::replay::console`]).
#[derive(Clone, Default)]
pub enum InputDoor {
    /// The network `--net` names, the console's host side.
    #[default]
    Live,
    /// The same, with every received frame and console input logged.
    Record(Arc<Mutex<Vec<crate::replay::log::Event>>>),
    /// Neither: the recorded input.
    Replay(ReplayInput),
}

/// A recording's host input, for a replay.
#[derive(Clone)]
pub struct ReplayInput {
    /// Received frames, by NIC.
    pub nets: Vec<Arc<Mutex<crate::replay::net::RxScript>>>,
    /// The virtio console's input.
    pub console: Arc<Mutex<crate::replay::console::ConsoleScript>>,
    /// Where the replayed guest's console output goes.
    pub console_output: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for InputDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InputDoor::Live => "Live",
            InputDoor::Record(_) => "Record",
            InputDoor::Replay(_) => "Replay",
        })
    }
}

/// The seed of `--rng` under `--clock virtual` when none is given.
pub const DEFAULT_RNG_SEED: u64 = 0x6475_6574;

/// Host resources that must live as long as the VM (the console socket).
pub struct HostSide {
    _hvc: Option<crate::hvc::HvcHost>,
}

/// Why a device could not be plugged in; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlugError(pub String);

/// Open every device's host side and plug the devices in, disks first
/// (so the first `--disk` is `/dev/vda`), then NICs, the RNG and the
/// console.
pub fn plug(m: &mut Machine, args: &DeviceArgs) -> Result<HostSide, PlugError> {
    let err = |flag: &str, given: String, e: String| PlugError(format!("{flag} {given}: {e}"));
    for (i, d) in args.disks.iter().enumerate() {
        let given = format!("path={}", d.path.display());
        // A snapshot opens the image read-only: its writes go to the overlay.
        let file = DiskFile::open(&d.path, d.readonly || d.snapshot).map_err(|e| {
            let msg = match e {
                devices::virtio::block::DiskError::Locked => {
                    "it is locked (in use by another duet, or given twice)".to_string()
                }
                e => e.to_string(),
            };
            err("--disk", given.clone(), msg)
        })?;
        let serial = d.serial.clone().unwrap_or_else(|| {
            d.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let disk: Box<dyn devices::virtio::block::Disk> = if d.snapshot && !d.readonly {
            Box::new(
                devices::virtio::overlay::OverlayDisk::new(Box::new(file), &std::env::temp_dir())
                    .map_err(|e| {
                    err(
                        "--disk",
                        given.clone(),
                        format!(
                            "cannot create its copy-on-write overlay in {}: {e}",
                            std::env::temp_dir().display()
                        ),
                    )
                })?,
            )
        } else {
            Box::new(file)
        };
        let dev = VirtioBlock::new(disk, d.readonly, &serial);
        m.add_virtio(&format!("virtio-blk{i}"), d.transport, Box::new(dev))
            .map_err(|e| err("--disk", given, e.to_string()))?;
    }
    for (i, n) in args.nets.iter().enumerate() {
        let given = match &n.backend {
            crate::device_args::NetBackendSpec::User { .. } => "user".to_string(),
            crate::device_args::NetBackendSpec::Tap { ifname } => format!("tap={ifname}"),
            crate::device_args::NetBackendSpec::Loopback => "loopback".to_string(),
        };
        let backend: Box<dyn devices::virtio::net::NetBackend> = match &args.door {
            InputDoor::Replay(r) => {
                let tap = matches!(n.backend, crate::device_args::NetBackendSpec::Tap { .. });
                let script = r.nets.get(i).cloned().unwrap_or_else(|| {
                    Arc::new(Mutex::new(crate::replay::net::RxScript::new(Vec::new())))
                });
                Box::new(crate::replay::net::ReplayNet::new(script, tap))
            }
            door => {
                let live = crate::net::open(n, m.input_notifier(), m.clock(), m.epoch())
                    .map_err(|e| err("--net", given.clone(), e.to_string()))?;
                match door {
                    InputDoor::Record(log) => Box::new(crate::replay::net::RecordingNet::new(
                        live,
                        i as u8,
                        log.clone(),
                    )),
                    _ => live,
                }
            }
        };
        let mac = n.mac.unwrap_or_else(|| crate::net::default_mac(i));
        if n.model == crate::device_args::NicModel::E1000 {
            m.add_e1000(&format!("e1000-{i}"), mac, backend)
                .map_err(|e| err("--net", given, e.to_string()))?;
            continue;
        }
        let dev = VirtioNet::new(mac, backend);
        m.add_virtio(&format!("virtio-net{i}"), n.transport, Box::new(dev))
            .map_err(|e| err("--net", given, e.to_string()))?;
    }
    if let Some(r) = &args.rng {
        let source = match (r.seed, m.virtual_time()) {
            (Some(s), _) => EntropySource::Seeded(s),
            (None, true) => EntropySource::Seeded(DEFAULT_RNG_SEED),
            (None, false) => EntropySource::Host,
        };
        m.add_virtio("virtio-rng", r.transport, Box::new(VirtioRng::new(source)))
            .map_err(|e| PlugError(format!("--rng: {e}")))?;
    }
    let mut hvc = None;
    if let Some(c) = &args.console {
        let (out, input): (Box<dyn std::io::Write + Send>, Box<dyn ConsoleInput>) = match &args.door
        {
            InputDoor::Replay(r) => {
                let out: Box<dyn std::io::Write + Send> = match &r.console_output {
                    Some(p) => Box::new(std::fs::File::create(p).map_err(|e| {
                        PlugError(format!(
                            "--console-output {}: cannot create it: {e}",
                            p.display()
                        ))
                    })?),
                    None => Box::new(std::io::sink()),
                };
                let input = crate::replay::console::ReplayConsole::new(r.console.clone());
                (out, Box::new(input))
            }
            door => {
                let inbox = Inbox::new(crate::hvc::INBOX_CHUNKS, m.input_notifier());
                let (out, host) = crate::hvc::open(&c.host, inbox.clone())
                    .map_err(|e| PlugError(format!("--console-device virtio,{e}")))?;
                hvc = Some(host);
                let input: Box<dyn ConsoleInput> = match door {
                    InputDoor::Record(log) => Box::new(
                        crate::replay::console::RecordingConsole::new(Box::new(inbox), log.clone()),
                    ),
                    _ => Box::new(inbox),
                };
                (out, input)
            }
        };
        m.add_virtio(
            "virtio-console",
            c.transport,
            Box::new(VirtioConsole::new(out, input)),
        )
        .map_err(|e| PlugError(format!("--console-device: {e}")))?;
    }
    Ok(HostSide { _hvc: hvc })
}
