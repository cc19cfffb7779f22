#!/usr/bin/env bash
# Starts node 2 of the seed's two-node setup (profile node2: port 9431, Redis presence and
# store, Kafka routing), as the seed's start-node2.sh did. The services must run first:
#   scripts/services.sh up
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --locked -- serve --profile node2 "$@"
