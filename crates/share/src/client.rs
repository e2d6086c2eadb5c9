//! The client's two links: one persistent TLS connection to each share server, blocking I/O
//! with timeouts (the engine thread calls it from inside a forward pass).
//!
//! A round trip writes server A's PRODUCT frame (`a - r`), then server B's MASKED frame (the
//! stream `r` was drawn from, under the seed B received when its link opened), then reads A's
//! RESULT and B's: both servers compute at the same time. Every [`PREPARE_REFILL`] tokens, a
//! MASKED request of at most [`PREPARE_MAX_ROWS`] rows carries a PREPARE along, naming the
//! streams the same map will use at the next [`PREPARE_AHEAD`] tokens, which B computes ahead
//! ([`crate::prepare`]). Every failure names its server (`A
//! https://host:port`): a refused connection, a TLS or fingerprint mismatch, an ERROR frame, a
//! closed connection, a malformed RESULT, no answer within the timeout. A link that failed is
//! reopened (handshake and fingerprint again) at the next round trip, so a restarted server
//! resumes service; nothing waits longer than the timeout.
use crate::error::{Result, ShareError};
use crate::frame;
use crate::prepare::mask;
use crate::tls::Trust;
use rand::RngCore;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One server as the user named it.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// `A` or `B`.
    pub label: String,
    /// As given (`https://host:port`).
    pub url: String,
    pub host: String,
    pub port: u16,
}

impl ServerSpec {
    /// `https://host:port`, `host:port`, `[v6]:port`.
    pub fn parse(label: &str, url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .unwrap_or(url)
            .trim_end_matches('/');
        if url.starts_with("http://") {
            return Err(ShareError::Config(format!(
                "{url}: share servers speak TLS only (https://)"
            )));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => {
                return Err(ShareError::Config(format!(
                    "{url}: give the server as https://host:port"
                )))
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| ShareError::Config(format!("{url}: bad port `{port}`")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(ShareError::Config(format!("{url}: no host")));
        }
        Ok(Self {
            label: label.into(),
            url: url.into(),
            host: host.into(),
            port,
        })
    }

    /// `A https://host:port`.
    pub fn name(&self) -> String {
        format!("{} {}", self.label, self.url)
    }
}

/// Exactly two servers, A then B, from a comma-separated list.
pub fn parse_pair(list: &[String]) -> Result<[ServerSpec; 2]> {
    let urls: Vec<&str> = list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if urls.len() != 2 {
        return Err(ShareError::Config(format!(
            "--share-servers needs exactly two servers (A and B, run by parties that do not \
             collude), got {}: with one server, that server would hold both shares and see \
             every activation",
            urls.len()
        )));
    }
    if urls[0] == urls[1] {
        return Err(ShareError::Config(format!(
            "--share-servers names {} twice: the two shares must go to two different servers",
            urls[0]
        )));
    }
    Ok([
        ServerSpec::parse("A", urls[0])?,
        ServerSpec::parse("B", urls[1])?,
    ])
}

/// What the client expects of each server: the model's fingerprint and map table.
#[derive(Debug, Clone)]
pub struct Expect {
    pub fingerprint: [u8; 32],
    pub table: Vec<(u32, u32)>,
}

/// Traffic counters of the two links (frames, both directions, both servers).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LinkStats {
    pub round_trips: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Seconds between the first write and the last read of each round trip.
    pub wait_s: f64,
}

/// A TCP stream whose reads go through a large buffer. rustls reads at most 4 KiB per call
/// (and shrinks its buffer between records), so without this a 3 MB answer costs hundreds of
/// `recv` calls; writes go straight through (rustls already gathers its records).
struct Buffered {
    tcp: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Buffered {
    fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: vec![0u8; 1 << 20],
            pos: 0,
            end: 0,
        }
    }
}

