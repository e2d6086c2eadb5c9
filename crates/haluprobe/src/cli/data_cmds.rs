//! `umbra halluc generate|extract|bench`: own answers, given answers, extraction cost.
use super::opts::ExtractOpts;
use crate::data::{halueval_qa_items, load_given, load_halueval_qa, GivenTask};
use crate::error::{HaluError, Result};
use crate::extract::{run_extraction, ExtractJob};
use crate::features::Layout;
use crate::generation::GenSettings;
use crate::opendomain::{load_qa_jsonl, load_topics_tsv, QaItem};
use crate::own::{run_generation, OwnJob, OwnSummary};
use crate::source::{load_model, resolve_data, resolve_model, token_map_for, DataSet, LoadedModel};
use std::path::{Path, PathBuf};
use umbra_common::fs::write_json;
use umbra_common::progress::Progress;

/// File format of a question set given as a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuestionFormat {
    /// HaluEval QA JSONL (knowledge, question, right_answer, ...): the right answer is the alias.
    HaluevalQa,
    /// Anserini topics: question TAB Python list of aliases (NQ-open, TriviaQA).
    Topics,
    /// JSONL `{"question", "answer": [aliases]}` (WebQuestions, SQuAD-open).
    Jsonl,
}

/// `umbra halluc generate`
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// HF folder or GGUF file, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// `halueval-qa` (with its knowledge passage), `nq-open`, `trivia-qa`, `web-questions`,
    /// `squad-open` (closed book), or a file (see --format).
    #[arg(long, default_value = "halueval-qa")]
    pub data: String,
    /// Format of a --data path (default: from the data set name, or from the file).
    #[arg(long, value_enum)]
    pub format: Option<QuestionFormat>,
    /// Questions to answer after a seeded shuffle.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder (resumes when it already holds chunks of the same model and setup).
    #[arg(long)]
    pub out: PathBuf,
    /// Closed book even where the data has a knowledge passage (HaluEval QA).
    #[arg(long)]
    pub no_knowledge: bool,
    /// Sampled answers per question for the sampling-consistency baseline (K).
    #[arg(long, default_value_t = 0)]
    pub samples: usize,
    /// Temperature of the sampled answers.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Questions generated together (one batch of forward passes).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Prompt tokens per prefill pass.
    #[arg(long, default_value_t = 1024)]
    pub prefill_tokens: usize,
    /// Questions per chunk file.
    #[arg(long, default_value_t = 100)]
    pub chunk_rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub opts: ExtractOpts,
    /// Write the summary (label balance, cost, tok/s) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

/// The questions of `spec` (a data set name or a file of `format`).
pub fn load_questions(spec: &str, format: Option<QuestionFormat>) -> Result<Vec<QaItem>> {
    let path = resolve_data(spec)?;
    let format = match (format, DataSet::parse(spec)) {
        (Some(f), _) => f,
        (None, Some(DataSet::HaluEvalQa)) => QuestionFormat::HaluevalQa,
        (None, Some(DataSet::NqOpen | DataSet::TriviaQa)) => QuestionFormat::Topics,
        (None, Some(DataSet::WebQuestions | DataSet::SquadOpen)) => QuestionFormat::Jsonl,
        (None, Some(d)) => {
            return Err(HaluError::Input(format!(
                "`{}` has no gold answers to label own answers against; use `umbra halluc \
                 extract --data {}` for its given answers",
                d.name(),
                d.name()
            )))
        }
        (None, None) => guess_format(&path)?,
    };
    match format {
        QuestionFormat::HaluevalQa => Ok(halueval_qa_items(&load_halueval_qa(&path)?)),
        QuestionFormat::Topics => load_topics_tsv(&path),
        QuestionFormat::Jsonl => load_qa_jsonl(&path),
    }
}

/// `.jsonl` files with a `knowledge` field are HaluEval QA, other `.jsonl` question/answer
/// lists; anything else is a topics TSV.
fn guess_format(path: &Path) -> Result<QuestionFormat> {
    if path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json")
    {
        let text = std::fs::read_to_string(path).map_err(|e| HaluError::io(path, e))?;
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Ok(if first.contains("\"knowledge\"") {
            QuestionFormat::HaluevalQa
        } else {
            QuestionFormat::Jsonl
        });
    }
    Ok(QuestionFormat::Topics)
}

