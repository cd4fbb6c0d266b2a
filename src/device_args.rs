//! The device options of `duet run`: `--disk`, `--net`, `--rng` and
//! `--console-device`, parsed into specs (comma-separated `key=value`
//! lists in the style of Cloud Hypervisor and QEMU). Every error says
//! which key is wrong and what it accepts; the caller adds the flag.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::machine::VirtioTransport;

/// Split `a=b,c,d=e` into (key, value) pairs; a bare word has value "".
fn pairs(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

fn transport(v: &str) -> Result<VirtioTransport, String> {
    match v {
        "pci" => Ok(VirtioTransport::Pci),
        "mmio" => Ok(VirtioTransport::Mmio),
        _ => Err(format!("transport={v}: expected pci or mmio")),
    }
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// `--disk path=FILE[,readonly=on][,transport=pci|mmio][,serial=ID]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    pub transport: VirtioTransport,
    /// What the guest reads as the disk's ID (default: the file name).
    pub serial: Option<String>,
    /// Writes go to a copy-on-write overlay, the image stays unchanged
    /// (forced on for the writable disks of a recording and its replay).
    pub snapshot: bool,
}

impl FromStr for DiskSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut spec = DiskSpec {
            path: PathBuf::new(),
            readonly: false,
            transport: VirtioTransport::Pci,
            serial: None,
            snapshot: false,
        };
        for (k, v) in pairs(s) {
            match (k, v) {
                ("path", "") => return Err("path= needs a file, e.g. path=disk.img".into()),
                ("path", p) => path = Some(PathBuf::from(p)),
                ("readonly", v) => spec.readonly = on_off("readonly", v)?,
                ("snapshot", v) => spec.snapshot = on_off("snapshot", v)?,
                ("transport", v) => spec.transport = transport(v)?,
                ("serial", v) if v.len() <= 20 => spec.serial = Some(v.to_string()),
                ("serial", _) => return Err("serial= takes at most 20 characters".into()),
                (p, "") if path.is_none() => path = Some(PathBuf::from(p)),
                (k, _) => {
                    return Err(format!(
                        "unknown key '{k}' (accepted: path=FILE, readonly=on|off, \
                         snapshot=on|off, transport=pci|mmio, serial=ID)"
                    ))
                }
            }
        }
        spec.path = path.ok_or("path=FILE is missing (e.g. --disk path=disk.img)")?;
        Ok(spec)
    }
}

/// A forwarded host port: `tcp:127.0.0.1:HOSTPORT-:GUESTPORT` (QEMU's form;
/// the host address defaults to 127.0.0.1, the guest's to 10.0.2.15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
}

impl FromStr for HostForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "hostfwd={s}: expected tcp:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT, e.g. \
                 hostfwd=tcp:127.0.0.1:8080-:80"
            )
        };
        let (proto, rest) = s.split_once(':').ok_or_else(bad)?;
        let udp = match proto {
            "tcp" => false,
            "udp" => true,
            _ => return Err(bad()),
        };
        let (host, guest) = rest.split_once('-').ok_or_else(bad)?;
        let addr_port = |t: &str, default: Ipv4Addr| -> Result<(Ipv4Addr, u16), String> {
            let (a, p) = t.rsplit_once(':').ok_or_else(bad)?;
            let addr = if a.is_empty() {
                default
            } else {
                a.parse().map_err(|_| bad())?
            };
            let port: u16 = p.parse().map_err(|_| bad())?;
            Ok((addr, port))
        };
        let (host_addr, host_port) = addr_port(host, Ipv4Addr::LOCALHOST)?;
        let (guest_addr, guest_port) = addr_port(guest, Ipv4Addr::new(10, 0, 2, 15))?;
        if guest_port == 0 {
            return Err(format!("hostfwd={s}: the guest port cannot be 0"));
        }
        Ok(HostForward {
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// Where a NIC's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// User-mode networking (libslirp).
    User { hostfwd: Vec<HostForward> },
    /// A TAP interface.
    Tap { ifname: String },
    /// No host side: every frame the guest sends comes straight back
    /// (deterministic; tests and benchmarks).
    Loopback,
}

/// Which NIC the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NicModel {
    /// virtio-net on the chosen transport.
    #[default]
    VirtioNet,
    /// An emulated Intel 82540EM (PCI only).
    E1000,
}

