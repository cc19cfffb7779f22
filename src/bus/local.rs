//! In-process bus: one bounded queue per node in this process. Offline-push events go to the
//! log (target `chatd::offline_push`), the embedded stand-in for a push service.

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::{Bus, BusError, Envelope, Inbound, OfflinePush, Publish};

/// Envelopes waiting for one node; a full queue makes publishers wait, which is the
/// back-pressure a broker would give.
const QUEUE_LEN: usize = 4096;

#[derive(Default)]
pub struct LocalBus {
    nodes: DashMap<String, mpsc::Sender<Inbound>>,
}

impl LocalBus {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn publish(&self, node_id: &str, envelope: Envelope) -> Publish {
        // Cloned out so the map's shard lock is not held by the returned future.
        let Some(tx) = self.nodes.get(node_id).map(|tx| tx.clone()) else {
            return Box::pin(std::future::ready(Err(BusError::UnknownNode(
                node_id.to_string(),
            ))));
        };
        let closed = || BusError::Closed(node_id.to_string());
        match tx.try_send(Inbound::Envelope(envelope)) {
            Ok(()) => Box::pin(std::future::ready(Ok(()))),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Box::pin(std::future::ready(Err(closed())))
            }
            // Full: the publisher waits for room (the back-pressure a broker would give); a
            // frame that overtakes another meanwhile is put back in order by its seq.
            Err(mpsc::error::TrySendError::Full(inbound)) => {
                let closed = closed();
                Box::pin(async move { tx.send(inbound).await.map_err(|_| closed) })
            }
        }
    }

    async fn offline_push(&self, event: OfflinePush) -> Result<(), BusError> {
        tracing::info!(
            target: "chatd::offline_push",
            user = %event.user_id,
            sender = %event.sender_id,
            chat = %event.chat_id,
            message_id = %event.message_id,
            count = event.count,
            "offline push: user has no device online; message waits in the store"
        );
        Ok(())
    }

    async fn subscribe(&self, node_id: &str) -> Result<mpsc::Receiver<Inbound>, BusError> {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        self.nodes.insert(node_id.to_string(), tx);
        Ok(rx)
    }

    async fn unsubscribe(&self, node_id: &str) {
        self.nodes.remove(node_id);
    }

    async fn health(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{FrameKind, Recipient};

    #[tokio::test]
    async fn delivers_only_to_the_target_node() {
        let bus = LocalBus::new();
        let mut n1 = bus.subscribe("n1").await.unwrap();
        let mut n2 = bus.subscribe("n2").await.unwrap();
        let env = Envelope {
            from_node: "n1".into(),
            kind: FrameKind::Chat,
            recipients: vec![Recipient {
                user_id: "b".into(),
                except_connection: None,
                seq: 1,
                frame: "{}".into(),
            }],
        };
        bus.publish("n2", env.clone()).await.unwrap();
        assert_eq!(n2.recv().await.unwrap(), Inbound::Envelope(env.clone()));
        assert!(n1.try_recv().is_err());
        assert!(matches!(
            bus.publish("n9", env.clone()).await,
            Err(BusError::UnknownNode(_))
        ));
        bus.unsubscribe("n2").await;
        assert!(bus.publish("n2", env).await.is_err());
    }
}
