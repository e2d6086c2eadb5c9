//! The resumable extraction loop of given answers: HaluEval rows (QA, dialogue, summarization)
//! -> chunks of features.
use crate::data::{shuffled_indices, GivenRow};
use crate::error::{HaluError, Result};
use crate::features::{key_shapes, ExtractConfig, Extractor, Features};
use crate::store::{chunk_bytes, read_manifest, ChunkInfo, Manifest, ModelDims, FORMAT, MANIFEST};
use std::path::Path;
use umbra_common::fs::{write_atomic, write_json};
use umbra_common::progress::Progress;
use umbra_model::llama::Llama;
use umbra_model::tokenizer::TextTokenizer;

/// What to extract and where.
#[derive(Debug, Clone)]
pub struct ExtractJob {
    /// Data source label stored in the manifest (asset name or path).
    pub data: String,
    /// The extraction settings; `cfg.layout` is the task's prompt layout.
    pub model_path: String,
    /// Rows to use (after a seeded shuffle); `None` = all.
    pub limit: Option<usize>,
    pub seed: u64,
    pub chunk_rows: usize,
    pub cfg: ExtractConfig,
    /// Token map for an obfuscated model (`tau` of its client key): ids are mapped before the
    /// forward pass, as the client would send them. `None` for a plaintext model.
    pub token_map: Option<Vec<u32>>,
}

/// Summary of one extraction run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractSummary {
    pub rows: usize,
    pub triples: usize,
    pub chunks_written: usize,
    pub chunks_skipped: usize,
    pub seconds: f64,
}

/// Extracts features of `rows` into `out`, skipping chunks a previous run completed.
/// Each row gives its faithful (label 0) and hallucinated (label 1) triple.
pub fn run_extraction(
    model: &Llama,
    tok: &TextTokenizer,
    rows: &[GivenRow],
    job: &ExtractJob,
    out: &Path,
    progress: &Progress,
) -> Result<ExtractSummary> {
    if rows.is_empty() {
        return Err(HaluError::Empty("no HaluEval rows to extract".into()));
    }
    if job.chunk_rows == 0 {
        return Err(HaluError::Input("chunk size must be > 0".into()));
    }
    let dims = ModelDims::of(model.config());
    let mut manifest = Manifest {
        format: FORMAT.into(),
        model: dims.clone(),
        model_path: job.model_path.clone(),
        data: job.data.clone(),
        seed: job.seed,
        extract: job.cfg.clone(),
        chunk_rows: job.chunk_rows,
        keys: key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads),
        chunks: vec![],
        own: None,
    };
    if out.join(MANIFEST).exists() {
        let old = read_manifest(out)?;
        let missing: Vec<&String> = manifest
            .keys
            .keys()
            .filter(|k| !old.keys.contains_key(*k))
            .collect();
        if !missing.is_empty() && old.keys.keys().all(|k| manifest.keys.contains_key(k)) {
            return Err(HaluError::FeatureMismatch(format!(
                "{} holds features of an older extraction without {} (e.g. the ffn family); \
                 its chunks cannot be mixed with new ones: use a new --out (the old folder \
                 still loads for report / train / eval)",
                out.display(),
                missing
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !old.same_setup(&manifest) {
            return Err(HaluError::FeatureMismatch(format!(
                "{} holds features of another setup (model, data, seed, chunk size or extraction \
                 config differ); use a new --out",
                out.display()
            )));
        }
        manifest.chunks = old
            .chunks
            .into_iter()
            .filter(|c| out.join(&c.file).is_file())
            .collect();
    }
    let order = shuffled_indices(rows.len(), job.seed);
    let n = job.limit.unwrap_or(rows.len()).min(rows.len());
    let order = &order[..n];
    let nchunks = n.div_ceil(job.chunk_rows);
    let ex = Extractor::new(model, tok, job.cfg.clone());
    let t0 = std::time::Instant::now();
    let (mut written, mut skipped) = (0, 0);
    progress.set_length(n as u64);
    for ci in 0..nchunks {
        let ids = &order[ci * job.chunk_rows..((ci + 1) * job.chunk_rows).min(n)];
        if manifest
            .chunks
            .iter()
            .any(|c| c.index == ci && c.triples == 2 * ids.len())
        {
            skipped += 1;
            progress.inc(ids.len() as u64);
            continue;
        }
        let mut feats: Vec<Features> = Vec::with_capacity(2 * ids.len());
        let mut labels = Vec::with_capacity(2 * ids.len());
        let mut row_ids = Vec::with_capacity(2 * ids.len());
        for &r in ids {
            let row = &rows[r];
            let f = ex.extract_mapped(
                row.context.as_deref(),
                &row.query,
                &[&row.right, &row.hallucinated],
                job.token_map.as_deref(),
            )?;
            for (label, fe) in [0.0f32, 1.0].into_iter().zip(f) {
                feats.push(fe);
                labels.push(label);
                row_ids.push(r as u32);
            }
            progress.inc(1);
        }
        let file = format!("chunk-{ci:05}.safetensors");
        write_atomic(
            &out.join(&file),
            &chunk_bytes(&manifest.keys, &feats, &labels, &row_ids)?,
        )?;
        manifest.chunks.retain(|c| c.index != ci);
        manifest.chunks.push(ChunkInfo {
            file,
            index: ci,
            triples: feats.len(),
            answers: None,
            questions: None,
        });
        manifest.chunks.sort_by_key(|c| c.index);
        write_json(&out.join(MANIFEST), &manifest)?;
        written += 1;
        tracing::info!(chunk = ci, triples = feats.len(), "chunk written");
    }
    Ok(ExtractSummary {
        rows: n,
        triples: manifest.triples(),
        chunks_written: written,
        chunks_skipped: skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
