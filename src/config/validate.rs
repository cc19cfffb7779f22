//! What types alone cannot say: ranges, relations between keys, the typed choices that must
//! parse. Every invalid key is reported, not only the first.

use super::{
    valid_node_id, AuthMode, BusBackend, Config, ConfigError, PresenceBackend, StoreBackend,
    RESERVED_KAFKA_PROPERTIES,
};

impl Config {
    /// Checks what types alone cannot say. Each error names the key and what was expected;
    /// all of them come back together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let mut problems = Vec::new();
        let mut bad = |key: &str, detail: String| {
            problems.push(ConfigError::Invalid {
                origin: key.to_string(),
                detail,
            })
        };
        if !valid_node_id(&s.node_id) {
            bad(
                "server.node_id",
                format!("{:?} must be 1-64 of A-Z a-z 0-9 _ . -", s.node_id),
            );
        }
        if s.host.parse::<std::net::IpAddr>().is_err() {
            bad("server.host", format!("{:?} is not an IP address", s.host));
        }
        if s.heartbeat_interval_ms < 100 {
            bad(
                "server.heartbeat_interval_ms",
                "must be at least 100".into(),
            );
        }
        if s.idle_timeout_ms <= s.heartbeat_interval_ms {
            bad(
                "server.idle_timeout_ms",
                format!(
                    "{} must be greater than server.heartbeat_interval_ms ({})",
                    s.idle_timeout_ms, s.heartbeat_interval_ms
                ),
            );
        }
        if !(1024..=16 * 1024 * 1024).contains(&s.max_frame_bytes) {
            bad(
                "server.max_frame_bytes",
                "must be between 1024 and 16777216".into(),
            );
        }
        if s.max_content_chars == 0 {
            bad("server.max_content_chars", "must be at least 1".into());
        }
        if s.send_queue_len == 0 {
            bad("server.send_queue_len", "must be at least 1".into());
        }
        if s.batch_linger_us > 100_000 {
            bad(
                "server.batch_linger_us",
                "must be between 0 and 100000".into(),
            );
        }
        if s.store_lanes > 64 {
            bad(
                "server.store_lanes",
                "must be between 0 (chosen by the store) and 64".into(),
            );
        }
        if !(1..=4096).contains(&s.max_in_flight) {
            bad("server.max_in_flight", "must be between 1 and 4096".into());
        }
        if self.presence.ttl_secs == 0 {
            bad("presence.ttl_secs", "must be at least 1".into());
        }
        if !(2..=15).contains(&self.presence.node_lease_secs) {
            bad(
                "presence.node_lease_secs",
                "must be between 2 and 15".into(),
            );
        }
        let redis_urls = |key: &str, url: &str, bad: &mut dyn FnMut(&str, String)| {
            let urls: Vec<&str> = url.split(',').map(str::trim).collect();
            if let Some(one) = urls
                .iter()
                .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                bad(key, format!("{one:?} must start with redis://"));
            } else if urls.len() > 1 && !self.redis.cluster {
                bad(
                    key,
                    format!(
                        "{url:?} lists several Redis servers: that is a Redis Cluster's seed \
                         nodes, set redis.cluster = true (or give one URL)"
                    ),
                );
            }
        };
        redis_urls("redis.url", &self.redis.url, &mut bad);
        if let Ok(StoreBackend::Redis(url)) = self.store.backend() {
            redis_urls("store.url", &url, &mut bad);
        }
        if self.store.wait_timeout_ms == 0 {
            // WAIT with a timeout of 0 blocks for ever.
            bad("store.wait_timeout_ms", "must be at least 1".into());
        }
        if self.redis.pool_size == 0 {
            bad("redis.pool_size", "must be at least 1".into());
        }
        if self.redis.timeout_ms < 10 {
            bad("redis.timeout_ms", "must be at least 10".into());
        }
        let k = &self.kafka;
        let bus = k.backend().unwrap_or_else(|why| {
            bad("kafka.brokers", why);
            BusBackend::Local
        });
        if bus != BusBackend::Local && self.presence.backend == PresenceBackend::Memory {
            bad(
                "kafka.brokers",
                "cluster mode needs presence.backend = \"redis\" (nodes must see each other's devices)"
                    .into(),
            );
        }
        if k.topic_prefix.is_empty() || k.offline_topic.is_empty() || k.group_prefix.is_empty() {
            bad(
                "kafka.topic_prefix",
                "kafka.topic_prefix, kafka.offline_topic and kafka.group_prefix must not be empty"
                    .into(),
            );
        }
        if !(1..=1000).contains(&k.fetch_wait_ms) {
            bad("kafka.fetch_wait_ms", "must be between 1 and 1000".into());
        }
        if k.linger_ms > 1000 {
            bad("kafka.linger_ms", "must be between 0 and 1000".into());
        }
        if k.rotate_records < 100 {
            bad("kafka.rotate_records", "must be at least 100".into());
        }
        if k.drain_secs < self.presence.node_lease_secs || k.drain_secs > 3600 {
            bad(
                "kafka.drain_secs",
                format!(
                    "must be between presence.node_lease_secs ({}) and 3600: senders learn of a new topic generation within a third of a lease",
                    self.presence.node_lease_secs
                ),
            );
        }
        if k.abandoned_secs < k.drain_secs {
            bad(
                "kafka.abandoned_secs",
                format!(
                    "must be at least kafka.drain_secs ({}): a node without a lease for less may be a live one that lost Redis for a moment",
                    k.drain_secs
                ),
            );
        }
        if k.publish_timeout_ms < 100 {
            bad("kafka.publish_timeout_ms", "must be at least 100".into());
        }
        if !s.advertise_url.is_empty() && !s.advertise_url.starts_with("http") {
            bad(
                "server.advertise_url",
                format!("{:?} must be an http:// URL", s.advertise_url),
            );
        }
        for name in k.properties.keys() {
            if let Some((_, instead)) = RESERVED_KAFKA_PROPERTIES.iter().find(|(r, _)| r == name) {
                bad(
                    &format!("kafka.properties.{name}"),
                    format!("is set by chatd ({instead}); remove it"),
                );
            }
        }
        if !k.properties.is_empty() {
            let mut check = rdkafka::ClientConfig::new();
            for (name, value) in &k.properties {
                check.set(name, value);
            }
            if let Err(e) = check.create_native_config() {
                bad(
                    "kafka.properties",
                    format!("librdkafka refuses them: {e} (see librdkafka's CONFIGURATION.md)"),
                );
            }
        }
        if let Err(why) = self.store.backend() {
            bad("store.url", why);
        }
        if self.store.timeout_ms < 10 {
            bad("store.timeout_ms", "must be at least 10".into());
        }
        if self.store.retention_secs == 0 {
            bad("store.retention_secs", "must be at least 1".into());
        }
        if self.store.memory_max_messages == 0 {
            bad("store.memory_max_messages", "must be at least 1".into());
        }
        if self.store.inbox_max_entries == 0 {
            bad("store.inbox_max_entries", "must be at least 1".into());
        }
        if !(2..=crate::store::MAX_GROUP_MEMBERS).contains(&self.store.group_max_members) {
            bad(
                "store.group_max_members",
                format!("must be 2 to {}", crate::store::MAX_GROUP_MEMBERS),
            );
        }
        if self.auth.mode == AuthMode::Token && self.auth.secret.len() < 32 {
            bad(
                "auth.secret",
                "auth.mode = \"token\" needs a secret of at least 32 bytes \
                 (e.g. CHATD_AUTH__SECRET=$(openssl rand -hex 32))"
                    .into(),
            );
        }
        if let Some(o) = self
            .auth
            .operators
            .iter()
            .find(|o| !crate::protocol::is_valid_user_id(o))
        {
            bad(
                "auth.operators",
                format!("{o:?} is not a user id ([A-Za-z0-9_.:@-]{{1,64}})"),
            );
        }
        if s.max_connections == 0 || s.max_devices_per_user == 0 {
            bad(
                "server.max_connections",
                "server.max_connections and server.max_devices_per_user must be at least 1".into(),
            );
        }
        if s.rate_limit_per_sec == 0 || s.rate_limit_burst == 0 || s.rate_limit_strikes == 0 {
            bad(
                "server.rate_limit_per_sec",
                "server.rate_limit_per_sec, rate_limit_burst and rate_limit_strikes must be at least 1"
                    .into(),
            );
        }
        if s.header_read_timeout_ms < 100 {
            bad(
                "server.header_read_timeout_ms",
                "must be at least 100".into(),
            );
        }
        if let Some(o) = s.allowed_origins.iter().find(|o| !o.starts_with("http")) {
            bad(
                "server.allowed_origins",
                format!("{o:?} is not an origin like \"https://app.example\""),
            );
        }
        if self.moderation.words.iter().any(|w| w.trim().is_empty()) {
            bad("moderation.words", "contains an empty word".into());
        }
        ConfigError::all(problems)
    }
}
