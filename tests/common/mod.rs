//! The one helper every black-box test shares: start real nodes in-process on free ports,
//! connect real WebSocket clients, and speak plain HTTP to the REST API.
#![allow(dead_code)]

pub mod groups;
pub mod history;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chatd::bus::LocalBus;
use chatd::chat::{Backends, Node};
use chatd::client::Client;
use chatd::config::Config;
use chatd::presence::MemoryPresence;
use chatd::store::MemoryStore;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Long enough for a loaded CI machine; tests wait for events, they do not time them.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn config(node_id: &str) -> Config {
    let mut c = Config::default();
    c.server.port = 0;
    c.server.node_id = node_id.to_string();
    // Tests send bursts on purpose; the rate limit has tests of its own.
    c.server.rate_limit_per_sec = 1_000_000;
    c.server.rate_limit_burst = 1_000_000;
    // One offline push per message, at once; the window has a test of its own.
    c.server.offline_push_window_ms = 0;
    c
}

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), chatd::server::ServerError>>>,
}

/// A node with its own in-memory backends.
pub async fn start(config: Config) -> TestNode {
    let backends = Backends::from_config(&config).expect("backends from config");
    start_with(config, backends).await
}

/// Backends shared by several in-process nodes: a cluster in one process.
pub fn shared_backends() -> Backends {
    Backends {
        presence: Arc::new(MemoryPresence::new(300)),
        bus: Arc::new(LocalBus::new()),
        store: Arc::new(MemoryStore::new(100_000, 10_000)),
    }
}

pub async fn start_with(mut config: Config, backends: Backends) -> TestNode {
    config.validate().expect("test config is valid");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().unwrap();
    // As `chatd serve` does: the port actually bound goes into the lease URL.
    config.server.port = addr.port();
    let node = Node::start(config, backends).await.expect("node starts");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(chatd::server::run(listener, node.clone(), async move {
        let _ = rx.await;
    }));
    TestNode {
        addr,
        node,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl TestNode {
    pub fn ws(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub async fn client(&self, user: &str) -> Client {
        Client::connect(&self.ws(), user, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = http_get(self.addr, path).await;
        let json = serde_json::from_str(&body).unwrap_or_else(|_| json!({ "raw": body }));
        (status, json)
    }

    /// Triggers graceful shutdown and waits for `server::run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops within the grace period")
                .expect("server task did not panic")
                .expect("server returned Ok");
        }
    }
}

/// Sends `method` with a JSON body (`Value::Null`: none) to the node at `addr`: the status
/// and the body as JSON.
pub async fn http_send(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let method = method.parse().expect("an HTTP method");
    let json = (!body.is_null()).then(|| body.to_string());
    let (status, text) = chatd::http::send(
        &format!("http://{addr}"),
        method,
        path,
        json.as_deref(),
        WAIT,
    )
    .await
    .expect("HTTP request");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// A minimal HTTP/1.1 GET: status and body. Enough for the REST API and refusals.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    chatd::http::get(&format!("http://{addr}"), path, WAIT)
        .await
        .expect("HTTP GET")
}

pub fn chat(to: &str, content: &str, temp: &str) -> Value {
    json!({"type": "CHAT_MESSAGE", "receiverId": to, "chatId": "c1", "content": content, "tempMessageId": temp})
}

/// Reads frames until one of `frame_type` arrives; panics with what came instead on timeout.
pub async fn expect(client: &mut Client, frame_type: &str) -> Value {
    let mut skipped = Vec::new();
    match client.wait_for(frame_type, WAIT, |f| skipped.push(f)).await {
        Ok(f) => f,
        Err(e) => panic!("waiting for {frame_type}: {e}; got instead: {skipped:?}"),
    }
}

/// Asserts nothing but heartbeat acks arrive for a short while.
pub async fn expect_silence(client: &mut Client) {
    loop {
        match client.next(Duration::from_millis(300)).await {
            Err(chatd::client::ClientError::Timeout(_)) => return,
            Ok(chatd::client::Incoming::Frame(f)) if f["type"] == "HEARTBEAT_ACK" => continue,
            other => panic!("expected no frame, got {other:?}"),
        }
    }
}

/// Waits for a condition that becomes true asynchronously (presence after a disconnect).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A WebSocket spoken by hand over TCP, for the protocol edge cases a well-behaved client
/// library will not produce (unmasked frames, reserved bits, fragmented control frames...).
pub struct RawWs {
    pub stream: tokio::net::TcpStream,
}

impl RawWs {
    /// Opens `/ws/chat?userId=...` and reads the 101 response (and nothing more).
    pub async fn connect(addr: SocketAddr, user: &str) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /ws/chat?userId={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawWs { stream }
    }

    /// One frame: FIN bit, opcode, payload; masked as RFC 6455 requires of clients unless
    /// `masked` is false; `rsv` sets the reserved bits.
    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool, rsv: u8) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | (rsv << 4) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n < 65536 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // The server may already have closed (that is what some tests expect).
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame from the server: (opcode, payload); None when the connection ends.
    pub async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut h = [0u8; 2];
            self.stream.read_exact(&mut h).await.ok()?;
            let mut len = (h[1] & 0x7f) as u64;
            if len == 126 {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b).await.ok()?;
                len = u16::from_be_bytes(b) as u64;
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b).await.ok()?;
                len = u64::from_be_bytes(b);
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.ok()?;
            Some((h[0] & 0x0f, payload))
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a frame or the end in time")
    }

    /// Reads until a close frame; returns its code (None if the connection just ended).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.read().await {
            if opcode == 0x8 {
                return payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            }
        }
        None
    }

    /// Reads until a text frame of the given `type`.
    pub async fn text_of_type(&mut self, frame_type: &str) -> Value {
        while let Some((opcode, payload)) = self.read().await {
            if opcode == 0x1 {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                if v["type"] == frame_type {
                    return v;
                }
            }
        }
        panic!("connection ended before a {frame_type} frame");
    }
}