impl Read for Buffered {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                return self.tcp.read(out);
            }
            self.end = self.tcp.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Buffered {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(b)
    }

    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.tcp.write_vectored(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

type Tls = StreamOwned<ClientConnection, Buffered>;

struct Link {
    spec: ServerSpec,
    config: Arc<rustls::ClientConfig>,
    stream: Option<Tls>,
    /// The server's model name from WELCOME.
    model: String,
}

impl Link {
    fn err(&self, message: impl Into<String>) -> ShareError {
        ShareError::server(self.spec.name(), message)
    }

    fn io_err(&self, e: &std::io::Error, what: &str) -> ShareError {
        use std::io::ErrorKind::*;
        let m = match e.kind() {
            WouldBlock | TimedOut => format!("no answer within the timeout while {what}"),
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
                format!("connection closed while {what}")
            }
            _ => format!("{what}: {e}"),
        };
        self.err(m)
    }

    fn open(&mut self, expect: &Expect, timeout: Duration) -> Result<()> {
        self.stream = None;
        let addr = (self.spec.host.as_str(), self.spec.port)
            .to_socket_addrs()
            .map_err(|e| self.err(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| self.err("cannot resolve"))?;
        let tcp = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| self.err(format!("cannot connect: {e}")))?;
        tcp.set_nodelay(true).ok();
        tcp.set_read_timeout(Some(timeout)).ok();
        tcp.set_write_timeout(Some(timeout)).ok();
        let name = ServerName::try_from(self.spec.host.clone())
            .map_err(|e| self.err(format!("bad server name: {e}")))?;
        let mut conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| self.err(format!("tls: {e}")))?;
        // A whole PRODUCT frame is encrypted, then written in one gathered write.
        conn.set_buffer_limit(None);
        let mut s = StreamOwned::new(conn, Buffered::new(tcp));
        let hello = frame::hello(&expect.fingerprint);
        s.write_all(&hello)
            .and_then(|_| s.flush())
            .map_err(|e| self.io_err(&e, "sending HELLO (TLS handshake)"))?;
        let (kind, body) = read_frame(&mut s, 1 << 20).map_err(|e| match e {
            FrameErr::Io(e) => self.io_err(&e, "waiting for WELCOME (TLS handshake)"),
            FrameErr::Bad(m) => self.err(m),
        })?;
        match kind {
            frame::WELCOME => {
                let w = frame::parse_welcome(&body).map_err(|e| self.err(e.to_string()))?;
                if w.fingerprint != expect.fingerprint {
                    return Err(self.err(format!(
                        "runs another model ({} with weight fingerprint {}, ours is {}): refused",
                        w.name,
                        &hex::encode(w.fingerprint)[..16],
                        &hex::encode(expect.fingerprint)[..16]
                    )));
                }
                if w.table != expect.table {
                    return Err(self.err("announces other linear maps than this model's"));
                }
                self.model = w.name;
            }
            frame::ERROR => {
                let (_, m) = frame::parse_error(&body);
                return Err(self.err(m));
            }
            k => return Err(self.err(format!("unexpected frame kind {k:#x} instead of WELCOME"))),
        }
        self.stream = Some(s);
        Ok(())
    }
}

enum FrameErr {
    Io(std::io::Error),
    Bad(String),
}

/// Reads one frame (`limit` bytes of body at most) into `body`; returns its kind.
fn read_into(
    s: &mut impl Read,
    limit: usize,
    body: &mut Vec<u8>,
) -> std::result::Result<u8, FrameErr> {
    let mut h = [0u8; frame::HEADER];
    s.read_exact(&mut h).map_err(FrameErr::Io)?;
    let (len, kind) = frame::parse_header(h).map_err(|e| FrameErr::Bad(e.to_string()))?;
    if len > limit {
        return Err(FrameErr::Bad(format!(
            "frame of {len} bytes exceeds the {limit} expected"
        )));
    }
    body.resize(len, 0);
    s.read_exact(body).map_err(FrameErr::Io)?;
    Ok(kind)
}

/// [`read_into`] a fresh buffer.
fn read_frame(s: &mut impl Read, limit: usize) -> std::result::Result<(u8, Vec<u8>), FrameErr> {
    let mut body = vec![];
    let kind = read_into(s, limit, &mut body)?;
    Ok((kind, body))
}

/// Tokens ahead whose masks' products server B is asked to compute early.
pub const PREPARE_AHEAD: u64 = 16;
/// A PREPARE is sent when fewer than this many tokens ahead remain prepared.
pub const PREPARE_REFILL: u64 = 8;
/// Requests of more rows (prefills) are not prepared for.
pub const PREPARE_MAX_ROWS: usize = 4;

