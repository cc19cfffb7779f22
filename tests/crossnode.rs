//! `chatd crossnode-test` as CI runs it: two real node processes, real Redis, real Kafka
//! broker (scripts/services.sh), every scenario must pass; and it must fail loudly when a
//! node is not there.

mod common;

use common::chatd;

#[test]
fn every_scenario_passes_on_two_spawned_nodes() {
    let out = chatd()
        .args(["crossnode-test", "--spawn", "--json"])
        // The spawned nodes inherit it: their log tails (printed on a failure) then say what
        // the bus did with each frame.
        .env("RUST_LOG", "info,chatd::bus=debug,chatd::chat::route=debug")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = report["checks"].as_array().unwrap();
    let failed: Vec<_> = checks.iter().filter(|c| c["ok"] != true).collect();
    // On a failure the command prints the tails of both nodes' logs on stderr.
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert_eq!(report["passed"], true);
    assert_eq!(checks.len(), 11, "{checks:#?}");
    for name in [
        "scenario 1",
        "scenario 2",
        "scenario 3",
        "typing",
        "other device",
        "Redis",
        "offline",
        "away",
        "history",
        "group",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c["name"].as_str().unwrap().contains(name)),
            "no check {name}"
        );
    }
}

#[test]
fn fails_with_the_reason_when_a_node_is_missing() {
    let out = chatd()
        .args([
            "crossnode-test",
            "--node",
            "ws://127.0.0.1:1",
            "--node",
            "ws://127.0.0.1:2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL") && stdout.contains("127.0.0.1:1"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cross-node checks failed"));
}

/// `chatd bench --cluster`, the source of the README's cross-node figures, on the same
/// services: every message acknowledged arrives once, and node A's stages were read.
#[test]
fn the_cluster_bench_measures_the_cross_node_path() {
    let out = chatd()
        .args([
            "bench",
            "--cluster",
            "--pairs",
            "4",
            "--rate",
            "100",
            "--duration",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}\n{stderr}"));
    let acked = report["acked"].as_u64().unwrap();
    assert!(acked >= 150, "about 200 messages offered: {report:#}");
    assert_eq!(report["delivered"].as_u64(), Some(acked), "{report:#}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["repeated"], 0);
    let stages = &report["nodeAStages"];
    let batches = stages["batches"].as_f64().unwrap();
    assert!(batches >= 1.0 && batches <= acked as f64, "{stages}");
    for stage in ["batchWaitMs", "storeCallMs", "publishMs"] {
        assert!(stages[stage].as_f64().unwrap() > 0.0, "{stage}: {stages}");
    }
    let cpu = report["cpu"].as_array().unwrap();
    assert!(
        cpu.iter().all(|p| p["usPerMessage"].as_f64().is_some()),
        "every process measured: {cpu:#?}"
    );
}
