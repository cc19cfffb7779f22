//! The chat page and the operator dashboard in a real headless browser (Debian's Chromium
//! driven by playwright-core, `tests/browser/pages.mjs`) against two real node processes on
//! the services of `scripts/services.sh` (Redis presence and store, Kafka). `scripts/test.sh`
//! installs Chromium and playwright-core and starts the services; without them this test
//! fails, it does not skip. Screenshots of both pages go to `target/browser/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const STORE: &str = "redis://:redis123@127.0.0.1:6379/0";
const SECRET: &str = "browser-test-secret-0123456789abcdef";

/// `chatd serve --profile node1` (Redis presence, Kafka) on `port`, storing in Redis.
fn node(node_id: &str, port: u16) -> Proc {
    let mut c = chatd();
    c.args(["serve", "--profile", "node1", "--node-id", node_id])
        .args(["--port", &port.to_string()])
        .env("CHATD_STORE__URL", STORE);
    Proc::spawn(c, node_id)
}

#[test]
fn the_chat_page_and_the_dashboard_work_in_a_headless_browser() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "the browser test needs Chromium and playwright-core: run scripts/test.sh, which installs them"
    );
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&shots).unwrap();
    let (id1, id2) = (unique("web1"), unique("web2"));
    let (alice, bob) = (unique("alice"), unique("bob"));
    let port1 = free_port();
    let mut n1 = Some(node(&id1, port1));
    let n2 = node(&id2, free_port());
    // A node in token mode, in-memory, with one operator.
    let id3 = unique("web3");
    let n3 = Proc::serve(
        &id3,
        &[],
        &[
            ("CHATD_AUTH__MODE", "token"),
            ("CHATD_AUTH__SECRET", SECRET),
            ("CHATD_AUTH__OPERATORS", r#"["ops"]"#),
        ],
    );
    let now = chatd::chat::ids::now_ms() / 1000;
    let carol = chatd::auth::mint(SECRET, "carol", 600, now);
    let ops = chatd::auth::mint(SECRET, "ops", 600, now);

    let mut script = Command::new("node")
        .arg(dir.join("pages.mjs"))
        .arg(format!("http://127.0.0.1:{port1}"))
        .arg(format!("http://{}", n2.addr))
        .args([&id1, &id2, &alice, &bob])
        .arg(&shots)
        .arg(format!("http://{}", n3.addr))
        .args([&id3, &carol, &ops])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stdin = script.stdin.take().unwrap();
    let mut said = Vec::new();
    // The script asks for node 1 to stop and to start again on the same port.
    for line in BufReader::new(script.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        match line.as_str() {
            "ACTION stop-n1" => {
                let mut old = n1.take().expect("node 1 runs");
                old.terminate();
                old.wait_exit(std::time::Duration::from_secs(20));
            }
            "ACTION start-n1" => n1 = Some(node(&id1, port1)),
            _ => {}
        }
        if line.starts_with("ACTION ") {
            writeln!(stdin, "done").unwrap();
        }
        said.push(line);
    }
    let out = script.wait_with_output().unwrap();
    let said = said.join("\n");
    let logs = [n1.as_ref(), Some(&n2), Some(&n3)]
        .into_iter()
        .flatten()
        .map(|p| format!("{}:\n{}", p.log.display(), p.log_text()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "browser test failed:\n{said}\n{}\nnode logs:\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("ok: presence, typing, read ticks")
            && said.contains("history")
            && said.contains("token mode"),
        "{said}"
    );
    for page in ["chat.png", "dashboard.png"] {
        let shot = shots.join(page);
        assert!(
            std::fs::metadata(&shot)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "no screenshot at {}",
            shot.display()
        );
        eprintln!("screenshot: {}", shot.display());
    }
}
