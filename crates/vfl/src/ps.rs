//! A party's parameter server: master parameters, Adam, and the synchronisation policy of the
//! data-parallel workers of the mode.
use crate::error::Result;
use crate::model::{self, FlatAdam};
use candle_core::{Tensor, Var};
use std::sync::{Condvar, Mutex};

/// How workers synchronise with the parameter server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sync {
    /// Every push is applied at once; workers pull before every step (async PS, `avfl-ps`; also
    /// the single-worker modes, where the one worker's model *is* the master).
    Async,
    /// Rounds: the pushes of a round are averaged into one step; pushers block until the round is
    /// complete, then pull (`vfl-ps`).
    Rounds,
    /// Semi-asynchronous (PubSub-VFL): pushes are applied at once; between refreshes every
    /// `dT_t` local steps a worker moves its replica by exactly the update the master made from
    /// its own gradient (the same Adam step, applied to both in one pass), so its replica lacks
    /// at most the other workers' last `dT_t` steps and no copy of the master is taken.
    /// `dT_t = ceil(dT0/2 * tanh(2t/dT0 - 2) + dT0/2)` with `t` the epoch index.
    SemiAsync { dt0: usize },
}

/// The staleness schedule `dT_t` of PubSub-VFL (paper's PS section), at least 1.
pub fn staleness_bound(t: usize, dt0: usize) -> usize {
    let d = dt0 as f64;
    let v = (d / 2.0 * (2.0 * t as f64 / d - 2.0).tanh() + d / 2.0).ceil();
    (v as usize).max(1)
}

struct State {
    params: Vec<Vec<f32>>,
    opt: FlatAdam,
    acc: Option<Vec<Vec<f32>>>,
    count: usize,
    generation: u64,
    steps: u64,
}

/// A worker's local view in [`ParamServer::step`].
pub struct WorkerSync {
    cur: Vec<Vec<f32>>,
    steps: usize,
}

/// Master parameters as flat buffers; workers hold candle replicas and push flat gradients.
pub struct ParamServer {
    pub sync: Sync,
    state: Mutex<State>,
    cv: Condvar,
}

impl ParamServer {
    /// A server whose master parameters start as the values of `init`.
    pub fn new(init: &[Var], lr: f64, sync: Sync) -> Result<Self> {
        let params = model::flat_values(init)?;
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        Ok(ParamServer {
            sync,
            state: Mutex::new(State {
                params,
                opt: FlatAdam::new(&sizes, lr),
                acc: None,
                count: 0,
                generation: 0,
                steps: 0,
            }),
            cv: Condvar::new(),
        })
    }

