//! In-process presence: a sharded map from user to devices. Shared by in-process nodes in
//! tests, so the routing code sees other "nodes" exactly as it will with Redis.

use async_trait::async_trait;
use dashmap::DashMap;

use super::{Device, Presence, PresenceError};
use crate::chat::ids::now_ms;

pub struct MemoryPresence {
    users: DashMap<String, Vec<Device>, foldhash::fast::RandomState>,
    /// A device not refreshed for this long reads as offline.
    ttl_ms: i64,
}

impl MemoryPresence {
    pub fn new(ttl_secs: u64) -> Self {
        Self {
            users: DashMap::default(),
            ttl_ms: (ttl_secs as i64).saturating_mul(1000),
        }
    }

    fn live(&self, d: &Device, now: i64) -> bool {
        now - d.last_seen_ms < self.ttl_ms
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn connect(&self, user_id: &str, device: Device) -> Result<(), PresenceError> {
        let mut devices = self.users.entry(user_id.to_string()).or_default();
        devices.retain(|d| d.connection_id != device.connection_id);
        devices.push(device);
        Ok(())
    }

    async fn disconnect(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError> {
        self.users.remove_if_mut(user_id, |_, devices| {
            devices.retain(|d| d.connection_id != connection_id);
            devices.is_empty()
        });
        Ok(())
    }

    async fn refresh(&self, devices: &[(&str, &str)]) -> Result<Vec<usize>, PresenceError> {
        let now = now_ms();
        let mut unknown = Vec::new();
        for (i, (user_id, connection_id)) in devices.iter().enumerate() {
            let found = self.users.get_mut(*user_id).and_then(|mut list| {
                let d = list
                    .iter_mut()
                    .find(|d| d.connection_id == *connection_id)?;
                d.last_seen_ms = now;
                Some(())
            });
            if found.is_none() {
                unknown.push(i);
            }
        }
        Ok(unknown)
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, PresenceError> {
        let now = now_ms();
        Ok(self
            .users
            .get(user_id)
            .map(|ds| ds.iter().filter(|d| self.live(d, now)).cloned().collect())
            .unwrap_or_default())
    }

    async fn online_user_count(&self) -> Result<usize, PresenceError> {
        let now = now_ms();
        Ok(self
            .users
            .iter()
            .filter(|e| e.value().iter().any(|d| self.live(d, now)))
            .count())
    }

    async fn clear_node(&self, node_id: &str) -> Result<usize, PresenceError> {
        let mut removed = 0;
        self.users.retain(|_, devices| {
            let before = devices.len();
            devices.retain(|d| d.node_id != node_id);
            removed += before - devices.len();
            !devices.is_empty()
        });
        Ok(removed)
    }

    async fn health(&self) -> Result<(), PresenceError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(conn: &str, node: &str, last_seen_ms: i64) -> Device {
        Device {
            connection_id: conn.into(),
            node_id: node.into(),
            last_seen_ms,
        }
    }

    #[tokio::test]
    async fn many_devices_many_nodes() {
        let p = MemoryPresence::new(300);
        let now = now_ms();
        p.connect("u", device("c1", "n1", now)).await.unwrap();
        p.connect("u", device("c2", "n2", now)).await.unwrap();
        p.connect("v", device("c3", "n1", now)).await.unwrap();
        assert_eq!(p.devices("u").await.unwrap().len(), 2);
        assert_eq!(p.online_user_count().await.unwrap(), 2);

        p.disconnect("u", "c1").await.unwrap();
        assert_eq!(p.devices("u").await.unwrap(), vec![device("c2", "n2", now)]);
        assert_eq!(p.clear_node("n2").await.unwrap(), 1);
        assert!(p.devices("u").await.unwrap().is_empty());
        assert_eq!(p.online_user_count().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn stale_devices_read_offline_until_refreshed() {
        let p = MemoryPresence::new(1);
        p.connect("u", device("c1", "n1", now_ms() - 5_000))
            .await
            .unwrap();
        assert!(p.devices("u").await.unwrap().is_empty());
        assert_eq!(p.online_user_count().await.unwrap(), 0);
        assert_eq!(
            p.refresh(&[("u", "c1"), ("u", "gone"), ("nobody", "c9")])
                .await
                .unwrap(),
            [1, 2],
            "the unknown ones, by index"
        );
        assert_eq!(p.devices("u").await.unwrap().len(), 1);
    }
}
