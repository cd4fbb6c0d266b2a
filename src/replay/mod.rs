//! Record and replay.
//!
//! Everything that is not a function of the guest's own execution enters
//! the machine at one place, its *door* ([`Door`]), at *poll points* (one
//! after every vCPU exit, one per idle wait): serial console input, the
//! moments host input is pending for virtio devices, received network
//! frames, the clock's jumps to host time while the guest waits, the
//! user's quit. Host threads only queue input; the machine takes it at a
//! poll point. A vCPU run that a host thread cut short (a kick) ends at an
//! instruction count the log keeps.
//!
//! Recording (`duet run --record FILE`) writes each of those as an event
//! stamped with the instruction count and the poll point ([`log`]);
//! replaying (`duet replay FILE`, interpreter) builds the same machine,
//! feeds the events back at the same poll points and stops the vCPU at the
//! same instructions, so the run repeats bit for bit. Checkpoints every
//! `--checkpoint-every` instructions hash the CPU and every device; the
//! first one that differs stops the replay with what differs.
//!
//! KVM gives no exact instruction count, so a KVM recording is
//! device-level: the device trace of [`devtrace`], replayed against the
//! device models without a CPU.

pub mod console;
pub mod devtrace;
pub mod log;
pub mod net;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cpu_interp::state::CpuState;

use crate::state::{hash, MachineState};
use log::{Checkpoint, EndRecord, Event, LogError, LogReader, LogWriter};

/// Errors of recording and replaying.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// The replay left the recorded path.
    #[error("replay diverged at instruction {icount} (poll point {seq}): {what}")]
    Diverged { icount: u64, seq: u64, what: String },
    #[error("{0}")]
    Config(String),
}

/// Hashes of a CPU state's parts, in [`Checkpoint::cpu`] order.
pub fn cpu_hashes(c: &CpuState) -> [u64; 5] {
    let h = |v: Result<Vec<u8>, serde_json::Error>| hash(&v.unwrap_or_default());
    [
        h(serde_json::to_vec(&c.regs)),
        h(serde_json::to_vec(&c.sregs)),
        h(serde_json::to_vec(&c.msrs)),
        h(serde_json::to_vec(&c.fpu)),
        h(serde_json::to_vec(&(&c.debug, c.xcr0, &c.events, c.tsc))),
    ]
}

const CPU_PARTS: [&str; 5] = [
    "general registers, RIP or RFLAGS",
    "segment, control or descriptor-table registers",
    "MSRs",
    "x87/SSE state",
    "debug registers, XCR0, pending events or the TSC",
];

fn checkpoint_of(index: u64, s: &MachineState) -> Checkpoint {
    let h = s.hashes();
    Checkpoint {
        index,
        cpu: cpu_hashes(&s.cpu),
        clock_ns: s.clock.now_ns,
        devices: h.devices,
    }
}

/// What differs between a recorded checkpoint and the replay's state.
fn checkpoint_differences(want: &Checkpoint, got: &Checkpoint, s: &MachineState) -> Vec<String> {
    let mut out = Vec::new();
    for (i, name) in CPU_PARTS.iter().enumerate() {
        if want.cpu[i] != got.cpu[i] {
            out.push(format!("CPU {name}"));
        }
    }
    if want.clock_ns != got.clock_ns {
        out.push(format!(
            "VM clock: recorded {} ns, replayed {} ns",
            want.clock_ns, got.clock_ns
        ));
    }
    if want.devices.len() != got.devices.len() {
        out.push(format!(
            "{} devices recorded, {} in the replay",
            want.devices.len(),
            got.devices.len()
        ));
    } else {
        for (i, (a, b)) in want.devices.iter().zip(&got.devices).enumerate() {
            if a != b {
                let name = s.devices.get(i).map_or("?", |d| d.name.as_str());
                out.push(format!("device {name}"));
            }
        }
    }
    out
}

/// Host input the machine takes at a poll point while recording.
pub struct PollInput {
    pub serial: Vec<u8>,
    pub warp_to: Option<u64>,
    pub virtio: bool,
    pub quit: bool,
}

/// What a replayed poll point applies, in recorded order.
#[derive(Debug, PartialEq, Eq)]
pub enum Replayed {
    Serial(Vec<u8>),
    Warp(u64),
    VirtioPoll,
    HostQuit,
}

struct Recorder {
    writer: LogWriter,
    /// Received frames logged by the network wrappers, waiting to be
    /// written (they carry their own position: device and receive call).
    net: Arc<Mutex<Vec<Event>>>,
}

