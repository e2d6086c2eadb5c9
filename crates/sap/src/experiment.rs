//! One SAP setting end to end (fine-tune through the split, evaluate, attack) on prepared data,
//! and the flat report that `--json` writes.
use crate::attack::{self, Attribute, LearnedInverter};
use crate::bert::BertEncoder;
use crate::data::{self, DataSpec, Sizes, TextDataset, WordPiece};
use crate::error::{Result, SapError};
use crate::privacy::{Cti, Privacy, Privatizer};
use crate::split::{self, Customer, CustomerData, TrainConfig, VendorResult};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything the customer has prepared once and reuses across settings: the model, the
/// tokenised data, clean cut-layer outputs for every split point needed, and CTI statistics.
pub struct Prepared {
    pub model_dir: PathBuf,
    pub enc: BertEncoder,
    pub tok: WordPiece,
    pub data: TextDataset,
    pub train_ids: Vec<Vec<u32>>,
    pub test_ids: Vec<Vec<u32>>,
    pub public_ids: Vec<Vec<u32>>,
    /// split -> (train, test, public) clean cut outputs.
    pub cuts: BTreeMap<usize, [Vec<Vec<f32>>; 3]>,
    pub cti: Cti,
    /// Seconds the customer spent on its frozen bottom per split (train part only).
    pub cut_s: BTreeMap<usize, f64>,
}

/// What to prepare.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrepareConfig {
    pub model: Option<PathBuf>,
    pub data: String,
    pub sizes: Sizes,
    pub max_len: usize,
    pub splits: Vec<usize>,
    pub cti_floor: f64,
    pub seed: u64,
}

/// The model folder: `--model` or the `minilm` asset.
pub fn model_dir(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => Ok(umbra_assets::Cache::from_env()?.require(umbra_assets::Asset::MiniLm)?),
    }
}

impl Prepared {
    pub fn new(cfg: &PrepareConfig) -> Result<Self> {
        let dir = model_dir(&cfg.model)?;
        let enc = BertEncoder::load(&dir, &candle_core::Device::Cpu)?;
        let tok = WordPiece::load(&dir, cfg.max_len)?;
        let data = data::load(&DataSpec::parse(&cfg.data)?, cfg.sizes, cfg.seed)?;
        let train_ids = tok.encode_all(&data.train)?;
        let test_ids = tok.encode_all(&data.test)?;
        let public_ids = tok.encode_all(&data.public)?;
        let labels: Vec<usize> = data.train.iter().map(|e| e.label).collect();
        let cti = Cti::fit(
            &train_ids,
            &labels,
            data.classes.len(),
            enc.config.vocab_size,
            cfg.cti_floor,
        )?;
        let mut ks: Vec<usize> = cfg.splits.clone();
        ks.push(0); // the attacks' targets and the centralized baseline
        ks.sort_unstable();
        ks.dedup();
        let kmax = *ks.last().unwrap_or(&0);
        let cust = Customer::new(&enc, kmax)?;
        let t0 = std::time::Instant::now();
        let mut tr = cust.cut_outputs_at(&train_ids, 32, &ks)?;
        let train_s = t0.elapsed().as_secs_f64();
        let mut te = cust.cut_outputs_at(&test_ids, 32, &ks)?;
        let mut pu = cust.cut_outputs_at(&public_ids, 32, &ks)?;
        let mut cuts = BTreeMap::new();
        let mut cut_s = BTreeMap::new();
        for (j, &k) in ks.iter().enumerate().rev() {
            cuts.insert(k, [tr.remove(j), te.remove(j), pu.remove(j)]);
            // the one-pass cost is shared; charge each split its share of blocks
            cut_s.insert(k, train_s * (k as f64 + 0.3) / (kmax as f64 + 0.3));
        }
        Ok(Prepared {
            model_dir: dir,
            enc,
            tok,
            data,
            train_ids,
            test_ids,
            public_ids,
            cuts,
            cti,
            cut_s,
        })
    }
}

/// One setting.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    pub privacy: Privacy,
    pub eta: f64,
    pub train: TrainConfig,
    /// Test sequences the attacks are scored on.
    pub attack_n: usize,
    pub attribute: Attribute,
}

