//! Why `umbra_vfl::model` keeps its own Adam: one optimizer step on the passive party's bottom
//! model (the job defaults: 10 layers, hidden 64, embedding 32; 50 input columns), timed three
//! ways in the same run, on one thread as a worker trains:
//!
//! - `flat`: what the parameter server does per push — gradients to flat buffers, then
//!   `FlatAdam::step` (one fused loop, no tensor allocation);
//! - `vars`: `model::Adam` on candle `Var`s (single-process training: read, step, write back);
//! - `candle_nn`: `candle_nn::AdamW` (weight decay 0) on the same `Var`s.
//!
//! `cargo run --release -p umbra-vfl --example optimizer_speed [-- STEPS [JSON]]`
use candle_nn::Optimizer;
use std::time::Instant;
use umbra_vfl::data::Task;
use umbra_vfl::model::{self, Adam, FlatAdam, Mlp};

fn main() -> umbra_vfl::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let json = args.next();
    umbra_vfl::threads::one_thread(|| run(steps, json))
}

fn run(steps: usize, json: Option<String>) -> umbra_vfl::Result<()> {
    let (d, b) = (50usize, 256usize);
    let mlp = Mlp::new(d, 64, 32, 10, 1)?;
    let vars = mlp.vars();
    let x = model::tensor2((0..b * d).map(|i| (i as f32 * 0.01).sin()).collect(), b, d)?;
    let y = model::tensor1((0..b).map(|i| (i % 2) as f32).collect())?;
    let out = mlp.forward(&x)?.sum_keepdim(1)?;
    let store = model::loss(&out, &y, Task::Binary)?.backward()?;
    let grads = model::grads_of(&store, &vars)?;
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();

    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let mut flat = FlatAdam::new(&sizes, 1e-3);
    let mut p = model::flat_values(&vars)?;
    let t = Instant::now();
    for _ in 0..steps {
        let g = model::flat_tensors(&grads)?;
        flat.step(&mut p, &g);
    }
    let flat_us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;

    let mut adam = Adam::new(&vars, 1e-3)?;
    let t = Instant::now();
    for _ in 0..steps {
        adam.step(&vars, &grads)?;
    }
    let vars_us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;

    let mut adamw = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    for _ in 0..steps {
        adamw.step(&store)?;
    }
    let nn_us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;

    println!(
        "{params} parameters in {} tensors, {steps} steps each",
        vars.len()
    );
    println!("| optimizer | us/step | vs flat |\n|---|---|---|");
    for (name, us) in [("flat", flat_us), ("vars", vars_us), ("candle_nn", nn_us)] {
        println!("| {name} | {us:.1} | {:.2}x |", us / flat_us);
    }
    if let Some(path) = json {
        let v = serde_json::json!({
            "parameters": params, "tensors": vars.len(), "steps": steps,
            "flat_us": flat_us, "vars_us": vars_us, "candle_nn_us": nn_us,
        });
        umbra_common::fs::write_json(std::path::Path::new(&path), &v)?;
    }
    Ok(())
}
