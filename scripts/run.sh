#!/usr/bin/env bash
# Builds and runs one chat node: `scripts/run.sh` is the embedded single node on port 9430;
# any arguments go to `chatd serve` (e.g. `scripts/run.sh --profile node2`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
exec cargo run --release --locked -- serve "$@"
