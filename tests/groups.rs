//! Group chats through real WebSocket clients and the REST API, on two real nodes in one
//! process that share presence, bus and store: membership and its refusals, a message that
//! reaches every member's devices on both nodes once (each at its own seq) with one ack to
//! the sender, receipts per member, typing to the members, offline pushes per member, and a
//! member who was away catching up from its inbox.

mod common;

use chatd::client::Client;
use common::*;
use serde_json::{json, Value};

async fn two_nodes() -> (TestNode, TestNode) {
    let shared = shared_backends();
    let n1 = start_with(config("node1"), shared.clone()).await;
    let n2 = start_with(config("node2"), shared).await;
    (n1, n2)
}

fn to_group(group: &str, content: &str, temp: &str) -> Value {
    json!({"type": "CHAT_MESSAGE", "groupId": group, "content": content, "tempMessageId": temp})
}

fn members(body: &Value) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = body["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {body}"))
        .iter()
        .map(|m| {
            (
                m["userId"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    m.sort();
    m
}

#[tokio::test]
async fn membership_over_rest_and_its_refusals() {
    let (n1, n2) = two_nodes().await;
    let create = json!({"groupId": "team", "members": ["bob", "carol"]});
    let (status, body) = http_send(n1.addr, "POST", "/api/groups?userId=alice", &create).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["groupId"], "team");
    let admin_and_two = vec![
        ("alice".into(), "admin".into()),
        ("bob".into(), "member".into()),
        ("carol".into(), "member".into()),
    ];
    assert_eq!(members(&body), admin_and_two);
    // The same group, seen from the other node (one store).
    let (status, body) = http_get_json(&n2, "/api/groups/team/members?userId=bob").await;
    assert_eq!((status, members(&body)), (200, admin_and_two));

    let refusals = [
        // Taken, by anyone.
        (
            "POST",
            "/api/groups?userId=eve".to_string(),
            create.clone(),
            409,
            "GROUP_EXISTS",
        ),
        // Only members look in; only admins add.
        (
            "GET",
            "/api/groups/team/members?userId=eve".into(),
            Value::Null,
            403,
            "FORBIDDEN",
        ),
        (
            "POST",
            "/api/groups/team/members?userId=bob".into(),
            json!({"userId": "dave"}),
            403,
            "FORBIDDEN",
        ),
        (
            "GET",
            "/api/groups/nope/members?userId=bob".into(),
            Value::Null,
            404,
            "UNKNOWN_GROUP",
        ),
        // The last admin stays while others remain.
        (
            "DELETE",
            "/api/groups/team/members/alice?userId=alice".into(),
            Value::Null,
            409,
            "LAST_ADMIN",
        ),
        // Bad input says what was wrong.
        (
            "POST",
            "/api/groups?userId=alice".into(),
            json!({"groupId": "a b"}),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/api/groups?userId=alice".into(),
            json!({"group": "x"}),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            "/api/groups/team/members?userId=alice".into(),
            json!({"userId": "dave", "role": "owner"}),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            "/api/groups".into(),
            create.clone(),
            400,
            "INVALID_USER_ID",
        ),
    ];
    for (method, path, body, status, code) in refusals {
        let (got, answer) = http_send(n1.addr, method, &path, &body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{method} {path}: {answer}"
        );
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // An admin adds (and names admins); anyone leaves; then the last admin may go.
    let (status, body) = http_send(
        n1.addr,
        "POST",
        "/api/groups/team/members?userId=alice",
        &json!({"userId": "dave", "role": "admin"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(members(&body).contains(&("dave".into(), "admin".into())));
    let (status, body) = http_send(
        n2.addr,
        "DELETE",
        "/api/groups/team/members/carol?userId=carol",
        &Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_send(
        n1.addr,
        "DELETE",
        "/api/groups/team/members/alice?userId=alice",
        &Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        members(&body),
        vec![
            ("bob".into(), "member".into()),
            ("dave".into(), "admin".into())
        ]
    );
    n1.stop().await;
    n2.stop().await;
}

async fn http_get_json(node: &TestNode, path: &str) -> (u16, Value) {
    http_send(node.addr, "GET", path, &Value::Null).await
}

#[tokio::test]
async fn a_group_message_reaches_every_member_on_every_node_once() {
    let (n1, n2) = two_nodes().await;
    let create = json!({"groupId": "crew", "members": ["bob", "carol", "dave"]});
    assert_eq!(
        http_send(n1.addr, "POST", "/api/groups?userId=alice", &create)
            .await
            .0,
        201
    );
    let mut alice = n1.client("alice").await;
    let mut alice2 = n2.client("alice").await;
    let mut bob = n1.client("bob").await;
    let mut carol = n2.client("carol").await;
    let mut carol2 = n2.client("carol").await;
    // dave is offline: pushed, and gets it from his inbox when he is back.

    alice
        .send_json(&to_group("crew", "hello crew", "t1"))
        .await
        .unwrap();
    let ack = expect(&mut alice, "MESSAGE_ACK").await;
    assert_eq!(ack["tempMessageId"], "t1");
    assert_eq!(
        ack["route"], "local+remote",
        "bob here, carol on node2: {ack}"
    );
    let id = ack["messageId"].clone();
    for (who, device) in [
        ("bob", &mut bob),
        ("carol", &mut carol),
        ("carol", &mut carol2),
        ("alice", &mut alice2),
    ] {
        let m = expect(device, "CHAT_MESSAGE").await;
        assert_eq!(m["messageId"], id, "{who}");
        assert_eq!(
            (&m["groupId"], &m["chatId"], &m["receiverId"]),
            (&json!("crew"), &json!("crew"), &json!("crew"))
        );
        assert_eq!(m["senderId"], "alice");
        assert_eq!(m["seq"], 1, "{who}'s first inbox entry");
    }
    // One envelope to node2 carried carol's and alice's other device.
    assert_eq!(n1.node.metrics.messages_routed_remote.get(), 1);
    assert_eq!(
        n1.node.metrics.snapshot()["offlinePushes"],
        1,
        "dave, offline"
    );

    // Receipts: each member's reaches the sender's devices, naming the reader.
    for (reader, device) in [("bob", &mut bob), ("carol", &mut carol)] {
        device
            .send_json(&json!({"type": "READ_RECEIPT", "chatId": "crew", "messageId": id}))
            .await
            .unwrap();
        for sender_device in [&mut alice, &mut alice2] {
            let r = expect(sender_device, "READ_RECEIPT").await;
            assert_eq!((&r["readerId"], &r["messageId"]), (&json!(reader), &id));
        }
    }
    // The sender reads no receipt of its own message.
    alice
        .send_json(&json!({"type": "READ_RECEIPT", "chatId": "crew", "messageId": id}))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice, "ERROR").await["code"], "FORBIDDEN");

    // Typing reaches the other members, not the typist.
    carol
        .send_json(&json!({"type": "TYPING", "groupId": "crew", "content": "typing"}))
        .await
        .unwrap();
    for device in [&mut alice, &mut bob] {
        let t = expect(device, "TYPING").await;
        assert_eq!(
            (&t["senderId"], &t["groupId"]),
            (&json!("carol"), &json!("crew"))
        );
    }

    // A retry is the same message: one ack, nobody gets it twice.
    alice
        .send_json(&to_group("crew", "hello crew", "t1"))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice, "MESSAGE_ACK").await["messageId"], id);
    bob.send_json(&to_group("crew", "second", "b1"))
        .await
        .unwrap();
    expect(&mut bob, "MESSAGE_ACK").await;
    for device in [&mut carol, &mut alice] {
        let m = expect(device, "CHAT_MESSAGE").await;
        assert_eq!(m["content"], "second", "the retry was not delivered again");
    }

    // dave comes back: his inbox holds both, at his own seqs.
    let mut dave = Client::connect_url(&format!("{}/ws/chat?userId=dave&since=0", n2.ws()), WAIT)
        .await
        .unwrap();
    let first = expect(&mut dave, "CHAT_MESSAGE").await;
    let second = expect(&mut dave, "CHAT_MESSAGE").await;
    assert_eq!((&first["messageId"], &first["seq"]), (&id, &json!(1)));
    assert_eq!(
        (&second["content"], &second["seq"]),
        (&json!("second"), &json!(2))
    );
    assert_eq!(expect(&mut dave, "SYNCED").await["seq"], 2);

    // Strangers and unknown groups are told why; nothing is stored.
    let mut eve = n1.client("eve").await;
    eve.send_json(&to_group("crew", "let me in", "e1"))
        .await
        .unwrap();
    let e = expect(&mut eve, "ERROR").await;
    assert_eq!(
        (&e["code"], &e["tempMessageId"]),
        (&json!("FORBIDDEN"), &json!("e1"))
    );
    eve.send_json(&to_group("nope", "anyone?", "e2"))
        .await
        .unwrap();
    assert_eq!(expect(&mut eve, "ERROR").await["code"], "UNKNOWN_GROUP");
    eve.send_json(&json!({"type": "TYPING", "groupId": "crew", "content": "typing"}))
        .await
        .unwrap();
    assert_eq!(expect(&mut eve, "ERROR").await["code"], "FORBIDDEN");
    expect_silence(&mut bob).await;

    // The group's history, as a member pages it.
    let (status, page) = http_get_json(&n1, "/api/chat/history/crew?userId=carol").await;
    assert_eq!(status, 200, "{page}");
    let contents: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["second", "hello crew"]);
    n1.stop().await;
    n2.stop().await;
}
