//! `umbra attack shares`: NN, IMA and ISA on one share server's recorded view.
use crate::attack::{companion, record_victims, report, Attacker, SharesReport};
use crate::error::{Result, ShareError};
use crate::fixed::Format;
use crate::model::resolve_model;
use crate::transcript::Transcript;
use std::path::PathBuf;
use umbra_model::checkpoint::Checkpoint;

/// `umbra attack shares`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttackSharesArgs {
    /// The public model the attacker holds (and the client used).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// One server's recorded view (`umbra serve --share --record FILE`).
    #[arg(long)]
    pub transcript: PathBuf,
    /// The victims' token ids, JSON `{"prompts": [[id, ...], ...]}` in the order they were sent,
    /// one prefill each (default: TRANSCRIPT.truth.json).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// The same rows unmasked, in transcript format, to show the attacks work (default:
    /// TRANSCRIPT.plain.bin when it exists).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Record the transcript first: this many HaluEval passages (victims) sent by a share
    /// client to two servers started here, server A recording (also writes the control and
    /// the truth).
    #[arg(long)]
    pub victims: Option<usize>,
    /// Tokens per victim passage.
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// Which map's inputs to attack (0 = block 0's q/k/v input: the normed embeddings).
    #[arg(long, default_value_t = 0)]
    pub map: u32,
    /// Public passages the attacker trains its inverters on (disjoint from the victims).
    #[arg(long, default_value_t = 300)]
    pub public: usize,
    #[arg(long, default_value_t = 3)]
    pub isa_rounds: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn tokenize(
    tok: &umbra_model::tokenizer::TextTokenizer,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = vec![];
    for t in texts {
        let mut ids = tok.encode(t, false)?;
        ids.truncate(max_len);
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    Ok(out)
}

/// Runs the attacks, prints the table, writes `--json`.
pub fn run_attack(a: &AttackSharesArgs) -> Result<SharesReport> {
    let path = resolve_model(&a.model)?;
    let ck = Checkpoint::open(&path)?;
    let tok = ck
        .tokenizer
        .as_ref()
        .ok_or_else(|| ShareError::Config("the model has no tokenizer".into()))?;
    let n_victims = a.victims.unwrap_or(0);
    let texts = umbra_attacks::suite::load_texts(None, n_victims + 1000 + a.public)?;
    if let Some(n) = a.victims {
        let victims = tokenize(tok, &texts[..n.min(texts.len())], a.max_len)?;
        eprintln!(
            "recording: {} victim passages through two local share servers (A records to {})",
            victims.len(),
            a.transcript.display()
        );
        record_victims(&path, &victims, &a.transcript, Format::default())?;
    }
    let public_texts: Vec<String> = texts.iter().skip(n_victims + 1000).cloned().collect();
    let public = tokenize(tok, &public_texts, a.max_len)?;
    let truth_path = a
        .truth
        .clone()
        .unwrap_or_else(|| companion(&a.transcript, ".truth.json"));
    let truth: serde_json::Value = umbra_common::fs::read_json(&truth_path)?;
    let truth: Vec<u32> = truth["prompts"]
        .as_array()
        .ok_or_else(|| ShareError::Config(format!("{}: no `prompts` array", truth_path.display())))?
        .iter()
        .flat_map(|p| p.as_array().cloned().unwrap_or_default())
        .map(|v| v.as_u64().unwrap_or(u64::MAX) as u32)
        .collect();
    let shares = Transcript::read(&a.transcript)?;
    let control_path = a
        .control
        .clone()
        .or_else(|| Some(companion(&a.transcript, ".plain.bin")).filter(|p| p.is_file()));
    let control = control_path.as_deref().map(Transcript::read).transpose()?;
    let attacker = Attacker {
        cfg: &ck.config,
        weights: &ck.weights,
        public: &public,
        isa_rounds: a.isa_rounds,
    };
    let r = report(&attacker, &shares, control.as_ref(), a.map, &truth)?;
    println!(
        "server view: map {} of {} records, {} victim tokens; chance (best constant guess) {:.4}, \
         99.9% bound {:.4}",
        a.map,
        shares.records.len(),
        r.victim_tokens,
        r.chance,
        r.chance_upper
    );
    println!("| attack | view | tokens | top-1 |");
    println!("|---|---|---|---|");
    for s in &r.scores {
        println!(
            "| {} | {} | {} | {:.4} |",
            s.attack, s.view, s.tokens, s.top1
        );
    }
    println!(
        "bytes chi-square {:.1} (255 dof, p {:.3}); bits chi-square {:.1} (127 dof, p {:.3})",
        r.bytes.statistic, r.bytes.p_value, r.bits.statistic, r.bits.p_value
    );
    if let Some(j) = &a.json {
        umbra_common::fs::write_json(j, &r)?;
    }
    Ok(r)
}