/// The two links of one client.
pub struct ShareClient {
    links: [Link; 2],
    expect: Expect,
    timeout: Duration,
    next: u32,
    /// Server B's seed on its current connection, and the next stream to draw from it.
    seed: [u8; 32],
    stream: u64,
    /// Per map: the rows and the last stream B was asked to prepare.
    ahead: Vec<(usize, u64)>,
    buf: Vec<u8>,
    body: Vec<u8>,
    stats: LinkStats,
}

impl std::fmt::Debug for ShareClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareClient")
            .field("a", &self.links[0].spec.url)
            .field("b", &self.links[1].spec.url)
            .finish()
    }
}

impl ShareClient {
    /// Connects to both servers and checks that they run this model (`expect`).
    pub fn connect(
        servers: &[ServerSpec; 2],
        trust: &[Trust; 2],
        expect: Expect,
        timeout: Duration,
    ) -> Result<Self> {
        let mk = |i: usize| -> Result<Link> {
            Ok(Link {
                spec: servers[i].clone(),
                config: trust[i].client_config()?,
                stream: None,
                model: String::new(),
            })
        };
        let mut c = Self {
            links: [mk(0)?, mk(1)?],
            ahead: vec![(0, 0); expect.table.len()],
            expect,
            timeout,
            next: 0,
            seed: [0; 32],
            stream: 0,
            buf: vec![],
            body: vec![],
            stats: LinkStats::default(),
        };
        c.ensure_open()?;
        Ok(c)
    }

    /// (Re)opens a closed link; B's gets a fresh seed (its streams start again at 0).
    fn ensure_open(&mut self) -> Result<()> {
        for i in 0..2 {
            if self.links[i].stream.is_some() {
                continue;
            }
            self.links[i].open(&self.expect, self.timeout)?;
            if i == 1 {
                let mut seed = [0u8; 32];
                crate::backend::os_chacha()?.fill_bytes(&mut seed);
                let l = &mut self.links[1];
                let s = l.stream.as_mut().expect("opened above");
                if let Err(e) = s.write_all(&frame::seed(&seed)).and_then(|_| s.flush()) {
                    let err = l.io_err(&e, "sending the mask seed");
                    l.stream = None;
                    return Err(err);
                }
                self.seed = seed;
                self.stream = 0;
                self.ahead.iter_mut().for_each(|a| *a = (0, 0));
            }
        }
        Ok(())
    }

    /// Draws the mask of the next request (`len` words of a fresh stream under server B's
    /// seed) into `r`, opening the links first if needed; returns the stream for
    /// [`ShareClient::round_trip`]. Every call uses a new stream.
    pub fn draw_mask(&mut self, len: usize, r: &mut Vec<u64>) -> Result<u64> {
        if let Err(e) = self.ensure_open() {
            for l in &mut self.links {
                l.stream = None;
            }
            return Err(e);
        }
        let stream = self.stream;
        self.stream += 1;
        r.resize(len, 0);
        mask(&self.seed, stream, r);
        Ok(stream)
    }

