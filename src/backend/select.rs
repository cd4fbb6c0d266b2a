//! Which backend `--backend auto` runs a guest on, and why.
//!
//! KVM is only worth using when the CPU virtualizes in hardware: the
//! `vmx` (Intel VT-x) or `svm` (AMD-V) flag in `/proc/cpuinfo`. On a host
//! without either, `/dev/kvm` may still open — KVM-PVM (`kvm_pvm` module)
//! runs guest ring 3 natively but emulates guest ring 0 in the host kernel
//! at a few MIPS and refuses instructions Linux needs (XRSTOR, CMPXCHG16B,
//! INT3, ...) — and duet's interpreter boots a kernel an order of magnitude
//! sooner. `auto` therefore picks KVM only when `/dev/kvm` works, the CPU has
//! `vmx` or `svm`, and `kvm_pvm` is not loaded; `--backend kvm` still forces
//! KVM.
//!
//! The probe's inputs are injectable so that tests can fake a host:
//! `$DUET_HOST_CPUINFO` replaces `/proc/cpuinfo`, `$DUET_HOST_SYS_MODULE`
//! replaces `/sys/module` (and `$DUET_KVM_DEVICE` replaces `/dev/kvm`, see
//! the KVM backend).

use std::path::{Path, PathBuf};

use super::BackendKind;

/// The user's `--backend` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendPolicy {
    /// KVM when it can run guests at hardware speed, else the interpreter.
    Auto,
    /// KVM, whatever the host (an error when `/dev/kvm` is unusable).
    Kvm,
    /// The interpreter.
    Interp,
}

/// What the probe found out about the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// The hardware-virtualization flag of `/proc/cpuinfo` (`vmx` or
    /// `svm`), `Some("")` when it has neither, `None` when the file could
    /// not be read.
    pub hw_virt_flag: Option<String>,
    /// The `kvm_pvm` module is loaded (KVM emulates guest ring 0).
    pub kvm_pvm: bool,
    /// `Ok` when `/dev/kvm` opens and speaks duet's API version, else why not.
    pub kvm: Result<(), String>,
}

/// The backend chosen and the one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: BackendKind,
    pub reason: String,
}

/// Where the probe looks (overridable for tests).
#[derive(Clone, Debug)]
pub struct ProbePaths {
    pub cpuinfo: PathBuf,
    pub sys_module: PathBuf,
}

impl ProbePaths {
    /// `/proc/cpuinfo` and `/sys/module`, or the `$DUET_HOST_CPUINFO` and
    /// `$DUET_HOST_SYS_MODULE` overrides.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            PathBuf::from(std::env::var_os(name).unwrap_or_else(|| default.into()))
        };
        ProbePaths {
            cpuinfo: var("DUET_HOST_CPUINFO", "/proc/cpuinfo"),
            sys_module: var("DUET_HOST_SYS_MODULE", "/sys/module"),
        }
    }
}

