#!/usr/bin/env bash
# Runs every test of chatd: unit tests beside the code, black-box tests that start real nodes
# and speak real WebSocket to them, and the CLI tests that run the real binary (SIGTERM
# included). Needs only the Rust toolchain; one release build serves the binary and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
cargo build --release --locked
cargo test --release --locked "$@"
