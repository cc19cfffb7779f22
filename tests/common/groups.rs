//! What every store promises of groups, run against each one: the in-process store, Redis
//! (single and cluster) and a MessageService in front of either. Membership and its rules, a
//! group message placed once in every member's inbox at each member's own seq, a retry that
//! stores nothing twice, and a receipt per member in the sender's inbox.

use chatd::store::{
    EntryKind, MemberChange, NewMessage, Role, SaveOutcome, Store, StoreError, StoredMessage,
    DEFAULT_GROUP_MAX_MEMBERS,
};

use super::unique;

fn to_group(from: &str, group: &str, temp: &str) -> NewMessage {
    NewMessage {
        message_id: unique("m"),
        sender_id: from.into(),
        receiver_id: group.into(),
        chat_id: group.into(),
        content: format!("from {from} to {group}"),
        timestamp: 1_000,
        temp_message_id: Some(temp.into()),
        group: true,
    }
}

fn sorted(mut seqs: Vec<(String, u64)>) -> Vec<(String, u64)> {
    seqs.sort();
    seqs
}

fn roles(members: &[chatd::store::Member]) -> Vec<(String, Role)> {
    let mut r: Vec<_> = members
        .iter()
        .map(|m| (m.user_id.clone(), m.role))
        .collect();
    r.sort_by(|a, b| a.0.cmp(&b.0));
    r
}

async fn saved(s: &dyn Store, m: NewMessage) -> StoredMessage {
    match s.save(m).await.unwrap() {
        SaveOutcome::Saved(stored) => stored,
        other => panic!("{other:?}"),
    }
}