/// The hardware-virtualization flag in a `/proc/cpuinfo` text.
pub fn hw_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for f in value.split_whitespace() {
            match f {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

impl HostFacts {
    /// Probe this host (see [`ProbePaths::from_env`]).
    pub fn probe() -> Self {
        Self::probe_at(&ProbePaths::from_env(), super::kvm_available())
    }

    /// Probe with the given paths and KVM availability.
    pub fn probe_at(paths: &ProbePaths, kvm: Result<(), String>) -> Self {
        let hw_virt_flag = std::fs::read_to_string(&paths.cpuinfo)
            .ok()
            .map(|t| hw_virt_flag(&t).unwrap_or("").to_string());
        HostFacts {
            hw_virt_flag,
            kvm_pvm: module_loaded(&paths.sys_module, "kvm_pvm"),
            kvm,
        }
    }
}

fn module_loaded(sys_module: &Path, name: &str) -> bool {
    sys_module.join(name).exists()
}

/// Choose the backend for `policy` on a host described by `facts`. `Err`
/// explains why a forced choice is impossible.
pub fn choose(policy: BackendPolicy, facts: &HostFacts) -> Result<BackendChoice, String> {
    let interp = |reason: String| BackendChoice {
        kind: BackendKind::Interp,
        reason,
    };
    match policy {
        BackendPolicy::Interp => Ok(interp("--backend interp".into())),
        BackendPolicy::Kvm => match &facts.kvm {
            Ok(()) => Ok(BackendChoice {
                kind: BackendKind::Kvm,
                reason: "--backend kvm".into(),
            }),
            Err(why) => Err(format!("--backend kvm: {why}")),
        },
        BackendPolicy::Auto => {
            if let Err(why) = &facts.kvm {
                return Ok(interp(format!("KVM is not usable ({why})")));
            }
            if facts.kvm_pvm {
                return Ok(interp(
                    "KVM here is KVM-PVM (module kvm_pvm), which emulates guest ring 0 in \
                     software; --backend kvm forces it"
                        .into(),
                ));
            }
            match facts.hw_virt_flag.as_deref() {
                Some("") => Ok(interp(
                    "the CPU has no hardware virtualization (no vmx or svm flag in \
                     /proc/cpuinfo); --backend kvm forces KVM"
                        .into(),
                )),
                Some(flag) => Ok(BackendChoice {
                    kind: BackendKind::Kvm,
                    reason: format!("/dev/kvm works and the CPU virtualizes in hardware ({flag})"),
                }),
                None => Ok(BackendChoice {
                    kind: BackendKind::Kvm,
                    reason: "/dev/kvm works (CPU flags unknown: /proc/cpuinfo unreadable)".into(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flag: Option<&str>, pvm: bool, kvm: Result<(), String>) -> HostFacts {
        HostFacts {
            hw_virt_flag: flag.map(String::from),
            kvm_pvm: pvm,
            kvm,
        }
    }

    #[test]
    fn flags_are_found_on_the_flags_line_only() {
        let t = "processor\t: 0\nmodel name\t: vmx lookalike\nflags\t\t: fpu vme sse2 vmx ept\n";
        assert_eq!(hw_virt_flag(t), Some("vmx"));
        assert_eq!(hw_virt_flag("flags : fpu svm\n"), Some("svm"));
        assert_eq!(hw_virt_flag("model name : vmx\nflags : fpu sse\n"), None);
        assert_eq!(hw_virt_flag("flags : fpu vmxnope\n"), None);
    }

    #[test]
    fn auto_uses_kvm_only_with_hardware_virtualization() {
        let c = choose(BackendPolicy::Auto, &facts(Some("vmx"), false, Ok(()))).unwrap();
        assert_eq!(c.kind, BackendKind::Kvm);
        assert!(c.reason.contains("vmx"), "{}", c.reason);
        let c = choose(BackendPolicy::Auto, &facts(Some(""), false, Ok(()))).unwrap();
        assert_eq!(c.kind, BackendKind::Interp);
        assert!(
            c.reason.contains("no hardware virtualization"),
            "{}",
            c.reason
        );
        let c = choose(BackendPolicy::Auto, &facts(Some("svm"), true, Ok(()))).unwrap();
        assert_eq!(c.kind, BackendKind::Interp);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
        let c = choose(
            BackendPolicy::Auto,
            &facts(Some("vmx"), false, Err("no /dev/kvm".into())),
        )
        .unwrap();
        assert_eq!(c.kind, BackendKind::Interp);
        assert!(c.reason.contains("no /dev/kvm"), "{}", c.reason);
    }

    #[test]
    fn forced_choices_ignore_the_cpu_flags() {
        let f = facts(Some(""), true, Ok(()));
        assert_eq!(
            choose(BackendPolicy::Kvm, &f).unwrap().kind,
            BackendKind::Kvm
        );
        assert_eq!(
            choose(BackendPolicy::Interp, &f).unwrap().kind,
            BackendKind::Interp
        );
        let e = choose(
            BackendPolicy::Kvm,
            &facts(Some("vmx"), false, Err("gone".into())),
        )
        .unwrap_err();
        assert_eq!(e, "--backend kvm: gone");
    }

    #[test]
    fn probe_reads_the_injected_files() {
        let dir = std::env::temp_dir().join(format!("duet-probe-{}", std::process::id()));
        let modules = dir.join("module");
        std::fs::create_dir_all(modules.join("kvm")).unwrap();
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, "flags\t: fpu sse2\n").unwrap();
        let paths = ProbePaths {
            cpuinfo: cpuinfo.clone(),
            sys_module: modules.clone(),
        };
        let f = HostFacts::probe_at(&paths, Ok(()));
        assert_eq!(f.hw_virt_flag.as_deref(), Some(""));
        assert!(!f.kvm_pvm);
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        std::fs::write(&cpuinfo, "flags\t: fpu vmx\n").unwrap();
        let f = HostFacts::probe_at(&paths, Ok(()));
        assert_eq!(f.hw_virt_flag.as_deref(), Some("vmx"));
        assert!(f.kvm_pvm);
        let missing = ProbePaths {
            cpuinfo: dir.join("nope"),
            sys_module: dir.join("nope"),
        };
        let f = HostFacts::probe_at(&missing, Ok(()));
        assert_eq!(f.hw_virt_flag, None);
        std::fs::remove_dir_all(dir).ok();
    }
}
