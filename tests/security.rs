//! Who may connect, and what hostile or broken clients can do: tokens, origins, limits,
//! floods, oversized frames and handshakes, and the RFC 6455 rules a server must keep.

mod common;

use std::time::Duration;

use chatd::client::{Client, ClientError, Incoming};
use chatd::config::{AuthMode, Config};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

fn token_config() -> Config {
    let mut c = config("sec");
    c.auth.mode = AuthMode::Token;
    c.auth.secret = SECRET.into();
    c
}

fn token(user: &str, ttl: i64) -> String {
    let now = chatd::chat::ids::now_ms() / 1000;
    chatd::auth::sign(SECRET.as_bytes(), user, now, now + ttl)
}

#[tokio::test]
async fn operator_data_needs_an_operator_token_in_token_mode() {
    let mut c = token_config();
    c.auth.operators = vec!["ops".into()];
    let node = start(c).await;
    let (status, body) = node.get("/api/cluster").await;
    assert_eq!((status, &body["error"]), (401, &json!("INVALID_TOKEN")));
    let (status, body) = node
        .get(&format!("/api/cluster?token={}", token("alice", 60)))
        .await;
    assert_eq!((status, &body["error"]), (403, &json!("NOT_OPERATOR")));
    assert!(body["message"].as_str().unwrap().contains("auth.operators"));
    let (status, body) = node
        .get(&format!("/api/cluster?token={}", token("ops", -5)))
        .await;
    assert_eq!(
        (status, &body["error"]),
        (401, &json!("INVALID_TOKEN")),
        "expired"
    );
    let (status, body) = node
        .get(&format!("/api/cluster?token={}", token("ops", 60)))
        .await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(
        (&body["nodes"][0]["nodeId"], &body["nodes"][0]["up"]),
        (&json!("sec"), &json!(true)),
        "{body:#}"
    );
    // The pages themselves hold no data: served to anyone.
    assert_eq!(node.get("/dashboard").await.0, 200);
    node.stop().await;
}

async fn refused(url: &str) -> (u16, serde_json::Value) {
    match Client::connect_url(url, WAIT).await {
        Err(ClientError::Refused {
            status,
            body,
            url: shown,
        }) => {
            assert!(!shown.contains("eyJ"), "the error shows a token: {shown}");
            (status, serde_json::from_str(&body).expect("JSON body"))
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got a connection"),
    }
}

#[tokio::test]
async fn token_mode_refuses_missing_forged_foreign_and_expired_tokens() {
    let node = start(token_config()).await;
    let base = format!("{}/ws/chat", node.ws());
    let now = chatd::chat::ids::now_ms() / 1000;
    let foreign = chatd::auth::sign(
        b"a different secret that is long enough",
        "alice",
        now,
        now + 60,
    );
    let expired = chatd::auth::sign(SECRET.as_bytes(), "alice", now - 120, now - 60);
    for (query, why) in [
        ("?userId=alice".to_string(), "no token"),
        (format!("?token={foreign}"), "signature"),
        (format!("?token={expired}"), "expired"),
        ("?token=not.a.jwt".to_string(), "malformed"),
    ] {
        let (status, body) = refused(&format!("{base}{query}")).await;
        assert_eq!(
            (status, &body["error"]),
            (401, &json!("INVALID_TOKEN")),
            "{query}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(why) || message.contains("token"),
            "{query}: {message}"
        );
    }
    // A good token whose user is not the claimed userId.
    let (status, body) = refused(&format!("{base}?token={}&userId=bob", token("alice", 60))).await;
    assert_eq!((status, &body["error"]), (403, &json!("USER_MISMATCH")));

    // Good tokens, in the query and in the Authorization header: the user is the token's.
    let mut a = Client::connect_url(&format!("{base}?token={}", token("alice", 60)), WAIT)
        .await
        .unwrap();
    assert_eq!(a.welcome["userId"], "alice");
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = base.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("bob", 60)).parse().unwrap(),
    );
    let (mut bob, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use futures_util::StreamExt;
    let welcome = bob.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("\"userId\":\"bob\""));

    // The sender is the token's user, whatever a frame claims.
    a.send_json(&json!({"type": "CHAT_MESSAGE", "senderId": "bob", "receiverId": "carol", "chatId": "c", "content": "x"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut a, "ERROR").await["code"], "FORBIDDEN");
    node.stop().await;
}

