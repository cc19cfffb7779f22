//! The message path on one node, through real WebSocket clients: connect, send, ack, every
//! device, copies, offline, heartbeat, read receipts, typing, idempotent retries, moderation.

mod common;

use std::collections::HashSet;

use chatd::config::ModerationAction;
use common::*;
use serde_json::json;

#[tokio::test]
async fn connected_is_the_first_frame() {
    let node = start(config("n1")).await;
    let client = node.client("alice").await;
    assert_eq!(client.welcome["userId"], "alice");
    assert_eq!(client.welcome["nodeId"], "n1");
    assert_eq!(client.welcome["heartbeatIntervalMs"], 30_000);
    assert_eq!(
        client.welcome["rateLimitPerSec"], 1_000_000,
        "the test config's limit"
    );
    assert!(client.connection_id().starts_with('c'));
    node.stop().await;
}

#[tokio::test]
async fn message_reaches_every_receiver_device_and_sender_copies() {
    let node = start(config("n1")).await;
    let mut alice1 = node.client("alice").await;
    let mut alice2 = node.client("alice").await;
    let mut bob1 = node.client("bob").await;
    let mut bob2 = node.client("bob").await;

    alice1
        .send_json(&chat("bob", "hello bob", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice1, "MESSAGE_ACK").await;
    assert_eq!(ack["tempMessageId"], "t1");
    assert_eq!(ack["route"], "local");
    let id = ack["messageId"].as_str().unwrap().to_string();
    assert!(id.ends_with("-n1"), "{id}");

    for device in [&mut bob1, &mut bob2, &mut alice2] {
        let m = expect(device, "CHAT_MESSAGE").await;
        assert_eq!(m["messageId"], id.as_str());
        assert_eq!(m["senderId"], "alice");
        assert_eq!(m["receiverId"], "bob");
        assert_eq!(m["chatId"], "c1");
        assert_eq!(m["content"], "hello bob");
        assert_eq!(m["timestamp"], ack["timestamp"]);
    }
    // The sending device gets the ack, not a copy of its own message.
    expect_silence(&mut alice1).await;
    node.stop().await;
}

#[tokio::test]
async fn offline_receiver_gets_offline_route_and_a_push_event() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    alice
        .send_json(&chat("nobody", "are you there", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(ack["route"], "offline");
    let (_, stats) = node.get("/api/chat/online/stats").await;
    assert_eq!(stats["messages"]["offlinePushes"], 1);
    assert_eq!(stats["messages"]["messagesReceived"], 1);
    node.stop().await;
}

#[tokio::test]
async fn heartbeat_is_answered() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    alice
        .send_json(&json!({"type": "HEARTBEAT", "content": "ping"}))
        .await
        .unwrap();
    let pong = expect(&mut alice, "HEARTBEAT_ACK").await;
    assert_eq!(pong["content"], "pong");
    node.stop().await;
}

#[tokio::test]
async fn read_receipt_reaches_every_device_of_the_sender() {
    let node = start(config("n1")).await;
    let mut alice1 = node.client("alice").await;
    let mut alice2 = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice1
        .send_json(&chat("bob", "read me", "t1"))
        .await
        .unwrap();
    let id = expect(&mut alice1, "MESSAGE_ACK").await["messageId"].clone();
    expect(&mut alice2, "CHAT_MESSAGE").await;
    expect(&mut bob, "CHAT_MESSAGE").await;

    bob.send_json(
        &json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": id, "receiverId": "alice"}),
    )
    .await
    .unwrap();
    for device in [&mut alice1, &mut alice2] {
        let r = expect(device, "READ_RECEIPT").await;
        assert_eq!(
            (&r["messageId"], &r["readerId"], &r["chatId"]),
            (&id, &json!("bob"), &json!("c1"))
        );
    }

    // Only the receiver may mark it read; unknown ids are named as such.
    alice2
        .send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": id, "receiverId": "alice"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice2, "ERROR").await["code"], "FORBIDDEN");
    bob.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": "nope", "receiverId": "alice"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut bob, "ERROR").await["code"], "UNKNOWN_MESSAGE");
    node.stop().await;
}

#[tokio::test]
async fn typing_reaches_every_device_of_the_receiver() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    let mut bob1 = node.client("bob").await;
    let mut bob2 = node.client("bob").await;
    for content in ["typing", "stop_typing"] {
        alice
            .send_json(
                &json!({"type": "TYPING", "receiverId": "bob", "chatId": "c1", "content": content}),
            )
            .await
            .unwrap();
        for device in [&mut bob1, &mut bob2] {
            let t = expect(device, "TYPING").await;
            assert_eq!(
                (&t["senderId"], &t["chatId"], &t["content"]),
                (&json!("alice"), &json!("c1"), &json!(content))
            );
        }
    }
    expect_silence(&mut alice).await;
    node.stop().await;
}

