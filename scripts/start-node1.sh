#!/usr/bin/env bash
# Starts node 1 of the seed's two-node setup (profile node1: port 9430, Redis presence and
# store, Kafka routing), as the seed's start-node1.sh did. The services must run first:
#   scripts/services.sh up
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --locked -- serve --profile node1 "$@"
