#!/usr/bin/env bash
# The services cluster mode needs, on loopback only:
#   Redis  (Debian's redis-server) on 127.0.0.1:$REDIS_PORT with password $REDIS_PASSWORD,
#          persisted to .services/ with an fsync per write (appendonly, appendfsync always),
#          so an acknowledged message survives Redis being killed;
#   Kafka  (Tansu, an Apache Kafka API compatible broker, pinned to $TANSU_VERSION, with one
#          patch of ours: scripts/tansu-long-poll.patch) on 127.0.0.1:$KAFKA_PORT with
#          in-memory storage;
#   the MessageService (`chatd message-service --backend redis`) on 127.0.0.1:$STORE_PORT,
#          which the node1/node2 profiles store through (built with cargo if missing).
#
#   scripts/services.sh up       install what is missing, start both, wait until both answer
#   scripts/services.sh down     stop what `up` started (by its pid files, never by name)
#   scripts/services.sh status   say what runs
#
# And a Redis Cluster for `redis.cluster = true` (README, "Redis Cluster"): three masters on
# 127.0.0.1:$REDIS_CLUSTER_PORTS (7001-7003), same password and persistence as above, all
# 16,384 slots assigned by `redis-cli --cluster create`:
#   scripts/services.sh cluster up|down|status
#   seeds for chatd: redis.cluster = true, redis.url = "redis://127.0.0.1:7001,redis://127.0.0.1:7002"
#
# Installing Tansu compiles it (about 16 minutes on 2 cores) into $TANSU_HOME, once per version
# of the patch: it is kept outside the repository, so every clone on the machine shares it.
# State (pid files, logs) lives in .services/ of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=${REDIS_PORT:-6379}
REDIS_PASSWORD=${REDIS_PASSWORD:-redis123}
KAFKA_PORT=${KAFKA_PORT:-9092}
STORE_PORT=${STORE_PORT:-20882}
CHATD=target/release/chatd
TANSU_VERSION=0.6.0
STATE=.services
REDIS_CLUSTER_PORTS=${REDIS_CLUSTER_PORTS:-7001 7002 7003}
TANSU_PATCH=scripts/tansu-long-poll.patch
TANSU_HOME=${TANSU_HOME:-$HOME/.cache/chatd/tansu}
TANSU=$TANSU_HOME/bin/tansu

mkdir -p "$STATE"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

pid_alive() { # pidfile; a killed process its parent has not reaped yet (a zombie) is not alive
  [ -f "$1" ] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$pid/stat" 2>/dev/null)
  [ "$state" != Z ]
}

port_open() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install_redis() {
  command -v redis-server >/dev/null 2>&1 && return
  echo "installing redis-server (Debian package)..."
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
}

