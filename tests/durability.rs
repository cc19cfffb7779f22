//! No message lost across crashes: real `chatd serve` node processes (Redis presence, the
//! Kafka broker), a real `chatd message-service` on Redis, `chatd connect` as the client that
//! reconnects, and SIGKILL in the middle of a stream. Needs `scripts/services.sh up`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatd::client::Client;
use chatd::store::{GrpcStore, Store};
use common::*;
use serde_json::{json, Value};

/// Long streams on a shared 2-core machine: generous, the tests wait for events.
const LONG: Duration = Duration::from_secs(120);

/// The MessageService on the shared Redis (durable across its restarts).
fn message_service(listen: &str) -> Proc {
    Proc::message_service(listen, "redis", &test_redis_url())
}

/// `chatd serve --profile node1` (Redis presence, Kafka) on a free port, storing through the
/// MessageService at `store`, with more `CHATD_*` settings.
fn node_with(node_id: &str, store: &str, env: &[(&str, &str)]) -> Proc {
    let store = format!("grpc://{store}");
    // Presence on the test Redis (single or cluster); `env` may name another.
    let redis = test_redis_env(false);
    let mut all: Vec<(&str, &str)> = redis.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend([
        ("CHATD_STORE__URL", store.as_str()),
        ("CHATD_SERVER__RATE_LIMIT_PER_SEC", "1000000"),
        ("CHATD_SERVER__RATE_LIMIT_BURST", "1000000"),
    ]);
    all.extend_from_slice(env);
    Proc::serve(node_id, &["--profile", "node1"], &all)
}

/// [`node_with`] and no more settings.
fn node(node_id: &str, store: &str) -> Proc {
    node_with(node_id, store, &[])
}

/// `chatd connect --json` as a user runs it, failing over between `urls`; every frame it
/// prints is collected.
struct Connect {
    child: Child,
    stdin: Option<ChildStdin>,
    frames: Arc<Mutex<Vec<Value>>>,
}

