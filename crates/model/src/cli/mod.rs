//! Commands of the model crate (feature `cli`): `umbra bench engine` and `umbra eval quant`.
pub mod engine_child;
