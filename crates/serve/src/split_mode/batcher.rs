//! Batchers of split mode: a thread that takes every job waiting and runs them together, so
//! concurrent callers share one pass over the weights. The server batches its sessions'
//! decode steps ([`run_decode_batch`]: one [`Llama::forward_groups`]); the client batches its
//! generations' final norm and head ([`run_head_batch`]: one GEMM over `[B, d']`).
use crate::error::ServeError;
use candle_core::{Device, Tensor};
use umbra_model::llama::{KvCache, Llama};
use umbra_model::{Forward, Input};

/// Starts a thread that takes every job waiting (at most `max`) and hands them to `run`
/// together. It ends when the last sender is gone.
pub fn spawn_batcher<J: Send + 'static>(
    name: &str,
    max: usize,
    mut run: impl FnMut(Vec<J>) + Send + 'static,
) -> Result<std::sync::mpsc::Sender<J>, ServeError> {
    let (tx, rx) = std::sync::mpsc::channel::<J>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < max {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                run(jobs);
            }
        })?;
    Ok(tx)
}

/// What a step's forward gives back: the session's cache, and the hidden rows or why not.
pub type StepResult = (KvCache, Result<Vec<f32>, String>);

/// One decode step waiting for the server's batcher: one row `[1, 1, d']` on a session's
/// prefilled cache.
pub struct DecodeJob {
    pub x: Vec<f32>,
    pub cache: KvCache,
    pub reply: tokio::sync::oneshot::Sender<StepResult>,
}

/// One batched decode forward; every job gets its cache back with its row or the error.
pub fn run_decode_batch(model: &Llama, jobs: Vec<DecodeJob>) {
    let d = model.config().hidden_size;
    let mut caches = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut xs = Vec::with_capacity(jobs.len());
    for j in jobs {
        xs.push(Tensor::from_vec(j.x, (1, 1, d), &Device::Cpu));
        caches.push(j.cache);
        replies.push(j.reply);
    }
    let out = (|| -> Result<Vec<Vec<f32>>, umbra_model::ModelError> {
        let xs = xs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut groups: Vec<(Input, &mut KvCache)> = xs
            .iter()
            .map(Input::Embeds)
            .zip(caches.iter_mut())
            .collect();
        let hs = model.forward_groups(&mut groups, Forward::hidden())?;
        Ok(hs
            .iter()
            .map(|h| h.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<_, _>>()?)
    })();
    match out {
        Ok(hs) => {
            for ((c, r), h) in caches.into_iter().zip(replies).zip(hs) {
                let _ = r.send((c, Ok(h)));
            }
        }
        Err(e) => {
            for (c, r) in caches.into_iter().zip(replies) {
                let _ = r.send((c, Err(e.to_string())));
            }
        }
    }
}

/// One hidden row waiting for the client's batched head.
pub struct HeadJob {
    pub h: Vec<f32>,
    pub reply: std::sync::mpsc::SyncSender<Result<Vec<f32>, String>>,
}

/// Final norm and head over every waiting row at once (`[B, d']` -> `[B, V]`, one GEMM): the
/// head is the client's largest weight, so concurrent generations share one pass over it.
pub fn run_head_batch(model: &Llama, jobs: Vec<HeadJob>) {
    let d = model.config().hidden_size;
    let n = jobs.len();
    let mut flat = Vec::with_capacity(n * d);
    for j in &jobs {
        flat.extend_from_slice(&j.h);
    }
    let out = (|| -> Result<Vec<Vec<f32>>, umbra_model::ModelError> {
        let t = Tensor::from_vec(flat, (n, d), &Device::Cpu)?;
        Ok(model.head(&t)?.to_vec2::<f32>()?)
    })();
    match out {
        Ok(rows) => {
            for (j, r) in jobs.into_iter().zip(rows) {
                let _ = j.reply.send(Ok(r));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.to_string()));
            }
        }
    }
}
