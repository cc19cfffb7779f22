//! A store in Redis, shared by every node (`store.url = "redis://..."`, or `chatd
//! message-service --backend redis`): a read receipt sent on one node finds the message stored
//! by another, and a device finds its inbox whichever node it reconnects to. Messages expire
//! after `store.retention_secs`; an inbox keeps at most `store.inbox_max_entries` entries.
//!
//! Every key belongs to one user and carries that user's id as its hash tag, so a user's keys
//! share one slot of a Redis Cluster and each script works inside one slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chat:{userId}:seq` | string | the user's latest inbox seq (never expires: seqs never repeat) |
//! | `chat:{userId}:inbox` | sorted set | score = seq, member = `{seq}:m:{messageId}` (a message) or `{seq}:r:{messageId}` (a read receipt for a message the user sent); cut to `store.inbox_max_entries` hourly and when read |
//! | `chat:{userId}:msg:{messageId}` | string | the user's copy of a message it sent or received: field, value, field, value, ... each written as its length in bytes, `:` and itself (`8:senderId5:alice...`, see [`encode_fields`]). Fields: `senderId`, `receiverId`, `chatId`, `content`, `timestamp`, `tempMessageId`, `group` (`1`, a group's message only), `senderSeq` (the sender's copy), `receiverSeq` (the receiver's; both in a note to self), and once read `readAt` (both copies) and `receiptSeq` (the sender's), appended. A copy written before 2026-12 is a hash of the same fields; both are read (see "Copies" below) |
//! | `chat:{userId}:history:{chatId}` | list | the user's history of a chat: the `messageId`s of its messages in that chat, oldest first (in the order of their seqs in the user's inbox); cut to `store.inbox_max_entries` hourly and when read, expiring an hour after the retention of its newest message |
//! | `chat:{senderId}:idem:{tempMessageId}` | string | the `messageId` stored for that send |
//! | `chat:{g:groupId}:members` | hash | a group's members: userId → `admin` or `member` (never expires; gone when its last member leaves) |
//!
//! A group message is a message whose `receiverId` and `chatId` are the group's id (its copies
//! carry `group` = `1`): step 2 below runs once per member but the sender, each in the
//! member's slot (its own seq, copy and history), after the members were read from the
//! group's slot. A member's receipt takes a place `{seq}:g:{readerId}#{messageId}` in the
//! sender's inbox, once per member (`receipt:{readerId}` in the sender's copy holds its seq).
//!
//! **Copies.** A copy is one string written with one `SET ... PX` (a hash took an `HSET` of
//! sixteen arguments and a `PEXPIRE`: two commands in Redis's append-only file, 15 % of Redis's
//! CPU per message at the cross-node maximum). What changes later (a receipt's `readAt`,
//! `receiptSeq`, `receipt:{reader}`) is appended with `APPEND`, which keeps the expiry; a field
//! is appended only when absent, so it appears once. A copy written by an earlier version is a
//! hash: every script reads either (`copy_read`) and marks a hash with `HSET` as before, so a
//! store needs no migration and such copies leave as they expire.
//!
//! A message touches two users, so two slots: it is saved in three steps, each one script,
//! atomic in its slot and idempotent:
//!
//! 1. **Sender's slot, the claim**: the `tempMessageId` is claimed for this message id (`SET
//!    NX`), unless an earlier send holds it: then that send's id is the one saved. If the
//!    sender's copy of that id exists, the send was stored whole before: done (a duplicate).
//!    A claim made now (the key did not exist) has no copy to look for. Steps 2 and 3 still
//!    look for theirs: a retry that started later (on another node, after a reconnect) may
//!    find this claim and run its steps 2 and 3 before this attempt's, under this id.
//! 2. **Receiver's slot**: the message's place in the receiver's inbox, in its history of the
//!    chat, and the receiver's copy, unless that copy exists (then it is the message, and its
//!    seq the answer).
//! 3. **Sender's slot**: the same for the sender, unless its copy exists.
//!
//! The message is acknowledged only once all three are done. A node that dies between them
//! leaves a claim, or the message in the receiver's inbox only, never acknowledged: the
//! sender's retry with the same `tempMessageId` finds the claim and runs the rest, so nothing
//! is stored twice and each user gets it once. The sender's own inbox (what its other devices
//! sync) gets the message last: a message there is one the receiver has (a device that syncs
//! its own sent message may take it as stored, as `chatd connect` does). (A send without
//! `tempMessageId` cannot be recognised when it is retried: it is stored again as a new
//! message.) In each slot, a seq exists only with its message's copy, and each inbox is
//! gap-free. A read receipt is two steps the same way: the reader's copy (is the reader the
//! receiver? `readAt`), then the sender's slot (the receipt's place, once).
//!
//! On a cluster each step is one call per slot for a whole batch, the slots' calls at once. On
//! a single Redis, where one script may touch every key, one call ([`SAVE_WHOLE`]) makes the
//! claims of a batch and saves whole, atomically, each message whose claim it made now (to
//! another user, not a group): one round trip and one fsync, not three, and no look for
//! copies (none can exist under a new claim, and nothing runs between). The rest (a note to
//! self, a group message, a retry of a save that was cut short, and every later message of
//! the same sender in the batch, to keep its seqs in the order sent) take steps 2 and 3.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use redis::{FromRedisValue, Script, ScriptInvocation};

use super::{
    group_roster, ChatPage, EntryKind, HistoryMessage, InboxEntry, InboxPage, Member, MemberChange,
    NewMessage, Receipt, Role, SaveOutcome, Store, StoreError, StoredMessage, MAX_HISTORY_PAGE,
    MAX_PAGE,
};
use crate::chat::ids::now_ms;
use crate::redis_client::{slot, RedisClient, SCRIPT_CHUNK};

/// `chat:{user}:what`: every key of a user carries its hash tag.
fn user_key(user_id: &str, what: &str) -> String {
    format!("chat:{{{user_id}}}:{what}")
}

pub fn seq_key(user_id: &str) -> String {
    user_key(user_id, "seq")
}

pub fn inbox_key(user_id: &str) -> String {
    user_key(user_id, "inbox")
}

/// The prefix of a user's message copies; the message id follows.
pub fn message_prefix(user_id: &str) -> String {
    user_key(user_id, "msg:")
}

/// `user_id`'s copy of a message.
pub fn message_key(user_id: &str, message_id: &str) -> String {
    format!("{}{message_id}", message_prefix(user_id))
}

/// A user's history of one chat: its messages in that chat by their seqs in its inbox.
pub fn history_key(user_id: &str, chat_id: &str) -> String {
    user_key(user_id, &format!("history:{chat_id}"))
}

pub fn idempotency_key(sender_id: &str, temp_message_id: &str) -> String {
    user_key(sender_id, &format!("idem:{temp_message_id}"))
}

/// A group's members, in the group's own slot (`g:` keeps it apart from a user's keys).
pub fn members_key(group_id: &str) -> String {
    format!("chat:{{g:{group_id}}}:members")
}

