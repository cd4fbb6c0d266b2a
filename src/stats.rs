//! `--stats-json FILE`: the run's counters as one JSON object, for CI
//! tools. The same numbers as `--stats`, plus the outcome and wall time.
//!
//! ```json
//! {
//!   "backend": "interp",
//!   "outcome": "guest powered off",
//!   "exit_status": 0,
//!   "wall_seconds": 12.345,
//!   "guest_instructions": 1400000000,
//!   "interpreter_fallbacks": 0,
//!   "device_accesses": [{"bus": "pio", "device": "com1", "reads": 10, "writes": 20}],
//!   "unmapped_accesses": {"reads": 0, "writes": 0},
//!   "vcpu_exits": {"io": 12}
//! }
//! ```
//!
//! `guest_instructions` is `null` where the backend does not count them.

use std::fmt::Write as _;
use std::time::Duration;

use crate::machine::{Machine, Outcome};

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The stats of a finished run as JSON.
pub fn to_json(m: &Machine, outcome: &Outcome, wall: Duration) -> String {
    let v = m.vcpu_stats();
    let (devices, unmapped) = m.device_access_counts();
    let mut o = String::from("{\n");
    let _ = writeln!(o, "  \"backend\": {},", json_string(m.backend_name()));
    let _ = writeln!(o, "  \"outcome\": {},", json_string(&outcome.describe()));
    let _ = writeln!(o, "  \"exit_status\": {},", outcome.exit_status());
    let _ = writeln!(o, "  \"wall_seconds\": {:.3},", wall.as_secs_f64());
    match v.instructions {
        Some(n) => {
            let _ = writeln!(o, "  \"guest_instructions\": {n},");
        }
        None => o.push_str("  \"guest_instructions\": null,\n"),
    }
    let _ = writeln!(o, "  \"interpreter_fallbacks\": {},", v.interp_fallbacks);
    o.push_str("  \"device_accesses\": [");
    for (k, d) in devices.iter().enumerate() {
        let sep = if k == 0 { "\n" } else { ",\n" };
        let _ = write!(
            o,
            "{sep}    {{\"bus\": {}, \"device\": {}, \"reads\": {}, \"writes\": {}}}",
            json_string(d.bus),
            json_string(&d.device),
            d.count.reads,
            d.count.writes
        );
    }
    o.push_str(if devices.is_empty() {
        "],\n"
    } else {
        "\n  ],\n"
    });
    let _ = writeln!(
        o,
        "  \"unmapped_accesses\": {{\"reads\": {}, \"writes\": {}}},",
        unmapped.reads, unmapped.writes
    );
    o.push_str("  \"vcpu_exits\": {");
    for (k, (name, n)) in v.exits.iter().enumerate() {
        let sep = if k == 0 { "" } else { ", " };
        let _ = write!(o, "{sep}{}: {n}", json_string(name));
    }
    o.push_str("}\n}\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
