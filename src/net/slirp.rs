//! `--net user`: user-mode networking on libslirp, the stack QEMU uses,
//! with QEMU's conventions (network 10.0.2.0/24, guest 10.0.2.15 by DHCP,
//! gateway and host at 10.0.2.2, DNS at 10.0.2.3, `hostfwd=` ports on the
//! host forwarded into the guest). No root, no TAP device.
//!
//! libslirp is loaded at run time (`libslirp.so.0`, Debian's `libslirp0`)
//! so that building duet needs nothing beyond Rust; a missing library is
//! an error naming the package. Slirp is single-threaded: one thread owns
//! the `Slirp` instance and runs its poll loop and timers; the guest's
//! frames reach it through a queue and an eventfd, the frames it sends
//! the guest go to the NIC's inbox.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::Ipv4Addr;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::virtio::inbox::{Inbox, InputNotifier};
use devices::virtio::net::{NetBackend, NetHeader, RxFrame, HDR_LEN};

use super::NetError;
use crate::device_args::HostForward;

/// Frames waiting for the guest, at most (slirp's TCP retransmits what a
/// full inbox drops).
const INBOX_FRAMES: usize = 512;
/// Guest frames waiting for the slirp thread, at most.
const TX_FRAMES: usize = 512;

pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const DHCP_START: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

// ---- the C interface (libslirp.h, 4.x) -----------------------------------

#[repr(C)]
struct SlirpConfig {
    version: u32,
    restricted: c_int,
    in_enabled: bool,
    vnetwork: libc::in_addr,
    vnetmask: libc::in_addr,
    vhost: libc::in_addr,
    in6_enabled: bool,
    vprefix_addr6: libc::in6_addr,
    vprefix_len: u8,
    vhost6: libc::in6_addr,
    vhostname: *const c_char,
    tftp_server_name: *const c_char,
    tftp_path: *const c_char,
    bootfile: *const c_char,
    vdhcp_start: libc::in_addr,
    vnameserver: libc::in_addr,
    vnameserver6: libc::in6_addr,
    vdnssearch: *const *const c_char,
    vdomainname: *const c_char,
    if_mtu: usize,
    if_mru: usize,
    disable_host_loopback: bool,
    enable_emu: bool,
    outbound_addr: *mut libc::sockaddr_in,
    outbound_addr6: *mut libc::sockaddr_in6,
    disable_dns: bool,
}

type TimerCb = unsafe extern "C" fn(opaque: *mut c_void);

#[repr(C)]
struct SlirpCb {
    send_packet: unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize,
    guest_error: unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void),
    clock_get_ns: unsafe extern "C" fn(opaque: *mut c_void) -> i64,
    timer_new: unsafe extern "C" fn(
        cb: TimerCb,
        cb_opaque: *mut c_void,
        opaque: *mut c_void,
    ) -> *mut c_void,
    timer_free: unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void),
    timer_mod: unsafe extern "C" fn(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void),
    register_poll_fd: unsafe extern "C" fn(fd: c_int, opaque: *mut c_void),
    unregister_poll_fd: unsafe extern "C" fn(fd: c_int, opaque: *mut c_void),
    notify: unsafe extern "C" fn(opaque: *mut c_void),
}

type AddPollCb = unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
type GetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

const POLL_IN: c_int = 1;
const POLL_OUT: c_int = 2;
const POLL_PRI: c_int = 4;
const POLL_ERR: c_int = 8;
const POLL_HUP: c_int = 16;

/// The libslirp functions duet calls.
type NewFn = unsafe extern "C" fn(*const SlirpConfig, *const SlirpCb, *mut c_void) -> *mut c_void;
type CleanupFn = unsafe extern "C" fn(*mut c_void);
type FillFn = unsafe extern "C" fn(*mut c_void, *mut u32, AddPollCb, *mut c_void);
type PollFn = unsafe extern "C" fn(*mut c_void, c_int, GetREventsCb, *mut c_void);
type InputFn = unsafe extern "C" fn(*mut c_void, *const u8, c_int);
type HostFwdFn =
    unsafe extern "C" fn(*mut c_void, c_int, libc::in_addr, c_int, libc::in_addr, c_int) -> c_int;
