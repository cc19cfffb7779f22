//! Layered configuration: built-in defaults < `config/default.toml` < `config/<profile>.toml`
//! < `--config FILE` < `CHATD_<SECTION>__<KEY>` environment < command-line flags.
//!
//! Every layer is checked on its own before the layers are merged, so an unknown key or a
//! value of the wrong type is reported against the file or variable that holds it.
//!
//! This file holds the schema (every key, its default, why it exists) and the typed choices
//! read from it; `load` reads and merges the layers; `validate` checks what types alone
//! cannot say, reporting every invalid key at once.

mod load;
mod validate;

pub use load::chatd_env;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The validated configuration of one node (and of the client commands that read it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub presence: PresenceConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub moderation: ModerationConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind. Loopback by default: with `auth.mode = "none"`, anyone who can reach
    /// the port can claim any user id.
    pub host: String,
    /// Port for WebSocket and REST; 0 picks a free one (tests).
    pub port: u16,
    /// Unique name of this node in a cluster; part of every message id. Empty: derived from
    /// the host name and port.
    pub node_id: String,
    /// Told to clients in `CONNECTED`; how often they should send `HEARTBEAT`.
    pub heartbeat_interval_ms: u64,
    /// A connection that sends nothing for this long is closed and its presence removed.
    pub idle_timeout_ms: u64,
    /// Largest WebSocket message (and frame) accepted; larger ones close the connection with
    /// 1009 before they are buffered.
    pub max_frame_bytes: usize,
    /// Largest `content` of a chat message, in characters.
    pub max_content_chars: usize,
    /// Frames waiting to be written to one connection; a reader that falls this far behind is
    /// closed (1013) so that it reconnects, rather than growing memory without bound.
    pub send_queue_len: usize,
    /// Chat messages of one connection being stored and delivered at once: the reader goes on
    /// reading while earlier ones are on their way, and waits (reads nothing) at this many.
    pub max_in_flight: usize,
    /// How long the node gathers chat messages into one batch (one store call, one presence
    /// call) after the first arrives, in microseconds; 0 takes only what already waits.
    pub batch_linger_us: u64,
    /// Batches of chat messages being stored at once, while the lanes' store calls overlap.
    /// A connection's messages on their way all take one lane, so they are stored and
    /// acknowledged in the order sent; it picks a lane when it has nothing in flight, lane 0
    /// unless that one is busy, so the other lanes fill only under load. 0: chosen by the
    /// store ([`Config::store_lanes`]).
    pub store_lanes: usize,
    /// On SIGINT/SIGTERM, how long to wait for sessions to close before exiting anyway.
    pub shutdown_grace_ms: u64,
    /// This node's REST base URL as other nodes and `chatd stats` should reach it (stored
    /// with its lease). Empty: `http://<bound address>`.
    pub advertise_url: String,
    /// Browser origins allowed to open a WebSocket (checked before the upgrade, 403 else).
    /// Empty: any. Requests without an Origin header (native clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// WebSocket sessions this node holds at most; more are refused with 503.
    pub max_connections: usize,
    /// Devices one user may have online at once (cluster-wide); more are refused with 429.
    pub max_devices_per_user: usize,
    /// Frames a connection may send per second, on average (token bucket).
    pub rate_limit_per_sec: u32,
    /// Frames a connection may send in a burst above the average.
    pub rate_limit_burst: u32,
    /// Refusals (`ERROR RATE_LIMITED`) held against a client that keeps sending after it was
    /// told, before the connection is closed (1008). See [`crate::rate::FrameLimit`].
    pub rate_limit_strikes: u32,
    /// After its first refusal a client has this long to hear it and slow down: what it sent
    /// meanwhile is refused but is not a strike (one pipelined burst is not abuse).
    pub rate_limit_grace_ms: u64,
    /// A client must send its whole HTTP request head within this long, or the socket is
    /// closed (slow or stalled handshakes cannot hold sockets forever).
    pub header_read_timeout_ms: u64,
    /// Messages to an offline user in one chat within this window make one offline-push
    /// event (with their count), emitted when the window ends unless the user came back.
    /// 0: one event per message, at once.
    pub offline_push_window_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 9430,
            node_id: String::new(),
            heartbeat_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            max_frame_bytes: 64 * 1024,
            max_content_chars: 4096,
            send_queue_len: 256,
            max_in_flight: 64,
            batch_linger_us: 1000,
            store_lanes: 0,
            shutdown_grace_ms: 5_000,
            advertise_url: String::new(),
            allowed_origins: Vec::new(),
            max_connections: 10_000,
            max_devices_per_user: 10,
            rate_limit_per_sec: 20,
            rate_limit_burst: 40,
            rate_limit_strikes: 20,
            rate_limit_grace_ms: 1_000,
            header_read_timeout_ms: 10_000,
            offline_push_window_ms: 3_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceBackend {
    /// In this process only: the embedded single node.
    Memory,
    /// Shared by every node through Redis (`[redis]`): cluster mode.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    pub backend: PresenceBackend,
    /// A device whose last heartbeat is older than this reads as offline (the seed's 5 min).
    pub ttl_secs: u64,
    /// Redis backend: each node's lease; once it lapses (node killed), its users read as
    /// offline. Refreshed every third of it.
    pub node_lease_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            backend: PresenceBackend::Memory,
            ttl_secs: 300,
            node_lease_secs: 15,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`; used when `presence.backend = "redis"` and by `chatd presence`.
    pub url: String,
    /// Put into the URL when it has no credentials of its own. Redacted when printed.
    pub password: String,
    /// Connections to Redis, each multiplexed (every task's calls pipelined on it); calls are
    /// spread over them in turn.
    pub pool_size: usize,
    /// Deadline of every Redis call, connecting included.
    pub timeout_ms: u64,
    /// `url` (and a `redis://` store URL) names a Redis Cluster: one or more comma-separated
    /// seed nodes; calls go to the master of their keys' slot.
    pub cluster: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            password: String::new(),
            pool_size: 2,
            timeout_ms: 1000,
            cluster: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Broker list `host:port,...`. Empty: frames between nodes stay in this process (the
    /// embedded single node). Set: cluster mode over the broker (needs Redis presence).
    pub brokers: String,
    /// Each node consumes `{topic_prefix}{node_id}`, created at start-up if missing.
    pub topic_prefix: String,
    /// Offline-push events (no device of the receiver online) go here.
    pub offline_topic: String,
    /// Each node's consumer group is `{group_prefix}{node_id}`.
    pub group_prefix: String,
    /// How long a publish may wait for the broker's ack before it counts as failed.
    pub publish_timeout_ms: u64,
    /// How long the broker may hold a fetch when there is nothing new (latency of an idle
    /// topic; librdkafka's own default of 500 ms would delay every cross-node frame).
    pub fetch_wait_ms: u64,
    /// How long the producer gathers envelopes before a request to the broker. 0 (the
    /// default): the node's own batches (`server.batch_linger_us`) already make one envelope
    /// per node per batch, and the producer packs what queues while a request is out.
    pub linger_ms: u64,
    /// A node moves to a new generation of its topic once the current one holds this many
    /// records; the old one is deleted once drained (a broker that enforces no retention
    /// slows down as a topic grows).
    pub rotate_records: u64,
    /// How long a node still consumes its previous generation after moving to a new one,
    /// before deleting it. At least `presence.node_lease_secs`: senders learn of the new
    /// generation within a third of a lease.
    pub drain_secs: u64,
    /// Another node's topic generations are deleted once that node has had no lease for this
    /// long (it was killed, or its id is never used again): nobody would ever delete them.
    pub abandoned_secs: u64,
    /// librdkafka properties for every client of the broker (TLS, SASL, timeouts of a managed
    /// Kafka): `[kafka.properties]` in a file, with dotted names quoted or as nested tables,
    /// or `CHATD_KAFKA__PROPERTIES__SASL_PASSWORD` (underscores become dots). Those chatd
    /// sets itself (its guarantees rest on them) are refused; secrets are redacted when
    /// printed.
    #[serde(deserialize_with = "flat_properties")]
    pub properties: BTreeMap<String, String>,
}

/// Where frames between nodes go, from `kafka.brokers`, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusBackend {
    /// Within this process: the embedded single node (`kafka.brokers` empty).
    Local,
    /// A Kafka-compatible broker: cluster mode. The `host:port` of each broker.
    Kafka(Vec<String>),
}

impl KafkaConfig {
    /// The bus `brokers` names, or what is wrong with it.
    pub fn backend(&self) -> Result<BusBackend, String> {
        let list = self.brokers.trim();
        if list.is_empty() {
            return Ok(BusBackend::Local);
        }
        let mut brokers = Vec::new();
        for one in list.split(',').map(str::trim) {
            let port = one
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty() && !host.contains('/')) {
                return Err(format!(
                    "{one:?} in {list:?}: expected host:port, several comma-separated \
                     (empty: no broker, the single-node bus)"
                ));
            }
            brokers.push(one.to_string());
        }
        Ok(BusBackend::Kafka(brokers))
    }

    /// Whether frames between nodes go through a broker (cluster mode).
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend(), Ok(BusBackend::Kafka(_)))
    }
}

