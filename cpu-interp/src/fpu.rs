//! x87 / MMX / SSE register state. The instructions that use it arrive with
//! the x87 and SSE groups; the state is already transferred between
//! backends so that a KVM fallback never loses it.

use crate::state::FpuState;

/// The interpreter's floating-point and vector state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fpu {
    pub state: FpuState,
}

impl Fpu {
    pub fn from_state(s: &FpuState) -> Self {
        Fpu { state: *s }
    }

    pub fn to_state(&self) -> FpuState {
        self.state
    }
}
