//! The test page in a real headless browser (Debian's Chromium driven by playwright-core):
//! two people chat through `/test.html`. `scripts/test.sh` installs both; without them this
//! test fails, it does not skip.

mod common;

use std::path::Path;

use common::*;

#[tokio::test]
async fn test_page_works_in_a_headless_browser() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and playwright-core: run scripts/test.sh, which installs them"
    );
    let node = start(config("web")).await;
    let base = format!("http://{}", node.addr);
    let out = tokio::process::Command::new("node")
        .arg(dir.join("test_page.mjs"))
        .arg(&base)
        .output()
        .await
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ok: connect, typing, send, ack, receive, read receipt"),
        "{stdout}"
    );
    assert_eq!(
        node.node.metrics.messages_received.get(),
        1,
        "the page's message went through the node"
    );
    node.stop().await;
}
