// Drives the chat page (/) and the dashboard (/dashboard) of two running nodes in Debian's
// headless Chromium, as people would (run by tests/browser.rs, which owns the nodes):
//
//   - alice on node 1, bob on node 2, and alice's second device on node 2, each a browser
//     context of its own: bob's presence, alice typing, a message whose ticks go to "read",
//     the copy on alice's other device;
//   - alice leaves the page, bob sends two messages, alice comes back: both shown once, in
//     order, after what she had;
//   - node 1 stops (alice sees the reconnecting banner), bob sends two more, node 1 starts
//     again on its port: alice's page reconnects by itself and shows them once, in order;
//     a reload then shows the same, nothing twice; the start of the conversation, forgotten
//     by the page, comes back with "Older messages" (the node's history);
//   - the dashboard on node 2 shows both nodes up, and its message counter rises when bob
//     sends;
//   - on node 3, in auth mode token: the page signs carol in with her token, and the
//     dashboard shows nothing until it is given an operator's token.
//
// Fails on any page error and on any request that leaves the nodes (the pages must be
// self-contained). Asks the test to stop and start node 1 by printing `ACTION stop-n1` /
// `ACTION start-n1` and waiting for a line on stdin. Writes a screenshot of each page.
//
// usage: node pages.mjs NODE1_URL NODE2_URL NODE1_ID NODE2_ID ALICE BOB SCREENSHOT_DIR
//                       NODE3_URL NODE3_ID CAROL_TOKEN OPERATOR_TOKEN
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [n1, n2, id1, id2, alice, bob, shots, n3, id3, carolToken, opsToken] = process.argv.slice(2);
if (!opsToken) {
  console.error("usage: node pages.mjs NODE1_URL NODE2_URL NODE1_ID NODE2_ID ALICE BOB SCREENSHOT_DIR NODE3_URL NODE3_ID CAROL_TOKEN OPERATOR_TOKEN");
  process.exit(2);
}
const origins = [n1, n2, n3].map((u) => new URL(u).origin);
const problems = [];
const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const WAIT = 20000;

