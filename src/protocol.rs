//! The WebSocket protocol: client frames parsed and validated into [`ClientFrame`], server
//! frames as [`ServerFrame`], and the stable error codes clients can rely on.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Longest `chatId`, `messageId` or `tempMessageId`, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest user id; ids are `[A-Za-z0-9_.:@-]{1,64}`.
pub const MAX_USER_ID_CHARS: usize = 64;
/// Messages in a page of history when `limit` is not given; at most
/// [`crate::store::MAX_HISTORY_PAGE`].
pub const HISTORY_PAGE: usize = 50;

/// Stable codes of `ERROR` frames. Clients match on these, so they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame is not JSON.
    InvalidJson,
    /// JSON, but not an object, or not a frame this server can read.
    InvalidFrame,
    /// `type` names no frame this server knows.
    UnknownType,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type, or a value outside its format or length.
    InvalidField,
    /// `content` is empty or only whitespace.
    EmptyContent,
    /// `content` is longer than `server.max_content_chars`.
    ContentTooLong,
    /// The frame claims to come from another user.
    Forbidden,
    /// Content moderation refused the message.
    ContentRejected,
    /// The message store did not accept the message; it was not sent. Retry with the same
    /// `tempMessageId`.
    StoreUnavailable,
    /// A read receipt names a message the store does not know.
    UnknownMessage,
    /// The connection sends faster than `server.rate_limit_per_sec`; the frame was dropped.
    RateLimited,
    /// The cursor of `?since=` or `SYNC` is older than the inbox keeps: the entries between
    /// it and the oldest kept are gone (`missedFrom`..`missedTo`). The client pages back
    /// through its chats' history (`HISTORY`) for them; the replay goes on from the oldest
    /// kept entry.
    SyncTooOld,
    /// The cursor of `?since=` or `SYNC` is beyond the newest seq of the inbox (the store was
    /// reset, or the cursor comes from another cluster); delivery goes on from the newest.
    CursorAhead,
    /// A message, typing or member change for a group that does not exist.
    UnknownGroup,
    /// A group with that id exists already.
    GroupExists,
    /// The group has `store.group_max_members` members already.
    GroupFull,
    /// The group's last admin may not leave or step down while others remain.
    LastAdmin,
}

/// A frame the client got wrong, answered with `ERROR`; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// Echoed so the client knows which of its sends failed.
    pub temp_message_id: Option<String>,
    /// `SYNC_TOO_OLD`: the first and last seq of the inbox the device missed for good (as
    /// `missedFrom`, `missedTo`), so it can page back through its chats' history for them.
    pub missed: Option<(u64, u64)>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            temp_message_id: None,
            missed: None,
        }
    }
}

/// A validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Chat(ChatSend),
    Heartbeat,
    ReadReceipt {
        chat_id: String,
        message_id: String,
        /// The original sender, as the client believes; the store's record wins.
        receiver_id: Option<String>,
    },
    Typing {
        /// A user, or with `group` a group (then also the `chat_id`).
        receiver_id: String,
        chat_id: String,
        typing: bool,
        group: bool,
    },
    /// Replay the inbox after `since`, then go on live.
    Sync {
        since: u64,
    },
    /// A page of a chat's history, newest first: older than message `before`, or the newest.
    History {
        chat_id: String,
        before: Option<String>,
        limit: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSend {
    /// A user, or with `group` a group (`groupId`; then also the `chat_id`).
    pub receiver_id: String,
    pub chat_id: String,
    pub content: String,
    pub temp_message_id: Option<String>,
    pub group: bool,
}

/// What parsing needs to know about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ParseContext<'a> {
    /// The connection's user: the only sender it may claim.
    pub user_id: &'a str,
    pub max_content_chars: usize,
}

/// The frame as it arrives; every field optional so that absence gets a precise error.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    receiver_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    group_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sender_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    chat_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    temp_message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message_id: Option<Cow<'a, str>>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    before: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
}

