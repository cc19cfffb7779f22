#!/usr/bin/env bash
# Runs every test of chatd: unit tests beside the code, black-box tests that start real nodes
# and speak real WebSocket to them, and the CLI tests that run the real binary (SIGTERM
# included), the cluster tests against a real Redis, Kafka broker and MessageService
# (scripts/services.sh), the crash tests that SIGKILL nodes and the MessageService,
# the test page in a headless browser, clippy (warnings are errors) and the unit tests once
# more in a debug build (overflow checks on). Installs what is missing: Chromium and
# redis-server (apt-get), OpenSSL's headers for the build (scripts/build-deps.sh),
# playwright-core (npm), Tansu (built with cargo and our patch, ~16 min once). The suites that keep state in
# Redis run a second time on a Redis Cluster (three masters on 7001-7003).
# One release build serves the binary and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi

# The browser test of the chat page and the dashboard needs Debian's Chromium and the npm package playwright-core.
if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium (Debian package) for the browser test..."
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm not found; install Node.js (the browser test drives Chromium from Node)" >&2
    exit 1
  fi
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

scripts/build-deps.sh

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
cargo build --release --locked
# Lint is a habit, not a chore: any clippy warning fails the run.
cargo clippy --release --locked --all-targets -- -D warnings
# The unit tests once in a debug build too: overflow checks on.
cargo test --locked --lib

# Cluster tests need a real Redis, a real Kafka-compatible broker (Tansu) and the
# MessageService the node profiles store through. Start them unless they already run, and
# stop what this script started when it ends, tests failing or not.
# The Redis-backed suites run twice: on the single Redis, then on a Redis Cluster of three
# masters (scripts/services.sh cluster up), with the same binary and the same broker.
stop_started=()
cleanup() {
  local what
  for what in "${stop_started[@]}"; do eval "$what"; done
}
trap cleanup EXIT
if scripts/services.sh status >/dev/null 2>&1; then
  echo "using the services already running (scripts/services.sh status)"
else
  stop_started+=("scripts/services.sh down")
  scripts/services.sh up
fi
if scripts/services.sh cluster status >/dev/null 2>&1; then
  echo "using the Redis Cluster already running (scripts/services.sh cluster status)"
else
  stop_started+=("scripts/services.sh cluster down")
  scripts/services.sh cluster up
fi

cargo test --release --locked "$@"

# The seed's cross-node scenarios, as an operator runs them: two node processes, real Redis,
# real broker; the table shows every check and its latency.
# The spawned nodes log what the bus does with each frame: on a failure the command prints
# the tails of both nodes' logs.
RUST_LOG=info,chatd::bus=debug,chatd::chat::route=debug target/release/chatd crossnode-test --spawn

# Again on the Redis Cluster: the suites that keep state in Redis (store, presence, the crash
# tests, the MessageService, the operator commands), then the cross-node scenarios with
# presence and store on the cluster.
echo "== the Redis-backed suites on the Redis Cluster (scripts/services.sh cluster) =="
CHATD_TEST_REDIS=cluster cargo test --release --locked \
  --test store_redis --test presence_redis --test durability --test message_service --test operator
seeds="redis://:redis123@127.0.0.1:7001,redis://:redis123@127.0.0.1:7002,redis://:redis123@127.0.0.1:7003"
CHATD_REDIS__CLUSTER=true CHATD_REDIS__URL="$seeds" CHATD_STORE__URL="$seeds" \
  RUST_LOG=info,chatd::bus=debug,chatd::chat::route=debug target/release/chatd crossnode-test --spawn
