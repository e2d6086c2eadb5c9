//! Commands of the model crate (feature `cli`): `umbra bench engine` ([`bench_engine`]) and
//! `umbra eval quant` ([`eval_quant`]). The `umbra` binary only dispatches to them.
pub mod bench_engine;
pub mod engine_child;
pub mod eval_quant;
