//! Targeted routing between nodes, proven with two real nodes in one process that share
//! in-memory presence and the in-process bus (the same code paths Redis and Kafka will feed).

mod common;

use common::*;
use serde_json::json;

async fn two_nodes() -> (TestNode, TestNode) {
    let shared = shared_backends();
    let n1 = start_with(config("node1"), shared.clone()).await;
    let n2 = start_with(config("node2"), shared).await;
    (n1, n2)
}

#[tokio::test]
async fn message_and_receipt_cross_nodes() {
    let (n1, n2) = two_nodes().await;
    let mut alice = n1.client("alice").await;
    let mut bob = n2.client("bob").await;

    alice.send_json(&chat("bob", "across", "t1")).await.unwrap();
    let ack = expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(ack["route"], "remote");
    let m = expect(&mut bob, "CHAT_MESSAGE").await;
    assert_eq!(
        (&m["content"], &m["messageId"]),
        (&json!("across"), &ack["messageId"])
    );

    bob.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": m["messageId"], "receiverId": "alice"}))
        .await
        .unwrap();
    let r = expect(&mut alice, "READ_RECEIPT").await;
    assert_eq!(
        (&r["readerId"], &r["messageId"]),
        (&json!("bob"), &ack["messageId"])
    );

    assert_eq!(n1.node.metrics.messages_routed_remote.get(), 1);
    assert_eq!(n2.node.metrics.envelopes_consumed.get(), 1);
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn devices_on_both_nodes_all_get_it_and_copies_cross_too() {
    let (n1, n2) = two_nodes().await;
    let mut alice1 = n1.client("alice").await;
    let mut alice2 = n2.client("alice").await; // the sender's other device, other node
    let mut bob1 = n1.client("bob").await;
    let mut bob2 = n2.client("bob").await;

    alice1
        .send_json(&chat("bob", "everywhere", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice1, "MESSAGE_ACK").await;
    assert_eq!(ack["route"], "local+remote");
    for device in [&mut bob1, &mut bob2, &mut alice2] {
        assert_eq!(
            expect(device, "CHAT_MESSAGE").await["messageId"],
            ack["messageId"]
        );
    }
    // One publish to node2 carried both bob's message and alice's copy.
    assert_eq!(n1.node.metrics.messages_routed_remote.get(), 1);
    expect_silence(&mut alice1).await;
    expect_silence(&mut bob2).await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn typing_crosses_nodes() {
    let (n1, n2) = two_nodes().await;
    let mut alice = n1.client("alice").await;
    let mut bob = n2.client("bob").await;
    alice
        .send_json(
            &json!({"type": "TYPING", "receiverId": "bob", "chatId": "c1", "content": "typing"}),
        )
        .await
        .unwrap();
    let t = expect(&mut bob, "TYPING").await;
    assert_eq!(
        (&t["senderId"], &t["content"]),
        (&json!("alice"), &json!("typing"))
    );
    expect_silence(&mut alice).await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn nodes_publish_only_to_nodes_that_hold_the_receiver() {
    let shared = shared_backends();
    let n1 = start_with(config("node1"), shared.clone()).await;
    let n2 = start_with(config("node2"), shared.clone()).await;
    let n3 = start_with(config("node3"), shared).await;
    let mut alice = n1.client("alice").await;
    let mut bob = n2.client("bob").await;
    for i in 0..10 {
        alice
            .send_json(&chat("bob", "x", &format!("t{i}")))
            .await
            .unwrap();
        expect(&mut alice, "MESSAGE_ACK").await;
        expect(&mut bob, "CHAT_MESSAGE").await;
    }
    assert_eq!(n2.node.metrics.envelopes_consumed.get(), 10);
    assert_eq!(
        n3.node.metrics.envelopes_consumed.get(),
        0,
        "node3 holds nobody: no traffic"
    );
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

#[tokio::test]
async fn status_shows_every_node_of_a_user() {
    let (n1, n2) = two_nodes().await;
    let _a1 = n1.client("alice").await;
    let _a2 = n2.client("alice").await;
    let (_, s) = n1.get("/api/chat/online/status/alice").await;
    assert_eq!(
        (&s["devices"], &s["nodes"]),
        (&json!(2), &json!(["node1", "node2"]))
    );
    n2.stop().await;
    let (_, s) = n1.get("/api/chat/online/status/alice").await;
    assert_eq!((&s["devices"], &s["nodes"]), (&json!(1), &json!(["node1"])));
    n1.stop().await;
}

#[tokio::test]
async fn a_failed_publish_is_counted_and_told_in_the_ack() {
    use chatd::presence::Device;
    let shared = shared_backends();
    let n1 = start_with(config("node1"), shared.clone()).await;
    // Presence says bob has a device on a node that consumes nothing (its process is gone
    // and its lease has not lapsed yet): the publish fails.
    let ghost = Device {
        connection_id: "c-ghost".into(),
        node_id: "ghost".into(),
        last_seen_ms: chatd::chat::ids::now_ms(),
    };
    shared.presence.connect("bob", ghost).await.unwrap();
    let mut alice = n1.client("alice").await;
    alice
        .send_json(&chat("bob", "into the void", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(
        (&ack["route"], &ack["remoteFailed"]),
        (&json!("offline"), &json!(1))
    );
    let m = &n1.node.metrics;
    assert_eq!((m.bus_failures.get(), m.offline_pushes.get()), (1, 1));
    n1.stop().await;
}
