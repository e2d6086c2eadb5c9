//! `umbra attack ...`: clap arguments and the functions `crates/cli` delegates to.
use crate::error::{AttackError, Result};
use crate::hat::HatConfig;
use crate::ia::IaConfig;
use crate::ima::{ImaConfig, Reference};
use crate::isa::IsaConfig;
use crate::sda::SdaConfig;
use crate::states::StateLayer;
use crate::suite::{load_texts, run_one, AttackKind, AttackResult, Streams, SuiteConfig};
use crate::sweep::{parse_grid, SweepSetup};
use crate::target::Target;
use crate::vma::VmaConfig;
use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use umbra_common::fs::write_atomic;
use umbra_model::checkpoint::Checkpoint;
use umbra_model::tokenizer::TextTokenizer;

#[derive(Subcommand)]
pub enum AttackCommand {
    /// Vocabulary matching: sorted rows of key-free weight products, voting across layers.
    Vma(AttackArgs),
    /// Invariant attack: gate mean/std and attention self-scores per layer.
    Ia(AttackArgs),
    /// Nearest neighbour between embedding rows (beaten by any key).
    Nn(AttackArgs),
    /// Column space of the LM head (key-free hat matrix), bootstrap + Procrustes + ridge.
    Hat(AttackArgs),
    /// Token-frequency matching on the obfuscated id stream (needs a corpus).
    Tfma(AttackArgs),
    /// Substitution-cipher decoding of the id stream: TFMA start + bigram-LM hill climbing.
    Sda(AttackArgs),
    /// Learned inversion: ridge inverter from the attacker's own labelled states to tokens.
    Ima(AttackArgs),
    /// Internal-state attack: plaintext-model states matched to the observed ones (ICP alignment).
    Isa(AttackArgs),
    /// Block-key attack: the residual key of an exact (isometric) obfuscation from the blocks'
    /// head-summed q k^T and v o products, then nearest neighbours through it.
    Blockkey(AttackArgs),
    /// Every attack above, one after the other, printing each one's time.
    All(AttackArgs),
    /// Split mode (`umbra obfuscate --split`): the server, holding only the blocks, recovers the
    /// block key and reads the prompts from the input embeddings it is sent.
    Split(SplitAttackArgs),
    /// Obfuscate over a parameter grid, attack and measure fidelity; Markdown report + figure.
    Sweep(SweepArgs),
}

