//! The inbox: every frame a device should see has a gap-free, per-user `seq`; a device that
//! connects with `?since=` (or sends `SYNC`) gets what it missed, in order, then live frames,
//! with nothing lost or repeated at the seam. Real nodes, real WebSocket clients.

mod common;

use chatd::client::{chat_url, with_since, Client, Incoming};
use common::*;
use serde_json::{json, Value};

async fn connect_since(node: &TestNode, user: &str, since: u64) -> Client {
    Client::connect_url(&with_since(&chat_url(&node.ws(), user), since), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"))
}

/// Frames that carry a seq (messages, receipts, acks), in arrival order, until `SYNCED`
/// or until `n` of them arrived.
async fn seq_frames(client: &mut Client, n: usize) -> Vec<Value> {
    seq_frames_and_synced(client, n, &mut Vec::new()).await
}

/// [`seq_frames`], keeping the `SYNCED` frames met on the way in `synced`.
async fn seq_frames_and_synced(
    client: &mut Client,
    n: usize,
    synced: &mut Vec<Value>,
) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        match client.next(WAIT).await {
            Ok(Incoming::Frame(f)) if f["type"] == "SYNCED" => synced.push(f),
            Ok(Incoming::Frame(f)) if f.get("seq").is_some() => got.push(f),
            Ok(Incoming::Frame(f)) if f["type"] == "ERROR" => panic!("error: {f}"),
            Ok(_) => {}
            Err(e) => panic!("after {} frames: {e}", got.len()),
        }
    }
    got
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

async fn send_acked(client: &mut Client, to: &str, content: &str, temp: &str) -> Value {
    client.send_json(&chat(to, content, temp)).await.unwrap();
    let ack = expect(client, "MESSAGE_ACK").await;
    assert_eq!(ack["tempMessageId"], temp);
    ack
}

#[tokio::test]
async fn every_frame_a_device_sees_has_the_next_seq_of_its_user() {
    let node = start(config("sync-seq")).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut a1 = node.client(&a).await;
    let mut a2 = node.client(&a).await;
    let mut b1 = node.client(&b).await;

    let ack = send_acked(&mut a1, &b, "one", "t1").await;
    assert_eq!(ack["seq"], 1, "{ack}");
    let got = expect(&mut b1, "CHAT_MESSAGE").await;
    assert_eq!(got["seq"], 1);
    assert!(
        got.get("tempMessageId").is_none(),
        "the receiver does not see the sender's id: {got}"
    );
    // The sender's other device: its copy at the sender's seq, with the sending device's id.
    let copy = expect(&mut a2, "CHAT_MESSAGE").await;
    assert_eq!(
        (copy["seq"].as_u64(), copy["tempMessageId"].as_str()),
        (Some(1), Some("t1"))
    );

    b1.send_json(&chat(&a, "two", "t2")).await.unwrap();
    assert_eq!(expect(&mut b1, "MESSAGE_ACK").await["seq"], 2);
    assert_eq!(expect(&mut a1, "CHAT_MESSAGE").await["seq"], 2);
    assert_eq!(expect(&mut a2, "CHAT_MESSAGE").await["seq"], 2);

    // A read receipt takes the next place in the original sender's inbox.
    b1.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": got["messageId"]}))
        .await
        .unwrap();
    let receipt = expect(&mut a1, "READ_RECEIPT").await;
    assert_eq!(
        (receipt["seq"].as_u64(), receipt["readerId"].as_str()),
        (Some(3), Some(&b[..]))
    );
    assert_eq!(expect(&mut a2, "READ_RECEIPT").await["seq"], 3);
    node.stop().await;
}

