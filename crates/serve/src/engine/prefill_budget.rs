//! How many prompt tokens the next pass may carry: a small controller over measured pass times.
//!
//! A pass costs about `decode + tokens x per_token`, where `decode` is the cost of the decode
//! rows it carries and `per_token` the cost of one prompt token at the current context length
//! (linear maps plus attention over `L` keys, so it grows as a long prompt advances). Both are
//! measured (exponential moving averages of real passes) rather than modelled, so the same
//! rule holds on any machine and model:
//!
//! * sequences decoding: prompt work may add at most `share x decode` to a pass (`share` = 1:
//!   a decode step with a prompt chunk takes at most about twice as long as one without), so
//!   decoding sequences keep at least half their speed however long the prompt is. A
//!   decode-only pass runs every [`REFRESH_STEPS`] passes to keep `decode` current;
//! * nobody decoding: a pass aims at `idle_step` (so a request arriving meanwhile waits about
//!   that long for its turn);
//! * always at most `max_tokens` (the memory bound) and at least one token.
use std::time::Duration;

/// Passes with prompt work between two decode-only passes that re-measure the decode cost.
pub const REFRESH_STEPS: usize = 16;
/// Prompt tokens of the first pass, before any cost has been measured.
pub const FIRST_TOKENS: usize = 32;
/// Weight of the newest measurement in the moving averages.
const ALPHA: f64 = 0.5;

/// The controller; see the module docs.
#[derive(Debug, Clone)]
pub struct PrefillBudget {
    max_tokens: usize,
    idle_step_s: f64,
    share: f64,
    decode_s: Option<f64>,
    per_token_s: Option<f64>,
    since_decode_sample: usize,
}

fn ema(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
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
            decode_s: None,
            per_token_s: None,
            since_decode_sample: 0,
        }
    }

    /// The most prompt tokens one pass may carry.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Prompt tokens the next pass may carry when `decode_rows` sequences decode in it; 0
    /// asks for a decode-only pass (to measure its cost).
    pub fn tokens(&self, decode_rows: usize) -> usize {
        let target = if decode_rows == 0 {
            self.idle_step_s
        } else {
            match self.decode_s {
                Some(d) if self.since_decode_sample < REFRESH_STEPS => d * self.share,
                _ => return 0,
            }
        };
        let n = match self.per_token_s {
            Some(p) if p > 0.0 => (target / p + 1e-6).floor(),
            _ => FIRST_TOKENS as f64,
        };
        (n as usize).clamp(1, self.max_tokens)
    }

    /// Records a pass of `decode_rows` decode rows and `prompt_tokens` prompt tokens that took
    /// `secs`.
    pub fn record(&mut self, decode_rows: usize, prompt_tokens: usize, secs: f64) {
        if prompt_tokens == 0 {
            if decode_rows > 0 {
                self.decode_s = Some(ema(self.decode_s, secs));
                self.since_decode_sample = 0;
            }
            return;
        }
        let extra = if decode_rows > 0 {
            self.since_decode_sample += 1;
            secs - self.decode_s.unwrap_or(0.0)
        } else {
            secs
        };
        let per = extra.max(0.0) / prompt_tokens as f64;
        self.per_token_s = Some(ema(self.per_token_s, per));
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
        // a decode pass costs 20 ms: prompt work may add 20 ms = 20 tokens
        b.record(4, 0, 0.02);
        assert_eq!(b.tokens(4), 20);
        // prompt tokens got dearer (longer context): 2 ms each, measured beside decode rows
        b.record(4, 20, 0.02 + 20.0 * 0.003);
        let n = b.tokens(4);
        assert!((5..20).contains(&n), "{n}");
        // after REFRESH_STEPS passes with prompt work, a decode-only pass re-measures
        for _ in 0..REFRESH_STEPS {
            b.record(4, 10, 0.04);
        }
        assert_eq!(b.tokens(4), 0);
        b.record(4, 0, 0.02);
        assert!(b.tokens(4) > 0);
    }

    #[test]
    fn memory_bound_and_progress_floor() {
        let mut b = PrefillBudget::new(64, Duration::from_secs(10), 1.0);
        b.record(0, 10, 1e-6);
        assert_eq!(b.tokens(0), 64);
        b.record(0, 10, 100.0);
        b.record(0, 10, 100.0);
        assert_eq!(b.tokens(0), 1);
    }
}
