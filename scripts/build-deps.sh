#!/usr/bin/env bash
# Installs the one system library the build needs when it is missing: OpenSSL's headers
# (Debian's libssl-dev, found through pkg-config), which librdkafka links for TLS to a managed
# Kafka. Everything else builds from crates.io. Needs root or sudo the first time.
set -euo pipefail
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: the build needs OpenSSL's development files and pkg-config" \
    "(Debian/Ubuntu: libssl-dev pkg-config; Fedora: openssl-devel pkgconf)" >&2
  exit 1
fi
echo "installing libssl-dev and pkg-config (Debian packages) for librdkafka's TLS..."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libssl-dev pkg-config >/dev/null
