//! Consumer groups for applications.
//!
//! `GET /v1/events?group=g&member=i&members=n` gives member `i` of a group of `n`
//! every event of the aggregates that hash to it (type and id hashed as for partitions,
//! modulo `n`; see [`store::groups::member_of`]), in the region's gap-free commit order — so each
//! aggregate's events arrive at one member, in version order. Without an explicit resume
//! point (`after`, or `Last-Event-ID` on a stream) a member starts after its
//! acknowledged position, stored in PostgreSQL by
//! `POST /v1/groups/{group}/members/{member}/ack`; a restarted member resumes there.
//! Acknowledgements only move forward: a late or repeated one is ignored (200 with
//! `advanced: false`), because acks may be retried or reordered on the way.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::extract::{Path, json_object};
use super::{ApiError, AppState, EventsQuery};
use crate::store::groups::{self as store_groups, AckOutcome, GroupMember, GroupPosition};
use crate::store::{self, EventFilter, StoredEvent};

/// Most members a group may have.
pub const MAX_MEMBERS: u32 = 1024;

/// Most events one group page scans (its own and other members') before it answers,
/// so a member whose aggregates are quiet still gets an answer (and a `next` to resume
/// from) in bounded time.
const SCAN_BUDGET: usize = 20_000;

/// Events read from the store per round trip while scanning.
const SCAN_PAGE: i64 = 500;

/// Checks a group name: it is part of URLs.
fn validate_group(group: &str) -> Result<(), ApiError> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid group `{}`: use 1-64 characters of A-Z, a-z, 0-9 and `-_.`",
            super::shown(group)
        )))
    }
}

fn parse_count(name: &str, value: &str) -> Result<u32, ApiError> {
    value.trim().parse::<u32>().map_err(|_| {
        ApiError::bad_request(format!(
            "`{name}` must be a whole number, got `{}`",
            super::shown(value)
        ))
    })
}

/// Checks a member slot: `members` in 1..=MAX_MEMBERS, `member` below it.
fn slot(group: &str, member: u32, members: u32) -> Result<GroupMember, ApiError> {
    validate_group(group)?;
    if members == 0 || members > MAX_MEMBERS {
        return Err(ApiError::bad_request(format!(
            "`members` must be between 1 and {MAX_MEMBERS}, got {members}"
        )));
    }
    if member >= members {
        return Err(ApiError::bad_request(format!(
            "`member` must be below `members` (members are numbered 0 to {}), got member {member} of {members}",
            members - 1
        )));
    }
    Ok(GroupMember {
        group: group.to_string(),
        members,
        member,
    })
}

/// The group slot named by an events query, if any; 400 when it is incomplete or out
/// of range.
pub(super) fn from_query(query: &EventsQuery) -> Result<Option<GroupMember>, ApiError> {
    let Some(group) = &query.group else {
        if query.member.is_some() || query.members.is_some() {
            return Err(ApiError::bad_request(
                "`member` and `members` need `group`: send group=<name>&member=<i>&members=<n>",
            ));
        }
        return Ok(None);
    };
    let (Some(member), Some(members)) = (&query.member, &query.members) else {
        // Not checked yet: shown escaped and cut, as any name a client sent.
        let group = super::shown(group);
        return Err(ApiError::bad_request(format!(
            "group `{group}` needs both `member` (this member, from 0) and `members` (how many): send group={group}&member=<i>&members=<n>"
        )));
    };
    let member = parse_count("member", member)?;
    let members = parse_count("members", members)?;
    slot(group, member, members).map(Some)
}

/// Whether an event belongs to this member.
pub(super) fn keeps(slot: &GroupMember, event: &StoredEvent) -> bool {
    store_groups::member_of(&event.aggregate_type, &event.aggregate_id, slot.members) == slot.member
}

/// One page for a group member: up to `limit` of its events after `after`, and the
/// position to resume after — the last event *scanned*, which may be another member's.
pub(super) async fn page(
    state: &AppState,
    slot: &GroupMember,
    after: i64,
    limit: i64,
    filter: &EventFilter,
) -> Result<(Vec<StoredEvent>, i64), ApiError> {
    let mut events = Vec::new();
    let mut bytes = 0usize;
    let mut next = store::read::order_key(&state.pool, after).await?;
    let mut scanned = 0;
    'scan: while scanned < SCAN_BUDGET {
        let batch = store::read::read_after(
            &state.pool,
            next,
            None,
            SCAN_PAGE,
            store::read::PAGE_BYTES,
            filter,
        )
        .await?
        .events;
        if batch.is_empty() {
            break;
        }
        for (key, event) in batch {
            scanned += 1;
            next = key;
            if keeps(slot, &event) {
                bytes = bytes.saturating_add(event.bytes());
                events.push(event);
                if events.len() as i64 >= limit || bytes >= store::read::PAGE_BYTES {
                    break 'scan;
                }
            }
        }
    }
    Ok((events, next.position))
}

