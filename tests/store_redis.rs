//! The Redis store's inbox against a real Redis (scripts/services.sh): seqs numbered in the
//! same script that stores, duplicates keeping their places, receipts in the sender's inbox,
//! trimming and expiry reported as `oldest`, never as a silent gap.

mod common;

use chatd::config::RedisConfig;
use chatd::redis_client::RedisClient;
use chatd::store::{EntryKind, NewMessage, RedisStore, SaveOutcome, Store};
use common::unique;

fn store(retention_secs: u64, inbox_max: usize) -> RedisStore {
    let config = RedisConfig {
        password: "redis123".into(),
        ..RedisConfig::default()
    };
    RedisStore::new(
        RedisClient::new(&config).unwrap(),
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
    match s
        .save(message(&unique("m"), &a, &b, Some("t1")))
        .await
        .unwrap()
    {
        SaveOutcome::Duplicate(m) => {
            assert_eq!(m.message.message_id, m1);
            assert_eq!((m.receiver_seq, m.sender_seq), (1, 1));
        }
        other => panic!("{other:?}"),
    }
    let receipt = s.mark_read(&b, "c", &m1).await.unwrap();
    assert_eq!(receipt.seq, 3, "after a's two messages");
    assert_eq!(s.mark_read(&b, "c", &m1).await.unwrap().seq, 3, "once");

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
