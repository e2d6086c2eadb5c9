//! The guest/host protocol over a vfl [`Transport`]: topics and receiving with a timeout.
//!
//! Topics: `emb` (guest -> host: training smashed data), `grad` (host -> guest: gradients),
//! `ctrl.host` (guest -> host: hello, eval chunks, end), `ctrl.guest` (host -> guest: ready,
//! report). The batch layout comes from the shared seed ([`umbra_vfl::party::Batches`]), so
//! only batch ids cross the wire.
use crate::error::{R3Error, Result};
use std::time::Duration;
use umbra_vfl::message::{Envelope, Kind};
use umbra_vfl::transport::Subscription;

/// How long either party waits for the other's next message.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Rows per evaluation message.
pub const EVAL_CHUNK: usize = 500;

/// The next message of `sub`, or a protocol error naming `what` after [`TIMEOUT`].
pub fn recv(sub: &mut Box<dyn Subscription>, what: &str) -> Result<Envelope> {
    match sub.recv_timeout(TIMEOUT)? {
        Some(b) => Ok(Envelope::decode(&b)?),
        None => Err(R3Error::Protocol(format!(
            "no {what} from the peer within {} s",
            TIMEOUT.as_secs()
        ))),
    }
}

/// An encoded `[r, c]` tensor message.
pub fn tensor_msg(
    kind: Kind,
    job: &str,
    epoch: u32,
    batch: u64,
    r: usize,
    c: usize,
    d: &[f32],
) -> Vec<u8> {
    Envelope::tensor(kind, job, epoch, batch, 0, r, c, d).encode()
}
