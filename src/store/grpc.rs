//! The MessageService over gRPC (tonic): the client a node uses when
//! `store.url = "grpc://host:port"`, and the service `chatd message-service` runs in front of
//! any [`Store`]. Every call has a deadline (`store.timeout_ms`) and transient failures are
//! retried a bounded number of times (`store.retries`); saves are idempotent, so a retry after
//! a lost answer stores nothing twice.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::backoff::Backoff;

use super::{
    ChatPage, EntryKind, HistoryMessage, InboxEntry, InboxPage, Member, MemberChange, NewMessage,
    Receipt, Role, SaveOutcome, Store, StoreError, StoredMessage, MAX_HISTORY_PAGE, MAX_PAGE,
};

/// Generated from `message_service.proto`.
pub mod pb {
    tonic::include_proto!("chatd.v1");
}

use pb::message_service_client::MessageServiceClient;
use pb::message_service_server::{MessageService, MessageServiceServer};

fn to_pb(m: &StoredMessage) -> pb::ChatMessage {
    let n = &m.message;
    pb::ChatMessage {
        message_id: n.message_id.clone(),
        sender_id: n.sender_id.clone(),
        receiver_id: n.receiver_id.clone(),
        chat_id: n.chat_id.clone(),
        content: n.content.clone(),
        timestamp: n.timestamp,
        temp_message_id: n.temp_message_id.clone().unwrap_or_default(),
        read_at: m.read_at.unwrap_or(0),
        receiver_seq: m.receiver_seq,
        sender_seq: m.sender_seq,
        group: n.group,
        member_seqs: m
            .member_seqs
            .iter()
            .map(|(u, seq)| pb::MemberSeq {
                user_id: u.clone(),
                seq: *seq,
            })
            .collect(),
    }
}

fn from_pb(mut m: pb::ChatMessage) -> StoredMessage {
    let member_seqs = std::mem::take(&mut m.member_seqs);
    StoredMessage {
        read_at: (m.read_at != 0).then_some(m.read_at),
        receiver_seq: m.receiver_seq,
        sender_seq: m.sender_seq,
        member_seqs: member_seqs
            .into_iter()
            .map(|s| (s.user_id, s.seq))
            .collect(),
        message: Arc::new(new_from_pb(m)),
    }
}

/// The message a node asks to save (its places are the store's to give).
fn new_from_pb(m: pb::ChatMessage) -> NewMessage {
    NewMessage {
        message_id: m.message_id,
        sender_id: m.sender_id,
        receiver_id: m.receiver_id,
        chat_id: m.chat_id,
        content: m.content,
        timestamp: m.timestamp,
        temp_message_id: (!m.temp_message_id.is_empty()).then_some(m.temp_message_id),
        group: m.group,
    }
}

fn entry_to_pb(e: &InboxEntry) -> pb::InboxEntry {
    let kind = match e.kind {
        EntryKind::Message => pb::inbox_entry::Kind::Message,
        EntryKind::Receipt => pb::inbox_entry::Kind::ReadReceipt,
    };
    pb::InboxEntry {
        seq: e.seq,
        kind: kind.into(),
        message: Some(to_pb(&e.message)),
        reader_id: e.reader_id.clone(),
    }
}

fn entry_from_pb(e: pb::InboxEntry) -> Option<InboxEntry> {
    let kind = match e.kind() {
        pb::inbox_entry::Kind::Message => EntryKind::Message,
        pb::inbox_entry::Kind::ReadReceipt => EntryKind::Receipt,
    };
    let message = from_pb(e.message?);
    // A service older than groups names no reader: a receipt's reader was its receiver.
    let reader_id = match kind {
        EntryKind::Receipt if e.reader_id.is_empty() => message.message.receiver_id.clone(),
        _ => e.reader_id,
    };
    Some(InboxEntry {
        seq: e.seq,
        kind,
        message,
        reader_id,
    })
}

/// Most messages one `SaveMessages` call may carry.
pub const MAX_BATCH: usize = 1024;
/// Most users one `LatestSeqs` call asks about.
pub const MAX_LATEST: usize = 10_000;

/// How long an endpoint that failed at the connection level is passed over by later calls
/// (while another answers): one refused connect costs little, but a call per message to a
/// dead service would double every save's latency.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// The pause between rounds of attempts over every service.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// One MessageService of those `store.url` lists.
struct Upstream {
    client: MessageServiceClient<Channel>,
    url: String,
    /// When this one failed last, in ms since [`GrpcStore::started`]; 0 when it answered since.
    down_since_ms: AtomicU64,
}

