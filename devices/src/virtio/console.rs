//! virtio-console (virtio 1.2, 5.3) with one port, no multiport: Linux
//! names it `hvc0`. What the guest writes goes to a host writer (a file,
//! a socket, stdout); host input arrives through a [`ConsoleInput`] (the
//! machine's [`Inbox`] of bytes, or a recorder or replayer around it) and is
//! copied into the receive buffers when the machine polls or the guest
//! notifies the receive queue.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use super::inbox::Inbox;
use super::{
    device_type, feature, read_config_bytes, DeviceFault, GuestMemory, Signals, VirtioDevice,
    Virtqueue,
};

pub const QUEUE_SIZE: u16 = 128;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Largest chunk copied from one transmit buffer.
const MAX_TX: usize = 64 * 1024;

/// Where the console's host input comes from. The device asks only when
/// the machine polls it or the guest notifies its receive queue, so the
/// calls are numbered alike in a recorded run and its replay.
pub trait ConsoleInput: Send {
    /// The next chunk of host input, if any.
    fn next_input(&mut self) -> Option<Vec<u8>>;
}

impl ConsoleInput for Arc<Inbox<Vec<u8>>> {
    fn next_input(&mut self) -> Option<Vec<u8>> {
        self.pop()
    }
}

/// A host side that needs no host: it first supplies a fixed greeting,
/// then gives back, chunk by chunk, whatever the guest writes (the
/// console's counterpart of the loopback NIC). Its input is a function of
/// the guest alone, so runs repeat exactly; the built-in guests use it.
/// The same value serves as the device's output and its input.
#[derive(Clone)]
pub struct LoopbackConsole {
    state: Arc<Mutex<LoopbackState>>,
}

struct LoopbackState {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes queued; output beyond [`LoopbackConsole::LIMIT`] is dropped.
    queued: usize,
}

impl LoopbackConsole {
    /// Bytes held at most (the guest's output beyond them is lost, as
    /// with a host that stopped reading).
    pub const LIMIT: usize = 64 * 1024;

