//! Extraction cost: the tapped passes of [`Extractor`] vs plain forward passes over the same
//! tokens (prompt once, each answer from a copy of the prompt's KV cache, logits for the
//! answer), interleaved row by row in one run.
use crate::data::{shuffled_indices, QaRow};
use crate::error::{HaluError, Result};
use crate::features::{ExtractConfig, Extractor};
use candle_core::Tensor;
use std::time::Instant;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;
use umbra_model::{Forward, Input};

/// Flat bench results (milliseconds per HaluEval row = one prompt + two answers).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub rows: usize,
    pub tokens: usize,
    pub plain_ms_per_row: f64,
    pub taps_ms_per_row: f64,
    /// `(taps - plain) / plain * 100`.
    pub overhead_pct: f64,
    pub plain_tokens_per_s: f64,
    pub taps_tokens_per_s: f64,
}

impl BenchReport {
    pub fn table(&self) -> String {
        format!(
            "| pass | ms / row | tokens / s |\n|---|---|---|\n| plain forward | {:.1} | {:.0} |\n| forward + taps + features | {:.1} | {:.0} |\n\n{} rows, {} tokens; tap overhead {:+.1}%",
            self.plain_ms_per_row,
            self.plain_tokens_per_s,
            self.taps_ms_per_row,
            self.taps_tokens_per_s,
            self.rows,
            self.tokens,
            self.overhead_pct
        )
    }
}

fn plain_pass(model: &Llama, prompt: &[u32], answers: &[Vec<u32>]) -> Result<()> {
    let dev = model.device();
    let mut cache = model
        .new_cache_with_capacity(prompt.len() + answers.iter().map(Vec::len).max().unwrap_or(0));
    let emb = model.embed(&Tensor::new(prompt, dev)?.unsqueeze(0)?)?;
    let h = model.forward(Input::Embeds(&emb), &mut cache, Forward::hidden())?;
    let _first = model.head(&h.narrow(1, prompt.len() - 1, 1)?)?;
    for a in answers {
        let mut c = cache.try_clone()?;
        let _logits = model.forward(
            Input::Ids(&Tensor::new(a.as_slice(), dev)?.unsqueeze(0)?),
            &mut c,
            Forward::logits(),
        )?;
    }
    Ok(())
}

/// Times plain and tapped passes over `n` rows (after one warm-up row), alternating which goes
/// first per row.
pub fn bench_taps(
    model: &Llama,
    tok: &TextTokenizer,
    rows: &[QaRow],
    n: usize,
    cfg: ExtractConfig,
) -> Result<BenchReport> {
    if rows.is_empty() || n == 0 {
        return Err(HaluError::Empty("no rows to benchmark".into()));
    }
    let ex = Extractor::new(model, tok, cfg);
    let order = shuffled_indices(rows.len(), 0);
    let mut items = Vec::new();
    for &r in order.iter().take(n + 1) {
        let row = &rows[r];
        let p = ex.encode_prompt(Some(&row.knowledge), &row.question)?;
        let a = vec![
            ex.encode_answer(&row.right_answer)?,
            ex.encode_answer(&row.hallucinated_answer)?,
        ];
        items.push((p, a));
    }
    // Warm-up.
    let (p0, a0) = &items[0];
    plain_pass(model, p0, a0)?;
    ex.extract_ids(p0, a0)?;
    let (mut tp, mut tt) = (0f64, 0f64);
    let mut tokens = 0;
    for (i, (p, a)) in items[1..].iter().enumerate() {
        tokens += p.len() + a.iter().map(Vec::len).sum::<usize>();
        for k in 0..2 {
            let taps_now = (i + k) % 2 == 0;
            let t0 = Instant::now();
            if taps_now {
                ex.extract_ids(p, a)?;
                tt += t0.elapsed().as_secs_f64();
            } else {
                plain_pass(model, p, a)?;
                tp += t0.elapsed().as_secs_f64();
            }
        }
    }
    let m = (items.len() - 1) as f64;
    Ok(BenchReport {
        rows: items.len() - 1,
        tokens,
        plain_ms_per_row: tp / m * 1e3,
        taps_ms_per_row: tt / m * 1e3,
        overhead_pct: (tt - tp) / tp * 100.0,
        plain_tokens_per_s: tokens as f64 / tp,
        taps_tokens_per_s: tokens as f64 / tt,
    })
}
