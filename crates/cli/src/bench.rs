//! `bench obfuscation`: filled in below.
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchObfuscationArgs {}

pub fn obfuscation(_a: &BenchObfuscationArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