/// The flat `--json` report of one run. Attack fields are `null` for the centralized baseline
/// (nothing leaves the customer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub privacy: Privacy,
    pub eta: f64,
    pub split_at: usize,
    /// Test accuracy (fraction).
    pub test_acc: f64,
    /// `1 - max(token recovery)` of the inversion attacks (fraction).
    pub empirical_privacy: Option<f64>,
    /// Token recovery of nearest neighbour against the embedding table (k = 0 only).
    pub recovery_nn: Option<f64>,
    /// Token recovery of the learned inverter.
    pub recovery_learned: Option<f64>,
    /// ROC AUC of the attribute-inference attack.
    pub attribute_auc: Option<f64>,
    /// Training samples per second including the customer's frozen bottom.
    pub samples_per_s: f64,
    /// Bytes on the wire, both directions (0 when centralized).
    pub bytes: u64,
    pub train_s: f64,
    pub n_train: usize,
    pub n_test: usize,
    pub epochs: usize,
    pub final_loss: f64,
}

/// Attack results.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackResult {
    pub recovery_nn: Option<f64>,
    pub recovery_learned: f64,
    pub attribute_auc: f64,
}

impl AttackResult {
    pub fn empirical_privacy(&self) -> f64 {
        1.0 - self.recovery_learned.max(self.recovery_nn.unwrap_or(0.0))
    }
}

/// The mechanism the vendor assumes when it trains its attacks: it knows the kind and nominal
/// budget, not the customer's private CTI statistics.
fn attacker_mechanism(privacy: Privacy, eta: f64) -> Result<Privatizer> {
    let p = match privacy {
        Privacy::DchiCti => Privacy::Dchi,
        Privacy::Centralized => Privacy::None,
        p => p,
    };
    Privatizer::new(p, eta, None)
}

/// Runs the vendor's attacks on what it observed of the test set. `truth_ids`/`truth_texts`
/// are the customer's (used only for scoring).
#[allow(clippy::too_many_arguments)]
pub fn run_attacks(
    prep: &Prepared,
    split_at: usize,
    privacy: Privacy,
    eta: f64,
    observed: &[(Vec<u32>, Vec<f32>)],
    truth_ids: &[Vec<u32>],
    truth_texts: &[String],
    attribute: &Attribute,
    attack_n: usize,
    seed: u64,
) -> Result<AttackResult> {
    let d = prep.enc.hidden();
    let [_, _, public] = prep
        .cuts
        .get(&split_at)
        .ok_or_else(|| SapError::Config(format!("split {split_at} was not prepared")))?;
    let [_, _, public0] = prep
        .cuts
        .get(&0)
        .ok_or_else(|| SapError::Config("split 0 was not prepared".into()))?;
    if public.is_empty() {
        return Err(SapError::Config(
            "the attacks need public text (--public > 0)".into(),
        ));
    }
    // the observations, flattened, for the first attack_n sequences
    let mut lengths = Vec::new();
    let mut rows = Vec::new();
    for (l, r) in observed {
        lengths.extend_from_slice(l);
        rows.extend_from_slice(r);
    }
    let n = attack_n.min(lengths.len()).min(truth_ids.len());
    let nrows: usize = lengths[..n].iter().map(|&l| l as usize).sum();
    let lengths = &lengths[..n];
    let rows = &rows[..nrows * d];
    let truth: Vec<u32> = truth_ids[..n].concat();
    if truth.len() != nrows {
        return Err(SapError::Message(
            "observed sequence lengths do not match the customer's test set".into(),
        ));
    }
    let pos = attack::positions_of(lengths);
    let special = prep.tok.special_ids();
    // 1. nearest neighbour against the public embedding layer (k = 0)
    let recovery_nn = if split_at == 0 {
        let pred = attack::nn_decode(&prep.enc, rows, &pos)?;
        Some(attack::recovery(&pred, &truth, &special))
    } else {
        None
    };
    // 2. learned inverter trained on privatized public text
    let mech = attacker_mechanism(privacy, eta)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa77ac);
    let mut xp = Vec::new();
    let mut yp = Vec::new();
    let mut plen = Vec::new();
    for ((ids, x), y) in prep.public_ids.iter().zip(public).zip(public0) {
        let mut x = x.clone();
        mech.apply(&mut x, ids, d, &mut rng)?;
        xp.extend(x);
        yp.extend_from_slice(y);
        plen.push(ids.len() as u32);
    }
    let inv = LearnedInverter::fit(&xp, &yp, d, 1e-3)?;
    let mapped = inv.map(rows)?;
    let pred = attack::nn_decode(&prep.enc, &mapped, &pos)?;
    let recovery_learned = attack::recovery(&pred, &truth, &special);
    // 3. attribute inference
    let pub_attr: Vec<bool> = prep
        .data
        .public
        .iter()
        .map(|e| attribute.of(&e.text))
        .collect();
    let probe = attack::fit_probe(&attack::mean_rows(&xp, &plen, d), &pub_attr, d, 1e-2)?;
    let scores = attack::probe_scores(&probe, &attack::mean_rows(rows, lengths, d), d);
    let test_attr: Vec<bool> = truth_texts[..n].iter().map(|t| attribute.of(t)).collect();
    let attribute_auc = attack::auc(&scores, &test_attr);
    Ok(AttackResult {
        recovery_nn,
        recovery_learned,
        attribute_auc,
    })
}