struct Replayer {
    events: VecDeque<Event>,
    /// Events applied so far (for messages).
    applied: u64,
}

enum Mode {
    Off,
    Record(Box<Recorder>),
    Replay(Replayer),
}

/// How a recording or a replay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub events: u64,
    pub checkpoints: u64,
    /// The log's size (recording).
    pub bytes: u64,
}

/// The machine's door for nondeterministic input (see the module docs).
pub struct Door {
    mode: Mode,
    /// Poll points so far.
    seq: u64,
    /// Instructions between checkpoints (0: none) and the next one.
    interval: u64,
    next_checkpoint: u64,
    checkpoints: u64,
    /// Receive logs of the network wrappers (replay), by device.
    net_replay: Vec<Arc<Mutex<net::RxScript>>>,
    /// The virtio console's input (replay).
    console_replay: Arc<Mutex<console::ConsoleScript>>,
}

impl Default for Door {
    fn default() -> Self {
        Self::off()
    }
}

impl Door {
    pub fn off() -> Self {
        Door {
            mode: Mode::Off,
            seq: 0,
            interval: 0,
            next_checkpoint: u64::MAX,
            checkpoints: 0,
            net_replay: Vec::new(),
            console_replay: Default::default(),
        }
    }

    /// Record into `writer`, with a checkpoint every `interval`
    /// instructions (0: none).
    pub fn record(writer: LogWriter, interval: u64) -> Self {
        Door {
            mode: Mode::Record(Box::new(Recorder {
                writer,
                net: Arc::new(Mutex::new(Vec::new())),
            })),
            interval,
            next_checkpoint: if interval == 0 { u64::MAX } else { interval },
            ..Self::off()
        }
    }

    /// Replay every event of `reader` (read, and so checked, up front).
    pub fn replay(mut reader: LogReader) -> Result<Self, ReplayError> {
        let interval = reader.header().machine.checkpoint_interval;
        let mut events = VecDeque::new();
        let mut net: Vec<Vec<net::RxEntry>> = Vec::new();
        let mut console = Vec::new();
        while let Some(e) = reader.next_event()? {
            match e {
                Event::ConsoleIn { call, bytes } => console.push((call, bytes)),
                Event::NetRx {
                    device,
                    call,
                    header,
                    frame,
                    ..
                } => {
                    let d = usize::from(device);
                    if net.len() <= d {
                        net.resize_with(d + 1, Vec::new);
                    }
                    net[d].push((call, header, frame));
                }
                e => events.push_back(e),
            }
        }
        Ok(Door {
            mode: Mode::Replay(Replayer { events, applied: 0 }),
            interval,
            next_checkpoint: if interval == 0 { u64::MAX } else { interval },
            net_replay: net
                .into_iter()
                .map(|v| Arc::new(Mutex::new(net::RxScript::new(v))))
                .collect(),
            console_replay: Arc::new(Mutex::new(console::ConsoleScript::new(console))),
            ..Self::off()
        })
    }

    pub fn is_off(&self) -> bool {
        matches!(self.mode, Mode::Off)
    }

    pub fn is_recording(&self) -> bool {
        matches!(self.mode, Mode::Record(_))
    }

    pub fn is_replaying(&self) -> bool {
        matches!(self.mode, Mode::Replay(_))
    }

    /// Take the host input the recording wrappers (network, console) log
    /// into `log` (the list given to [`crate::virtio::InputDoor::Record`]).
    pub fn with_net_log(mut self, log: Arc<Mutex<Vec<Event>>>) -> Self {
        if let Mode::Record(r) = &mut self.mode {
            r.net = log;
        }
        self
    }

    /// The shared list the recording network wrappers log frames into.
    pub fn net_log(&self) -> Option<Arc<Mutex<Vec<Event>>>> {
        match &self.mode {
            Mode::Record(r) => Some(r.net.clone()),
            _ => None,
        }
    }

    /// The recorded virtio-console input, for its replay.
    pub fn console_script(&self) -> Arc<Mutex<console::ConsoleScript>> {
        self.console_replay.clone()
    }

    /// The received frames of NIC `device`, for its replay backend.
    pub fn net_script(&mut self, device: usize) -> Arc<Mutex<net::RxScript>> {
        while self.net_replay.len() <= device {
            self.net_replay
                .push(Arc::new(Mutex::new(net::RxScript::new(Vec::new()))));
        }
        self.net_replay[device].clone()
    }

