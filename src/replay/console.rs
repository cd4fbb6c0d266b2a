//! virtio-console input through the door: the recording wrapper logs every
//! chunk the device takes from its host side with the number of the input
//! call that got it; the replay hands the same chunks back on the same
//! calls. The device asks for input only when the machine polls it (host
//! input pending, logged) or when the guest notifies its receive queue
//! (deterministic), so the calls are numbered the same in both runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use devices::virtio::console::ConsoleInput;

use super::log::Event;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records what `inner` gives the console.
pub struct RecordingConsole {
    inner: Box<dyn ConsoleInput>,
    calls: u64,
    log: Arc<Mutex<Vec<Event>>>,
}

impl RecordingConsole {
    pub fn new(inner: Box<dyn ConsoleInput>, log: Arc<Mutex<Vec<Event>>>) -> Self {
        RecordingConsole {
            inner,
            calls: 0,
            log,
        }
    }
}

impl ConsoleInput for RecordingConsole {
    fn next_input(&mut self) -> Option<Vec<u8>> {
        self.calls += 1;
        let b = self.inner.next_input()?;
        lock(&self.log).push(Event::ConsoleIn {
            call: self.calls,
            bytes: b.clone(),
        });
        Some(b)
    }
}

/// The console input of a recording, by input call.
#[derive(Default)]
pub struct ConsoleScript {
    chunks: VecDeque<(u64, Vec<u8>)>,
}

impl ConsoleScript {
    pub fn new(mut chunks: Vec<(u64, Vec<u8>)>) -> Self {
        chunks.sort_by_key(|c| c.0);
        ConsoleScript {
            chunks: chunks.into(),
        }
    }

    /// Chunks not handed out (a replay that ends with some left diverged).
    pub fn left(&self) -> usize {
        self.chunks.len()
    }
}

/// Plays recorded console input back.
pub struct ReplayConsole {
    script: Arc<Mutex<ConsoleScript>>,
    calls: u64,
}

impl ReplayConsole {
    pub fn new(script: Arc<Mutex<ConsoleScript>>) -> Self {
        ReplayConsole { script, calls: 0 }
    }
}

impl ConsoleInput for ReplayConsole {
    fn next_input(&mut self) -> Option<Vec<u8>> {
        self.calls += 1;
        let mut s = lock(&self.script);
        if s.chunks.front().is_some_and(|c| c.0 == self.calls) {
            return s.chunks.pop_front().map(|c| c.1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Given(VecDeque<Option<Vec<u8>>>);
    impl ConsoleInput for Given {
        fn next_input(&mut self) -> Option<Vec<u8>> {
            self.0.pop_front().flatten()
        }
    }

    /// What the recorder logs, the replayer gives back on the same calls.
    #[test]
    fn recorded_input_comes_back_on_the_same_calls() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let host = Given(
            [
                None,
                Some(b"ab".to_vec()),
                None,
                None,
                Some(b"c\n".to_vec()),
            ]
            .into_iter()
            .collect(),
        );
        let mut r = RecordingConsole::new(Box::new(host), log.clone());
        let recorded: Vec<_> = (0..6).map(|_| r.next_input()).collect();
        let chunks = lock(&log)
            .iter()
            .map(|e| match e {
                Event::ConsoleIn { call, bytes } => (*call, bytes.clone()),
                e => panic!("{e:?}"),
            })
            .collect();
        let script = Arc::new(Mutex::new(ConsoleScript::new(chunks)));
        let mut p = ReplayConsole::new(script.clone());
        let replayed: Vec<_> = (0..6).map(|_| p.next_input()).collect();
        assert_eq!(replayed, recorded);
        assert_eq!(lock(&script).left(), 0);
    }
}
