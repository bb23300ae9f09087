//! Region routes: forwarding commands to their home region, home moves, and the home
//! of an aggregate as this region sees it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::{Path, json_object};
use super::{ApiError, AppState, ErrorBody, key};
use crate::region::{
    self, HOME_HEADER, HOPS_HEADER, Home, MAX_HOPS, RegionError, Route, VIA_HEADER,
};
use crate::store::{self, AggregateKey};

impl From<RegionError> for ApiError {
    fn from(error: RegionError) -> Self {
        if let RegionError::Store(e) = error {
            return e.into();
        }
        let (status, code) = match &error {
            RegionError::HomeUnreachable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "home_region_unavailable")
            }
            RegionError::HomeTimedOut { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "home_region_timeout")
            }
            RegionError::DirectoryUnreachable { .. }
            | RegionError::PluginDirectoryUnreachable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "directory_unavailable")
            }
            RegionError::MoveInProgress { .. } => (StatusCode::SERVICE_UNAVAILABLE, "home_moving"),
            RegionError::TooManyHops { .. } => (StatusCode::SERVICE_UNAVAILABLE, "too_many_hops"),
            RegionError::TooLargeToForward { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large_to_forward")
            }
            RegionError::Config(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            RegionError::Nats(_) => (StatusCode::SERVICE_UNAVAILABLE, "nats_unavailable"),
            RegionError::Store(_) => unreachable!("handled above"),
        };
        ApiError::new(status, code, error.to_string())
    }
}

fn hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Decides where a command runs. `None`: here (the caller dispatches it in this
/// region's cluster); `Some`: the home region's answer, to return unchanged.
pub(super) async fn route_command(
    state: &AppState,
    key: &AggregateKey,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<Response>, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let claimed = header(HOME_HEADER).map(|home| {
        let known_at = header(region::HOME_VERSION_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (home, known_at)
    });
    match state.regions.route(key, claimed).await? {
        Route::Local => Ok(None),
        Route::Remote(home) => {
            let path = format!("/v1/aggregates/{}/{}", key.aggregate_type, key.aggregate_id);
            let answer = forward(state, key, &home, "POST", &path, headers, body).await?;
            let home = home.region;
            // The region asked passed the command on: the home moved since this host
            // looked. Only a command that ran says for sure where the home is now.
            let ran_in = answer
                .headers()
                .get(region::SERVED_BY_HEADER)
                .and_then(|v| v.to_str().ok());
            if answer.status().is_success()
                && let Some(ran_in) = ran_in
                && ran_in != home
            {
                tracing::debug!(aggregate = %key, stale = home, home = ran_in, "learned a new home");
                state.regions.learned_home(key, ran_in);
            }
            Ok(Some(answer))
        }
    }
}

/// Sends a request to another region, named with the version at which this region
/// knew it is the home, and returns its answer unchanged.
async fn forward(
    state: &AppState,
    key: &AggregateKey,
    home: &Home,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    // The header can come from a client: a huge value must not wrap past the limit.
    let hops = hops(headers).saturating_add(1);
    let via = match headers.get(VIA_HEADER).and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before},{}", state.regions.local()),
        None => state.regions.local().to_string(),
    };
    if hops > MAX_HOPS {
        return Err(RegionError::TooManyHops {
            aggregate: key.to_string(),
            hops,
            via: via.replace(',', " → "),
        }
        .into());
    }
    let mut pass = vec![
        (HOPS_HEADER, hops.to_string()),
        (VIA_HEADER, via),
        (region::HOME_VERSION_HEADER, home.known_at.to_string()),
    ];
    pass.extend(passed_headers(headers));
    let home = home.region.as_str();
    tracing::debug!(aggregate = %key, home, hops, "forwarding to the home region");
    let answer = match state
        .regions
        .forward(home, key, method, path, &pass, Bytes::copy_from_slice(body))
        .await
    {
        Ok(answer) => answer,
        Err(error) => {
            // The home may have moved away from a region that is gone (a forced move):
            // the next request looks it up again rather than trying the old one.
            if matches!(
                error,
                RegionError::HomeUnreachable { .. } | RegionError::HomeTimedOut { .. }
            ) {
                state.regions.forget(key);
            }
            return Err(error.into());
        }
    };
    metrics::counter!("meridian_region_forwards_total", "region" => answer.region.clone())
        .increment(1);
    // Region names are checked at start, so the header is always set; a name that is
    // not a header value would only lose the header, never the answer.
    let region = HeaderValue::from_str(&answer.region).ok();
    Ok(passed_on(answer.status, region, answer.body))
}

