//! Presence in a real Redis: many devices on many nodes, atomic updates under races, node
//! leases that lapse when a real node process is killed, and a Redis that stalls or restarts
//! under a running node. Needs the Redis of `scripts/services.sh up` (the README's test
//! command starts it); without it these tests fail, they do not skip.

mod common;

use std::process::Command;
use std::sync::Arc;

use chatd::bus::LocalBus;
use chatd::chat::Backends;
use chatd::config::{Config, PresenceBackend};
use chatd::presence::{Device, Presence, RedisPresence};
use chatd::store::MemoryStore;
use common::*;
use serde_json::json;

fn redis_config(node_id: &str) -> Config {
    let mut c = config(node_id);
    c.presence.backend = PresenceBackend::Redis;
    c.presence.node_lease_secs = 3;
    c.redis = test_redis();
    c
}

fn redis_presence(c: &Config) -> Arc<RedisPresence> {
    Arc::new(RedisPresence::new(
        chatd::redis_client::RedisClient::new(&c.redis).unwrap(),
        c.presence.ttl_secs,
        c.presence.node_lease_secs,
    ))
}

async fn require_redis(p: &RedisPresence) {
    if let Err(e) = p.health().await {
        panic!(
            "these tests need the test Redis, {} (run scripts/services.sh up, or `cluster up` \
             for CHATD_TEST_REDIS=cluster): {e}",
            test_redis_url()
        );
    }
}

/// Nodes with their own Redis presence client each (as separate processes would have) and a
/// shared in-process bus.
async fn cluster(n: usize) -> Vec<TestNode> {
    let bus = Arc::new(LocalBus::new());
    let mut nodes = Vec::new();
    for _ in 0..n {
        let c = redis_config(&unique("node"));
        let presence = redis_presence(&c);
        require_redis(&presence).await;
        let backends = Backends {
            presence,
            bus: bus.clone(),
            store: Arc::new(MemoryStore::new(1000, 1000)),
        };
        nodes.push(start_with(c, backends).await);
    }
    nodes
}

