//! The record/replay log: a versioned, self-describing container of
//! compressed event frames (documented in `docs/REPLAY.md`).
//!
//! ```text
//! magic "DUETLOG\x1a"  u16 format version  u16 flags (0)
//! u32 header length    header (JSON, [`LogHeader`])   u64 XXH3 of the header
//! frames:  'F' u32 raw length  u32 compressed length  u64 XXH3 of the raw bytes
//!          <lz4 block>
//! end:     'E' u64 number of events
//! ```
//!
//! A frame holds whole events (never half of one), each a kind byte and
//! LEB128 varints ([`Event`]). Every length is bounded before anything is
//! allocated, and every failure names the byte offset and what was
//! expected there: a truncated, corrupt or foreign file is an error, never
//! a panic.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// The file's first eight bytes.
pub const MAGIC: &[u8; 8] = b"DUETLOG\x1a";
/// The format this duet writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The largest header accepted (bytes).
pub const MAX_HEADER: usize = 1 << 20;
/// The largest raw (uncompressed) frame accepted (bytes).
pub const MAX_FRAME: usize = 4 << 20;
/// Events are gathered into frames of about this many raw bytes.
pub const FRAME_TARGET: usize = 64 << 10;
/// The largest data payload of one event (bytes).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Errors reading or writing a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the log: {0}")]
    Write(#[from] std::io::Error),
    #[error("not a duet replay log: byte 0 should start with \"DUETLOG\\x1a\"")]
    Magic,
    #[error(
        "log format version {found} (byte 8); this duet reads version {FORMAT_VERSION}: replay it \
         with the duet that recorded it"
    )]
    Version { found: u16 },
    #[error("log truncated at byte {offset}: expected {expected}")]
    Truncated { offset: u64, expected: String },
    #[error("log corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
}

/// What was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogKind {
    /// Everything nondeterministic the interpreter saw: replays bit-exact.
    Full,
    /// A device-level trace (KVM recordings): replays at the device boundary.
    Devices,
}

/// A file the recorded machine read, by path and content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub size: u64,
    /// XXH3-64 of the contents, hexadecimal.
    pub xxh3: String,
}

/// The machine a log was recorded on: enough to build it again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedMachine {
    /// "interp" or "kvm".
    pub backend: String,
    pub memory: u64,
    /// "host" (instruction time with logged jumps to host time) or "virtual".
    pub clock: String,
    /// "userspace" or "kernel".
    pub irqchip: String,
    /// The RTC's start (Unix seconds).
    pub epoch: u64,
    /// A built-in guest, or a kernel with initrds and a command line.
    pub guest: Option<String>,
    pub kernel: Option<FileRef>,
    #[serde(default)]
    pub initrd: Vec<FileRef>,
    pub cmdline: Option<String>,
    /// `--disk` values as given, with each image's hash.
    #[serde(default)]
    pub disks: Vec<(String, FileRef)>,
    /// `--net` values as given (replay runs without the network).
    #[serde(default)]
    pub nets: Vec<String>,
    /// `--rng` as given, and the seed the recording used.
    pub rng: Option<String>,
    pub rng_seed: Option<u64>,
    /// Instructions between two checkpoints (0: none).
    pub checkpoint_interval: u64,
}

/// The log's header (JSON: self-describing, readable with `head -c`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// The duet that recorded it.
    pub duet_version: String,
    pub kind: LogKind,
    pub machine: RecordedMachine,
}

/// Where the recorded run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndRecord {
    /// Poll point of the end.
    pub seq: u64,
    /// `Outcome::exit_status` of the recorded run.
    pub status: i32,
    /// The outcome, described.
    pub outcome: String,
    /// XXH3 of the final machine state (0 when not known: KVM).
    pub state_hash: u64,
}

/// A checkpoint: hashes of the machine's state at an instruction count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub index: u64,
    /// Hashes of the CPU's parts: general registers with RIP and RFLAGS,
    /// segment/control registers, MSRs, x87/SSE, everything else.
    pub cpu: [u64; 5],
    pub clock_ns: u64,
    /// One per device that keeps state, in the machine's order.
    pub devices: Vec<u64>,
}