/// An answer another host or region gave, passed on unchanged: its status and JSON
/// body, and `x-meridian-region` when it names the region that ran the request.
pub(super) fn passed_on(status: StatusCode, region: Option<HeaderValue>, body: Bytes) -> Response {
    let mut response = (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response();
    if let Some(region) = region {
        response
            .headers_mut()
            .insert(region::SERVED_BY_HEADER, region);
    }
    // Only the status and body come back over the hop.
    super::error::say_when_to_retry(&mut response);
    response
}

/// A request to move an aggregate's home.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveHomeBody {
    /// The region that becomes the home.
    #[schema(min_length = 1)]
    pub region: String,
    /// Take the aggregate over in this region although its home cannot be reached.
    /// Events the old home committed but never relayed are lost (see the README).
    #[serde(default)]
    pub force: bool,
}

/// The outcome of a home move.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MoveHomeResult {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// The home before.
    pub from: String,
    /// The home now.
    pub to: String,
    /// The version of the move event.
    pub version: i64,
    /// True when the target region confirmed it holds every event up to the move
    /// (commands there run at once); false when it did not within half the forward
    /// timeout, 5 s by default (commands there wait for the events to arrive).
    pub target_has_all_events: bool,
}

/// Move an aggregate's home to another region (admin). Runs in the current home (any
/// region forwards it there); the move is an event in the aggregate's stream, and the
/// target starts writing only once it has received it, so it holds every earlier
/// event first. `force` runs in the target region without the old home.
#[utoipa::path(
    post, path = "/v1/aggregates/{aggregate_type}/{aggregate_id}/move-home",
    request_body = MoveHomeBody,
    params(super::AggregatePath),
    responses(
        (status = 200, body = MoveHomeResult),
        (status = 400, body = ErrorBody, description = "unknown region, or a forced move outside the target region"),
        (status = 404, body = ErrorBody, description = "the aggregate has no events"),
        (status = 409, body = ErrorBody, description = "already homed there (`already_home`)"),
        (status = 413, body = ErrorBody, description = "the request is too large to forward to the home region (`too_large_to_forward`)"),
        (status = 503, body = ErrorBody, description = "the home region is unreachable (use force to take over)"),
    )
)]
pub(super) async fn move_home(
    State(state): State<AppState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = key(aggregate_type, aggregate_id)?;
    let request: MoveHomeBody = json_object(&body).map_err(|e| {
        ApiError::bad_request(format!(
            r#"malformed move request: {e}; send {{"region": "<target region>", "force": false}}"#
        ))
    })?;
    let correlation_id = super::correlation_id(&headers)?;
    if !state.regions.enabled() {
        return Err(ApiError::bad_request(
            "this host runs a single region (no NATS configured); there is nowhere to move to",
        ));
    }
    if !state.regions.known().any(|r| r == request.region) {
        let known: Vec<&str> = state.regions.known().collect();
        return Err(ApiError::bad_request(format!(
            "unknown region `{}`; this region knows {}",
            super::shown(&request.region),
            known.join(", ")
        )));
    }
    let local = state.regions.local().to_string();
    if request.force && request.region != local {
        return Err(ApiError::bad_request(format!(
            "a forced move takes the aggregate over where it runs: send it to a host of region {}, not {local}",
            request.region
        )));
    }
    if !request.force {
        // Another region sent the move here as to the home: what this host remembers
        // may be older than what that region knew (a move back here that another host
        // of this region passed on), and trusting it would send the move back, again
        // and again until the hop limit. The stream row decides.
        if headers.get(HOME_HEADER).and_then(|v| v.to_str().ok()) == Some(local.as_str()) {
            state.regions.forget(&key);
        }
        // Not `home()`: that would claim a home for an aggregate that does not exist.
        let Some(home) = state.regions.existing_home(&key).await? else {
            return Err(ApiError::not_found(
                store::regions::MoveError::NotFound(key.to_string()).to_string(),
            ));
        };
        if home != local {
            return forward_move(&state, &key, home, &headers, &body).await;
        }
    }
    let metadata = serde_json::json!({
        "origin_region": local,
        "node_id": state.node_id,
        "correlation_id": correlation_id,
    });
    let moved = store::regions::move_home(
        &state.pool,
        &key,
        &local,
        &request.region,
        request.force,
        &metadata,
    )
    .await;
    let (version, from) = match moved {
        Ok(moved) => {
            state.regions.changes().events_committed();
            moved
        }
        // This host remembered itself as the home, but the home moved: the stream row
        // names the home now, which runs the move (or passes it on again, within the
        // hop limit).
        Err(store::regions::MoveError::NotHome { home, .. }) => {
            state.regions.forget(&key);
            return forward_move(&state, &key, home, &headers, &body).await;
        }
        Err(e @ store::regions::MoveError::NotFound(_)) => {
            return Err(ApiError::not_found(e.to_string()));
        }
        Err(e @ store::regions::MoveError::AlreadyThere { .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_home",
                e.to_string(),
            ));
        }
        Err(store::regions::MoveError::Store(e)) => return Err(e.into()),
    };
    state
        .regions
        .publish_home(&key, &request.region, version)
        .await;
    tracing::info!(aggregate = %key, from, to = request.region, version, forced = request.force, "home moved");
    let target_has_all_events = if request.region == local {
        true
    } else {
        wait_for_target(&state, &key, &request.region, version, &headers).await
    };
    Ok(Json(MoveHomeResult {
        aggregate_type: key.aggregate_type,
        aggregate_id: key.aggregate_id,
        from,
        to: request.region,
        version,
        target_has_all_events,
    })
    .into_response())
}