const STRING_FIELDS: [&str; 9] = [
    "type",
    "receiverId",
    "groupId",
    "senderId",
    "chatId",
    "content",
    "tempMessageId",
    "messageId",
    "before",
];

pub fn is_valid_user_id(id: &str) -> bool {
    (1..=MAX_USER_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Parses and validates one text frame from the connection's user.
pub fn parse_client_frame(text: &str, ctx: ParseContext<'_>) -> Result<ClientFrame, FrameError> {
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| diagnose(text, e))?;
    let temp_message_id = wire.temp_message_id.as_deref().map(str::to_owned);
    let with_temp = |mut e: FrameError| {
        e.temp_message_id = temp_message_id.clone();
        e
    };

    let kind = wire
        .kind
        .as_deref()
        .ok_or_else(|| FrameError::new(ErrorCode::MissingField, "missing field `type`"))?;
    if let Some(sender) = wire.sender_id.as_deref() {
        if sender != ctx.user_id {
            return Err(with_temp(FrameError::new(
                ErrorCode::Forbidden,
                format!(
                    "senderId {sender:?} is not this connection's user {:?}; omit senderId",
                    ctx.user_id
                ),
            )));
        }
    }
    match kind {
        "CHAT_MESSAGE" => {
            let (receiver_id, chat_id, group) = addressee(&wire).map_err(with_temp)?;
            if let Some(t) = &temp_message_id {
                check_id(t, "tempMessageId").map_err(with_temp)?;
            }
            let content = wire.content.as_deref().ok_or_else(|| {
                with_temp(FrameError::new(
                    ErrorCode::MissingField,
                    "missing field `content`",
                ))
            })?;
            if content.trim().is_empty() {
                return Err(with_temp(FrameError::new(
                    ErrorCode::EmptyContent,
                    "content is empty; send at least one visible character",
                )));
            }
            let chars = content.chars().count();
            if chars > ctx.max_content_chars {
                return Err(with_temp(FrameError::new(
                    ErrorCode::ContentTooLong,
                    format!(
                        "content has {chars} characters; the limit is {}",
                        ctx.max_content_chars
                    ),
                )));
            }
            Ok(ClientFrame::Chat(ChatSend {
                receiver_id,
                chat_id,
                content: content.to_owned(),
                temp_message_id,
                group,
            }))
        }
        "HEARTBEAT" => Ok(ClientFrame::Heartbeat),
        "READ_RECEIPT" => {
            let chat_id = id_field(&wire.chat_id, "chatId")?;
            let message_id = id_field(&wire.message_id, "messageId")?;
            let receiver_id = match &wire.receiver_id {
                Some(_) => Some(user_field(&wire.receiver_id, "receiverId")?),
                None => None,
            };
            Ok(ClientFrame::ReadReceipt {
                chat_id,
                message_id,
                receiver_id,
            })
        }
        "HISTORY" => {
            let chat_id = id_field(&wire.chat_id, "chatId")?;
            let before = match &wire.before {
                Some(_) => Some(id_field(&wire.before, "before")?),
                None => None,
            };
            let limit = history_limit(wire.limit)?;
            Ok(ClientFrame::History {
                chat_id,
                before,
                limit,
            })
        }
        "SYNC" => {
            let since = wire.since.ok_or_else(|| {
                FrameError::new(
                    ErrorCode::MissingField,
                    "missing field `since` (the last seq this device saw, 0 for everything)",
                )
            })?;
            Ok(ClientFrame::Sync { since })
        }
        "TYPING" => {
            let (receiver_id, chat_id, group) = addressee(&wire)?;
            let typing = match wire.content.as_deref() {
                Some("typing") => true,
                Some("stop_typing") => false,
                Some(other) => {
                    return Err(FrameError::new(
                        ErrorCode::InvalidField,
                        format!("TYPING content {other:?} must be \"typing\" or \"stop_typing\""),
                    ))
                }
                None => {
                    return Err(FrameError::new(
                        ErrorCode::MissingField,
                        "missing field `content` (\"typing\" or \"stop_typing\")",
                    ))
                }
            };
            Ok(ClientFrame::Typing {
                receiver_id,
                chat_id,
                typing,
                group,
            })
        }
        other => Err(with_temp(FrameError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown type {:?}; expected CHAT_MESSAGE, HEARTBEAT, READ_RECEIPT, TYPING, SYNC \
                 or HISTORY",
                truncate(other, 64)
            ),
        ))),
    }
}

