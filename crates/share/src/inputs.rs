//! Taps on the inputs of every linear map of a plaintext model: the measured activation ranges
//! the fixed-point format is checked against, and the rows an attacker collects from public
//! text to train its inverters (what a server would see if the inputs were not shared).
use crate::error::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use umbra_model::linear::{DenseBackend, Linear, LinearBackend, LinearId, LinearSpec};
use umbra_model::{Llama, LlamaConfig, Weights};

/// Measured inputs of one map over every row it was called on.
#[derive(Debug, Clone, Serialize)]
pub struct InputRange {
    pub map: String,
    pub rows: u64,
    /// Largest `|x|` of any entry.
    pub max_abs: f32,
    /// Largest ratio of a row's largest `|x|` to its median `|x|` (massive activations).
    pub max_row_ratio: f32,
    /// Median over rows of that ratio.
    pub median_row_ratio: f32,
}

#[derive(Default)]
struct Sink {
    ids: Vec<LinearId>,
    max_abs: Vec<f32>,
    ratios: Vec<Vec<f32>>,
    rows: Vec<u64>,
    keep: Option<usize>,
    kept: Vec<f32>,
}

#[derive(Debug)]
struct Tapped {
    inner: Arc<dyn Linear>,
    index: usize,
    sink: Arc<Mutex<Sink>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl Linear for Tapped {
    fn forward(&self, x: &Tensor) -> umbra_model::Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let mut abs = vec![0f32; k];
        for row in xs.chunks_exact(k) {
            for (a, v) in abs.iter_mut().zip(row) {
                *a = v.abs();
            }
            let max = abs.iter().fold(0f32, |m, &v| m.max(v));
            abs.sort_unstable_by(f32::total_cmp);
            let med = abs[k / 2].max(f32::MIN_POSITIVE);
            s.max_abs[self.index] = s.max_abs[self.index].max(max);
            s.ratios[self.index].push(max / med);
        }
        s.rows[self.index] += rows as u64;
        if s.keep == Some(self.index) {
            s.kept.extend_from_slice(&xs);
        }
        drop(s);
        self.inner.forward(x)
    }

    fn in_features(&self) -> usize {
        self.inner.in_features()
    }

    fn out_features(&self) -> usize {
        self.inner.out_features()
    }
}

struct TapBackend<'w> {
    dense: DenseBackend<'w>,
    sink: Arc<Mutex<Sink>>,
    count: Cell<usize>,
}

impl LinearBackend for TapBackend<'_> {
    fn build(&self, spec: &LinearSpec) -> umbra_model::Result<Arc<dyn Linear>> {
        let inner = self.dense.build(spec)?;
        let index = self.count.get();
        self.count.set(index + 1);
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        s.ids.push(spec.id);
        s.max_abs.push(0.0);
        s.ratios.push(vec![]);
        s.rows.push(0);
        drop(s);
        Ok(Arc::new(Tapped {
            inner,
            index,
            sink: self.sink.clone(),
        }))
    }

    fn name(&self) -> &str {
        "f32+taps"
    }
}

/// A plaintext model whose map inputs are measured (and those of map `keep` collected).
pub struct TappedModel {
    pub llama: Llama,
    sink: Arc<Mutex<Sink>>,
}

impl TappedModel {
    pub fn new(cfg: &LlamaConfig, weights: &Weights, keep: Option<usize>) -> Result<Self> {
        let sink = Arc::new(Mutex::new(Sink {
            keep,
            ..Sink::default()
        }));
        let dev = Device::Cpu;
        let b = TapBackend {
            dense: DenseBackend::new(weights, &dev),
            sink: sink.clone(),
            count: Cell::new(0),
        };
        let llama = Llama::with_backend(cfg, weights, &dev, &b)?;
        Ok(Self { llama, sink })
    }

    /// Runs every sequence through the model (prefill only).
    pub fn run(&self, seqs: &[Vec<u32>]) -> Result<()> {
        for s in seqs.iter().filter(|s| !s.is_empty()) {
            let ids = Tensor::new(s.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let mut cache = self.llama.new_cache();
            self.llama.forward(
                umbra_model::Input::Ids(&ids),
                &mut cache,
                umbra_model::Forward::hidden(),
            )?;
        }
        Ok(())
    }

    /// The collected rows of the kept map (`[rows, k]` flattened), emptied.
    pub fn take_rows(&self) -> Vec<f32> {
        std::mem::take(&mut self.sink.lock().unwrap_or_else(|p| p.into_inner()).kept)
    }

    /// Per map kind (`qkv`, `o`, `gate_up`, `down`; the head is not run by a hidden pass) the
    /// ranges over all blocks, plus the worst block of each kind.
    pub fn ranges(&self) -> Vec<InputRange> {
        let s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<InputRange> = vec![];
        for kind in ["qkv", "o", "gate_up", "down"] {
            let idx: Vec<usize> = (0..s.ids.len())
                .filter(|&i| s.ids[i].kind.as_str() == kind && s.rows[i] > 0)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let mut all: Vec<f32> = idx
                .iter()
                .flat_map(|&i| s.ratios[i].iter().copied())
                .collect();
            all.sort_unstable_by(f32::total_cmp);
            let worst = idx
                .iter()
                .copied()
                .max_by(|&a, &b| s.max_abs[a].total_cmp(&s.max_abs[b]))
                .unwrap_or(idx[0]);
            out.push(InputRange {
                map: format!("{kind} (largest in {})", s.ids[worst]),
                rows: idx.iter().map(|&i| s.rows[i]).sum(),
                max_abs: idx.iter().map(|&i| s.max_abs[i]).fold(0f32, f32::max),
                max_row_ratio: all.last().copied().unwrap_or(0.0),
                median_row_ratio: all.get(all.len() / 2).copied().unwrap_or(0.0),
            });
        }
        out
    }
}