    /// The model name each server announced.
    pub fn models(&self) -> [String; 2] {
        [self.links[0].model.clone(), self.links[1].model.clone()]
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// `(x - r) W^T` from A into `out[0]` and `r W^T` from B into `out[1]` (`[rows, n]`) for
    /// map `linear`: `am` (`x - r`) goes to A; B expands `r` from `stream` (the value
    /// [`ShareClient::draw_mask`] returned for it). After any failure both links are closed
    /// (the other one may hold an unread answer) and reopened, with a new seed, at the next
    /// [`ShareClient::draw_mask`].
    pub fn round_trip(
        &mut self,
        linear: u32,
        rows: usize,
        am: &[u64],
        stream: u64,
        n: usize,
        out: [&mut Vec<u64>; 2],
    ) -> Result<()> {
        let r = self.exchange(linear, rows, am, stream, n, out);
        if r.is_err() {
            for l in &mut self.links {
                l.stream = None;
            }
        }
        r
    }

    /// Appends a PREPARE for map `linear` to `buf` when fewer than [`PREPARE_REFILL`] of its
    /// next tokens are prepared (a decode step calls every map once: map `linear` draws
    /// stream `stream + M` at the next token, `M` maps).
    fn plan_ahead(&mut self, linear: u32, rows: usize, stream: u64) {
        let m = self.expect.table.len() as u64;
        let Some(a) = self.ahead.get_mut(linear as usize) else {
            return;
        };
        if rows > PREPARE_MAX_ROWS || m == 0 {
            return;
        }
        if a.0 != rows || a.1 < stream {
            *a = (rows, stream);
        }
        if a.1 >= stream + PREPARE_REFILL * m {
            return;
        }
        let last = stream + PREPARE_AHEAD * m;
        let streams: Vec<u64> = (1..)
            .map(|j| a.1 + j * m)
            .take_while(|&s| s <= last)
            .collect();
        if let Some(&l) = streams.last() {
            a.1 = l;
            frame::prepare(&mut self.buf, linear, rows as u32, &streams);
        }
    }

    fn exchange(
        &mut self,
        linear: u32,
        rows: usize,
        am: &[u64],
        stream: u64,
        n: usize,
        out: [&mut Vec<u64>; 2],
    ) -> Result<()> {
        let start = Instant::now();
        let request = self.next;
        self.next = self.next.wrapping_add(1);
        if self.links.iter().any(|l| l.stream.is_none()) || stream >= self.stream {
            return Err(ShareError::Config(
                "a round trip needs a mask drawn on the open links (draw_mask)".into(),
            ));
        }
        for i in 0..2 {
            if i == 0 {
                frame::product(&mut self.buf, request, linear, rows as u32, am);
            } else {
                self.buf.clear();
                frame::masked(&mut self.buf, request, linear, rows as u32, stream);
                self.plan_ahead(linear, rows, stream);
            }
            let l = &mut self.links[i];
            let sent = self.buf.len();
            let s = l.stream.as_mut().expect("opened above");
            if let Err(e) = s.write_all(&self.buf).and_then(|_| s.flush()) {
                let err = l.io_err(&e, "sending shares");
                l.stream = None;
                return Err(err);
            }
            self.stats.bytes_sent += sent as u64;
        }
        let expect_len = frame::RESULT_HEAD + rows * n * 8;
        let [oa, ob] = out;
        for (l, o) in self.links.iter_mut().zip([oa, ob]) {
            let s = l.stream.as_mut().expect("opened above");
            let r = read_into(s, expect_len.max(64 << 10), &mut self.body);
            let body = &self.body;
            let kind = match r {
                Ok(v) => v,
                Err(e) => {
                    let err = match e {
                        FrameErr::Io(e) => l.io_err(&e, "waiting for products"),
                        FrameErr::Bad(m) => l.err(m),
                    };
                    l.stream = None;
                    return Err(err);
                }
            };
            self.stats.bytes_received += (frame::HEADER + body.len()) as u64;
            let bad = |l: &mut Link, m: String| {
                l.stream = None;
                Err(l.err(m))
            };
            match kind {
                frame::RESULT if body.len() == expect_len => {
                    let (req, r) = frame::parse_result_head(body)?;
                    if req != request || r as usize != rows {
                        return bad(l, format!("answered request {req} ({r} rows) to request {request} ({rows} rows)"));
                    }
                    frame::get_u64s(&body[frame::RESULT_HEAD..], o);
                }
                frame::RESULT => {
                    return bad(
                        l,
                        format!(
                            "RESULT of {} bytes for {rows} rows of {n} products ({expect_len} expected)",
                            body.len()
                        ),
                    )
                }
                frame::ERROR => {
                    let (_, m) = frame::parse_error(body);
                    return bad(l, m);
                }
                k => return bad(l, format!("unexpected frame kind {k:#x}")),
            }
        }
        self.stats.round_trips += 1;
        self.stats.wait_s += start.elapsed().as_secs_f64();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_are_checked() {
        let one = parse_pair(&["https://127.0.0.1:8001".into()]).unwrap_err();
        assert!(one.to_string().contains("exactly two"), "{one}");
        let same = parse_pair(&["https://a:1,https://a:1".into()]).unwrap_err();
        assert!(same.to_string().contains("twice"), "{same}");
        let [a, b] = parse_pair(&["https://127.0.0.1:8001, localhost:8002".into()]).unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.label.as_str()),
            ("127.0.0.1", 8001, "A")
        );
        assert_eq!((b.host.as_str(), b.port), ("localhost", 8002));
        assert!(ServerSpec::parse("A", "http://x:1").is_err());
        assert!(ServerSpec::parse("A", "https://x").is_err());
        assert!(ServerSpec::parse("A", "https://x:99999").is_err());
        assert_eq!(
            ServerSpec::parse("A", "https://[::1]:5").unwrap().host,
            "::1"
        );
    }
}
