//! The resumable own-answer job (`umbra halluc generate`): questions -> the model's greedy
//! answers (batched, [`crate::generation`]) -> labels against the gold aliases
//! ([`crate::labels`]) -> chunks of features from the generation pass + answers files.
//!
//! Questions are taken in a seeded order; every `chunk_rows` questions make one chunk, written
//! atomically with its answers file, so a killed run resumes at the next chunk. A folder is only
//! resumed with the model that wrote it (same [`crate::source::model_fingerprint`]) and the same
//! settings. Empty answers (the model stops at once) get an answers record but no triple.
use crate::answers::{read_answers, write_answers, AnswerRecord};
use crate::data::shuffled_indices;
use crate::error::{HaluError, Result};
use crate::generation::{generate_answers, Answer, GenCost, GenSettings};
use crate::keys::{key_shapes, ExtractConfig, Features, SAMPLING_FEATURES, SAMPLING_KEY};
use crate::labels::{consistency, judge};
use crate::online::TapPlan;
use crate::opendomain::QaItem;
use crate::prompt::own_prompt;
use crate::source::LoadedModel;
use crate::store::{
    chunk_bytes, read_manifest, ChunkInfo, Manifest, ModelDims, OwnSetup, FORMAT, MANIFEST,
};
use std::path::Path;
use std::sync::Arc;
use umbra_common::fs::write_json;
pub use umbra_common::progress::Progress;

/// The share of the minority label below which a setting is not used for probes (issue 19).
pub const MIN_MINORITY_SHARE: f64 = 0.15;

/// What to generate and where.
#[derive(Debug, Clone)]
pub struct OwnJob {
    /// Question set label stored in the manifest (`halueval-qa`, `nq-open`, ... or a path).
    pub task: String,
    /// Put each question's knowledge passage (when it has one) into the prompt.
    pub knowledge: bool,
    /// Questions to use (after a seeded shuffle); `None` = all.
    pub limit: Option<usize>,
    pub seed: u64,
    pub chunk_rows: usize,
    /// Questions generated together (one batch of passes).
    pub batch: usize,
    /// Prompt cuts (`max_knowledge_tokens`, `max_question_tokens`), the answer cut
    /// (`max_answer_tokens`, also the generation limit) and the window.
    pub cfg: ExtractConfig,
    pub gen: GenSettings,
}

/// Label balance and cost of an own-answer folder.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OwnSummary {
    pub questions: usize,
    /// Non-empty answers (each has a triple).
    pub answered: usize,
    pub correct: usize,
    pub hallucinated: usize,
    pub empty: usize,
    /// Share of the minority label among the answered questions.
    pub minority_share: f64,
    /// `minority_share >= 0.15`.
    pub usable: bool,
    pub mean_f1: f64,
    pub mean_answer_tokens: f64,
    pub chunks_written: usize,
    pub chunks_skipped: usize,
    pub seconds: f64,
    /// Cost of the chunks written in this run.
    pub cost: GenCost,
    /// Tokens through the model per second in this run (prompt + greedy + samples), and the
    /// greedy decode rate alone.
    pub tokens_per_s: f64,
    pub greedy_tokens_per_s: f64,
}

impl OwnSummary {
    /// One line: balance and usability.
    pub fn balance_line(&self) -> String {
        format!(
            "{} questions: {} answered ({} correct, {} hallucinated; minority share {:.1}%{}), {} empty; mean token F1 {:.3}",
            self.questions,
            self.answered,
            self.correct,
            self.hallucinated,
            100.0 * self.minority_share,
            if self.usable {
                ""
            } else {
                " < 15%: labels too unbalanced for probes"
            },
            self.empty,
            self.mean_f1
        )
    }
}

/// The manifest of an own-answer folder for `lm` and `job`.
fn manifest_for(lm: &LoadedModel, job: &OwnJob, chat: bool) -> Manifest {
    let dims = ModelDims::of(lm.model.config());
    let mut keys = key_shapes(dims.num_layers, dims.hidden_size, dims.num_heads);
    if job.gen.samples > 0 {
        keys.insert(SAMPLING_KEY.into(), vec![SAMPLING_FEATURES]);
    }
    Manifest {
        format: FORMAT.into(),
        model: dims,
        model_path: lm.path.display().to_string(),
        data: job.task.clone(),
        seed: job.seed,
        extract: job.cfg.clone(),
        chunk_rows: job.chunk_rows,
        keys,
        chunks: vec![],
        own: Some(OwnSetup {
            task: job.task.clone(),
            knowledge: job.knowledge,
            chat,
            model_fingerprint: lm.fingerprint.clone(),
            max_new_tokens: job.gen.max_new_tokens,
            samples: job.gen.samples,
            temperature: job.gen.temperature,
        }),
    }
}

