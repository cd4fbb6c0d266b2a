//! Host-side helpers of the network tests: deterministic payloads, a tiny
//! HTTP server and client on 127.0.0.1 (or inside a network namespace the
//! test made), hashes, and the namespace itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deterministic bytes (a xorshift stream) for images and payloads.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Serve `body` to every GET on `listener` (the guest's downloads), each
/// connection on its own thread.
pub fn serve(listener: TcpListener, body: Arc<Vec<u8>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok() {
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
}

/// GET `path` from `addr` (retried until something answers, for at most
/// `timeout`); the body.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(timeout)).ok();
            let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n");
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp);
            if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                return resp[i + 4..].to_vec();
            }
        }
        assert!(start.elapsed() < timeout, "GET {addr}{path} never answered");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `sha256sum`'s hex digest of `input` fed on its stdin (the tool the
/// guest uses too, so both sides print the same form).
fn sha256_of(input: impl FnOnce(&mut std::process::ChildStdin)) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    input(child.stdin.as_mut().expect("stdin"));
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The SHA-256 of `data`, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256_of(|s| s.write_all(data).expect("sha256sum stdin"))
}

/// The SHA-256 of the file at `path`, in hex.
pub fn sha256_file(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Run `f` on a thread inside a new network namespace (children it spawns
/// are in it too); `None`, with a SKIPPED line, when this host does not
/// allow one (not root). The namespace has no route out: fetch anything `f`
/// needs from the network (the Linux guest kit) before calling this.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(f())
    })
    .join()
    .expect("namespace thread")
}

/// Run a shell command; panic unless it succeeds.
pub fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd} failed");
}

/// Inside a namespace from [`in_new_netns`]: loopback up and a TAP
/// device `name` at `host_cidr` (e.g. 10.9.0.1/24), up.
pub fn make_tap(name: &str, host_cidr: &str) {
    sh(&format!(
        "ip link set lo up && ip tuntap add dev {name} mode tap && \
         ip addr add {host_cidr} dev {name} && ip link set {name} up"
    ));
}