type VersionFn = unsafe extern "C" fn() -> *const c_char;

struct Lib {
    new: NewFn,
    cleanup: CleanupFn,
    pollfds_fill: FillFn,
    pollfds_poll: PollFn,
    input: InputFn,
    add_hostfwd: HostFwdFn,
    version: VersionFn,
}

// SAFETY: the struct holds plain function pointers into a library that
// stays loaded for the life of the process.
unsafe impl Send for Lib {}
// SAFETY: as above; the functions are only called on the slirp thread.
unsafe impl Sync for Lib {}

fn load() -> Result<&'static Lib, NetError> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: dlopen with a NUL-terminated name; the handle is never
        // closed, so the symbols stay valid.
        let h = unsafe { libc::dlopen(c"libslirp.so.0".as_ptr(), libc::RTLD_NOW) };
        if h.is_null() {
            return Err("libslirp.so.0 cannot be loaded (install Debian's libslirp0)".into());
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(h, name.as_ptr()) };
            if p.is_null() {
                Err(format!("libslirp has no {}", name.to_string_lossy()))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol is transmuted to the signature libslirp.h
        // declares for it.
        unsafe {
            Ok(Lib {
                new: std::mem::transmute::<*mut c_void, NewFn>(sym(c"slirp_new")?),
                cleanup: std::mem::transmute::<*mut c_void, CleanupFn>(sym(c"slirp_cleanup")?),
                pollfds_fill: std::mem::transmute::<*mut c_void, FillFn>(sym(
                    c"slirp_pollfds_fill",
                )?),
                pollfds_poll: std::mem::transmute::<*mut c_void, PollFn>(sym(
                    c"slirp_pollfds_poll",
                )?),
                input: std::mem::transmute::<*mut c_void, InputFn>(sym(c"slirp_input")?),
                add_hostfwd: std::mem::transmute::<*mut c_void, HostFwdFn>(sym(
                    c"slirp_add_hostfwd",
                )?),
                version: std::mem::transmute::<*mut c_void, VersionFn>(sym(
                    c"slirp_version_string",
                )?),
            })
        }
    })
    .as_ref()
    .map_err(|e| NetError::User(e.clone()))
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from_ne_bytes(a.octets()),
    }
}

// ---- the slirp thread's state ----------------------------------------------

struct Timer {
    cb: TimerCb,
    cb_opaque: *mut c_void,
    /// Expiry in milliseconds of the slirp clock, if armed.
    expire: Option<i64>,
}

/// What the callbacks reach through `opaque` (lives on the slirp thread).
struct Context {
    start: Instant,
    rx: Arc<Inbox<RxFrame>>,
    buffers: Arc<BufferPool>,
    /// Boxed: libslirp holds pointers to them, which must not move.
    #[allow(clippy::vec_box)]
    timers: Vec<Box<Timer>>,
    pollfds: Vec<libc::pollfd>,
    guest_errors: u64,
}

impl Context {
    fn now_ms(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }
}

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: opaque is the Context we passed to slirp_new; buf/len is the
    // frame libslirp hands us for the duration of the call.
    let (ctx, frame) = unsafe {
        (
            &mut *(opaque as *mut Context),
            std::slice::from_raw_parts(buf as *const u8, len),
        )
    };
    ctx.rx.push(RxFrame {
        header: [0; HDR_LEN],
        data: ctx.buffers.filled(frame),
    });
    len as isize
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, opaque: *mut c_void) {
    // SAFETY: opaque is our Context; msg a NUL-terminated string.
    let ctx = unsafe { &mut *(opaque as *mut Context) };
    ctx.guest_errors += 1;
    if ctx.guest_errors == 1 {
        // SAFETY: libslirp passes a valid C string.
        let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
        log::warn!("user network: guest error: {m} (logged once)");
    }
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: opaque is our Context.
    let ctx = unsafe { &*(opaque as *const Context) };
    ctx.start.elapsed().as_nanos() as i64
}