/// Every line a child writes (its stdout or stderr), as it comes, read on a thread of its own
/// so that a test can wait for one with a deadline.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A name no other test (or earlier run) uses, so tests can share one Redis and one broker.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        chatd::chat::ids::now_ms() % 1_000_000,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The `chatd` binary, run from the repository (so `config/` is found) and without the
/// caller's `CHATD_*` settings.
pub fn chatd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_chatd"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CHATD_")) {
        c.env_remove(k);
    }
    // `chatd connect` keeps cursors in a state file: one of its own per process run here, so
    // that no test (or earlier run) hands another a cursor.
    c.env(
        "XDG_STATE_HOME",
        std::env::temp_dir().join(unique("chatd-test-state")),
    );
    c
}

/// A `chatd` process a test started (a node, a MessageService): SIGKILLed when dropped, also
/// when the test fails. Its stderr goes to a log file, named in every failure, and it is
/// taken as started once it logs where it listens. The one way tests start chatd processes.
pub struct Proc {
    pub child: std::process::Child,
    /// Where it listens: `host:port`.
    pub addr: String,
    /// Its stderr.
    pub log: std::path::PathBuf,
}

impl Proc {
    /// Starts `command` (a [`chatd`] command) with its stderr in a log file and waits for the
    /// line that says where it listens; panics, naming the log, if it does not come.
    // The child is waited for by `Proc`'s Drop (or here, when it does not start).
    #[allow(clippy::zombie_processes)]
    pub fn spawn(mut command: std::process::Command, what: &str) -> Proc {
        let log = std::env::temp_dir().join(format!("{}.log", unique(what)));
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split(chatd::commands::LISTENING).nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                eprintln!("{what} listens on {addr}; its log: {}", log.display());
                return Proc { child, addr, log };
            }
            if !matches!(child.try_wait(), Ok(None)) || std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not start; its log ({}):\n{text}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `chatd serve --port 0 --node-id ID` with more arguments and `CHATD_*` settings.
    pub fn serve(node_id: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut c = chatd();
        c.args(["serve", "--port", "0", "--node-id", node_id])
            .args(args)
            .envs(env.iter().copied());
        Proc::spawn(c, node_id)
    }