/// The node's side: a [`Store`] that calls one or several MessageServices. Calls take turns
/// over the services; a call that fails in a way a retry may cure goes at once to the next
/// service (each call is idempotent), and a service that failed is passed over for
/// [`DOWN_FOR`] while another answers. The node's store calls are sequential (one batch at a
/// time), so a failover never reorders saves.
pub struct GrpcStore {
    services: Vec<Upstream>,
    /// Whose turn it is.
    next: AtomicUsize,
    started: std::time::Instant,
    /// The configured list, for messages about all of them.
    url: String,
    retries: u32,
}

impl GrpcStore {
    /// Connects lazily: a service that is down at start-up is reported by health and by the
    /// first send, not by a node that refuses to start. `services`: the `grpc://host:port` of
    /// each MessageService, as config validation parsed them from `store.url`.
    pub fn new(services: &[String], timeout: Duration, retries: u32) -> Result<Self, StoreError> {
        let mut upstreams = Vec::with_capacity(services.len());
        for one in services {
            let http = one.replacen("grpc://", "http://", 1);
            let endpoint = Endpoint::from_shared(http)
                .map_err(|e| StoreError::Unavailable(format!("store.url {one:?}: {e}")))?
                .connect_timeout(timeout)
                .timeout(timeout);
            upstreams.push(Upstream {
                client: MessageServiceClient::new(endpoint.connect_lazy()),
                url: one.clone(),
                down_since_ms: AtomicU64::new(0),
            });
        }
        if upstreams.is_empty() {
            return Err(StoreError::Unavailable(
                "store.url names no MessageService".into(),
            ));
        }
        Ok(Self {
            services: upstreams,
            next: AtomicUsize::new(0),
            started: std::time::Instant::now(),
            url: services.join(","),
            retries,
        })
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "answered".
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// The services in the order this call tries them: its turn first, those that failed in
    /// the last [`DOWN_FOR`] last.
    fn order(&self) -> Vec<usize> {
        let n = self.services.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let down = |i: usize| {
            let since = self.services[i].down_since_ms.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) < DOWN_FOR.as_millis() as u64
        };
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        order.sort_by_key(|&i| down(i));
        order
    }

    /// Runs `call` on each service in turn until one answers, for up to `retries` more
    /// rounds, backing off between rounds. Errors a retry cannot cure (an unknown message, a
    /// refused reader) come back at once.
    async fn with_retries<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: FnMut(MessageServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        self.with_retries_or(what, call, |status, url| from_status(status, url, what))
            .await
    }

    /// [`with_retries`](Self::with_retries), with `refused` making the error of an answer a
    /// retry cannot change.
    async fn with_retries_or<T, F, Fut>(
        &self,
        what: &str,
        mut call: F,
        refused: impl Fn(Status, &str) -> StoreError,
    ) -> Result<T, StoreError>
    where
        F: FnMut(MessageServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let mut round = 0;
        loop {
            let mut last = None;
            for i in self.order() {
                let service = &self.services[i];
                match call(service.client.clone()).await {
                    Ok(response) => {
                        if service.down_since_ms.swap(0, Ordering::Relaxed) != 0 {
                            tracing::info!(service = %service.url, "MessageService answers again");
                        }
                        return Ok(response.into_inner());
                    }
                    Err(status) if transient(&status) => {
                        let was = service.down_since_ms.swap(self.now_ms(), Ordering::Relaxed);
                        if was == 0 && self.services.len() > 1 {
                            tracing::warn!(
                                service = %service.url,
                                "MessageService failed ({what}: {status}); calls go to the others"
                            );
                        }
                        last = Some(from_status(status, &service.url, what));
                    }
                    Err(status) => return Err(refused(status, &service.url)),
                }
            }
            let err =
                last.unwrap_or_else(|| StoreError::Unavailable(format!("{what}: no service")));
            if round >= self.retries {
                return Err(err);
            }
            RETRY.wait(round).await;
            round += 1;
        }
    }
}

/// A failure another attempt (on this service or another) may not meet.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Aborted
            | Code::Cancelled
    )
}

