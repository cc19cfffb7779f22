//! The backends a node runs on, chosen once from typed config: presence (memory or Redis),
//! the bus between nodes (in-process or a Kafka broker) and the store (in-process, one or
//! several MessageServices, or Redis); and what goes wrong while making them.

use std::sync::Arc;

use crate::bus::{Bus, KafkaBus, LocalBus};
use crate::config::{BusBackend, Config, PresenceBackend, RedisConfig, StoreBackend};
use crate::presence::{MemoryPresence, Presence, PresenceError, RedisPresence};
use crate::redis_client::{RedisClient, RedisError};
use crate::store::{self, GrpcStore, Store, StoreError};

use super::moderation;

/// The backends a node runs on; each is a trait object picked from config.
#[derive(Clone)]
pub struct Backends {
    pub presence: Arc<dyn Presence>,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
}

impl Backends {
    /// The backends `config` names: in-process ones for the embedded default, Redis for
    /// presence in cluster mode.
    pub fn from_config(config: &Config) -> Result<Backends, NodeError> {
        let presence: Arc<dyn Presence> = match config.presence.backend {
            PresenceBackend::Memory => Arc::new(MemoryPresence::new(config.presence.ttl_secs)),
            PresenceBackend::Redis => Arc::new(RedisPresence::from_config(config)?),
        };
        let bus: Arc<dyn Bus> = match config.kafka.backend().map_err(NodeError::Config)? {
            BusBackend::Local => Arc::new(LocalBus::new()),
            BusBackend::Kafka(_) => Arc::new(KafkaBus::new(&config.kafka)?),
        };
        let timeout = std::time::Duration::from_millis(config.store.timeout_ms);
        let store: Arc<dyn Store> = match config.store.backend().map_err(NodeError::Config)? {
            StoreBackend::Memory => Arc::new(store::memory_store(&config.store)),
            StoreBackend::Grpc(services) => {
                Arc::new(GrpcStore::new(&services, timeout, config.store.retries)?)
            }
            StoreBackend::Redis(url) => {
                let redis = RedisConfig {
                    url,
                    ..config.redis.clone()
                };
                Arc::new(store::redis_store(&config.store, RedisClient::new(&redis)?))
            }
        };
        Ok(Backends {
            presence,
            bus,
            store,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Moderation(#[from] moderation::ModerationError),
    #[error("cannot subscribe to the bus (is the broker of kafka.brokers up? do kafka.properties match it?)")]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// A backend's config that validation would have refused.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