/// One logged event. `icount` (guest instructions retired, 0 on KVM) is
/// where it happened; `seq` (poll points since the start) is where the
/// machine applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A vCPU run ended here for a host reason (a kick, a request): the
    /// replay stops its run at the same instruction.
    Stop {
        icount: u64,
    },
    /// Serial console input that entered the UART.
    SerialIn {
        icount: u64,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// The VM clock jumped forward to `ns` (host time entering).
    Warp {
        icount: u64,
        seq: u64,
        ns: u64,
    },
    /// The user quit from the console.
    HostQuit {
        icount: u64,
        seq: u64,
    },
    /// Host input was pending for the virtio devices: they polled here.
    VirtioPoll {
        icount: u64,
        seq: u64,
    },
    /// A frame the network backend delivered on receive call `call`.
    NetRx {
        device: u8,
        call: u64,
        header: Vec<u8>,
        frame: Vec<u8>,
    },
    Checkpoint {
        icount: u64,
        checkpoint: Checkpoint,
    },
    /// A chunk of device-trace text (device-level logs).
    DeviceTrace {
        bytes: Vec<u8>,
    },
    End {
        icount: u64,
        end: EndRecord,
    },
}

impl Event {
    pub fn icount(&self) -> u64 {
        match self {
            Event::Stop { icount }
            | Event::SerialIn { icount, .. }
            | Event::Warp { icount, .. }
            | Event::HostQuit { icount, .. }
            | Event::VirtioPoll { icount, .. }
            | Event::Checkpoint { icount, .. }
            | Event::End { icount, .. } => *icount,
            Event::NetRx { .. } | Event::DeviceTrace { .. } => 0,
        }
    }

    /// The poll point it applies at, for events applied at one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::SerialIn { seq, .. }
            | Event::Warp { seq, .. }
            | Event::HostQuit { seq, .. }
            | Event::VirtioPoll { seq, .. } => Some(*seq),
            Event::End { end, .. } => Some(end.seq),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Event::Stop { .. } => "stop",
            Event::SerialIn { .. } => "serial input",
            Event::Warp { .. } => "clock jump",
            Event::HostQuit { .. } => "host quit",
            Event::VirtioPoll { .. } => "virtio poll",
            Event::NetRx { .. } => "received frame",
            Event::Checkpoint { .. } => "checkpoint",
            Event::DeviceTrace { .. } => "device trace",
            Event::End { .. } => "end",
        }
    }
}

