//! No data lost: the built-in `virtio` guest writes sector 1 of a disk on
//! each transport (image files given with `--disk`), and the host finds
//! the bytes in the files after the guest powers off, after SIGTERM and
//! after Ctrl-A x on a terminal; on both backends (the KVM cases skip
//! with a reason where /dev/kvm is missing).

use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use duet::guests::virtio::sector_pattern;

/// Where the guest keeps each transport's buffers (the pattern depends on
/// it): the PCI disk's region, then the MMIO disk's.
const PCI_REGION: u32 = 0x20000;
const MMIO_REGION: u32 = 0x40000;

struct Images {
    dir: PathBuf,
    pci: PathBuf,
    mmio: PathBuf,
}

impl Images {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("duet-data-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pci = dir.join("pci.img");
        let mmio = dir.join("mmio.img");
        std::fs::write(&pci, vec![0u8; 256 * 1024]).unwrap();
        std::fs::write(&mmio, vec![0u8; 256 * 1024]).unwrap();
        Images { dir, pci, mmio }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--disk".into(),
            format!("path={}", self.pci.display()),
            "--disk".into(),
            format!("path={},transport=mmio", self.mmio.display()),
        ]
    }

    /// Every byte of sector 1 in both files, nothing else written.
    #[track_caller]
    fn check(&self, what: &str) {
        for (path, region) in [(&self.pci, PCI_REGION), (&self.mmio, MMIO_REGION)] {
            let data = std::fs::read(path).unwrap();
            assert_eq!(
                &data[512..1024],
                &sector_pattern(region)[..],
                "{what}: sector 1 of {}",
                path.display()
            );
            assert!(data[..512].iter().all(|&b| b == 0), "{what}: sector 0");
            assert!(
                data[1024..].iter().all(|&b| b == 0),
                "{what}: after sector 1"
            );
        }
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn backends(test: &str) -> Vec<&'static str> {
    let mut v = vec!["interp"];
    match duet::backend::kvm_available() {
        Ok(()) => v.push("kvm"),
        Err(why) => eprintln!("{test}: skipping the KVM case: {why}"),
    }
    v
}

fn duet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet"))
}

/// Wait until `path` contains `needle` (or the child died, or 120 s).
fn wait_for_text(child: &mut Child, path: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("duet ended ({status}) before printing {needle:?}: {text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no {needle:?} after 120 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_with_timeout(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("duet did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(e) = child.stderr.as_mut() {
        e.read_to_string(&mut s).ok();
    }
    s
}

#[test]
fn a_guest_power_off_keeps_every_write() {
    for backend in backends("a_guest_power_off_keeps_every_write") {
        let img = Images::new(&format!("poweroff-{backend}"));
        let out = duet()
            .args(["run", "--backend", backend, "--guest", "virtio", "--stats"])
            .args(img.args())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{backend}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("virtio-blk on pci: 5 requests done, statuses 00 00 00 00 00"),
            "{backend}: {stdout}"
        );
        assert!(
            stdout.contains("id 'pci.img'") && stdout.contains("id 'mmio.img'"),
            "{backend}: the guest drove the files' disks: {stdout}"
        );
        assert!(stderr.contains("virtio-blk0"), "{backend}: {stderr}");
        img.check(&format!("{backend}, power-off"));
    }
}

#[test]
fn sigterm_stops_the_vm_cleanly_and_keeps_every_write() {
    for backend in backends("sigterm_stops_the_vm_cleanly_and_keeps_every_write") {
        let img = Images::new(&format!("sigterm-{backend}"));
        let serial = img.dir.join("serial.txt");
        let mut child = duet()
            .args(["run", "--backend", backend, "--guest", "virtio-wait"])
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(img.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_text(&mut child, &serial, "virtio: waiting");
        // SAFETY: kill() on the child's pid, which it still is (not reaped).
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0);
        let status = wait_with_timeout(&mut child);
        let stderr = stderr_of(&mut child);
        assert_eq!(status.code(), Some(0), "{backend}: {stderr}");
        assert!(
            stderr.contains("duet: stopped by SIGTERM"),
            "{backend}: {stderr}"
        );
        img.check(&format!("{backend}, SIGTERM"));
    }
}

#[test]
fn ctrl_a_x_on_a_terminal_keeps_every_write() {
    for backend in backends("ctrl_a_x_on_a_terminal_keeps_every_write") {
        let img = Images::new(&format!("ctrl-a-x-{backend}"));
        let out_path = img.dir.join("stdout.txt");
        let (mut master, slave) = {
            let (mut m, mut s) = (0, 0);
            // SAFETY: openpty fills two descriptors; no name, termios or
            // window size is passed.
            let r = unsafe {
                libc::openpty(
                    &mut m,
                    &mut s,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
            // SAFETY: both descriptors are fresh and owned here.
            unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
        };
        let mut child = duet()
            .args(["run", "--backend", backend, "--guest", "virtio-wait"])
            .args(img.args())
            .stdin(Stdio::from(slave))
            .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_text(&mut child, &out_path, "virtio: waiting");
        master.write_all(b"\x01x").unwrap();
        let status = wait_with_timeout(&mut child);
        let stderr = stderr_of(&mut child);
        assert_eq!(status.code(), Some(0), "{backend}: {stderr}");
        img.check(&format!("{backend}, Ctrl-A x"));
    }
}