/// The body of an acknowledgement.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// The position to resume after: the last event this member has processed (or the
    /// `next` of a page it has processed; 0, a page from the beginning that found
    /// nothing, stores nothing).
    #[schema(minimum = 0)]
    pub position: i64,
    /// How many members the group has (the layout this member belongs to).
    #[schema(minimum = 1, maximum = 1024)]
    pub members: u32,
}

/// The outcome of an acknowledgement.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AckResult {
    /// The group.
    pub group: String,
    /// How many members.
    pub members: u32,
    /// This member.
    pub member: u32,
    /// The position now stored (the acknowledged one, or the one already ahead of it).
    pub position: i64,
    /// False when the stored position was already at or past the acknowledged one and
    /// stayed where it was.
    pub advanced: bool,
}

/// Acknowledge a group member's position: a restarted member resumes after it.
#[utoipa::path(
    post, path = "/v1/groups/{group}/members/{member}/ack",
    request_body = AckBody,
    params(("group" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$"), ("member" = u32, Path, maximum = 1023, description = "this member, from 0, below `members`")),
    responses(
        (status = 200, body = AckResult, description = "stored, or ignored (`advanced: false`) because the stored position is already at or past it"),
        (status = 400, body = super::ErrorBody, description = "bad group, member or members, or a position the tail has not delivered"),
    )
)]
pub(super) async fn ack(
    State(state): State<AppState>,
    Path((group, member)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<AckResult>, ApiError> {
    let member = parse_count("member", &member)?;
    let body: AckBody = json_object(&body).map_err(|e| {
        ApiError::bad_request(format!(
            r#"malformed acknowledgement: {e}; send {{"position": <position>, "members": <n>}}"#
        ))
    })?;
    let slot = slot(&group, member, body.members)?;
    if body.position < 0 {
        return Err(ApiError::bad_request(
            "`position` must be a position you received, or the `next` of a page (0 or above)",
        ));
    }
    let (position, advanced) = match store_groups::ack(&state.pool, &slot, body.position).await? {
        AckOutcome::Advanced => (body.position, true),
        AckOutcome::Ignored { stored } => (stored, false),
        AckOutcome::NotDelivered => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "position_not_delivered",
                format!(
                    "position {} was never delivered by the event tail (no such event, or it is not visible yet); acknowledge a position you received",
                    body.position
                ),
            ));
        }
    };
    Ok(Json(AckResult {
        group: slot.group,
        members: slot.members,
        member: slot.member,
        position,
        advanced,
    }))
}

/// A group's stored positions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GroupStatus {
    /// The group.
    pub group: String,
    /// Every stored position, by layout (`members`) and member.
    pub positions: Vec<GroupPosition>,
}

/// Show a group's acknowledged positions.
#[utoipa::path(
    get, path = "/v1/groups/{group}",
    params(("group" = String, Path, pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, body = GroupStatus), (status = 400, body = super::ErrorBody))
)]
pub(super) async fn status(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> Result<Json<GroupStatus>, ApiError> {
    validate_group(&group)?;
    let positions = store_groups::positions(&state.pool, &group).await?;
    Ok(Json(GroupStatus { group, positions }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(group: Option<&str>, member: Option<&str>, members: Option<&str>) -> EventsQuery {
        EventsQuery {
            after: None,
            after_event_id: None,
            limit: None,
            aggregate_type: None,
            aggregate_id: None,
            group: group.map(str::to_string),
            member: member.map(str::to_string),
            members: members.map(str::to_string),
        }
    }

    #[test]
    fn group_parameters_are_checked() {
        let ok = from_query(&query(Some("g"), Some("1"), Some("2")))
            .unwrap()
            .unwrap();
        assert_eq!((ok.member, ok.members), (1, 2));
        assert!(from_query(&query(None, None, None)).unwrap().is_none());
        for (g, m, n, says) in [
            (Some("g"), None, Some("2"), "needs both"),
            (Some("g"), Some("2"), Some("2"), "below `members`"),
            (Some("g"), Some("0"), Some("0"), "between 1 and"),
            (Some("g"), Some("x"), Some("2"), "whole number"),
            (Some("g g"), Some("0"), Some("2"), "invalid group"),
            (None, Some("0"), Some("2"), "need `group`"),
        ] {
            let err = from_query(&query(g, m, n)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains(says), "{}", err.message);
        }
    }
}
