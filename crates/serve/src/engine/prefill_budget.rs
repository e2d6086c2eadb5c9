//! How many prompt tokens the next pass may carry: a small controller over measured pass times.
//!
//! A pass costs about `decode + a + b x tokens`, where `decode` is the cost of its decode rows,
//! `a` a fixed cost of carrying a prompt chunk at all (masks, attention dispatch; large on a
//! busy machine) and `b` the cost of one prompt token at the current context length (linear
//! maps plus attention over `L` keys, so it grows as a long prompt advances). All three are
//! measured on real passes (a running median, and a least-squares fit of `a` and `b` that
//! forgets old passes) rather than modelled, so the same rule holds on any machine and model:
//!
//! * sequences decoding: prompt work may add at most `share x decode` per pass *on average*
//!   (the engine's `share` is 0.5: decode steps beside a long prompt take at most about 1.5
//!   times as long as without), so decoding sequences keep most of their speed however long
//!   the prompt is. The allowance is a running credit: every pass with decode rows earns
//!   `share x decode` and spends the extra time its prompt work measured; a pass carries prompt
//!   work only when the credit affords its predicted cost. So when even one prompt token costs
//!   more than one pass's allowance (a large fixed cost `a`, e.g. on a busy machine), chunks
//!   ride on every k-th pass instead of slowing every pass; and a pass that ran over budget is
//!   paid back by the next ones. The credit is capped at [`IDLE_DECODE_STEPS`] passes'
//!   allowance (or one chunk's cost, if more: the prompt always progresses).
//!   `decode` is the median of the last decode-only passes, one of which runs every
//!   [`REFRESH_STEPS`] passes;
//! * nobody decoding: a pass aims at [`IDLE_DECODE_STEPS`] decode passes' time (at least
//!   [`MIN_IDLE_STEP`], at most `idle_step`; `idle_step` until a decode pass was measured), so a
//!   request arriving meanwhile waits about that long for its turn;
//! * always at most `max_tokens` (the memory bound), at most twice the last pass's prompt
//!   tokens (or [`FIRST_TOKENS`]; an estimate that is off costs one pass, not a long one), and
//!   at least one token (a one-token chunk runs like a decode row).
use std::time::Duration;

/// Passes with prompt work between two decode-only passes that re-measure the decode cost.
pub const REFRESH_STEPS: usize = 16;
/// Prompt tokens of the first pass, before any cost has been measured.
pub const FIRST_TOKENS: usize = 32;
/// With nobody decoding, a pass may take this many decode passes' time.
pub const IDLE_DECODE_STEPS: f64 = 16.0;
/// ... but at least this long, so that per-pass overheads stay small.
pub const MIN_IDLE_STEP: Duration = Duration::from_millis(10);
/// Decode-only passes whose median is the decode cost (a median, so that one pass stalled by
/// the machine does not open the budget).
const DECODE_SAMPLES: usize = 5;
/// Weight each older pass keeps in the cost fit, per newer pass.
const DECAY: f64 = 0.97;
/// Below this relative spread of chunk sizes the fit cannot tell `a` from `b`: cost per token.
const VARIETY: f64 = 0.05;

/// Least-squares fit of `extra = a + b t` over passes with prompt work (`t` prompt tokens,
/// `extra` seconds beyond the decode rows), older passes weighing less.
#[derive(Debug, Clone, Default)]
struct CostFit {
    s0: f64,
    st: f64,
    stt: f64,
    sy: f64,
    sty: f64,
}

impl CostFit {
    fn add(&mut self, t: f64, y: f64) {
        for v in [
            &mut self.s0,
            &mut self.st,
            &mut self.stt,
            &mut self.sy,
            &mut self.sty,
        ] {
            *v *= DECAY;
        }
        self.s0 += 1.0;
        self.st += t;
        self.stt += t * t;
        self.sy += y;
        self.sty += t * y;
    }

    /// `(a, b)`: fixed seconds per chunked pass, seconds per prompt token.
    fn coefficients(&self) -> Option<(f64, f64)> {
        if self.s0 == 0.0 || self.st <= 0.0 {
            return None;
        }
        let var = self.s0 * self.stt - self.st * self.st;
        if var > VARIETY * self.s0 * self.stt {
            let b = (self.s0 * self.sty - self.st * self.sy) / var;
            let a = (self.sy - b * self.st) / self.s0;
            if b > 0.0 {
                return Some((a.max(0.0), b));
            }
        }
        Some((0.0, (self.sy / self.st).max(0.0)))
    }
}

