//! Host input on its way into a device: a bounded queue that host threads
//! (a TAP reader, the user-mode network stack, a console socket) fill and
//! the device drains on the vCPU thread, when the machine polls it.
//!
//! This is the one door through which nondeterministic input reaches a
//! virtio device: whatever is pushed here enters the guest at a point the
//! machine chose (an exit of the vCPU loop), never from a host thread
//! writing guest memory behind the CPU's back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Wakes the machine when host input is waiting.
pub trait InputNotifier: Send + Sync {
    fn notify(&self);
}

/// A notifier that does nothing (tests, devices polled by hand).
pub struct NoNotify;

impl InputNotifier for NoNotify {
    fn notify(&self) {}
}

/// A bounded FIFO of host input items.
pub struct Inbox<T> {
    queue: Mutex<VecDeque<T>>,
    limit: usize,
    dropped: AtomicU64,
    notifier: Arc<dyn InputNotifier>,
}

impl<T> Inbox<T> {
    /// An inbox holding at most `limit` items; `notifier` is told when one
    /// arrives.
    pub fn new(limit: usize, notifier: Arc<dyn InputNotifier>) -> Arc<Self> {
        Arc::new(Inbox {
            queue: Mutex::new(VecDeque::new()),
            limit: limit.max(1),
            dropped: AtomicU64::new(0),
            notifier,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue an item (dropped, and counted, when the inbox is full: a
    /// guest that posts no buffers loses input as a real NIC would).
    /// Returns false when it was dropped.
    pub fn push(&self, item: T) -> bool {
        let ok = {
            let mut q = self.lock();
            if q.len() >= self.limit {
                false
            } else {
                q.push_back(item);
                true
            }
        };
        if ok {
            self.notifier.notify();
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Is there room for another item (producers that can wait use it for
    /// back-pressure instead of dropping)?
    pub fn has_room(&self) -> bool {
        self.lock().len() < self.limit
    }

    /// The oldest item.
    pub fn pop(&self) -> Option<T> {
        self.lock().pop_front()
    }

    /// Put an item back at the front (the device could not take it yet).
    pub fn unpop(&self, item: T) {
        self.lock().push_front(item);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Items dropped because the inbox was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Tell the machine to look again (a producer whose earlier item was
    /// refused, or a consumer that made room).
    pub fn notify(&self) {
        self.notifier.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl InputNotifier for Count {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn bounded_fifo_with_notifications() {
        let n = Arc::new(Count(AtomicUsize::new(0)));
        let i = Inbox::new(2, n.clone());
        assert!(i.push(1));
        assert!(i.push(2));
        assert!(!i.push(3));
        assert_eq!(i.dropped(), 1);
        assert_eq!(n.0.load(Ordering::SeqCst), 2);
        assert_eq!(i.pop(), Some(1));
        i.unpop(1);
        assert_eq!(i.pop(), Some(1));
        assert_eq!(i.pop(), Some(2));
        assert_eq!(i.pop(), None);
    }
}
