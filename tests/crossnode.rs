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