/// In token mode a chat's history is the token's user's: a member reads it, anyone else is
/// refused (403), a token for one user cannot name another (`?userId=`), and no token is 401.
#[tokio::test]
async fn history_in_token_mode_is_only_for_the_tokens_user_if_a_member() {
    let node = start(token_config()).await;
    let url = format!("{}/ws/chat?token={}", node.ws(), token("alice", 60));
    let mut a = Client::connect_url(&url, WAIT).await.unwrap();
    a.send_json(&chat("bob", "for bob only", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut a, "MESSAGE_ACK").await;
    let page =
        |user: &str, extra: &str| format!("/api/chat/history/c1?token={}{extra}", token(user, 60));
    for user in ["alice", "bob"] {
        let (status, body) = node.get(&page(user, "")).await;
        assert_eq!(status, 200, "{user}: {body}");
        assert_eq!(body["messages"][0]["messageId"], ack["messageId"]);
    }
    let (status, body) = node.get(&page("eve", "")).await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("FORBIDDEN")),
        "{body}"
    );
    let (status, body) = node.get(&page("eve", "&userId=alice")).await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("USER_MISMATCH")),
        "{body}"
    );
    let (status, body) = node.get("/api/chat/history/c1?userId=alice").await;
    assert_eq!(
        (status, &body["error"]),
        (401, &json!("INVALID_TOKEN")),
        "{body}"
    );
    node.stop().await;
}

