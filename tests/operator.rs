//! The operator's commands against a real cluster in this process (Redis presence, Kafka bus,
//! Redis store from the node1 profile's services): `chatd presence`, `chatd stats` (and the
//! dashboard's `/api/cluster`), and the `/metrics` endpoint Prometheus scrapes.

mod common;

use chatd::config::PresenceBackend;
use common::*;
use serde_json::{json, Value};

/// `--redis` (and `--redis-cluster`) for the operator commands: the test Redis.
fn redis_args() -> Vec<String> {
    let mut args = vec!["--redis".to_string(), test_redis_url()];
    if on_redis_cluster() {
        args.push("--redis-cluster".into());
    }
    args
}

/// A node with the cluster backends of the node1 profile: Redis presence and store, Kafka.
async fn cluster_node(node_id: &str) -> TestNode {
    let mut c = config(node_id);
    c.presence.backend = PresenceBackend::Redis;
    c.presence.node_lease_secs = 3;
    c.redis = test_redis();
    c.kafka.brokers = "127.0.0.1:9092".into();
    c.store.url = test_redis_url();
    start(c).await
}

async fn chatd_json(args: Vec<String>) -> Value {
    let out = tokio::task::spawn_blocking(move || chatd().args(&args).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_shows_each_node_and_its_devices() {
    let (id1, id2) = (unique("opa"), unique("opb"));
    let n1 = cluster_node(&id1).await;
    let n2 = cluster_node(&id2).await;
    let user = unique("dora");
    let _d1 = n1.client(&user).await;
    let _d2 = n1.client(&user).await;
    let _d3 = n2.client(&user).await;
    let nobody = unique("nobody");

    let mut args = vec!["presence".to_string()];
    args.extend(redis_args());
    args.extend(["--json".into(), user.clone(), nobody.clone()]);
    let report = chatd_json(args).await;
    let mut nodes: Vec<(String, u64)> = report[0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["nodeId"].as_str().unwrap().to_string(),
                n["devices"].as_u64().unwrap(),
            )
        })
        .collect();
    nodes.sort();
    let mut want = vec![(id1.clone(), 2), (id2.clone(), 1)];
    want.sort();
    assert_eq!(
        (&report[0]["userId"], &report[0]["online"]),
        (&json!(user), &json!(true))
    );
    assert_eq!(nodes, want);
    assert!(
        report[0]["nodes"][0]["lastHeartbeatAgeMs"]
            .as_i64()
            .unwrap()
            < 60_000
    );
    assert_eq!(
        (&report[1]["online"], &report[1]["nodes"]),
        (&json!(false), &json!([]))
    );

    // The table names the same things.
    let out = chatd()
        .arg("presence")
        .args(redis_args())
        .arg(&user)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&id1) && table.contains(&id2) && table.contains("s ago"),
        "{table}"
    );
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_lists_nodes_from_leases_with_counters_and_lag_and_shows_dead_ones_as_down() {
    let (id1, id2) = (unique("sta"), unique("stb"));
    let n1 = cluster_node(&id1).await;
    let n2 = cluster_node(&id2).await;
    let (alice, bob) = (unique("sal"), unique("sbo"));
    let mut a = n1.client(&alice).await;
    let mut b = n2.client(&bob).await;
    a.send_json(&chat(&bob, "counted", "t1")).await.unwrap();
    assert_eq!(expect(&mut a, "MESSAGE_ACK").await["route"], "remote");
    expect(&mut b, "CHAT_MESSAGE").await;

    // Discovered from Redis leases; lag read from the broker.
    let deadline = std::time::Instant::now() + WAIT;
    let report = loop {
        let mut args = vec![
            "stats".to_string(),
            "--profile".into(),
            "node1".into(),
            "--json".into(),
        ];
        args.extend(redis_args());
        let report = chatd_json(args).await;
        let row = |id: &str| {
            report["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["nodeId"] == id)
                .cloned()
        };
        let ready = matches!((row(&id1), row(&id2)), (Some(r1), Some(r2))
            if r1["up"] == true && r2["up"] == true
            && r1["messages"]["messagesRoutedRemote"] == 1
            && r2["messages"]["envelopesConsumed"] == 1
            && r2["topicLag"] == 0);
        if ready {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stats never showed both nodes with lag 0: {report:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(report["cluster"]["onlineUsers"].as_u64().unwrap() >= 2);
    assert_eq!(report["cluster"]["redis"], "UP");

    // A node given by URL that does not answer is a DOWN row, not a failed command.
    let mut args = vec!["stats".to_string()];
    args.extend(redis_args());
    let r = chatd_json(
        args.into_iter()
            .chain([
                "--json".into(),
                "--node".into(),
                format!("http://{}", n1.addr),
                "--node".into(),
                "http://127.0.0.1:1".into(),
            ])
            .collect(),
    )
    .await;
    assert_eq!(
        (&r["nodes"][0]["up"], &r["nodes"][1]["up"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(r["nodes"][0]["nodeId"], id1.as_str());

    // The dashboard's data: the same report from any node, with each node's health.
    let (status, cluster) = n2.get("/api/cluster").await;
    assert_eq!(status, 200, "{cluster:#}");
    for id in [&id1, &id2] {
        let row = cluster["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["nodeId"] == id.as_str())
            .unwrap_or_else(|| panic!("/api/cluster lacks {id}: {cluster:#}"));
        assert_eq!(row["up"], true);
        assert_eq!(row["health"]["status"], "UP", "{row:#}");
        assert!(row["messages"]["messagesReceived"].is_u64());
    }
    assert!(
        !cluster.to_string().contains("counted"),
        "the report shows no content"
    );
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_counters_that_matter() {
    let node = start(config("m1")).await;
    let mut a = node.client("alice").await;
    let _b = node.client("bob").await;
    a.send_json(&chat("bob", "hi", "t1")).await.unwrap();
    expect(&mut a, "MESSAGE_ACK").await;
    a.send_json(&chat("nobody", "hi", "t2")).await.unwrap();
    expect(&mut a, "MESSAGE_ACK").await;
    a.send_text("garbage").await.unwrap();
    expect(&mut a, "ERROR").await;

    let (status, body) = http_get(node.addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        assert!(name.starts_with("chatd_"), "{line}");
    }
    for want in [
        "chatd_websocket_sessions 2",
        "chatd_messages_received_total 2",
        "chatd_messages_acked_total{route=\"local\"} 1",
        "chatd_messages_acked_total{route=\"offline\"} 1",
        "chatd_frames_rejected_total 1",
        "chatd_broker_publish_failures_total 0",
        "chatd_frames_dropped_total{kind=\"typing\"} 0",
        "# TYPE chatd_broker_publish_duration_seconds histogram",
        "chatd_redis_call_duration_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(body.contains(want), "no {want:?} in\n{body}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_push_events_go_to_their_own_topic() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    let node = cluster_node(&unique("off")).await;
    let (alice, ghost) = (unique("oal"), unique("ghost"));
    let mut a = node.client(&alice).await;
    a.send_json(&chat(&ghost, "wake up", "t1")).await.unwrap();
    let ack = expect(&mut a, "MESSAGE_ACK").await;
    assert_eq!(ack["route"], "offline");

    // A Kafka client of the test's own reads the offline-push topic from its beginning.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .set("group.id", unique("test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("chat.offline-push", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let m = consumer.recv().await.expect("consume chat.offline-push");
            let event: Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
            if event["userId"] == ghost.as_str() {
                return event;
            }
        }
    })
    .await
    .expect("the offline-push event is on chat.offline-push");
    assert_eq!(
        (&found["senderId"], &found["messageId"]),
        (&json!(alice), &ack["messageId"])
    );
    assert_eq!(found["count"], 1);
    node.stop().await;
}