mod kind {
    pub const STOP: u8 = 1;
    pub const SERIAL_IN: u8 = 2;
    pub const WARP: u8 = 3;
    pub const HOST_QUIT: u8 = 4;
    pub const VIRTIO_POLL: u8 = 5;
    pub const NET_RX: u8 = 6;
    pub const CHECKPOINT: u8 = 7;
    pub const DEVICE_TRACE: u8 = 8;
    pub const END: u8 = 9;
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Encodes events with deltas against the previous one (icount, seq).
#[derive(Default)]
struct Encoder {
    icount: u64,
    seq: u64,
}

impl Encoder {
    fn encode(&mut self, e: &Event, out: &mut Vec<u8>) {
        let kind = match e {
            Event::Stop { .. } => kind::STOP,
            Event::SerialIn { .. } => kind::SERIAL_IN,
            Event::Warp { .. } => kind::WARP,
            Event::HostQuit { .. } => kind::HOST_QUIT,
            Event::VirtioPoll { .. } => kind::VIRTIO_POLL,
            Event::NetRx { .. } => kind::NET_RX,
            Event::Checkpoint { .. } => kind::CHECKPOINT,
            Event::DeviceTrace { .. } => kind::DEVICE_TRACE,
            Event::End { .. } => kind::END,
        };
        out.push(kind);
        if !matches!(e, Event::DeviceTrace { .. } | Event::NetRx { .. }) {
            // Instruction counts never go back within a log.
            let i = e.icount();
            put_varint(out, i.wrapping_sub(self.icount));
            self.icount = i;
        }
        if let Some(s) = e.seq() {
            put_varint(out, s.wrapping_sub(self.seq));
            self.seq = s;
        }
        match e {
            Event::Stop { .. } | Event::HostQuit { .. } | Event::VirtioPoll { .. } => {}
            Event::SerialIn { bytes, .. } => put_bytes(out, bytes),
            Event::Warp { ns, .. } => put_varint(out, *ns),
            Event::NetRx {
                device,
                call,
                header,
                frame,
                ..
            } => {
                out.push(*device);
                put_varint(out, *call);
                put_bytes(out, header);
                put_bytes(out, frame);
            }
            Event::Checkpoint { checkpoint: c, .. } => {
                put_varint(out, c.index);
                for h in c.cpu {
                    out.extend_from_slice(&h.to_le_bytes());
                }
                put_varint(out, c.clock_ns);
                put_varint(out, c.devices.len() as u64);
                for h in &c.devices {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Event::DeviceTrace { bytes } => put_bytes(out, bytes),
            Event::End { end, .. } => {
                put_varint(out, u64::from(end.status as u32));
                put_bytes(out, end.outcome.as_bytes());
                out.extend_from_slice(&end.state_hash.to_le_bytes());
            }
        }
    }
}

/// Writes a log: the header at once, events in compressed frames.
pub struct LogWriter {
    out: Box<dyn Write + Send>,
    raw: Vec<u8>,
    enc: Encoder,
    events: u64,
    written: u64,
}

impl LogWriter {
    pub fn new(mut out: Box<dyn Write + Send>, header: &LogHeader) -> Result<Self, LogError> {
        let json = serde_json::to_vec(header).map_err(|e| LogError::Corrupt {
            offset: 0,
            what: format!("the header cannot be encoded: {e}"),
        })?;
        let mut head = Vec::with_capacity(json.len() + 32);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        head.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
        out.write_all(&head)?;
        out.flush()?;
        Ok(LogWriter {
            out,
            raw: Vec::with_capacity(FRAME_TARGET * 2),
            enc: Encoder::default(),
            events: 0,
            written: head.len() as u64,
        })
    }

    /// Create `path` and write the header.
    pub fn create(path: &std::path::Path, header: &LogHeader) -> Result<Self, LogError> {
        let f = std::fs::File::create(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(Box::new(std::io::BufWriter::new(f)), header)
    }

    pub fn push(&mut self, e: &Event) -> Result<(), LogError> {
        self.enc.encode(e, &mut self.raw);
        self.events += 1;
        if self.raw.len() >= FRAME_TARGET {
            self.flush_frame()?;
        }
        Ok(())
    }

    /// Compress and write the events gathered so far as one frame.
    pub fn flush_frame(&mut self) -> Result<(), LogError> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let packed = lz4_flex::block::compress(&self.raw);
        let mut head = [0u8; 17];
        head[0] = b'F';
        head[1..5].copy_from_slice(&(self.raw.len() as u32).to_le_bytes());
        head[5..9].copy_from_slice(&(packed.len() as u32).to_le_bytes());
        head[9..17].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&self.raw).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&packed)?;
        self.written += (head.len() + packed.len()) as u64;
        self.raw.clear();
        self.out.flush()?;
        Ok(())
    }