#[tokio::test]
async fn a_device_that_was_away_gets_what_it_missed_then_live_messages() {
    let node = start(config("sync-since")).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut a1 = node.client(&a).await;
    for i in 1..=5 {
        send_acked(&mut a1, &b, &format!("m{i}"), &format!("t{i}")).await;
    }
    let mut b1 = connect_since(&node, &b, 2).await;
    let replay = seq_frames(&mut b1, 3).await;
    assert_eq!(seqs(&replay), [3, 4, 5]);
    let contents: Vec<_> = replay
        .iter()
        .map(|f| f["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["m3", "m4", "m5"]);
    let synced = expect(&mut b1, "SYNCED").await;
    assert_eq!(
        (synced["seq"].as_u64(), synced["replayed"].as_u64()),
        (Some(5), Some(3))
    );
    send_acked(&mut a1, &b, "live", "t6").await;
    let live = expect(&mut b1, "CHAT_MESSAGE").await;
    assert_eq!(
        (live["seq"].as_u64(), live["content"].as_str()),
        (Some(6), Some("live"))
    );

    // SYNC in the middle of a session replays again, from where it says.
    b1.send_json(&json!({"type": "SYNC", "since": 4}))
        .await
        .unwrap();
    assert_eq!(seqs(&seq_frames(&mut b1, 2).await), [5, 6]);
    assert_eq!(expect(&mut b1, "SYNCED").await["seq"], 6);
    // Without since: only what comes after connecting.
    let mut b2 = node.client(&b).await;
    send_acked(&mut a1, &b, "seven", "t7").await;
    assert_eq!(seqs(&seq_frames(&mut b2, 1).await), [7]);
    node.stop().await;
}

#[tokio::test]
async fn the_seam_between_replay_and_live_loses_and_repeats_nothing() {
    let node = start(config("sync-seam")).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let total = 2000;
    let ws = node.ws();
    let to = b.clone();
    let sender = tokio::spawn(async move {
        let mut a1 = Client::connect(&ws, &a, WAIT).await.unwrap();
        // One at a time: the stream lasts long enough to connect in its middle.
        for i in 1..=total {
            send_acked(&mut a1, &to, &format!("m{i}"), &format!("t{i}")).await;
        }
    });
    // Connect while the stream is under way: part replay, part live.
    eventually("some messages stored", || async {
        node.node.metrics.messages_received.get() >= 300
    })
    .await;
    let mut b1 = connect_since(&node, &b, 0).await;
    let mut synced = Vec::new();
    let got = seq_frames_and_synced(&mut b1, total, &mut synced).await;
    assert_eq!(seqs(&got), (1..=total as u64).collect::<Vec<_>>());
    let contents: Vec<String> = got
        .iter()
        .map(|f| f["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        contents,
        (1..=total).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    sender.await.unwrap();
    // SYNCED came once, somewhere in the stream (after the last replayed frame) or right
    // after it; then nothing.
    if synced.is_empty() {
        synced.push(expect(&mut b1, "SYNCED").await);
    }
    assert_eq!(synced.len(), 1, "{synced:?}");
    let replayed = synced[0]["replayed"]
        .as_u64()
        .expect("SYNCED tells how many were replayed");
    assert!(replayed >= 1 && replayed <= total as u64, "{synced:?}");
    expect_silence(&mut b1).await;
    node.stop().await;
}

#[tokio::test]
async fn a_cursor_older_than_the_inbox_keeps_is_told_never_skipped() {
    let mut c = config("sync-old");
    c.store.inbox_max_entries = 3;
    let node = start(c).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut a1 = node.client(&a).await;
    for i in 1..=5 {
        send_acked(&mut a1, &b, &format!("m{i}"), &format!("t{i}")).await;
    }
    let mut b1 = connect_since(&node, &b, 1).await;
    let error = expect(&mut b1, "ERROR").await;
    assert_eq!(error["code"], "SYNC_TOO_OLD", "{error}");
    let text = error["message"].as_str().unwrap();
    assert!(text.contains("2..2") && text.contains("HISTORY"), "{text}");
    assert_eq!(
        (&error["missedFrom"], &error["missedTo"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(seqs(&seq_frames(&mut b1, 3).await), [3, 4, 5]);
    assert_eq!(expect(&mut b1, "SYNCED").await["seq"], 5);
    // Up to date is not too old.
    let mut b2 = connect_since(&node, &b, 5).await;
    let synced = expect(&mut b2, "SYNCED").await;
    assert_eq!(
        (synced["seq"].as_u64(), synced["replayed"].as_u64()),
        (Some(5), Some(0))
    );
    node.stop().await;
}

#[tokio::test]
async fn a_read_receipt_reaches_the_sender_after_it_reconnects() {
    let node = start(config("sync-receipt")).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut a1 = node.client(&a).await;
    let ack = send_acked(&mut a1, &b, "read me", "t1").await;
    let cursor = ack["seq"].as_u64().unwrap();
    a1.close().await;

    let mut b1 = node.client(&b).await;
    b1.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": ack["messageId"]}))
        .await
        .unwrap();
    eventually("the receipt is stored", || async {
        let page = node.node.backends.store.fetch(&a, 0, 10).await.unwrap();
        page.latest == 2
    })
    .await;

    let mut a2 = connect_since(&node, &a, cursor).await;
    let receipt = expect(&mut a2, "READ_RECEIPT").await;
    assert_eq!(receipt["messageId"], ack["messageId"]);
    assert_eq!(
        (receipt["seq"].as_u64(), receipt["readerId"].as_str()),
        (Some(2), Some(&b[..]))
    );
    assert_eq!(expect(&mut a2, "SYNCED").await["replayed"], 1);
    // Reading again tells nobody twice.
    b1.send_json(&json!({"type": "READ_RECEIPT", "chatId": "c1", "messageId": ack["messageId"]}))
        .await
        .unwrap();
    expect_silence(&mut a2).await;
    node.stop().await;
}

#[tokio::test]
async fn concurrent_senders_on_two_nodes_give_one_gap_free_order() {
    let backends = shared_backends();
    let n1 = start_with(config("sync-n1"), backends.clone()).await;
    let n2 = start_with(config("sync-n2"), backends).await;
    let b = unique("bob");
    let mut b1 = n1.client(&b).await;
    let mut b2 = n2.client(&b).await;
    let per_sender = 300;
    let mut senders = Vec::new();
    for (i, node) in [&n1, &n2, &n1, &n2].into_iter().enumerate() {
        let (ws, to) = (node.ws(), b.clone());
        senders.push(tokio::spawn(async move {
            let mut c = Client::connect(&ws, &unique(&format!("s{i}")), WAIT)
                .await
                .unwrap();
            for k in 0..per_sender {
                c.send_json(&chat(&to, &format!("{i}-{k}"), &format!("t{k}")))
                    .await
                    .unwrap();
            }
            for _ in 0..per_sender {
                expect(&mut c, "MESSAGE_ACK").await;
            }
        }));
    }
    let total = 4 * per_sender;
    for device in [&mut b1, &mut b2] {
        let got = seq_frames(device, total).await;
        assert_eq!(
            seqs(&got),
            (1..=total as u64).collect::<Vec<_>>(),
            "no gap, no repeat, in order"
        );
        let mut ids: Vec<_> = got
            .iter()
            .map(|f| f["messageId"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), total);
    }
    for s in senders {
        s.await.unwrap();
    }
    expect_silence(&mut b1).await;
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn a_bad_since_is_refused_with_what_to_give() {
    let node = start(config("sync-bad")).await;
    let url = format!("{}&since=-3", chat_url(&node.ws(), "bob"));
    match Client::connect_url(&url, WAIT).await {
        Err(chatd::client::ClientError::Refused { status, body, .. }) => {
            assert_eq!(status, 400);
            assert!(
                body.contains("INVALID_SINCE") && body.contains("last seq"),
                "{body}"
            );
        }
        Ok(_) => panic!("since=-3 was accepted"),
        Err(e) => panic!("{e}"),
    }
    let mut b = node.client("bob").await;
    b.send_json(&json!({"type": "SYNC", "since": "x"}))
        .await
        .unwrap();
    let e = expect(&mut b, "ERROR").await;
    assert_eq!(e["code"], "INVALID_FIELD");
    // The connection stays usable.
    b.send_json(&json!({"type": "SYNC", "since": 0}))
        .await
        .unwrap();
    assert_eq!(expect(&mut b, "SYNCED").await["seq"], 0);
    node.stop().await;
}

#[tokio::test]
async fn a_cursor_ahead_of_the_inbox_is_told_and_reset() {
    // As after an in-memory store restarted: the device's cursor means nothing here.
    let node = start(config("sync-ahead")).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut a1 = node.client(&a).await;
    send_acked(&mut a1, &b, "one", "t1").await;
    let mut b1 = connect_since(&node, &b, 40).await;
    let e = expect(&mut b1, "ERROR").await;
    assert_eq!(e["code"], "CURSOR_AHEAD", "{e}");
    assert_eq!(expect(&mut b1, "SYNCED").await["seq"], 1);
    send_acked(&mut a1, &b, "two", "t2").await;
    assert_eq!(seqs(&seq_frames(&mut b1, 1).await), [2]);
    node.stop().await;
}

#[tokio::test]
async fn a_message_whose_publish_failed_arrives_at_the_next_heartbeat() {
    let shared = shared_backends();
    let n1 = start_with(config("sync-pub1"), shared.clone()).await;
    let n2 = start_with(config("sync-pub2"), shared.clone()).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let mut b2 = n2.client(&b).await;
    eventually("bob is seen on node 2", || async {
        shared.presence.devices(&b).await.unwrap().len() == 1
    })
    .await;
    // Node 2 stops consuming: node 1's publish to it fails (as to a broker that is down).
    shared.bus.unsubscribe("sync-pub2").await;
    let mut a1 = n1.client(&a).await;
    let ack = send_acked(&mut a1, &b, "lost in transit?", "t1").await;
    assert_eq!(ack["remoteFailed"], 1, "{ack}");
    expect_silence(&mut b2).await;
    b2.send_json(&json!({"type": "HEARTBEAT", "content": "ping"}))
        .await
        .unwrap();
    let got = expect(&mut b2, "CHAT_MESSAGE").await;
    assert_eq!(
        (got["seq"].as_u64(), got["content"].as_str()),
        (Some(1), Some("lost in transit?"))
    );
    n1.stop().await;
    n2.stop().await;
}