/// Sends a move to the aggregate's home region, which runs it.
async fn forward_move(
    state: &AppState,
    key: &AggregateKey,
    home: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let path = format!(
        "/v1/aggregates/{}/{}/move-home",
        key.aggregate_type, key.aggregate_id
    );
    let home = Home {
        region: home,
        known_at: 0,
    };
    forward(state, key, &home, "POST", &path, headers, body).await
}

/// Asks the target region until it reports the aggregate homed there at `version`.
///
/// The target authenticates the question like any request, so it carries the caller's
/// token (a move is an admin request, and the target's token list decides). It waits at
/// most half the forward timeout: a move forwarded here from another region must be
/// answered before that region gives up on it, or the caller is told the home did not
/// answer about a move that happened.
async fn wait_for_target(
    state: &AppState,
    key: &AggregateKey,
    target: &str,
    version: i64,
    headers: &HeaderMap,
) -> bool {
    let path = format!(
        "/v1/aggregates/{}/{}/home",
        key.aggregate_type, key.aggregate_id
    );
    let pass = passed_headers(headers);
    let deadline = tokio::time::Instant::now() + confirmation_wait(state);
    while tokio::time::Instant::now() < deadline {
        // One question may take the whole forward timeout (a target host that stopped
        // without leaving its queue group): the wait is bounded by the deadline instead.
        let asked = tokio::time::timeout_at(
            deadline,
            state
                .regions
                .forward(target, key, "GET", &path, &pass, Bytes::new()),
        )
        .await;
        if let Ok(Ok(answer)) = asked
            && let Ok(home) = serde_json::from_slice::<HomeView>(&answer.body)
            && home.home_region.as_deref() == Some(target)
            && home.version >= version
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// How long a move waits for its target to confirm: half the forward timeout.
fn confirmation_wait(state: &AppState) -> std::time::Duration {
    state.regions.config().forward_timeout / 2
}

/// The caller's headers a request to another region carries: its token (the other
/// region checks it again) and its correlation id.
fn passed_headers(headers: &HeaderMap) -> Vec<(&'static str, String)> {
    ["authorization", "x-correlation-id"]
        .into_iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name, value.to_string()))
        })
        .collect()
}

/// An aggregate's home as this region knows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HomeView {
    /// This region.
    pub region: String,
    /// The home named by this region's copy of the stream (`None`: no events here).
    pub home_region: Option<String>,
    /// The version this region holds.
    pub version: i64,
}

/// Where an aggregate is homed, according to this region's copy of its events.
#[utoipa::path(
    get, path = "/v1/aggregates/{aggregate_type}/{aggregate_id}/home",
    params(super::AggregatePath),
    responses(
        (status = 200, body = HomeView),
        (status = 400, body = ErrorBody, description = "malformed type or id"),
    )
)]
pub(super) async fn get_home(
    State(state): State<AppState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
) -> Result<Json<HomeView>, ApiError> {
    let key = key(aggregate_type, aggregate_id)?;
    let row = store::regions::home_and_version(&state.pool, &key).await?;
    let (home_region, version) = match row {
        Some((home, version)) => (Some(home), version),
        None => (None, 0),
    };
    Ok(Json(HomeView {
        region: state.regions.local().to_string(),
        home_region,
        version,
    }))
}