/// librdkafka properties chatd sets itself, with what to use instead.
const RESERVED_KAFKA_PROPERTIES: [(&str, &str); 10] = [
    ("bootstrap.servers", "set kafka.brokers"),
    ("group.id", "set kafka.group_prefix"),
    ("enable.auto.commit", "chatd commits what it delivered"),
    (
        "enable.auto.offset.store",
        "chatd commits what it delivered",
    ),
    (
        "enable.idempotence",
        "chatd's envelopes are idempotent by seq",
    ),
    ("acks", "a frame counts as published only with acks=all"),
    ("allow.auto.create.topics", "only a topic's node creates it"),
    ("message.timeout.ms", "set kafka.publish_timeout_ms"),
    ("linger.ms", "set kafka.linger_ms"),
    ("fetch.wait.max.ms", "set kafka.fetch_wait_ms"),
];

/// Whether a librdkafka property may hold a secret (a password, a private key, a token).
pub fn secret_property(name: &str) -> bool {
    [
        "password",
        "secret",
        ".pem",
        "key",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// `[kafka.properties]` as flat dotted names: `"security.protocol" = "SSL"` and
/// `security.protocol = "SSL"` (which TOML reads as nested tables) are the same property;
/// numbers and booleans are librdkafka strings too.
fn flat_properties<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    fn flatten(
        prefix: &str,
        table: toml::Table,
        out: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        for (key, value) in table {
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            let text = match value {
                toml::Value::Table(t) => {
                    flatten(&name, t, out)?;
                    continue;
                }
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "kafka.properties.{name}: expected a string, number or boolean, found {}",
                        other.type_str()
                    ))
                }
            };
            out.insert(name, text);
        }
        Ok(())
    }
    let table = toml::Table::deserialize(deserializer)?;
    let mut out = BTreeMap::new();
    flatten("", table, &mut out).map_err(serde::de::Error::custom)?;
    Ok(out)
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic_prefix: "chat.node.".into(),
            offline_topic: "chat.offline-push".into(),
            group_prefix: "chatd-node-".into(),
            publish_timeout_ms: 5000,
            fetch_wait_ms: 100,
            linger_ms: 0,
            rotate_records: 2_000,
            drain_secs: 30,
            abandoned_secs: 300,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Empty: the in-process store. `grpc://host:port`: a MessageService (`chatd
    /// message-service`); several, comma-separated, are called in turn with failover.
    /// `redis://host:port/db`: a store in Redis shared by every node (password, pool and
    /// deadline from `[redis]`). Read through [`StoreConfig::backend`].
    pub url: String,
    /// The in-process store keeps at most this many messages, dropping the oldest.
    pub memory_max_messages: usize,
    /// The Redis store keeps a message this long.
    pub retention_secs: u64,
    /// Each user's inbox keeps at most this many newest entries; a device whose cursor is
    /// older gets `SYNC_TOO_OLD`.
    pub inbox_max_entries: usize,
    /// Most members of a group. Each member gets its own copy of every group message (a
    /// place in its inbox, a copy, a history entry): above this, fan-out on write costs too
    /// much per message, and an audience that large is a channel (fan-out on read), which
    /// chatd does not have.
    pub group_max_members: usize,
    /// gRPC store: deadline of one call.
    pub timeout_ms: u64,
    /// gRPC store: further attempts after a transient failure (saves are idempotent).
    pub retries: u32,
    /// Redis store: a message is acknowledged only once this many replicas of each master it
    /// was written on confirm it (Redis `WAIT`); 0 trusts the master's own append-only file.
    pub wait_replicas: u32,
    /// Redis store: how long a write waits for those replicas; fewer in time is a failed save
    /// (the sender retries; the retry is idempotent).
    pub wait_timeout_ms: u64,
}