/// A group call's refusal, with the ids the call was about (`by` made it, `user` is the
/// member it was about).
fn group_refusal(status: Status, url: &str, group: &str, by: &str, user: &str) -> StoreError {
    let (g, message) = (group.to_string(), status.message().to_string());
    match status.code() {
        Code::NotFound => StoreError::NoSuchGroup(g),
        Code::AlreadyExists => StoreError::GroupExists(g),
        Code::ResourceExhausted => StoreError::GroupFull(g, max_in(&message)),
        Code::FailedPrecondition => StoreError::LastAdmin(user.to_string(), g),
        // Which of the two users a refusal is about, from the service's own wording of it
        // (`StoreError`'s messages, the same code on both sides).
        Code::PermissionDenied if message.contains("not an admin") => {
            StoreError::NotAdmin(by.to_string(), g)
        }
        Code::PermissionDenied if message.starts_with(&format!("user {user:?} is not")) => {
            StoreError::NotInGroup(user.to_string(), g)
        }
        Code::PermissionDenied => StoreError::NotInGroup(by.to_string(), g),
        _ => from_status(status, url, "group call"),
    }
}

/// The cap a `GroupFull` message names ("more than N members"); 0 when it names none.
fn max_in(message: &str) -> usize {
    message
        .split("more than ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn members_from_pb(reply: pb::GroupMembers) -> Vec<Member> {
    reply
        .members
        .into_iter()
        .map(|m| Member {
            role: Role::parse(&m.role).unwrap_or(Role::Member),
            user_id: m.user_id,
        })
        .collect()
}

fn members_to_pb(members: Vec<Member>) -> pb::GroupMembers {
    pb::GroupMembers {
        members: members
            .into_iter()
            .map(|m| pb::GroupMember {
                user_id: m.user_id,
                role: m.role.as_str().to_string(),
            })
            .collect(),
    }
}

fn from_status(status: Status, url: &str, what: &str) -> StoreError {
    match status.code() {
        Code::NotFound => StoreError::UnknownMessage(status.message().to_string(), String::new()),
        Code::PermissionDenied => StoreError::NotReceiver(status.message().to_string()),
        _ => StoreError::Unavailable(format!("MessageService {url} {what}: {}", status.message())),
    }
}

#[async_trait]
impl Store for GrpcStore {
    /// One `SaveMessages` call of one message: a refusal keeps its kind (`SaveResult.code`).
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        self.save_batch(vec![message])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(StoreError::Unavailable(
                    "MessageService answered no save".into(),
                ))
            })
    }

    async fn save_batch(&self, messages: Vec<NewMessage>) -> Vec<Result<SaveOutcome, StoreError>> {
        let n = messages.len();
        let request = pb::SaveMessagesRequest {
            messages: messages
                .into_iter()
                .map(|m| to_pb(&StoredMessage::unsequenced(m)))
                .collect(),
        };
        let reply = self
            .with_retries("save messages", |mut c| {
                let request = request.clone();
                async move { c.save_messages(Request::new(request)).await }
            })
            .await;
        let failed = |e: &StoreError| {
            (0..n)
                .map(|_| Err(StoreError::Unavailable(e.to_string())))
                .collect()
        };
        let results = match reply {
            Ok(r) if r.results.len() == n => r.results,
            Ok(r) => {
                let why = format!(
                    "MessageService {}: {} answers to {n} saves",
                    self.url,
                    r.results.len()
                );
                return failed(&StoreError::Unavailable(why));
            }
            Err(e) => return failed(&e),
        };
        results
            .into_iter()
            .zip(&request.messages)
            .map(|(r, asked)| match r.message {
                Some(m) if r.error.is_empty() => Ok(if r.duplicate {
                    SaveOutcome::Duplicate(from_pb(m))
                } else {
                    SaveOutcome::Saved(from_pb(m))
                }),
                // A group's refusals keep their kind: the sender is told why, not "retry".
                _ => Err(match Code::from_i32(r.code) {
                    Code::NotFound if asked.group => {
                        StoreError::NoSuchGroup(asked.receiver_id.clone())
                    }
                    Code::PermissionDenied if asked.group => {
                        StoreError::NotInGroup(asked.sender_id.clone(), asked.receiver_id.clone())
                    }
                    _ => StoreError::Unavailable(format!(
                        "MessageService {} save: {}",
                        self.url, r.error
                    )),
                }),
            })
            .collect()
    }

    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Receipt, StoreError> {
        let request = pb::MarkReadRequest {
            reader_id: reader_id.to_string(),
            chat_id: chat_id.to_string(),
            message_id: message_id.to_string(),
        };
        let reply = self
            .with_retries("mark read", |mut c| {
                let request = request.clone();
                async move { c.mark_read(Request::new(request)).await }
            })
            .await
            .map_err(|e| match e {
                StoreError::UnknownMessage(..) => {
                    StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string())
                }
                e => e,
            })?;
        let message = reply
            .message
            .map(from_pb)
            .ok_or_else(|| StoreError::Unavailable("MessageService returned no message".into()))?;
        Ok(Receipt {
            message,
            seq: reply.receipt_seq,
            reader_id: reader_id.to_string(),
        })
    }

    async fn fetch(
        &self,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let request = pb::FetchInboxRequest {
            user_id: user_id.to_string(),
            after_seq: after,
            limit: limit.min(MAX_PAGE) as u32,
        };
        let reply = self
            .with_retries("fetch inbox", |mut c| {
                let request = request.clone();
                async move { c.fetch_inbox(Request::new(request)).await }
            })
            .await?;
        Ok(InboxPage {
            entries: reply
                .entries
                .into_iter()
                .filter_map(entry_from_pb)
                .collect(),
            oldest: reply.oldest_seq,
            latest: reply.latest_seq,
        })
    }

    async fn fetch_chat(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ChatPage, StoreError> {
        let request = pb::FetchChatRequest {
            user_id: user_id.to_string(),
            chat_id: chat_id.to_string(),
            before: before.unwrap_or_default().to_string(),
            limit: limit.min(MAX_HISTORY_PAGE) as u32,
        };
        let reply = self
            .with_retries("fetch chat history", |mut c| {
                let request = request.clone();
                async move { c.fetch_chat(Request::new(request)).await }
            })
            .await
            .map_err(|e| match e {
                StoreError::UnknownMessage(..) => StoreError::UnknownMessage(
                    before.unwrap_or_default().to_string(),
                    chat_id.to_string(),
                ),
                StoreError::NotReceiver(_) => StoreError::NotMember(user_id.into(), chat_id.into()),
                e => e,
            })?;
        Ok(ChatPage {
            messages: reply
                .entries
                .into_iter()
                .filter_map(|e| {
                    Some(HistoryMessage {
                        message: from_pb(e.message?),
                        seq: e.seq,
                    })
                })
                .collect(),
            more: reply.more,
        })
    }

    async fn latest_seqs(&self, user_ids: &[&str]) -> Result<Vec<u64>, StoreError> {
        let request = pb::LatestSeqsRequest {
            user_ids: user_ids.iter().map(|u| u.to_string()).collect(),
        };
        let reply = self
            .with_retries("latest seqs", |mut c| {
                let request = request.clone();
                async move { c.latest_seqs(Request::new(request)).await }
            })
            .await?;
        if reply.latest_seqs.len() != user_ids.len() {
            return Err(StoreError::Unavailable(format!(
                "MessageService answered {} seqs for {} users",
                reply.latest_seqs.len(),
                user_ids.len()
            )));
        }
        Ok(reply.latest_seqs)
    }

    /// Up while any of the services answers (each is asked, at once); down with every
    /// service's answer otherwise.
    async fn create_group(
        &self,
        group_id: &str,
        creator: &str,
        members: &[String],
    ) -> Result<Vec<Member>, StoreError> {
        let request = pb::CreateGroupRequest {
            group_id: group_id.to_string(),
            creator: creator.to_string(),
            members: members.to_vec(),
        };
        let reply = self
            .with_retries_or(
                "create group",
                |mut c| {
                    let request = request.clone();
                    async move { c.create_group(Request::new(request)).await }
                },
                |status, url| group_refusal(status, url, group_id, creator, creator),
            )
            .await?;
        Ok(members_from_pb(reply))
    }

    async fn change_member(
        &self,
        group_id: &str,
        by: &str,
        user_id: &str,
        change: MemberChange,
    ) -> Result<Vec<Member>, StoreError> {
        let request = pb::ChangeMemberRequest {
            group_id: group_id.to_string(),
            by: by.to_string(),
            user_id: user_id.to_string(),
            change: match change {
                MemberChange::Add(role) => role.as_str().to_string(),
                MemberChange::Remove => "remove".to_string(),
            },
        };
        let reply = self
            .with_retries_or(
                "change group member",
                |mut c| {
                    let request = request.clone();
                    async move { c.change_member(Request::new(request)).await }
                },
                |status, url| group_refusal(status, url, group_id, by, user_id),
            )
            .await?;
        Ok(members_from_pb(reply))
    }

    async fn members(&self, group_id: &str, asking: &str) -> Result<Vec<Member>, StoreError> {
        let request = pb::ListMembersRequest {
            group_id: group_id.to_string(),
            asking: asking.to_string(),
        };
        let reply = self
            .with_retries_or(
                "list group members",
                |mut c| {
                    let request = request.clone();
                    async move { c.list_members(Request::new(request)).await }
                },
                |status, url| group_refusal(status, url, group_id, asking, asking),
            )
            .await?;
        Ok(members_from_pb(reply))
    }

    async fn health(&self) -> Result<(), StoreError> {
        let answers = futures_util::future::join_all(self.services.iter().map(|s| async move {
            let mut client = s.client.clone();
            client
                .health(Request::new(pb::HealthRequest {}))
                .await
                .map_err(|status| from_status(status, &s.url, "health"))
        }))
        .await;
        if answers.iter().any(Result::is_ok) {
            return Ok(());
        }
        let why: Vec<String> = answers
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        Err(StoreError::Unavailable(why.join("; ")))
    }

    fn name(&self) -> &'static str {
        "grpc"
    }
}