/// Runs one setting: split fine-tuning over the in-process transport (or the centralized
/// baseline), test accuracy, and the attacks on what the vendor saw.
pub fn run_one(prep: &Prepared, spec: &RunSpec) -> Result<(RunReport, Option<VendorResult>)> {
    let k = if spec.privacy == Privacy::Centralized {
        0
    } else {
        spec.train.split_at
    };
    let [tr, te, _] = prep
        .cuts
        .get(&k)
        .ok_or_else(|| SapError::Config(format!("split {k} was not prepared")))?;
    let train_labels: Vec<usize> = prep.data.train.iter().map(|e| e.label).collect();
    let test_labels: Vec<usize> = prep.data.test.iter().map(|e| e.label).collect();
    let cd = CustomerData {
        train_ids: &prep.train_ids,
        train_cut: tr,
        train_labels: &train_labels,
        test_ids: &prep.test_ids,
        test_cut: te,
        test_labels: &test_labels,
        classes: prep.data.classes.len(),
        hidden: prep.enc.hidden(),
    };
    let n_train = tr.len();
    let samples = (n_train * spec.train.epochs) as f64;
    let cut_s = prep.cut_s.get(&k).copied().unwrap_or(0.0);
    if spec.privacy == Privacy::Centralized {
        let (acc, train_s) = split::run_centralized(&prep.enc, &cd, &spec.train)?;
        let rep = RunReport {
            privacy: spec.privacy,
            eta: spec.eta,
            split_at: 0,
            test_acc: acc,
            empirical_privacy: None,
            recovery_nn: None,
            recovery_learned: None,
            attribute_auc: None,
            samples_per_s: samples / (train_s + cut_s).max(1e-9),
            bytes: 0,
            train_s,
            n_train,
            n_test: te.len(),
            epochs: spec.train.epochs,
            final_loss: f64::NAN,
        };
        return Ok((rep, None));
    }
    let cti = (spec.privacy == Privacy::DchiCti).then(|| prep.cti.clone());
    let p = Privatizer::new(spec.privacy, spec.eta, cti)?;
    let cfg = TrainConfig {
        split_at: k,
        ..spec.train.clone()
    };
    let (c, v) = split::run_split_inproc(&prep.enc, &cd, &p, &cfg)?;
    let texts: Vec<String> = prep.data.test.iter().map(|e| e.text.clone()).collect();
    let a = run_attacks(
        prep,
        k,
        spec.privacy,
        spec.eta,
        &v.observed_eval,
        &prep.test_ids,
        &texts,
        &spec.attribute,
        spec.attack_n,
        spec.train.seed,
    )?;
    let rep = RunReport {
        privacy: spec.privacy,
        eta: spec.eta,
        split_at: k,
        test_acc: c.test_acc,
        empirical_privacy: Some(a.empirical_privacy()),
        recovery_nn: a.recovery_nn,
        recovery_learned: Some(a.recovery_learned),
        attribute_auc: Some(a.attribute_auc),
        samples_per_s: samples / (c.train_s + cut_s).max(1e-9),
        bytes: c.bytes,
        train_s: c.train_s,
        n_train,
        n_test: te.len(),
        epochs: spec.train.epochs,
        final_loss: c.final_loss,
    };
    Ok((rep, Some(v)))
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    crate::error::write_atomic(path, &serde_json::to_vec_pretty(value)?)
}
