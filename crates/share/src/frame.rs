//! The wire format between a client and a share server: binary frames over TLS, little-endian.
//!
//! ```text
//! frame    = len: u32 (bytes after this field) | kind: u8 | body
//! client -> server
//!   HELLO   (1)    magic "UMBRASH1" | version: u16 | fingerprint: [u8; 32]
//!   PRODUCT (2)    request: u32 | linear: u32 | rows: u32 | rows x k shares: u64
//!   SEED    (3)    seed: [u8; 32]                 (server B, once per connection)
//!   MASKED  (4)    request: u32 | linear: u32 | rows: u32 | stream: u64
//!   PREPARE (5)    linear: u32 | rows: u32 | count: u32 | count x stream: u64   (no answer)
//! server -> client
//!   WELCOME (0x81) version: u16 | fingerprint: [u8; 32] | maps: u32 | maps x (in: u32, out: u32) | name_len: u16 | name
//!   RESULT  (0x82) request: u32 | rows: u32 | rows x n products: u64
//!   ERROR   (0xff) code: u16 | message_len: u16 | message (UTF-8)
//! ```
//! One PRODUCT carries every row of one step for one linear map (a prefill's rows together), so
//! a forward pass costs one round trip per map. The server checks the length before reading a
//! body (oversized frames are refused unread), then the map id and the width; any violation is
//! answered with an ERROR frame naming it, and the connection is closed.
//!
//! Server B's share is the mask itself, which does not depend on the input: instead of the
//! mask, the client sends B a secret 32-byte SEED once per connection, and each MASKED request
//! names the ChaCha20 stream its rows were drawn from ([`crate::prepare::mask`]). B expands
//! the same words and answers as for a PRODUCT. Because B's work does not depend on the input,
//! B can do it before it is asked: PREPARE names streams the client will use for a map later
//! (the same map at the next tokens), and B computes their products ahead, in idle time.
use crate::error::{Result, ShareError};

pub const MAGIC: [u8; 8] = *b"UMBRASH1";
pub const VERSION: u16 = 2;
/// `len` + `kind`.
pub const HEADER: usize = 5;

pub const HELLO: u8 = 1;
pub const PRODUCT: u8 = 2;
pub const SEED: u8 = 3;
pub const MASKED: u8 = 4;
pub const PREPARE: u8 = 5;
pub const WELCOME: u8 = 0x81;
pub const RESULT: u8 = 0x82;
pub const ERROR: u8 = 0xff;

/// Bytes of a PRODUCT body before the shares (request, linear, rows).
pub const PRODUCT_HEAD: usize = 12;
/// Bytes of a MASKED body (request, linear, rows, stream).
pub const MASKED_LEN: usize = 20;
/// Bytes of a PREPARE body before the streams (linear, rows, count).
pub const PREPARE_HEAD: usize = 12;
/// Bytes of a RESULT body before the products (request, rows).
pub const RESULT_HEAD: usize = 8;

/// Error codes of ERROR frames.
pub mod code {
    pub const BAD_HELLO: u16 = 1;
    pub const FINGERPRINT: u16 = 2;
    pub const UNKNOWN_LINEAR: u16 = 3;
    pub const WIDTH: u16 = 4;
    pub const TOO_LARGE: u16 = 5;
    pub const ROWS: u16 = 6;
    pub const UNEXPECTED: u16 = 7;
    pub const INTERNAL: u16 = 8;
}

/// A frame's header: body length (kind excluded) and kind.
pub fn parse_header(h: [u8; HEADER]) -> Result<(usize, u8)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len == 0 {
        return Err(ShareError::Protocol("frame of length 0".into()));
    }
    Ok((len - 1, h[4]))
}

fn frame(kind: u8, body_len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + body_len);
    v.extend_from_slice(&((body_len + 1) as u32).to_le_bytes());
    v.push(kind);
    v
}

/// Appends `xs` as little-endian bytes.
fn put_u64s(v: &mut Vec<u8>, xs: &[u64]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any u64 slice is valid as bytes (no padding, alignment 1 for u8); on a
        // little-endian target these are the little-endian encodings.
        let bytes = unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const u8, xs.len() * 8) };
        v.extend_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for x in xs {
        v.extend_from_slice(&x.to_le_bytes());
    }
}