/// A history page's size: [`HISTORY_PAGE`] when not given, else 1 to
/// [`crate::store::MAX_HISTORY_PAGE`]. Shared by the `HISTORY` frame and the REST endpoint.
pub fn history_limit(limit: Option<u64>) -> Result<usize, FrameError> {
    let max = crate::store::MAX_HISTORY_PAGE;
    match limit {
        None => Ok(HISTORY_PAGE),
        Some(n) if (1..=max as u64).contains(&n) => Ok(n as usize),
        Some(n) => Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`limit` {n} is out of range: a page holds 1 to {max} messages"),
        )),
    }
}

/// Explains why a frame did not fit [`Wire`]: not JSON, not an object, or a field of the wrong
/// type. Only runs for bad frames, so good frames are parsed once.
fn diagnose(text: &str, err: serde_json::Error) -> FrameError {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return FrameError::new(
                ErrorCode::InvalidJson,
                format!("frame is not valid JSON: {e}"),
            )
        }
    };
    let Some(object) = value.as_object() else {
        return FrameError::new(
            ErrorCode::InvalidFrame,
            "a frame must be a JSON object with a \"type\" field",
        );
    };
    for field in STRING_FIELDS {
        if let Some(v) = object.get(field) {
            if !v.is_string() && !v.is_null() {
                return FrameError::new(
                    ErrorCode::InvalidField,
                    format!("field `{field}` must be a string"),
                );
            }
        }
    }
    if object
        .get("since")
        .is_some_and(|v| !v.is_u64() && !v.is_null())
    {
        return FrameError::new(
            ErrorCode::InvalidField,
            "field `since` must be a whole number >= 0 (a seq)",
        );
    }
    if object
        .get("limit")
        .is_some_and(|v| !v.is_u64() && !v.is_null())
    {
        return FrameError::new(
            ErrorCode::InvalidField,
            "field `limit` must be a whole number (messages in a page)",
        );
    }
    FrameError::new(ErrorCode::InvalidFrame, format!("cannot read frame: {err}"))
}

fn required<'a>(value: &'a Option<Cow<'_, str>>, name: &str) -> Result<&'a str, FrameError> {
    value
        .as_deref()
        .ok_or_else(|| FrameError::new(ErrorCode::MissingField, format!("missing field `{name}`")))
}

fn user_field(value: &Option<Cow<'_, str>>, name: &str) -> Result<String, FrameError> {
    let v = required(value, name)?;
    if !is_valid_user_id(v) {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            format!(
                "`{name}` {:?} is not a user id ([A-Za-z0-9_.:@-]{{1,64}})",
                truncate(v, 80)
            ),
        ));
    }
    Ok(v.to_owned())
}

/// Who a chat message or typing is for: a user (`receiverId`, in chat `chatId`), or a group
/// (`groupId`, which is also the chat's id). Answers (receiver, chat, is a group).
fn addressee(wire: &Wire<'_>) -> Result<(String, String, bool), FrameError> {
    if wire.group_id.is_none() {
        let receiver_id = user_field(&wire.receiver_id, "receiverId")?;
        return Ok((receiver_id, id_field(&wire.chat_id, "chatId")?, false));
    }
    if wire.receiver_id.is_some() {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            "give receiverId (a user) or groupId (a group), not both",
        ));
    }
    let group_id = required(&wire.group_id, "groupId")?;
    if !is_valid_user_id(group_id) {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            format!(
                "`groupId` {:?} is not a group id ([A-Za-z0-9_.:@-]{{1,64}})",
                truncate(group_id, 80)
            ),
        ));
    }
    if wire.chat_id.as_deref().is_some_and(|c| c != group_id) {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            "a group's chatId is its groupId; omit chatId or give the same",
        ));
    }
    Ok((group_id.to_owned(), group_id.to_owned(), true))
}