    fn diverged(&self, icount: u64, what: String) -> ReplayError {
        ReplayError::Diverged {
            icount,
            seq: self.seq,
            what,
        }
    }

    fn push(&mut self, e: &Event) -> Result<(), ReplayError> {
        if let Mode::Record(r) = &mut self.mode {
            let net: Vec<Event> =
                std::mem::take(&mut *r.net.lock().unwrap_or_else(|p| p.into_inner()));
            for n in &net {
                r.writer.push(n)?;
            }
            r.writer.push(e)?;
        }
        Ok(())
    }

    /// The instruction count the next vCPU run must stop at (a checkpoint,
    /// or where the recorded run was cut short), if any.
    pub fn next_stop(&self) -> Option<u64> {
        let mut at = (self.next_checkpoint != u64::MAX).then_some(self.next_checkpoint);
        if let Mode::Replay(r) = &self.mode {
            if let Some(Event::Stop { icount } | Event::End { icount, .. }) = r.events.front() {
                at = Some(at.map_or(*icount, |a| a.min(*icount)));
            }
        }
        at
    }

    /// After a vCPU run that ended at instruction `icount`; `early` when it
    /// ended before its budget for a reason other than a guest event (a
    /// stop request, a kick): the recorder logs where, the replayer checks
    /// it stopped there.
    pub fn after_run(&mut self, icount: u64, early: bool) -> Result<(), ReplayError> {
        match &mut self.mode {
            Mode::Off => Ok(()),
            Mode::Record(_) => {
                if early {
                    self.push(&Event::Stop { icount })?;
                }
                Ok(())
            }
            Mode::Replay(r) => {
                if let Some(Event::Stop { icount: at }) = r.events.front() {
                    let at = *at;
                    if icount == at {
                        r.events.pop_front();
                        r.applied += 1;
                    } else if icount > at {
                        return Err(self.diverged(
                            icount,
                            format!("the recorded vCPU stopped at instruction {at}, the replay ran past it"),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether a checkpoint falls at `icount`.
    pub fn checkpoint_due(&self, icount: u64) -> bool {
        !self.is_off() && icount >= self.next_checkpoint
    }

    /// Take (record) or check (replay) the checkpoint at `icount`.
    pub fn checkpoint(&mut self, icount: u64, state: &MachineState) -> Result<(), ReplayError> {
        self.checkpoints += 1;
        let index = self.checkpoints;
        self.next_checkpoint = icount.saturating_add(self.interval.max(1));
        if self.interval == 0 {
            self.next_checkpoint = u64::MAX;
        }
        self.checkpoint_event(index, icount, state)
    }

    fn checkpoint_event(
        &mut self,
        index: u64,
        icount: u64,
        state: &MachineState,
    ) -> Result<(), ReplayError> {
        let mine = checkpoint_of(index, state);
        match &mut self.mode {
            Mode::Off => Ok(()),
            Mode::Record(_) => {
                self.push(&Event::Checkpoint {
                    icount,
                    checkpoint: mine,
                })?;
                // A recording cut short (killed) keeps what came before.
                if let Mode::Record(r) = &mut self.mode {
                    r.writer.flush_frame()?;
                }
                Ok(())
            }
            Mode::Replay(r) => {
                let front = r.events.pop_front();
                r.applied += 1;
                match front {
                    Some(Event::Checkpoint {
                        icount: at,
                        checkpoint,
                    }) if at == icount => {
                        let d = checkpoint_differences(&checkpoint, &mine, state);
                        if d.is_empty() {
                            Ok(())
                        } else {
                            Err(self.diverged(
                                icount,
                                format!(
                                    "checkpoint {} differs: {}",
                                    checkpoint.index,
                                    d.join("; ")
                                ),
                            ))
                        }
                    }
                    other => Err(self.diverged(
                        icount,
                        format!(
                            "a checkpoint here, the recording has {} next",
                            describe(other.as_ref())
                        ),
                    )),
                }
            }
        }
    }

    /// Start a poll point; its number.
    pub fn begin_poll(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Log what the machine took at this poll point (recording).
    pub fn log_poll(&mut self, icount: u64, input: PollInput) -> Result<(), ReplayError> {
        if !self.is_recording() {
            return Ok(());
        }
        let seq = self.seq;
        if let Some(ns) = input.warp_to {
            self.push(&Event::Warp { icount, seq, ns })?;
        }
        if !input.serial.is_empty() {
            self.push(&Event::SerialIn {
                icount,
                seq,
                bytes: input.serial,
            })?;
        }
        if input.virtio {
            self.push(&Event::VirtioPoll { icount, seq })?;
        }
        if input.quit {
            self.push(&Event::HostQuit { icount, seq })?;
        }
        Ok(())
    }

    /// What the recording took at this poll point (replay), in order.
    pub fn replay_poll(&mut self, icount: u64) -> Result<Vec<Replayed>, ReplayError> {
        let seq = self.seq;
        let mut out = Vec::new();
        let Mode::Replay(r) = &mut self.mode else {
            return Ok(out);
        };
        loop {
            let Some(e) = r.events.front() else {
                return Err(ReplayError::Diverged {
                    icount,
                    seq,
                    what: "the log has no more events, the replay goes on".into(),
                });
            };
            let Some(s) = e.seq() else {
                break;
            };
            if let Event::End { end, .. } = e {
                if seq > end.seq {
                    return Err(ReplayError::Diverged {
                        icount,
                        seq,
                        what: format!(
                            "the recording ended at poll point {} ({}), the replay goes on",
                            end.seq, end.outcome
                        ),
                    });
                }
                break;
            }
            if s > seq {
                break;
            }
            if s < seq || e.icount() != icount {
                let what = format!(
                    "the recording has {} next, the replay is past it",
                    describe(Some(e))
                );
                return Err(ReplayError::Diverged { icount, seq, what });
            }
            let e = r.events.pop_front().unwrap_or(Event::Stop { icount: 0 });
            r.applied += 1;
            out.push(match e {
                Event::SerialIn { bytes, .. } => Replayed::Serial(bytes),
                Event::Warp { ns, .. } => Replayed::Warp(ns),
                Event::VirtioPoll { .. } => Replayed::VirtioPoll,
                _ => Replayed::HostQuit,
            });
        }
        Ok(out)
    }

    /// The run ended with exit status `status` (`outcome` describes it) in
    /// `state`: write (record) or check (replay) the final checkpoint and
    /// the end record.
    pub fn end(
        &mut self,
        icount: u64,
        status: i32,
        outcome: &str,
        state: &MachineState,
    ) -> Result<(), ReplayError> {
        let index = self.checkpoints + 1;
        self.checkpoint_event(index, icount, state)?;
        let end = EndRecord {
            seq: self.seq,
            status,
            outcome: outcome.to_string(),
            state_hash: hash(&state.to_bytes()),
        };
        match &mut self.mode {
            Mode::Off => Ok(()),
            Mode::Record(_) => self.push(&Event::End { icount, end }),
            Mode::Replay(r) => match r.events.pop_front() {
                Some(Event::End {
                    icount: at,
                    end: want,
                }) => {
                    let mut d = Vec::new();
                    if at != icount {
                        d.push(format!("it ended at instruction {at}"));
                    }
                    if want.status != end.status || want.outcome != end.outcome {
                        d.push(format!(
                            "it ended with \"{}\" (status {}), the replay with \"{}\" (status {})",
                            want.outcome, want.status, end.outcome, end.status
                        ));
                    }
                    if want.state_hash != end.state_hash {
                        d.push("the final machine state differs".into());
                    }
                    if d.is_empty() {
                        Ok(())
                    } else {
                        Err(self.diverged(icount, format!("the recording {}", d.join("; "))))
                    }
                }
                other => Err(self.diverged(
                    icount,
                    format!(
                        "the replay ended ({outcome}), the recording has {} next",
                        describe(other.as_ref())
                    ),
                )),
            },
        }
    }

    /// Finish the log (recording): its summary.
    pub fn finish(&mut self) -> Result<Summary, ReplayError> {
        let mode = std::mem::replace(&mut self.mode, Mode::Off);
        match mode {
            Mode::Record(r) => {
                let events = r.writer.events();
                let bytes = r.writer.finish()?;
                Ok(Summary {
                    events,
                    checkpoints: self.checkpoints,
                    bytes,
                })
            }
            Mode::Replay(r) => Ok(Summary {
                events: r.applied,
                checkpoints: self.checkpoints,
                bytes: 0,
            }),
            Mode::Off => Ok(Summary {
                events: 0,
                checkpoints: 0,
                bytes: 0,
            }),
        }
    }
}

fn describe(e: Option<&Event>) -> String {
    match e {
        None => "nothing (the log ends)".into(),
        Some(e) => match e.seq() {
            Some(s) => format!(
                "a {} (instruction {}, poll point {s})",
                e.name(),
                e.icount()
            ),
            None => format!("a {} (instruction {})", e.name(), e.icount()),
        },
    }
}
