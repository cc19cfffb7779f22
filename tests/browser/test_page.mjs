// Drives /test.html of a running node in Debian's headless Chromium, as a person would:
// two tabs (alice and bob) connect, alice sends, bob sees it and marks it read, alice sees
// the ack and the receipt, and bob sees alice typing. Fails on any page error and on any
// request that leaves the node (the page must be self-contained).
//
// usage: node test_page.mjs http://127.0.0.1:PORT     (run by tests/browser.rs)
import { chromium } from "playwright-core";

const base = process.argv[2];
if (!base) {
  console.error("usage: node test_page.mjs http://HOST:PORT");
  process.exit(2);
}
const origin = new URL(base).origin;
const wsOrigin = origin.replace(/^http/, "ws");
const problems = [];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function tab(user) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => problems.push(`${user}: page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`${user}: console: ${m.text()}`); });
  page.on("request", (r) => {
    const url = r.url();
    if (!url.startsWith(origin) && !url.startsWith(wsOrigin)) problems.push(`${user}: external request ${url}`);
  });
  await page.goto(`${base}/test.html`);
  await page.fill("#user", user);
  await page.click("#connect");
  await page.waitForSelector("#log >> text=connection c", { timeout: 10000 });
  return page;
}

async function see(page, text, who) {
  try {
    await page.waitForSelector(`#log >> text=${text}`, { timeout: 10000 });
  } catch (e) {
    const log = await page.textContent("#log");
    throw new Error(`${who} never showed "${text}"; log:\n${log}`);
  }
}

try {
  const alice = await tab("alice");
  const bob = await tab("bob");

  await alice.fill("#to", "bob");
  await alice.type("#content", "hello from the browser");
  await bob.waitForSelector("#typing >> text=alice is typing", { timeout: 10000 });
  await alice.press("#content", "Enter");

  await see(alice, "route=local", "alice (ack)");
  await see(bob, "alice: hello from the browser", "bob (message)");
  await bob.click("#log button:has-text('mark read')");
  await see(alice, "bob read", "alice (read receipt)");
  await alice.waitForSelector("#status >> text=connected");
  console.log("ok: connect, typing, send, ack, receive, read receipt");
} catch (e) {
  problems.push(e.message);
} finally {
  await browser.close();
}

if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