#[tokio::test]
async fn retried_send_is_stored_once_and_acked_with_the_same_id() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice.send_json(&chat("bob", "once", "same")).await.unwrap();
    let first = expect(&mut alice, "MESSAGE_ACK").await;
    alice.send_json(&chat("bob", "once", "same")).await.unwrap();
    let second = expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(first["messageId"], second["messageId"]);
    expect(&mut bob, "CHAT_MESSAGE").await;
    expect_silence(&mut bob).await;
    let (_, stats) = node.get("/api/chat/online/stats").await;
    assert_eq!(stats["messages"]["messagesReceived"], 1);
    node.stop().await;
}

#[tokio::test]
async fn note_to_self_reaches_the_other_devices_once() {
    let node = start(config("n1")).await;
    let mut a1 = node.client("alice").await;
    let mut a2 = node.client("alice").await;
    a1.send_json(&chat("alice", "remember milk", "t1"))
        .await
        .unwrap();
    assert_eq!(expect(&mut a1, "MESSAGE_ACK").await["route"], "local");
    assert_eq!(
        expect(&mut a2, "CHAT_MESSAGE").await["content"],
        "remember milk"
    );
    expect_silence(&mut a2).await;
    node.stop().await;
}

#[tokio::test]
async fn ids_are_unique_and_ordered_per_sender() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    let mut ids = Vec::new();
    for i in 0..200 {
        alice
            .send_json(&chat("bob", "x", &format!("t{i}")))
            .await
            .unwrap();
    }
    for _ in 0..200 {
        ids.push(
            expect(&mut alice, "MESSAGE_ACK").await["messageId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 200);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        ids, sorted,
        "acks arrive in send order and ids sort in that order"
    );
    node.stop().await;
}

/// Senders in different store lanes (`server.store_lanes`) are stored at once, so a
/// receiver's seqs come back from the store out of order. Each sender's acks still come in
/// send order, and each device of the receiver gets every message once, in seq order, each
/// sender's in the order sent.
#[tokio::test]
async fn senders_in_several_store_lanes_keep_their_order_and_reach_the_receiver_once() {
    let mut c = config("n1");
    c.server.store_lanes = 4;
    let node = start(c).await;
    let mut r1 = node.client("rita").await;
    let mut r2 = node.client("rita").await;
    let mut senders = Vec::new();
    for s in 0..8 {
        senders.push((format!("s{s}"), node.client(&format!("s{s}")).await));
    }
    const EACH: usize = 40;
    for k in 0..EACH {
        for (name, client) in senders.iter_mut() {
            let m = chat("rita", &format!("{name}-{k}"), &format!("{name}-t{k}"));
            client.send_json(&m).await.unwrap();
        }
    }
    for (name, client) in senders.iter_mut() {
        let mut seqs = Vec::new();
        for k in 0..EACH {
            let ack = expect(client, "MESSAGE_ACK").await;
            assert_eq!(
                ack["tempMessageId"],
                format!("{name}-t{k}"),
                "acks in send order"
            );
            seqs.push(ack["seq"].as_u64().unwrap());
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: {seqs:?}");
    }
    for device in [&mut r1, &mut r2] {
        let mut next = vec![0; senders.len()];
        let mut last_seq = 0;
        for _ in 0..EACH * senders.len() {
            let m = expect(device, "CHAT_MESSAGE").await;
            let seq = m["seq"].as_u64().unwrap();
            assert_eq!(seq, last_seq + 1, "seqs in order, none missing or twice");
            last_seq = seq;
            let content = m["content"].as_str().unwrap();
            let (name, k) = content.split_once('-').unwrap();
            let s: usize = name[1..].parse().unwrap();
            assert_eq!(k.parse::<usize>().unwrap(), next[s], "{name} in send order");
            next[s] += 1;
        }
        expect_silence(device).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn moderation_masks_or_rejects() {
    let mut c = config("n1");
    c.moderation.words = vec!["darn".into()];
    let node = start(c.clone()).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice
        .send_json(&chat("bob", "oh DARN it", "t1"))
        .await
        .unwrap();
    expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(
        expect(&mut bob, "CHAT_MESSAGE").await["content"],
        "oh **** it"
    );
    node.stop().await;

    c.moderation.action = ModerationAction::Reject;
    let node = start(c).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice
        .send_json(&chat("bob", "oh darn", "t2"))
        .await
        .unwrap();
    let e = expect(&mut alice, "ERROR").await;
    assert_eq!(
        (&e["code"], &e["tempMessageId"]),
        (&json!("CONTENT_REJECTED"), &json!("t2"))
    );
    expect_silence(&mut bob).await;
    node.stop().await;
}

#[tokio::test]
async fn offline_pushes_are_one_per_chat_per_window_and_cancelled_when_the_user_returns() {
    let mut c = config("n1");
    c.server.offline_push_window_ms = 300;
    let node = start(c).await;
    let mut alice = node.client("alice").await;
    // Five messages in one chat, one in another, while bob is away: two events.
    for i in 0..5 {
        alice
            .send_json(&chat("bob", "are you there", &format!("t{i}")))
            .await
            .unwrap();
        assert_eq!(expect(&mut alice, "MESSAGE_ACK").await["route"], "offline");
    }
    alice
        .send_json(&json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "chatId": "other", "content": "x"}))
        .await
        .unwrap();
    expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(
        node.node.metrics.offline_pushes.get(),
        0,
        "nothing before the window ends"
    );
    eventually("two offline pushes", || async {
        node.node.metrics.offline_pushes.get() == 2
    })
    .await;

    // Carol misses a message but connects within the window: no push at all.
    alice
        .send_json(&chat("carol", "quick", "c1"))
        .await
        .unwrap();
    expect(&mut alice, "MESSAGE_ACK").await;
    let _carol = node.client("carol").await;
    eventually("the window closed", || async {
        node.node.metrics.offline_pushes_cancelled.get() == 1
    })
    .await;
    assert_eq!(node.node.metrics.offline_pushes.get(), 2);
    node.stop().await;
}

/// `HISTORY` over the socket and `GET /api/chat/history/{chatId}` page back through a chat,
/// newest first, for its members; a stranger, a bad cursor and a bad limit are told why.
#[tokio::test]
async fn history_pages_back_through_a_chat_over_the_socket_and_rest() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        alice
            .send_json(&chat("bob", &format!("m{n}"), &format!("t{n}")))
            .await
            .unwrap();
        ids.push(expect(&mut alice, "MESSAGE_ACK").await["messageId"].clone());
    }
    alice
        .send_json(&json!({"type": "HISTORY", "chatId": "c1", "limit": 2}))
        .await
        .unwrap();
    let page = expect(&mut alice, "HISTORY").await;
    assert_eq!(page["chatId"], "c1");
    assert_eq!(page["messages"][0]["messageId"], ids[2]);
    assert_eq!(page["messages"][1]["content"], "m1");
    assert_eq!(page["messages"][1]["seq"], 2);
    assert_eq!(page["more"], true);
    alice
        .send_json(&json!({"type": "HISTORY", "chatId": "c1", "before": ids[1]}))
        .await
        .unwrap();
    let page = expect(&mut alice, "HISTORY").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(
        (&page["messages"][0]["messageId"], &page["more"]),
        (&ids[0], &json!(false))
    );

    let (status, body) = node.get("/api/chat/history/c1?userId=bob&limit=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["messages"][0]["messageId"], &body["more"]),
        (&ids[2], &json!(true))
    );
    let (status, body) = node.get("/api/chat/history/c1?userId=eve").await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("FORBIDDEN")),
        "{body}"
    );
    let (status, body) = node
        .get("/api/chat/history/c1?userId=bob&before=nope")
        .await;
    assert_eq!(
        (status, &body["error"]),
        (404, &json!("UNKNOWN_MESSAGE")),
        "{body}"
    );
    let (status, body) = node.get("/api/chat/history/c1?userId=bob&limit=101").await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("INVALID_FIELD")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("1 to 100"),
        "{body}"
    );
    // Ids as a frame's: no control characters, at most 128 characters.
    let long = "x".repeat(129);
    for bad in [
        "/api/chat/history/c%0A1?userId=bob".to_string(),
        format!("/api/chat/history/{long}?userId=bob"),
        format!("/api/chat/history/c1?userId=bob&before={long}"),
    ] {
        let (status, body) = node.get(&bad).await;
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("INVALID_FIELD")),
            "{bad}: {body}"
        );
    }

    // Over the socket the same refusals, and the connection stays open.
    let mut eve = node.client("eve").await;
    eve.send_json(&json!({"type": "HISTORY", "chatId": "c1"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut eve, "ERROR").await["code"], "FORBIDDEN");
    eve.send_json(&json!({"type": "HISTORY", "chatId": "c1", "limit": 0}))
        .await
        .unwrap();
    assert_eq!(expect(&mut eve, "ERROR").await["code"], "INVALID_FIELD");
    eve.send_json(&json!({"type": "HEARTBEAT"})).await.unwrap();
    expect(&mut eve, "HEARTBEAT_ACK").await;
    node.stop().await;
}
