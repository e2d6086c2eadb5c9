//! Exactness of scoring under obfuscation at full precision (feature folders store hidden
//! states in F16, which rounds differently in the two bases): extracts the first `ROWS`
//! HaluEval QA rows (seeded order, as `umbra halluc extract`) in memory from the plaintext and
//! the obfuscated model and compares the two probes' logits and scores.
//!
//! ```text
//! cargo run --release -p umbra-haluprobe --example obf_score_check -- \
//!     smollm2 probe.safetensors obf/ client.key obf/halluc-probe.safetensors 50
//! ```
//! Prints a table and one flat JSON line: `triples`, `max_abs_score_diff`,
//! `mean_abs_score_diff`, `max_abs_logit_diff`, `max_rel_logit_diff`.
use std::path::PathBuf;
use umbra_haluprobe::data::{load_halueval_qa, shuffled_indices};
use umbra_haluprobe::features::Extractor;
use umbra_haluprobe::probe::ProbeFile;
use umbra_haluprobe::score::Scorer;
use umbra_haluprobe::source::{load_model, resolve_data, resolve_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        return Err("usage: obf_score_check PLAIN PROBE OBFUSCATED KEY OBF_PROBE ROWS".into());
    }
    let rows_n: usize = a[5].parse()?;
    let plain_dir = resolve_model(&a[0])?;
    let obf_dir = PathBuf::from(&a[2]);
    let data = load_halueval_qa(&resolve_data("halueval-qa")?)?;
    let (plain, tok) = load_model(&plain_dir)?;
    let (obf, _) = load_model(&obf_dir)?;
    let p = Scorer::new(ProbeFile::load(a[1].as_ref())?, plain.config())?;
    let o = Scorer::new(ProbeFile::load(a[4].as_ref())?, obf.config())?;
    let key = umbra_aloepri::ClientKey::load(a[3].as_ref())?;
    umbra_aloepri::compiler::check_key_for(&obf_dir, &key)?;
    let ep = Extractor::new(&plain, &tok, p.probe.meta.extract.clone());
    let eo = Extractor::new(&obf, &tok, o.probe.meta.extract.clone());
    let (mut n, mut max_s, mut sum_s, mut max_l, mut max_rel) = (0usize, 0f64, 0f64, 0f64, 0f64);
    for &r in shuffled_indices(data.len(), 0).iter().take(rows_n) {
        let row = &data[r];
        let answers = [row.right_answer.as_str(), row.hallucinated_answer.as_str()];
        let fp = ep.extract(Some(&row.knowledge), &row.question, &answers)?;
        let fo = eo.extract_mapped(
            Some(&row.knowledge),
            &row.question,
            &answers,
            Some(&key.tau),
        )?;
        for (x, y) in fp.iter().zip(&fo) {
            let (lp, lo) = (p.probe.logit(x)? as f64, o.probe.logit(y)? as f64);
            let (sp, so) = (p.probe.score(x)? as f64, o.probe.score(y)? as f64);
            max_s = max_s.max((sp - so).abs());
            sum_s += (sp - so).abs();
            max_l = max_l.max((lp - lo).abs());
            max_rel = max_rel.max((lp - lo).abs() / (1.0 + lp.abs()));
            n += 1;
        }
    }
    let mean_s = sum_s / n.max(1) as f64;
    println!("| metric | value |\n|---|---|");
    println!("| triples | {n} |");
    println!("| max abs score diff | {max_s:.2e} |");
    println!("| mean abs score diff | {mean_s:.2e} |");
    println!("| max abs logit diff | {max_l:.2e} |");
    println!("| max logit diff / (1 + abs logit) | {max_rel:.2e} |");
    println!(
        "{}",
        serde_json::json!({"triples": n, "max_abs_score_diff": max_s, "mean_abs_score_diff": mean_s,
            "max_abs_logit_diff": max_l, "max_rel_logit_diff": max_rel})
    );
    Ok(())
}