unsafe extern "C" fn cb_timer_new(
    cb: TimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: opaque is our Context.
    let ctx = unsafe { &mut *(opaque as *mut Context) };
    let mut t = Box::new(Timer {
        cb,
        cb_opaque,
        expire: None,
    });
    let p = &mut *t as *mut Timer as *mut c_void;
    ctx.timers.push(t);
    p
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: opaque is our Context; timer one of its boxes.
    let ctx = unsafe { &mut *(opaque as *mut Context) };
    ctx.timers
        .retain(|t| &**t as *const Timer as *mut c_void != timer);
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    // SAFETY: opaque is our Context; timer one of its boxes.
    let ctx = unsafe { &mut *(opaque as *mut Context) };
    if let Some(t) = ctx
        .timers
        .iter_mut()
        .find(|t| &***t as *const Timer as *mut c_void == timer)
    {
        t.expire = Some(expire_ms);
    }
}

unsafe extern "C" fn cb_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn cb_notify(_opaque: *mut c_void) {}

unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: opaque is our Context.
    let ctx = unsafe { &mut *(opaque as *mut Context) };
    let mut ev: libc::c_short = 0;
    if events & POLL_IN != 0 {
        ev |= libc::POLLIN;
    }
    if events & POLL_OUT != 0 {
        ev |= libc::POLLOUT;
    }
    if events & POLL_PRI != 0 {
        ev |= libc::POLLPRI;
    }
    ctx.pollfds.push(libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    });
    (ctx.pollfds.len() - 1) as c_int
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: opaque is our Context.
    let ctx = unsafe { &*(opaque as *const Context) };
    let Some(p) = usize::try_from(idx).ok().and_then(|i| ctx.pollfds.get(i)) else {
        return 0;
    };
    let mut r = 0;
    if p.revents & libc::POLLIN != 0 {
        r |= POLL_IN;
    }
    if p.revents & libc::POLLOUT != 0 {
        r |= POLL_OUT;
    }
    if p.revents & libc::POLLPRI != 0 {
        r |= POLL_PRI;
    }
    if p.revents & libc::POLLERR != 0 {
        r |= POLL_ERR;
    }
    if p.revents & libc::POLLHUP != 0 {
        r |= POLL_HUP;
    }
    r
}

// ---- the backend ----------------------------------------------------------------

/// Buffers of received frames the device is done with, back to the slirp
/// thread to fill again (an allocation there and a free on the vCPU thread
/// per frame made the two threads contend for the allocator's arena).
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// At most a full inbox's worth is kept.
    const KEEP: usize = INBOX_FRAMES;

    /// A buffer holding a copy of `frame`.
    fn filled(&self, frame: &[u8]) -> Vec<u8> {
        let spare = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut v = spare.unwrap_or_default();
        v.clear();
        v.extend_from_slice(frame);
        v
    }

    fn give(&self, buffer: Vec<u8>) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < Self::KEEP {
            pool.push(buffer);
        }
    }
}

/// Frames from the guest to the slirp thread.
struct TxQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    wake: OwnedFd,
}

impl TxQueue {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }
}

/// User-mode networking for one NIC.
pub struct SlirpBackend {
    tx: Arc<TxQueue>,
    rx: Arc<Inbox<RxFrame>>,
    buffers: Arc<BufferPool>,
    stop: Arc<AtomicBool>,
    version: String,
    tx_dropped: u64,
}

