//! The hallucination probe on the engine (`umbra serve --halluc-probe`): which taps a pass
//! keeps, and how a pass's stacked tap rows are handed to each sequence's features.
use candle_core::Tensor;
use std::sync::Arc;
use umbra_haluprobe::online::{OnlineFeatures, TapPlan};
use umbra_model::llama::{Llama, TapPoint};

/// A hallucination probe checked against the served model, with the taps it needs.
pub struct HalluProbe {
    pub scorer: umbra_haluprobe::score::Scorer,
    pub plan: Arc<TapPlan>,
}

impl HalluProbe {
    /// Loads `path` and checks it against `model` (layers, hidden size, heads) and against what
    /// serving can tap.
    pub fn load(path: &std::path::Path, model: &Llama) -> Result<Self, umbra_haluprobe::HaluError> {
        let scorer = umbra_haluprobe::score::Scorer::load(path, model.config())?;
        let plan = TapPlan::for_probe(&scorer.probe.meta)?;
        Ok(Self {
            scorer,
            plan: Arc::new(plan),
        })
    }
}

/// Keeps the residual-stream taps of the layers `plan` reads, in layer order (each `[P, d]`:
/// every row of the pass, group after group, each batch-major).
pub(super) fn keep_planned(plan: &TapPlan, taps: &mut Vec<Tensor>, pt: TapPoint, t: &Tensor) {
    if let TapPoint::Layer(l) = pt {
        if plan.layers.binary_search(&l).is_ok() {
            taps.push(t.clone());
        }
    }
}

/// The kept taps as rows: `[layer][P][d]`.
pub(super) fn layer_rows(taps: &[Tensor]) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    taps.iter().map(|t| t.to_vec2::<f32>()).collect()
}

/// One sequence's probe state: its online features and, while its prompt is read in chunks,
/// the prompt rows of the planned layers so far (`[layer][position][d]`).
pub(super) struct SeqProbe {
    pub feats: OnlineFeatures,
    prompt: Vec<Vec<Vec<f32>>>,
}

impl SeqProbe {
    pub fn new(plan: Arc<TapPlan>) -> Self {
        let k = plan.layers.len();
        Self {
            feats: OnlineFeatures::new(plan),
            prompt: vec![vec![]; k],
        }
    }

    /// Appends prompt rows `rows[layer][from..from + n]`.
    pub fn push_prompt(&mut self, rows: &[Vec<Vec<f32>>], from: usize, n: usize) {
        for (mine, layer) in self.prompt.iter_mut().zip(rows) {
            mine.extend(layer[from..from + n].iter().cloned());
        }
    }

    /// Hands the whole prompt's rows to the features (once the prompt is read) and frees them.
    pub fn finish_prompt(&mut self) -> Result<(), umbra_haluprobe::HaluError> {
        let rows = std::mem::take(&mut self.prompt);
        self.feats.set_prompt(&rows)
    }

    /// The decode row `rows[layer][r]` of the token just fed.
    pub fn push_decode(
        &mut self,
        rows: &[Vec<Vec<f32>>],
        r: usize,
    ) -> Result<(), umbra_haluprobe::HaluError> {
        let per: Vec<&[f32]> = rows.iter().map(|l| l[r].as_slice()).collect();
        self.feats.push_hidden(&per)
    }
}