fn id_field(value: &Option<Cow<'_, str>>, name: &str) -> Result<String, FrameError> {
    let v = required(value, name)?;
    check_id(v, name)?;
    Ok(v.to_owned())
}

/// Checks an id field (`chatId`, `messageId`, `tempMessageId`, ...) as every frame does;
/// the REST endpoints that take ids check them the same way.
pub fn check_id(v: &str, name: &str) -> Result<(), FrameError> {
    let len = v.chars().count();
    if len == 0 || len > MAX_ID_CHARS || v.chars().any(char::is_control) {
        return Err(FrameError::new(
            ErrorCode::InvalidField,
            format!("`{name}` must be 1-{MAX_ID_CHARS} characters without control characters"),
        ));
    }
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => Cow::Owned(format!("{}...", &s[..i])),
        None => Cow::Borrowed(s),
    }
}

/// How a message reached its receiver, as told in `MESSAGE_ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Local,
    Remote,
    LocalRemote,
    Offline,
}

impl Route {
    pub fn from_parts(local: bool, remote: bool) -> Route {
        match (local, remote) {
            (true, true) => Route::LocalRemote,
            (true, false) => Route::Local,
            (false, true) => Route::Remote,
            (false, false) => Route::Offline,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Remote => "remote",
            Route::LocalRemote => "local+remote",
            Route::Offline => "offline",
        }
    }
}

impl Serialize for Route {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Frames the server sends. Field names are camelCase as in the seed.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "SCREAMING_SNAKE_CASE",
    rename_all_fields = "camelCase"
)]
pub enum ServerFrame<'a> {
    Connected {
        user_id: &'a str,
        node_id: &'a str,
        connection_id: &'a str,
        heartbeat_interval_ms: u64,
        /// This connection's rate limit, so a client can pace itself instead of being
        /// refused (`RATE_LIMITED`) and then closed (1008).
        rate_limit_per_sec: u32,
        rate_limit_burst: u32,
    },
    ChatMessage {
        message_id: &'a str,
        sender_id: &'a str,
        /// The receiver, or the group (as `groupId` too).
        receiver_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        group_id: Option<&'a str>,
        chat_id: &'a str,
        content: &'a str,
        timestamp: i64,
        /// The message's place in this user's inbox.
        #[serde(skip_serializing_if = "is_zero")]
        seq: u64,
        /// On the copies to the sender's own devices only: the sending device's id for it.
        #[serde(skip_serializing_if = "Option::is_none")]
        temp_message_id: Option<&'a str>,
    },
    MessageAck {
        message_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        temp_message_id: Option<&'a str>,
        timestamp: i64,
        route: Route,
        /// Other nodes holding a target device that the broker could not reach; the message
        /// is stored either way. Omitted when 0.
        #[serde(skip_serializing_if = "is_zero")]
        remote_failed: usize,
        /// The message's place in the sender's inbox: the sending device has now seen it.
        #[serde(skip_serializing_if = "is_zero")]
        seq: u64,
    },
    HeartbeatAck {
        content: &'a str,
    },
    ReadReceipt {
        chat_id: &'a str,
        message_id: &'a str,
        reader_id: &'a str,
        /// The receipt's place in the sender's inbox.
        #[serde(skip_serializing_if = "is_zero")]
        seq: u64,
    },
    Typing {
        sender_id: &'a str,
        /// Typing in a group: its id (also the `chatId`).
        #[serde(skip_serializing_if = "Option::is_none")]
        group_id: Option<&'a str>,
        chat_id: &'a str,
        content: &'a str,
    },
    /// A page of a chat's history (`HISTORY`, or `GET /api/chat/history/{chatId}`).
    History {
        chat_id: &'a str,
        /// Newest first.
        messages: Vec<HistoryItem<'a>>,
        /// Older messages are kept: ask again with `before` = the last message's id.
        more: bool,
    },
    /// The replay asked for (`?since=` or `SYNC`) is done: everything up to `seq` was sent;
    /// what follows is live.
    Synced {
        seq: u64,
        replayed: u64,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        temp_message_id: Option<&'a str>,
        #[serde(skip_serializing_if = "is_zero")]
        missed_from: u64,
        #[serde(skip_serializing_if = "is_zero")]
        missed_to: u64,
    },
}