/// `--net user[,hostfwd=...][,mac=...][,pcap=FILE][,transport=...][,model=...]`
/// or `--net tap=IFNAME[,...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub backend: NetBackendSpec,
    pub mac: Option<[u8; 6]>,
    pub pcap: Option<PathBuf>,
    pub transport: VirtioTransport,
    pub model: NicModel,
}

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={v}: expected six hex bytes, e.g. mac=52:54:00:12:34:56");
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={v}: a multicast address cannot name a NIC (the first byte must be even)"
        ));
    }
    Ok(mac)
}

impl FromStr for NetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut backend = None;
        let mut hostfwd = Vec::new();
        let mut spec = NetSpec {
            backend: NetBackendSpec::User {
                hostfwd: Vec::new(),
            },
            mac: None,
            pcap: None,
            transport: VirtioTransport::Pci,
            model: NicModel::VirtioNet,
        };
        let mut transport_given = false;
        for (k, v) in pairs(s) {
            match (k, v) {
                ("user", "") => {
                    backend = Some(NetBackendSpec::User {
                        hostfwd: Vec::new(),
                    })
                }
                ("loopback", "") => backend = Some(NetBackendSpec::Loopback),
                ("tap", "") => return Err("tap= needs an interface name, e.g. tap=tap0".into()),
                ("tap", name) => {
                    if name.len() >= libc::IFNAMSIZ {
                        return Err(format!(
                            "tap={name}: interface names have at most {} characters",
                            libc::IFNAMSIZ - 1
                        ));
                    }
                    backend = Some(NetBackendSpec::Tap {
                        ifname: name.to_string(),
                    })
                }
                ("hostfwd", v) => hostfwd.push(v.parse()?),
                ("mac", v) => spec.mac = Some(parse_mac(v)?),
                ("pcap", "") => return Err("pcap= needs a file, e.g. pcap=net.pcap".into()),
                ("pcap", p) => spec.pcap = Some(PathBuf::from(p)),
                ("transport", v) => {
                    spec.transport = transport(v)?;
                    transport_given = true;
                }
                ("model", "virtio" | "virtio-net") => spec.model = NicModel::VirtioNet,
                ("model", "e1000") => spec.model = NicModel::E1000,
                ("model", v) => {
                    return Err(format!("model={v}: expected virtio or e1000"));
                }
                (k, _) => {
                    return Err(format!(
                        "unknown key '{k}' (accepted: user or tap=IFNAME, hostfwd=..., mac=..., \
                         pcap=FILE, transport=pci|mmio, model=virtio|e1000)"
                    ))
                }
            }
        }
        if spec.model == NicModel::E1000
            && transport_given
            && spec.transport != VirtioTransport::Pci
        {
            return Err("model=e1000 is a PCI device; transport= is for virtio-net".into());
        }
        spec.backend = match backend {
            Some(NetBackendSpec::User { .. }) => NetBackendSpec::User { hostfwd },
            Some(tap) => {
                if !hostfwd.is_empty() {
                    return Err(
                        "hostfwd= is for user networking; a TAP device is reached directly, \
                         a loopback not at all"
                            .into(),
                    );
                }
                tap
            }
            None => {
                return Err(
                    "say which network: user, tap=IFNAME or loopback (e.g. --net user)".into(),
                );
            }
        };
        Ok(spec)
    }
}

/// `--rng [transport=pci|mmio][,seed=N]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RngSpec {
    pub transport: VirtioTransport,
    pub seed: Option<u64>,
}

