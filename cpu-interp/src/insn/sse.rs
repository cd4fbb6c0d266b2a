//! sse instructions (being written).

use crate::dispatch::Table;

pub fn register(_t: &mut Table) {}
