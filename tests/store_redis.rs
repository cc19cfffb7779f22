//! The Redis store's inbox against a real Redis (scripts/services.sh): seqs numbered in the
//! same script that stores, duplicates keeping their places, receipts in the sender's inbox,
//! trimming and expiry reported as `oldest`, never as a silent gap.

mod common;

use chatd::redis_client::RedisClient;
use chatd::store::{
    EntryKind, NewMessage, RedisStore, SaveOutcome, Store, StoreError, StoredMessage,
};
use common::unique;

fn store(retention_secs: u64, inbox_max: usize) -> RedisStore {
    RedisStore::new(
        RedisClient::new(&common::test_redis()).unwrap(),
        retention_secs,
        inbox_max,
    )
}

fn message(id: &str, from: &str, to: &str, temp: Option<&str>) -> NewMessage {
    NewMessage {
        message_id: id.into(),
        sender_id: from.into(),
        receiver_id: to.into(),
        chat_id: "c".into(),
        content: format!("content of {id}"),
        timestamp: 1,
        temp_message_id: temp.map(String::from),
        group: false,
    }
}

/// The message a save stored or found.
fn stored(outcome: SaveOutcome) -> StoredMessage {
    match outcome {
        SaveOutcome::Saved(m) | SaveOutcome::Duplicate(m) => m,
    }
}

/// A user's inbox: (seq, message id) of each entry.
async fn inbox_ids(s: &RedisStore, user: &str) -> Vec<(u64, String)> {
    let inbox = s.fetch(user, 0, 10).await.unwrap();
    inbox
        .entries
        .iter()
        .map(|e| (e.seq, e.message.message.message_id.clone()))
        .collect()
}