    /// Write the last frame and the end marker; the file's size.
    pub fn finish(mut self) -> Result<u64, LogError> {
        self.flush_frame()?;
        let mut end = [0u8; 9];
        end[0] = b'E';
        end[1..9].copy_from_slice(&self.events.to_le_bytes());
        self.out.write_all(&end)?;
        self.out.flush()?;
        Ok(self.written + end.len() as u64)
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// Reads a log held in memory, one event at a time.
pub struct LogReader {
    data: Vec<u8>,
    /// Next unread byte of `data` (after the current frame).
    pos: usize,
    header: LogHeader,
    /// The current frame, decompressed, and where it started in the file.
    frame: Vec<u8>,
    frame_at: u64,
    in_frame: usize,
    dec: Decoder,
    events: u64,
    ended: bool,
}

#[derive(Default)]
struct Decoder {
    icount: u64,
    seq: u64,
}

fn truncated(offset: usize, expected: &str) -> LogError {
    LogError::Truncated {
        offset: offset as u64,
        expected: expected.to_string(),
    }
}

/// A cursor over one decompressed frame, reporting file offsets.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    /// File offset of the frame's first byte (for messages).
    base: u64,
}

impl Cursor<'_> {
    fn at(&self) -> String {
        format!(
            "byte {} of the frame at file offset {}",
            self.pos, self.base
        )
    }
    fn err(&self, what: String) -> LogError {
        LogError::Corrupt {
            offset: self.base,
            what: format!("{}: {what}", self.at()),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, LogError> {
        let v = *self
            .b
            .get(self.pos)
            .ok_or_else(|| self.err(format!("the event ends before its {what}")))?;
        self.pos += 1;
        Ok(v)
    }
    fn varint(&mut self, what: &str) -> Result<u64, LogError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(what)?;
            if i == 9 && b > 1 {
                return Err(self.err(format!("{what}: a varint longer than 64 bits")));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err(format!("{what}: a varint longer than 10 bytes")))
    }
    fn u64le(&mut self, what: &str) -> Result<u64, LogError> {
        let end = self.pos + 8;
        let s = self
            .b
            .get(self.pos..end)
            .ok_or_else(|| self.err(format!("the event ends before its {what}")))?;
        self.pos = end;
        Ok(u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, LogError> {
        let n = self.varint(what)?;
        if n > MAX_PAYLOAD as u64 {
            return Err(self.err(format!(
                "{what}: {n} bytes, more than the {MAX_PAYLOAD} allowed"
            )));
        }
        let end = self.pos + n as usize;
        let s = self
            .b
            .get(self.pos..end)
            .ok_or_else(|| self.err(format!("{what}: {n} bytes, past the frame's end")))?;
        self.pos = end;
        Ok(s.to_vec())
    }
}

impl LogReader {
    pub fn open(path: &std::path::Path) -> Result<Self, LogError> {
        let data = std::fs::read(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(data)
    }

    pub fn from_bytes(data: Vec<u8>) -> Result<Self, LogError> {
        if data.len() < 8 {
            return Err(if MAGIC.starts_with(&data) {
                truncated(data.len(), "the 8-byte magic")
            } else {
                LogError::Magic
            });
        }
        if &data[..8] != MAGIC {
            return Err(LogError::Magic);
        }
        let Some(v) = data.get(8..10) else {
            return Err(truncated(
                data.len(),
                "the format version (2 bytes at byte 8)",
            ));
        };
        let found = u16::from_le_bytes([v[0], v[1]]);
        if found != FORMAT_VERSION {
            return Err(LogError::Version { found });
        }
        let Some(fl) = data.get(10..16) else {
            return Err(truncated(
                data.len(),
                "flags and the header length (bytes 10-15)",
            ));
        };
        let flags = u16::from_le_bytes([fl[0], fl[1]]);
        if flags != 0 {
            return Err(LogError::Corrupt {
                offset: 10,
                what: format!("flags {flags:#x}, expected 0"),
            });
        }
        let hlen = u32::from_le_bytes([fl[2], fl[3], fl[4], fl[5]]) as usize;
        if hlen > MAX_HEADER {
            return Err(LogError::Corrupt {
                offset: 12,
                what: format!("a header of {hlen} bytes, more than the {MAX_HEADER} allowed"),
            });
        }
        let Some(json) = data.get(16..16 + hlen) else {
            return Err(truncated(
                data.len(),
                &format!("a header of {hlen} bytes at byte 16"),
            ));
        };
        let Some(sum) = data.get(16 + hlen..24 + hlen) else {
            return Err(truncated(data.len(), "the header's checksum"));
        };
        if xxhash_rust::xxh3::xxh3_64(json).to_le_bytes() != sum {
            return Err(LogError::Corrupt {
                offset: 16,
                what: "the header does not match its checksum".into(),
            });
        }
        let header: LogHeader = serde_json::from_slice(json).map_err(|e| LogError::Corrupt {
            offset: 16,
            what: format!("the header is not a duet log header: {e}"),
        })?;
        Ok(LogReader {
            data,
            pos: 24 + hlen,
            header,
            frame: Vec::new(),
            frame_at: 0,
            in_frame: 0,
            dec: Decoder::default(),
            events: 0,
            ended: false,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Events read so far.
    pub fn events_read(&self) -> u64 {
        self.events
    }

    /// The next event; `None` at the end marker.
    pub fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        while self.in_frame >= self.frame.len() {
            if self.ended || !self.next_frame()? {
                return Ok(None);
            }
        }
        let mut c = Cursor {
            b: &self.frame,
            pos: self.in_frame,
            base: self.frame_at,
        };
        let e = decode(&mut c, &mut self.dec)?;
        self.in_frame = c.pos;
        self.events += 1;
        Ok(Some(e))
    }

    /// Load the next frame; false at the end marker.
    fn next_frame(&mut self) -> Result<bool, LogError> {
        let at = self.pos;
        let Some(&tag) = self.data.get(at) else {
            return Err(truncated(
                at,
                "a frame ('F') or the end marker ('E'): the recording was cut short",
            ));
        };
        match tag {
            b'E' => {
                let Some(n) = self.data.get(at + 1..at + 9) else {
                    return Err(truncated(at + 1, "the event count after the end marker"));
                };
                let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
                if n != self.events {
                    return Err(LogError::Corrupt {
                        offset: at as u64,
                        what: format!(
                            "the end marker counts {n} events, the frames hold {}",
                            self.events
                        ),
                    });
                }
                if self.data.len() != at + 9 {
                    return Err(LogError::Corrupt {
                        offset: (at + 9) as u64,
                        what: format!("{} bytes after the end marker", self.data.len() - at - 9),
                    });
                }
                self.ended = true;
                Ok(false)
            }
            b'F' => {
                let Some(h) = self.data.get(at + 1..at + 17) else {
                    return Err(truncated(
                        at + 1,
                        "a 16-byte frame header: the recording was cut short",
                    ));
                };
                let raw = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let packed = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
                let sum = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
                if raw == 0 || raw > MAX_FRAME {
                    return Err(LogError::Corrupt {
                        offset: (at + 1) as u64,
                        what: format!("a frame of {raw} bytes (1 to {MAX_FRAME} allowed)"),
                    });
                }
                let Some(body) = self.data.get(at + 17..at + 17 + packed) else {
                    return Err(truncated(
                        at + 17,
                        &format!(
                            "{packed} compressed bytes of a frame: the recording was cut short"
                        ),
                    ));
                };
                let frame =
                    lz4_flex::block::decompress(body, raw).map_err(|e| LogError::Corrupt {
                        offset: (at + 17) as u64,
                        what: format!("the frame does not decompress: {e}"),
                    })?;
                if frame.len() != raw || xxhash_rust::xxh3::xxh3_64(&frame) != sum {
                    return Err(LogError::Corrupt {
                        offset: at as u64,
                        what: "the frame does not match its checksum".into(),
                    });
                }
                self.frame = frame;
                self.frame_at = at as u64;
                self.in_frame = 0;
                self.pos = at + 17 + packed;
                Ok(true)
            }
            t => Err(LogError::Corrupt {
                offset: at as u64,
                what: format!("byte {t:#04x} where a frame ('F') or the end marker ('E') belongs"),
            }),
        }
    }
}

fn decode(c: &mut Cursor<'_>, d: &mut Decoder) -> Result<Event, LogError> {
    let k = c.u8("kind")?;
    if !(kind::STOP..=kind::END).contains(&k) {
        c.pos -= 1;
        return Err(c.err(format!("unknown event kind {k}")));
    }
    let mut icount = 0;
    if k != kind::DEVICE_TRACE && k != kind::NET_RX {
        icount = d.icount.wrapping_add(c.varint("instruction count")?);
        d.icount = icount;
    }
    let mut seq = 0;
    if matches!(
        k,
        kind::SERIAL_IN | kind::WARP | kind::HOST_QUIT | kind::VIRTIO_POLL | kind::END
    ) {
        seq = d.seq.wrapping_add(c.varint("poll point")?);
        d.seq = seq;
    }
    Ok(match k {
        kind::STOP => Event::Stop { icount },
        kind::SERIAL_IN => Event::SerialIn {
            icount,
            seq,
            bytes: c.bytes("serial input")?,
        },
        kind::WARP => Event::Warp {
            icount,
            seq,
            ns: c.varint("clock time")?,
        },
        kind::HOST_QUIT => Event::HostQuit { icount, seq },
        kind::VIRTIO_POLL => Event::VirtioPoll { icount, seq },
        kind::NET_RX => Event::NetRx {
            device: c.u8("device")?,
            call: c.varint("receive call")?,
            header: c.bytes("frame header")?,
            frame: c.bytes("frame")?,
        },
        kind::CHECKPOINT => {
            let index = c.varint("checkpoint index")?;
            let mut cpu = [0u64; 5];
            for h in &mut cpu {
                *h = c.u64le("CPU hash")?;
            }
            let clock_ns = c.varint("clock")?;
            let n = c.varint("device count")?;
            if n > 4096 {
                return Err(c.err(format!("{n} device hashes (at most 4096)")));
            }
            let mut devices = Vec::with_capacity(n as usize);
            for _ in 0..n {
                devices.push(c.u64le("device hash")?);
            }
            Event::Checkpoint {
                icount,
                checkpoint: Checkpoint {
                    index,
                    cpu,
                    clock_ns,
                    devices,
                },
            }
        }
        kind::DEVICE_TRACE => Event::DeviceTrace {
            bytes: c.bytes("device trace")?,
        },
        _ => {
            let status = c.varint("exit status")? as u32 as i32;
            let outcome = String::from_utf8_lossy(&c.bytes("outcome")?).into_owned();
            let state_hash = c.u64le("state hash")?;
            Event::End {
                icount,
                end: EndRecord {
                    seq,
                    status,
                    outcome,
                    state_hash,
                },
            }
        }
    })
}

/// Read a whole log (the fuzz target's entry): every event, or the first
/// error.
pub fn read_all(data: &[u8]) -> Result<(LogHeader, Vec<Event>), LogError> {
    let mut r = LogReader::from_bytes(data.to_vec())?;
    let mut v = Vec::new();
    while let Some(e) = r.next_event()? {
        v.push(e);
    }
    Ok((r.header.clone(), v))
}

/// What a damaged log still holds: its header and the complete events
/// before the damage.
#[derive(Debug)]
pub struct Salvaged {
    pub header: LogHeader,
    /// Every event of the frames before the damage.
    pub events: Vec<Event>,
    /// Why reading stopped (`None`: the log is whole).
    pub damage: Option<LogError>,
}

impl Salvaged {
    /// The last complete checkpoint: its index and instruction count.
    pub fn last_checkpoint(&self) -> Option<(u64, u64)> {
        self.events.iter().rev().find_map(|e| match e {
            Event::Checkpoint { icount, checkpoint } => Some((checkpoint.index, *icount)),
            _ => None,
        })
    }

    /// One line on what survived (for the message of a refused log).
    pub fn describe(&self) -> String {
        let n = self.events.len();
        match self.last_checkpoint() {
            Some((index, icount)) => format!(
                "{n} complete events precede it, through checkpoint {index} at instruction {icount}"
            ),
            None => format!("{n} complete events precede it, no checkpoint among them"),
        }
    }
}

/// Read what a log holds up to its first damage (a recording that was
/// killed ends in a partly written frame or without its end marker): the
/// header must be whole; the events of every intact frame before the
/// damage are kept, with the error that stopped the reading.
pub fn read_complete(data: &[u8]) -> Result<Salvaged, LogError> {
    let mut r = LogReader::from_bytes(data.to_vec())?;
    let mut events = Vec::new();
    let mut kept = 0;
    let damage = loop {
        match r.next_event() {
            Ok(Some(e)) => {
                events.push(e);
                // Only whole frames count: a frame that fails halfway
                // is dropped with its damage.
                if r.in_frame >= r.frame.len() {
                    kept = events.len();
                }
            }
            Ok(None) => {
                kept = events.len();
                break None;
            }
            Err(e) => break Some(e),
        }
    };
    events.truncate(kept);
    Ok(Salvaged {
        header: r.header.clone(),
        events,
        damage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            duet_version: "test".into(),
            kind: LogKind::Full,
            machine: RecordedMachine {
                backend: "interp".into(),
                guest: Some("serial-echo".into()),
                ..Default::default()
            },
        }
    }

    fn sample() -> Vec<Event> {
        let mut v = vec![
            Event::Stop { icount: 10 },
            Event::SerialIn {
                icount: 10,
                seq: 3,
                bytes: b"hello\n".to_vec(),
            },
            Event::Warp {
                icount: 99,
                seq: 7,
                ns: 123_456_789,
            },
            Event::VirtioPoll { icount: 99, seq: 8 },
            Event::NetRx {
                device: 0,
                call: 4,
                header: vec![0; 12],
                frame: vec![0xab; 60],
            },
            Event::Checkpoint {
                icount: 1000,
                checkpoint: Checkpoint {
                    index: 1,
                    cpu: [1, 2, 3, 4, 5],
                    clock_ns: 1000,
                    devices: vec![7, 8, 9],
                },
            },
            Event::DeviceTrace {
                bytes: b"pio  w 0x03f8 1 0x41 com1\n".to_vec(),
            },
            Event::HostQuit {
                icount: 2000,
                seq: 9,
            },
        ];
        // Enough events for several frames.
        for i in 0..20_000u64 {
            v.push(Event::Stop {
                icount: 3000 + i * 17,
            });
        }
        v.push(Event::End {
            icount: 1 << 40,
            end: EndRecord {
                seq: 40,
                status: 0,
                outcome: "guest powered off".into(),
                state_hash: 0xdead_beef,
            },
        });
        v
    }

    fn write(events: &[Event]) -> Vec<u8> {
        let buf = SharedVec::default();
        let mut w = LogWriter::new(Box::new(buf.clone()), &header()).unwrap();
        for e in events {
            w.push(e).unwrap();
        }
        w.finish().unwrap();
        let v = buf.0.lock().unwrap().clone();
        v
    }

    #[derive(Clone, Default)]
    struct SharedVec(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for SharedVec {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_round_trip_through_frames() {
        let events = sample();
        let bytes = write(&events);
        let (h, back) = read_all(&bytes).unwrap();
        assert_eq!(h, header());
        assert_eq!(back, events);
        // Small: deltas and varints, then lz4.
        assert!(bytes.len() < 40_000, "{} bytes", bytes.len());
    }

    #[test]
    fn damaged_logs_are_errors_with_offsets() {
        let bytes = write(&sample());
        // Every truncation is an error, never a panic or a silent success.
        for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
            let e = read_all(&bytes[..cut]).expect_err("truncated");
            let s = e.to_string();
            assert!(
                s.contains("truncated") || s.contains("not a duet"),
                "cut at {cut}: {s}"
            );
        }
        // Every flipped byte is an error (checksums cover header and frames).
        for at in (0..bytes.len()).step_by(53) {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            assert!(read_all(&b).is_err(), "flip at {at} went unnoticed");
        }
        let mut b = bytes.clone();
        b[8] = 9;
        let e = read_all(&b).unwrap_err();
        assert!(matches!(e, LogError::Version { found: 9 }), "{e}");
        assert!(e.to_string().contains("version 9"));
        let e = read_all(b"not a log at all").unwrap_err();
        assert!(matches!(e, LogError::Magic));
    }

    /// A log cut anywhere after its header keeps the events of its intact
    /// frames, in order, and says why it stopped; a whole log loses none.
    #[test]
    fn a_cut_log_keeps_its_complete_frames() {
        let events = sample();
        // A frame every 1000 events, as checkpoints flush them.
        let buf = SharedVec::default();
        let mut w = LogWriter::new(Box::new(buf.clone()), &header()).unwrap();
        for (i, e) in events.iter().enumerate() {
            w.push(e).unwrap();
            if i % 1000 == 999 {
                w.flush_frame().unwrap();
            }
        }
        w.finish().unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        let whole = read_complete(&bytes).unwrap();
        assert!(whole.damage.is_none());
        assert_eq!(whole.events, events);
        let head = 16 + serde_json::to_vec(&header()).unwrap().len() + 8;
        let mut seen = std::collections::BTreeSet::new();
        for cut in (head..bytes.len()).step_by(211) {
            let s = read_complete(&bytes[..cut]).unwrap();
            assert!(
                matches!(s.damage, Some(LogError::Truncated { .. })),
                "cut at {cut}: {:?}",
                s.damage
            );
            assert_eq!(s.events[..], events[..s.events.len()], "cut at {cut}");
            seen.insert(s.events.len());
        }
        assert!(seen.len() >= 3, "frames salvaged: {seen:?}");
        assert!(read_complete(&bytes[..head - 1]).is_err(), "a cut header");
    }
}