/// Errors unless the own-answer folder `dir` (manifest `old`) was written by `lm`.
pub fn check_answers_model(dir: &Path, old: &Manifest, lm: &LoadedModel) -> Result<()> {
    let own = old.own.as_ref().ok_or_else(|| {
        HaluError::FeatureMismatch(format!(
            "{} holds given-answer features (`umbra halluc extract`), not own answers",
            dir.display()
        ))
    })?;
    if own.model_fingerprint != lm.fingerprint {
        return Err(HaluError::FeatureMismatch(format!(
            "the answers in {} were generated by another model ({}, fingerprint {}), not by {} \
             (fingerprint {}); own answers are only scored and resumed with the model that wrote \
             them: use a new --out",
            dir.display(),
            old.model_path,
            own.model_fingerprint,
            lm.path.display(),
            lm.fingerprint
        )));
    }
    Ok(())
}

/// The seed of question `row`'s samples (sample `k` adds `k`): independent of the batching.
fn sample_seed(seed: u64, row: usize) -> u64 {
    // SplitMix64 of (seed, row).
    let mut z = seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generates, labels and stores the answers to `items` in `out`, skipping chunks a previous
/// run completed. Returns the label balance of the whole folder and this run's cost.
pub fn run_generation(
    lm: &LoadedModel,
    items: &[QaItem],
    job: &OwnJob,
    out: &Path,
    progress: &Progress,
) -> Result<OwnSummary> {
    if items.is_empty() {
        return Err(HaluError::Empty("no questions to answer".into()));
    }
    if job.chunk_rows == 0 || job.batch == 0 || job.gen.max_new_tokens == 0 {
        return Err(HaluError::Input(
            "chunk size, batch size and max answer tokens must be > 0".into(),
        ));
    }
    let n = job.limit.unwrap_or(items.len()).min(items.len());
    if n == 0 {
        return Err(HaluError::Empty("--limit 0: no questions to answer".into()));
    }
    let chat = own_prompt(&lm.tokenizer, &job.cfg, None, "x")?.chat;
    let mut manifest = manifest_for(lm, job, chat);
    if out.join(MANIFEST).exists() {
        let old = read_manifest(out)?;
        check_answers_model(out, &old, lm)?;
        if !old.same_setup(&manifest) {
            return Err(HaluError::FeatureMismatch(format!(
                "{} holds answers of another setup (data, seed, chunk size, prompt or generation \
                 settings differ); use a new --out",
                out.display()
            )));
        }
        manifest.chunks = old
            .chunks
            .into_iter()
            .filter(|c| {
                c.answers.as_ref().is_some_and(|a| out.join(a).is_file())
                    && (c.triples == 0 || out.join(&c.file).is_file())
            })
            .collect();
    }
    let order = shuffled_indices(items.len(), job.seed);
    let order = &order[..n];
    let plan = Arc::new(TapPlan::every_family(&manifest.model, &job.cfg));
    let mut gen = job.gen.clone();
    gen.max_new_tokens = gen.max_new_tokens.min(job.cfg.max_answer_tokens);
    let t0 = std::time::Instant::now();
    let mut summary = OwnSummary::default();
    progress.set_length(n as u64);
    for ci in 0..n.div_ceil(job.chunk_rows) {
        let rows = &order[ci * job.chunk_rows..((ci + 1) * job.chunk_rows).min(n)];
        if manifest
            .chunks
            .iter()
            .any(|c| c.index == ci && c.questions == Some(rows.len()))
        {
            summary.chunks_skipped += 1;
            progress.inc(rows.len() as u64);
            continue;
        }
        let mut records = Vec::with_capacity(rows.len());
        let (mut feats, mut labels, mut row_ids) = (vec![], vec![], vec![]);
        for batch in rows.chunks(job.batch) {
            let prompts = batch
                .iter()
                .map(|&r| {
                    let it = &items[r];
                    let k = it.knowledge.as_deref().filter(|_| job.knowledge);
                    own_prompt(&lm.tokenizer, &job.cfg, k, &it.question)
                })
                .collect::<Result<Vec<_>>>()?;
            let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
            let seeds: Vec<u64> = batch.iter().map(|&r| sample_seed(job.seed, r)).collect();
            let (answers, cost) =
                generate_answers(&lm.model, &plan, &ids, &seeds, &lm.eos_ids, &gen)?;
            summary.cost.add(&cost);
            for ((&r, p), a) in batch.iter().zip(&prompts).zip(answers) {
                let (rec, f) = record(lm, &items[r], r, p.ids.len(), a)?;
                if let Some(f) = f {
                    feats.push(f);
                    labels.push(rec.label());
                    row_ids.push(r as u32);
                }
                records.push(rec);
            }
            progress.inc(batch.len() as u64);
        }
        let file = format!("chunk-{ci:05}.safetensors");
        if !feats.is_empty() {
            umbra_common::fs::write_atomic(
                &out.join(&file),
                &chunk_bytes(&manifest.keys, &feats, &labels, &row_ids)?,
            )?;
        }
        let answers = format!("answers-{ci:05}.jsonl");
        write_answers(&out.join(&answers), &records)?;
        manifest.chunks.retain(|c| c.index != ci);
        manifest.chunks.push(ChunkInfo {
            file,
            index: ci,
            triples: feats.len(),
            answers: Some(answers),
            questions: Some(rows.len()),
        });
        manifest.chunks.sort_by_key(|c| c.index);
        write_json(&out.join(MANIFEST), &manifest)?;
        summary.chunks_written += 1;
        tracing::info!(
            chunk = ci,
            answered = feats.len(),
            "own-answer chunk written"
        );
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    let c = &summary.cost;
    let busy = c.prefill_s + c.greedy_s + c.sample_s;
    if busy > 0.0 {
        summary.tokens_per_s = (c.prompt_tokens + c.greedy_tokens + c.sample_tokens) as f64 / busy;
    }
    if c.greedy_s > 0.0 {
        summary.greedy_tokens_per_s = c.greedy_tokens as f64 / c.greedy_s;
    }
    let balance = folder_balance(out, &manifest)?;
    Ok(OwnSummary {
        chunks_written: summary.chunks_written,
        chunks_skipped: summary.chunks_skipped,
        seconds: summary.seconds,
        cost: summary.cost,
        tokens_per_s: summary.tokens_per_s,
        greedy_tokens_per_s: summary.greedy_tokens_per_s,
        ..balance
    })
}

/// The answers record of one question (and its features with the sampling scores, when the
/// answer is not empty).
fn record(
    lm: &LoadedModel,
    item: &QaItem,
    row: usize,
    prompt_tokens: usize,
    a: Answer,
) -> Result<(AnswerRecord, Option<Features>)> {
    let text = lm.tokenizer.decode(&a.ids, true)?.trim().to_string();
    let j = judge(&text, &item.aliases);
    let samples = a
        .samples
        .iter()
        .map(|s| Ok(lm.tokenizer.decode(s, true)?.trim().to_string()))
        .collect::<Result<Vec<String>>>()?;
    let cons = consistency(&text, &samples);
    let features = a.features.map(|mut f| {
        if let Some(c) = cons {
            f.insert(SAMPLING_KEY.into(), c.to_vec());
        }
        f
    });
    Ok((
        AnswerRecord {
            row: row as u32,
            question: item.question.clone(),
            aliases: item.aliases.clone(),
            prompt_tokens,
            answer: text,
            answer_ids: a.ids,
            stopped: a.stopped,
            correct: j.correct,
            f1: j.f1,
            has_features: features.is_some(),
            samples,
            consistency: cons,
        },
        features,
    ))
}

/// Every answers record of an own-answer folder, in chunk order.
pub fn folder_answers(dir: &Path, manifest: &Manifest) -> Result<Vec<AnswerRecord>> {
    let mut all = vec![];
    for c in &manifest.chunks {
        if let Some(a) = &c.answers {
            all.extend(read_answers(&dir.join(a))?);
        }
    }
    Ok(all)
}

/// Label balance of an own-answer folder.
pub fn folder_balance(dir: &Path, manifest: &Manifest) -> Result<OwnSummary> {
    let recs = folder_answers(dir, manifest)?;
    let answered: Vec<&AnswerRecord> = recs.iter().filter(|r| r.has_features).collect();
    let correct = answered.iter().filter(|r| r.correct).count();
    let halluc = answered.len() - correct;
    let minority = correct.min(halluc) as f64 / answered.len().max(1) as f64;
    Ok(OwnSummary {
        questions: recs.len(),
        answered: answered.len(),
        correct,
        hallucinated: halluc,
        empty: recs.len() - answered.len(),
        minority_share: minority,
        usable: minority >= MIN_MINORITY_SHARE,
        mean_f1: recs.iter().map(|r| r.f1).sum::<f64>() / recs.len().max(1) as f64,
        mean_answer_tokens: answered.iter().map(|r| r.answer_ids.len()).sum::<usize>() as f64
            / answered.len().max(1) as f64,
        ..OwnSummary::default()
    })
}