    pub fn new(greeting: &[u8]) -> Self {
        let mut chunks = VecDeque::new();
        if !greeting.is_empty() {
            chunks.push_back(greeting[..greeting.len().min(Self::LIMIT)].to_vec());
        }
        LoopbackConsole {
            state: Arc::new(Mutex::new(LoopbackState {
                queued: chunks.iter().map(Vec::len).sum(),
                chunks,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoopbackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for LoopbackConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.lock();
        let room = Self::LIMIT - s.queued;
        let n = buf.len().min(room);
        if n > 0 {
            s.chunks.push_back(buf[..n].to_vec());
            s.queued += n;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleInput for LoopbackConsole {
    fn next_input(&mut self) -> Option<Vec<u8>> {
        let mut s = self.lock();
        let c = s.chunks.pop_front()?;
        s.queued -= c.len();
        Some(c)
    }
}

pub struct VirtioConsole {
    output: Box<dyn Write + Send>,
    input: Box<dyn ConsoleInput>,
    /// Input taken from the inbox but not yet placed in a buffer.
    pending: Vec<u8>,
    rx: Option<Virtqueue>,
    tx: Option<Virtqueue>,
    mem: Option<GuestMemory>,
    bytes_out: u64,
    bytes_in: u64,
}

impl VirtioConsole {
    pub fn new(output: Box<dyn Write + Send>, input: Box<dyn ConsoleInput>) -> Self {
        VirtioConsole {
            output,
            input,
            pending: Vec::new(),
            rx: None,
            tx: None,
            mem: None,
            bytes_out: 0,
            bytes_in: 0,
        }
    }

    fn process_tx(&mut self) -> Result<Signals, DeviceFault> {
        let (Some(mut q), Some(mem)) = (self.tx.take(), self.mem.clone()) else {
            return Ok(Signals::default());
        };
        let r = q.serve_all(TX_QUEUE, |chain| {
            let bytes = chain.read_bytes(&mem, 0, MAX_TX);
            self.bytes_out += bytes.len() as u64;
            // Output errors (a closed socket) lose output, not the VM.
            let _ = self.output.write_all(&bytes);
            0
        });
        let _ = self.output.flush();
        self.tx = Some(q);
        r
    }

    fn process_rx(&mut self) -> Result<Signals, DeviceFault> {
        let (Some(mut q), Some(mem)) = (self.rx.take(), self.mem.clone()) else {
            return Ok(Signals::default());
        };
        let mut used = false;
        let result = loop {
            if self.pending.is_empty() {
                match self.input.next_input() {
                    Some(b) => self.pending = b,
                    None => break Ok(()),
                }
                continue;
            }
            let chain = match q.pop() {
                Ok(Some(c)) => c,
                Ok(None) => {
                    if q.enable_notification() {
                        continue;
                    }
                    break Ok(());
                }
                Err(error) => {
                    break Err(DeviceFault::Queue {
                        queue: RX_QUEUE,
                        error,
                    })
                }
            };
            let n = chain.write_bytes(&mem, 0, &self.pending);
            self.pending.drain(..n);
            self.bytes_in += n as u64;
            if let Err(error) = q.add_used(chain.head, n as u32) {
                break Err(DeviceFault::Queue {
                    queue: RX_QUEUE,
                    error,
                });
            }
            used = true;
        };
        let signal = used && q.needs_interrupt();
        self.rx = Some(q);
        result?;
        Ok(if signal {
            Signals::queue(RX_QUEUE)
        } else {
            Signals::default()
        })
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        feature::COMMON
    }

    fn config_len(&self) -> usize {
        12
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        // cols, rows, max_nr_ports (1), emerg_wr: all meaningful only with
        // features duet does not offer.
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        queues: Vec<Option<Virtqueue>>,
    ) -> Result<Signals, DeviceFault> {
        let mut it = queues.into_iter();
        self.rx = it.next().flatten();
        self.tx = it.next().flatten();
        self.mem = Some(mem);
        let mut s = self.process_tx()?;
        s |= self.process_rx()?;
        Ok(s)
    }

    fn reset(&mut self) {
        self.rx = None;
        self.tx = None;
        self.mem = None;
    }

    fn notify(&mut self, queue: usize) -> Result<Signals, DeviceFault> {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => Ok(Signals::default()),
        }
    }

    fn poll(&mut self) -> Result<Signals, DeviceFault> {
        self.process_rx()
    }

    fn describe(&self) -> String {
        format!("{} bytes out, {} bytes in", self.bytes_out, self.bytes_in)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::inbox::NoNotify;
    use crate::virtio::queue::testing::{memory, DriverQueue};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Activate `d` with a receive and a transmit queue of 8 in `mem`.
    fn activate(d: &mut VirtioConsole, mem: &GuestMemory) -> (DriverQueue, DriverQueue) {
        let rx = DriverQueue::new(0x1000, 8);
        let tx = DriverQueue::new(0x40000, 8);
        let qs = vec![
            Some(Virtqueue::new(&rx.config(), false, mem.clone()).unwrap()),
            Some(Virtqueue::new(&tx.config(), false, mem.clone()).unwrap()),
        ];
        d.activate(mem.clone(), 0, qs).unwrap();
        (rx, tx)
    }

    #[test]
    fn a_line_each_way() {
        let mem = memory();
        let out = Out::default();
        let inbox = Inbox::new(16, Arc::new(NoNotify));
        let mut d = VirtioConsole::new(Box::new(out.clone()), Box::new(inbox.clone()));
        let (mut rx, mut tx) = activate(&mut d, &mem);
        tx.add_chain(&mem, &[(b"hello host\n", 11, false)]);
        d.notify(TX_QUEUE).unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"hello host\n");
        inbox.push(b"hi guest\n".to_vec());
        let h = rx.add_chain(&mem, &[(&[], 4, true)]);
        rx.add_chain(&mem, &[(&[], 64, true)]);
        let s = d.poll().unwrap();
        assert!(s.queues & 1 != 0);
        assert_eq!(rx.take_used(&mem), vec![(h, 4), (h + 1, 5)]);
        let a: u64 = mem.read_obj(GuestAddress(rx.desc)).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(a)).unwrap();
        assert_eq!(&b, b"hi g");
    }

    /// The loopback host: the greeting first, then the guest's own line
    /// back; output past the limit is dropped, never queued.
    #[test]
    fn the_loopback_host_greets_then_echoes_within_its_limit() {
        let mem = memory();
        let host = LoopbackConsole::new(b"hi\n");
        let mut d = VirtioConsole::new(Box::new(host.clone()), Box::new(host.clone()));
        let (mut rx, mut tx) = activate(&mut d, &mem);
        let h = rx.add_chain(&mem, &[(&[], 64, true)]);
        d.notify(RX_QUEUE).unwrap();
        assert_eq!(rx.take_used(&mem), vec![(h, 3)]);
        tx.add_chain(&mem, &[(b"back", 4, false)]);
        d.notify(TX_QUEUE).unwrap();
        let h = rx.add_chain(&mem, &[(&[], 64, true)]);
        d.notify(RX_QUEUE).unwrap();
        assert_eq!(rx.take_used(&mem), vec![(h, 4)]);
        let mut w = host.clone();
        w.write_all(&vec![7u8; LoopbackConsole::LIMIT + 10])
            .unwrap();
        let mut i = host.clone();
        assert_eq!(
            i.next_input().map(|c| c.len()),
            Some(LoopbackConsole::LIMIT)
        );
        assert_eq!(i.next_input(), None);
    }
}