    /// Push the gradients of one step. In `Rounds` mode this blocks until `round_size` pushes
    /// arrived (the last one applies the averaged step).
    pub fn push(&self, grads: Vec<Tensor>, round_size: usize) -> Result<()> {
        let grads = model::flat_tensors(&grads)?;
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        let wait_for = match self.sync {
            Sync::Async | Sync::SemiAsync { .. } => {
                st.opt.step(&mut st.params, &grads);
                st.steps += 1;
                None
            }
            Sync::Rounds => {
                match st.acc.as_mut() {
                    None => st.acc = Some(grads),
                    Some(acc) => {
                        for (a, g) in acc.iter_mut().zip(&grads) {
                            for (x, y) in a.iter_mut().zip(g) {
                                *x += y;
                            }
                        }
                    }
                }
                st.count += 1;
                if st.count >= round_size.max(1) {
                    let k = st.count as f32;
                    let mut avg = st.acc.take().unwrap_or_default();
                    for a in avg.iter_mut() {
                        for x in a.iter_mut() {
                            *x /= k;
                        }
                    }
                    st.opt.step(&mut st.params, &avg);
                    st.steps += 1;
                    st.count = 0;
                    st.generation += 1;
                    self.cv.notify_all();
                    None
                } else {
                    Some(st.generation)
                }
            }
        };
        if let Some(g) = wait_for {
            while guard.generation == g {
                guard = self.cv.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        Ok(())
    }

    /// Whether a worker at local step `step` (1-based) in epoch `epoch` refreshes its replica now.
    pub fn should_pull(&self, step: usize, epoch: usize) -> bool {
        match self.sync {
            Sync::Async | Sync::Rounds => true,
            Sync::SemiAsync { dt0 } => step.is_multiple_of(staleness_bound(epoch, dt0)),
        }
    }

    /// Copy the master parameters into a replica.
    pub fn pull(&self, replica: &[Var]) -> Result<()> {
        let params = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .params
            .clone();
        model::set_flat(replica, &params)
    }

    /// A worker's handle for [`ParamServer::step`], starting from the current master.
    pub fn worker(&self) -> WorkerSync {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        WorkerSync {
            cur: st.params.clone(),
            steps: 0,
        }
    }

    /// Reset a worker's view and its replica to the master parameters.
    pub fn refresh(&self, w: &mut WorkerSync, replica: &[Var]) -> Result<()> {
        w.cur
            .clone_from(&self.state.lock().unwrap_or_else(|e| e.into_inner()).params);
        model::set_flat(replica, &w.cur)
    }

    /// One worker step: push `grads`, then bring `replica` up to date as the policy says
    /// (pull the master, or in `SemiAsync` between refreshes apply the worker's own update).
    pub fn step(
        &self,
        w: &mut WorkerSync,
        replica: &[Var],
        grads: Vec<Tensor>,
        round_size: usize,
        epoch: usize,
    ) -> Result<()> {
        w.steps += 1;
        match self.sync {
            Sync::Async | Sync::Rounds => {
                self.push(grads, round_size)?;
                self.pull(replica)
            }
            Sync::SemiAsync { dt0 } => {
                let flat = model::flat_tensors(&grads)?;
                let refresh = w.steps.is_multiple_of(staleness_bound(epoch, dt0));
                {
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    let st = &mut *st;
                    if refresh {
                        st.opt.step(&mut st.params, &flat);
                        w.cur.clone_from(&st.params);
                    } else {
                        st.opt.step_also(&mut st.params, &mut w.cur, &flat);
                    }
                    st.steps += 1;
                }
                model::set_flat(replica, &w.cur)
            }
        }
    }

    /// Optimizer steps applied so far.
    pub fn steps(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_grows_to_dt0() {
        let s: Vec<usize> = (0..12).map(|t| staleness_bound(t, 5)).collect();
        assert_eq!(s[0], 1);
        assert!(s.windows(2).all(|w| w[0] <= w[1]), "{s:?}");
        assert_eq!(*s.last().unwrap(), 5);
    }

    #[test]
    fn semi_async_replica_moves_by_the_masters_update() {
        let init = [1.0f32, -2.0, 0.5];
        let var = |x: &[f32]| Var::from_tensor(&Tensor::new(x, &Device::Cpu).unwrap()).unwrap();
        let master = var(&init);
        let ps = ParamServer::new(
            std::slice::from_ref(&master),
            0.1,
            Sync::SemiAsync { dt0: 5 },
        )
        .unwrap();
        let (a, b) = (var(&init), var(&init));
        let (mut wa, mut wb) = (ps.worker(), ps.worker());
        let grad = |g: [f32; 3]| vec![Tensor::new(&g, &Device::Cpu).unwrap()];
        let get = |v: &Var| v.as_tensor().to_vec1::<f32>().unwrap();
        // epoch 11: dT = 5, so the first steps of a worker do not refresh
        assert_eq!(staleness_bound(11, 5), 5);
        ps.step(
            &mut wa,
            std::slice::from_ref(&a),
            grad([1.0, -1.0, 0.5]),
            1,
            11,
        )
        .unwrap();
        // alone so far: worker a's replica is the master, bit for bit
        let m = var(&[0.0; 3]);
        ps.pull(std::slice::from_ref(&m)).unwrap();
        assert_eq!(get(&a), get(&m));
        assert_ne!(get(&a), init.to_vec());
        // worker b steps from the initial values: its replica lacks a's update only
        ps.step(
            &mut wb,
            std::slice::from_ref(&b),
            grad([0.2, 0.3, -0.4]),
            1,
            11,
        )
        .unwrap();
        ps.pull(std::slice::from_ref(&m)).unwrap();
        let (gm, ga, gb) = (get(&m), get(&a), get(&b));
        // master = init - u_a - u_b, a = init - u_a, b = init - u_b  =>  master - b = a - init
        for j in 0..3 {
            assert!(
                (gm[j] - gb[j] - (ga[j] - init[j])).abs() < 1e-6,
                "{j}: master {gm:?} a {ga:?} b {gb:?}"
            );
            assert_ne!(gb[j], init[j]);
        }
        assert_eq!(ps.steps(), 2);
    }

    #[test]
    fn rounds_average_before_stepping() {
        let v = Var::from_tensor(&Tensor::new(&[0.0f32], &Device::Cpu).unwrap()).unwrap();
        let ps = std::sync::Arc::new(
            ParamServer::new(std::slice::from_ref(&v), 0.1, Sync::Rounds).unwrap(),
        );
        let mut hs = Vec::new();
        for g in [1.0f32, -1.0] {
            let ps = ps.clone();
            hs.push(std::thread::spawn(move || {
                ps.push(vec![Tensor::new(&[g], &Device::Cpu).unwrap()], 2)
                    .unwrap();
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(ps.steps(), 1);
        // the averaged gradient is 0, so Adam leaves the parameter at 0
        let r = Var::from_tensor(&Tensor::new(&[5.0f32], &Device::Cpu).unwrap()).unwrap();
        ps.pull(std::slice::from_ref(&r)).unwrap();
        assert_eq!(r.as_tensor().to_vec1::<f32>().unwrap(), vec![0.0]);
    }
}
