//! Connections over time: idle timeout, heartbeats, graceful shutdown, slow readers; and the
//! REST API and test page that report on them.

mod common;

use std::time::Duration;

use chatd::client::{ClientError, Incoming};
use common::*;
use serde_json::json;

#[tokio::test]
async fn idle_connection_is_closed_and_goes_offline() {
    let mut c = config("n1");
    c.server.heartbeat_interval_ms = 100;
    c.server.idle_timeout_ms = 500;
    let node = start(c).await;
    let mut idle = node.client("sleepy").await;
    let mut lively = node.client("lively").await;
    assert_eq!(
        node.get("/api/chat/online/status/sleepy").await.1["online"],
        true
    );

    // `lively` heartbeats well past the idle timeout and stays; `sleepy` is closed.
    for _ in 0..10 {
        lively
            .send_json(&json!({"type": "HEARTBEAT", "content": "ping"}))
            .await
            .unwrap();
        expect(&mut lively, "HEARTBEAT_ACK").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match idle.next(WAIT).await {
        Ok(Incoming::Closed { code, reason }) => {
            assert_eq!(code, 1000);
            assert!(reason.contains("idle"), "{reason}");
        }
        other => panic!("expected an idle close, got {other:?}"),
    }
    eventually("sleepy offline", || async {
        node.get("/api/chat/online/status/sleepy").await.1["online"] == false
    })
    .await;
    assert_eq!(
        node.get("/api/chat/online/status/lively").await.1["online"],
        true
    );
    node.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_sessions_with_1001_and_clears_presence() {
    let node = start(config("n1")).await;
    let mut a = node.client("alice").await;
    let mut b = node.client("bob").await;
    let inner = node.node.clone();
    let addr = node.addr;
    assert_eq!(
        inner.backends.presence.online_user_count().await.unwrap(),
        2
    );

    let stopping = tokio::spawn(node.stop());
    for c in [&mut a, &mut b] {
        match c.next(WAIT).await {
            Ok(Incoming::Closed { code, .. }) => assert_eq!(code, 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    stopping.await.unwrap();
    assert_eq!(
        inner.backends.presence.online_user_count().await.unwrap(),
        0
    );
    assert_eq!(inner.sessions.session_count(), 0);
    // Nothing listens any more.
    assert!(
        chatd::client::Client::connect(&format!("ws://{addr}"), "late", WAIT)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn slow_reader_is_cut_off_without_slowing_anyone_else() {
    let mut c = config("n1");
    c.server.send_queue_len = 8;
    c.server.max_content_chars = 8000;
    let node = start(c).await;
    let mut sender = node.client("sender").await;
    let _stalled = node.client("stalled").await; // never reads
    let mut reader = node.client("reader").await;

    // Enough data to fill the kernel's socket buffers towards `stalled` many times over.
    let big = "x".repeat(7000);
    let rounds = 3000;
    let read_all = tokio::spawn(async move {
        for _ in 0..rounds {
            expect(&mut reader, "CHAT_MESSAGE").await;
        }
        reader
    });
    for i in 0..rounds {
        sender
            .send_json(&chat("stalled", &big, &format!("s{i}")))
            .await
            .unwrap();
        sender
            .send_json(&chat("reader", "small", &format!("r{i}")))
            .await
            .unwrap();
        // Keep the sender's own acks flowing so the sender is never the slow one.
        if i % 50 == 49 {
            for _ in 0..100 {
                expect(&mut sender, "MESSAGE_ACK").await;
            }
        }
    }
    let _reader = tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the reading neighbour got every message")
        .unwrap();
    eventually("stalled reader closed", || async {
        node.node.metrics.slow_consumers_closed.get() >= 1
            && node.get("/api/chat/online/status/stalled").await.1["online"] == false
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn rest_health_status_and_stats() {
    let node = start(config("n1")).await;
    let (status, health) = node.get("/api/chat/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "UP");
    assert_eq!(health["service"], "chatd");
    assert_eq!(health["nodeId"], "n1");
    assert!(health["timestamp"].as_i64().unwrap() > 0);
    for dep in ["presence", "broker", "store"] {
        assert_eq!(health["checks"][dep]["status"], "UP", "{dep}");
    }

    let mut a1 = node.client("alice").await;
    let _a2 = node.client("alice").await;
    let _b = node.client("bob").await;
    let (status, s) = node.get("/api/chat/online/status/alice").await;
    assert_eq!(status, 200);
    assert_eq!(
        (&s["userId"], &s["online"], &s["devices"]),
        (&json!("alice"), &json!(true), &json!(2))
    );
    assert_eq!(s["nodes"], json!(["n1"]));
    let (_, s) = node.get("/api/chat/online/status/zed").await;
    assert_eq!(
        (&s["online"], &s["devices"], &s["nodes"]),
        (&json!(false), &json!(0), &json!([]))
    );
    let (status, s) = node.get("/api/chat/online/status/bad%20id").await;
    assert_eq!((status, &s["error"]), (400, &json!("INVALID_USER_ID")));

    a1.send_json(&chat("bob", "hi", "t")).await.unwrap();
    expect(&mut a1, "MESSAGE_ACK").await;
    let (_, stats) = node.get("/api/chat/online/stats").await;
    assert_eq!(stats["totalOnlineUsers"], 2);
    assert_eq!(stats["localOnlineUsers"], 2);
    assert_eq!(stats["activeWebSocketSessions"], 3);
    assert_eq!(stats["nodeId"], "n1");
    assert_eq!(stats["messages"]["messagesReceived"], 1);
    assert_eq!(stats["messages"]["messagesDeliveredLocal"], 2); // bob + alice's other device
    assert_eq!(stats["messages"]["connectionsTotal"], 3);

    let (status, body) = node.get("/nope").await;
    assert_eq!((status, &body["error"]), (404, &json!("NOT_FOUND")));
    node.stop().await;
}

#[tokio::test]
async fn the_pages_are_served_and_self_contained() {
    let node = start(config("n1")).await;
    let (_, root) = http_get(node.addr, "/").await;
    for path in ["/", "/test.html", "/dashboard"] {
        let (status, page) = http_get(node.addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(page.contains("<html"), "{path}");
        // No CDN, no external request: nothing loaded from another origin.
        for external in ["http://", "https://", "src=\"//", "<link"] {
            assert!(!page.contains(external), "{path} references {external}");
        }
    }
    let (_, test_page) = http_get(node.addr, "/test.html").await;
    assert_eq!(root, test_page, "/test.html is the chat page");
    assert!(root.contains("/ws/chat?") && root.contains("\"userId\""));
    for frame in [
        "CHAT_MESSAGE",
        "READ_RECEIPT",
        "TYPING",
        "HEARTBEAT",
        "MESSAGE_ACK",
        "SYNCED",
    ] {
        assert!(
            root.contains(frame),
            "the chat page does not handle {frame}"
        );
    }
    let (_, dashboard) = http_get(node.addr, "/dashboard").await;
    assert!(dashboard.contains("/api/cluster"));
    node.stop().await;
}

#[tokio::test]
async fn new_upgrades_are_refused_once_shutdown_begins() {
    let node = start(config("n1")).await;
    node.node.begin_shutdown();
    match chatd::client::Client::connect(&node.ws(), "late", WAIT).await {
        Err(ClientError::Refused { status, body, .. }) => {
            assert_eq!(status, 503);
            assert!(body.contains("SHUTTING_DOWN"), "{body}");
        }
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got a connection"),
    }
    let (status, health) = node.get("/api/chat/health").await;
    assert_eq!((status, &health["status"]), (503, &json!("DOWN")));
    node.stop().await;
}
