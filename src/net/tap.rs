//! `--net tap=IFNAME`: a TAP interface opened through `/dev/net/tun`, with
//! `IFF_VNET_HDR` when the kernel offers it (frames then carry the
//! virtio-net header, so checksum and segmentation offloads pass between
//! guest and host untouched), as Firecracker and Cloud Hypervisor do it.
//!
//! The guest's frames are written from the vCPU thread; a reader thread
//! takes received frames into the device's inbox, waiting (not dropping)
//! while the inbox is full, so the host kernel's queue paces the sender.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::inbox::{Inbox, InputNotifier};
use devices::virtio::net::{GuestOffloads, NetBackend, NetHeader, RxFrame, HDR_LEN, MAX_FRAME};

use super::NetError;

// ioctl numbers (linux/if_tun.h): _IOW('T', n, int), _IOR for GETFEATURES.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Frames waiting for the guest, at most.
const INBOX_FRAMES: usize = 256;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device backing one NIC.
pub struct TapBackend {
    file: Arc<File>,
    vnet_hdr: bool,
    ifname: String,
    rx: Arc<Inbox<RxFrame>>,
    stop: Arc<AtomicBool>,
    errors: u64,
}

fn ioctl(fd: &File, req: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: the callers pass requests whose argument is `arg` (an ifreq,
    // an int or an unsigned int they own), on an open TUN descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl TapBackend {
    /// Attach to TAP interface `ifname` (created if it does not exist and
    /// the process may).
    pub fn open(ifname: &str, notifier: Arc<dyn InputNotifier>) -> Result<Self, NetError> {
        // SAFETY: open with a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(NetError::Tap(format!(
                "cannot open /dev/net/tun: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut features: libc::c_uint = 0;
        let offered = ioctl(
            &file,
            TUNGETFEATURES,
            (&mut features as *mut libc::c_uint).cast(),
        )
        .map(|()| features & IFF_VNET_HDR as libc::c_uint != 0)
        .unwrap_or(false);
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | if offered { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        let n = ifname.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        ioctl(&file, TUNSETIFF, (&mut req as *mut IfReq).cast()).map_err(|e| {
            NetError::Tap(match e.raw_os_error() {
                Some(libc::EPERM) => format!(
                    "attaching to {ifname} needs CAP_NET_ADMIN, or a TAP device created for \
                     this user (ip tuntap add {ifname} mode tap user $USER)"
                ),
                Some(libc::EBUSY) => format!("{ifname} is in use by another process"),
                Some(libc::EINVAL) => format!("{ifname} exists and is not a TAP device"),
                _ => format!("attaching to {ifname}: {e}"),
            })
        })?;
        let mut vnet_hdr = offered;
        if vnet_hdr {
            let mut size: libc::c_int = HDR_LEN as libc::c_int;
            if ioctl(
                &file,
                TUNSETVNETHDRSZ,
                (&mut size as *mut libc::c_int).cast(),
            )
            .is_err()
            {
                vnet_hdr = false;
            }
        }
        let file = Arc::new(file);
        let rx = Inbox::new(INBOX_FRAMES, notifier);
        let stop = Arc::new(AtomicBool::new(false));
        spawn_reader(file.clone(), vnet_hdr, rx.clone(), stop.clone(), ifname)?;
        Ok(TapBackend {
            file,
            vnet_hdr,
            ifname: ifname.to_string(),
            rx,
            stop,
            errors: 0,
        })
    }
}

fn spawn_reader(
    file: Arc<File>,
    vnet_hdr: bool,
    rx: Arc<Inbox<RxFrame>>,
    stop: Arc<AtomicBool>,
    ifname: &str,
) -> Result<(), NetError> {
    std::thread::Builder::new()
        .name(format!("duet-tap-{ifname}"))
        .spawn(move || {
            let hdr = if vnet_hdr { HDR_LEN } else { 0 };
            let mut buf = vec![0u8; hdr + MAX_FRAME];
            while !stop.load(Ordering::Relaxed) {
                if !rx.has_room() {
                    rx.notify();
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; bounded timeout so `stop` is seen.
                let r = unsafe { libc::poll(&mut pfd, 1, 100) };
                if r <= 0 {
                    continue;
                }
                // SAFETY: reading into our own buffer of buf.len() bytes.
                let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let n = n as usize;
                if n < hdr {
                    continue;
                }
                let mut header = [0u8; HDR_LEN];
                header[..hdr].copy_from_slice(&buf[..hdr]);
                rx.push(RxFrame {
                    header,
                    data: buf[hdr..n].to_vec(),
                });
            }
        })
        .map(|_| ())
        .map_err(|e| NetError::Tap(format!("cannot start the TAP reader: {e}")))
}

impl NetBackend for TapBackend {
    fn send(&mut self, header: &NetHeader, frame: &[u8]) {
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: if self.vnet_hdr { HDR_LEN } else { 0 },
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if r < 0 {
            // The host queue is full or the interface is down: the frame
            // is lost, as on a wire.
            self.errors += 1;
        }
    }

    fn recv(&mut self) -> Option<RxFrame> {
        self.rx.pop()
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.rx.unpop(frame);
    }

    fn offloads(&self) -> bool {
        self.vnet_hdr
    }

    fn set_guest_offloads(&mut self, o: GuestOffloads) {
        let mut flags: libc::c_uint = 0;
        if o.csum {
            flags |= TUN_F_CSUM;
            if o.tso4 {
                flags |= TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= TUN_F_TSO6;
            }
            if o.ecn && (o.tso4 || o.tso6) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        // TUNSETOFFLOAD takes the flags by value.
        // SAFETY: an ioctl whose argument is an integer, on our descriptor.
        let r =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if r < 0 {
            log::warn!(
                "tap {}: setting offloads failed: {}",
                self.ifname,
                io::Error::last_os_error()
            );
        }
    }

    fn describe(&self) -> String {
        format!(
            "tap {}{}{}",
            self.ifname,
            if self.vnet_hdr { " (vnet header)" } else { "" },
            if self.errors > 0 {
                format!(", {} send errors", self.errors)
            } else {
                String::new()
            }
        )
    }
}

impl Drop for TapBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
