//! Test support shared by the crates built on this engine (vfl, r3elu, sap): a real NATS server
//! on loopback, started and stopped by the test, and child-process helpers. These functions
//! panic with a clear message on failure (they are meant for tests only).
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's `nats-server` binary; panics with the install command when it is missing.
pub fn nats_binary() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg("command -v nats-server")
        .output()
    {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !s.is_empty() {
            return s.into();
        }
    }
    panic!(
        "nats-server not found: install it with `bash .ci/nats.sh install` (Debian's nats-server)"
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A `nats-server` on 127.0.0.1, killed when dropped.
pub struct NatsServer {
    child: Child,
    port: u16,
    /// HTTP monitoring port (`-m`), when started with [`NatsServer::start_monitored`].
    monitor: Option<u16>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> NatsServer {
        Self::start_on(free_port())
    }

    /// Starts a server on `port` (e.g. to restart one) and waits until it accepts connections.
    pub fn start_on(port: u16) -> NatsServer {
        Self::spawn(port, None)
    }

    /// [`NatsServer::start_on`] with HTTP monitoring on a free port, so that a test can watch
    /// the traffic ([`NatsServer::messages_in`]).
    pub fn start_monitored(port: u16) -> NatsServer {
        Self::spawn(port, Some(free_port()))
    }

    /// Messages the server has received so far (`in_msgs` of `/varz`); `None` without
    /// monitoring or when the endpoint does not answer.
    pub fn messages_in(&self) -> Option<u64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.monitor?)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let json = &body[body.find('{')?..];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["in_msgs"].as_u64()
    }

    /// Waits up to `limit` until the server has received `n` messages.
    pub fn wait_for_messages(&self, n: u64, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.messages_in().is_some_and(|m| m >= n) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn spawn(port: u16, monitor: Option<u16>) -> NatsServer {
        let mut cmd = Command::new(nats_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(m) = monitor {
            cmd.args(["-m", &m.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nats-server did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NatsServer {
            child,
            port,
            monitor,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin party --role ROLE --broker nats://127.0.0.1:PORT --job JOB --json JSON` (the
/// `vfl_party` / `sap_party` command line) with warnings logged and stdout discarded.
pub fn party_process(bin: &str, role: &str, port: u16, job: &Path, json: &Path) -> Child {
    Command::new(bin)
        .args([
            "party",
            "--role",
            role,
            "--broker",
            &format!("nats://127.0.0.1:{port}"),
        ])
        .arg("--job")
        .arg(job)
        .arg("--json")
        .arg(json)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin} ({role}): {e}"))
}

/// [`wait_child`] on an owned child.
pub fn wait_exit(mut c: Child, limit: Duration) -> bool {
    wait_child(&mut c, limit)
}

/// Waits up to `limit` for `c` to exit; kills it and returns `false` on timeout, else whether it
/// succeeded.
pub fn wait_child(c: &mut Child, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        match c.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) => {}
            Err(_) => return false,
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
