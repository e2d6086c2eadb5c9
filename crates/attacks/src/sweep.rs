//! Privacy-vs-accuracy sweep: obfuscate at every grid point, run the attacks and the fidelity
//! evaluation, and write `sweep.json`, `report.md` and `frontier.svg` (TTRSR vs top-1 agreement).
use crate::error::{AttackError, Result};
use crate::suite::{run_one, AttackKind, AttackResult, Streams, SuiteConfig};
use crate::target::Target;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use umbra_aloepri::fidelity::{evaluate, FidelityOptions};
use umbra_aloepri::source::CheckpointSource;
use umbra_aloepri::ObfuscationParams;

/// A grid such as `alpha_e=0,0.5,1;h=32,128;lambda=0,0.3` over the paper's defaults; keys:
/// `alpha_e`, `alpha_h`, `h`, `lambda`, `beta`, `junk` (0/1). Returns every combination with a
/// label like `alpha_e=0.5,h=32,lambda=0`.
pub fn parse_grid(spec: &str) -> Result<Vec<(String, ObfuscationParams)>> {
    let bad = |m: String| AttackError::Input(format!("grid: {m}"));
    let mut axes: Vec<(String, Vec<f64>)> = vec![];
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, vals) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}` is not key=v1,v2")))?;
        let k = k.trim().to_string();
        if !["alpha_e", "alpha_h", "h", "lambda", "beta", "junk"].contains(&k.as_str()) {
            return Err(bad(format!("unknown key `{k}`")));
        }
        let vals = vals
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| bad(format!("`{v}` is not a number")))
            })
            .collect::<Result<Vec<_>>>()?;
        if vals.is_empty() {
            return Err(bad(format!("`{k}` has no values")));
        }
        axes.push((k, vals));
    }
    let mut points = vec![(String::new(), ObfuscationParams::paper())];
    for (k, vals) in &axes {
        let mut next = vec![];
        for (label, p) in &points {
            for &v in vals {
                let mut q = *p;
                match k.as_str() {
                    "alpha_e" => q.alpha_e = v,
                    "alpha_h" => q.alpha_h = v,
                    "h" => q.h = v as usize,
                    "lambda" => q.lambda = v,
                    "beta" => q.beta = v as usize,
                    _ => q.junk = v != 0.0,
                }
                q.validate()?;
                let l = if label.is_empty() {
                    format!("{k}={v}")
                } else {
                    format!("{label},{k}={v}")
                };
                next.push((l, q));
            }
        }
        points = next;
    }
    Ok(points)
}

/// One grid point's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub label: String,
    pub params: ObfuscationParams,
    pub top1_agreement: f64,
    pub ppl_ratio: f64,
    pub attacks: BTreeMap<String, AttackResult>,
    pub obfuscate_seconds: f64,
}

/// What the sweep needs besides the grid.
pub struct SweepSetup<'a> {
    pub plain: &'a Path,
    pub out: &'a Path,
    pub attacks: Vec<AttackKind>,
    pub suite: SuiteConfig,
    /// Fidelity sequences (plaintext ids).
    pub fidelity_seqs: Vec<Vec<u32>>,
    /// TFMA texts: client side and attacker side (plaintext ids).
    pub client: Vec<Vec<u32>>,
    pub public: Vec<Vec<u32>>,
    pub seed: u64,
    pub keep: bool,
}

/// Runs the sweep; writes the JSON after every point and the report at the end.
pub fn run(grid: &[(String, ObfuscationParams)], s: &SweepSetup) -> Result<Vec<SweepPoint>> {
    let dev = candle_core::Device::Cpu;
    let plain_model = CheckpointSource::open(s.plain)?.load_model(&dev)?;
    let mut points = vec![];
    for (i, (label, params)) in grid.iter().enumerate() {
        eprintln!("[{}/{}] {label}", i + 1, grid.len());
        let dir: PathBuf = s.out.join("points").join(format!("p{i}"));
        let key_path = s.out.join("points").join(format!("p{i}.key"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&key_path);
        let t0 = std::time::Instant::now();
        let seed = s.seed.wrapping_add(i as u64);
        umbra_aloepri::compiler::compile_checkpoint(
            s.plain,
            &dir,
            &key_path,
            params,
            seed,
            &mut |_, _, _| {},
        )?;
        let obfuscate_seconds = t0.elapsed().as_secs_f64();
        let key = umbra_aloepri::ClientKey::load(&key_path)?;
        let tau = key.permutation()?;
        let target = Target::open(s.plain, &dir)?;
        let streams = Streams::simulate(&s.client, &s.public, &tau)?;
        let mut suite = s.suite.clone();
        suite.hat.assume_alpha_h = params.alpha_h;
        let mut attacks = BTreeMap::new();
        for &k in &s.attacks {
            let r = run_one(k, &target, Some(&streams), &tau, &suite)?;
            eprintln!(
                "  {:5} ttrsr {:.4}  ({:.1}s)",
                k.name(),
                r.score.ttrsr,
                r.seconds
            );
            attacks.insert(k.name().to_string(), r);
        }
        drop(target);
        let obf_model = CheckpointSource::open(&dir)?.load_model(&dev)?;
        let opts = FidelityOptions {
            greedy_prompts: 0,
            ..FidelityOptions::default()
        };
        let f = evaluate(
            &plain_model,
            &obf_model,
            &tau,
            &s.fidelity_seqs,
            &opts,
            &mut |_, _| {},
        )?;
        eprintln!(
            "  top1 {:.4}  ppl ratio {:.3}",
            f.top1_agreement, f.ppl_ratio
        );
        if !s.keep {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&key_path);
        }
        points.push(SweepPoint {
            label: label.clone(),
            params: *params,
            top1_agreement: f.top1_agreement,
            ppl_ratio: f.ppl_ratio,
            attacks,
            obfuscate_seconds,
        });
        let json =
            serde_json::to_vec_pretty(&points).map_err(|e| AttackError::Input(e.to_string()))?;
        umbra_common::fs::write_atomic(&s.out.join("sweep.json"), &json)?;
    }
    umbra_common::fs::write_atomic(
        &s.out.join("report.md"),
        markdown(&points, &s.attacks).as_bytes(),
    )?;
    #[cfg(feature = "plot")]
    umbra_common::fs::write_atomic(
        &s.out.join("frontier.svg"),
        frontier_svg(&points, &s.attacks)?.as_bytes(),
    )?;
    Ok(points)
}

/// The Markdown table of a sweep.
pub fn markdown(points: &[SweepPoint], attacks: &[AttackKind]) -> String {
    let mut s = String::from("# Privacy vs accuracy sweep\n\n![frontier](frontier.svg)\n\n");
    s += "TTRSR = share of tau's entries recovered (top-1); top-1 = next-token agreement with the plaintext model.\n\n";
    s += "| point | top-1 | ppl ratio |";
    for a in attacks {
        s += &format!(" {} TTRSR |", a.name());
    }
    s += "\n|---|---|---|";
    for _ in attacks {
        s += "---|";
    }
    s += "\n";
    for p in points {
        s += &format!(
            "| {} | {:.4} | {:.3} |",
            p.label, p.top1_agreement, p.ppl_ratio
        );
        for a in attacks {
            match p.attacks.get(a.name()) {
                Some(r) => s += &format!(" {:.4} |", r.score.ttrsr),
                None => s += " - |",
            }
        }
        s += "\n";
    }
    s += "\nData: `sweep.json`.\n";
    s
}

/// SVG scatter: x = top-1 agreement, y = TTRSR, one colour per attack
/// ([`umbra_common::plot`]; feature `plot`).
#[cfg(feature = "plot")]
pub fn frontier_svg(points: &[SweepPoint], attacks: &[AttackKind]) -> Result<String> {
    use umbra_common::plot::{Figure, Panel, Series, Style};
    let series = attacks
        .iter()
        .map(|a| Series {
            name: a.name().to_string(),
            points: points
                .iter()
                .filter_map(|p| {
                    p.attacks
                        .get(a.name())
                        .map(|r| (p.top1_agreement, r.score.ttrsr))
                })
                .collect(),
            style: Style::Points,
        })
        .collect();
    Ok(Figure::single(Panel {
        title: "privacy vs accuracy (each point: one grid setting)".into(),
        x_label: "top-1 agreement with plaintext".into(),
        y_label: "TTRSR (tau entries recovered)".into(),
        x_range: (0.0, 1.02),
        y_range: (0.0, 1.02),
        series,
    })
    .svg()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_a_cartesian_product_over_paper_defaults() {
        let g = parse_grid("alpha_e=0,1;h=32").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].0, "alpha_e=0,h=32");
        assert_eq!(g[0].1.alpha_e, 0.0);
        assert_eq!(g[1].1.h, 32);
        assert_eq!(g[1].1.lambda, 0.3);
        assert!(parse_grid("bogus=1").is_err());
        assert!(parse_grid("h=3").is_err()); // odd h fails validation
        assert!(parse_grid("alpha_e=x").is_err());
    }

    #[test]
    fn report_and_figure_render() {
        let mut attacks = BTreeMap::new();
        attacks.insert(
            "hat".to_string(),
            AttackResult {
                kind: Some(AttackKind::Hat),
                score: crate::score::Score {
                    ttrsr: 0.5,
                    top10: 0.6,
                    coverage: 1.0,
                },
                seconds: 1.0,
                extra: BTreeMap::new(),
            },
        );
        let p = SweepPoint {
            label: "alpha_e=0".into(),
            params: ObfuscationParams::paper(),
            top1_agreement: 0.9,
            ppl_ratio: 1.1,
            attacks,
            obfuscate_seconds: 1.0,
        };
        let md = markdown(std::slice::from_ref(&p), &[AttackKind::Hat]);
        assert!(
            md.contains("| alpha_e=0 | 0.9000 | 1.100 | 0.5000 |"),
            "{md}"
        );
        #[cfg(feature = "plot")]
        {
            let svg = frontier_svg(&[p], &[AttackKind::Hat]).unwrap();
            assert!(svg.contains("<svg") && svg.contains("circle"));
        }
    }
}