# Tansu 0.6.0 answers a fetch only once its whole max wait is over, even when records came in
# at once: a frame between nodes waited about 1.5 x kafka.fetch_wait_ms, and to keep that
# short each node asked the broker again every millisecond (0.15 cores of the broker per idle
# node). And each fetch that had records listed every batch of the partition. The patch makes
# a fetch answer as soon as a produce stores records, as Kafka's long poll does, and read the
# batch at the fetched offset directly (README, "The broker"). It is built from the crates'
# sources on crates.io, with Tansu's own Cargo.lock; the build directory ($TANSU_HOME/target,
# about 1.4 GB) is kept, so a change of the patch rebuilds in about 5 minutes.
install_tansu() {
  local stamp want
  stamp="$TANSU_HOME/patch.sha256"
  want="$TANSU_VERSION $(sha256sum "$TANSU_PATCH" | cut -d' ' -f1)"
  if [ -x "$TANSU" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "building tansu $TANSU_VERSION with $TANSU_PATCH (about 16 minutes the first time)..."
  local src="$TANSU_HOME/src"
  rm -rf "$src"
  mkdir -p "$src" "$TANSU_HOME/bin"
  # Python and git, not curl and patch: a fresh machine has the first two.
  local crate
  for crate in tansu tansu-storage; do
    python3 -c 'import io, sys, tarfile, urllib.request
data = urllib.request.urlopen(sys.argv[1], timeout=120).read()
tarfile.open(fileobj=io.BytesIO(data)).extractall(sys.argv[2])' \
      "https://static.crates.io/crates/$crate/$TANSU_VERSION/download" "$src"
  done
  # Outside any git repository, `git apply` patches the directory it runs in.
  (cd "$src/tansu-storage-$TANSU_VERSION" && git apply -p1 "$OLDPWD/$TANSU_PATCH")
  printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' \
    "$TANSU_VERSION" >> "$src/tansu-$TANSU_VERSION/Cargo.toml"
  # `cargo build` keeps the packaged Cargo.lock (only the patched crate's entry changes);
  # `cargo install --path` would resolve every dependency afresh.
  (cd "$src/tansu-$TANSU_VERSION" && CARGO_TARGET_DIR="$TANSU_HOME/target" \
    cargo build --release --features dynostore --bin tansu)
  # Renamed into place: a broker still running the old binary keeps it.
  cp "$TANSU_HOME/target/release/tansu" "$TANSU.new"
  mv "$TANSU.new" "$TANSU"
  echo "$want" > "$stamp"
}

start_redis() {
  if pid_alive "$STATE/redis.pid"; then return; fi
  if port_open "$REDIS_PORT"; then
    echo "error: something else listens on 127.0.0.1:$REDIS_PORT; stop it or set REDIS_PORT" >&2
    exit 1
  fi
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --requirepass "$REDIS_PASSWORD" \
    --save "" --appendonly yes --appendfsync always --dir "$PWD/$STATE" --daemonize yes \
    --pidfile "$PWD/$STATE/redis.pid" --logfile "$PWD/$STATE/redis.log"
}

start_kafka() {
  if pid_alive "$STATE/kafka.pid"; then return; fi
  if port_open "$KAFKA_PORT"; then
    echo "error: something else listens on 127.0.0.1:$KAFKA_PORT; stop it or set KAFKA_PORT" >&2
    exit 1
  fi
  nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "memory://tansu/" \
    >"$STATE/kafka.log" 2>&1 &
  echo $! >"$STATE/kafka.pid"
}

start_store() {
  if pid_alive "$STATE/message-service.pid"; then return; fi
  if port_open "$STORE_PORT"; then
    echo "error: something else listens on 127.0.0.1:$STORE_PORT; stop it or set STORE_PORT" >&2
    exit 1
  fi
  if [ ! -x "$CHATD" ]; then
    echo "building chatd for the message-service..."
    cargo build --release --locked
  fi
  nohup "$CHATD" message-service --listen "127.0.0.1:$STORE_PORT" --backend redis \
    --redis "redis://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0" \
    >"$STATE/message-service.log" 2>&1 &
  echo $! >"$STATE/message-service.pid"
}

store_ready() {
  pid_alive "$STATE/message-service.pid" && port_open "$STORE_PORT"
}

wait_until() { # what seconds command...
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "error: $what did not answer within ${secs}s; see $STATE/*.log" >&2
  return 1
}

redis_ping() {
  [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" -a "$REDIS_PASSWORD" --no-auth-warning ping)" = PONG ]
}

kafka_ready() {
  pid_alive "$STATE/kafka.pid" && port_open "$KAFKA_PORT"
}

stop() { # name [pidfile]
  local pidfile=${2:-$STATE/$1.pid}
  if pid_alive "$pidfile"; then
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}

status() {
  local rc=0
  if pid_alive "$STATE/redis.pid" && redis_ping; then
    echo "redis: up on 127.0.0.1:$REDIS_PORT (pid $(cat "$STATE/redis.pid"))"
  else
    echo "redis: down"; rc=1
  fi
  if kafka_ready; then
    echo "kafka: up on 127.0.0.1:$KAFKA_PORT (tansu, pid $(cat "$STATE/kafka.pid"))"
  else
    echo "kafka: down"; rc=1
  fi
  if store_ready; then
    echo "message-service: up on 127.0.0.1:$STORE_PORT (pid $(cat "$STATE/message-service.pid"))"
  else
    echo "message-service: down"; rc=1
  fi
  return $rc
}

start_cluster_node() { # port
  local port=$1 dir="$PWD/$STATE/cluster-$1"
  if pid_alive "$dir/redis.pid"; then return; fi
  if port_open "$port"; then
    echo "error: something else listens on 127.0.0.1:$port; stop it or set REDIS_CLUSTER_PORTS" >&2
    exit 1
  fi
  mkdir -p "$dir"
  redis-server --bind 127.0.0.1 --port "$port" --requirepass "$REDIS_PASSWORD" \
    --masterauth "$REDIS_PASSWORD" --cluster-enabled yes --cluster-config-file nodes.conf \
    --save "" --appendonly yes --appendfsync always --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
}

cluster_cli() { # port args...
  local port=$1
  shift
  redis-cli -h 127.0.0.1 -p "$port" -a "$REDIS_PASSWORD" --no-auth-warning "$@"
}

cluster_node_ready() { # port: PONG, not LOADING (a restarted node reads its append-only file
  # first, and answers CLUSTER INFO with cluster_state:ok meanwhile)
  [ "$(cluster_cli "$1" ping 2>/dev/null)" = PONG ]
}

cluster_ok() { # every node is ready and says the cluster is ok
  local port
  for port in $REDIS_CLUSTER_PORTS; do
    cluster_node_ready "$port" || return 1
    cluster_cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

cluster() {
  local port
  case "${1:-}" in
    up)
      install_redis
      for port in $REDIS_CLUSTER_PORTS; do start_cluster_node "$port"; done
      for port in $REDIS_CLUSTER_PORTS; do
        wait_until "redis cluster node on 127.0.0.1:$port" 20 cluster_node_ready "$port"
      done
      # Slots are assigned once; a restarted cluster finds them in its nodes.conf.
      if [ "$(cluster_cli "${REDIS_CLUSTER_PORTS%% *}" cluster info | grep -c '^cluster_slots_assigned:16384')" = 0 ]; then
        local nodes=()
        for port in $REDIS_CLUSTER_PORTS; do nodes+=("127.0.0.1:$port"); done
        cluster_cli "${REDIS_CLUSTER_PORTS%% *}" --cluster create "${nodes[@]}" --cluster-yes >"$STATE/cluster-create.log"
      fi
      wait_until "redis cluster (cluster_state:ok)" 30 cluster_ok
      cluster status
      ;;
    down)
      for port in $REDIS_CLUSTER_PORTS; do
        stop "redis cluster node $port" "$STATE/cluster-$port/redis.pid"
      done
      ;;
    status)
      local rc=0
      for port in $REDIS_CLUSTER_PORTS; do
        if pid_alive "$STATE/cluster-$port/redis.pid" && cluster_cli "$port" ping >/dev/null 2>&1; then
          echo "redis cluster node: up on 127.0.0.1:$port ($(cluster_cli "$port" role | head -1))"
        else
          echo "redis cluster node: down on 127.0.0.1:$port"; rc=1
        fi
      done
      if [ $rc = 0 ] && cluster_ok; then echo "redis cluster: ok"; else echo "redis cluster: not ok"; rc=1; fi
      return $rc
      ;;
    *)
      echo "usage: $0 cluster up|down|status" >&2
      exit 2
      ;;
  esac
}

case "${1:-}" in
  cluster)
    cluster "${2:-}"
    ;;
  up)
    install_redis
    install_tansu
    start_redis
    start_kafka
    wait_until "redis on 127.0.0.1:$REDIS_PORT" 20 redis_ping
    wait_until "kafka (tansu) on 127.0.0.1:$KAFKA_PORT" 30 kafka_ready
    start_store
    wait_until "message-service on 127.0.0.1:$STORE_PORT" 30 store_ready
    status
    ;;
  down)
    stop message-service
    stop kafka
    stop redis
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 up|down|status|cluster up|down|status" >&2
    exit 2
    ;;
esac