pub fn run_generate(a: &GenerateArgs) -> Result<OwnSummary> {
    let items = load_questions(&a.data, a.format)?;
    let lm = LoadedModel::open(&resolve_model(&a.model)?)?;
    let job = OwnJob {
        task: a.data.clone(),
        knowledge: !a.no_knowledge,
        limit: a.limit,
        seed: a.seed,
        chunk_rows: a.chunk_rows,
        batch: a.batch,
        cfg: a.opts.config(Layout::Qa),
        gen: GenSettings {
            max_new_tokens: a.opts.max_answer_tokens,
            samples: a.samples,
            temperature: a.temperature,
            prefill_tokens: a.prefill_tokens,
        },
    };
    let pb = Progress::maybe(a.quiet, 0, "generate");
    let s = run_generation(&lm, &items, &job, &a.out, &pb)?;
    pb.finish();
    let c = &s.cost;
    println!(
        "{} -> {} ({} chunks written, {} resumed) in {:.1}s",
        a.data,
        a.out.display(),
        s.chunks_written,
        s.chunks_skipped,
        s.seconds
    );
    println!("{}", s.balance_line());
    if c.prompts > 0 {
        println!(
            "this run: {} prompts, {} prompt tokens in {} passes ({:.1}s); greedy {} tokens in {} \
             passes ({:.1}s, {:.1} tok/s); samples {} tokens in {} passes ({:.1}s); {:.0} tok/s \
             overall",
            c.prompts,
            c.prompt_tokens,
            c.prefill_passes,
            c.prefill_s,
            c.greedy_tokens,
            c.greedy_passes,
            c.greedy_s,
            s.greedy_tokens_per_s,
            c.sample_tokens,
            c.sample_passes,
            c.sample_s,
            s.tokens_per_s
        );
    }
    if let Some(j) = &a.json {
        write_json(j, &s)?;
    }
    Ok(s)
}

/// `umbra halluc extract`
#[derive(Debug, Clone, clap::Args)]
pub struct ExtractArgs {
    /// HF folder or GGUF file, or `smollm2`.
    #[arg(long)]
    pub model: String,
    /// `halueval-qa`, `halueval-dialogue`, `halueval-summarization`, or a JSONL file of the
    /// task --task.
    #[arg(long, default_value = "halueval-qa")]
    pub data: String,
    /// Task of a --data path: `halueval-qa`, `halueval-dialogue`, `halueval-summarization`.
    #[arg(long)]
    pub task: Option<String>,
    /// Rows to use after a seeded shuffle (each row gives two triples).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder (resumes when it already holds chunks of the same setup).
    #[arg(long)]
    pub out: PathBuf,
    /// Rows per chunk file.
    #[arg(long, default_value_t = 100)]
    pub chunk_rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub opts: ExtractOpts,
    /// Client key of an obfuscated `--model`: token ids are mapped through its tau before the
    /// forward pass, as the client sends them (features are then the provider's view).
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

/// The given-answer task of `--data` / `--task`.
fn given_task(data: &str, task: Option<&str>) -> Result<GivenTask> {
    let name = task.unwrap_or(data);
    GivenTask::parse(name)
        .or(if task.is_none() {
            Some(GivenTask::Qa)
        } else {
            None
        })
        .ok_or_else(|| {
            HaluError::Input(format!(
                "unknown task `{name}` (halueval-qa, halueval-dialogue, halueval-summarization)"
            ))
        })
}

pub fn run_extract(a: &ExtractArgs) -> Result<crate::extract::ExtractSummary> {
    let task = given_task(&a.data, a.task.as_deref())?;
    let rows = load_given(task, &resolve_data(&a.data)?)?;
    let mpath = resolve_model(&a.model)?;
    let (model, tok) = load_model(&mpath)?;
    let job = ExtractJob {
        data: a.data.clone(),
        model_path: mpath.display().to_string(),
        limit: a.limit,
        seed: a.seed,
        chunk_rows: a.chunk_rows,
        cfg: a.opts.config(task.layout()),
        token_map: token_map_for(&mpath, a.key.as_deref())?,
    };
    let pb = Progress::maybe(a.quiet, 0, "extract");
    let s = run_extraction(&model, &tok, &rows, &job, &a.out, &pb)?;
    pb.finish();
    println!(
        "extracted {} rows -> {} triples in {} ({} chunks written, {} resumed) in {:.1}s",
        s.rows,
        s.triples,
        a.out.display(),
        s.chunks_written,
        s.chunks_skipped,
        s.seconds
    );
    Ok(s)
}

/// `umbra halluc bench`
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long, default_value = "halueval-qa")]
    pub data: String,
    /// HaluEval rows timed (each: one prompt pass and two answer passes).
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    #[command(flatten)]
    pub opts: ExtractOpts,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_bench(a: &BenchArgs) -> Result<crate::bench::BenchReport> {
    let rows = load_halueval_qa(&resolve_data(&a.data)?)?;
    let (model, tok) = load_model(&resolve_model(&a.model)?)?;
    let r = crate::bench::bench_taps(&model, &tok, &rows, a.rows, a.opts.config(Layout::Qa))?;
    println!("{}", r.table());
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    Ok(r)
}
