//! Delta debugging: drop items from a diverging case while it still
//! diverges the same way (and stays valid for the analysis).

use super::case::{analyze, Case};
use super::compare::{compare, Diff, Verdict};
use super::harness::Harness;
use super::DifftestError;

/// The field names of a divergence, with memory ranges folded together.
pub fn fields(diffs: &[Diff]) -> Vec<String> {
    let mut v: Vec<String> = diffs
        .iter()
        .map(|d| {
            let f = d.field.split(' ').next().unwrap_or("");
            f.to_string()
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Does `case` diverge in exactly `want`'s fields?
fn diverges(
    h: &mut Harness,
    case: &Case,
    want: &[String],
) -> Result<Option<Vec<Diff>>, DifftestError> {
    let Ok(an) = analyze(case.mode, &case.items) else {
        return Ok(None);
    };
    let out = match h.run(case) {
        Ok(o) => o,
        Err(DifftestError::Assemble(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    match compare(case, &an, &out) {
        // The same fields must differ: a smaller case that diverges some
        // other way is a different divergence.
        Verdict::Diverged(d) if fields(&d) == want => Ok(Some(d)),
        _ => Ok(None),
    }
}

/// Minimize `case` (which diverged with `diffs`). Returns the smallest
/// case found and the number of runs spent.
pub fn minimize(
    h: &mut Harness,
    case: &Case,
    diffs: &[Diff],
) -> Result<(Case, usize), DifftestError> {
    let want = fields(diffs);
    let mut best = case.clone();
    let mut runs = 0usize;
    let mut chunk = best.items.len().div_ceil(2).max(1);
    while chunk >= 1 && runs < 400 {
        let mut progress = false;
        let mut start = 0;
        while start < best.items.len() && runs < 400 {
            let end = (start + chunk).min(best.items.len());
            let mut cand = best.clone();
            cand.items.drain(start..end);
            runs += 1;
            if diverges(h, &cand, &want)?.is_some() {
                best = cand;
                progress = true;
            } else {
                start = end;
            }
        }
        if !progress {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    Ok((best, runs))
}