/// Reads the little-endian u64s of `b` into `out` (trailing bytes short of 8 are ignored).
pub fn get_u64s(b: &[u8], out: &mut Vec<u64>) {
    let n = b.len() / 8;
    out.clear();
    out.resize(n, 0);
    #[cfg(target_endian = "little")]
    // SAFETY: `out` holds `n` u64s = `8 n` bytes, `b` at least `8 n`; the regions are distinct.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr() as *mut u8, n * 8);
    }
    #[cfg(not(target_endian = "little"))]
    for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
        *o = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn hello(fingerprint: &[u8; 32]) -> Vec<u8> {
    let mut v = frame(HELLO, 8 + 2 + 32);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(fingerprint);
    v
}

/// The fingerprint of a HELLO body.
pub fn parse_hello(b: &[u8]) -> Result<[u8; 32]> {
    if b.len() != 42 || b[..8] != MAGIC {
        return Err(ShareError::Protocol(
            "not an umbra share client (bad HELLO)".into(),
        ));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(ShareError::Protocol(format!(
            "protocol version {version}; this server speaks {VERSION}"
        )));
    }
    let mut fp = [0u8; 32];
    fp.copy_from_slice(&b[10..42]);
    Ok(fp)
}

/// A PRODUCT frame into `buf` (cleared first).
pub fn product(buf: &mut Vec<u8>, request: u32, linear: u32, rows: u32, shares: &[u64]) {
    buf.clear();
    let body = PRODUCT_HEAD + shares.len() * 8;
    buf.reserve(HEADER + body);
    buf.extend_from_slice(&((body + 1) as u32).to_le_bytes());
    buf.push(PRODUCT);
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&linear.to_le_bytes());
    buf.extend_from_slice(&rows.to_le_bytes());
    put_u64s(buf, shares);
}

/// `(request, linear, rows)` of a PRODUCT body; the shares follow at [`PRODUCT_HEAD`].
pub fn parse_product_head(b: &[u8]) -> Result<(u32, u32, u32)> {
    if b.len() < PRODUCT_HEAD {
        return Err(ShareError::Protocol(format!(
            "PRODUCT body of {} bytes is shorter than its {PRODUCT_HEAD}-byte head",
            b.len()
        )));
    }
    Ok((u32_at(b, 0), u32_at(b, 4), u32_at(b, 8)))
}

/// A SEED frame.
pub fn seed(seed: &[u8; 32]) -> Vec<u8> {
    let mut v = frame(SEED, 32);
    v.extend_from_slice(seed);
    v
}

/// The seed of a SEED body.
pub fn parse_seed(b: &[u8]) -> Result<[u8; 32]> {
    b.try_into()
        .map_err(|_| ShareError::Protocol(format!("SEED body of {} bytes (32 expected)", b.len())))
}

/// A MASKED frame appended to `buf`.
pub fn masked(buf: &mut Vec<u8>, request: u32, linear: u32, rows: u32, stream: u64) {
    buf.extend_from_slice(&((MASKED_LEN + 1) as u32).to_le_bytes());
    buf.push(MASKED);
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&linear.to_le_bytes());
    buf.extend_from_slice(&rows.to_le_bytes());
    buf.extend_from_slice(&stream.to_le_bytes());
}

/// `(request, linear, rows, stream)` of a MASKED body.
pub fn parse_masked(b: &[u8]) -> Result<(u32, u32, u32, u64)> {
    if b.len() != MASKED_LEN {
        return Err(ShareError::Protocol(format!(
            "MASKED body of {} bytes ({MASKED_LEN} expected)",
            b.len()
        )));
    }
    let mut st = [0u8; 8];
    st.copy_from_slice(&b[12..20]);
    Ok((
        u32_at(b, 0),
        u32_at(b, 4),
        u32_at(b, 8),
        u64::from_le_bytes(st),
    ))
}