#[tokio::test]
async fn devices_on_two_nodes_are_seen_by_both_and_in_the_seed_key() {
    let nodes = cluster(2).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut a1 = nodes[0].client(&alice).await;
    let _a2 = nodes[1].client(&alice).await;
    let mut b = nodes[1].client(&bob).await;

    for n in &nodes {
        let (_, s) = n.get(&format!("/api/chat/online/status/{alice}")).await;
        let mut want = vec![nodes[0].node.node_id.clone(), nodes[1].node.node_id.clone()];
        want.sort();
        assert_eq!(
            (&s["online"], &s["devices"], &s["nodes"]),
            (&json!(true), &json!(2), &json!(want))
        );
    }
    let members: Vec<String> = redis_cli(&["SMEMBERS", "chat:online:users"]);
    assert!(
        members.contains(&alice) && members.contains(&bob),
        "{members:?}"
    );

    // Routing reads the same presence: alice on node 0 reaches bob on node 1.
    a1.send_json(&chat(&bob, "via redis presence", "t1"))
        .await
        .unwrap();
    assert_eq!(expect(&mut a1, "MESSAGE_ACK").await["route"], "remote");
    assert_eq!(
        expect(&mut b, "CHAT_MESSAGE").await["content"],
        "via redis presence"
    );

    drop(b);
    eventually("bob offline after disconnect", || async {
        nodes[0]
            .get(&format!("/api/chat/online/status/{bob}"))
            .await
            .1["online"]
            == false
            && !redis_cli(&["SMEMBERS", "chat:online:users"]).contains(&bob)
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test]
async fn concurrent_connects_and_disconnects_of_one_user_leave_a_true_state() {
    let c = redis_config("race");
    let p1 = redis_presence(&c);
    let p2 = redis_presence(&c);
    require_redis(&p1).await;
    let user = unique("racer");
    let mut tasks = Vec::new();
    for (i, p) in [p1.clone(), p2.clone()].into_iter().enumerate() {
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..200 {
                let conn = format!("c{i}-{round}");
                let node = format!("race-n{i}");
                let d = Device {
                    connection_id: conn.clone(),
                    node_id: node,
                    last_seen_ms: chatd::chat::ids::now_ms(),
                };
                p.connect(&user, d).await.unwrap();
                p.disconnect(&user, &conn).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every device came and went: nothing may be left, and the user is not "online".
    assert_eq!(
        redis_cli(&["HLEN", &format!("chat:{{{user}}}:devices")]),
        ["0"]
    );
    assert!(!redis_cli(&["SMEMBERS", "chat:online:users"]).contains(&user));

    // One device stays on each side while the other side churns: online, exactly those two.
    for (i, p) in [&p1, &p2].into_iter().enumerate() {
        p.maintain(&format!("race-n{i}"), "http://127.0.0.1:1")
            .await
            .unwrap();
        let d = Device {
            connection_id: format!("keep{i}"),
            node_id: format!("race-n{i}"),
            last_seen_ms: chatd::chat::ids::now_ms(),
        };
        p.connect(&user, d).await.unwrap();
    }
    let churn = {
        let (p, user) = (p2.clone(), user.clone());
        tokio::spawn(async move {
            for round in 0..100 {
                let d = Device {
                    connection_id: format!("x{round}"),
                    node_id: "race-n1".into(),
                    last_seen_ms: chatd::chat::ids::now_ms(),
                };
                p.connect(&user, d).await.unwrap();
                p.disconnect(&user, &format!("x{round}")).await.unwrap();
            }
        })
    };
    p1.disconnect(&user, "keep0").await.unwrap();
    churn.await.unwrap();
    let left = p1.devices(&user).await.unwrap();
    assert_eq!(
        left.iter()
            .map(|d| d.connection_id.as_str())
            .collect::<Vec<_>>(),
        ["keep1"]
    );
    assert!(redis_cli(&["SMEMBERS", "chat:online:users"]).contains(&user));
    p2.disconnect(&user, "keep1").await.unwrap();
    assert!(!redis_cli(&["SMEMBERS", "chat:online:users"]).contains(&user));
}

#[tokio::test]
async fn a_node_killed_with_sigkill_has_its_users_read_offline() {
    let observer = cluster(1).await.remove(0);
    let victim_id = unique("victim");
    let user = unique("doomed");
    let env = test_redis_env(false);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("CHATD_PRESENCE__NODE_LEASE_SECS", "3"));
    let mut victim = Proc::serve(&victim_id, &["--profile", "node1"], &env);
    let _client = chatd::client::Client::connect(&victim.ws(), &user, WAIT)
        .await
        .unwrap();
    let status = format!("/api/chat/online/status/{user}");
    eventually("user online on the victim", || async {
        observer.get(&status).await.1["nodes"] == json!([victim_id])
    })
    .await;

    victim.kill(); // SIGKILL: no shutdown, no cleanup
    eventually("user offline once the lease lapses", || async {
        observer.get(&status).await.1["online"] == false
    })
    .await;
    eventually(
        "the janitor removed the user from chat:online:users",
        || async { !redis_cli(&["SMEMBERS", "chat:online:users"]).contains(&user) },
    )
    .await;
    observer.stop().await;
}

#[tokio::test]
async fn a_stalled_then_restarted_redis_degrades_the_node_and_it_recovers_by_itself() {
    // A Redis of this test's own, so stopping it does not disturb the other tests.
    let port = free_port();
    let start_redis = || redis_server(port, None);
    let redis = start_redis();
    let mut c = redis_config("lonely");
    c.redis.url = format!("redis://127.0.0.1:{port}/0");
    c.redis.cluster = false;
    c.redis.password = String::new();
    c.redis.timeout_ms = 200;
    let probe = redis_presence(&c);
    eventually("private redis up", || async {
        probe.health().await.is_ok()
    })
    .await;
    let node = start(c).await;
    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    assert_eq!(node.get("/api/chat/health").await.1["status"], "UP");

    // Stalled: the process stops answering (SIGSTOP). Calls time out; nothing hangs.
    let pid = redis.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let (_, health) = node.get("/api/chat/health").await;
    assert_eq!(
        (&health["status"], &health["checks"]["presence"]["status"]),
        (&json!("DEGRADED"), &json!("DOWN"))
    );
    alice
        .send_json(&chat("bob", "still delivered", "t1"))
        .await
        .unwrap();
    assert_eq!(expect(&mut alice, "MESSAGE_ACK").await["route"], "local");
    assert_eq!(
        expect(&mut bob, "CHAT_MESSAGE").await["content"],
        "still delivered"
    );
    let _carol = node.client("carol").await; // new sessions still open

    // Dead, then back empty (a restart without persistence): the node registers its
    // sessions again by itself.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    drop(redis);
    let _redis = start_redis();
    eventually("health UP again", || async {
        node.get("/api/chat/health").await.1["status"] == "UP"
    })
    .await;
    eventually("sessions registered again", || async {
        let (_, a) = node.get("/api/chat/online/status/alice").await;
        let (_, c) = node.get("/api/chat/online/status/carol").await;
        a["online"] == true && c["online"] == true
    })
    .await;
    node.stop().await;
}