pub async fn group_contract(s: &dyn Store) {
    let [a, b, c, d, eve] = ["a", "b", "c", "d", "eve"].map(unique);
    let g = unique("g");

    // Membership: the creator is the admin; an id is taken once; only members look in.
    let members = s
        .create_group(&g, &a, &[b.clone(), c.clone(), a.clone()])
        .await
        .unwrap();
    assert_eq!(
        roles(&members),
        roles(&s.members(&g, &b).await.unwrap()),
        "members as created and as listed"
    );
    assert_eq!(members.len(), 3, "the creator once: {members:?}");
    assert!(members
        .iter()
        .any(|m| m.user_id == a && m.role == Role::Admin));
    assert!(members
        .iter()
        .any(|m| m.user_id == b && m.role == Role::Member));
    assert!(matches!(
        s.create_group(&g, &eve, &[]).await,
        Err(StoreError::GroupExists(_))
    ));
    assert!(matches!(
        s.members(&g, &eve).await,
        Err(StoreError::NotInGroup(..))
    ));
    assert!(matches!(
        s.members(&unique("g"), &a).await,
        Err(StoreError::NoSuchGroup(_))
    ));
    let crowd: Vec<String> = (0..DEFAULT_GROUP_MAX_MEMBERS)
        .map(|i| format!("u{i}"))
        .collect();
    assert!(matches!(
        s.create_group(&unique("g"), &a, &crowd).await,
        Err(StoreError::GroupFull(_, DEFAULT_GROUP_MAX_MEMBERS))
    ));

    // A message: one place in every member's inbox (each its own seq), then the sender's.
    let temp = unique("t");
    let first = saved(s, to_group(&a, &g, &temp)).await;
    let id = first.message.message_id.clone();
    assert!(first.message.group);
    assert_eq!(
        sorted(first.member_seqs.clone()),
        sorted(vec![(b.clone(), 1), (c.clone(), 1)])
    );
    assert_eq!(first.sender_seq, 1);
    // A second message: the next place of each.
    let second = saved(s, to_group(&b, &g, &unique("t"))).await;
    assert_eq!(
        sorted(second.member_seqs.clone()),
        sorted(vec![(a.clone(), 2), (c.clone(), 2)])
    );
    assert_eq!(second.sender_seq, 2);
    // A retry of the first (a new id, the same tempMessageId): the first, nowhere twice, with
    // every member's place for the delivery the retry makes again.
    match s.save(to_group(&a, &g, &temp)).await.unwrap() {
        SaveOutcome::Duplicate(m) => {
            assert_eq!(m.message.message_id, id);
            assert_eq!(sorted(m.member_seqs), sorted(first.member_seqs.clone()));
        }
        other => panic!("{other:?}"),
    }
    for u in [&a, &b, &c] {
        assert_eq!(s.fetch(u, 0, 0).await.unwrap().latest, 2, "{u}'s inbox");
    }
    // Strangers and missing groups are refused before anything is stored.
    assert!(matches!(
        s.save(to_group(&eve, &g, &unique("t"))).await,
        Err(StoreError::NotInGroup(..))
    ));
    assert!(matches!(
        s.save(to_group(&a, &unique("g"), &unique("t"))).await,
        Err(StoreError::NoSuchGroup(_))
    ));
    assert_eq!(s.fetch(&eve, 0, 0).await.unwrap().latest, 0);

    // Each member's inbox holds it as a group message at its own seq.
    let page = s.fetch(&c, 0, 10).await.unwrap();
    assert_eq!(page.entries.len(), 2);
    let e = &page.entries[0];
    assert_eq!((e.seq, e.kind), (1, EntryKind::Message));
    assert_eq!(e.message.message.message_id, id);
    assert!(e.message.message.group);
    assert_eq!(e.message.message.receiver_id, g);

    // Receipts: each member once, in the sender's inbox; the sender reads no receipt of its
    // own; a stranger's is an unknown message.
    let by_b = s.mark_read(&b, &g, &id).await.unwrap();
    assert_eq!((by_b.reader_id.as_str(), by_b.seq), (b.as_str(), 3));
    assert_eq!(
        s.mark_read(&b, &g, &id).await.unwrap().seq,
        3,
        "marked again"
    );
    let by_c = s.mark_read(&c, &g, &id).await.unwrap();
    assert_eq!((by_c.reader_id.as_str(), by_c.seq), (c.as_str(), 4));
    assert!(matches!(
        s.mark_read(&a, &g, &id).await,
        Err(StoreError::NotReceiver(_))
    ));
    assert!(matches!(
        s.mark_read(&eve, &g, &id).await,
        Err(StoreError::UnknownMessage(..))
    ));
    let receipts: Vec<(u64, String)> = s
        .fetch(&a, 2, 10)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| {
            assert_eq!(e.kind, EntryKind::Receipt);
            assert_eq!(e.message.message.message_id, id);
            (e.seq, e.reader_id)
        })
        .collect();
    assert_eq!(receipts, vec![(3, b.clone()), (4, c.clone())]);

    // The group's history, as each member sees it: its own seqs, its own read time.
    let history = s.fetch_chat(&b, &g, None, 10).await.unwrap();
    let seen: Vec<(u64, bool)> = history
        .messages
        .iter()
        .map(|h| (h.seq, h.message.read_at.is_some()))
        .collect();
    assert_eq!(
        seen,
        vec![(2, false), (1, true)],
        "b's history (its own message unread)"
    );
    assert!(matches!(
        s.fetch_chat(&eve, &g, None, 10).await,
        Err(StoreError::NotMember(..))
    ));

    // Changes: admins add and remove, anyone leaves, the last admin stays until another.
    assert!(matches!(
        s.change_member(&g, &b, &d, MemberChange::Add(Role::Member))
            .await,
        Err(StoreError::NotAdmin(..))
    ));
    assert!(matches!(
        s.change_member(&g, &eve, &eve, MemberChange::Add(Role::Member))
            .await,
        Err(StoreError::NotInGroup(..))
    ));
    let after = s
        .change_member(&g, &a, &d, MemberChange::Add(Role::Member))
        .await
        .unwrap();
    assert_eq!(after.len(), 4);
    let third = saved(s, to_group(&a, &g, &unique("t"))).await;
    assert_eq!(
        sorted(third.member_seqs),
        sorted(vec![(b.clone(), 3), (c.clone(), 3), (d.clone(), 1)]),
        "a new member gets what is sent after it joined"
    );
    let after = s
        .change_member(&g, &b, &b, MemberChange::Remove)
        .await
        .unwrap();
    assert!(!after.iter().any(|m| m.user_id == b), "b left");
    assert!(matches!(
        s.change_member(&g, &a, &b, MemberChange::Remove).await,
        Err(StoreError::NotInGroup(..))
    ));
    assert!(matches!(
        s.change_member(&g, &a, &a, MemberChange::Remove).await,
        Err(StoreError::LastAdmin(..))
    ));
    s.change_member(&g, &a, &d, MemberChange::Add(Role::Admin))
        .await
        .unwrap();
    let after = s
        .change_member(&g, &a, &a, MemberChange::Remove)
        .await
        .unwrap();
    assert_eq!(
        roles(&after),
        vec![(c.clone(), Role::Member), (d.clone(), Role::Admin)]
    );
    assert!(matches!(
        s.save(to_group(&a, &g, &unique("t"))).await,
        Err(StoreError::NotInGroup(..))
    ));
    let fourth = saved(s, to_group(&d, &g, &unique("t"))).await;
    assert_eq!(sorted(fourth.member_seqs), vec![(c.clone(), 4)]);
}
