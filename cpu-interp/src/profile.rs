//! `--profile`: where guest time goes. Counts block executions (the
//! interpreter counts each block it runs; translated blocks count their
//! entries) and splits host time between translated code, the interpreter
//! helpers it calls, the interpreter proper, translation and the rest.

use std::fmt::Write;

use crate::cpu::Cpu;

/// Host time-stamp counter (cycles) where there is one, else nanoseconds.
#[inline(always)]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions on x86-64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// Accumulated counters of one CPU.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Inside `Cpu::run`.
    pub run_cycles: u64,
}

/// One line of the hot-block list.
#[derive(Clone, Debug)]
pub struct HotBlock {
    pub rip: u64,
    pub insns: u64,
    pub executions: u64,
    pub translated: bool,
    pub first: String,
}

impl Cpu {
    /// Turn profiling on (block execution counts, time split). Costs a
    /// counter per block execution; translations made from now on count
    /// their entries.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = self.jit.as_mut() {
            j.set_profiling(on);
        }
        // Existing translations have no counters: translate afresh.
        self.clear_blocks();
    }

    /// The hottest blocks by instructions executed, most first.
    pub fn hot_blocks(&self, n: usize) -> Vec<HotBlock> {
        let mut v: Vec<HotBlock> = Vec::new();
        for b in self.blocks.live() {
            let mut execs = b.execs.get();
            let mut translated = false;
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if let Some(j) = self.jit.as_ref() {
                for slot in &b.jit {
                    let t = slot.get();
                    if t != 0 {
                        if let Some(c) = j.executions(t - 1) {
                            execs += c;
                            translated = true;
                        }
                    }
                }
            }
            if execs == 0 {
                continue;
            }
            v.push(HotBlock {
                rip: b.rip,
                insns: execs * b.insns.len() as u64,
                executions: execs,
                translated,
                first: crate::disasm(&b.insns[0].i),
            });
        }
        v.sort_by_key(|h| std::cmp::Reverse(h.insns));
        v.truncate(n);
        v
    }

    /// The `--profile` report.
    pub fn profile_report(&self) -> String {
        let mut s = String::new();
        let total = self.profile.run_cycles.max(1);
        let pct = |c: u64| 100.0 * c as f64 / total as f64;
        #[allow(unused_mut)]
        let (mut jit, mut helpers, mut translate, mut calls) = (0u64, 0u64, 0u64, 0u64);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(p) = self.jit.as_ref().and_then(|j| j.profile.as_ref()) {
            jit = p.in_jit;
            helpers = p.in_helpers;
            translate = p.translating;
            calls = p.helper_calls;
        }
        let _ = writeln!(
            s,
            "profile: {} guest instructions; time in the CPU ({:.2} G host cycles):",
            self.retired,
            total as f64 / 1e9
        );
        let _ = writeln!(
            s,
            "  translated code         {:5.1}%",
            pct(jit.saturating_sub(helpers))
        );
        let _ = writeln!(
            s,
            "  interpreter helpers     {:5.1}%  ({calls} calls from translated code)",
            pct(helpers)
        );
        let _ = writeln!(s, "  translating             {:5.1}%", pct(translate));
        let _ = writeln!(
            s,
            "  interpreter + dispatch  {:5.1}%",
            pct(total.saturating_sub(jit).saturating_sub(translate))
        );
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(p) = self.jit.as_ref().and_then(|j| j.profile.as_ref()) {
            let mut v: Vec<_> = p.helper_codes.iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(*e.1));
            let _ = writeln!(
                s,
                "instructions translated code ran through the interpreter:"
            );
            for (code, n) in v.into_iter().take(12) {
                let _ = writeln!(s, "  {n:>12}  {code:?}");
            }
        }
        let hot = self.hot_blocks(25);
        let all: u64 = self.retired.max(1);
        let _ = writeln!(s, "hottest guest blocks (by instructions executed):");
        let _ = writeln!(
            s,
            "  {:>18}  {:>6}  {:>12}  {:>12}  tier    first instruction",
            "rip", "share", "instructions", "executions"
        );
        for h in hot {
            let _ = writeln!(
                s,
                "  {:#018x}  {:5.1}%  {:>12}  {:>12}  {:<6}  {}",
                h.rip,
                100.0 * h.insns as f64 / all as f64,
                h.insns,
                h.executions,
                if h.translated { "jit" } else { "interp" },
                h.first
            );
        }
        s
    }
}