/// The store `store.url` names, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// In this process: the embedded single node.
    Memory,
    /// One or several MessageServices (`grpc://host:port`, comma-separated).
    Grpc(Vec<String>),
    /// A store in Redis (`redis://` or `rediss://`).
    Redis(String),
}

impl Config {
    /// How many store lanes the node runs: `server.store_lanes`, or for 0, one with the
    /// in-process store (its calls do not wait, and more lanes only make smaller batches) and
    /// two with Redis or a MessageService (while one batch waits for its round trips and
    /// fsyncs, another is on its way).
    pub fn store_lanes(&self) -> usize {
        match (self.server.store_lanes, self.store.backend()) {
            (0, Ok(StoreBackend::Memory)) => 1,
            (0, _) => 2,
            (n, _) => n,
        }
    }
}

impl StoreConfig {
    /// The store `url` names, or what is wrong with it.
    pub fn backend(&self) -> Result<StoreBackend, String> {
        let url = self.url.trim();
        if url.is_empty() {
            return Ok(StoreBackend::Memory);
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(StoreBackend::Redis(url.to_string()));
        }
        let mut services = Vec::new();
        for one in url.split(',').map(str::trim) {
            let Some(address) = one.strip_prefix("grpc://") else {
                return Err(format!(
                    "{url:?}: expected empty (in-process store), grpc://host:port (a MessageService; \
                     several comma-separated) or redis://host:port/db, not {one:?}"
                ));
            };
            if address.is_empty() || address.contains('/') {
                return Err(format!("{one:?}: expected grpc://host:port"));
            }
            if services.iter().any(|s| s == one) {
                return Err(format!("{one:?} is listed twice"));
            }
            services.push(one.to_string());
        }
        Ok(StoreBackend::Grpc(services))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            memory_max_messages: 100_000,
            retention_secs: 7 * 24 * 3600,
            inbox_max_entries: 10_000,
            group_max_members: 1000,
            timeout_ms: 2000,
            retries: 2,
            wait_replicas: 0,
            wait_timeout_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `?userId=` is trusted: for local use (a warning at start-up off loopback).
    #[default]
    None,
    /// A signed token (HS256 JWT) names the user.
    Token,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// HS256 key of the tokens, at least 32 bytes; redacted when printed.
    pub secret: String,
    /// Users whose tokens may read the operator dashboard's data (`/api/cluster`) in token
    /// mode.
    pub operators: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModerationAction {
    /// Replace each listed word with `*`, one per character, and deliver.
    #[default]
    Mask,
    /// Refuse the message with `ERROR` `CONTENT_REJECTED`.
    Reject,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    pub action: ModerationAction,
    /// Words inline; matched case-insensitively anywhere in the content.
    pub words: Vec<String>,
    /// A file with one word per line (`#` starts a comment); relative to the working directory.
    pub words_file: String,
}

/// Values given on the command line; they win over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub port: Option<u16>,
    pub node_id: Option<String>,
}

/// Where the layers come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Holds `default.toml` and `<profile>.toml`; a missing `default.toml` is fine.
    pub config_dir: PathBuf,
    pub profile: Option<String>,
    pub file: Option<PathBuf>,
    /// The process environment, passed in so tests do not depend on (or touch) the real one.
    pub env: Vec<(String, String)>,
    pub overrides: Overrides,
}