impl Connect {
    fn spawn(user: &str, urls: &[String]) -> Connect {
        let mut c = chatd();
        c.args(["connect", "--json", "--user", user, "--linger", "0.5"]);
        for u in urls {
            c.args(["--url", u]);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        let lines = lines_of(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in lines {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("connect printed a line that is not JSON: {line}"));
                sink.lock().unwrap().push(v);
            }
        });
        Connect {
            stdin: child.stdin.take(),
            child,
            frames,
        }
    }

    fn count(&self, frame_type: &str) -> usize {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f["type"] == frame_type)
            .count()
    }

    fn of_type(&self, frame_type: &str) -> Vec<Value> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f["type"] == frame_type)
            .cloned()
            .collect()
    }

    /// Writes lines to its stdin from a thread of its own (a pipe holds only so much), then
    /// closes stdin: the client then waits for every ack and exits.
    fn feed(&mut self, lines: Vec<String>, pause_every: usize) -> std::thread::JoinHandle<()> {
        let mut stdin = self.stdin.take().unwrap();
        std::thread::spawn(move || {
            for (i, line) in lines.iter().enumerate() {
                writeln!(stdin, "{line}").unwrap();
                if pause_every > 0 && i % pause_every == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "connect did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line(to: &str, i: usize) -> String {
    json!({"type": "CHAT_MESSAGE", "receiverId": to, "chatId": "dur", "content": format!("m{i}"), "tempMessageId": format!("t{i}")})
        .to_string()
}

/// Message `i` of a stream to group `group`.
fn group_line(group: &str, i: usize) -> String {
    json!({"type": "CHAT_MESSAGE", "groupId": group, "content": format!("m{i}"), "tempMessageId": format!("t{i}")})
        .to_string()
}

/// Sends `total` messages from `client`, 100 in flight at a time; returns the acked ids in
/// order.
async fn stream(client: &mut Client, to: &str, total: usize) -> Vec<String> {
    stream_lines(client, total, |i| line(to, i)).await
}

/// [`stream`] of the lines `line` makes.
async fn stream_lines(
    client: &mut Client,
    total: usize,
    line: impl Fn(usize) -> String,
) -> Vec<String> {
    let mut acked = Vec::with_capacity(total);
    for start in (1..=total).step_by(100) {
        let end = (start + 99).min(total);
        for i in start..=end {
            client.send_text(&line(i)).await.unwrap();
        }
        for _ in start..=end {
            let f = client
                .wait_for("MESSAGE_ACK", LONG, |f| {
                    assert_ne!(f["type"], "ERROR", "{f}");
                })
                .await
                .unwrap();
            acked.push(f["messageId"].as_str().unwrap().to_string());
        }
    }
    acked
}

/// Reads `CHAT_MESSAGE` frames from `client` into `got` until it holds `n`.
async fn receive(client: &mut Client, got: &mut Vec<Value>, n: usize) {
    while got.len() < n {
        let f = client
            .wait_for("CHAT_MESSAGE", LONG, |_| {})
            .await
            .unwrap_or_else(|e| panic!("after {} messages: {e}", got.len()));
        got.push(f);
    }
}

/// Checks what one device received: seq 1..=n in order, each message once.
fn assert_gap_free(frames: &[Value], n: usize) {
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=n as u64).collect();
    if seqs != expected {
        let missing: Vec<_> = expected
            .iter()
            .filter(|s| !seqs.contains(s))
            .take(20)
            .collect();
        let mut seen = HashSet::new();
        let repeated: Vec<_> = seqs.iter().filter(|s| !seen.insert(**s)).take(20).collect();
        panic!(
            "{} frames; missing seqs {missing:?}; repeated {repeated:?}; first out of order at {:?}",
            seqs.len(),
            seqs.windows(2).position(|w| w[1] != w[0] + 1)
        );
    }
}

/// The user's inbox as the store keeps it: the newest seq and the contents, in seq order.
async fn inbox(store_addr: &str, user: &str) -> (u64, Vec<String>) {
    let store = GrpcStore::new(&[format!("grpc://{store_addr}")], WAIT, 2).unwrap();
    let (mut after, mut latest, mut contents) = (0, 0, Vec::new());
    loop {
        let page = store.fetch(user, after, 1000).await.unwrap();
        latest = latest.max(page.latest);
        let Some(last) = page.entries.last() else {
            break;
        };
        after = last.seq;
        contents.extend(
            page.entries
                .iter()
                .map(|e| e.message.message.content.clone()),
        );
    }
    // What the nodes compare their devices' cursors with at heartbeats says the same.
    assert_eq!(
        store.latest_seqs(&[user, "nobody-at-all"]).await.unwrap(),
        [latest, 0]
    );
    (latest, contents)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_moving_to_new_topic_generations_under_traffic_loses_and_repeats_nothing() {
    let service = message_service("127.0.0.1:0");
    // Small generations, a short drain, and a lease short enough that senders follow in time.
    let env = [
        ("CHATD_KAFKA__ROTATE_RECORDS", "100"),
        ("CHATD_KAFKA__DRAIN_SECS", "2"),
        ("CHATD_PRESENCE__NODE_LEASE_SECS", "2"),
    ];
    let receiving = node_with(&unique("gen-b"), &service.addr, &env);
    let sending = node_with(&unique("gen-a"), &service.addr, &env);
    let (a, b) = (unique("alice"), unique("bob"));
    let mut receiver = Client::connect(&receiving.ws(), &b, WAIT).await.unwrap();
    let mut sender = Client::connect(&sending.ws(), &a, WAIT).await.unwrap();

    // 3000 messages in 300 small bursts over several seconds: one record a burst at least,
    // so the receiving node's topic fills up and is replaced several times on the way.
    let total = 3000;
    let to = b.clone();
    let sending_task = tokio::spawn(async move {
        for start in (1..=total).step_by(10) {
            for i in start..start + 10 {
                sender.send_text(&line(&to, i)).await.unwrap();
            }
            for _ in 0..10 {
                sender
                    .wait_for("MESSAGE_ACK", LONG, |f| {
                        assert_ne!(f["type"], "ERROR", "{f}")
                    })
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let mut got = Vec::new();
    receive(&mut receiver, &mut got, total).await;
    sending_task.await.unwrap();
    assert_gap_free(&got, total);
    expect_silence(&mut receiver).await;

    let log = std::fs::read_to_string(&receiving.log).unwrap();
    let moved = log.matches("moved to a new generation").count();
    let deleted = log.matches("deleted a retired topic").count();
    // Consumers of retired generations were swapped for slow ones on the way, from where
    // the fast ones stopped (the gap-free check above covers what they handed on).
    let slowed = log
        .matches("fetching this retired generation slowly")
        .count();
    assert!(
        moved >= 2 && deleted >= 1 && slowed >= 1,
        "the receiving node moved {moved} times, slowed {slowed} and deleted {deleted} topics; see {}",
        receiving.log.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_receivers_node_mid_stream_loses_and_repeats_nothing() {
    let service = message_service("127.0.0.1:0");
    let mut n1 = node(&unique("dur-a1"), &service.addr);
    let n2 = node(&unique("dur-a2"), &service.addr);
    let (a, b) = (unique("alice"), unique("bob"));
    let receiver = Connect::spawn(&b, &[n1.ws(), n2.ws()]);
    until("the receiver connects to node 1", WAIT, || {
        receiver.count("CONNECTED") == 1
    })
    .await;

    let total = 3000;
    let ws = n2.ws();
    let to = b.clone();
    let sender = tokio::spawn(async move {
        let mut c = Client::connect(&ws, &a, WAIT).await.unwrap();
        stream(&mut c, &to, total).await
    });
    until("a third of the stream received", LONG, || {
        receiver.count("CHAT_MESSAGE") >= total / 3
    })
    .await;
    n1.kill();
    let acked = sender.await.unwrap();
    until("everything received after the failover", LONG, || {
        receiver.count("CHAT_MESSAGE") >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(receiver.count("CONNECTED") >= 2, "the receiver reconnected");
    let got = receiver.of_type("CHAT_MESSAGE");
    assert_gap_free(&got, total);
    let ids: Vec<&str> = got
        .iter()
        .map(|f| f["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids, acked,
        "every acknowledged message, once, in the order sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_senders_node_mid_stream_stores_every_message_once() {
    let service = message_service("127.0.0.1:0");
    let mut n1 = node(&unique("dur-b1"), &service.addr);
    let n2 = node(&unique("dur-b2"), &service.addr);
    let (a, b) = (unique("alice"), unique("bob"));
    let mut receiver = Client::connect(&n2.ws(), &b, WAIT).await.unwrap();
    let mut sender = Connect::spawn(&a, &[n1.ws(), n2.ws()]);
    until("the sender connects to node 1", WAIT, || {
        sender.count("CONNECTED") == 1
    })
    .await;

    let total = 3000;
    let feeder = sender.feed((1..=total).map(|i| line(&b, i)).collect(), 10);
    let mut got = Vec::new();
    receive(&mut receiver, &mut got, total / 3).await;
    n1.kill();
    receive(&mut receiver, &mut got, total).await;
    feeder.join().unwrap();
    let status = tokio::task::block_in_place(|| sender.wait_exit());
    assert!(
        status.success(),
        "every send acknowledged in the end: {status}"
    );
    assert!(sender.count("CONNECTED") >= 2, "the sender reconnected");

    // Acknowledged: by an ack, or by the copy of its own message replayed after reconnecting.
    let mut acked: BTreeSet<String> = BTreeSet::new();
    for f in sender
        .of_type("MESSAGE_ACK")
        .iter()
        .chain(&sender.of_type("CHAT_MESSAGE"))
    {
        if let Some(t) = f["tempMessageId"].as_str() {
            acked.insert(t.to_string());
        }
    }
    assert_eq!(acked.len(), total);

    assert_gap_free(&got, total);
    let contents: BTreeSet<&str> = got.iter().map(|f| f["content"].as_str().unwrap()).collect();
    assert_eq!(contents.len(), total, "each message received once");
    let (latest, stored) = inbox(&service.addr, &b).await;
    assert_eq!(latest, total as u64, "each message stored once");
    assert_eq!(stored.iter().collect::<BTreeSet<_>>().len(), total);
    expect_silence(&mut receiver).await;
}

/// A group of `members`, made by `admin` in the store behind the MessageService at `store`.
async fn group_of(store: &str, admin: &str, members: &[String]) -> String {
    let store = GrpcStore::new(&[format!("grpc://{store}")], WAIT, 2).unwrap();
    let group = unique("group");
    store.create_group(&group, admin, members).await.unwrap();
    group
}

/// A group's members on both nodes; the node holding one member's device (a `chatd connect`
/// that fails over) is SIGKILLed mid-stream: every member still gets every acknowledged
/// message once, in the order sent, at its own gap-free seqs.
#[tokio::test(flavor = "multi_thread")]
async fn killing_a_members_node_mid_group_stream_loses_and_repeats_nothing() {
    let service = message_service("127.0.0.1:0");
    let mut n1 = node(&unique("dur-g1"), &service.addr);
    let n2 = node(&unique("dur-g2"), &service.addr);
    let (a, b, c) = (unique("alice"), unique("bob"), unique("carol"));
    let group = group_of(&service.addr, &a, &[b.clone(), c.clone()]).await;
    let bob = Connect::spawn(&b, &[n1.ws(), n2.ws()]);
    let mut carol = Client::connect(&n2.ws(), &c, WAIT).await.unwrap();
    until("bob connects to node 1", WAIT, || {
        bob.count("CONNECTED") == 1
    })
    .await;

    let total = 2000;
    let ws = n2.ws();
    let to = group.clone();
    let sender = tokio::spawn(async move {
        let mut c = Client::connect(&ws, &a, WAIT).await.unwrap();
        stream_lines(&mut c, total, |i| group_line(&to, i)).await
    });
    until("a third of the stream received", LONG, || {
        bob.count("CHAT_MESSAGE") >= total / 3
    })
    .await;
    n1.kill();
    let acked = sender.await.unwrap();
    let mut carol_got = Vec::new();
    receive(&mut carol, &mut carol_got, total).await;
    until("bob has everything after the failover", LONG, || {
        bob.count("CHAT_MESSAGE") >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(bob.count("CONNECTED") >= 2, "bob reconnected");
    for (who, got) in [("bob", bob.of_type("CHAT_MESSAGE")), ("carol", carol_got)] {
        assert_gap_free(&got, total);
        let ids: Vec<&str> = got
            .iter()
            .map(|f| f["messageId"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids, acked,
            "{who}: every acknowledged message, once, in the order sent"
        );
        assert!(got.iter().all(|f| f["groupId"] == group.as_str()));
    }
    expect_silence(&mut carol).await;
}

/// The sender's node is SIGKILLed mid-stream to a group: saves cut between the members'
/// steps are completed by the sender's retries (same `tempMessageId`), so every member has
/// every message once, and the sender's every send is acknowledged in the end.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_senders_node_mid_group_stream_stores_every_message_once_per_member() {
    let service = message_service("127.0.0.1:0");
    let mut n1 = node(&unique("dur-h1"), &service.addr);
    let n2 = node(&unique("dur-h2"), &service.addr);
    let (a, b, c) = (unique("alice"), unique("bob"), unique("carol"));
    let group = group_of(&service.addr, &a, &[b.clone(), c.clone()]).await;
    let mut bob = Client::connect(&n2.ws(), &b, WAIT).await.unwrap();
    let mut carol = Client::connect(&n2.ws(), &c, WAIT).await.unwrap();
    let mut sender = Connect::spawn(&a, &[n1.ws(), n2.ws()]);
    until("the sender connects to node 1", WAIT, || {
        sender.count("CONNECTED") == 1
    })
    .await;

    let total = 2000;
    let feeder = sender.feed((1..=total).map(|i| group_line(&group, i)).collect(), 10);
    let mut bob_got = Vec::new();
    receive(&mut bob, &mut bob_got, total / 3).await;
    n1.kill();
    receive(&mut bob, &mut bob_got, total).await;
    let mut carol_got = Vec::new();
    receive(&mut carol, &mut carol_got, total).await;
    feeder.join().unwrap();
    let status = tokio::task::block_in_place(|| sender.wait_exit());
    assert!(
        status.success(),
        "every send acknowledged in the end: {status}"
    );
    assert!(sender.count("CONNECTED") >= 2, "the sender reconnected");

    for (who, got) in [(&b, bob_got), (&c, carol_got)] {
        assert_gap_free(&got, total);
        let contents: BTreeSet<&str> = got.iter().map(|f| f["content"].as_str().unwrap()).collect();
        assert_eq!(contents.len(), total, "{who}: each message received once");
        let (latest, stored) = inbox(&service.addr, who).await;
        assert_eq!(latest, total as u64, "{who}: each message stored once");
        assert_eq!(stored.iter().collect::<BTreeSet<_>>().len(), total);
    }
    expect_silence(&mut bob).await;
    expect_silence(&mut carol).await;
}

/// What the sender should see of an outage.
#[derive(PartialEq)]
enum Seen {
    /// Some sends refused with `STORE_UNAVAILABLE` (and sent again): the store was away.
    Refusals,
    /// No refusal at all: another MessageService answered.
    Nothing,
    /// Either: the outage may be ridden out without a refusal (the cluster client retries
    /// while a replica takes over).
    Any,
}

/// Streams `total` messages from a `chatd connect` sender to a receiver, both on `node`;
/// once a quarter has arrived runs `outage` with the sender's and the receiver's ids (it takes
/// a store away, and may bring it back); then checks that every send was acknowledged in the end, that the sender saw what
/// `seen` says, and that every message was received once in seq order and stored once
/// (through the MessageService at `store`).
async fn outage_under_traffic(
    node: &Proc,
    store: &str,
    total: usize,
    seen: Seen,
    outage: impl FnOnce(&str, &str),
) {
    let (a, b) = (unique("alice"), unique("bob"));
    let mut receiver = Client::connect(&node.ws(), &b, WAIT).await.unwrap();
    let mut sender = Connect::spawn(&a, &[node.ws()]);
    until("the sender connects", WAIT, || {
        sender.count("CONNECTED") == 1
    })
    .await;
    let feeder = sender.feed((1..=total).map(|i| line(&b, i)).collect(), 5);
    let mut got = Vec::new();
    receive(&mut receiver, &mut got, total / 4).await;
    tokio::task::block_in_place(|| outage(&a, &b));
    receive(&mut receiver, &mut got, total).await;
    feeder.join().unwrap();
    let status = tokio::task::block_in_place(|| sender.wait_exit());
    assert!(
        status.success(),
        "every send acknowledged in the end: {status}"
    );
    let refused = sender
        .of_type("ERROR")
        .iter()
        .filter(|e| e["code"] == "STORE_UNAVAILABLE")
        .count();
    match seen {
        Seen::Refusals => assert!(
            refused > 0,
            "the outage was under traffic: some sends were refused and retried"
        ),
        Seen::Nothing => assert_eq!(refused, 0, "another MessageService answered every save"),
        Seen::Any => {}
    }
    assert_gap_free(&got, total);
    let contents: BTreeSet<&str> = got.iter().map(|f| f["content"].as_str().unwrap()).collect();
    assert_eq!(contents.len(), total);
    let (latest, _) = inbox(store, &b).await;
    assert_eq!(latest, total as u64, "each message stored once, none lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_the_message_service_under_traffic_loses_no_acknowledged_message() {
    let mut service = message_service("127.0.0.1:0");
    let addr = service.addr.clone();
    let node = node(&unique("dur-c1"), &addr);
    outage_under_traffic(&node, &addr, 2000, Seen::Refusals, |_, _| {
        service.kill();
        std::thread::sleep(Duration::from_millis(700));
        service = message_service(&addr);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_one_of_two_message_services_under_traffic_goes_unnoticed() {
    let mut first = message_service("127.0.0.1:0");
    let second = message_service("127.0.0.1:0");
    // `Proc::node` puts the first `grpc://` in front.
    let both = format!("{},grpc://{}", first.addr, second.addr);
    let node = node(&unique("dur-ms2"), &both);
    outage_under_traffic(&node, &second.addr, 2000, Seen::Nothing, |_, _| {
        first.kill()
    })
    .await;
    // The node reads as healthy while one MessageService answers.
    let (status, body) =
        chatd::http::get(&format!("http://{}", node.addr), "/api/chat/health", WAIT)
            .await
            .unwrap();
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(health["checks"]["store"]["status"], "UP", "{health}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_senders_on_two_node_processes_give_one_gap_free_seq() {
    let service = message_service("127.0.0.1:0");
    let n1 = node(&unique("dur-d1"), &service.addr);
    let n2 = node(&unique("dur-d2"), &service.addr);
    let b = unique("bob");
    let mut on1 = Client::connect(&n1.ws(), &b, WAIT).await.unwrap();
    let mut on2 = Client::connect(&n2.ws(), &b, WAIT).await.unwrap();
    let per_sender = 400;
    let mut senders = Vec::new();
    for (i, ws) in [n1.ws(), n2.ws(), n1.ws(), n2.ws()].into_iter().enumerate() {
        let to = b.clone();
        senders.push(tokio::spawn(async move {
            let mut c = Client::connect(&ws, &unique(&format!("s{i}")), WAIT)
                .await
                .unwrap();
            stream(&mut c, &to, per_sender).await
        }));
    }
    let total = 4 * per_sender;
    for device in [&mut on1, &mut on2] {
        let mut got = Vec::new();
        receive(device, &mut got, total).await;
        assert_gap_free(&got, total);
    }
    for s in senders {
        assert_eq!(s.await.unwrap().len(), per_sender);
    }
    expect_silence(&mut on1).await;
}

/// A Tansu broker of this test's own (the patched one `scripts/services.sh` builds into
/// `$TANSU_HOME`, `~/.cache/chatd/tansu` by default), in memory: a restart loses every topic,
/// offset and producer id, as a broker that lost its disk would.
fn tansu(port: u16) -> KillOnDrop {
    let home = std::env::var_os("TANSU_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/chatd/tansu")
        });
    let bin = home.join("bin/tansu");
    let url = format!("tcp://127.0.0.1:{port}");
    let child = std::process::Command::new(&bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{} (installed by scripts/services.sh): {e}", bin.display()));
    KillOnDrop(child)
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restarted_empty_neither_crashes_the_nodes_nor_loses_a_message() {
    let port = free_port();
    let mut broker = tansu(port);
    eventually("the test's broker listens", || port_open(port)).await;
    let brokers = format!("127.0.0.1:{port}");
    let env = [("CHATD_KAFKA__BROKERS", brokers.as_str())];
    let service = message_service("127.0.0.1:0");
    let mut n1 = node_with(&unique("dur-k1"), &service.addr, &env);
    let mut n2 = node_with(&unique("dur-k2"), &service.addr, &env);
    let (a, b) = (unique("alice"), unique("bob"));
    let mut receiver = Client::connect(&n1.ws(), &b, WAIT).await.unwrap();
    let mut sender = Client::connect(&n2.ws(), &a, WAIT).await.unwrap();
    let half = 200;
    stream(&mut sender, &b, half).await;
    let mut got = Vec::new();
    receive(&mut receiver, &mut got, half).await;

    // The broker dies and comes back empty while the stream goes on.
    broker.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut broker = tansu(port);
    eventually("the test's broker is back", || port_open(port)).await;
    for i in half + 1..=2 * half {
        sender.send_text(&line(&b, i)).await.unwrap();
        expect(&mut sender, "MESSAGE_ACK").await;
    }
    receive(&mut receiver, &mut got, 2 * half).await;
    assert_gap_free(&got, 2 * half);
    assert!(
        n1.alive() && n2.alive(),
        "both nodes outlived the broker's restart"
    );

    // Both still serve. (Tansu itself refuses publishes to a topic made again after its
    // restart for a minute or two; devices get those frames from the store meanwhile.)
    for node in [&n1, &n2] {
        let (status, _) =
            chatd::http::get(&format!("http://{}", node.addr), "/api/chat/health", WAIT)
                .await
                .unwrap();
        assert_eq!(status, 200);
    }
    broker.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_redis_mid_stream_loses_no_acknowledged_message() {
    let port = free_port();
    let dir = std::env::temp_dir().join(unique("redis-data"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = redis_server(port, Some(&dir));
    eventually("the test's Redis listens", || port_open(port)).await;
    let url = format!("redis://127.0.0.1:{port}/0");
    // Presence and store both on this Redis: killing it takes both away.
    let service = Proc::message_service("127.0.0.1:0", "redis", &url);
    let env = [
        ("CHATD_REDIS__URL", url.as_str()),
        ("CHATD_REDIS__CLUSTER", "false"),
        ("CHATD_REDIS__PASSWORD", ""),
    ];
    let node = node_with(&unique("dur-r1"), &service.addr, &env);
    outage_under_traffic(&node, &service.addr, 1500, Seen::Refusals, |_, _| {
        redis.kill();
        std::thread::sleep(Duration::from_millis(700));
        redis = redis_server(port, Some(&dir));
    })
    .await;
    redis.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The topics the test's broker lists (the node1 profile's, on loopback).
fn broker_topics() -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let lister: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .create()
        .expect("a client of the test's broker");
    let metadata = lister
        .fetch_metadata(None, Duration::from_secs(5))
        .expect("the broker lists its topics");
    metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

fn topics_of(node: &str) -> Vec<String> {
    let prefix = format!("chat.node.{node}.g");
    broker_topics()
        .into_iter()
        .filter(|t| {
            t.strip_prefix(&prefix)
                .is_some_and(|g| g.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_topics_of_a_killed_node_are_deleted_by_a_live_one_and_a_live_nodes_are_kept() {
    let service = message_service("127.0.0.1:0");
    let env = [
        ("CHATD_PRESENCE__NODE_LEASE_SECS", "2"),
        ("CHATD_KAFKA__DRAIN_SECS", "2"),
        ("CHATD_KAFKA__ABANDONED_SECS", "2"),
    ];
    let (gone_id, live_id) = (unique("gone"), unique("sweeper"));
    let mut gone = node_with(&gone_id, &service.addr, &env);
    let live = node_with(&live_id, &service.addr, &env);
    let before = topics_of(&gone_id);
    assert_eq!(before.len(), 1, "{before:?}");
    // SIGKILL: it cannot delete its own topic.
    gone.kill();
    eventually("the live node deletes the killed node's topic", || {
        let gone_id = gone_id.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::spawn_blocking(move || topics_of(&gone_id).is_empty())
                .await
                .unwrap()
        }
    })
    .await;
    // A few more lease ticks: the live node's own topic stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id = live_id.clone();
    let kept = tokio::task::spawn_blocking(move || topics_of(&id))
        .await
        .unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let log = std::fs::read_to_string(&live.log).unwrap();
    assert!(
        log.contains("deleted the topics of nodes without a lease"),
        "{log}"
    );
}

/// A Redis Cluster whose master of the receiver's keys is SIGKILLed mid-stream: a replica
/// takes over, and with `store.wait_replicas = 1` every acknowledged message was on it, so
/// none is lost or repeated. The killed node comes back as the new master's replica (with
/// one replica per master, a master without one refuses writes until then).
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_master_killed_mid_stream_fails_over_and_loses_nothing_acknowledged() {
    let mut cluster = TestCluster::start();
    let seeds = cluster.seeds();
    let mut command = chatd();
    command
        .args([
            "message-service",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "redis",
        ])
        .args(["--redis", &seeds, "--redis-cluster"])
        .env("CHATD_STORE__WAIT_REPLICAS", "1");
    let service = Proc::spawn(command, "message-service");
    let node = node(&unique("dur-fo"), &service.addr);
    outage_under_traffic(&node, &service.addr, 1500, Seen::Any, |_, receiver| {
        let key = chatd::store::redis::seq_key(receiver);
        let master = cluster
            .master_of(&key)
            .expect("a master serves the receiver's keys");
        cluster.kill(master);
        let started = std::time::Instant::now();
        while cluster.master_of(&key).is_none_or(|m| m == master) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no replica took over"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster.restart(master);
    })
    .await;
    cluster.wait_until_healthy();
}
