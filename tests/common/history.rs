//! What every store promises of a chat's history (`Store::fetch_chat`), run against each one:
//! the in-process store, Redis (single and cluster) and a MessageService in front of either.

use chatd::store::{ChatPage, NewMessage, SaveOutcome, Store, StoreError};

use super::unique;

fn message(from: &str, to: &str, chat: &str, n: usize) -> NewMessage {
    NewMessage {
        message_id: unique("m"),
        sender_id: from.into(),
        receiver_id: to.into(),
        chat_id: chat.into(),
        content: format!("#{n} in {chat}"),
        timestamp: 1_000 + n as i64,
        temp_message_id: Some(unique("t")),
        group: false,
    }
}

async fn save(s: &dyn Store, m: NewMessage) -> NewMessage {
    match s.save(m).await.unwrap() {
        SaveOutcome::Saved(stored) => (*stored.message).clone(),
        other => panic!("{other:?}"),
    }
}

fn ids(page: &ChatPage) -> Vec<&str> {
    page.messages
        .iter()
        .map(|h| h.message.message.message_id.as_str())
        .collect()
}

/// Two users' chat, a second chat of theirs in between, a stranger: pages newest first,
/// each user's seqs, `more` until the first message, a retry not twice, the receipt's
/// `read_at`, and the refusals.
pub async fn history_contract(s: &dyn Store) {
    let (a, b, eve) = (unique("a"), unique("b"), unique("eve"));
    let (chat, other) = (unique("chat"), unique("other"));
    let mut sent = Vec::new();
    for n in 0..5 {
        let (from, to) = if n % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let m = save(s, message(from, to, &chat, n)).await;
        if n == 2 {
            // A retry of the last send (same tempMessageId, new id) stores nothing new.
            let retry = NewMessage {
                message_id: unique("m"),
                ..m.clone()
            };
            assert!(matches!(
                s.save(retry).await.unwrap(),
                SaveOutcome::Duplicate(_)
            ));
            save(s, message(&a, &b, &other, n)).await;
        }
        sent.push(m);
    }
    let newest_first: Vec<&str> = sent.iter().rev().map(|m| m.message_id.as_str()).collect();

    let page = s.fetch_chat(&a, &chat, None, 2).await.unwrap();
    assert_eq!(ids(&page), newest_first[..2], "the newest two");
    assert!(page.more);
    // a's inbox: #0 #1 #2, the other chat's message, #3 #4.
    let seqs: Vec<u64> = page.messages.iter().map(|h| h.seq).collect();
    assert_eq!(seqs, [6, 5], "places in the asking user's inbox");
    assert_eq!(
        page.messages[0].message.message.content,
        format!("#4 in {chat}")
    );
    let page = s
        .fetch_chat(&a, &chat, Some(newest_first[1]), 2)
        .await
        .unwrap();
    assert_eq!(ids(&page), newest_first[2..4]);
    assert!(page.more);
    let page = s
        .fetch_chat(&a, &chat, Some(newest_first[3]), 2)
        .await
        .unwrap();
    assert_eq!(ids(&page), newest_first[4..]);
    assert!(!page.more, "the first message ends the history");

    // b sees the same chat at its own seqs, and its other chat apart.
    let page = s.fetch_chat(&b, &chat, None, 100).await.unwrap();
    assert_eq!(ids(&page), newest_first);
    assert_eq!(page.messages[4].seq, 1);
    assert_eq!(
        s.fetch_chat(&b, &other, None, 10)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );

    // A receipt shows in both users' history.
    s.mark_read(&b, &chat, &sent[0].message_id).await.unwrap();
    for user in [&a, &b] {
        let page = s
            .fetch_chat(user, &chat, Some(newest_first[3]), 1)
            .await
            .unwrap();
        assert!(page.messages[0].message.read_at.is_some(), "{user}");
    }

    // Not a member: refused, whatever cursor; a cursor from another chat is unknown.
    for before in [None, Some(newest_first[0])] {
        assert!(
            matches!(
                s.fetch_chat(&eve, &chat, before, 10).await,
                Err(StoreError::NotMember(..))
            ),
            "{before:?}"
        );
    }
    let elsewhere = s.fetch_chat(&a, &other, None, 1).await.unwrap();
    let elsewhere = ids(&elsewhere)[0].to_string();
    assert!(matches!(
        s.fetch_chat(&a, &chat, Some(&elsewhere), 10).await,
        Err(StoreError::UnknownMessage(..))
    ));
}