/// One message of a history page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem<'a> {
    pub message_id: &'a str,
    pub sender_id: &'a str,
    pub receiver_id: &'a str,
    pub content: &'a str,
    pub timestamp: i64,
    /// Its place in the inbox of the user who asked.
    pub seq: u64,
    /// When the receiver read it (unix ms); omitted while unread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_at: Option<i64>,
}

fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

impl ServerFrame<'_> {
    /// Serializes once; the result is shared by every device that gets the frame.
    pub fn encode(&self) -> String {
        match *self {
            // The two frames of every message, written by hand: serde's escaping of every
            // key and value was 4 % of a node's CPU. The same bytes as the derive (a test
            // holds them to it).
            ServerFrame::ChatMessage {
                message_id,
                sender_id,
                receiver_id,
                group_id,
                chat_id,
                content,
                timestamp,
                seq,
                temp_message_id,
            } => {
                let mut o = JsonObject::new("CHAT_MESSAGE", 192 + content.len());
                o.str("messageId", message_id);
                o.str("senderId", sender_id);
                o.str("receiverId", receiver_id);
                if let Some(g) = group_id {
                    o.str("groupId", g);
                }
                o.str("chatId", chat_id);
                o.str("content", content);
                o.int("timestamp", timestamp);
                if seq != 0 {
                    o.int("seq", seq);
                }
                if let Some(t) = temp_message_id {
                    o.str("tempMessageId", t);
                }
                o.finish()
            }
            ServerFrame::MessageAck {
                message_id,
                temp_message_id,
                timestamp,
                route,
                remote_failed,
                seq,
            } => {
                let mut o = JsonObject::new("MESSAGE_ACK", 160);
                o.str("messageId", message_id);
                if let Some(t) = temp_message_id {
                    o.str("tempMessageId", t);
                }
                o.int("timestamp", timestamp);
                o.str("route", route.as_str());
                if remote_failed != 0 {
                    o.int("remoteFailed", remote_failed);
                }
                if seq != 0 {
                    o.int("seq", seq);
                }
                o.finish()
            }
            // Only strings and integers: serialization cannot fail.
            _ => serde_json::to_string(self).unwrap_or_else(|e| {
                format!(
                    r#"{{"type":"ERROR","code":"INVALID_FRAME","message":"encode failed: {e}"}}"#
                )
            }),
        }
    }
}

/// A flat JSON object written straight into a string, keys in the order given. Keys are
/// this file's own camelCase names: they need no escaping.
struct JsonObject(String);