    /// `chatd message-service` on `backend` (`memory` or `redis`, on the Redis at
    /// `redis_url`), listening on `listen`. Several comma-separated URLs are the seeds of a
    /// Redis Cluster (the test cluster's, [`test_redis_url`]).
    pub fn message_service(listen: &str, backend: &str, redis_url: &str) -> Proc {
        let mut c = chatd();
        c.args(["message-service", "--listen", listen, "--backend", backend])
            .args(["--redis", redis_url]);
        if redis_url.contains(',') {
            c.arg("--redis-cluster");
        }
        Proc::spawn(c, "message-service")
    }

    pub fn ws(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs (a crash, a segfault, ends it).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM: the graceful stop an operator (or systemd) asks for.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to end; SIGKILLs it and panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        eprintln!(
            "waiting for {} to exit; its log: {}",
            self.addr,
            self.log.display()
        );
        wait_exit(&mut self.child, within)
    }

    /// SIGKILL: nothing flushed, no goodbye, its presence lease left to lapse.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `child` to end; SIGKILLs it and panics after `within`.
pub fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatd did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a condition on state the test holds (frames collected by a thread) to become
/// true within `within`.
pub async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A helper process of a test's own (a Redis, a broker), SIGKILLed when dropped, also when
/// the test fails.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A Redis of a test's own on `port` (no password), so that stopping it disturbs no other
/// test. With `persist_to`, it writes every change to disk there first (appendonly,
/// appendfsync always, as `scripts/services.sh` runs the shared one) and a restart on the
/// same directory keeps everything; without, nothing survives it.
pub fn redis_server(port: u16, persist_to: Option<&std::path::Path>) -> KillOnDrop {
    let mut c = std::process::Command::new("redis-server");
    c.args([
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
    ]);
    match persist_to {
        Some(dir) => c
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir),
        None => c.args(["--appendonly", "no"]),
    };
    KillOnDrop(
        c.stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/services.sh)"),
    )
}

