//! Groups over REST: create one, list, add and remove members. The user acting is who a
//! WebSocket would be (`?userId=` in auth mode none, the token's user in mode token); the
//! store decides what that user may do (`store::MemberChange`) and answers the members.
//!
//! - `POST /api/groups` `{"groupId": G, "members": [U, ...]}`: 201, the caller is its admin
//! - `GET /api/groups/{G}/members`: for a member
//! - `POST /api/groups/{G}/members` `{"userId": U, "role": "member" | "admin"}`: by an admin
//! - `DELETE /api/groups/{G}/members/{U}`: by an admin, or U itself (leaving)

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::handshake::Refusal;
use super::rest::refusal;
use super::AppState;
use crate::chat::ids::now_ms;
use crate::protocol::is_valid_user_id;
use crate::store::{Member, MemberChange, Role, StoreError};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewGroup {
    group_id: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewMember {
    user_id: String,
    #[serde(default = "member")]
    role: Role,
}

fn member() -> Role {
    Role::Member
}

/// The user acting, or the refusal (`handshake::admit`, as a WebSocket would be).
fn acting(state: &AppState, headers: &HeaderMap, query: &RawQuery) -> Result<String, Refusal> {
    let config = &state.node.config;
    super::handshake::admit(config, query.0.as_deref(), headers, now_ms() / 1000)
        .map(|identity| identity.user_id)
}

/// The JSON body as `T`, or 400 saying what is wrong with it.
fn body<T: for<'de> Deserialize<'de>>(bytes: &[u8], shape: &str) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|e| {
        let why = format!("cannot read the body ({e}); expected {shape}");
        Refusal::new(StatusCode::BAD_REQUEST, "INVALID_BODY", why)
    })
}

/// 400 unless every id is a user id (a group's id is one too: it is a slot's hash tag).
fn check_ids<'a>(ids: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<(), Refusal> {
    for (name, id) in ids {
        if !is_valid_user_id(id) {
            let why = format!("{name} {id:?} must be 1-64 characters of A-Z a-z 0-9 _ . : @ -");
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "INVALID_FIELD", why));
        }
    }
    Ok(())
}

fn answer(state: &AppState, group_id: &str, result: Result<Vec<Member>, StoreError>) -> Response {
    match result {
        Ok(members) => Json(json!({
            "groupId": group_id,
            "members": members
                .iter()
                .map(|m| json!({ "userId": m.user_id, "role": m.role }))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => refusal(&state.node.store_refusal(&e)),
    }
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: RawQuery,
    bytes: Bytes,
) -> Response {
    let run = async {
        let user = acting(&state, &headers, &query)?;
        let shape = r#"{"groupId": "G", "members": ["U", ...]}"#;
        let g: NewGroup = body(&bytes, shape)?;
        let ids = g.members.iter().map(|m| ("a member", m.as_str()));
        check_ids([("groupId", g.group_id.as_str())].into_iter().chain(ids))?;
        let created = state
            .node
            .backends
            .store
            .create_group(&g.group_id, &user, &g.members);
        let response = answer(&state, &g.group_id, created.await);
        Ok::<_, Refusal>(if response.status() == StatusCode::OK {
            (StatusCode::CREATED, response).into_response()
        } else {
            response
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn list(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    let run = async {
        let user = acting(&state, &headers, &query)?;
        check_ids([("groupId", group_id.as_str())])?;
        let members = state.node.backends.store.members(&group_id, &user).await;
        Ok::<_, Refusal>(answer(&state, &group_id, members))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn add(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
    bytes: Bytes,
) -> Response {
    let run = async {
        let by = acting(&state, &headers, &query)?;
        let m: NewMember = body(&bytes, r#"{"userId": "U", "role": "member" or "admin"}"#)?;
        check_ids([
            ("groupId", group_id.as_str()),
            ("userId", m.user_id.as_str()),
        ])?;
        let store = &state.node.backends.store;
        let changed = store.change_member(&group_id, &by, &m.user_id, MemberChange::Add(m.role));
        Ok::<_, Refusal>(answer(&state, &group_id, changed.await))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn remove(
    State(state): State<AppState>,
    Path((group_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    let run = async {
        let by = acting(&state, &headers, &query)?;
        check_ids([("groupId", group_id.as_str()), ("userId", user_id.as_str())])?;
        let store = &state.node.backends.store;
        let changed = store.change_member(&group_id, &by, &user_id, MemberChange::Remove);
        Ok::<_, Refusal>(answer(&state, &group_id, changed.await))
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}