async function action(what) {
  console.log(`ACTION ${what}`);
  const { value } = await stdin.next();
  if (value !== "done") throw new Error(`the test answered ${value} to ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function page(who, url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const p = await context.newPage();
  p.on("pageerror", (e) => problems.push(`${who}: page error: ${e.message}`));
  p.on("console", (m) => {
    // Chromium logs every refused WebSocket (the restart below makes some on purpose) and
    // every refused request (the dashboard's before it has a token).
    const expected = /^WebSocket connection to .* failed/.test(m.text()) ||
      (who === "token-mode dashboard" && /status of 401/.test(m.text()));
    if (m.type() === "error" && !expected)
      problems.push(`${who}: console: ${m.text()}`);
  });
  p.on("request", (r) => {
    const u = r.url();
    if (!origins.some((o) => u.startsWith(o) || u.startsWith(o.replace(/^http/, "ws"))) && !u.startsWith("about:"))
      problems.push(`${who}: external request ${u}`);
  });
  await p.goto(url);
  return p;
}

async function signIn(p, user) {
  await p.fill("#user", user);
  await p.click("#signin-go");
  await connected(p, user);
}

async function connected(p, who) {
  try {
    await p.waitForFunction(() => typeof ws !== "undefined" && ws && ws.readyState === 1, null, { timeout: WAIT });
  } catch (e) {
    throw new Error(`${who} never connected; banner: ${await p.textContent("#banner")}`);
  }
}

async function openChat(p, peer) {
  await p.fill("#new-peer", peer);
  await p.click("#new-chat");
  await p.waitForSelector(`#chats li[data-peer="${peer}"]`, { timeout: WAIT });
}

async function send(p, text) {
  await p.fill("#text", text);
  await p.press("#text", "Enter");
}

const bubbles = (p) => p.$$eval("#messages .msg", (ms) => ms.map((m) => m.firstChild.textContent));

async function bubblesBecome(p, who, expected) {
  const want = JSON.stringify(expected);
  const deadline = Date.now() + 30000;
  let got = [];
  while (Date.now() < deadline) {
    got = await bubbles(p);
    if (JSON.stringify(got) === want) return;
    await p.waitForTimeout(200);
  }
  throw new Error(`${who} shows ${JSON.stringify(got)}, expected ${want}; banner: ${await p.textContent("#banner")}`);
}

async function see(p, selector, who, what) {
  try {
    await p.waitForSelector(selector, { timeout: WAIT });
  } catch (e) {
    throw new Error(`${who} never showed ${what} (${selector})`);
  }
}

try {
  const a = await page("alice", `${n1}/`);
  const b = await page("bob", `${n2}/`);
  const a2 = await page("alice's second device", `${n2}/`);
  await signIn(a, alice);
  await signIn(b, bob);
  await signIn(a2, alice);

  // Presence, typing, a message going to "read", the copy on the other device.
  await openChat(b, alice);
  await openChat(a, bob);
  await see(a, "#presence.online", "alice", `${bob} online`);
  await a.type("#text", "hello b", { delay: 30 });
  await see(b, `#typing:has-text("${alice} is typing")`, "bob", "alice typing");
  await a.type("#text", "ob", { delay: 30 });
  await a.press("#text", "Enter");
  await see(b, `#messages .msg:has-text("hello bob")`, "bob", "alice's message");
  await see(a, `#messages .msg.mine[data-status="read"]:has-text("hello bob")`, "alice", "the read ticks");
  await see(a2, `#chats li[data-peer="${bob}"]`, "alice's second device", "the conversation");
  await a2.click(`#chats li[data-peer="${bob}"]`);
  await see(a2, `#messages .msg.mine:has-text("hello bob")`, "alice's second device", "the copy");
  const ticks = await a.textContent(`#messages .msg.mine .tick`);
  if (ticks !== "✓✓") problems.push(`alice's read message shows ticks ${ticks}`);

  // Away from the page while bob sends: shown once, in order, when she comes back.
  await a.goto("about:blank");
  await send(b, "one");
  await send(b, "two");
  await see(b, `#messages .msg:has-text("two")`, "bob", "his own message");
  await a.goto(`${n1}/`);
  await connected(a, "alice after coming back");
  await bubblesBecome(a, "alice after coming back", ["hello bob", "one", "two"]);

  // Her node restarts: the page reconnects by itself and shows what came meanwhile.
  await action("stop-n1");
  await see(a, "#banner.show:has-text('Reconnecting')", "alice", "the reconnecting banner");
  await send(b, "three");
  await send(b, "four");
  await see(b, `#messages .msg:has-text("four")`, "bob", "his own message");
  await action("start-n1");
  await bubblesBecome(a, "alice after her node restarted", ["hello bob", "one", "two", "three", "four"]);
  await see(b, `#messages .msg.mine[data-status="read"]:has-text("four")`, "bob", "the read ticks of four");
  // A plain reload: the same conversation, nothing twice.
  await a.reload();
  await connected(a, "alice after a reload");
  await a.waitForTimeout(500);
  await bubblesBecome(a, "alice after a reload", ["hello bob", "one", "two", "three", "four"]);
  // A device that lost the start of a conversation pages it back from the node's history.
  await a.evaluate((peer) => { convos[peer].messages.splice(0, 2); delete convos[peer].more; render(); }, bob);
  await bubblesBecome(a, "alice after forgetting two", ["two", "three", "four"]);
  await a.click("#older");
  await bubblesBecome(a, "alice after Older messages", ["hello bob", "one", "two", "three", "four"]);
  await see(a, `#messages .msg.mine[data-status="read"]:has-text("hello bob")`, "alice", "the read ticks of a message from history");

  // The dashboard: both nodes up, and a counter that rises when messages flow.
  const d = await page("dashboard", `${n2}/dashboard`);
  for (const id of [id1, id2]) await see(d, `#nodes tr[data-node="${id}"]:has-text("up")`, "the dashboard", `node ${id} up`);
  const before = Number(await d.textContent("#total-in"));
  await send(b, "five");
  const deadline = Date.now() + WAIT;
  let after = before;
  while (after <= before && Date.now() < deadline) {
    await d.waitForTimeout(500);
    after = Number(await d.textContent("#total-in"));
  }
  if (!(after > before)) problems.push(`the dashboard's messages-in counter stayed at ${before}`);
  await d.waitForTimeout(2500); // one more report, so the charts have a rate to show

  // Token mode: a token to sign in; the dashboard's data only for an operator's token.
  const t = await page("token-mode page", `${n3}/`);
  await see(t, "#token-row:not([hidden])", "the token-mode page", "the token field");
  await t.fill("#user", "carol");
  await t.fill("#token", carolToken);
  await t.click("#signin-go");
  await connected(t, "carol (token mode)");
  const td = await page("token-mode dashboard", `${n3}/dashboard`);
  await see(td, "#problem.show:has-text('auth.operators')", "the token-mode dashboard", "why it shows nothing");
  if (await td.$(`#nodes tr[data-node="${id3}"]`)) problems.push("the token-mode dashboard showed data without a token");
  await td.fill("#token", opsToken);
  await td.click("#auth button");
  await see(td, `#nodes tr[data-node="${id3}"]:has-text("up")`, "the token-mode dashboard", "its node with the operator's token");

  await a.screenshot({ path: `${shots}/chat.png` });
  await d.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
  console.log(`screenshots: ${shots}/chat.png ${shots}/dashboard.png`);
  console.log("ok: presence, typing, read ticks, second device, come back, node restart, reload, history, dashboard, token mode");
} catch (e) {
  problems.push(e.message);
} finally {
  await browser.close();
}

if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
process.exit(0);