/// A PREPARE frame appended to `buf`.
pub fn prepare(buf: &mut Vec<u8>, linear: u32, rows: u32, streams: &[u64]) {
    let body = PREPARE_HEAD + streams.len() * 8;
    buf.extend_from_slice(&((body + 1) as u32).to_le_bytes());
    buf.push(PREPARE);
    buf.extend_from_slice(&linear.to_le_bytes());
    buf.extend_from_slice(&rows.to_le_bytes());
    buf.extend_from_slice(&(streams.len() as u32).to_le_bytes());
    put_u64s(buf, streams);
}

/// `(linear, rows, streams)` of a PREPARE body.
pub fn parse_prepare(b: &[u8]) -> Result<(u32, u32, Vec<u64>)> {
    if b.len() < PREPARE_HEAD {
        return Err(ShareError::Protocol("PREPARE shorter than its head".into()));
    }
    let count = u32_at(b, 8) as usize;
    if Some(b.len()) != count.checked_mul(8).map(|c| c + PREPARE_HEAD) {
        return Err(ShareError::Protocol(format!(
            "PREPARE of {} bytes for {count} streams",
            b.len()
        )));
    }
    let mut streams = vec![];
    get_u64s(&b[PREPARE_HEAD..], &mut streams);
    Ok((u32_at(b, 0), u32_at(b, 4), streams))
}

pub fn welcome(fingerprint: &[u8; 32], table: &[(u32, u32)], name: &str) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(1024)];
    let mut v = frame(WELCOME, 2 + 32 + 4 + table.len() * 8 + 2 + name.len());
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(fingerprint);
    v.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for (k, n) in table {
        v.extend_from_slice(&k.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v.extend_from_slice(&(name.len() as u16).to_le_bytes());
    v.extend_from_slice(name);
    v
}

/// What a server announces: version, fingerprint, `(in, out)` per map, model name.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub version: u16,
    pub fingerprint: [u8; 32],
    pub table: Vec<(u32, u32)>,
    pub name: String,
}

pub fn parse_welcome(b: &[u8]) -> Result<Welcome> {
    let bad = || ShareError::Protocol("malformed WELCOME".into());
    if b.len() < 40 {
        return Err(bad());
    }
    let version = u16::from_le_bytes([b[0], b[1]]);
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&b[2..34]);
    let maps = u32_at(b, 34) as usize;
    let end = 38usize
        .checked_add(maps.checked_mul(8).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    if b.len() < end + 2 {
        return Err(bad());
    }
    let table = (0..maps)
        .map(|i| (u32_at(b, 38 + 8 * i), u32_at(b, 42 + 8 * i)))
        .collect();
    let nl = u16::from_le_bytes([b[end], b[end + 1]]) as usize;
    let name = b.get(end + 2..end + 2 + nl).ok_or_else(bad)?;
    Ok(Welcome {
        version,
        fingerprint,
        table,
        name: String::from_utf8_lossy(name).into_owned(),
    })
}

/// A RESULT frame.
pub fn result(request: u32, rows: u32, products: &[u64]) -> Vec<u8> {
    let mut v = result_head(request, rows, products.len()).to_vec();
    put_u64s(&mut v, products);
    v
}

/// The first bytes of a RESULT frame carrying `n` products (the products' bytes follow).
pub fn result_head(request: u32, rows: u32, n: usize) -> [u8; HEADER + RESULT_HEAD] {
    let mut h = [0u8; HEADER + RESULT_HEAD];
    h[..4].copy_from_slice(&((RESULT_HEAD + n * 8 + 1) as u32).to_le_bytes());
    h[4] = RESULT;
    h[5..9].copy_from_slice(&request.to_le_bytes());
    h[9..13].copy_from_slice(&rows.to_le_bytes());
    h
}

/// The little-endian bytes of `xs` (borrowed on little-endian targets).
pub fn le_bytes(xs: &[u64]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: as in `put_u64s`.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(xs.as_ptr() as *const u8, xs.len() * 8)
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut v = vec![];
        put_u64s(&mut v, xs);
        std::borrow::Cow::Owned(v)
    }
}

/// `(request, rows)` of a RESULT body.
pub fn parse_result_head(b: &[u8]) -> Result<(u32, u32)> {
    if b.len() < RESULT_HEAD {
        return Err(ShareError::Protocol("RESULT shorter than its head".into()));
    }
    Ok((u32_at(b, 0), u32_at(b, 4)))
}

