//! Bad input of every kind gets a clear answer, and never costs a neighbour its connection.

mod common;

use chatd::client::{Client, Incoming};
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// After each bad frame the same connection still works, and so does a neighbour's.
async fn still_works(node: &TestNode, bad: &mut Client) {
    bad.send_json(&json!({"type": "HEARTBEAT", "content": "ping"}))
        .await
        .unwrap();
    expect(bad, "HEARTBEAT_ACK").await;
    let mut other = node.client("carol").await;
    other
        .send_json(&chat("alice", "still here", "n"))
        .await
        .unwrap();
    expect(&mut other, "MESSAGE_ACK").await;
}

#[tokio::test]
async fn bad_frames_get_error_codes_and_the_connection_stays() {
    let mut c = config("n1");
    c.server.max_content_chars = 50;
    let node = start(c).await;
    let mut alice = node.client("alice").await;
    let cases = [
        ("not json at all".to_string(), "INVALID_JSON"),
        ("[1, 2, 3]".into(), "INVALID_FRAME"),
        (json!({"content": "no type"}).to_string(), "MISSING_FIELD"),
        (json!({"type": "DANCE"}).to_string(), "UNKNOWN_TYPE"),
        (json!({"type": "CHAT_MESSAGE", "chatId": "c", "content": "x"}).to_string(), "MISSING_FIELD"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "content": "x"}).to_string(), "MISSING_FIELD"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "chatId": "c"}).to_string(), "MISSING_FIELD"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "chatId": "c", "content": ""}).to_string(), "EMPTY_CONTENT"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "chatId": "c", "content": "x".repeat(51)}).to_string(), "CONTENT_TOO_LONG"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": "no spaces", "chatId": "c", "content": "x"}).to_string(), "INVALID_FIELD"),
        (json!({"type": "CHAT_MESSAGE", "receiverId": 42, "chatId": "c", "content": "x"}).to_string(), "INVALID_FIELD"),
        (json!({"type": "TYPING", "receiverId": "bob", "chatId": "c"}).to_string(), "MISSING_FIELD"),
        (json!({"type": "READ_RECEIPT", "messageId": "m"}).to_string(), "MISSING_FIELD"),
        (format!("{}{}", "[".repeat(5000), "]".repeat(5000)), "INVALID_JSON"),
    ];
    for (text, code) in cases {
        alice.send_text(&text).await.unwrap();
        let e = expect(&mut alice, "ERROR").await;
        assert_eq!(e["code"], code, "{text:.80}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    still_works(&node, &mut alice).await;
    let (_, stats) = node.get("/api/chat/online/stats").await;
    assert!(stats["messages"]["framesRejected"].as_u64().unwrap() >= 14);
    node.stop().await;
}

#[tokio::test]
async fn send_errors_echo_the_temp_message_id() {
    let node = start(config("n1")).await;
    let mut alice = node.client("alice").await;
    alice
        .send_json(&json!({"type": "CHAT_MESSAGE", "receiverId": "bob", "chatId": "c", "content": "  ", "tempMessageId": "t-7"}))
        .await
        .unwrap();
    let e = expect(&mut alice, "ERROR").await;
    assert_eq!(
        (&e["code"], &e["tempMessageId"]),
        (&json!("EMPTY_CONTENT"), &json!("t-7"))
    );
    node.stop().await;
}

#[tokio::test]
async fn impersonation_is_forbidden() {
    let node = start(config("n1")).await;
    let mut mallory = node.client("mallory").await;
    let mut bob = node.client("bob").await;
    mallory
        .send_json(&json!({"type": "CHAT_MESSAGE", "senderId": "alice", "receiverId": "bob", "chatId": "c", "content": "I am alice", "tempMessageId": "t"}))
        .await
        .unwrap();
    let e = expect(&mut mallory, "ERROR").await;
    assert_eq!(
        (&e["code"], &e["tempMessageId"]),
        (&json!("FORBIDDEN"), &json!("t"))
    );
    expect_silence(&mut bob).await;
    // Naming oneself as sender is fine (the seed's clients do).
    mallory
        .send_json(&json!({"type": "CHAT_MESSAGE", "senderId": "mallory", "receiverId": "bob", "chatId": "c", "content": "hi"}))
        .await
        .unwrap();
    expect(&mut mallory, "MESSAGE_ACK").await;
    still_works(&node, &mut mallory).await;
    node.stop().await;
}

#[tokio::test]
async fn bad_user_ids_are_refused_before_the_upgrade() {
    let node = start(config("n1")).await;
    let long = "x".repeat(65);
    for query in [
        "",
        "?userId=",
        "?user=alice",
        "?userId=a%20b",
        "?userId=%C3%A4",
        &format!("?userId={long}"),
    ] {
        let url = format!("{}/ws/chat{query}", node.ws());
        match Client::connect_url(&url, WAIT).await {
            Err(chatd::client::ClientError::Refused { status, body, .. }) => {
                assert_eq!(status, 400, "{query}");
                let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
                assert_eq!(body["error"], "INVALID_USER_ID", "{query}");
                assert!(body["message"].as_str().unwrap().contains("userId"));
            }
            Err(e) => panic!("{query}: expected a 400 refusal, got {e}"),
            Ok(_) => panic!("{query}: expected a 400 refusal, got a connection"),
        }
    }
    // A plain GET (no upgrade) with a good id is told to use WebSocket, as JSON.
    let (status, body) = http_get(node.addr, "/ws/chat?userId=alice").await;
    assert!(status >= 400, "{status}");
    assert!(body.contains("NOT_A_WEBSOCKET"), "{body}");
    node.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009_and_spares_the_neighbours() {
    let mut c = config("n1");
    c.server.max_frame_bytes = 4096;
    c.server.max_content_chars = 100_000;
    let node = start(c).await;
    let mut bob = node.client("bob").await;
    let mut alice2 = node.client("alice").await;
    let mut alice = node.client("alice").await;
    // Under the limit: fine.
    alice
        .send_json(&chat("bob", &"a".repeat(3000), "small"))
        .await
        .unwrap();
    expect(&mut alice, "MESSAGE_ACK").await;
    expect(&mut bob, "CHAT_MESSAGE").await;
    // Over it: the frame header alone gets the connection closed with 1009.
    alice
        .send_json(&chat("bob", &"a".repeat(100_000), "big"))
        .await
        .unwrap();
    match alice.next(WAIT).await {
        Ok(Incoming::Closed { code, reason }) => {
            assert_eq!(code, 1009, "{reason}");
            assert!(reason.contains("4096"), "{reason}");
        }
        other => panic!("expected close 1009, got {other:?}"),
    }
    // Neither the receiver nor the sender's other device lost anything or their connection.
    expect(&mut alice2, "CHAT_MESSAGE").await;
    expect_silence(&mut bob).await;
    still_works(&node, &mut bob).await;
    alice2
        .send_json(&json!({"type": "HEARTBEAT"}))
        .await
        .unwrap();
    expect(&mut alice2, "HEARTBEAT_ACK").await;
    node.stop().await;
}

#[tokio::test]
async fn binary_frames_close_with_1003() {
    let node = start(config("n1")).await;
    let mut bob = node.client("bob").await;
    let mut alice = node.client("alice").await;
    alice
        .send_raw(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]))
        .await
        .unwrap();
    match alice.next(WAIT).await {
        Ok(Incoming::Closed { code, .. }) => assert_eq!(code, 1003),
        other => panic!("expected close 1003, got {other:?}"),
    }
    still_works(&node, &mut bob).await;
    node.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let node = start(config("n1")).await;
    let mut bob = node.client("bob").await;
    let mut alice = node.client("alice").await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    alice.send_raw(Message::Frame(frame)).await.unwrap();
    match alice.next(WAIT).await {
        Ok(Incoming::Closed { code, .. }) => assert_eq!(code, 1007),
        other => panic!("expected close 1007, got {other:?}"),
    }
    still_works(&node, &mut bob).await;
    node.stop().await;
}