#[derive(Args, Clone)]
pub struct KnobArgs {
    /// Texts for TFMA, SDA, IMA, ISA (one per line); HaluEval QA passages when omitted. The first half is the
    /// client's traffic, the second half the attacker's public text.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Passages read for TFMA/SDA (IMA/ISA use the first --victims and --ref-texts of them).
    #[arg(long, default_value_t = 4000)]
    pub texts: usize,
    /// Layers whose gate products vote in VMA (comma-separated; `none` for the head only).
    #[arg(long, default_value = "0")]
    pub vma_layers: String,
    /// Layers IA uses (comma-separated); every 4th layer when omitted.
    #[arg(long)]
    pub ia_layers: Option<String>,
    /// Hat attack: bootstrap anchors kept.
    #[arg(long, default_value_t = 2000)]
    pub anchors: usize,
    /// Hat attack: obfuscated rows whose hat signatures are computed.
    #[arg(long, default_value_t = 8192)]
    pub pool: usize,
    /// Hat attack: head noise simulated on the plaintext head; the paper's 0.2 unless the
    /// obfuscated config declares exact mode (then 0).
    #[arg(long)]
    pub assume_alpha_h: Option<f64>,
    /// Hat attack: ridge refinement rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// SDA: plaintext ids tried per cipher id (frequency-rank window).
    #[arg(long, default_value_t = 100)]
    pub sda_window: usize,
    /// SDA: hill-climbing sweeps.
    #[arg(long, default_value_t = 8)]
    pub sda_sweeps: usize,
    /// Seconds each budgeted attack may spend on its search (SDA hill climbing); no limit when
    /// omitted.
    #[arg(long)]
    pub budget: Option<f64>,
    /// IMA/ISA: observed state, `emb` (embedding output) or a block index (output of that block).
    #[arg(long, default_value = "0")]
    pub state_layer: String,
    /// IMA/ISA: victim prompts attacked (from the client half of the corpus).
    #[arg(long, default_value_t = 64)]
    pub victims: usize,
    /// IMA/ISA: attacker texts run through its models (from the public half).
    #[arg(long, default_value_t = 256)]
    pub ref_texts: usize,
    /// IMA/ISA: tokens kept per prompt / text.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// IMA: where the inverter's labelled states come from: `auto` (the attacker's own key for
    /// umbra checkpoints, the plaintext model otherwise) or `plain`.
    #[arg(long, default_value = "auto")]
    pub ima_reference: String,
    /// ISA: ICP alignment rounds.
    #[arg(long, default_value_t = 3)]
    pub isa_rounds: usize,
    /// Candidates kept per id (top-k recovery is reported for k = 10).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Seed of the attacker's own random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Clone)]
pub struct AttackArgs {
    /// Public plaintext model folder (or `smollm2`).
    #[arg(long)]
    pub plain: String,
    /// Obfuscated model folder.
    #[arg(long)]
    pub obfuscated: PathBuf,
    /// Client key: used only to score the attack, never by it.
    #[arg(long)]
    pub key: PathBuf,
    #[command(flatten)]
    pub knobs: KnobArgs,
    /// Write `{attack: {ttrsr, top10, coverage, seconds, ...}}` as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct SweepArgs {
    #[arg(long)]
    pub plain: String,
    /// `key=v1,v2;key=...` over the paper's defaults (alpha_e, alpha_h, h, lambda, beta, junk).
    #[arg(long)]
    pub grid: String,
    /// Report folder: sweep.json, report.md, frontier.svg (checkpoints under points/, deleted
    /// after each point unless --keep).
    #[arg(long)]
    pub out: PathBuf,
    /// Attacks to run (comma-separated).
    #[arg(long, default_value = "nn,tfma,ia,vma,hat")]
    pub attacks: String,
    /// Fidelity passages (HaluEval QA) per point, 128 tokens each.
    #[arg(long, default_value_t = 20)]
    pub fidelity_texts: usize,
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

#[derive(Args, Clone)]
pub struct SplitAttackArgs {
    /// Public plaintext model folder (or `smollm2`).
    #[arg(long)]
    pub plain: String,
    /// Output folder of `umbra obfuscate --split`: the attacker holds `server/`; `client/` is
    /// read only to simulate the embeddings the client sends.
    #[arg(long)]
    pub split: PathBuf,
    /// Client key: used only to simulate the traffic and score the attack, never by it.
    #[arg(long)]
    pub key: PathBuf,
    /// Victim prompts, one per line; HaluEval QA passages when omitted.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Victim prompts sent to the server.
    #[arg(long, default_value_t = 64)]
    pub victims: usize,
    /// Tokens kept per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Candidates kept per position (top-10 is reported).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write `{"split": {ttrsr, top10, token_ttrsr, bleu4, seconds, ...}}` as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_layers(s: &str, n: usize) -> Result<Vec<usize>> {
    if s.trim() == "none" || s.trim().is_empty() {
        return Ok(vec![]);
    }
    s.split(',')
        .map(|x| {
            let l: usize = x
                .trim()
                .parse()
                .map_err(|_| AttackError::Input(format!("`{x}` is not a layer index")))?;
            if l >= n {
                return Err(AttackError::Input(format!("layer {l} >= {n} layers")));
            }
            Ok(l)
        })
        .collect()
}

impl KnobArgs {
    /// The attack configuration for a model with `layers` layers.
    pub fn suite(&self, layers: usize, exact_declared: bool) -> Result<SuiteConfig> {
        let ia_layers = match &self.ia_layers {
            Some(s) => parse_layers(s, layers)?,
            None => (0..layers).step_by(4).collect(),
        };
        Ok(SuiteConfig {
            vma: VmaConfig {
                gate_layers: parse_layers(&self.vma_layers, layers)?,
                k: self.k,
                ..VmaConfig::default()
            },
            hat: HatConfig {
                anchors: self.anchors,
                pool: self.pool,
                assume_alpha_h: self.assume_alpha_h.unwrap_or(if exact_declared {
                    0.0
                } else {
                    0.2
                }),
                rounds: self.rounds,
                k: self.k,
                seed: self.seed,
                ..HatConfig::default()
            },
            ia: IaConfig {
                layers: ia_layers,
                k: self.k,
            },
            sda: SdaConfig {
                window: self.sda_window,
                sweeps: self.sda_sweeps,
                k: self.k,
                budget_s: self.budget,
                ..SdaConfig::default()
            },
            ima: ImaConfig {
                layer: StateLayer::parse(&self.state_layer)?,
                reference: match self.ima_reference.as_str() {
                    "auto" => None,
                    "plain" => Some(Reference::Plain),
                    x => {
                        return Err(AttackError::Input(format!(
                            "--ima-reference `{x}`: expected auto or plain"
                        )))
                    }
                },
                seed: self.seed ^ 0x1a7a,
                k: self.k,
                ..ImaConfig::default()
            },
            isa: IsaConfig {
                layer: StateLayer::parse(&self.state_layer)?,
                rounds: self.isa_rounds,
                k: self.k,
            },
            victims: self.victims,
            ref_texts: self.ref_texts,
            max_len: self.max_len,
            k: self.k,
            seed: self.seed,
        })
    }
}

/// A model path, or a model asset name (`smollm2`, the Qwen2.5 GGUFs):
/// [`umbra_aloepri::cli::resolve_model`].
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(umbra_aloepri::cli::resolve_model(spec)?)
}

fn tokenizer(plain: &Path) -> Result<TextTokenizer> {
    Checkpoint::open_config_and_tokenizer(plain)?
        .1
        .ok_or_else(|| AttackError::Input(format!("{}: no tokenizer", plain.display())))
}

/// Tokenised passages (plaintext ids).
type IdTexts = Vec<Vec<u32>>;

/// Client and attacker halves of the corpus as plaintext ids.
fn corpus_halves(
    tok: &TextTokenizer,
    corpus: Option<&Path>,
    n: usize,
) -> Result<(IdTexts, IdTexts)> {
    let texts = load_texts(corpus, n)?;
    let ids = texts
        .iter()
        .map(|t| tok.encode(t, false).map_err(AttackError::from))
        .collect::<Result<Vec<_>>>()?;
    let half = ids.len() / 2;
    let public = ids[half..].to_vec();
    let mut client = ids;
    client.truncate(half);
    Ok((client, public))
}

fn print_table(results: &[(String, AttackResult)]) {
    println!("| attack | TTRSR | top-10 | coverage | seconds | extra |");
    println!("|---|---|---|---|---|---|");
    for (n, r) in results {
        let extra: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!(
            "| {n} | {:.4} | {:.4} | {:.4} | {:.1} | {} |",
            r.score.ttrsr,
            r.score.top10,
            r.score.coverage,
            r.seconds,
            extra.join(", ")
        );
    }
}

/// Runs `kinds` against one obfuscated checkpoint, prints a table and writes the JSON.
pub fn run_attacks(kinds: &[AttackKind], a: &AttackArgs) -> Result<Vec<(String, AttackResult)>> {
    let plain = resolve_model(&a.plain)?;
    let key = umbra_aloepri::ClientKey::load(&a.key)?;
    let t0 = std::time::Instant::now();
    let target = Target::open(&plain, &a.obfuscated)?;
    umbra_aloepri::compiler::check_key(&target.obf_cfg, &key)?;
    let tau = key.permutation()?;
    eprintln!(
        "opened both checkpoints in {:.1}s (tensors are read as the attacks need them)",
        t0.elapsed().as_secs_f64()
    );
    let suite = a.knobs.suite(target.layers(), target.declared_exact())?;
    let needs_text = |k: &AttackKind| {
        matches!(
            k,
            AttackKind::Tfma | AttackKind::Sda | AttackKind::Ima | AttackKind::Isa
        )
    };
    let streams = if kinds.iter().any(needs_text) {
        let tok = tokenizer(&plain)?;
        let (client, public) = corpus_halves(&tok, a.knobs.corpus.as_deref(), a.knobs.texts)?;
        let mut s = Streams::simulate(&client, &public, &tau)?;
        s.pii = crate::suite::pii_mask(target.vocab(), |i| tok.id_to_token(i));
        Some(s)
    } else {
        None
    };
    let mut results = vec![];
    for &k in kinds {
        let r = run_one(k, &target, streams.as_ref(), &tau, &suite)?;
        eprintln!(
            "{:5} TTRSR {:.4}  top-10 {:.4}  {:.1}s",
            k.name(),
            r.score.ttrsr,
            r.score.top10,
            r.seconds
        );
        results.push((k.name().to_string(), r));
    }
    report(&results, a.json.as_deref())?;
    Ok(results)
}

/// Prints the results table and writes `{attack: result}` to `json` when given.
fn report(results: &[(String, AttackResult)], json: Option<&Path>) -> Result<()> {
    print_table(results);
    if let Some(j) = json {
        let map: BTreeMap<&str, &AttackResult> =
            results.iter().map(|(n, r)| (n.as_str(), r)).collect();
        let bytes =
            serde_json::to_vec_pretty(&map).map_err(|e| AttackError::Input(e.to_string()))?;
        write_atomic(j, &bytes)?;
    }
    Ok(())
}

/// `umbra attack split`: simulates the client's traffic (harness, with the key) and runs the
/// server's attack on it (no key).
pub fn run_split(a: &SplitAttackArgs) -> Result<AttackResult> {
    use candle_core::{Device, Tensor};
    use umbra_model::llama::Llama;
    let plain = resolve_model(&a.plain)?;
    let client_dir = a.split.join(umbra_aloepri::split_parts::CLIENT_DIR);
    let server_dir = a.split.join(umbra_aloepri::split_parts::SERVER_DIR);
    let key = umbra_aloepri::ClientKey::load(&a.key)?;
    // Harness: the client part (its config proves the key; its embedding simulates the traffic).
    let client = Checkpoint::open(&client_dir)?;
    umbra_aloepri::compiler::check_key(&client.config, &key)?;
    let tau = key.permutation()?;
    let tok = tokenizer(&plain)?;
    let victims: Vec<Vec<u32>> = load_texts(a.corpus.as_deref(), a.victims)?
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t, false)?;
            ids.truncate(a.max_len);
            Ok(tau.apply(&ids)?)
        })
        .filter(|r: &Result<Vec<u32>>| r.as_ref().map_or(true, |v| !v.is_empty()))
        .collect::<Result<_>>()?;
    if victims.is_empty() {
        return Err(AttackError::Input(
            "no victim prompts (empty corpus)".into(),
        ));
    }
    // What the client sends: its embedding rows of tau(ids).
    let cm = Llama::new_part(&client.config, &client.weights, &Device::Cpu)?;
    let sent = victims.concat();
    let n = sent.len();
    let received = cm
        .embed(&Tensor::from_vec(sent, (1, n), &Device::Cpu)?)?
        .squeeze(0)?;
    drop((cm, client));
    // The attacker: public plaintext weights, the server part, the received rows.
    let p = Checkpoint::open(&plain)?;
    let s = Checkpoint::open(&server_dir)?;
    if s.config.part() != umbra_model::ModelPart::Server {
        return Err(AttackError::Input(format!(
            "{} is not the server part of a split model",
            server_dir.display()
        )));
    }
    let target = Target::from_parts(p.config, p.weights, s.config, s.weights)?;
    eprintln!(
        "split: {} prompts, {} received embedding rows of width {}",
        victims.len(),
        received.dims()[0],
        received.dims()[1]
    );
    let start = std::time::Instant::now();
    let (guesses, rep) = crate::blockkey::read_embeddings(&target, &received, a.k, a.seed)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut extra = BTreeMap::new();
    let pii = crate::suite::pii_mask(target.vocab(), |i| tok.id_to_token(i));
    let rec =
        crate::suite::position_metrics(&victims, &guesses, &tau, &pii, target.vocab(), &mut extra);
    rep.record(&mut extra);
    let r = AttackResult {
        kind: None,
        score: crate::score::score(&rec, tau.forward_table()),
        seconds,
        extra,
    };
    let results = vec![("split".to_string(), r)];
    report(&results, a.json.as_deref())?;
    Ok(results.into_iter().next().expect("one result").1)
}