pub fn error(code: u16, message: &str) -> Vec<u8> {
    let m = &message.as_bytes()[..message.len().min(4000)];
    let mut v = frame(ERROR, 4 + m.len());
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&(m.len() as u16).to_le_bytes());
    v.extend_from_slice(m);
    v
}

/// `(code, message)` of an ERROR body.
pub fn parse_error(b: &[u8]) -> (u16, String) {
    if b.len() < 4 {
        return (code::INTERNAL, "malformed ERROR frame".into());
    }
    let c = u16::from_le_bytes([b[0], b[1]]);
    let n = u16::from_le_bytes([b[2], b[3]]) as usize;
    let m = b.get(4..4 + n).unwrap_or(&b[4..]);
    (c, String::from_utf8_lossy(m).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(f: &[u8]) -> (u8, &[u8]) {
        let (len, kind) = parse_header(f[..HEADER].try_into().unwrap()).unwrap();
        assert_eq!(len, f.len() - HEADER);
        (kind, &f[HEADER..])
    }

    #[test]
    fn frames_round_trip() {
        let fp = [7u8; 32];
        let h = hello(&fp);
        let (k, b) = split(&h);
        assert_eq!((k, parse_hello(b).unwrap()), (HELLO, fp));
        let mut buf = vec![];
        product(&mut buf, 9, 3, 2, &[1, u64::MAX, 5, 6]);
        let (k, b) = split(&buf);
        assert_eq!(k, PRODUCT);
        assert_eq!(parse_product_head(b).unwrap(), (9, 3, 2));
        let mut xs = vec![];
        get_u64s(&b[PRODUCT_HEAD..], &mut xs);
        assert_eq!(xs, [1, u64::MAX, 5, 6]);
        let w = welcome(&fp, &[(4, 8), (8, 4)], "m");
        let (k, b) = split(&w);
        assert_eq!(k, WELCOME);
        let p = parse_welcome(b).unwrap();
        assert_eq!(
            (p.table.clone(), p.name.as_str(), p.fingerprint),
            (vec![(4, 8), (8, 4)], "m", fp)
        );
        let sd = seed(&[3u8; 32]);
        let (k, b) = split(&sd);
        assert_eq!((k, parse_seed(b).unwrap()), (SEED, [3u8; 32]));
        assert!(parse_seed(&b[1..]).is_err());
        let mut buf = vec![];
        masked(&mut buf, 5, 2, 1, u64::MAX - 1);
        prepare(&mut buf, 2, 1, &[7, 9]);
        let (k, b) = split(&buf[..HEADER + MASKED_LEN]);
        assert_eq!(
            (k, parse_masked(b).unwrap()),
            (MASKED, (5, 2, 1, u64::MAX - 1))
        );
        let (k, b) = split(&buf[HEADER + MASKED_LEN..]);
        assert_eq!(
            (k, parse_prepare(b).unwrap()),
            (PREPARE, (2, 1, vec![7, 9]))
        );
        assert!(parse_prepare(&b[..b.len() - 1]).is_err());
        let r = result(1, 1, &[42]);
        let (k, b) = split(&r);
        assert_eq!((k, parse_result_head(b).unwrap()), (RESULT, (1, 1)));
        let e = error(code::WIDTH, "wrong width");
        let (k, b) = split(&e);
        assert_eq!(
            (k, parse_error(b)),
            (ERROR, (code::WIDTH, "wrong width".to_string()))
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert!(parse_header([0, 0, 0, 0, 1]).is_err());
        assert!(parse_hello(b"UMBRASH1").is_err());
        let mut h = hello(&[0; 32])[HEADER..].to_vec();
        h[8] = 99;
        assert!(parse_hello(&h).unwrap_err().to_string().contains("version"));
        assert!(parse_product_head(&[1, 2, 3]).is_err());
        assert!(parse_welcome(&[0; 39]).is_err());
        let mut w = welcome(&[0; 32], &[(1, 1)], "x")[HEADER..].to_vec();
        w[34] = 0xff; // claims 255 maps
        assert!(parse_welcome(&w).is_err());
        assert_eq!(parse_error(&[1]).0, code::INTERNAL);
    }
}