/// In token mode a group is made and changed as the token's user: its creator is the
/// token's user, a token cannot act as another (`?userId=`), and no token is 401.
#[tokio::test]
async fn groups_in_token_mode_act_as_the_tokens_user() {
    let node = start(token_config()).await;
    let group = json!({"groupId": "team", "members": ["bob"]});
    let as_user = |user: &str| format!("/api/groups?token={}", token(user, 60));
    let (status, body) = http_send(node.addr, "POST", "/api/groups?userId=alice", &group).await;
    assert_eq!(
        (status, &body["error"]),
        (401, &json!("INVALID_TOKEN")),
        "{body}"
    );
    let mismatch = format!("{}&userId=eve", as_user("alice"));
    let (status, body) = http_send(node.addr, "POST", &mismatch, &group).await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("USER_MISMATCH")),
        "{body}"
    );
    let (status, body) = http_send(node.addr, "POST", &as_user("alice"), &group).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["members"][0],
        json!({"userId": "alice", "role": "admin"})
    );
    // bob (a member, not an admin) may not add eve; alice may.
    let add = |user: &str| format!("/api/groups/team/members?token={}", token(user, 60));
    let eve = json!({"userId": "eve"});
    let (status, body) = http_send(node.addr, "POST", &add("bob"), &eve).await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("FORBIDDEN")),
        "{body}"
    );
    let (status, body) = http_send(node.addr, "POST", &add("alice"), &eve).await;
    assert_eq!(status, 200, "{body}");
    node.stop().await;
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let node = start(token_config()).await;
    let url = format!("{}/ws/chat?token={}", node.ws(), token("alice", 2));
    let mut a = Client::connect_url(&url, WAIT).await.unwrap();
    match a.next(WAIT).await {
        Ok(Incoming::Closed { code, reason }) => {
            assert_eq!(code, 1008);
            assert!(reason.contains("expired"), "{reason}");
        }
        other => panic!("expected a close when the token expires, got {other:?}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn tokens_never_reach_the_logs_and_chatd_token_makes_working_ones() {
    let out = chatd()
        .args(["token", "--user", "alice", "--ttl", "10m"])
        .env("CHATD_AUTH__SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let claims = chatd::auth::verify(
        SECRET.as_bytes(),
        &minted,
        chatd::chat::ids::now_ms() / 1000,
    )
    .unwrap();
    assert_eq!(claims.sub, "alice");
    // Without a secret it says what to set.
    let out = chatd().args(["token", "--user", "alice"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.secret"));

    let mut node = Proc::serve(
        "logs",
        &[],
        &[
            ("CHATD_AUTH__MODE", "token"),
            ("CHATD_AUTH__SECRET", SECRET),
            ("RUST_LOG", "trace"),
        ],
    );
    let addr = node.addr.clone();
    let mut ok = Client::connect_url(&format!("ws://{addr}/ws/chat?token={minted}"), WAIT)
        .await
        .unwrap();
    ok.send_json(&chat("bob", "hi", "t")).await.unwrap();
    expect(&mut ok, "MESSAGE_ACK").await;
    let bad = format!("{minted}x");
    let _ = Client::connect_url(&format!("ws://{addr}/ws/chat?token={bad}"), WAIT).await;
    ok.close().await;
    node.terminate();
    node.wait_exit(WAIT);
    // Every line it logged, the last ones (shutdown) included.
    let logs = node.log_text();
    let signature = minted.rsplit('.').next().unwrap();
    assert!(
        logs.contains("connected"),
        "the node logged nothing? {logs}"
    );
    assert!(
        !logs.contains(signature),
        "a token signature is in the logs:\n{logs}"
    );
    assert!(
        !logs.contains("token=eyJ"),
        "a token is in the logs:\n{logs}"
    );
}

#[tokio::test]
async fn origins_outside_the_allowlist_are_refused_before_the_upgrade() {
    let mut c = config("origin");
    c.server.allowed_origins = vec!["https://app.example".into()];
    let node = start(c).await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    for (origin, ok) in [
        (Some("https://app.example"), true),
        (Some("https://evil.example"), false),
        (None, true),
    ] {
        let mut request = format!("{}/ws/chat?userId=alice", node.ws())
            .into_client_request()
            .unwrap();
        if let Some(o) = origin {
            request.headers_mut().insert("Origin", o.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => assert!(ok, "{origin:?} was let in"),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert!(!ok, "{origin:?} was refused");
                assert_eq!(r.status(), 403);
                let body =
                    String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
                assert!(body.contains("ORIGIN_NOT_ALLOWED"), "{body}");
            }
            Err(e) => panic!("{e}"),
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn floods_are_rate_limited_then_closed_while_neighbours_carry_on() {
    let mut c = config("flood");
    c.server.rate_limit_per_sec = 5;
    c.server.rate_limit_burst = 5;
    c.server.rate_limit_strikes = 30;
    c.server.rate_limit_grace_ms = 200;
    let node = start(c).await;
    let mut bob = node.client("bob").await;
    let mut flooder = node.client("flooder").await;
    for i in 0..20 {
        flooder
            .send_json(&chat("bob", "spam", &format!("f{i}")))
            .await
            .unwrap();
    }
    let (mut acks, mut limited) = (0, 0);
    for _ in 0..20 {
        let f = flooder.next_frame(WAIT).await.unwrap();
        match f["type"].as_str().unwrap() {
            "MESSAGE_ACK" => acks += 1,
            "ERROR" => {
                assert_eq!(f["code"], "RATE_LIMITED");
                assert!(f["tempMessageId"].as_str().unwrap().starts_with('f'));
                limited += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert!(acks >= 5 && limited >= 10, "acks {acks}, limited {limited}");
    // Keeps flooding, well past the grace (200 frames a second for 0.8 s): closed with 1008.
    for i in 0..160 {
        if flooder
            .send_json(&chat("bob", "spam", &format!("g{i}")))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut closed = None;
    while let Ok(incoming) = flooder.next(WAIT).await {
        if let Incoming::Closed { code, .. } = incoming {
            closed = Some(code);
            break;
        }
    }
    assert_eq!(closed, Some(1008));
    // The neighbour got what was accepted, and still works.
    for _ in 0..acks {
        expect(&mut bob, "CHAT_MESSAGE").await;
    }
    bob.send_json(&json!({"type": "HEARTBEAT"})).await.unwrap();
    expect(&mut bob, "HEARTBEAT_ACK").await;
    node.stop().await;
}

#[tokio::test]
async fn one_pipelined_burst_is_refused_but_does_not_close_the_connection() {
    // Default grace; strikes so few that refusals in a row would close at once.
    let mut c = config("burst-once");
    c.server.rate_limit_per_sec = 10;
    c.server.rate_limit_burst = 5;
    c.server.rate_limit_strikes = 3;
    let node = start(c).await;
    let mut bob = node.client("bob").await;
    let mut alice = node.client("alice").await;
    for i in 0..60 {
        alice
            .send_json(&chat("bob", "burst", &format!("b{i}")))
            .await
            .unwrap();
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    while acked.len() + refused.len() < 60 {
        let f = alice.next_frame(WAIT).await.unwrap();
        let temp = f["tempMessageId"].as_str().unwrap().to_string();
        match (f["type"].as_str().unwrap(), f["code"].as_str()) {
            ("MESSAGE_ACK", _) => acked.push(temp),
            ("ERROR", Some("RATE_LIMITED")) => refused.push(temp),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        acked.len() >= 5 && refused.len() >= 40,
        "{} acked",
        acked.len()
    );
    // Told, it slows down and sends the refused ones again under the rate: all go through,
    // on the same connection.
    for temp in &refused {
        tokio::time::sleep(Duration::from_millis(120)).await;
        alice.send_json(&chat("bob", "again", temp)).await.unwrap();
        let ack = expect(&mut alice, "MESSAGE_ACK").await;
        assert_eq!(ack["tempMessageId"], temp.as_str());
    }
    for _ in 0..60 {
        expect(&mut bob, "CHAT_MESSAGE").await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_flooder_that_reads_late_still_gets_its_errors_and_the_close_frame() {
    // Default strikes; a client that sends 3,000 frames (and for longer than the grace)
    // before reading anything.
    let mut c = config("flood-late");
    c.server.rate_limit_per_sec = 5;
    c.server.rate_limit_burst = 5;
    c.server.rate_limit_strikes = chatd::config::Config::default().server.rate_limit_strikes;
    c.server.rate_limit_grace_ms = 100;
    let node = start(c).await;
    let mut flooder = node.client("flooder").await;
    // Enough bytes that much of it is still unread when the node closes.
    let spam = "s".repeat(4000);
    let began = std::time::Instant::now();
    for i in 0.. {
        if (i >= 3000 && began.elapsed() > Duration::from_millis(300))
            || flooder
                .send_json(&chat("bob", &spam, &format!("f{i}")))
                .await
                .is_err()
        {
            break;
        }
    }
    let mut limited = 0;
    let mut other = Vec::new();
    let closed = loop {
        match flooder.next(WAIT).await {
            Ok(Incoming::Frame(f)) if f["code"] == "RATE_LIMITED" => limited += 1,
            Ok(Incoming::Frame(f)) => {
                other.push(f["type"].to_string() + " " + &f["code"].to_string())
            }
            Ok(Incoming::Closed { code, .. }) => break code,
            Err(e) => {
                panic!("after {limited} RATE_LIMITED: {e} (a reset instead of a close frame)")
            }
        }
    };
    assert!(
        limited >= 1,
        "the client was told why before being closed (closed {closed}, other frames {other:?})"
    );
    assert_eq!(closed, 1008);
    node.stop().await;
}

#[tokio::test]
async fn devices_per_user_and_connections_per_node_are_capped() {
    let mut c = config("caps");
    c.server.max_devices_per_user = 2;
    c.server.max_connections = 3;
    let node = start(c).await;
    let _a1 = node.client("alice").await;
    let _a2 = node.client("alice").await;
    let (status, body) = refused(&format!("{}/ws/chat?userId=alice", node.ws())).await;
    assert_eq!((status, &body["error"]), (429, &json!("TOO_MANY_DEVICES")));
    let _b = node.client("bob").await;
    let (status, body) = refused(&format!("{}/ws/chat?userId=carol", node.ws())).await;
    assert_eq!((status, &body["error"]), (503, &json!("NODE_FULL")));
    node.stop().await;
}

#[tokio::test]
async fn concurrent_connects_of_one_user_cannot_pass_the_device_cap_together() {
    let mut c = config("caps-race");
    c.server.max_devices_per_user = 3;
    let node = start(c).await;
    let url = format!("{}/ws/chat?userId=alice", node.ws());
    let attempts: Vec<_> = (0..24)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::connect_url(&url, WAIT).await })
        })
        .collect();
    let mut connected = Vec::new();
    let mut refused = 0;
    for a in attempts {
        match a.await.unwrap() {
            Ok(client) => connected.push(client),
            Err(ClientError::Refused { status: 429, .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((connected.len(), refused), (3, 21));
    // A place comes back when a device leaves.
    drop(connected.pop());
    eventually("alice's place comes back", || async {
        Client::connect_url(&url, WAIT).await.is_ok()
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn huge_headers_and_queries_are_refused_quickly_and_harm_nobody() {
    let node = start(config("big")).await;
    let mut bob = node.client("bob").await;
    // A 10 KB query: 414 from the handshake check; a 100 KB one: 414 from the HTTP layer.
    let (status, body) = http_get(
        node.addr,
        &format!("/ws/chat?userId=a&pad={}", "x".repeat(10_000)),
    )
    .await;
    assert_eq!(status, 414, "{body}");
    assert!(body.contains("QUERY_TOO_LONG"), "{body}");
    // Longer than any client's URI limit (hyper's stops at 64 KiB): written by hand.
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "GET /ws/chat?userId=a&pad={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "x".repeat(100_000)
    );
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer:.200}");
    // A 2 MB header (CVE-2023-43669 was one long header): refused by the HTTP layer without
    // reading it all; the node answers the next request at once.
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "GET /ws/chat?userId=a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(2_000_000)
    );
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    // Answered and closed in time (a reset counts as refused); a hang fails here.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("the node refuses the huge header instead of waiting for more");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty()
            || answer.starts_with("HTTP/1.1 431")
            || answer.starts_with("HTTP/1.1 400"),
        "{answer:.200}"
    );
    bob.send_json(&json!({"type": "HEARTBEAT"})).await.unwrap();
    expect(&mut bob, "HEARTBEAT_ACK").await;
    assert_eq!(node.get("/api/chat/health").await.0, 200);
    node.stop().await;
}

#[tokio::test]
async fn giant_frames_are_refused_from_their_header() {
    let node = start(config("giant")).await;
    for size in [1usize << 20, 16 << 20] {
        let mut raw = RawWs::connect(node.addr, "giant").await;
        raw.text_of_type("CONNECTED").await;
        // Only the header and a few bytes of a 1 MiB / 16 MiB frame: the close comes anyway,
        // so the server did not wait to buffer the payload.
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(size as u64).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4, b'x', b'y']);
        raw.send(&header).await;
        assert_eq!(raw.close_code().await, Some(1009), "{size}");
    }
    node.stop().await;
}

#[tokio::test]
async fn rfc6455_rules_the_server_keeps() {
    let node = start(config("rfc")).await;
    let mut bob = node.client("bob").await;
    let hb = br#"{"type":"HEARTBEAT","content":"ping"}"#;

    // A text message in three fragments, with a ping between them: pong with the same
    // payload, then the reassembled message is answered.
    let mut raw = RawWs::connect(node.addr, "frag").await;
    raw.text_of_type("CONNECTED").await;
    raw.send(&RawWs::frame(false, 0x1, &hb[..10], true, 0))
        .await;
    raw.send(&RawWs::frame(true, 0x9, b"are you there", true, 0))
        .await;
    raw.send(&RawWs::frame(false, 0x0, &hb[10..20], true, 0))
        .await;
    raw.send(&RawWs::frame(true, 0x0, &hb[20..], true, 0)).await;
    let (opcode, payload) = raw.read().await.unwrap();
    assert_eq!(
        (opcode, payload.as_slice()),
        (0xA, b"are you there".as_slice())
    );
    assert_eq!(raw.text_of_type("HEARTBEAT_ACK").await["content"], "pong");

    // The close handshake: the server answers a close with a close.
    raw.send(&RawWs::frame(
        true,
        0x8,
        &[0x03, 0xE8, b'b', b'y', b'e'],
        true,
        0,
    ))
    .await;
    assert_eq!(raw.close_code().await, Some(1000));

    // Protocol violations close with 1002: an unmasked client frame, reserved bits, a
    // fragmented control frame, a continuation with nothing to continue, an oversized ping.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked", RawWs::frame(true, 0x1, hb, false, 0)),
        ("reserved bits", RawWs::frame(true, 0x1, hb, true, 0b100)),
        ("fragmented ping", RawWs::frame(false, 0x9, b"x", true, 0)),
        ("stray continuation", RawWs::frame(true, 0x0, hb, true, 0)),
        (
            "ping over 125 bytes",
            RawWs::frame(true, 0x9, &[b'p'; 200], true, 0),
        ),
        ("unknown opcode", RawWs::frame(true, 0x3, b"?", true, 0)),
    ];
    for (name, bytes) in cases {
        let mut raw = RawWs::connect(node.addr, "rude").await;
        raw.text_of_type("CONNECTED").await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, Some(1002), "{name}");
    }
    // Nobody else noticed.
    bob.send_json(&json!({"type": "HEARTBEAT"})).await.unwrap();
    expect(&mut bob, "HEARTBEAT_ACK").await;
    node.stop().await;
}

#[tokio::test]
async fn a_thousand_stalled_sockets_do_not_slow_ordinary_clients() {
    let node = start(config("stall")).await;
    // Half never finish their handshake, half upgrade and then neither read nor write.
    let mut stalled = Vec::new();
    for i in 0..500 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET /ws/chat?userId=slow HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
        let raw = RawWs::connect(node.addr, &format!("stalled{i}")).await;
        stalled.push(raw.stream);
    }
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    for i in 0..50 {
        alice
            .send_json(&chat("bob", "still flowing", &format!("t{i}")))
            .await
            .unwrap();
        expect(&mut alice, "MESSAGE_ACK").await;
        expect(&mut bob, "CHAT_MESSAGE").await;
    }
    assert_eq!(node.node.sessions.session_count(), 502);
    drop(stalled);
    node.stop().await;
}

#[test]
fn auth_none_off_loopback_is_announced_loudly() {
    let node = Proc::serve("loud", &[], &[("CHATD_SERVER__HOST", "0.0.0.0")]);
    // Logged right after the address.
    let deadline = std::time::Instant::now() + WAIT;
    while !node.log_text().contains("AUTH IS OFF") {
        assert!(
            std::time::Instant::now() < deadline,
            "no AUTH IS OFF warning when listening on 0.0.0.0 with auth.mode none: {}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_cut_off() {
    let mut c = config("slowloris");
    c.server.header_read_timeout_ms = 300;
    let node = start(c).await;
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"GET /ws/chat?userId=slow HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The rest of the head never comes: the node closes the socket (an error status or EOF).
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("the node closed the stalled socket")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    node.stop().await;
}
