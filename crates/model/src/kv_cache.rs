//! The KV cache: per-layer keys and values of one batch of sequences that advance together.
use crate::error::{ModelError, Result};
use candle_core::Tensor;

/// Initial KV capacity (positions) when a cache is first written and none was requested.
const DEFAULT_KV_CAPACITY: usize = 256;

/// Per-layer K/V for one batch of sequences that advance together.
///
/// Buffers are `[b, nkv, capacity, hd]`, written in place and grown by doubling; a serving layer
/// keeps one `KvCache` (b = 1) per sequence. Each layer counts its own positions, so a pass over
/// a block range advances only those layers (the next range then starts where the last ended).
/// Not `Clone` (buffers are mutated in place); use [`KvCache::try_clone`] for a deep copy.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions cached per layer.
    lens: Vec<usize>,
    capacity: usize,
    batch: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, DEFAULT_KV_CAPACITY)
    }

    /// Reserves `capacity` positions on first write (grows past it if needed).
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            lens: vec![0; num_layers],
            capacity: capacity.max(1),
            batch: 0,
        }
    }

    /// Positions cached through the last layer (the next token's position once every block
    /// has run); 0 for a cache of no layers.
    pub fn len(&self) -> usize {
        self.lens.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Batch size of the cached sequences (0 while empty).
    pub fn batch_size(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            self.batch
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// A deep copy (e.g. to fork a shared prompt prefix).
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.copy()?, v.copy()?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            lens: self.lens.clone(),
            capacity: self.capacity,
            batch: self.batch,
        })
    }

    /// Keeps only the batch rows whose `keep` flag is set (in order), e.g. to drop finished
    /// sequences from a batch. `keep.len()` must equal the cached batch size.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        if keep.len() != self.batch {
            return Err(ModelError::Input(format!(
                "retain: {} flags for a cached batch of {}",
                keep.len(),
                self.batch
            )));
        }
        let idx: Vec<u32> = (0..keep.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        if idx.len() == keep.len() {
            return Ok(());
        }
        if idx.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            self.lens.iter_mut().for_each(|l| *l = 0);
            self.batch = 0;
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let ix = Tensor::new(idx.as_slice(), k.device())?;
            *k = k.index_select(&ix, 0)?.contiguous()?;
            *v = v.index_select(&ix, 0)?.contiguous()?;
        }
        self.batch = idx.len();
        Ok(())
    }

    /// Forgets all positions; keeps the buffers for reuse.
    pub fn reset(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
    }

    /// Keeps only the first `len` positions (e.g. to roll back a rejected draft).
    pub fn truncate(&mut self, len: usize) {
        self.lens.iter_mut().for_each(|l| *l = (*l).min(len));
    }

    /// The position a pass over the blocks `range` starts at (every layer of the range must
    /// hold the same count; an empty range starts at [`KvCache::len`]).
    pub(crate) fn start_of(&self, range: &std::ops::Range<usize>) -> Result<usize> {
        let Some(first) = self.lens.get(range.start).filter(|_| !range.is_empty()) else {
            return Ok(self.len());
        };
        if let Some(i) = range.clone().find(|&i| self.lens[i] != *first) {
            return Err(ModelError::Input(format!(
                "KV cache layers disagree: layer {} holds {first} positions, layer {i} holds {}",
                range.start, self.lens[i]
            )));
        }
        Ok(*first)
    }

    /// Records that the layers of `range` now hold `len` positions of a batch of `batch`.
    pub(crate) fn advance(&mut self, range: std::ops::Range<usize>, len: usize, batch: usize) {
        for l in &mut self.lens[range] {
            *l = len;
        }
        self.batch = batch;
    }

    /// Layer `layer`'s buffers `[b, nkv, capacity, hd]`, once written.
    pub(crate) fn buffers(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer)?.as_ref()
    }

    /// Writes `k`, `v` (`[b, nkv, t, hd]`, contiguous) at `start` for `layer`; returns views of
    /// positions `0..start+t`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, nkv, t, hd) = k.dims4()?;
        let need = start + t;
        let slot = &mut self.layers[layer];
        let realloc = match slot {
            Some((kb, _)) => {
                let (kb_b, _, cap, _) = kb.dims4()?;
                kb_b != b || cap < need
            }
            None => true,
        };
        if realloc {
            let mut cap = self.capacity.max(need);
            if let Some((kb, _)) = slot.as_ref() {
                if kb.dim(0)? == b {
                    cap = cap.max(kb.dim(2)? * 2);
                }
            }
            let nk = Tensor::zeros((b, nkv, cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, nkv, cap, hd), v.dtype(), v.device())?;
            if let Some((kb, vb)) = slot.as_ref() {
                if start > 0 && kb.dim(0)? == b {
                    nk.slice_set(&kb.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&vb.narrow(2, 0, start)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((nk, nv));
        }
        let (kb, vb) = slot.as_ref().expect("allocated above");
        kb.slice_set(k, 2, start)?;
        vb.slice_set(v, 2, start)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}