impl SlirpBackend {
    /// Start the stack with `hostfwd` rules; fails if libslirp is missing
    /// or a forwarded port cannot be bound.
    pub fn open(
        hostfwd: &[HostForward],
        notifier: Arc<dyn InputNotifier>,
    ) -> Result<Self, NetError> {
        let lib = load()?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(NetError::User(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: efd is a fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let tx = Arc::new(TxQueue {
            frames: Mutex::new(VecDeque::new()),
            wake,
        });
        let rx = Inbox::new(INBOX_FRAMES, notifier);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let fwd = hostfwd.to_vec();
        let buffers = Arc::new(BufferPool::default());
        let (t_tx, t_rx, t_stop) = (tx.clone(), rx.clone(), stop.clone());
        let t_buffers = buffers.clone();
        std::thread::Builder::new()
            .name("duet-slirp".into())
            .spawn(move || run(lib, &fwd, t_tx, t_rx, t_buffers, t_stop, ready_tx))
            .map_err(|e| NetError::User(format!("cannot start the network thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(NetError::User(e)),
            Err(_) => return Err(NetError::User("the network thread died".into())),
        }
        // SAFETY: slirp_version_string returns a static C string.
        let version = unsafe { CStr::from_ptr((lib.version)()) }
            .to_string_lossy()
            .into_owned();
        Ok(SlirpBackend {
            tx,
            rx,
            buffers,
            stop,
            version,
            tx_dropped: 0,
        })
    }
}

/// The slirp thread: create the stack, then poll sockets, the guest's
/// frames and timers until stopped.
fn run(
    lib: &'static Lib,
    hostfwd: &[HostForward],
    tx: Arc<TxQueue>,
    rx: Arc<Inbox<RxFrame>>,
    buffers: Arc<BufferPool>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let mut ctx = Box::new(Context {
        start: Instant::now(),
        rx,
        buffers,
        timers: Vec::new(),
        pollfds: Vec::new(),
        guest_errors: 0,
    });
    let opaque = &mut *ctx as *mut Context as *mut c_void;
    let zero6 = libc::in6_addr { s6_addr: [0; 16] };
    let cfg = SlirpConfig {
        version: 3,
        restricted: 0,
        in_enabled: true,
        vnetwork: in_addr(NETWORK),
        vnetmask: in_addr(NETMASK),
        vhost: in_addr(HOST),
        in6_enabled: false,
        vprefix_addr6: zero6,
        vprefix_len: 0,
        vhost6: zero6,
        vhostname: std::ptr::null(),
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(DHCP_START),
        vnameserver: in_addr(DNS),
        vnameserver6: zero6,
        vdnssearch: std::ptr::null(),
        vdomainname: std::ptr::null(),
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        enable_emu: false,
        outbound_addr: std::ptr::null_mut(),
        outbound_addr6: std::ptr::null_mut(),
        disable_dns: false,
    };
    let cbs = SlirpCb {
        send_packet: cb_send_packet,
        guest_error: cb_guest_error,
        clock_get_ns: cb_clock_get_ns,
        timer_new: cb_timer_new,
        timer_free: cb_timer_free,
        timer_mod: cb_timer_mod,
        register_poll_fd: cb_poll_fd,
        unregister_poll_fd: cb_poll_fd,
        notify: cb_notify,
    };
    // SAFETY: config and callbacks outlive the instance (both live until
    // this function returns, after slirp_cleanup); opaque is our Context.
    let slirp = unsafe { (lib.new)(&cfg, &cbs, opaque) };
    if slirp.is_null() {
        let _ = ready.send(Err("libslirp could not start".into()));
        return;
    }
    for f in hostfwd {
        // SAFETY: a live instance; addresses by value.
        let r = unsafe {
            (lib.add_hostfwd)(
                slirp,
                c_int::from(f.udp),
                in_addr(f.host_addr),
                c_int::from(f.host_port),
                in_addr(f.guest_addr),
                c_int::from(f.guest_port),
            )
        };
        if r < 0 {
            let _ = ready.send(Err(format!(
                "hostfwd={}:{}:{}-{}:{}: cannot listen on {}:{} (in use, or not allowed)",
                if f.udp { "udp" } else { "tcp" },
                f.host_addr,
                f.host_port,
                f.guest_addr,
                f.guest_port,
                f.host_addr,
                f.host_port
            )));
            // SAFETY: a live instance, destroyed once.
            unsafe { (lib.cleanup)(slirp) };
            return;
        }
    }
    let _ = ready.send(Ok(()));
    let mut batch: Vec<Vec<u8>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // The guest's frames.
        batch.extend(
            tx.frames
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        for f in batch.drain(..) {
            // SAFETY: a live instance; the frame outlives the call.
            unsafe { (lib.input)(slirp, f.as_ptr(), f.len() as c_int) };
        }
        // Timers.
        let now = ctx.now_ms();
        let due: Vec<(TimerCb, *mut c_void)> = ctx
            .timers
            .iter_mut()
            .filter(|t| t.expire.is_some_and(|e| e <= now))
            .map(|t| {
                t.expire = None;
                (t.cb, t.cb_opaque)
            })
            .collect();
        for (cb, arg) in due {
            // SAFETY: a callback libslirp registered, with its argument.
            unsafe { cb(arg) };
        }
        let next_timer = ctx.timers.iter().filter_map(|t| t.expire).min();
        // Sockets.
        ctx.pollfds.clear();
        ctx.pollfds.push(libc::pollfd {
            fd: tx.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout: u32 = 100;
        // SAFETY: a live instance; the callback fills ctx.pollfds.
        unsafe { (lib.pollfds_fill)(slirp, &mut timeout, cb_add_poll, opaque) };
        if let Some(t) = next_timer {
            timeout = timeout.min((t - ctx.now_ms()).clamp(0, 100) as u32);
        }
        // SAFETY: pollfds is a live Vec of pollfd.
        let r = unsafe {
            libc::poll(
                ctx.pollfds.as_mut_ptr(),
                ctx.pollfds.len() as libc::nfds_t,
                timeout as c_int,
            )
        };
        if ctx.pollfds[0].revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a live u64 from our eventfd.
            unsafe { libc::read(tx.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        // SAFETY: a live instance; revents are read through the callback.
        unsafe { (lib.pollfds_poll)(slirp, c_int::from(r < 0), cb_get_revents, opaque) };
    }
    // SAFETY: a live instance, destroyed once; no callbacks run after.
    unsafe { (lib.cleanup)(slirp) };
    drop(ctx);
}

impl NetBackend for SlirpBackend {
    fn send(&mut self, _header: &NetHeader, frame: &[u8]) {
        {
            let mut q = self.tx.frames.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= TX_FRAMES {
                self.tx_dropped += 1;
                return;
            }
            q.push_back(frame.to_vec());
        }
        self.tx.wake();
    }

    fn recv(&mut self) -> Option<RxFrame> {
        self.rx.pop()
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.rx.unpop(frame);
    }

    fn recycle(&mut self, buffer: Vec<u8>) {
        self.buffers.give(buffer);
    }

    fn describe(&self) -> String {
        format!(
            "user (libslirp {}){}",
            self.version,
            if self.tx_dropped + self.rx.dropped() > 0 {
                format!(
                    ", {} frames dropped out, {} in",
                    self.tx_dropped,
                    self.rx.dropped()
                )
            } else {
                String::new()
            }
        )
    }
}

impl Drop for SlirpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_refills_given_buffers_and_keeps_a_bounded_number() {
        let pool = BufferPool::default();
        let first = pool.filled(b"frame one");
        assert_eq!(first, b"frame one");
        let at = first.as_ptr();
        pool.give(first);
        // The next frame lands in the same allocation, holding only itself.
        let second = pool.filled(b"two");
        assert_eq!((second.as_slice(), second.as_ptr()), (&b"two"[..], at));
        for _ in 0..BufferPool::KEEP + 10 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.0.lock().unwrap().len(), BufferPool::KEEP);
    }
}