/// Runs the sweep subcommand.
pub fn run_sweep(a: &SweepArgs) -> Result<()> {
    let plain = resolve_model(&a.plain)?;
    let grid = parse_grid(&a.grid)?;
    let attacks = a
        .attacks
        .split(',')
        .map(AttackKind::parse)
        .collect::<Result<Vec<_>>>()?;
    let (cfg, _) = Checkpoint::open_config_and_tokenizer(&plain)?;
    let suite = a.knobs.suite(cfg.num_hidden_layers, false)?;
    let tok = tokenizer(&plain)?;
    let (client, public) = corpus_halves(&tok, a.knobs.corpus.as_deref(), a.knobs.texts)?;
    let fid_texts = load_texts(None, a.fidelity_texts)?;
    let fidelity_seqs = fid_texts
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t, false)?;
            ids.truncate(128);
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let setup = SweepSetup {
        plain: &plain,
        out: &a.out,
        attacks,
        suite,
        fidelity_seqs,
        client,
        public,
        seed: a.knobs.seed,
        keep: a.keep,
    };
    let points = crate::sweep::run(&grid, &setup)?;
    println!("{}", crate::sweep::markdown(&points, &setup.attacks));
    println!(
        "wrote {}/sweep.json, report.md, frontier.svg",
        a.out.display()
    );
    Ok(())
}

/// Entry point for `umbra attack ...`.
pub fn run(cmd: &AttackCommand) -> Result<()> {
    let one = |k: AttackKind, a: &AttackArgs| run_attacks(&[k], a).map(|_| ());
    match cmd {
        AttackCommand::Vma(a) => one(AttackKind::Vma, a),
        AttackCommand::Ia(a) => one(AttackKind::Ia, a),
        AttackCommand::Nn(a) => one(AttackKind::Nn, a),
        AttackCommand::Hat(a) => one(AttackKind::Hat, a),
        AttackCommand::Tfma(a) => one(AttackKind::Tfma, a),
        AttackCommand::Sda(a) => one(AttackKind::Sda, a),
        AttackCommand::Ima(a) => one(AttackKind::Ima, a),
        AttackCommand::Isa(a) => one(AttackKind::Isa, a),
        AttackCommand::Blockkey(a) => one(AttackKind::BlockKey, a),
        AttackCommand::All(a) => run_attacks(&AttackKind::ALL, a).map(|_| ()),
        AttackCommand::Sweep(a) => run_sweep(a),
        AttackCommand::Split(a) => run_split(a).map(|_| ()),
    }
}