/// Whether the Redis-backed suites run against the Redis Cluster of `scripts/services.sh
/// cluster up` (`CHATD_TEST_REDIS=cluster`; scripts/test.sh runs them both ways) rather than
/// the single Redis of `scripts/services.sh up`.
pub fn on_redis_cluster() -> bool {
    std::env::var("CHATD_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// The password of both test Redis setups (scripts/services.sh).
pub const TEST_REDIS_PASSWORD: &str = "redis123";

/// The test Redis as a URL with its password: the cluster's seeds, comma-separated, or the
/// single Redis.
pub fn test_redis_url() -> String {
    if on_redis_cluster() {
        ["7001", "7002", "7003"]
            .map(|p| format!("redis://:{TEST_REDIS_PASSWORD}@127.0.0.1:{p}"))
            .join(",")
    } else {
        format!("redis://:{TEST_REDIS_PASSWORD}@127.0.0.1:6379/0")
    }
}

/// The `[redis]` config of the test Redis.
pub fn test_redis() -> chatd::config::RedisConfig {
    chatd::config::RedisConfig {
        url: test_redis_url(),
        cluster: on_redis_cluster(),
        ..Default::default()
    }
}

/// `CHATD_*` settings that put a `chatd` process on the test Redis (presence, and with
/// `store` its store too, directly rather than through a MessageService).
pub fn test_redis_env(store: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CHATD_REDIS__URL", test_redis_url()),
        ("CHATD_REDIS__CLUSTER", on_redis_cluster().to_string()),
        ("CHATD_REDIS__PASSWORD", String::new()),
    ];
    if store {
        env.push(("CHATD_STORE__URL", test_redis_url()));
    }
    env
}

/// `redis-cli` against the test Redis (following a cluster's redirections), one line of
/// output per item.
pub fn redis_cli(args: &[&str]) -> Vec<String> {
    let mut c = std::process::Command::new("redis-cli");
    let port = if on_redis_cluster() { "7001" } else { "6379" };
    c.args(["-h", "127.0.0.1", "-p", port, "-a", TEST_REDIS_PASSWORD])
        .arg("--no-auth-warning");
    if on_redis_cluster() {
        c.arg("-c");
    }
    let out = c
        .args(args)
        .output()
        .expect("redis-cli (installed by scripts/services.sh)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .filter(|l| !l.is_empty())
        .collect()
}

/// A Redis Cluster of a test's own: three masters with a replica each on free ports, a node
/// taken as failed after 2 s (so a replica takes over within seconds), every write fsynced;
/// each node killed when dropped. For the failover tests; the shared test cluster
/// (`scripts/services.sh cluster up`) has no replicas.
pub struct TestCluster {
    /// Each node's port and process (`None` while killed).
    nodes: Vec<(u16, Option<KillOnDrop>)>,
    dir: std::path::PathBuf,
}

impl TestCluster {
    /// A new cluster, healthy; made again on other ports when one was taken meanwhile (ports
    /// are picked free, but another test may take one before the node binds it).
    pub fn start() -> TestCluster {
        let mut why = String::new();
        for _ in 0..3 {
            match TestCluster::try_start() {
                Ok(cluster) => {
                    cluster.wait_until_healthy();
                    return cluster;
                }
                Err(e) => why = e,
            }
        }
        panic!("no Redis Cluster for the test: {why}");
    }

    fn try_start() -> Result<TestCluster, String> {
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let mut cluster = TestCluster {
            nodes: ports.iter().map(|p| (*p, None)).collect(),
            dir,
        };
        for p in ports.clone() {
            cluster.restart(p);
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let started = std::time::Instant::now();
        loop {
            let created = std::process::Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .output()
                .expect("redis-cli (installed by scripts/services.sh)");
            if created.status.success() {
                return Ok(cluster);
            }
            let out = String::from_utf8_lossy(&created.stdout).into_owned();
            if out.contains("not configured as a cluster node")
                || started.elapsed() > Duration::from_secs(20)
            {
                return Err(format!("redis-cli --cluster create failed: {out}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts (again) the node of `port`, on its own directory: a node that comes back reads
    /// its `nodes.conf` and rejoins, as a replica once another took its place.
    // The child is waited for by `KillOnDrop`.
    #[allow(clippy::zombie_processes)]
    pub fn restart(&mut self, port: u16) {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/services.sh)");
        for node in &mut self.nodes {
            if node.0 == port {
                node.1 = Some(KillOnDrop(child));
                return;
            }
        }
    }

    /// SIGKILL, no shutdown.
    pub fn kill(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.0 == port {
                node.1 = None;
            }
        }
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every live node says the cluster is ok, and every master has a replica in sync.
    pub fn wait_until_healthy(&self) {
        let started = std::time::Instant::now();
        loop {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.1.is_some())
                .map(|n| n.0)
                .collect();
            let ok = live.iter().all(|p| {
                self.cli(*p, &["cluster", "info"])
                    .contains("cluster_state:ok")
            });
            let synced = live.iter().all(|p| {
                let info = self.cli(*p, &["info", "replication"]);
                info.contains("role:master") && info.contains("connected_slaves:1")
                    || info.contains("master_link_status:up")
            });
            if ok && synced {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the test's Redis Cluster is not healthy after 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The seed URLs of the cluster, for `redis.url` with `redis.cluster = true`.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process id of the node of `port` (while it runs).
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.0 == port)
            .and_then(|n| n.1.as_ref())
            .map(|k| k.0.id())
    }

    /// The port of a replica of the master of `port`.
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let nodes = self.cli(port, &["cluster", "nodes"]);
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port_of = |f: &[&str]| -> Option<u16> {
            f.get(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        };
        let master_id = lines
            .iter()
            .find(|f| port_of(f) == Some(port))?
            .first()?
            .to_string();
        lines
            .iter()
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == master_id)
            .and_then(|f| port_of(f))
    }

    /// The port of the master serving `key`'s slot now (none while its master is failing and
    /// no replica has taken over yet).
    pub fn master_of(&self, key: &str) -> Option<u16> {
        let live = self.nodes.iter().find(|n| n.1.is_some()).unwrap().0;
        let slot: u16 = self
            .cli(live, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        for line in self.cli(live, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                let address = fields[1].split('@').next().unwrap();
                return address.rsplit(':').next().unwrap().parse().ok();
            }
        }
        None
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
