//! Machine-check architecture MSRs, present because CPUID advertises MCE
//! and MCA, modelled on QEMU's and KVM's: [`BANKS`] banks that never record
//! an error (status, address and misc read 0), whose control registers
//! take 0 or all ones, and a global control register (MCG_CTL_P).
//!
//! | MSR | read | write |
//! |---|---|---|
//! | IA32_MCG_CAP (0x179) | `MCG_CTL_P \| BANKS` | #GP (read-only) |
//! | IA32_MCG_STATUS (0x17a) | last written | bits 0–2 (RIPV, EIPV, MCIP); others #GP |
//! | IA32_MCG_CTL (0x17b) | last written | 0 or all ones; else #GP |
//! | IA32_MCi_CTL (0x400 + 4i) | last written | 0 or all ones; else #GP |
//! | IA32_MCi_STATUS (0x401 + 4i) | last written (0) | 0 only, as on Intel; else #GP |
//! | IA32_MCi_ADDR, IA32_MCi_MISC | last written (0) | any value |
//!
//! No CMCI (MCi_CTL2), no LMCE, no software error recovery: MCG_CAP says
//! so, and those MSRs #GP like any unknown one.

/// IA32_MCG_CAP.
pub const MCG_CAP: u32 = 0x179;
/// IA32_MCG_STATUS.
pub const MCG_STATUS: u32 = 0x17a;
/// IA32_MCG_CTL.
pub const MCG_CTL: u32 = 0x17b;
/// IA32_MC0_CTL, the first bank register.
pub const MC0_CTL: u32 = 0x400;
/// Error-reporting banks (QEMU's default).
pub const BANKS: u32 = 10;
/// MCG_CAP bit 8: MCG_CTL is present.
pub const MCG_CTL_P: u64 = 1 << 8;
/// The MCG_STATUS bits software may write.
const MCG_STATUS_WRITABLE: u64 = 0x7;

/// The machine-check registers of one CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineCheck {
    pub mcg_status: u64,
    pub mcg_ctl: u64,
    /// Per bank: CTL, STATUS, ADDR, MISC.
    pub banks: [[u64; 4]; BANKS as usize],
}

impl Default for MachineCheck {
    /// After RESET: banks disabled, nothing logged.
    fn default() -> Self {
        MachineCheck {
            mcg_status: 0,
            mcg_ctl: 0,
            banks: [[0; 4]; BANKS as usize],
        }
    }
}

/// Is `msr` one of the machine-check MSRs?
pub fn owns(msr: u32) -> bool {
    matches!(msr, MCG_CAP | MCG_STATUS | MCG_CTL) || (MC0_CTL..MC0_CTL + 4 * BANKS).contains(&msr)
}

impl MachineCheck {
    /// RDMSR; `None` for an MSR this model does not own.
    pub fn read(&self, msr: u32) -> Option<u64> {
        match msr {
            MCG_CAP => Some(MCG_CTL_P | u64::from(BANKS)),
            MCG_STATUS => Some(self.mcg_status),
            MCG_CTL => Some(self.mcg_ctl),
            m if owns(m) => {
                let k = (m - MC0_CTL) as usize;
                Some(self.banks[k / 4][k % 4])
            }
            _ => None,
        }
    }

    /// WRMSR; `Err(())` is the #GP to raise (also for MSRs not owned).
    #[allow(clippy::result_unit_err)]
    pub fn write(&mut self, msr: u32, v: u64) -> Result<(), ()> {
        let all_or_none = v == 0 || v == u64::MAX;
        match msr {
            MCG_STATUS if v & !MCG_STATUS_WRITABLE == 0 => self.mcg_status = v,
            MCG_CTL if all_or_none => self.mcg_ctl = v,
            m if owns(m) && m >= MC0_CTL => {
                let k = (m - MC0_CTL) as usize;
                let ok = match k % 4 {
                    0 => all_or_none,
                    1 => v == 0,
                    _ => true,
                };
                if !ok {
                    return Err(());
                }
                self.banks[k / 4][k % 4] = v;
            }
            _ => return Err(()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_reports_banks_and_global_control() {
        let m = MachineCheck::default();
        assert_eq!(m.read(MCG_CAP), Some(0x10a));
        assert_eq!(m.read(MCG_STATUS), Some(0));
        for b in 0..BANKS {
            for r in 0..4 {
                assert_eq!(m.read(MC0_CTL + 4 * b + r), Some(0));
            }
        }
        assert_eq!(m.read(MC0_CTL + 4 * BANKS), None);
        assert_eq!(m.read(0x178), None);
    }

    #[test]
    fn writes_follow_the_architecture() {
        let mut m = MachineCheck::default();
        assert_eq!(m.write(MCG_CAP, 0x10a), Err(()));
        assert_eq!(m.write(MCG_CTL, u64::MAX), Ok(()));
        assert_eq!(m.read(MCG_CTL), Some(u64::MAX));
        assert_eq!(m.write(MCG_CTL, 5), Err(()));
        assert_eq!(m.write(MCG_STATUS, 4), Ok(()));
        assert_eq!(m.write(MCG_STATUS, 8), Err(()));
        // What Linux does at boot: enable every bank, clear its status.
        for b in 0..BANKS {
            assert_eq!(m.write(MC0_CTL + 4 * b, u64::MAX), Ok(()));
            assert_eq!(m.write(MC0_CTL + 4 * b + 1, 0), Ok(()));
        }
        assert_eq!(m.read(MC0_CTL + 4 * 9), Some(u64::MAX));
        assert_eq!(m.write(MC0_CTL + 1, 1), Err(()));
        assert_eq!(m.write(MC0_CTL, 0x3), Err(()));
        assert_eq!(m.write(MC0_CTL + 2, 0x1234), Ok(()));
        assert_eq!(m.read(MC0_CTL + 2), Some(0x1234));
        assert_eq!(m.write(MC0_CTL + 4 * BANKS, 0), Err(()));
        // MCi_CTL2 (CMCI) does not exist here.
        assert_eq!(m.write(0x280, 0), Err(()));
    }
}