/// How every script reads and marks a user's copy of a message (module doc, "Copies").
/// `copy_read` answers the copy as the node reads it (`{encoded}` for a string, the flat
/// `{field, value, ...}` of a hash) and its fields as a table, or nothing when there is no
/// copy; a string is decoded only here, on the paths that look inside a copy (a retry, a
/// receipt), never on a first save. `copy_mark` adds fields to a copy `copy_read` read, and
/// to what it answered.
const COPY: &str = r#"
local function item(v)
  return #v .. ':' .. v
end
local function decode(v)
  local f, name, i = {}, nil, 1
  while i <= #v do
    local colon = string.find(v, ':', i, true)
    local n = tonumber(string.sub(v, i, colon - 1))
    local s = string.sub(v, colon + 1, colon + n)
    if name then f[name], name = s, nil else name = s end
    i = colon + n + 1
  end
  return f
end
local function copy_read(key)
  local v = redis.pcall('GET', key)
  if not v then return nil end
  if type(v) == 'table' then
    -- WRONGTYPE: a hash, written by an earlier version.
    local flat, f = redis.call('HGETALL', key), {}
    for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
    return flat, f
  end
  return {v}, decode(v)
end
local function copy_mark(key, flat, ...)
  local add = {...}
  if #flat == 1 then
    local s = ''
    for _, v in ipairs(add) do s = s .. item(v) end
    redis.call('APPEND', key, s)
    flat[1] = flat[1] .. s
  else
    redis.call('HSET', key, unpack(add))
    for _, v in ipairs(add) do flat[#flat + 1] = v end
  end
end
"#;

/// What every script of a save or a receipt shares: ARGV[1] retention ms, ARGV[2] max inbox
/// entries; `place` gives an entry (a receipt) the next seq of one inbox (a save's messages
/// take theirs in bulk, [`BULK`], and go into the user's history of their chat: a list,
/// appended in seq order, cheaper to write than a sorted set, and a history is read far less
/// often than written); `write_copy` writes a user's copy of a message from the fields the
/// node encoded (ARGV[body]) and the seqs, in one `SET` (no Lua table on this path: the
/// script runs once per message), and answers what it wrote. `keep` looks after an inbox or a
/// history once an hour, not at every message: when its expiry has fallen below retention it
/// is pushed to retention + an hour (so the set always outlives its newest message), and the
/// set is cut to its newest `max` entries. Every reader cuts it first too (FETCH, FETCH_CHAT),
/// so what a reader sees is exact; between two cuts a set holds at most an hour of entries
/// more. Per message that is four commands less than looking at every write (each one more in
/// Redis's fsynced append-only file when it writes). A set is looked at once per script call
/// (`kept`): time stands still inside a script, so a second look in the same call would find
/// what the first left.
const COMMON: &str = r#"
local retention, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local kept = {}
local function keep(set, list)
  if kept[set] then return end
  kept[set] = true
  if redis.call('PTTL', set) < retention then
    redis.call('PEXPIRE', set, retention + 3600000)
    if list then
      redis.call('LTRIM', set, -max, -1)
    else
      redis.call('ZREMRANGEBYRANK', set, 0, -max - 1)
    end
  end
end
local function place(counter, inbox, kind, id)
  -- As a string from here on: Lua formats a number with printf each time it is passed or
  -- joined (4 % of Redis's CPU when a seq was formatted five times per step).
  local seq = tostring(redis.call('INCR', counter))
  redis.call('ZADD', inbox, seq, seq .. ':' .. kind .. ':' .. id)
  keep(inbox)
  return seq
end
local function claim(idem, copy, id, temp)
  local use, held = id, true
  if temp ~= '' then
    held = redis.call('SET', idem, id, 'PX', ARGV[1], 'NX', 'GET')
    if held then use = held end
  end
  if not held then return {'new', id} end
  if use ~= id then copy = string.sub(copy, 1, #copy - #id) .. use end
  local flat = copy_read(copy)
  if flat then
    local reply = {'dup', use}
    for _, v in ipairs(flat) do reply[#reply + 1] = v end
    return reply
  end
  return {'go', use}
end
local function write_copy(key, body, sseq, rseq)
  local v = ARGV[body]
  if sseq then v = v .. '9:senderSeq' .. item(sseq) end
  if rseq then v = v .. '11:receiverSeq' .. item(rseq) end
  redis.call('SET', key, v, 'PX', ARGV[1])
  return v
end
"#;

/// Places made in bulk, for a script that saves many messages whose places it knows before it
/// writes any ([`SAVE_WHOLE`], [`SAVE_RECEIVER`], [`SAVE_SENDER`]): `reserve` counts one more
/// place of a counter, `take_seqs` takes each counter's places with one `INCRBY`, `next_seq`
/// hands them out in the order reserved, `gather` collects an inbox's entries or a history's
/// ids and `flush` writes each set with one `ZADD` or `RPUSH` (then `keep`s it). A user with k
/// messages in a call costs three commands for them, not 3k: each is a command run and one
/// more entry in Redis's fsynced append-only file. The result is what placing message by
/// message would leave: each counter's seqs in the order reserved, each set's entries in that
/// order. A script that looks for a copy before it places must also look among the copies it
/// is about to write (`to_place`): none of them exists yet when it looks.
const BULK: &str = r#"
local wanted, counters, last = {}, {}, {}
local function reserve(counter)
  if not wanted[counter] then
    wanted[counter] = 0
    counters[#counters + 1] = counter
  end
  wanted[counter] = wanted[counter] + 1
end
local function take_seqs()
  for _, c in ipairs(counters) do
    last[c] = redis.call('INCRBY', c, wanted[c]) - wanted[c]
  end
end
local function next_seq(counter)
  last[counter] = last[counter] + 1
  return tostring(last[counter])
end
local zadds, pushes = {keys = {}}, {keys = {}}
local function gather(sets, key, a, b)
  local t = sets[key]
  if not t then
    t = {}
    sets[key] = t
    sets.keys[#sets.keys + 1] = key
  end
  t[#t + 1] = a
  if b then t[#t + 1] = b end
end
local function write_all(command, sets, list)
  for _, key in ipairs(sets.keys) do
    local t = sets[key]
    -- In parts: Lua's unpack has a limit of a few thousand values.
    for i = 1, #t, 1000 do
      redis.call(command, key, unpack(t, i, math.min(i + 999, #t)))
    end
    keep(key, list)
  end
end
local function flush()
  write_all('ZADD', zadds, false)
  write_all('RPUSH', pushes, true)
end
-- For a step that found no copy to answer with: step i places its copy, unless an earlier
-- step of the call places the same copy (the same message twice): then `todo` names that
-- one, whose answer is this step's too.
local placing, todo = {}, {}
local function to_place(i, copy, counter)
  if placing[copy] then
    todo[#todo + 1] = {i, placing[copy]}
  else
    reserve(counter)
    placing[copy] = i
    todo[#todo + 1] = {i}
  end
end
"#;

/// Step 1, in the sender's slot: the claim. KEYS, two per message: idempotency key (ignored
/// when its tempMessageId is empty), the sender's copy. ARGV after the common two, two per
/// message: messageId, tempMessageId. Claims the tempMessageId for this id unless an earlier
/// send holds it (then that send's id is the one to save). Answers per message {'new', id}
/// when it claimed the tempMessageId now (no copy of this id can exist yet: nothing to look
/// for), {'go', id to save}, or {'dup', id, field, value, ...} when the sender's copy of that
/// id exists: the send was stored whole before, nothing to do.
const SAVE_CLAIM: &str = r#"
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local k, a = i * 2, 3 + i * 2
  out[i + 1] = claim(KEYS[k + 1], KEYS[k + 2], ARGV[a], ARGV[a + 1])
end
return out
"#;

/// On a single Redis, where every key is in one place: step 1, and for a message whose claim
/// is made now, steps 2 and 3 in the same call (one round trip and one fsync for the whole
/// save, not three; atomic, so there is no copy to look for: none can exist under a new claim
/// and nothing else runs between). KEYS, nine per message: idempotency key, the sender's copy,
/// counter, inbox and history of the chat, the receiver's counter, inbox, copy and history.
/// ARGV after the common two, seven per message: the six of step 2, and whole ('1' when the
/// message may be saved whole here: to another user, not a group). Answers per message
/// {'whole', id, receiverSeq, senderSeq}, or what step 1 answers: the message's steps 2 and 3
/// are then left to their own scripts, and so are those of every later message of the same
/// sender in this call, so that a sender's messages take their seqs in the order sent.
/// The claims of the call come first, then the places of the messages saved whole, in bulk
/// ([`BULK`]). So a send repeated within the call (its tempMessageId claimed by an earlier
/// message of the same call) finds no copy yet: it answers {'go', the earlier id}, and its
/// steps 2 and 3 find the copies this call wrote (a duplicate, as it should be).
const SAVE_WHOLE: &str = r#"
local out, behind, whole = {}, {}, {}
for i = 0, #KEYS / 9 - 1 do
  local k, a = i * 9, 3 + i * 7
  local id, sender = ARGV[a], ARGV[a + 1]
  local reply = claim(KEYS[k + 1], KEYS[k + 2], id, ARGV[a + 3])
  if reply[1] == 'new' and ARGV[a + 6] == '1' and not behind[sender] then
    reserve(KEYS[k + 6])
    reserve(KEYS[k + 3])
    whole[#whole + 1] = i
  elseif reply[1] ~= 'dup' or ARGV[a + 4] == '1' then
    behind[sender] = true
  end
  out[i + 1] = reply
end
take_seqs()
for _, i in ipairs(whole) do
  local k, a = i * 9, 3 + i * 7
  local id = ARGV[a]
  local rseq, sseq = next_seq(KEYS[k + 6]), next_seq(KEYS[k + 3])
  write_copy(KEYS[k + 8], a + 5, nil, rseq)
  write_copy(KEYS[k + 2], a + 5, sseq, rseq)
  gather(zadds, KEYS[k + 7], rseq, rseq .. ':m:' .. id)
  gather(zadds, KEYS[k + 4], sseq, sseq .. ':m:' .. id)
  gather(pushes, KEYS[k + 9], id)
  gather(pushes, KEYS[k + 5], id)
  out[i + 1] = {'whole', id, rseq, sseq}
end
flush()
return out
"#;

/// Step 2, in the receiver's slot (a group member's, for a group message). KEYS, four per
/// message: receiver's counter, inbox, copy, history of the chat.
/// ARGV after the common two, six per message ([`add_message`]): messageId, senderId,
/// receiverId, tempMessageId, group ('1' or ''), the copy's fields encoded. Answers per
/// message {receiverSeq} when it placed the message now, or {receiverSeq, copy as
/// `copy_read` answers it} with the copy it found (the step ran before: that copy is what the
/// sender's step writes too). A note to self is placed once,
/// its one copy holding both seqs. The places are made in bulk ([`BULK`]): a member's inbox
/// takes the group messages of a batch in one `ZADD`. The same message for the same receiver
/// twice in one call (two attempts of one send, in one batch) is placed once: the second
/// answers the copy the first wrote, as it would have found it.
const SAVE_RECEIVER: &str = r#"
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k = i * 4
  local flat, have = copy_read(KEYS[k + 3])
  if have and have.receiverSeq then
    local reply = {have.receiverSeq}
    for _, v in ipairs(flat) do reply[#reply + 1] = v end
    out[i + 1] = reply
  else
    to_place(i, KEYS[k + 3], KEYS[k + 1])
  end
end
take_seqs()
local written = {}
for _, t in ipairs(todo) do
  local i, first = t[1], t[2]
  if first then
    out[i + 1] = written[first]
  else
    local k, a = i * 4, 3 + i * 6
    local id = ARGV[a]
    local seq = next_seq(KEYS[k + 1])
    -- The sender's seq is given by the next step, but to a note to self: this one copy.
    local to_self = ARGV[a + 4] ~= '1' and ARGV[a + 1] == ARGV[a + 2]
    written[i] = {seq, write_copy(KEYS[k + 3], a + 5, to_self and seq or nil, seq)}
    gather(zadds, KEYS[k + 2], seq, seq .. ':m:' .. id)
    gather(pushes, KEYS[k + 4], id)
    out[i + 1] = {seq}
  end
end
flush()
return out
"#;

/// Step 3, in the sender's slot. KEYS, four per message: sender's counter, inbox, copy,
/// history of the chat.
/// ARGV after the common two, seven per message: the six of step 2, receiverSeq ('' for a
/// group message: each member has its own). Answers the senderSeq of each: the existing copy's when the step ran before.
/// Places in bulk ([`BULK`]), a message repeated in the call placed once, as in step 2.
const SAVE_SENDER: &str = r#"
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k = i * 4
  local _, have = copy_read(KEYS[k + 3])
  if have and have.senderSeq then
    out[i + 1] = have.senderSeq
  else
    to_place(i, KEYS[k + 3], KEYS[k + 1])
  end
end
take_seqs()
for _, t in ipairs(todo) do
  local i, first = t[1], t[2]
  if first then
    out[i + 1] = out[first + 1]
  else
    local k, a = i * 4, 3 + i * 7
    local id = ARGV[a]
    local seq = next_seq(KEYS[k + 1])
    local rseq = ARGV[a + 6]
    if rseq == '' then rseq = nil end
    write_copy(KEYS[k + 3], a + 5, seq, rseq)
    gather(zadds, KEYS[k + 2], seq, seq .. ':m:' .. id)
    gather(pushes, KEYS[k + 4], id)
    out[i + 1] = seq
  end
end
flush()
return out
"#;

/// A receipt's step 1, in the reader's slot. KEYS: the reader's copy. ARGV after the common
/// two: chatId, reader, now. Marks the copy read (once) and answers {'ok', the copy as
/// `copy_read` answers it}, or {'unknown'} (no such message in the reader's messages, or another chat), or
/// {'forbidden'} (the reader sent it). In a group, any member but the sender reads its copy.
const READ_READER: &str = r#"
local flat, m = copy_read(KEYS[1])
if not m or m.chatId ~= ARGV[3] then return {'unknown'} end
if m.group == '1' then
  if m.senderId == ARGV[4] then return {'forbidden'} end
elseif m.receiverId ~= ARGV[4] then return {'forbidden'} end
if not m.readAt then copy_mark(KEYS[1], flat, 'readAt', ARGV[5]) end
table.insert(flat, 1, 'ok')
return flat
"#;

/// A receipt's step 2, in the sender's slot. KEYS: the sender's copy, counter, inbox. ARGV
/// after the common two: messageId, readAt, reader, group ('1' or ''). Gives the receipt a
/// place in the sender's inbox the first time (in a group, the first time for this reader);
/// answers its seq, or '' when the sender's copy expired.
const READ_SENDER: &str = r#"
local flat, m = copy_read(KEYS[1])
if not m then return '' end
if ARGV[6] == '1' then
  local field = 'receipt:' .. ARGV[5]
  if m[field] then return m[field] end
  local seq = place(KEYS[2], KEYS[3], 'g', ARGV[5] .. '#' .. ARGV[3])
  copy_mark(KEYS[1], flat, field, seq)
  return seq
end
if m.receiptSeq then return m.receiptSeq end
local seq = place(KEYS[2], KEYS[3], 'r', ARGV[3])
-- readAt may be there already (a note to self: one copy, read by its receiver's step).
if m.readAt then
  copy_mark(KEYS[1], flat, 'receiptSeq', seq)
else
  copy_mark(KEYS[1], flat, 'readAt', ARGV[4], 'receiptSeq', seq)
end
return seq
"#;

/// A new group. KEYS: its members. ARGV: creator, then the other members. Answers 'ok', or
/// 'exists' when the group does.
const GROUP_CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], ARGV[1], 'admin')
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], 'member') end
return 'ok'
"#;

/// A change of one member, by the rules of `store::apply_change`. KEYS: the group's members.
/// ARGV: by, user, 'admin' or 'member' (add with this role) or 'remove', most members.
/// Answers 'ok', or what refused it: 'nogroup', 'notmember' (by), 'notadmin', 'gone' (the
/// user to remove is no member), 'lastadmin', 'full'.
const GROUP_CHANGE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'nogroup' end
local by, user, op = ARGV[1], ARGV[2], ARGV[3]
local by_role = redis.call('HGET', KEYS[1], by)
if not by_role then return 'notmember' end
if by_role ~= 'admin' and not (op == 'remove' and by == user) then return 'notadmin' end
local was = redis.call('HGET', KEYS[1], user)
local last_admin = false
if was == 'admin' and redis.call('HLEN', KEYS[1]) > 1 then
  local admins = 0
  for _, role in ipairs(redis.call('HVALS', KEYS[1])) do
    if role == 'admin' then admins = admins + 1 end
  end
  last_admin = admins == 1
end
if op == 'remove' then
  if not was then return 'gone' end
  if last_admin then return 'lastadmin' end
  redis.call('HDEL', KEYS[1], user)
  return 'ok'
end
if was then
  if last_admin and op ~= 'admin' then return 'lastadmin' end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return 'full'
end
redis.call('HSET', KEYS[1], user, op)
return 'ok'
"#;

/// KEYS: counter, inbox. ARGV: after, limit, the user's message prefix (its copies are in
/// the same slot), max entries. The inbox is cut to its newest `max` entries (see `keep`) and
/// entries whose message expired are dropped from the front first, so `oldest` is what can
/// still be given.
/// Returns {{oldest, latest}, {seq, kind, messageId, reader, the copy as `copy_read` answers
/// it}, ...}, kind
/// 'm' (a message), 'r' (a receipt) or 'g' (a group member's receipt, by `reader`).
const FETCH: &str = r#"
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
local oldest = latest + 1
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
while true do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 0 then break end
  local id = string.match(first[1], '^%d+:%a:(.*)$')
  id = string.match(id, '#(.*)$') or id
  if redis.call('EXISTS', ARGV[3] .. id) == 1 then
    oldest = tonumber(first[2])
    break
  end
  redis.call('ZREM', KEYS[2], first[1])
end
local out = {{tostring(oldest), tostring(latest)}}
if tonumber(ARGV[2]) > 0 then
  local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
  for _, member in ipairs(members) do
    local seq, kind, id = string.match(member, '^(%d+):(%a):(.*)$')
    local reader = ''
    if kind == 'g' then reader, id = string.match(id, '^(.-)#(.*)$') end
    local entry = {seq, kind, id, reader}
    for _, v in ipairs(copy_read(ARGV[3] .. id) or {}) do entry[#entry + 1] = v end
    out[#out + 1] = entry
  end
end
return out
"#;

/// KEYS: the user's history of a chat. ARGV: before (a message id, '' for the newest),
/// limit, the user's message prefix (its copies are in the same slot), max entries (the
/// history is cut to them first, see `keep`). Answers {{'none'}} when the user has no history
/// of the chat, {{'unknown'}} when `before` is not in it, else {{'ok' or 'more'}, {messageId,
/// the copy as `copy_read` answers it}, ...}, newest first ('more': older messages are kept). A message whose
/// copy expired ends the page, and it and every older one leave the history (copies of one
/// user expire in the order they were written, which is the list's). `LPOS` looks for the
/// cursor from the newest end: a page deep in a long history costs a walk to it.
const FETCH_CHAT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {{'none'}} end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[4]), -1)
local limit = tonumber(ARGV[2])
local top
if ARGV[1] ~= '' then
  local at = redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1)
  if not at then return {{'unknown'}} end
  top = at - 1
else
  top = redis.call('LLEN', KEYS[1]) - 1
end
local out = {{'ok'}}
if top < 0 then return out end
local from = math.max(0, top - limit)
local ids = redis.call('LRANGE', KEYS[1], from, top)
for i = #ids, 1, -1 do
  local fields = copy_read(ARGV[3] .. ids[i])
  if not fields then
    redis.call('LTRIM', KEYS[1], from + i, -1)
    break
  end
  if #out > limit then
    out[1] = {'more'}
    break
  end
  local row = {ids[i]}
  for _, v in ipairs(fields) do row[#row + 1] = v end
  out[#out + 1] = row
end
return out
"#;

pub struct RedisStore {
    redis: RedisClient,
    inbox_max_entries: usize,
    /// ARGV[1] and ARGV[2] of every save and receipt script (`COMMON`): retention in ms and
    /// the most entries an inbox keeps, made once.
    common_args: [String; 2],
    save_claim: Script,
    save_whole: Script,
    save_receiver: Script,
    save_sender: Script,
    read_reader: Script,
    read_sender: Script,
    fetch: Script,
    fetch_chat: Script,
    group_create: Script,
    group_change: Script,
    group_max_members: usize,
}

/// `fields` as a copy's string (module doc, "Copies"): each of them its length in bytes, `:`
/// and itself, so that any content reads back as written and a script appends a field by
/// appending two items. A netstring without the trailing comma: nothing in Redis's Lua
/// would read that comma, and a crate for it would be larger than these lines.
pub fn encode_fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for f in fields {
        out.push_str(&f.len().to_string());
        out.push(':');
        out.push_str(f);
    }
    out
}

/// The fields of a copy's string, or `None` when it is not one [`encode_fields`] wrote.
fn decode_fields(mut s: &str) -> Option<HashMap<String, String>> {
    let mut fields = HashMap::new();
    let mut name = None;
    while !s.is_empty() {
        let (len, rest) = s.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let item = rest.get(..len)?;
        s = &rest[len..];
        match name.take() {
            None => name = Some(item.to_string()),
            Some(n) => {
                fields.insert(n, item.to_string());
            }
        }
    }
    name.is_none().then_some(fields)
}

/// A copy as a script answers it (`copy_read`): one string, or the flat `[field, value, ...]`
/// of a hash an earlier version wrote. Its message, or `None` when there is no copy or it
/// lacks a field.
fn from_copy(message_id: &str, copy: &[String]) -> Option<StoredMessage> {
    let f = match copy {
        [encoded] => decode_fields(encoded)?,
        flat => flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect(),
    };
    let get = |k: &str| f.get(k).cloned();
    let seq = |k: &str| get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(StoredMessage {
        receiver_seq: seq("receiverSeq"),
        sender_seq: seq("senderSeq"),
        member_seqs: Vec::new(),
        message: Arc::new(NewMessage {
            message_id: message_id.to_string(),
            sender_id: get("senderId")?,
            receiver_id: get("receiverId")?,
            chat_id: get("chatId")?,
            content: get("content")?,
            timestamp: get("timestamp")?.parse().ok()?,
            temp_message_id: get("tempMessageId").filter(|t| !t.is_empty()),
            group: f.get("group").is_some_and(|g| g == "1"),
        }),
        read_at: get("readAt").and_then(|r| r.parse().ok()),
    })
}

/// A message on its way through the save's steps.
struct Saving {
    /// The message to save (its id an earlier send's when the tempMessageId was claimed
    /// before), with the seqs known so far.
    stored: StoredMessage,
    /// Stored by this save, not found stored before.
    fresh: bool,
    /// Every step is done (found whole by the claim, or a note to self after step 2).
    done: bool,
    /// A group message's receivers: every member but the sender, read before the claim.
    recipients: Vec<String>,
}

/// What the claim's `reply` for `message` means.
fn claimed(saving: &mut Saving, reply: &[String]) -> Result<(), StoreError> {
    let bad = || StoreError::Unavailable(format!("save script answered {reply:?}"));
    match reply {
        [status, id] if status == "new" && *id == saving.stored.message.message_id => {
            saving.fresh = true;
        }
        [status, id, rseq, sseq]
            if status == "whole" && *id == saving.stored.message.message_id =>
        {
            saving.stored.receiver_seq = rseq.parse().map_err(|_| bad())?;
            saving.stored.sender_seq = sseq.parse().map_err(|_| bad())?;
            saving.fresh = true;
            saving.done = true;
        }
        [status, id] if status == "go" => {
            saving.fresh = *id == saving.stored.message.message_id;
            if !saving.fresh {
                // The message is this save's own still: nothing else holds it.
                Arc::make_mut(&mut saving.stored.message)
                    .message_id
                    .clone_from(id);
            }
        }
        [status, id, fields @ ..] if status == "dup" => {
            saving.stored = from_copy(id, fields).ok_or_else(bad)?;
            saving.fresh = false;
            // A group's steps run again (each finds its copy): they answer the members'
            // places, for the delivery a retry makes again.
            saving.done = !saving.stored.message.group;
        }
        _ => return Err(bad()),
    }
    Ok(())
}

/// Where in `savings` the messages are whose save has steps left.
fn not_done(savings: &[Result<Saving, StoreError>]) -> Vec<usize> {
    (0..savings.len())
        .filter(|&i| savings[i].as_ref().is_ok_and(|s| !s.done))
        .collect()
}

/// A save after its step 1 ([`RedisStore::claim_only`]), for tests.
#[doc(hidden)]
pub struct Claimed(Vec<Result<Saving, StoreError>>);

/// A message as steps 2 and 3 read it: its id, sender, receiver, tempMessageId, group flag
/// ('1' or ''), and the fields of its copies but the seqs, encoded ([`encode_fields`]).
fn add_message(call: &mut ScriptInvocation<'_>, m: &NewMessage) {
    let temp = m.temp_message_id.as_deref().unwrap_or_default();
    let timestamp = m.timestamp.to_string();
    let mut fields = vec![
        "senderId",
        &m.sender_id,
        "receiverId",
        &m.receiver_id,
        "chatId",
        &m.chat_id,
        "content",
        &m.content,
        "timestamp",
        &timestamp,
        "tempMessageId",
        temp,
    ];
    if m.group {
        fields.extend(["group", "1"]);
    }
    call.arg(&m.message_id)
        .arg(&m.sender_id)
        .arg(&m.receiver_id)
        .arg(temp)
        .arg(if m.group { "1" } else { "" })
        .arg(encode_fields(fields));
}

impl RedisStore {
    pub fn new(redis: RedisClient, retention_secs: u64, inbox_max_entries: usize) -> Self {
        Self {
            redis,
            inbox_max_entries: inbox_max_entries.max(1),
            common_args: [
                retention_secs.saturating_mul(1000).to_string(),
                inbox_max_entries.max(1).to_string(),
            ],
            save_claim: Script::new(&format!("{COPY}{COMMON}{SAVE_CLAIM}")),
            save_whole: Script::new(&format!("{COPY}{COMMON}{BULK}{SAVE_WHOLE}")),
            save_receiver: Script::new(&format!("{COPY}{COMMON}{BULK}{SAVE_RECEIVER}")),
            save_sender: Script::new(&format!("{COPY}{COMMON}{BULK}{SAVE_SENDER}")),
            read_reader: Script::new(&format!("{COPY}{COMMON}{READ_READER}")),
            read_sender: Script::new(&format!("{COPY}{COMMON}{READ_SENDER}")),
            fetch: Script::new(&format!("{COPY}{FETCH}")),
            fetch_chat: Script::new(&format!("{COPY}{FETCH_CHAT}")),
            group_create: Script::new(GROUP_CREATE),
            group_change: Script::new(GROUP_CHANGE),
            group_max_members: super::DEFAULT_GROUP_MAX_MEMBERS,
        }
    }

    /// At most `max` members per group (`store.group_max_members`).
    pub fn with_group_max_members(self, max: usize) -> Self {
        Self {
            group_max_members: max,
            ..self
        }
    }

    /// A group's members in order, admins first; `None` when there is no such group.
    async fn read_members(&self, group_id: &str) -> Result<Option<Vec<Member>>, StoreError> {
        let key = members_key(group_id);
        let key = &key;
        let flat: Vec<String> = self
            .redis
            .call("read group members", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        let mut members: Vec<Member> = flat
            .chunks_exact(2)
            .map(|p| Member {
                user_id: p[0].clone(),
                role: Role::parse(&p[1]).unwrap_or(Role::Member),
            })
            .collect();
        members.sort_by(|a, b| {
            (a.role != Role::Admin, &a.user_id).cmp(&(b.role != Role::Admin, &b.user_id))
        });
        Ok(Some(members))
    }

    /// Each message as a save to start: a group message with its receivers (every member but
    /// the sender; each group read once per batch), refused when the group does not exist or
    /// the sender is no member of it.
    async fn start(&self, messages: Vec<NewMessage>) -> Vec<Result<Saving, StoreError>> {
        let mut groups: Vec<&str> = messages
            .iter()
            .filter(|m| m.group)
            .map(|m| m.receiver_id.as_str())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let rosters: HashMap<String, Result<Option<Vec<Member>>, StoreError>> =
            futures_util::future::join_all(
                groups
                    .into_iter()
                    .map(|g| async move { (g.to_string(), self.read_members(g).await) }),
            )
            .await
            .into_iter()
            .collect();
        messages
            .into_iter()
            .map(|m| {
                let recipients = if m.group {
                    let (group, sender) = (&m.receiver_id, &m.sender_id);
                    let members = match rosters.get(group) {
                        Some(Ok(Some(members))) => members,
                        Some(Ok(None)) | None => {
                            return Err(StoreError::NoSuchGroup(group.clone()))
                        }
                        Some(Err(e)) => return Err(StoreError::Unavailable(e.to_string())),
                    };
                    super::group_receivers(group, sender, members)?
                } else {
                    Vec::new()
                };
                Ok(Saving {
                    stored: StoredMessage::unsequenced(m),
                    fresh: true,
                    done: false,
                    recipients,
                })
            })
            .collect()
    }

    /// A call of `script` with the arguments every save and receipt script starts with.
    fn invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        for a in &self.common_args {
            call.arg(a);
        }
        call
    }

    /// [`RedisClient::per_slot`] with the arguments every save and receipt script starts with.
    async fn per_slot<I, T: FromRedisValue + Send>(
        &self,
        what: &str,
        script: &Script,
        items: &[I],
        slot_of: impl Fn(&I) -> u16,
        add: impl Fn(&mut ScriptInvocation<'_>, &I),
    ) -> Vec<Result<T, StoreError>> {
        let replies = self
            .redis
            .per_slot(what, script, items, slot_of, &self.common_args, add)
            .await;
        replies
            .into_iter()
            .map(|r| r.map_err(StoreError::Unavailable))
            .collect()
    }

    /// Step 1 of the module doc for every message: the claims (one call per slot). With
    /// `whole` (a single Redis, a batch of one script call), the whole save of every message
    /// [`SAVE_WHOLE`] can finish at once, in the same call.
    async fn claims(&self, savings: &mut [Result<Saving, StoreError>], whole: bool) {
        let pending = not_done(savings);
        let messages: Vec<Arc<NewMessage>> = pending
            .iter()
            .filter_map(|&i| savings[i].as_ref().ok().map(|s| s.stored.message.clone()))
            .collect();
        let script = if whole {
            &self.save_whole
        } else {
            &self.save_claim
        };
        let replies: Vec<Result<Vec<String>, StoreError>> = self
            .per_slot(
                "save messages",
                script,
                &messages,
                // A user's keys are in the slot of its id: their hash tag.
                |m| slot(&m.sender_id),
                |call, m| {
                    let temp = m.temp_message_id.as_deref().unwrap_or_default();
                    let (from, to) = (&m.sender_id, &m.receiver_id);
                    call.key(idempotency_key(from, temp))
                        .key(message_key(from, &m.message_id));
                    if !whole {
                        call.arg(&m.message_id).arg(temp);
                        return;
                    }
                    call.key(seq_key(from))
                        .key(inbox_key(from))
                        .key(history_key(from, &m.chat_id))
                        .key(seq_key(to))
                        .key(inbox_key(to))
                        .key(message_key(to, &m.message_id))
                        .key(history_key(to, &m.chat_id));
                    add_message(call, m);
                    call.arg(if !m.group && from != to { "1" } else { "" });
                },
            )
            .await;
        for (i, reply) in pending.into_iter().zip(replies) {
            let result = match &mut savings[i] {
                Ok(saving) => reply.and_then(|r| claimed(saving, &r)),
                Err(_) => continue,
            };
            if let Err(e) = result {
                savings[i] = Err(e);
            }
        }
    }

    /// Step 2 for every message not done (one call per slot of the receivers): once per
    /// message, or once per receiving member of a group message.
    async fn receiver_steps(&self, savings: &mut [Result<Saving, StoreError>]) {
        // (which message, its receiver, the message): one step each.
        let mut steps: Vec<(usize, String, Arc<NewMessage>)> = Vec::new();
        for i in not_done(savings) {
            let Ok(s) = &savings[i] else { continue };
            let m = &s.stored.message;
            if m.group {
                steps.extend(s.recipients.iter().map(|u| (i, u.clone(), m.clone())));
            } else {
                steps.push((i, m.receiver_id.clone(), m.clone()));
            }
        }
        let replies: Vec<Result<Vec<String>, StoreError>> = self
            .per_slot(
                "save messages for their receivers",
                &self.save_receiver,
                &steps,
                |(_, to, _)| slot(to),
                |call, (_, to, m)| {
                    call.key(seq_key(to))
                        .key(inbox_key(to))
                        .key(message_key(to, &m.message_id))
                        .key(history_key(to, &m.chat_id));
                    add_message(call, m);
                },
            )
            .await;
        for ((i, to, _), reply) in steps.into_iter().zip(replies) {
            let Ok(saving) = &mut savings[i] else {
                continue;
            };
            let bad =
                |r: &[String]| StoreError::Unavailable(format!("receiver step answered {r:?}"));
            let step = reply.and_then(|r| {
                let (seq, fields) = r.split_first().ok_or_else(|| bad(&r))?;
                let seq = seq.parse::<u64>().map_err(|_| bad(&r))?;
                if fields.is_empty() {
                    return Ok((seq, None));
                }
                let id = &saving.stored.message.message_id;
                let found = from_copy(id, fields).ok_or_else(|| bad(&r))?;
                Ok((seq, Some(found)))
            });
            match step {
                Ok((seq, found)) => {
                    if let Some(found) = found {
                        // Placed by an earlier attempt: its copy is the message.
                        let member_seqs = std::mem::take(&mut saving.stored.member_seqs);
                        saving.stored = StoredMessage {
                            member_seqs,
                            ..found
                        };
                        saving.fresh = false;
                    }
                    let m = &saving.stored.message;
                    if m.group {
                        saving.stored.member_seqs.push((to, seq));
                        continue;
                    }
                    saving.stored.receiver_seq = seq;
                    if m.sender_id == m.receiver_id {
                        saving.stored.sender_seq = seq;
                        saving.done = true;
                    }
                }
                // Not acked: the sender's retry with the same tempMessageId completes it.
                Err(e) => savings[i] = Err(e),
            }
        }
    }

    /// Step 3 for every message not done (one call per slot of the senders).
    async fn sender_steps(&self, savings: &mut [Result<Saving, StoreError>]) {
        let pending = not_done(savings);
        let stored: Vec<StoredMessage> = pending
            .iter()
            .filter_map(|&i| savings[i].as_ref().ok().map(|s| s.stored.clone()))
            .collect();
        let seqs: Vec<Result<String, StoreError>> = self
            .per_slot(
                "save messages for their senders",
                &self.save_sender,
                &stored,
                |s| slot(&s.message.sender_id),
                |call, s| {
                    let m = &s.message;
                    call.key(seq_key(&m.sender_id))
                        .key(inbox_key(&m.sender_id))
                        .key(message_key(&m.sender_id, &m.message_id))
                        .key(history_key(&m.sender_id, &m.chat_id));
                    add_message(call, m);
                    if m.group {
                        call.arg("");
                    } else {
                        call.arg(s.receiver_seq);
                    }
                },
            )
            .await;
        for (i, seq) in pending.into_iter().zip(seqs) {
            let placed = seq.and_then(|seq| {
                seq.parse::<u64>()
                    .map_err(|_| StoreError::Unavailable(format!("sender step answered {seq:?}")))
            });
            match (&mut savings[i], placed) {
                (Ok(saving), Ok(seq)) => {
                    saving.stored.sender_seq = seq;
                    saving.done = true;
                }
                (saving, Err(e)) => *saving = Err(e),
                (Err(_), Ok(_)) => {}
            }
        }
    }

    /// Steps 2 and 3 for every message of claimed saves not done yet, and what each save
    /// comes to.
    async fn finish(
        &self,
        mut savings: Vec<Result<Saving, StoreError>>,
    ) -> Vec<Result<SaveOutcome, StoreError>> {
        self.receiver_steps(&mut savings).await;
        self.sender_steps(&mut savings).await;
        let outcome = |s: Saving| {
            if s.fresh {
                SaveOutcome::Saved(s.stored)
            } else {
                SaveOutcome::Duplicate(s.stored)
            }
        };
        savings.into_iter().map(|s| s.map(outcome)).collect()
    }

    /// Step 1 of a save alone: an attempt that has claimed its `tempMessageId` and is slow to
    /// go on. [`RedisStore::finish_claimed`] runs its steps 2 and 3. For the tests of a retry
    /// that overtakes its first attempt; nothing else calls it.
    #[doc(hidden)]
    pub async fn claim_only(&self, message: NewMessage) -> Claimed {
        let mut savings = self.start(vec![message]).await;
        self.claims(&mut savings, false).await;
        Claimed(savings)
    }

    /// Steps 2 and 3 of an attempt [`RedisStore::claim_only`] began.
    #[doc(hidden)]
    pub async fn finish_claimed(&self, claimed: Claimed) -> Result<SaveOutcome, StoreError> {
        self.finish(claimed.0)
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("no answer".into())))
    }

    /// Steps 1 and 2 of a save, not 3: what a node or MessageService that died before the last
    /// step leaves in Redis (the message in the receiver's inbox, not yet the sender's). For
    /// the tests that retry such a save; nothing else calls it.
    #[doc(hidden)]
    pub async fn save_without_sender_step(&self, message: NewMessage) -> Result<(), StoreError> {
        let mut savings = self.start(vec![message]).await;
        self.claims(&mut savings, false).await;
        self.receiver_steps(&mut savings).await;
        savings
            .pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("no answer".into())))
            .map(|_| ())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        let mut outcome = self.save_batch(vec![message]).await;
        outcome.pop().unwrap_or_else(|| {
            Err(StoreError::Unavailable(
                "the save script answered nothing".into(),
            ))
        })
    }

    /// The three steps of the module's doc for the whole batch, each one call per slot: the
    /// claims, the receivers' places, the senders' places. Messages of one sender keep their
    /// order in both inboxes.
    async fn save_batch(&self, messages: Vec<NewMessage>) -> Vec<Result<SaveOutcome, StoreError>> {
        // A single Redis saves a new message in one round trip; every call of SAVE_WHOLE must
        // see all of a sender's messages of the batch (it holds back those after one that
        // takes the three steps), so a batch larger than one call takes the three steps.
        let whole = !self.redis.is_cluster() && messages.len() <= SCRIPT_CHUNK;
        let mut savings = self.start(messages).await;
        self.claims(&mut savings, whole).await;
        self.finish(savings).await
    }

    /// The reader's step, then the sender's (module doc). Marking again changes nothing.
    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Receipt, StoreError> {
        let unknown = || StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string());
        let (script, now) = (&self.read_reader, now_ms());
        let call = {
            let mut call = self.invocation(script);
            call.key(message_key(reader_id, message_id))
                .arg(chat_id)
                .arg(reader_id)
                .arg(now);
            call
        };
        let reply: Vec<String> = self.redis.write_script("mark read", script, &call).await?;
        let message = match reply.split_first() {
            Some((status, fields)) if status == "ok" => {
                from_copy(message_id, fields).ok_or_else(unknown)?
            }
            Some((status, _)) if status == "forbidden" => {
                return Err(StoreError::NotReceiver(message_id.to_string()))
            }
            _ => return Err(unknown()),
        };
        let sender = &message.message.sender_id;
        let call = {
            let mut call = self.invocation(&self.read_sender);
            call.key(message_key(sender, message_id))
                .key(seq_key(sender))
                .key(inbox_key(sender))
                .arg(message_id)
                .arg(message.read_at.unwrap_or(now))
                .arg(reader_id)
                .arg(if message.message.group { "1" } else { "" });
            call
        };
        let seq: String = self
            .redis
            .write_script("mark read for the sender", &self.read_sender, &call)
            .await?;
        // '' when the sender's copy expired: nothing left to tell it about.
        let seq = seq.parse().map_err(|_| unknown())?;
        Ok(Receipt {
            message,
            seq,
            reader_id: reader_id.to_string(),
        })
    }

    async fn fetch(
        &self,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let script = &self.fetch;
        let reply: Vec<Vec<String>> = self
            .redis
            .call("fetch inbox", |mut c| async move {
                script
                    .key(seq_key(user_id))
                    .key(inbox_key(user_id))
                    .arg(after)
                    .arg(limit.min(MAX_PAGE))
                    .arg(message_prefix(user_id))
                    .arg(self.inbox_max_entries)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let bad = || StoreError::Unavailable("fetch script answered an unreadable reply".into());
        let (head, rows) = reply.split_first().ok_or_else(bad)?;
        let [oldest, latest] = head.as_slice() else {
            return Err(bad());
        };
        let mut page = InboxPage {
            entries: Vec::with_capacity(rows.len()),
            oldest: oldest.parse().map_err(|_| bad())?,
            latest: latest.parse().map_err(|_| bad())?,
        };
        for row in rows {
            let [seq, kind, id, reader, fields @ ..] = row.as_slice() else {
                return Err(bad());
            };
            let Some(message) = from_copy(id, fields) else {
                // Expired after an older entry that has not: the oldest still kept moves on.
                tracing::warn!(user = user_id, seq = %seq, "inbox entry whose message expired");
                continue;
            };
            let (kind, reader_id) = match kind.as_str() {
                "r" => (EntryKind::Receipt, message.message.receiver_id.clone()),
                "g" => (EntryKind::Receipt, reader.clone()),
                _ => (EntryKind::Message, String::new()),
            };
            page.entries.push(InboxEntry {
                seq: seq.parse().map_err(|_| bad())?,
                kind,
                message,
                reader_id,
            });
        }
        Ok(page)
    }

    async fn fetch_chat(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ChatPage, StoreError> {
        let script = &self.fetch_chat;
        let reply: Vec<Vec<String>> = self
            .redis
            .call("fetch chat history", |mut c| async move {
                script
                    .key(history_key(user_id, chat_id))
                    .arg(before.unwrap_or_default())
                    .arg(limit.min(MAX_HISTORY_PAGE))
                    .arg(message_prefix(user_id))
                    .arg(self.inbox_max_entries)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let bad = || StoreError::Unavailable("history script answered an unreadable reply".into());
        let (head, rows) = reply.split_first().ok_or_else(bad)?;
        let more = match head.first().map(String::as_str) {
            Some("none") => return Err(StoreError::NotMember(user_id.into(), chat_id.into())),
            Some("unknown") => {
                let before = before.unwrap_or_default();
                return Err(StoreError::UnknownMessage(before.into(), chat_id.into()));
            }
            Some("ok") => false,
            Some("more") => true,
            _ => return Err(bad()),
        };
        let mut page = ChatPage {
            messages: Vec::with_capacity(rows.len()),
            more,
        };
        for row in rows {
            let [id, fields @ ..] = row.as_slice() else {
                return Err(bad());
            };
            let message = from_copy(id, fields).ok_or_else(bad)?;
            // The user's copy holds its own place: the receiver's, or the sender's.
            let seq = message.seq_of(user_id);
            page.messages.push(HistoryMessage { message, seq });
        }
        Ok(page)
    }

    /// One `MGET` of the users' seq counters (a counter only grows with its inbox entry); on
    /// a cluster redis-rs splits it per slot and puts the answers back in order.
    async fn latest_seqs(&self, user_ids: &[&str]) -> Result<Vec<u64>, StoreError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = user_ids.iter().map(|u| seq_key(u)).collect();
        let keys = &keys;
        let seqs: Vec<Option<u64>> = self
            .redis
            .call("latest seqs", |mut c| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut c).await
            })
            .await?;
        Ok(seqs.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn create_group(
        &self,
        group_id: &str,
        creator: &str,
        members: &[String],
    ) -> Result<Vec<Member>, StoreError> {
        let roster = group_roster(group_id, creator, members, self.group_max_members)?;
        let mut call = self.group_create.prepare_invoke();
        call.key(members_key(group_id));
        for m in &roster {
            call.arg(&m.user_id);
        }
        let reply: String = self
            .redis
            .write_script("create group", &self.group_create, &call)
            .await?;
        match reply.as_str() {
            "ok" => Ok(roster),
            "exists" => Err(StoreError::GroupExists(group_id.to_string())),
            other => Err(StoreError::Unavailable(format!(
                "group script answered {other:?}"
            ))),
        }
    }

    async fn change_member(
        &self,
        group_id: &str,
        by: &str,
        user_id: &str,
        change: MemberChange,
    ) -> Result<Vec<Member>, StoreError> {
        let op = match change {
            MemberChange::Add(role) => role.as_str(),
            MemberChange::Remove => "remove",
        };
        let mut call = self.group_change.prepare_invoke();
        call.key(members_key(group_id))
            .arg(by)
            .arg(user_id)
            .arg(op)
            .arg(self.group_max_members);
        let reply: String = self
            .redis
            .write_script("change group member", &self.group_change, &call)
            .await?;
        let (g, by, user) = (group_id.to_string(), by.to_string(), user_id.to_string());
        match reply.as_str() {
            "ok" => Ok(self.read_members(&g).await?.unwrap_or_default()),
            "nogroup" => Err(StoreError::NoSuchGroup(g)),
            "notmember" => Err(StoreError::NotInGroup(by, g)),
            "gone" => Err(StoreError::NotInGroup(user, g)),
            "notadmin" => Err(StoreError::NotAdmin(by, g)),
            "lastadmin" => Err(StoreError::LastAdmin(user, g)),
            "full" => Err(StoreError::GroupFull(g, self.group_max_members)),
            other => Err(StoreError::Unavailable(format!(
                "group script answered {other:?}"
            ))),
        }
    }

    async fn members(&self, group_id: &str, asking: &str) -> Result<Vec<Member>, StoreError> {
        let members = self
            .read_members(group_id)
            .await?
            .ok_or_else(|| StoreError::NoSuchGroup(group_id.to_string()))?;
        if !members.iter().any(|m| m.user_id == asking) {
            return Err(StoreError::NotInGroup(asking.into(), group_id.into()));
        }
        Ok(members)
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(self.redis.ping().await?)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copys_fields_read_back_whatever_they_hold() {
        let fields = [
            "content",
            "12:ab:3:c\n\u{e9}\u{1f600}",
            "tempMessageId",
            "",
            "7",
            "::",
        ];
        let encoded = encode_fields(fields);
        assert!(encoded.starts_with("7:content16:12:ab"), "{encoded}");
        let decoded = decode_fields(&encoded).unwrap();
        assert_eq!(decoded["content"], fields[1]);
        assert_eq!(decoded["tempMessageId"], "");
        assert_eq!(decoded["7"], "::");
        // What a script appends (a receipt) reads as one more field.
        let marked = format!("{encoded}{}", encode_fields(["readAt", "5"]));
        assert_eq!(decode_fields(&marked).unwrap()["readAt"], "5");
    }

    #[test]
    fn a_string_that_is_no_copy_is_refused_not_misread() {
        for bad in ["5:abc", "x:abc", "3:abc", "3abc", "3:abc9:", "1:\u{e9}"] {
            assert_eq!(decode_fields(bad), None, "{bad:?}");
        }
        assert_eq!(decode_fields("").map(|f| f.len()), Some(0));
        // One string is a copy; several are a hash's fields and values.
        assert!(from_copy("m", &["5:abc".into()]).is_none());
        let flat: Vec<String> = [
            "senderId",
            "a",
            "receiverId",
            "b",
            "chatId",
            "c",
            "content",
            "hi",
            "timestamp",
            "1",
        ]
        .map(String::from)
        .to_vec();
        let m = from_copy("m", &flat).unwrap();
        assert_eq!((m.message.content.as_str(), m.message.timestamp), ("hi", 1));
        let one = encode_fields(flat.iter().map(String::as_str));
        assert_eq!(from_copy("m", &[one]).unwrap().message, m.message);
    }
}