impl Sources {
    /// Sources with only the built-in defaults and the given config directory.
    pub fn defaults_only(config_dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: config_dir.into(),
            profile: None,
            file: None,
            env: Vec::new(),
            overrides: Overrides::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("profile {profile:?} has no file {path} (create it, or pick another --profile)")]
    MissingProfile { profile: String, path: PathBuf },
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
    /// Several invalid keys, one per line.
    #[error("{} settings are invalid:\n  {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// Nothing wrong, one error, or all of them.
    pub fn all(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

impl Config {
    /// The effective configuration as TOML with secrets redacted, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        let properties = shown
            .kafka
            .properties
            .iter_mut()
            .filter(|(name, _)| secret_property(name))
            .map(|(_, value)| value);
        for secret in [&mut shown.redis.password, &mut shown.auth.secret]
            .into_iter()
            .chain(properties)
        {
            if !secret.is_empty() {
                *secret = "<redacted>".into();
            }
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatd-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn store_lanes_default_to_one_in_process_and_two_with_a_shared_store() {
        let mut c = Config::default();
        assert_eq!(c.store_lanes(), 1);
        c.store.url = "redis://127.0.0.1:6379".into();
        assert_eq!(c.store_lanes(), 2);
        c.store.url = "grpc://127.0.0.1:20882".into();
        assert_eq!(c.store_lanes(), 2);
        c.server.store_lanes = 3;
        assert_eq!(c.store_lanes(), 3);
        c.server.store_lanes = 65;
        assert!(c.validate().is_err());
    }

    #[test]
    fn defaults_without_files() {
        let c = Config::load(&Sources::defaults_only("/nonexistent")).unwrap();
        assert_eq!(c.server.port, 9430);
        assert_eq!(c.server.max_frame_bytes, 65536);
        assert_eq!(c.server.max_content_chars, 4096);
        assert!(c.server.node_id.ends_with("-9430"), "{}", c.server.node_id);
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = dir_with(&[
            (
                "default.toml",
                "[server]\nport = 1000\nnode_id = \"d\"\nsend_queue_len = 7\n",
            ),
            ("node1.toml", "[server]\nport = 2000\nnode_id = \"p\"\n"),
            ("extra.toml", "[server]\nport = 3000\n"),
        ]);
        let mut s = Sources::defaults_only(&dir);
        s.profile = Some("node1".into());
        let c = Config::load(&s).unwrap();
        assert_eq!(
            (
                c.server.port,
                c.server.node_id.as_str(),
                c.server.send_queue_len
            ),
            (2000, "p", 7)
        );

        s.file = Some(dir.join("extra.toml"));
        assert_eq!(Config::load(&s).unwrap().server.port, 3000);

        s.env = vec![("CHATD_SERVER__PORT".into(), "4000".into())];
        assert_eq!(Config::load(&s).unwrap().server.port, 4000);

        s.overrides.port = Some(5000);
        s.overrides.node_id = Some("flag".into());
        let c = Config::load(&s).unwrap();
        assert_eq!((c.server.port, c.server.node_id.as_str()), (5000, "flag"));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = dir_with(&[("default.toml", "[server]\nprot = 1\n")]);
        let err = Config::load(&Sources::defaults_only(&dir))
            .unwrap_err()
            .to_string();
        assert!(err.contains("default.toml"), "{err}");
        assert!(err.contains("prot"), "{err}");
        assert!(err.contains("port"), "should list what is expected: {err}");
    }

    #[test]
    fn bad_type_names_file() {
        let dir = dir_with(&[("default.toml", "[server]\nport = \"high\"\n")]);
        let err = Config::load(&Sources::defaults_only(&dir))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default.toml") && err.contains("port"),
            "{err}"
        );
    }

    #[test]
    fn env_strings_numbers_lists_and_errors() {
        let mut s = Sources::defaults_only("/nonexistent");
        s.env = vec![
            ("CHATD_SERVER__NODE_ID".into(), "123".into()),
            (
                "CHATD_MODERATION__WORDS".into(),
                "[\"foo\", \"bar\"]".into(),
            ),
            ("CHATD_MODERATION__ACTION".into(), "reject".into()),
        ];
        let c = Config::load(&s).unwrap();
        assert_eq!(c.server.node_id, "123");
        assert_eq!(c.moderation.words, vec!["foo", "bar"]);
        assert_eq!(c.moderation.action, ModerationAction::Reject);

        for (name, value, needle) in [
            ("CHATD_SERVER__PORT", "lots", "CHATD_SERVER__PORT"),
            ("CHATD_SERVER__PROT", "1", "CHATD_SERVER__PROT"),
            ("CHATD_SERVER__PORT", "70000", "CHATD_SERVER__PORT"),
            ("CHATD_SERVICE__PORT", "1", "CHATD_SERVICE__PORT"),
        ] {
            s.env = vec![(name.into(), value.into())];
            let err = Config::load(&s).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}={value}: {err}");
        }
    }

    #[test]
    fn variables_that_are_not_settings_are_ignored() {
        // What Kubernetes injects into every pod of a namespace with a Service named chatd,
        // and what scripts set.
        let mut s = Sources::defaults_only("/nonexistent");
        s.env = [
            ("CHATD_SERVICE_HOST", "10.0.0.1"),
            ("CHATD_SERVICE_PORT", "9430"),
            ("CHATD_PORT", "tcp://10.0.0.1:9430"),
            ("CHATD_PORT_9430_TCP", "tcp://10.0.0.1:9430"),
            ("CHATD_PORT_9430_TCP_ADDR", "10.0.0.1"),
            ("CHATD_PORT_9430_TCP_PORT", "9430"),
            ("CHATD_PORT_9430_TCP_PROTO", "tcp"),
            ("CHATD_BIN", "/usr/local/bin/chatd"),
            ("CHATD_SERVER__PORT", "9500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::load(&s).expect("foreign CHATD_ variables do not stop start-up");
        assert_eq!(c.server.port, 9500);
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let mut s = Sources::defaults_only("/nonexistent");
        for (name, value, key) in [
            (
                "CHATD_SERVER__IDLE_TIMEOUT_MS",
                "10",
                "server.idle_timeout_ms",
            ),
            (
                "CHATD_SERVER__MAX_FRAME_BYTES",
                "10",
                "server.max_frame_bytes",
            ),
            ("CHATD_SERVER__NODE_ID", "a b", "server.node_id"),
            ("CHATD_SERVER__HOST", "example.com", "server.host"),
            ("CHATD_STORE__URL", "http://127.0.0.1:20882", "store.url"),
            ("CHATD_KAFKA__BROKERS", "127.0.0.1:9092", "kafka.brokers"),
        ] {
            s.env = vec![(name.into(), value.into())];
            let err = Config::load(&s).unwrap_err().to_string();
            assert!(err.contains(key), "{name}={value}: {err}");
        }
    }

    #[test]
    fn the_bus_is_chosen_once_from_the_broker_list() {
        let backend = |brokers: &str| {
            KafkaConfig {
                brokers: brokers.into(),
                ..KafkaConfig::default()
            }
            .backend()
        };
        assert_eq!(backend(" "), Ok(BusBackend::Local));
        assert_eq!(
            backend("k1:9092, [::1]:9093"),
            Ok(BusBackend::Kafka(vec![
                "k1:9092".into(),
                "[::1]:9093".into()
            ]))
        );
        for bad in ["k1", "k1:port", ":9092", "k1:9092,", "kafka://k1:9092"] {
            let why = backend(bad).unwrap_err();
            assert!(why.contains("host:port"), "{bad}: {why}");
        }
    }

    #[test]
    fn the_store_is_chosen_once_from_its_url() {
        let backend = |url: &str| {
            StoreConfig {
                url: url.into(),
                ..StoreConfig::default()
            }
            .backend()
        };
        assert_eq!(backend(""), Ok(StoreBackend::Memory));
        assert_eq!(
            backend("redis://:pw@127.0.0.1:6379/0"),
            Ok(StoreBackend::Redis("redis://:pw@127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            backend("grpc://10.0.0.1:20882, grpc://10.0.0.2:20882"),
            Ok(StoreBackend::Grpc(vec![
                "grpc://10.0.0.1:20882".into(),
                "grpc://10.0.0.2:20882".into()
            ]))
        );
        for (url, says) in [
            ("grpc://a:1,redis://b:2", "redis://b:2"),
            ("grpc://a:1,,grpc://b:2", "\"\""),
            ("grpc://a:1,grpc://a:1", "listed twice"),
            ("grpc://", "grpc://host:port"),
            ("http://a:1", "http://a:1"),
        ] {
            let why = backend(url).unwrap_err();
            assert!(why.contains(says), "{url}: {why}");
        }
    }

    #[test]
    fn every_invalid_key_is_reported_at_once() {
        let mut s = Sources::defaults_only("/nonexistent");
        s.env = vec![
            ("CHATD_SERVER__MAX_IN_FLIGHT".into(), "0".into()),
            ("CHATD_KAFKA__BROKERS".into(), "nohost".into()),
            ("CHATD_STORE__URL".into(), "ftp://x".into()),
        ];
        let err = Config::load(&s).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ConfigError::Several(ref all) if all.len() == 3),
            "{text}"
        );
        for key in ["server.max_in_flight", "kafka.brokers", "store.url"] {
            assert!(text.contains(key), "{key}: {text}");
        }
        assert!(text.starts_with("3 settings are invalid:\n  "), "{text}");
    }

    #[test]
    fn missing_or_bad_profile() {
        let mut s = Sources::defaults_only("/nonexistent");
        s.profile = Some("node9".into());
        assert!(Config::load(&s)
            .unwrap_err()
            .to_string()
            .contains("node9.toml"));
        s.profile = Some("../etc/passwd".into());
        assert!(Config::load(&s)
            .unwrap_err()
            .to_string()
            .contains("--profile"));
    }

    #[test]
    fn kafka_properties_are_flat_layered_checked_and_redacted() {
        let dir = dir_with(&[
            (
                "default.toml",
                "[kafka.properties]\nsecurity.protocol = \"sasl_plaintext\"\n\
                 \"sasl.mechanisms\" = \"PLAIN\"\n\"socket.timeout.ms\" = 30000\n",
            ),
            (
                "extra.toml",
                "[kafka.properties]\n\"security.protocol\" = \"plaintext\"\n",
            ),
            (
                "list.toml",
                "[kafka.properties]\n\"sasl.mechanisms\" = [1]\n",
            ),
        ]);
        let mut s = Sources::defaults_only(&dir);
        let p = Config::load(&s).unwrap().kafka.properties;
        assert_eq!(p["security.protocol"], "sasl_plaintext");
        assert_eq!(p["sasl.mechanisms"], "PLAIN");
        assert_eq!(p["socket.timeout.ms"], "30000");

        // A later layer replaces a property however either wrote its name.
        s.file = Some(dir.join("extra.toml"));
        s.env = vec![(
            "CHATD_KAFKA__PROPERTIES__SASL_PASSWORD".into(),
            "hunter2".into(),
        )];
        let c = Config::load(&s).unwrap();
        assert_eq!(c.kafka.properties["security.protocol"], "plaintext");
        assert_eq!(c.kafka.properties["sasl.password"], "hunter2");
        let printed = c.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("\"sasl.mechanisms\" = \"PLAIN\""),
            "{printed}"
        );

        for (name, value, says) in [
            (
                "CHATD_KAFKA__PROPERTIES__ACKS",
                "1",
                "kafka.properties.acks",
            ),
            ("CHATD_KAFKA__PROPERTIES__LINGER_MS", "5", "kafka.linger_ms"),
            (
                "CHATD_KAFKA__PROPERTIES__NO_SUCH_THING",
                "1",
                "no.such.thing",
            ),
            (
                "CHATD_KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS",
                "soon",
                "socket.timeout.ms",
            ),
        ] {
            s.env = vec![(name.into(), value.into())];
            let err = Config::load(&s).unwrap_err().to_string();
            assert!(err.contains(says), "{name}={value}: {err}");
        }
        s.env.clear();
        s.file = Some(dir.join("list.toml"));
        let err = Config::load(&s).unwrap_err().to_string();
        assert!(err.contains("kafka.properties.sasl.mechanisms"), "{err}");
    }

    #[test]
    fn printed_config_redacts_secrets() {
        let mut c = Config::default();
        c.redis.password = "hunter2-redis".into();
        c.auth.secret = "hunter2-token-secret-0123456789abcdef".into();
        let printed = c.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(printed.matches("<redacted>").count(), 2, "{printed}");
        assert!(
            !Config::default().to_toml().contains("<redacted>"),
            "empty secrets stay empty"
        );
    }

    #[test]
    fn every_config_key_is_documented_in_the_readme() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let shipped: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join("config/default.toml")).unwrap())
                .unwrap();
        for (section, keys) in &shipped {
            for key in keys.as_table().unwrap().keys() {
                let name = format!("`{section}.{key}`");
                assert!(readme.contains(&name), "README.md does not document {name}");
            }
        }
    }

    #[test]
    fn shipped_config_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for profile in [None, Some("node1"), Some("node2")] {
            let mut s = Sources::defaults_only(&dir);
            s.profile = profile.map(String::from);
            let c = Config::load(&s).unwrap_or_else(|e| panic!("{profile:?}: {e}"));
            let want = match profile {
                Some("node2") => 9431,
                _ => 9430,
            };
            assert_eq!(c.server.port, want);
        }
        // The documented defaults file must say exactly what the built-in defaults say.
        let shipped: Config =
            toml::from_str(&std::fs::read_to_string(dir.join("default.toml")).unwrap()).unwrap();
        assert_eq!(shipped, Config::default());
    }
}