impl JsonObject {
    fn new(kind: &str, capacity: usize) -> Self {
        let mut s = String::with_capacity(capacity);
        s.push_str(r#"{"type":""#);
        s.push_str(kind);
        s.push('"');
        Self(s)
    }

    fn key(&mut self, key: &str) {
        self.0.push_str(",\"");
        self.0.push_str(key);
        self.0.push_str("\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        // What JSON requires escaped (and serde_json escapes): control characters, `"`, `\`.
        if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.0.push('"');
            self.0.push_str(value);
            self.0.push('"');
        } else {
            // A string always serializes.
            self.0
                .push_str(&serde_json::to_string(value).unwrap_or_default());
        }
    }

    fn int(&mut self, key: &str, value: impl itoa::Integer) {
        self.key(key);
        self.0.push_str(itoa::Buffer::new().format(value));
    }

    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

impl<'a> From<&'a FrameError> for ServerFrame<'a> {
    fn from(e: &'a FrameError) -> Self {
        ServerFrame::Error {
            code: e.code,
            message: &e.message,
            temp_message_id: e.temp_message_id.as_deref(),
            missed_from: e.missed.map_or(0, |m| m.0),
            missed_to: e.missed.map_or(0, |m| m.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: ParseContext<'static> = ParseContext {
        user_id: "alice",
        max_content_chars: 10,
    };

    fn err(text: &str) -> FrameError {
        parse_client_frame(text, CTX).unwrap_err()
    }

    #[test]
    fn hand_written_frames_are_the_derives_bytes() {
        let texts = [
            "plain",
            "",
            "quote \" and back\\slash",
            "tab\t newline\n nul\u{0} unit\u{1f}",
            "del\u{7f} é 日本 🎉 \u{2028}",
            "</script>",
        ];
        for (i, t) in texts.into_iter().enumerate() {
            let chat = [
                ServerFrame::ChatMessage {
                    message_id: "1764172800000-000003-node1",
                    sender_id: t,
                    receiver_id: "bob",
                    group_id: None,
                    chat_id: t,
                    content: t,
                    timestamp: 1_764_172_800_000,
                    seq: 0,
                    temp_message_id: None,
                },
                ServerFrame::ChatMessage {
                    message_id: t,
                    sender_id: "alice",
                    receiver_id: "team",
                    group_id: Some(t),
                    chat_id: "team",
                    content: t,
                    timestamp: -5,
                    seq: u64::MAX,
                    temp_message_id: Some(t),
                },
            ];
            let routes = [
                Route::Local,
                Route::Remote,
                Route::LocalRemote,
                Route::Offline,
            ];
            let ack = ServerFrame::MessageAck {
                message_id: t,
                temp_message_id: (i % 2 == 0).then_some(t),
                timestamp: i as i64,
                route: routes[i % routes.len()],
                remote_failed: i,
                seq: i as u64,
            };
            for f in chat.iter().chain([&ack]) {
                let derived = serde_json::to_string(f).unwrap();
                assert_eq!(f.encode(), derived);
            }
        }
    }

    #[test]
    fn parses_every_client_frame() {
        let chat = parse_client_frame(
            r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c1","content":"hi","timestamp":1,"tempMessageId":"t1"}"#,
            CTX,
        )
        .unwrap();
        assert_eq!(
            chat,
            ClientFrame::Chat(ChatSend {
                receiver_id: "bob".into(),
                chat_id: "c1".into(),
                content: "hi".into(),
                temp_message_id: Some("t1".into()),
                group: false,
            })
        );
        // To a group: its id is the chat's.
        assert_eq!(
            parse_client_frame(
                r#"{"type":"CHAT_MESSAGE","groupId":"team","content":"hi"}"#,
                CTX
            )
            .unwrap(),
            ClientFrame::Chat(ChatSend {
                receiver_id: "team".into(),
                chat_id: "team".into(),
                content: "hi".into(),
                temp_message_id: None,
                group: true,
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"HEARTBEAT","content":"ping"}"#, CTX).unwrap(),
            ClientFrame::Heartbeat
        );
        assert_eq!(
            parse_client_frame(
                r#"{"type":"READ_RECEIPT","chatId":"c1","messageId":"m1","receiverId":"bob"}"#,
                CTX
            )
            .unwrap(),
            ClientFrame::ReadReceipt {
                chat_id: "c1".into(),
                message_id: "m1".into(),
                receiver_id: Some("bob".into())
            }
        );
        assert_eq!(
            parse_client_frame(
                r#"{"type":"TYPING","receiverId":"bob","chatId":"c1","content":"stop_typing"}"#,
                CTX
            )
            .unwrap(),
            ClientFrame::Typing {
                receiver_id: "bob".into(),
                chat_id: "c1".into(),
                typing: false,
                group: false,
            }
        );
    }

    #[test]
    fn a_group_frame_names_the_group_and_nothing_else() {
        let refused = [
            (
                r#"{"type":"CHAT_MESSAGE","groupId":"g","receiverId":"bob","content":"x"}"#,
                "not both",
            ),
            (
                r#"{"type":"CHAT_MESSAGE","groupId":"g","chatId":"other","content":"x"}"#,
                "groupId",
            ),
            (
                r#"{"type":"CHAT_MESSAGE","groupId":"g h","content":"x"}"#,
                "group id",
            ),
            (
                r#"{"type":"TYPING","groupId":"g","receiverId":"bob","content":"typing"}"#,
                "not both",
            ),
        ];
        for (frame, why) in refused {
            let e = parse_client_frame(frame, CTX).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField, "{frame}");
            assert!(e.message.contains(why), "{frame}: {}", e.message);
        }
        assert_eq!(
            parse_client_frame(
                r#"{"type":"TYPING","groupId":"g","chatId":"g","content":"typing"}"#,
                CTX
            )
            .unwrap(),
            ClientFrame::Typing {
                receiver_id: "g".into(),
                chat_id: "g".into(),
                typing: true,
                group: true,
            }
        );
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let f = parse_client_frame(
            r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c\"1","content":"a\nb"}"#,
            CTX,
        )
        .unwrap();
        let ClientFrame::Chat(c) = f else { panic!() };
        assert_eq!((c.chat_id.as_str(), c.content.as_str()), ("c\"1", "a\nb"));
    }

    #[test]
    fn bad_frames_get_stable_codes() {
        let cases = [
            ("not json", ErrorCode::InvalidJson),
            ("[1,2]", ErrorCode::InvalidFrame),
            ("{}", ErrorCode::MissingField),
            (r#"{"type":"SHOUT"}"#, ErrorCode::UnknownType),
            (r#"{"type":5}"#, ErrorCode::InvalidField),
            (
                r#"{"type":"CHAT_MESSAGE","chatId":"c","content":"x"}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","content":"x"}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c"}"#,
                ErrorCode::MissingField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":"  "}"#,
                ErrorCode::EmptyContent,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":"12345678901"}"#,
                ErrorCode::ContentTooLong,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"b o b","chatId":"c","content":"x"}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"","content":"x"}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":7}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"CHAT_MESSAGE","senderId":"mallory","receiverId":"bob","chatId":"c","content":"x"}"#,
                ErrorCode::Forbidden,
            ),
            (
                r#"{"type":"TYPING","receiverId":"bob","chatId":"c","content":"yelling"}"#,
                ErrorCode::InvalidField,
            ),
            (
                r#"{"type":"READ_RECEIPT","chatId":"c"}"#,
                ErrorCode::MissingField,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(err(text).code, code, "{text}");
        }
    }

    #[test]
    fn content_limit_counts_characters_not_bytes() {
        let ten_snowmen = "☃".repeat(10);
        let text = format!(
            r#"{{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":"{ten_snowmen}"}}"#
        );
        assert!(parse_client_frame(&text, CTX).is_ok());
    }

    #[test]
    fn send_errors_carry_temp_message_id() {
        let e = err(
            r#"{"type":"CHAT_MESSAGE","receiverId":"bob","chatId":"c","content":"","tempMessageId":"t9"}"#,
        );
        assert_eq!(e.temp_message_id.as_deref(), Some("t9"));
        let json = ServerFrame::from(&e).encode();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["type"], "ERROR");
        assert_eq!(v["code"], "EMPTY_CONTENT");
        assert_eq!(v["tempMessageId"], "t9");
    }

    #[test]
    fn deep_nesting_and_huge_numbers_are_errors_not_panics() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(err(&deep).code, ErrorCode::InvalidJson);
        // The client's timestamp is never read (the server stamps messages), so even a number
        // out of any range is skipped, not a panic.
        let huge = r#"{"type":"HEARTBEAT","timestamp":1e999999}"#;
        assert_eq!(
            parse_client_frame(huge, CTX).unwrap(),
            ClientFrame::Heartbeat
        );
        assert_eq!(
            err(r#"{"type":"HEARTBEAT","x":-}"#).code,
            ErrorCode::InvalidJson
        );
        let big_int = r#"{"type":"HEARTBEAT","timestamp":123456789012345678901234567890}"#;
        assert_eq!(
            parse_client_frame(big_int, CTX).unwrap(),
            ClientFrame::Heartbeat
        );
    }

    #[test]
    fn history_has_a_chat_an_optional_cursor_and_a_bounded_limit() {
        assert_eq!(
            parse_client_frame(r#"{"type":"HISTORY","chatId":"c1"}"#, CTX).unwrap(),
            ClientFrame::History {
                chat_id: "c1".into(),
                before: None,
                limit: HISTORY_PAGE
            }
        );
        assert_eq!(
            parse_client_frame(
                r#"{"type":"HISTORY","chatId":"c1","before":"m9","limit":100}"#,
                CTX
            )
            .unwrap(),
            ClientFrame::History {
                chat_id: "c1".into(),
                before: Some("m9".into()),
                limit: 100
            }
        );
        assert_eq!(err(r#"{"type":"HISTORY"}"#).code, ErrorCode::MissingField);
        for bad in [
            r#"{"type":"HISTORY","chatId":"c1","limit":0}"#,
            r#"{"type":"HISTORY","chatId":"c1","limit":101}"#,
            r#"{"type":"HISTORY","chatId":"c1","limit":"5"}"#,
            r#"{"type":"HISTORY","chatId":"c1","before":7}"#,
            r#"{"type":"HISTORY","chatId":"c1","before":""}"#,
        ] {
            assert_eq!(err(bad).code, ErrorCode::InvalidField, "{bad}");
        }
    }

    #[test]
    fn sync_needs_a_whole_number() {
        assert_eq!(
            parse_client_frame(r#"{"type":"SYNC","since":41}"#, CTX).unwrap(),
            ClientFrame::Sync { since: 41 }
        );
        assert_eq!(err(r#"{"type":"SYNC"}"#).code, ErrorCode::MissingField);
        for bad in [
            r#"{"type":"SYNC","since":-1}"#,
            r#"{"type":"SYNC","since":"4"}"#,
            r#"{"type":"SYNC","since":1.5}"#,
        ] {
            let e = err(bad);
            assert_eq!(e.code, ErrorCode::InvalidField, "{bad}");
            assert!(e.message.contains("since"), "{}", e.message);
        }
    }

    #[test]
    fn server_frames_use_seed_field_names() {
        let v: serde_json::Value = serde_json::from_str(
            &ServerFrame::MessageAck {
                message_id: "m",
                temp_message_id: Some("t"),
                timestamp: 5,
                route: Route::LocalRemote,
                remote_failed: 0,
                seq: 7,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"MESSAGE_ACK","messageId":"m","tempMessageId":"t","timestamp":5,"route":"local+remote","seq":7})
        );
        let v: serde_json::Value = serde_json::from_str(
            &ServerFrame::Synced {
                seq: 9,
                replayed: 3,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v, serde_json::json!({"type":"SYNCED","seq":9,"replayed":3}));
        let v: serde_json::Value =
            serde_json::from_str(&ServerFrame::HeartbeatAck { content: "pong" }.encode()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"HEARTBEAT_ACK","content":"pong"})
        );
    }

    #[test]
    fn user_ids() {
        for ok in ["a", "user_1", "a.b:c@d-e", &"x".repeat(64)] {
            assert!(is_valid_user_id(ok), "{ok}");
        }
        for bad in ["", "a b", "ä", "a/b", &"x".repeat(65)] {
            assert!(!is_valid_user_id(bad), "{bad}");
        }
    }
}
