//! `chatd bench --cluster --group N`: a group of N members spread over both nodes, one of them
//! (on node A) sending to it. Each message is stored once per member and reaches each member's
//! device, so the run measures what one message to a group costs per member: the figures of
//! `cluster` (CPU, Redis commands) come out per delivery.

use anyhow::{bail, Context};
use serde_json::json;

use super::cluster::To;
use crate::client::Client;

const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Makes the group over REST on node A and connects its members: the sender on node A, the
/// others alternately on node B and node A. Answers the group, the sender, the members.
pub(super) async fn join(
    urls: &[String],
    run_id: i64,
    members: u16,
) -> anyhow::Result<(To, Client, Vec<Client>)> {
    let group = format!("bench{run_id}-group");
    let sender = format!("bench{run_id}-g0");
    let others: Vec<String> = (1..members)
        .map(|i| format!("bench{run_id}-g{i}"))
        .collect();
    let body = json!({"groupId": group, "members": others}).to_string();
    let path = format!("/api/groups?userId={sender}");
    let (status, answer) = crate::http::send(
        &urls[0],
        hyper::Method::POST,
        &path,
        Some(&body),
        CONNECT_WAIT,
    )
    .await
    .context("creating the bench's group")?;
    if status != 201 {
        bail!("creating the bench's group answered {status}: {answer}");
    }
    let mut devices = Vec::with_capacity(others.len());
    for (i, member) in others.iter().enumerate() {
        let node = &urls[if i % 2 == 0 { 1 } else { 0 }];
        devices.push(Client::connect(node, member, CONNECT_WAIT).await?);
    }
    let sender = Client::connect(&urls[0], &sender, CONNECT_WAIT).await?;
    Ok((To::Group(group), sender, devices))
}