/// The controller; see the module docs.
#[derive(Debug, Clone)]
pub struct PrefillBudget {
    max_tokens: usize,
    idle_step_s: f64,
    share: f64,
    decode: std::collections::VecDeque<f64>,
    cost: CostFit,
    since_decode_sample: usize,
    /// Prompt tokens of the last pass that carried any.
    last_tokens: usize,
    /// Seconds of prompt work the passes with decode rows may still spend (module docs).
    credit: f64,
}

impl PrefillBudget {
    /// `max_tokens`: most prompt tokens per pass; `idle_step`: the pass time aimed at when no
    /// sequence decodes; `share`: the extra time prompt work may add to a decode pass, as a
    /// fraction of that pass.
    pub fn new(max_tokens: usize, idle_step: Duration, share: f64) -> Self {
        Self {
            max_tokens: max_tokens.max(1),
            idle_step_s: idle_step.as_secs_f64(),
            share: share.max(0.0),
            decode: Default::default(),
            cost: CostFit::default(),
            since_decode_sample: 0,
            last_tokens: 0,
            credit: 0.0,
        }
    }

    /// The decode cost: the median of the last decode-only passes.
    fn decode_s(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.decode.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    /// The most prompt tokens one pass may carry.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Prompt tokens the next pass may carry when `decode_rows` sequences decode in it; 0
    /// asks for a decode-only pass (to measure its cost).
    pub fn tokens(&self, decode_rows: usize) -> usize {
        let target = if decode_rows == 0 {
            match self.decode_s() {
                Some(d) => (IDLE_DECODE_STEPS * d)
                    .max(MIN_IDLE_STEP.as_secs_f64())
                    .min(self.idle_step_s),
                None => self.idle_step_s,
            }
        } else {
            match self.decode_s() {
                Some(d) if self.since_decode_sample < REFRESH_STEPS => d * self.share + self.credit,
                _ => return 0,
            }
        };
        let n = match self.cost.coefficients() {
            None => FIRST_TOKENS as f64,
            Some((_, b)) if b <= 0.0 => self.max_tokens as f64,
            Some((a, b)) => {
                let n = ((target - a) / b + 1e-6).floor();
                if n < 1.0 && decode_rows > 0 {
                    return 0; // not affordable beside decode rows yet: the credit grows
                }
                n.max(1.0)
            }
        };
        let ramp = (2 * self.last_tokens).max(FIRST_TOKENS);
        (n.min(self.max_tokens as f64) as usize).clamp(1, self.max_tokens.min(ramp))
    }

    /// Records a pass of `decode_rows` decode rows and `prompt_tokens` prompt tokens that took
    /// `secs`.
    pub fn record(&mut self, decode_rows: usize, prompt_tokens: usize, secs: f64) {
        if decode_rows == 0 {
            self.credit = 0.0;
        }
        if prompt_tokens == 0 {
            if decode_rows > 0 {
                if self.decode.len() == DECODE_SAMPLES {
                    self.decode.pop_front();
                }
                self.decode.push_back(secs);
                self.since_decode_sample = 0;
                self.earn(0.0);
            }
            return;
        }
        let extra = if decode_rows > 0 {
            self.since_decode_sample += 1;
            secs - self.decode_s().unwrap_or(0.0)
        } else {
            secs
        };
        self.cost.add(prompt_tokens as f64, extra.max(0.0));
        self.last_tokens = prompt_tokens;
        if decode_rows > 0 {
            self.earn(extra.max(0.0));
        }
    }

    /// A pass with decode rows earns `share x decode` of credit and spends `spent` seconds.
    fn earn(&mut self, spent: f64) {
        let Some(d) = self.decode_s() else { return };
        let one_chunk = self.cost.coefficients().map_or(0.0, |(a, b)| a + b);
        let cap = (IDLE_DECODE_STEPS * self.share * d).max(one_chunk);
        self.credit = (self.credit + self.share * d - spent).clamp(-cap, cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_passes_bound_the_prompt_share() {
        let mut b = PrefillBudget::new(256, Duration::from_millis(200), 1.0);
        // nothing measured: a first probe of FIRST_TOKENS, and a decode-only pass to measure
        assert_eq!(b.tokens(0), FIRST_TOKENS);
        assert_eq!(b.tokens(3), 0);
        // 1 ms per prompt token, alone: 200 tokens fill the idle target
        b.record(0, 100, 0.1);
        assert_eq!(b.tokens(0), 200);
        // ... but a pass carries at most twice the last one's tokens
        b.record(0, 40, 0.04);
        assert_eq!(b.tokens(0), 80);
        b.record(0, 100, 0.1);
        // a decode pass costs 20 ms: prompt work may add 20 ms per pass, and the decode-only
        // pass left its 20 ms unspent: 40 tokens
        b.record(4, 0, 0.02);
        assert_eq!(b.tokens(4), 40);
        // prompt tokens got dearer (longer context), measured beside decode rows: that pass
        // overspent by 20 ms, so the next carries nothing and pays it back
        b.record(4, 20, 0.02 + 20.0 * 0.003);
        assert_eq!(b.tokens(4), 0);
        b.record(4, 0, 0.02);
        assert_eq!(
            b.tokens(4),
            0,
            "the dearer tokens' fixed cost is over one pass's 20 ms"
        );
        // with nobody decoding, a pass may take 16 decode passes (here more than idle_step)
        b.record(0, 100, 0.1);
        assert!(b.tokens(0) > 20);
        // after REFRESH_STEPS passes with prompt work, a decode-only pass re-measures
        for _ in 0..REFRESH_STEPS {
            b.record(4, 10, 0.04);
        }
        assert_eq!(b.tokens(4), 0);
        b.record(4, 0, 0.02);
        assert_eq!(b.tokens(4), 31);
    }

    #[test]
    fn idle_passes_follow_the_decode_cost() {
        let mut b = PrefillBudget::new(10_000, Duration::from_millis(250), 1.0);
        b.record(0, 200, 0.2); // 1 ms per prompt token
        assert_eq!(b.tokens(0), 250);
        b.record(8, 0, 0.002); // 2 ms decode passes: 16 of them = 32 ms
        assert_eq!(b.tokens(0), 32);
        b.record(8, 0, 0.0001); // cheaper still: at least MIN_IDLE_STEP
        b.record(8, 0, 0.0001);
        b.record(8, 0, 0.0001);
        b.record(8, 0, 0.0001);
        assert_eq!(b.tokens(0), 10);
    }

    #[test]
    fn a_fixed_chunk_cost_rides_on_some_passes_only() {
        // decode passes of 1 ms; a prompt chunk costs 3 ms + 0.01 ms per token (a fixed cost
        // three times one pass's whole allowance of 0.5 ms, as on a busy machine)
        let (d, a, per_token) = (0.001, 0.003, 0.000_01);
        let mut b = PrefillBudget::new(256, Duration::from_millis(250), 0.5);
        b.record(8, 0, d);
        let (mut extra, mut tokens, mut chunk_passes) = (0.0, 0, 0);
        let passes = 400;
        for _ in 0..passes {
            let n = b.tokens(8);
            let secs = d + if n > 0 { a + per_token * n as f64 } else { 0.0 };
            b.record(8, n, secs);
            extra += secs - d;
            tokens += n;
            chunk_passes += usize::from(n > 0);
        }
        // decoding slowed by at most the share on average (plus the first probe's overrun)
        let slowdown = extra / (passes as f64 * d);
        assert!(slowdown <= 0.5 + 0.01, "{slowdown}");
        assert!(slowdown >= 0.4, "the allowance is used: {slowdown}");
        // ... and the prompt progressed, in chunks larger than one token
        assert!(
            chunk_passes > 10 && chunk_passes < passes / 4,
            "{chunk_passes}"
        );
        assert!(
            tokens > 4 * chunk_passes,
            "{tokens} tokens in {chunk_passes} passes"
        );
    }

    #[test]
    fn memory_bound_and_progress_floor() {
        let mut b = PrefillBudget::new(64, Duration::from_secs(10), 1.0);
        b.record(0, 40, 4e-6);
        assert_eq!(b.tokens(0), 64);
        b.record(0, 40, 1000.0);
        b.record(0, 40, 1000.0);
        assert_eq!(b.tokens(0), 1);
    }
}
