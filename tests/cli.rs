//! The `chatd` binary as users run it: `serve` with config errors and SIGTERM, `send` and
//! `connect` against a real node, and completions that match the CLI.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chatd::client::Incoming;
use clap_complete::Shell;
use common::*;

/// Runs `chatd ARGS` to completion off the async runtime (the node under test runs on it).
async fn run_chatd(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || chatd().args(&args).output().unwrap())
        .await
        .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Runs `chatd connect ARGS` in the background: writes `input` to its stdin, keeps stdin
/// open `hold` longer, then closes it; the handle gives its output.
fn run_connect(
    args: Vec<String>,
    input: String,
    hold: Duration,
) -> tokio::task::JoinHandle<std::process::Output> {
    tokio::task::spawn_blocking(move || {
        let mut child = chatd()
            .arg("connect")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        std::thread::sleep(hold);
        drop(stdin);
        child.wait_with_output().unwrap()
    })
}

#[tokio::test]
async fn sigterm_closes_sessions_with_1001_and_exits_zero() {
    let mut node = Proc::serve("proc1", &[], &[]);
    let mut client = chatd::client::Client::connect(&node.ws(), "alice", WAIT)
        .await
        .unwrap();
    node.terminate();
    match client.next(WAIT).await {
        Ok(Incoming::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let status = node.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn send_prints_the_id_and_route_and_fails_on_error() {
    let node = start(config("n1")).await;
    let mut bob = node.client("bob").await;
    let out = run_chatd(strings(&[
        "send",
        "--url",
        &node.ws(),
        "--from",
        "alice",
        "--to",
        "bob",
        "hello there",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("-n1 route=local"), "{stdout}");
    assert_eq!(
        expect(&mut bob, "CHAT_MESSAGE").await["content"],
        "hello there"
    );

    // --count and --json: one line per ack.
    let out = run_chatd(strings(&[
        "send",
        "--url",
        &node.ws(),
        "--from",
        "alice",
        "--to",
        "bob",
        "--count",
        "30",
        "--json",
        "n",
    ]))
    .await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 30);

    // To a group: its members get it; a group the sender is not in is refused.
    let create = serde_json::json!({"groupId": "g1", "members": ["bob"]});
    let (status, _) = http_send(node.addr, "POST", "/api/groups?userId=alice", &create).await;
    assert_eq!(status, 201);
    let to_group = |from: &str| {
        strings(&[
            "send",
            "--url",
            &node.ws(),
            "--from",
            from,
            "--group",
            "g1",
            "all of us",
        ])
    };
    let out = run_chatd(to_group("alice")).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (After the 30 of --count above.)
    let m = loop {
        let m = expect(&mut bob, "CHAT_MESSAGE").await;
        if m["groupId"].is_string() {
            break m;
        }
    };
    assert_eq!(
        (&m["groupId"], &m["content"]),
        (&serde_json::json!("g1"), &serde_json::json!("all of us"))
    );
    let out = run_chatd(to_group("eve")).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FORBIDDEN"));

    // Refused by the server: non-zero with the reason.
    let out = run_chatd(strings(&[
        "send",
        "--url",
        &node.ws(),
        "--from",
        "alice",
        "--to",
        "not valid",
        "x",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_FIELD"));

    // Nobody listening: non-zero, and it says where it tried.
    let out = chatd()
        .args([
            "send",
            "--url",
            "ws://127.0.0.1:1",
            "--from",
            "a",
            "--to",
            "b",
            "--timeout",
            "2",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
    node.stop().await;
}

#[tokio::test]
async fn connect_json_mode_sends_stdin_frames_and_prints_every_frame() {
    let node = start(config("n1")).await;
    let mut bob = node.client("bob").await;
    let url = node.ws();
    let input = concat!(
        r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":"from a script","tempMessageId":"s1"}"#,
        "\ngarbage\n"
    );
    let out = run_connect(
        strings(&["--url", &url, "--user", "alice", "--json", "--linger", "1"]),
        input.into(),
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect();
    let types: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    // The error for the garbage line may come before the ack of the message sent first: a
    // chat message is acked once stored, a bad frame refused at once (README: acks keep send
    // order among chat messages only).
    assert_eq!(types[0], "CONNECTED", "{frames:?}");
    let ack = frames.iter().find(|f| f["type"] == "MESSAGE_ACK");
    let error = frames.iter().find(|f| f["type"] == "ERROR");
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(ack.expect("an ack")["tempMessageId"], "s1");
    assert_eq!(error.expect("an error")["code"], "INVALID_JSON");
    assert_eq!(
        expect(&mut bob, "CHAT_MESSAGE").await["content"],
        "from a script"
    );
    node.stop().await;
}

#[test]
fn config_errors_stop_start_up_naming_the_key() {
    let out = chatd()
        .args(["serve", "--port", "0"])
        .env("CHATD_SERVER__PROT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CHATD_SERVER__PROT") && err.contains("prot"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("chatd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nidle_timeout_ms = \"soon\"\n").unwrap();
    let out = chatd()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("idle_timeout_ms"),
        "{err}"
    );

    let out = chatd()
        .args(["serve", "--profile", "node7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node7.toml"));
}

/// `kafka.properties` reach the node's broker clients: told to speak TLS, the node opens its
/// connections to the broker with a TLS handshake (seen by a listener of the test's own, so
/// the shared broker never gets bytes it cannot read), cannot subscribe, and says where to
/// look. A value librdkafka refuses stops start-up as a configuration error naming it.
#[test]
fn kafka_properties_reach_the_broker_clients() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker = listener.local_addr().unwrap().to_string();
    let (first_bytes, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut head = [0u8; 3];
            let read = stream.and_then(|mut s| std::io::Read::read_exact(&mut s, &mut head));
            let _ = first_bytes.send(read.map(|_| head).ok());
        }
    });
    let out = chatd()
        .args(["serve", "--profile", "node1", "--port", "0", "--node-id"])
        .arg(unique("props"))
        .env("CHATD_KAFKA__BROKERS", &broker)
        .env("CHATD_KAFKA__PUBLISH_TIMEOUT_MS", "1000")
        .env("CHATD_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "ssl")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot subscribe to the bus") && err.contains("kafka.properties"),
        "{err}"
    );
    // A TLS record of type handshake (22), version 3.x: not a Kafka request.
    let head = seen
        .recv_timeout(WAIT)
        .unwrap()
        .expect("the node connected");
    assert_eq!(head[..2], [22, 3], "{head:?}");

    let out = chatd()
        .args(["serve", "--port", "0"])
        .env("CHATD_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "nope")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("kafka.properties") && err.contains("security.protocol"),
        "{err}"
    );
}

#[test]
fn profiles_and_print_config() {
    let out = chatd()
        .args(["serve", "--profile", "node2", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("port = 9431") && text.contains("node_id = \"node2\""),
        "{text}"
    );

    let out = chatd()
        .args([
            "serve",
            "--profile",
            "node1",
            "--port",
            "9555",
            "--print-config",
        ])
        .env("CHATD_SERVER__NODE_ID", "from-env")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("port = 9555") && text.contains("node_id = \"from-env\""),
        "{text}"
    );
}

#[test]
fn committed_completions_match_the_cli() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("completions");
    for (shell, file) in [
        (Shell::Bash, "chatd.bash"),
        (Shell::Zsh, "_chatd"),
        (Shell::Fish, "chatd.fish"),
    ] {
        let generated = chatd::cli::completions(shell);
        let path = dir.join(file);
        if std::env::var_os("UPDATE_COMPLETIONS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is out of date: run `UPDATE_COMPLETIONS=1 cargo test --release --test cli completions`",
            path.display()
        );
        // The binary prints the same thing.
        let out = chatd()
            .args(["completions", &shell.to_string()])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), generated);
    }
}

fn wait_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?}; saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_interactive_commands_for_a_person() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    let mut child = chatd()
        .args([
            "connect",
            "--url",
            &node.ws(),
            "--user",
            "bob",
            "--interactive",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let welcome = tokio::task::block_in_place(|| wait_line(&lines, "connected to node n1 as bob"));
    assert!(welcome.contains("/help"), "{welcome}");

    alice.send_json(&chat("bob", "hi bob", "t1")).await.unwrap();
    let id = expect(&mut alice, "MESSAGE_ACK").await["messageId"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = tokio::task::block_in_place(|| wait_line(&lines, "alice -> you: hi bob"));
    assert!(shown.contains(&id), "{shown}");

    writeln!(stdin, "/read {id}").unwrap();
    let r = expect(&mut alice, "READ_RECEIPT").await;
    assert_eq!(
        (&r["messageId"], &r["readerId"]),
        (&serde_json::json!(id), &serde_json::json!("bob"))
    );

    writeln!(stdin, "@alice hello back").unwrap();
    let m = expect(&mut alice, "CHAT_MESSAGE").await;
    assert_eq!(
        (&m["content"], &m["chatId"]),
        (
            &serde_json::json!("hello back"),
            &serde_json::json!("alice_bob")
        )
    );
    tokio::task::block_in_place(|| wait_line(&lines, "route local"));

    writeln!(stdin, "/typing alice").unwrap();
    assert_eq!(expect(&mut alice, "TYPING").await["content"], "typing");
    alice
        .send_json(&serde_json::json!({"type": "TYPING", "receiverId": "bob", "chatId": "alice_bob", "content": "typing"}))
        .await
        .unwrap();
    tokio::task::block_in_place(|| wait_line(&lines, "alice is typing"));

    writeln!(stdin, "/quit").unwrap();
    let status = tokio::task::block_in_place(|| wait_exit(&mut child, Duration::from_secs(10)));
    assert!(status.success());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_sends_heartbeats_by_itself() {
    let mut c = config("n1");
    c.server.heartbeat_interval_ms = 100;
    c.server.idle_timeout_ms = 400;
    let node = start(c).await;
    let url = node.ws();
    // Silent on stdin for well over the idle timeout.
    let out = run_connect(
        strings(&["--url", &url, "--user", "alice", "--json", "--linger", "0"]),
        String::new(),
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks = String::from_utf8_lossy(&out.stdout)
        .matches("HEARTBEAT_ACK")
        .count();
    assert!(
        acks >= 5,
        "expected heartbeats every 100 ms, got {acks} acks"
    );
    node.stop().await;
}

/// Runs `chatd send --count {count}` against a node with these limits (per second, burst,
/// strikes); asserts every message acked and stored once.
async fn send_count_under_limits(limits: (u32, u32, u32), count: usize) {
    let mut c = config("n1");
    (
        c.server.rate_limit_per_sec,
        c.server.rate_limit_burst,
        c.server.rate_limit_strikes,
    ) = limits;
    let node = start(c).await;
    let count_arg = count.to_string();
    let out = run_chatd(strings(&[
        "send",
        "--url",
        &node.ws(),
        "--from",
        "alice",
        "--to",
        "bob",
        "--count",
        &count_arg,
        "--json",
        "n",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), count, "every message acknowledged once");
    assert_eq!(
        node.node.metrics.messages_received.get(),
        count as u64,
        "retries stored nothing twice"
    );
    node.stop().await;
}

#[tokio::test]
async fn send_count_paces_itself_under_the_rate_limit() {
    send_count_under_limits((20, 10, 20), 40).await;
}

#[tokio::test]
async fn send_count_finishes_under_the_default_limits() {
    // The default limits (20 a second, burst 40): 150 messages used to end in a reset or a
    // close (1008) after about 60.
    let d = chatd::config::Config::default().server;
    send_count_under_limits(
        (
            d.rate_limit_per_sec,
            d.rate_limit_burst,
            d.rate_limit_strikes,
        ),
        150,
    )
    .await;
}

#[tokio::test]
async fn bench_measures_a_spawned_node() {
    let out = run_chatd(strings(&[
        "bench",
        "--spawn",
        "--pairs",
        "3",
        "--messages",
        "20",
        "--idle",
        "20",
        "--json",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["delivered"], 60,
        "every message of every pair arrived"
    );
    assert!(report["messagesPerSec"].as_f64().unwrap() > 0.0);
    assert!(
        report["latencyMs"]["p50"].as_f64().unwrap()
            <= report["latencyMs"]["max"].as_f64().unwrap()
    );
    assert!(
        report["memory"]["rssWithIdleKiB"].as_u64().unwrap()
            >= report["memory"]["rssBeforeKiB"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_keeps_its_cursor_and_gets_what_it_missed_next_time() {
    let node = start(config("n1")).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let state = std::env::temp_dir().join(unique("cursors"));
    let url = node.ws();
    // Runs `chatd connect` as bob until stdin ends; returns the frames it printed.
    let run_bob = |extra: &'static [&'static str]| {
        let mut args = strings(&["--json", "--linger", "1.5", "--url", &url, "--user", &bob]);
        args.push("--state-dir".into());
        args.push(state.display().to_string());
        args.extend(strings(extra));
        let run = run_connect(args, String::new(), Duration::ZERO);
        async move {
            let out = run.await.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let mut a = node.client(&alice).await;
    let first = run_bob(&[]);
    // Sent while the first run is connected (it lingers 1.5 s after its stdin ends).
    eventually("bob is online", || async {
        node.node.sessions.devices_of(&bob) == 1
    })
    .await;
    for i in 1..=2 {
        a.send_json(&chat(&bob, &format!("live {i}"), &format!("l{i}")))
            .await
            .unwrap();
        expect(&mut a, "MESSAGE_ACK").await;
    }
    let first = first.await;
    let got: Vec<_> = first
        .iter()
        .filter(|f| f["type"] == "CHAT_MESSAGE")
        .collect();
    assert_eq!(got.len(), 2, "{first:?}");
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(state.join(format!("{bob}.cursor"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&saved["userId"], &saved["seq"]),
        (&serde_json::json!(bob), &serde_json::json!(2)),
        "{saved}"
    );

    // Bob is away: three more. The next run asks for what came after seq 2.
    for i in 3..=5 {
        a.send_json(&chat(&bob, &format!("away {i}"), &format!("w{i}")))
            .await
            .unwrap();
        expect(&mut a, "MESSAGE_ACK").await;
    }
    let second = run_bob(&[]).await;
    let got: Vec<_> = second
        .iter()
        .filter(|f| f["type"] == "CHAT_MESSAGE")
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (3, "away 3".to_string()),
            (4, "away 4".into()),
            (5, "away 5".into())
        ]
    );
    assert!(second
        .iter()
        .any(|f| f["type"] == "SYNCED" && f["seq"] == 5));
    // --since 0 replays everything.
    let all = run_bob(&["--since", "0"]).await;
    assert_eq!(
        all.iter().filter(|f| f["type"] == "CHAT_MESSAGE").count(),
        5
    );
    let _ = std::fs::remove_dir_all(&state);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_paces_its_sends_under_the_nodes_rate_limit() {
    let mut c = config("n1");
    c.server.rate_limit_per_sec = 20;
    c.server.rate_limit_burst = 10;
    let node = start(c).await;
    let url = node.ws();
    let lines: String = (0..50)
        .map(|i| {
            format!(
                "{{\"type\":\"CHAT_MESSAGE\",\"receiverId\":\"bob\",\"chatId\":\"c\",\"content\":\"m{i}\",\"tempMessageId\":\"p{i}\"}}\n"
            )
        })
        .collect();
    // All at once: a script piping a file.
    let out = run_connect(
        strings(&["--json", "--linger", "0", "--url", &url, "--user", "pacer"]),
        lines,
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("\"MESSAGE_ACK\"").count(), 50, "{stdout}");
    assert!(!stdout.contains("RATE_LIMITED"), "{stdout}");
    node.stop().await;
}