/// Sends again from `from` to `to` under `temp` with a new message id (a retry, as the node
/// makes it): it must be the earlier message `first`, at its (sender, receiver) seqs.
async fn retry_is(s: &RedisStore, from: &str, to: &str, temp: &str, first: &str, seqs: (u64, u64)) {
    match s
        .save(message(&unique("m"), from, to, Some(temp)))
        .await
        .unwrap()
    {
        SaveOutcome::Duplicate(m) => {
            assert_eq!(m.message.message_id, first);
            assert_eq!((m.sender_seq, m.receiver_seq), seqs);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn seqs_duplicates_and_receipts() {
    let s = store(600, 100);
    let (a, b) = (unique("a"), unique("b"));
    let m1 = unique("m");
    let saved = match s.save(message(&m1, &a, &b, Some("t1"))).await.unwrap() {
        SaveOutcome::Saved(m) => m,
        other => panic!("{other:?}"),
    };
    assert_eq!((saved.receiver_seq, saved.sender_seq), (1, 1));
    s.save(message(&unique("m"), &b, &a, None)).await.unwrap();
    // A retry under another id but the same tempMessageId: the first, with its places.
    retry_is(&s, &a, &b, "t1", &m1, (1, 1)).await;
    let receipt = s.mark_read(&b, "c", &m1).await.unwrap();
    assert_eq!(receipt.seq, 3, "after a's two messages");
    assert_eq!(s.mark_read(&b, "c", &m1).await.unwrap().seq, 3, "once");
    // Its sender may not; to anyone else, or in another chat, it does not exist.
    assert!(matches!(
        s.mark_read(&a, "c", &m1).await,
        Err(StoreError::NotReceiver(_))
    ));
    for (reader, chat) in [(unique("eve").as_str(), "c"), (b.as_str(), "other")] {
        assert!(matches!(
            s.mark_read(reader, chat, &m1).await,
            Err(StoreError::UnknownMessage(..))
        ));
    }

    let page = s.fetch(&a, 0, 10).await.unwrap();
    assert_eq!((page.oldest, page.latest), (1, 3));
    let kinds: Vec<_> = page.entries.iter().map(|e| (e.seq, e.kind)).collect();
    assert_eq!(
        kinds,
        [
            (1, EntryKind::Message),
            (2, EntryKind::Message),
            (3, EntryKind::Receipt)
        ]
    );
    assert!(page.entries[2].message.read_at.is_some());
    assert_eq!(
        page.entries[0].message.message.content,
        format!("content of {m1}")
    );
    let paged = s.fetch(&a, 1, 1).await.unwrap();
    assert_eq!(paged.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
    let empty = s.fetch(&unique("nobody"), 0, 10).await.unwrap();
    assert_eq!((empty.oldest, empty.latest, empty.entries.len()), (1, 0, 0));
    // Each user's newest seq at once: a's three, b's two (a message from a, one to a).
    let nobody = unique("nobody");
    assert_eq!(s.latest_seqs(&[&a, &b, &nobody]).await.unwrap(), [3, 2, 0]);
}

#[tokio::test]
async fn a_trimmed_or_expired_inbox_says_what_it_no_longer_keeps() {
    let s = store(600, 3);
    let (a, b) = (unique("a"), unique("b"));
    for _ in 0..5 {
        s.save(message(&unique("m"), &a, &b, None)).await.unwrap();
    }
    let page = s.fetch(&b, 0, 10).await.unwrap();
    assert_eq!((page.oldest, page.latest), (3, 5));
    assert_eq!(
        page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 4, 5]
    );

    let short = store(1, 100);
    let c = unique("c");
    short
        .save(message(&unique("m"), &a, &c, None))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let page = short.fetch(&c, 0, 10).await.unwrap();
    assert_eq!((page.oldest, page.latest, page.entries.len()), (2, 1, 0));
    // Seqs never repeat, even after everything expired.
    match short
        .save(message(&unique("m"), &a, &c, None))
        .await
        .unwrap()
    {
        SaveOutcome::Saved(m) => assert_eq!(m.receiver_seq, 2),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn history_pages_back_through_a_chat_only_for_its_members() {
    common::history::history_contract(&store(600, 100)).await;
}

#[tokio::test]
async fn groups_place_a_message_in_every_members_inbox() {
    common::groups::group_contract(&store(600, 100)).await;
}

/// A history is capped like an inbox, and forgets what expired: a page ends at the first
/// message whose copy is gone, and once none is left the user is no member any more.
#[tokio::test]
async fn a_history_is_capped_and_forgets_expired_messages() {
    let s = store(600, 3);
    let (a, b) = (unique("a"), unique("b"));
    for _ in 0..5 {
        s.save(message(&unique("m"), &a, &b, None)).await.unwrap();
    }
    let page = s.fetch_chat(&b, "c", None, 10).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|h| h.seq).collect::<Vec<_>>(),
        [5, 4, 3]
    );
    assert!(!page.more);

    let short = store(1, 100);
    let c = unique("c");
    short
        .save(message(&unique("m"), &a, &c, None))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let page = short.fetch_chat(&c, "c", None, 10).await.unwrap();
    assert_eq!(page.messages.len(), 0, "{page:?}");
    assert!(matches!(
        short.fetch_chat(&c, "c", None, 10).await,
        Err(StoreError::NotMember(..))
    ));
}

/// A batch larger than one script call (256 messages) is stored in order across its calls;
/// a tempMessageId repeated inside the batch stores once; the whole batch sent again stores
/// nothing and answers with the first places.
#[tokio::test]
async fn a_batch_across_script_calls_keeps_order_and_idempotency() {
    let s = store(600, 10_000);
    let (a, b) = (unique("a"), unique("b"));
    let mut batch: Vec<NewMessage> = (0..600)
        .map(|i| message(&unique("m"), &a, &b, Some(&format!("t{i}"))))
        .collect();
    // The same send twice in one batch (a client's retry that caught up with it).
    batch.push(message(&unique("m"), &a, &b, Some("t300")));
    let first = s.save_batch(batch.clone()).await;
    let seqs: Vec<u64> = first
        .iter()
        .take(600)
        .map(|r| match r {
            Ok(SaveOutcome::Saved(m)) => m.receiver_seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, (1..=600).collect::<Vec<u64>>());
    match &first[600] {
        Ok(SaveOutcome::Duplicate(m)) => assert_eq!(m.receiver_seq, 301),
        other => panic!("{other:?}"),
    }
    let again = s.save_batch(batch).await;
    for (i, r) in again.iter().enumerate().take(600) {
        match r {
            Ok(SaveOutcome::Duplicate(m)) => assert_eq!(m.receiver_seq, i as u64 + 1),
            other => panic!("message {i}: {other:?}"),
        }
    }
    let page = s.fetch(&b, 0, 1000).await.unwrap();
    assert_eq!(page.latest, 600, "each stored once");
    let contents: Vec<String> = page
        .entries
        .iter()
        .map(|e| e.message.message.temp_message_id.clone().unwrap())
        .collect();
    assert_eq!(
        contents,
        (0..600).map(|i| format!("t{i}")).collect::<Vec<_>>()
    );
}

/// In one batch, users write to each other and to others, each several times, on both sides
/// of its messages: every inbox numbers its messages 1, 2, 3, ... with each message once, a
/// sender's messages in the order sent, each copy holding the seqs its two inboxes gave it; a
/// user's history of the chat holds them in the inbox's order; the batch sent again stores
/// nothing and answers the same places. On a single Redis (one save call, places made in
/// bulk) each inbox is in the order sent; on a cluster a batch's receivers are placed before
/// its senders (steps 2, then 3), so a user's received messages of the batch come before its
/// sent ones.
#[tokio::test]
async fn a_batch_of_users_writing_to_each_other_places_each_message_once_in_order() {
    let s = store(600, 1000);
    let users: Vec<String> = (0..4).map(|i| unique(&format!("u{i}"))).collect();
    let pairs = [
        (0, 1),
        (1, 0),
        (0, 2),
        (2, 3),
        (1, 0),
        (3, 0),
        (0, 1),
        (2, 1),
        (1, 3),
    ];
    let sent: Vec<(usize, usize)> = (0..70).map(|i| pairs[i % pairs.len()]).collect();
    let batch: Vec<NewMessage> = sent
        .iter()
        .enumerate()
        .map(|(i, &(f, t))| message(&unique("m"), &users[f], &users[t], Some(&format!("t{i}"))))
        .collect();
    let places = |saved: Vec<Result<SaveOutcome, StoreError>>, fresh: bool| -> Vec<(u64, u64)> {
        saved
            .into_iter()
            .map(|r| match r {
                Ok(SaveOutcome::Saved(m)) if fresh => (m.sender_seq, m.receiver_seq),
                Ok(SaveOutcome::Duplicate(m)) if !fresh => (m.sender_seq, m.receiver_seq),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let first = places(s.save_batch(batch.clone()).await, true);
    assert_eq!(places(s.save_batch(batch.clone()).await, false), first);
    if !common::on_redis_cluster() {
        // Each user's messages numbered in the order sent.
        let mut count = [0u64; 4];
        let mut in_order = Vec::new();
        for &(f, t) in &sent {
            count[t] += 1;
            count[f] += 1;
            in_order.push((count[f], count[t]));
        }
        assert_eq!(first, in_order);
    }
    for (u, user) in users.iter().enumerate() {
        // (seq, index in the batch) of each message of this user, by seq.
        let mut mine: Vec<(u64, usize)> = sent
            .iter()
            .zip(&first)
            .enumerate()
            .filter_map(|(i, (&(f, t), &(sseq, rseq)))| {
                (f == u || t == u).then_some((if f == u { sseq } else { rseq }, i))
            })
            .collect();
        mine.sort();
        let seqs: Vec<u64> = mine.iter().map(|&(seq, _)| seq).collect();
        assert_eq!(
            seqs,
            (1..=mine.len() as u64).collect::<Vec<_>>(),
            "{user}: gap-free, once"
        );
        for f in 0..users.len() {
            let theirs: Vec<usize> = mine
                .iter()
                .map(|&(_, i)| i)
                .filter(|&i| sent[i].0 == f)
                .collect();
            assert!(
                theirs.is_sorted(),
                "{user}: messages of user {f} out of order: {theirs:?}"
            );
        }
        let mine: Vec<(u64, String)> = mine
            .into_iter()
            .map(|(seq, i)| (seq, batch[i].message_id.clone()))
            .collect();
        let inbox = s.fetch(user, 0, 1000).await.unwrap();
        let ids: Vec<(u64, String)> = inbox
            .entries
            .iter()
            .map(|e| (e.seq, e.message.message.message_id.clone()))
            .collect();
        assert_eq!(ids, mine, "{user}: the inbox");
        let history = s.fetch_chat(user, "c", None, 100).await.unwrap();
        let mut ids: Vec<(u64, String)> = history
            .messages
            .iter()
            .map(|h| (h.seq, h.message.message.message_id.clone()))
            .collect();
        ids.reverse();
        assert_eq!(ids, mine, "{user}: the history of the chat");
    }
}

/// Runs one command on the test's Redis.
async fn command<T: redis::FromRedisValue + Send>(client: &RedisClient, words: &[&str]) -> T {
    let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    let words = &words;
    client
        .call("test command", |mut c| async move {
            redis::cmd(&words[0])
                .arg(&words[1..])
                .query_async(&mut c)
                .await
        })
        .await
        .unwrap()
}

/// A copy is one string: any content reads back as sent (through the inbox and the
/// history), and a receipt marks both copies without losing their expiry.
#[tokio::test]
async fn a_copy_is_one_string_that_keeps_any_content_and_its_expiry_when_read() {
    let s = store(600, 100);
    let client = RedisClient::new(&common::test_redis()).unwrap();
    let (a, b, m1) = (unique("a"), unique("b"), unique("m"));
    let content = "3:ab:\n12:é😀 11:receiverSeq1:9";
    let mut sent = message(&m1, &a, &b, None);
    sent.content = content.into();
    s.save(sent).await.unwrap();
    for user in [&a, &b] {
        let key = chatd::store::redis::message_key(user, &m1);
        let kind: String = command(&client, &["TYPE", &key]).await;
        assert_eq!(kind, "string", "{key}");
        let page = s.fetch_chat(user, "c", None, 10).await.unwrap();
        assert_eq!(page.messages[0].message.message.content, content);
        assert_eq!(page.messages[0].message.message.temp_message_id, None);
    }
    let receipt = s.mark_read(&b, "c", &m1).await.unwrap();
    assert_eq!(receipt.seq, 2);
    for user in [&a, &b] {
        let key = chatd::store::redis::message_key(user, &m1);
        let ttl: i64 = command(&client, &["PTTL", &key]).await;
        assert!(ttl > 590_000 && ttl <= 600_000, "{key}: {ttl}");
        let page = s.fetch(user, 0, 10).await.unwrap();
        let read = &page.entries[0].message;
        assert_eq!(
            (read.message.content.as_str(), read.read_at.is_some()),
            (content, true)
        );
        assert_eq!(
            (read.receiver_seq, read.sender_seq),
            (1, if *user == a { 1 } else { 0 })
        );
    }
    let outbox = s.fetch(&a, 0, 10).await.unwrap();
    assert_eq!(outbox.entries[1].kind, EntryKind::Receipt);
    assert_eq!(s.mark_read(&b, "c", &m1).await.unwrap().seq, 2, "once");
}

/// Copies written by the version before copies became strings are hashes: they are read,
/// retried and marked read as before, next to the strings this version writes.
#[tokio::test]
async fn copies_an_earlier_version_wrote_as_hashes_are_read_and_marked() {
    let s = store(600, 100);
    let client = RedisClient::new(&common::test_redis()).unwrap();
    let (a, b) = (unique("a"), unique("b"));
    let fields = "senderId {a} receiverId {b} chatId c content hi timestamp 1 tempMessageId t1";
    let fields = fields.replace("{a}", &a).replace("{b}", &b);
    let sender_copy = chatd::store::redis::message_key(&a, "m1");
    let receiver_copy = chatd::store::redis::message_key(&b, "m1");
    let idem = chatd::store::redis::idempotency_key(&a, "t1");
    let (a_seq, b_seq) = (
        chatd::store::redis::seq_key(&a),
        chatd::store::redis::seq_key(&b),
    );
    let (a_inbox, b_inbox) = (
        chatd::store::redis::inbox_key(&a),
        chatd::store::redis::inbox_key(&b),
    );
    let written = [
        format!("HSET {sender_copy} {fields} senderSeq 1 receiverSeq 1"),
        format!("PEXPIRE {sender_copy} 600000"),
        format!("HSET {receiver_copy} {fields} receiverSeq 1"),
        format!("PEXPIRE {receiver_copy} 600000"),
        format!("SET {idem} m1 PX 600000"),
        format!("SET {a_seq} 1"),
        format!("SET {b_seq} 1"),
        format!("ZADD {a_inbox} 1 1:m:m1"),
        format!("ZADD {b_inbox} 1 1:m:m1"),
    ];
    for line in &written {
        let words: Vec<&str> = line.split_whitespace().collect();
        command::<redis::Value>(&client, &words).await;
    }
    let inbox = s.fetch(&b, 0, 10).await.unwrap();
    assert_eq!(inbox.entries[0].message.message.content, "hi");
    retry_is(&s, &a, &b, "t1", "m1", (1, 1)).await;
    // The first receipt of a hash copy: its fields are set in the hash, as before.
    assert_eq!(s.mark_read(&b, "c", "m1").await.unwrap().seq, 2);
    assert_eq!(s.mark_read(&b, "c", "m1").await.unwrap().seq, 2, "once");
    let receipt_seq: String = command(&client, &["HGET", &sender_copy, "receiptSeq"]).await;
    assert_eq!(receipt_seq, "2");
    let outbox = s.fetch(&a, 0, 10).await.unwrap();
    let kinds: Vec<_> = outbox.entries.iter().map(|e| (e.seq, e.kind)).collect();
    assert_eq!(kinds, [(1, EntryKind::Message), (2, EntryKind::Receipt)]);
    assert!(outbox.entries[1].message.read_at.is_some());
    // A new message next to them is a string, with the seqs going on.
    let m2 = stored(s.save(message("m2", &a, &b, Some("t2"))).await.unwrap());
    assert_eq!((m2.sender_seq, m2.receiver_seq), (3, 2));
    let new_copy = chatd::store::redis::message_key(&b, "m2");
    let kind: String = command(&client, &["TYPE", &new_copy]).await;
    assert_eq!(kind, "string");
}

/// `chatd store migrate` on a Redis of the test's own holding the layout before Redis Cluster
/// support: a node would refuse it; after the command every message, seq, receipt and
/// idempotency key is where the current store looks, with its expiry.
#[tokio::test]
async fn an_old_layout_is_refused_then_migrated_without_loss() {
    let port = common::free_port();
    let _redis = common::redis_server(port, None);
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = RedisClient::new(&chatd::config::RedisConfig {
        url: url.clone(),
        ..Default::default()
    })
    .unwrap();
    common::eventually("the test's Redis answers", || async {
        client.ping().await.is_ok()
    })
    .await;
    // A user id may hold ':'; the idempotency key's sender is found from its message.
    let (a, b) = ("a:1", "b");
    let old: Vec<Vec<String>> = vec![
        "HSET chat:msg:m1 senderId a:1 receiverId b chatId c content hi timestamp 1 \
         tempMessageId t1 receiverSeq 1 senderSeq 1 readAt 5 receiptSeq 2",
        "PEXPIRE chat:msg:m1 600000",
        "SET chat:msg:idem:a:1:t1 m1 PX 600000",
        "SET chat:seq:b 1",
        "SET chat:seq:a:1 2",
        "ZADD chat:inbox:b 1 1:m:m1",
        "ZADD chat:inbox:a:1 1 1:m:m1 2 2:r:m1",
        "HSET chat:user:devices:b conn n1|1",
    ]
    .into_iter()
    .map(|c| c.split_whitespace().map(String::from).collect())
    .collect();
    for words in old {
        client
            .call("old layout", |mut c| async move {
                redis::cmd(&words[0])
                    .arg(&words[1..])
                    .query_async::<redis::Value>(&mut c)
                    .await
            })
            .await
            .unwrap();
    }
    let refused = chatd::store::migrate::check_layout(&client).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("chatd store migrate")),
        "{refused:?}"
    );

    let out = common::chatd()
        .args(["store", "migrate", "--redis", &url, "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["chat:msg:*"], 1, "{report}");
    chatd::store::migrate::check_layout(&client).await.unwrap();

    let s = RedisStore::new(client.clone(), 600, 100);
    let inbox = s.fetch(b, 0, 10).await.unwrap();
    assert_eq!((inbox.oldest, inbox.latest), (1, 1));
    assert_eq!(inbox.entries[0].message.message.content, "hi");
    assert_eq!(inbox.entries[0].message.read_at, Some(5));
    let outbox = s.fetch(a, 0, 10).await.unwrap();
    let kinds: Vec<_> = outbox.entries.iter().map(|e| (e.seq, e.kind)).collect();
    assert_eq!(kinds, [(1, EntryKind::Message), (2, EntryKind::Receipt)]);
    // The retry of the old send is still recognised; seqs go on from where they were.
    retry_is(&s, a, b, "t1", "m1", (1, 1)).await;
    match s.save(message("m2", a, b, Some("t2"))).await.unwrap() {
        SaveOutcome::Saved(m) => assert_eq!((m.sender_seq, m.receiver_seq), (3, 2)),
        other => panic!("{other:?}"),
    }
    // Reading it again changes nothing: the receipt keeps its place.
    assert_eq!(s.mark_read(b, "c", "m1").await.unwrap().seq, 2);
    let ttl: i64 = client
        .call("ttl", |mut c| async move {
            redis::cmd("PTTL")
                .arg(chatd::store::redis::message_key(b, "m1"))
                .query_async(&mut c)
                .await
        })
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
}

/// A save cut before its last step (the node died after the receiver's slot, before the
/// sender's): the message is in the receiver's inbox only, and the sender's retry with the
/// same tempMessageId completes it, once, under the first message id.
#[tokio::test]
async fn a_save_cut_between_its_steps_is_completed_by_the_retry_once() {
    let s = store(600, 100);
    let (a, b) = (unique("a"), unique("b"));
    let first = unique("m");
    s.save_without_sender_step(message(&first, &a, &b, Some("t1")))
        .await
        .unwrap();
    assert_eq!(s.fetch(&b, 0, 10).await.unwrap().latest, 1);
    assert_eq!(
        s.fetch(&a, 0, 10).await.unwrap().latest,
        0,
        "the sender's inbox gets it last"
    );

    for _ in 0..2 {
        // The retry comes with a new message id from the node: the first one is kept.
        retry_is(&s, &a, &b, "t1", &first, (1, 1)).await;
    }
    for user in [&a, &b] {
        assert_eq!(
            inbox_ids(&s, user).await,
            [(1, first.clone())],
            "{user}: stored once"
        );
    }
}

/// A node (or MessageService) that never got the answer to a save sends the same message
/// again, same id: the claim finds its own id (not made now), so steps 2 and 3 look for the
/// copies an earlier attempt wrote, with a tempMessageId and without one. Each inbox holds the
/// message once, at seq 1.
#[tokio::test]
async fn a_save_cut_between_its_steps_and_sent_again_with_its_own_id_is_stored_once() {
    let s = store(600, 100);
    for temp in [Some("t1"), None] {
        let (a, b) = (unique("a"), unique("b"));
        let id = unique("m");
        s.save_without_sender_step(message(&id, &a, &b, temp))
            .await
            .unwrap();
        for _ in 0..2 {
            let stored = stored(s.save(message(&id, &a, &b, temp)).await.unwrap());
            assert_eq!(stored.message.message_id, id);
            assert_eq!((stored.sender_seq, stored.receiver_seq), (1, 1), "{temp:?}");
        }
        for user in [&a, &b] {
            let ids = inbox_ids(&s, user).await;
            assert_eq!(ids, [(1, id.clone())], "{user} ({temp:?}): stored once");
        }
    }
}

/// A send's first attempt claims its tempMessageId and stalls (its node is slow, or dies with
/// the MessageService still at work); the client reconnects elsewhere and sends again, with
/// the same tempMessageId: the retry finds the claim and stores the message whole under the
/// first attempt's id. Then the first attempt goes on with its steps 2 and 3: it must find the
/// copies the retry wrote, not place the message a second time.
#[tokio::test]
async fn a_retry_that_overtakes_its_stalled_first_attempt_stores_the_message_once() {
    let s = store(600, 100);
    let (a, b) = (unique("a"), unique("b"));
    let (first, retry) = (unique("m"), unique("m"));
    let stalled = s.claim_only(message(&first, &a, &b, Some("t1"))).await;
    let saved = stored(s.save(message(&retry, &a, &b, Some("t1"))).await.unwrap());
    assert_eq!(
        saved.message.message_id, first,
        "the retry saves the claimed id"
    );
    let finished = stored(s.finish_claimed(stalled).await.unwrap());
    assert_eq!(finished.message.message_id, first);
    assert_eq!((finished.sender_seq, finished.receiver_seq), (1, 1));
    for user in [&a, &b] {
        assert_eq!(
            inbox_ids(&s, user).await,
            [(1, first.clone())],
            "{user}: stored once"
        );
    }
}

/// On a single Redis a new message is saved whole in one script call, while a note to self,
/// a group message or a retry of a save that was cut short takes the three steps. A sender's
/// messages after such a one in the same batch take the three steps too: each inbox gets
/// them in the order sent.
#[tokio::test]
async fn a_senders_messages_keep_their_order_when_one_of_a_batch_takes_the_three_steps() {
    let s = store(600, 100);
    let seqs = |saved: Vec<Result<SaveOutcome, StoreError>>| -> Vec<(u64, u64)> {
        saved
            .into_iter()
            .map(|r| stored(r.unwrap()))
            .map(|m| (m.sender_seq, m.receiver_seq))
            .collect()
    };
    // A note to self first.
    let (a, b) = (unique("a"), unique("b"));
    let batch = vec![
        message(&unique("m"), &a, &a, Some("t1")),
        message(&unique("m"), &a, &b, Some("t2")),
        message(&unique("m"), &a, &b, Some("t3")),
    ];
    assert_eq!(seqs(s.save_batch(batch).await), [(1, 1), (2, 1), (3, 2)]);
    // The retry of a save cut between its steps first (in the receiver's inbox already).
    let (a, b) = (unique("a"), unique("b"));
    let first = unique("m");
    s.save_without_sender_step(message(&first, &a, &b, Some("t1")))
        .await
        .unwrap();
    let batch = vec![
        message(&unique("m"), &a, &b, Some("t1")),
        message(&unique("m"), &a, &b, Some("t2")),
    ];
    assert_eq!(seqs(s.save_batch(batch).await), [(1, 1), (2, 2)]);
    for user in [&a, &b] {
        let inbox = s.fetch(user, 0, 10).await.unwrap();
        assert_eq!(inbox.entries.len(), 2, "{user}: each message once");
        assert_eq!(inbox.entries[0].message.message.message_id, first);
    }
}

/// With `store.wait_replicas = 1` a save is acknowledged only once a replica has it: with the
/// receiver's master's replica stopped (SIGSTOP), the save fails naming the replicas; once
/// it runs again, the retry completes the same message, once.
#[tokio::test(flavor = "multi_thread")]
async fn with_wait_replicas_a_save_no_replica_confirmed_is_refused_and_the_retry_completes_it() {
    let cluster = common::TestCluster::start();
    let config = chatd::config::RedisConfig {
        url: cluster.seeds(),
        cluster: true,
        ..Default::default()
    };
    let redis = RedisClient::new(&config)
        .unwrap()
        .waiting_for_replicas(1, 2000);
    let s = RedisStore::new(redis, 600, 100);
    let (a, b) = (unique("a"), unique("b"));
    let first = unique("m");
    s.save(message(&unique("m"), &a, &b, Some("t0")))
        .await
        .unwrap();

    let master = cluster
        .master_of(&chatd::store::redis::seq_key(&b))
        .unwrap();
    let replica = cluster
        .replica_of(master)
        .expect("the master has a replica");
    let pid = cluster.pid(replica).unwrap().to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let refused = s.save(message(&first, &a, &b, Some("t1"))).await;
    signal("-CONT");
    let why = refused.expect_err("no replica confirmed it").to_string();
    assert!(why.contains("0 of 1 replicas"), "{why}");

    retry_is(&s, &a, &b, "t1", &first, (2, 2)).await;
    assert_eq!(s.fetch(&b, 0, 10).await.unwrap().latest, 2, "stored once");
}

/// A device whose inbox lost what it missed (`SYNC_TOO_OLD`, inbox capped at 3) gets it from
/// its chats' history: `chatd connect` pages back through each chat of the replay and prints
/// the gap's messages, each at its seq.
#[tokio::test(flavor = "multi_thread")]
async fn chatd_connect_fills_a_sync_too_old_gap_from_the_chats_history() {
    use std::sync::Arc;
    let backends = chatd::chat::Backends {
        presence: Arc::new(chatd::presence::MemoryPresence::new(300)),
        bus: Arc::new(chatd::bus::LocalBus::new()),
        store: Arc::new(store(600, 3)),
    };
    let node = common::start_with(common::config("gap"), backends).await;
    let (a, b) = (unique("alice"), unique("bob"));
    let (x, y) = (unique("x"), unique("y"));
    let mut alice = node.client(&a).await;
    let mut ids = Vec::new();
    for (n, chat) in [&x, &y, &x, &y, &x].into_iter().enumerate() {
        let frame = serde_json::json!({"type": "CHAT_MESSAGE", "receiverId": b, "chatId": chat,
            "content": format!("m{}", n + 1), "tempMessageId": format!("t{n}")});
        alice.send_json(&frame).await.unwrap();
        ids.push(common::expect(&mut alice, "MESSAGE_ACK").await["messageId"].clone());
    }
    let out = tokio::task::spawn_blocking({
        let (url, b) = (node.ws(), b.clone());
        move || {
            common::chatd()
                .args([
                    "connect", "--user", &b, "--url", &url, "--since", "0", "--json",
                ])
                .args(["--no-reconnect", "--linger", "1"])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let told = frames
        .iter()
        .find(|f| f["code"] == "SYNC_TOO_OLD")
        .unwrap_or_else(|| panic!("no SYNC_TOO_OLD in {stdout}"));
    assert_eq!(
        (&told["missedFrom"], &told["missedTo"]),
        (&serde_json::json!(1), &serde_json::json!(2))
    );
    // m1 (chat x, seq 1) and m2 (chat y, seq 2) come back from history.
    let mut recovered: Vec<(u64, String)> = frames
        .iter()
        .filter(|f| f["type"] == "HISTORY")
        .flat_map(|f| f["messages"].as_array().cloned().unwrap_or_default())
        .filter(|m| m["seq"].as_u64().is_some_and(|s| s <= 2))
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["messageId"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    recovered.sort();
    recovered.dedup();
    assert_eq!(
        recovered,
        [
            (1, ids[0].as_str().unwrap().to_string()),
            (2, ids[1].as_str().unwrap().to_string())
        ],
        "{stdout}"
    );
    node.stop().await;
}