impl FromStr for RngSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = RngSpec::default();
        for (k, v) in pairs(s) {
            match (k, v) {
                ("transport", v) => spec.transport = transport(v)?,
                ("seed", v) => {
                    spec.seed = Some(
                        v.parse()
                            .map_err(|_| format!("seed={v}: expected a number"))?,
                    )
                }
                ("virtio", "") => {}
                (k, _) => {
                    return Err(format!(
                        "unknown key '{k}' (accepted: transport=pci|mmio, seed=N)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// Where the virtio console's host side is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleHost {
    /// Output to a file (no input).
    File(PathBuf),
    /// A Unix socket duet listens on: input and output.
    Socket(PathBuf),
    /// stdout and stdin.
    Stdio,
    /// A new pseudo-terminal, its slave's path printed on stderr.
    Pty,
    /// Output dropped, no input.
    Null,
}

/// `--console-device virtio,file=PATH|socket=PATH|stdio|pty|null[,transport=...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSpec {
    pub host: ConsoleHost,
    pub transport: VirtioTransport,
}

impl FromStr for ConsoleSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut host = None;
        let mut transport_v = VirtioTransport::Pci;
        let mut virtio = false;
        for (k, v) in pairs(s) {
            match (k, v) {
                ("virtio", "") => virtio = true,
                ("file", "") | ("socket", "") => {
                    return Err(format!("{k}= needs a path, e.g. {k}=/tmp/hvc0"))
                }
                ("file", p) => host = Some(ConsoleHost::File(PathBuf::from(p))),
                ("socket", p) => host = Some(ConsoleHost::Socket(PathBuf::from(p))),
                ("stdio", "") => host = Some(ConsoleHost::Stdio),
                ("pty", "") => host = Some(ConsoleHost::Pty),
                ("null", "") => host = Some(ConsoleHost::Null),
                ("transport", v) => transport_v = transport(v)?,
                (k, "") if !virtio && host.is_none() => {
                    return Err(format!(
                        "'{k}': the only console device is virtio \
                         (e.g. --console-device virtio,socket=/tmp/hvc0)"
                    ))
                }
                (k, _) => {
                    return Err(format!(
                        "unknown key '{k}' (accepted: virtio, file=PATH, socket=PATH, stdio, pty, \
                         null, transport=pci|mmio)"
                    ))
                }
            }
        }
        if !virtio {
            return Err(
                "the only console device is virtio (e.g. --console-device virtio,socket=/tmp/hvc0)"
                    .into(),
            );
        }
        Ok(ConsoleSpec {
            host: host.ok_or("say where hvc0 goes: file=PATH, socket=PATH, stdio, pty or null")?,
            transport: transport_v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: DiskSpec = "path=a.img,readonly=on,transport=mmio".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(d.readonly);
        assert_eq!(d.transport, VirtioTransport::Mmio);
        let d: DiskSpec = "b.img".parse().unwrap();
        assert_eq!((d.readonly, d.transport), (false, VirtioTransport::Pci));
        assert!("readonly=on"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("path=FILE"));
        assert!("path=a,readonly=maybe"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("readonly=maybe"));
        assert!("path=a,transport=usb"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("pci or mmio"));
        assert!("path=a,colour=red"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("'colour'"));
    }

    #[test]
    fn nets() {
        let n: NetSpec = "user,hostfwd=tcp:127.0.0.1:8080-:80,mac=52:54:00:00:00:01,pcap=x.pcap"
            .parse()
            .unwrap();
        let NetBackendSpec::User { hostfwd } = &n.backend else {
            panic!()
        };
        assert_eq!(hostfwd[0].host_port, 8080);
        assert_eq!(hostfwd[0].guest_port, 80);
        assert_eq!(hostfwd[0].guest_addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let e: NetSpec = "user,model=e1000".parse().unwrap();
        assert_eq!(e.model, NicModel::E1000);
        assert_eq!(
            "user".parse::<NetSpec>().unwrap().model,
            NicModel::VirtioNet
        );
        assert!("user,model=e1000,transport=mmio"
            .parse::<NetSpec>()
            .unwrap_err()
            .contains("PCI"));
        assert!("user,model=rtl8139"
            .parse::<NetSpec>()
            .unwrap_err()
            .contains("model="));
        let n: NetSpec = "tap=tap0,transport=mmio".parse().unwrap();
        assert_eq!(
            n.backend,
            NetBackendSpec::Tap {
                ifname: "tap0".into()
            }
        );
        assert!("mac=52:54:00:00:00:01"
            .parse::<NetSpec>()
            .unwrap_err()
            .contains("user, tap=IFNAME or loopback"));
        assert!("user,mac=01:00:00:00:00:00"
            .parse::<NetSpec>()
            .unwrap_err()
            .contains("multicast"));
        assert!("user,hostfwd=tcp:8080:80"
            .parse::<NetSpec>()
            .unwrap_err()
            .contains("hostfwd="));
        assert!("tap=t0,hostfwd=tcp::1-:2".parse::<NetSpec>().is_err());
    }

    #[test]
    fn consoles_and_rngs() {
        let c: ConsoleSpec = "virtio,socket=/tmp/s".parse().unwrap();
        assert_eq!(c.host, ConsoleHost::Socket("/tmp/s".into()));
        assert!("virtio"
            .parse::<ConsoleSpec>()
            .unwrap_err()
            .contains("file=PATH"));
        assert!("socket=/x"
            .parse::<ConsoleSpec>()
            .unwrap_err()
            .contains("virtio"));
        let r: RngSpec = "transport=mmio,seed=5".parse().unwrap();
        assert_eq!(r.seed, Some(5));
        assert_eq!("".parse::<RngSpec>().unwrap(), RngSpec::default());
    }
}
