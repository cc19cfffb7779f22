//! The MessageService over gRPC: a real `chatd message-service` process in front of memory or
//! Redis, a node that uses it, and what happens when it dies and comes back.

mod common;

use common::*;
use serde_json::json;

/// `chatd message-service` on `backend` (Redis: the shared one), killed when dropped.
fn message_service(listen: &str, backend: &str) -> Proc {
    Proc::message_service(listen, backend, &test_redis_url())
}

async fn node_on(service: &Proc) -> TestNode {
    let mut c = config("grpc-node");
    c.store.url = format!("grpc://{}", service.addr);
    c.store.timeout_ms = 500;
    start(c).await
}

#[tokio::test]
async fn messages_and_receipts_go_through_the_message_service() {
    let service = message_service("127.0.0.1:0", "memory");
    let node = node_on(&service).await;
    let (_, health) = node.get("/api/chat/health").await;
    assert_eq!(
        (&health["status"], &health["checks"]["store"]["backend"]),
        (&json!("UP"), &json!("grpc"))
    );

    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    alice
        .send_json(&chat("bob", "stored over grpc", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice, "MESSAGE_ACK").await;
    let m = expect(&mut bob, "CHAT_MESSAGE").await;
    assert_eq!(m["messageId"], ack["messageId"]);

    // A retry is the same message.
    alice
        .send_json(&chat("bob", "stored over grpc", "t1"))
        .await
        .unwrap();
    assert_eq!(
        expect(&mut alice, "MESSAGE_ACK").await["messageId"],
        ack["messageId"]
    );
    expect_silence(&mut bob).await;

    bob.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": ack["messageId"]}))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice, "READ_RECEIPT").await["readerId"], "bob");
    bob.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": "nope"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut bob, "ERROR").await["code"], "UNKNOWN_MESSAGE");
    alice
        .send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": ack["messageId"]}))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice, "ERROR").await["code"], "FORBIDDEN");
    node.stop().await;
}

/// The history contract on the in-process store, and through a MessageService on memory and
/// on Redis: the gRPC `FetchChat` carries every answer, refusals included.
#[tokio::test]
async fn history_is_the_same_in_every_store_and_over_grpc() {
    use chatd::store::{GrpcStore, MemoryStore};
    use common::history::history_contract;
    history_contract(&MemoryStore::new(1000, 1000)).await;
    for backend in ["memory", "redis"] {
        let service = message_service("127.0.0.1:0", backend);
        let url = format!("grpc://{}", service.addr);
        let store = GrpcStore::new(&[url], std::time::Duration::from_secs(5), 2).unwrap();
        history_contract(&store).await;
    }
}

#[tokio::test]
async fn groups_are_the_same_in_every_store_and_over_grpc() {
    use chatd::store::{GrpcStore, MemoryStore};
    use common::groups::group_contract;
    group_contract(&MemoryStore::new(1000, 1000)).await;
    for backend in ["memory", "redis"] {
        let service = message_service("127.0.0.1:0", backend);
        let url = format!("grpc://{}", service.addr);
        let store = GrpcStore::new(&[url], std::time::Duration::from_secs(5), 2).unwrap();
        group_contract(&store).await;
    }
}

#[tokio::test]
async fn a_dead_message_service_is_an_error_to_the_sender_and_degraded_health_until_it_returns() {
    let mut service = message_service("127.0.0.1:0", "memory");
    let addr = service.addr.clone();
    let node = node_on(&service).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    service.kill();

    alice
        .send_json(&chat("bob", "into the void?", "t1"))
        .await
        .unwrap();
    let e = expect(&mut alice, "ERROR").await;
    assert_eq!(
        (&e["code"], &e["tempMessageId"]),
        (&json!("STORE_UNAVAILABLE"), &json!("t1"))
    );
    expect_silence(&mut bob).await;
    let (status, health) = node.get("/api/chat/health").await;
    assert_eq!(
        (
            status,
            &health["status"],
            &health["checks"]["store"]["status"]
        ),
        (200, &json!("DEGRADED"), &json!("DOWN"))
    );
    alice
        .send_json(&json!({"type": "HEARTBEAT"}))
        .await
        .unwrap();
    expect(&mut alice, "HEARTBEAT_ACK").await;

    // Back on the same address: the retry goes through, the node recovers by itself.
    let _service = message_service(&addr, "memory");
    alice
        .send_json(&chat("bob", "into the void?", "t1"))
        .await
        .unwrap();
    expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(
        expect(&mut bob, "CHAT_MESSAGE").await["content"],
        "into the void?"
    );
    eventually("health UP again", || async {
        node.get("/api/chat/health").await.1["status"] == "UP"
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn the_redis_backend_keeps_messages_across_restarts_of_the_service() {
    let mut service = message_service("127.0.0.1:0", "redis");
    let addr = service.addr.clone();
    let node = node_on(&service).await;
    let (alice, bob) = (
        format!("ra{}", std::process::id()),
        format!("rb{}", std::process::id()),
    );
    let mut a = node.client(&alice).await;
    let mut b = node.client(&bob).await;
    a.send_json(&chat(&bob, "remember me", "t1")).await.unwrap();
    let ack = expect(&mut a, "MESSAGE_ACK").await;
    expect(&mut b, "CHAT_MESSAGE").await;

    service.kill();
    let _service = message_service(&addr, "redis");
    // The receipt needs the message stored before the restart.
    b.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": ack["messageId"]}))
        .await
        .unwrap();
    assert_eq!(
        expect(&mut a, "READ_RECEIPT").await["messageId"],
        ack["messageId"]
    );
    // And the idempotency key survived too.
    a.send_json(&chat(&bob, "remember me", "t1")).await.unwrap();
    assert_eq!(
        expect(&mut a, "MESSAGE_ACK").await["messageId"],
        ack["messageId"]
    );
    node.stop().await;
}