/// The service's side: a MessageService in front of any [`Store`].
pub struct Service {
    store: Arc<dyn Store>,
}

impl Service {
    pub fn new(store: Arc<dyn Store>) -> MessageServiceServer<Service> {
        MessageServiceServer::new(Service { store })
    }
}

fn to_status(e: StoreError) -> Status {
    match e {
        StoreError::UnknownMessage(..) | StoreError::NoSuchGroup(_) => {
            Status::not_found(e.to_string())
        }
        StoreError::NotReceiver(_)
        | StoreError::NotMember(..)
        | StoreError::NotInGroup(..)
        | StoreError::NotAdmin(..) => Status::permission_denied(e.to_string()),
        StoreError::GroupExists(_) => Status::already_exists(e.to_string()),
        StoreError::GroupFull(..) => Status::resource_exhausted(e.to_string()),
        StoreError::LastAdmin(..) => Status::failed_precondition(e.to_string()),
        StoreError::Unavailable(_) | StoreError::Redis(_) => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl MessageService for Service {
    async fn save_message(
        &self,
        request: Request<pb::SaveMessageRequest>,
    ) -> Result<Response<pb::SaveMessageResponse>, Status> {
        let message = request
            .into_inner()
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        if message.message_id.is_empty() || message.sender_id.is_empty() {
            return Err(Status::invalid_argument(
                "message_id and sender_id are required",
            ));
        }
        let (stored, duplicate) = match self
            .store
            .save(new_from_pb(message))
            .await
            .map_err(to_status)?
        {
            SaveOutcome::Saved(m) => (m, false),
            SaveOutcome::Duplicate(m) => (m, true),
        };
        Ok(Response::new(pb::SaveMessageResponse {
            message: Some(to_pb(&stored)),
            duplicate,
        }))
    }

    async fn save_messages(
        &self,
        request: Request<pb::SaveMessagesRequest>,
    ) -> Result<Response<pb::SaveMessagesResponse>, Status> {
        let messages = request.into_inner().messages;
        if messages.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} messages in one call, got {}",
                messages.len()
            )));
        }
        if messages
            .iter()
            .any(|m| m.message_id.is_empty() || m.sender_id.is_empty())
        {
            return Err(Status::invalid_argument(
                "every message needs its message_id and sender_id",
            ));
        }
        let saved = self
            .store
            .save_batch(messages.into_iter().map(new_from_pb).collect())
            .await;
        let results = saved
            .into_iter()
            .map(|r| match r {
                Ok(SaveOutcome::Saved(m)) => pb::SaveResult {
                    message: Some(to_pb(&m)),
                    duplicate: false,
                    error: String::new(),
                    code: 0,
                },
                Ok(SaveOutcome::Duplicate(m)) => pb::SaveResult {
                    message: Some(to_pb(&m)),
                    duplicate: true,
                    error: String::new(),
                    code: 0,
                },
                Err(e) => {
                    let error = e.to_string();
                    pb::SaveResult {
                        message: None,
                        duplicate: false,
                        code: to_status(e).code().into(),
                        error,
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::SaveMessagesResponse { results }))
    }

    async fn mark_read(
        &self,
        request: Request<pb::MarkReadRequest>,
    ) -> Result<Response<pb::MarkReadResponse>, Status> {
        let r = request.into_inner();
        let receipt = self
            .store
            .mark_read(&r.reader_id, &r.chat_id, &r.message_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::MarkReadResponse {
            message: Some(to_pb(&receipt.message)),
            receipt_seq: receipt.seq,
        }))
    }

    async fn fetch_inbox(
        &self,
        request: Request<pb::FetchInboxRequest>,
    ) -> Result<Response<pb::FetchInboxResponse>, Status> {
        let r = request.into_inner();
        if r.user_id.is_empty() {
            return Err(Status::invalid_argument("user_id is required"));
        }
        let page = self
            .store
            .fetch(&r.user_id, r.after_seq, r.limit as usize)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::FetchInboxResponse {
            entries: page.entries.iter().map(entry_to_pb).collect(),
            oldest_seq: page.oldest,
            latest_seq: page.latest,
        }))
    }

    async fn fetch_chat(
        &self,
        request: Request<pb::FetchChatRequest>,
    ) -> Result<Response<pb::FetchChatResponse>, Status> {
        let r = request.into_inner();
        if r.user_id.is_empty() || r.chat_id.is_empty() {
            return Err(Status::invalid_argument("user_id and chat_id are required"));
        }
        let before = Some(r.before.as_str()).filter(|b| !b.is_empty());
        let page = self
            .store
            .fetch_chat(&r.user_id, &r.chat_id, before, r.limit as usize)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::FetchChatResponse {
            entries: page
                .messages
                .iter()
                .map(|h| pb::HistoryEntry {
                    seq: h.seq,
                    message: Some(to_pb(&h.message)),
                })
                .collect(),
            more: page.more,
        }))
    }

    async fn latest_seqs(
        &self,
        request: Request<pb::LatestSeqsRequest>,
    ) -> Result<Response<pb::LatestSeqsResponse>, Status> {
        let r = request.into_inner();
        if r.user_ids.len() > MAX_LATEST {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LATEST} user ids a call"
            )));
        }
        let users: Vec<&str> = r.user_ids.iter().map(String::as_str).collect();
        let latest_seqs = self.store.latest_seqs(&users).await.map_err(to_status)?;
        Ok(Response::new(pb::LatestSeqsResponse { latest_seqs }))
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::GroupMembers>, Status> {
        let r = request.into_inner();
        if r.group_id.is_empty() || r.creator.is_empty() {
            return Err(Status::invalid_argument(
                "group_id and creator are required",
            ));
        }
        let members = self
            .store
            .create_group(&r.group_id, &r.creator, &r.members)
            .await
            .map_err(to_status)?;
        Ok(Response::new(members_to_pb(members)))
    }

    async fn change_member(
        &self,
        request: Request<pb::ChangeMemberRequest>,
    ) -> Result<Response<pb::GroupMembers>, Status> {
        let r = request.into_inner();
        let change = match r.change.as_str() {
            "remove" => MemberChange::Remove,
            role => MemberChange::Add(Role::parse(role).ok_or_else(|| {
                Status::invalid_argument("change must be \"admin\", \"member\" or \"remove\"")
            })?),
        };
        if r.group_id.is_empty() || r.by.is_empty() || r.user_id.is_empty() {
            return Err(Status::invalid_argument(
                "group_id, by and user_id are required",
            ));
        }
        let members = self
            .store
            .change_member(&r.group_id, &r.by, &r.user_id, change)
            .await
            .map_err(to_status)?;
        Ok(Response::new(members_to_pb(members)))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::GroupMembers>, Status> {
        let r = request.into_inner();
        let members = self
            .store
            .members(&r.group_id, &r.asking)
            .await
            .map_err(to_status)?;
        Ok(Response::new(members_to_pb(members)))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.store.health().await.map_err(to_status)?;
        Ok(Response::new(pb::HealthResponse {
            backend: self.store.name().to_string(),
        }))
    }
}
