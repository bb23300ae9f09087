//! The HTTP API (axum). Routes, request parsing and the OpenAPI document.
//!
//! Handlers stay thin: they validate input into typed requests, call the executor or
//! the store, and map errors through [`ApiError`]. Every error body is
//! `{"error": {"code", "message"}}`.

mod auth;
mod error;
mod extract;
mod groups;
mod regions;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::PgPool;
use utoipa::OpenApi;
use uuid::Uuid;

pub use auth::{Scope, Tokens};
pub use error::{ApiError, ErrorBody, ErrorDetail};

use extract::{Path, Query, is_object, json_object};

use crate::cluster::{Cluster, ClusterStatus, Dispatched, FORWARDED_HEADER, RouteError};
use crate::executor::history::{self, HistoryCheck, HistoryError};
use crate::executor::{Command, CommandResult, Executor};
use crate::runtime::SandboxLimits;
use crate::store::plugins::PluginInfo;
use crate::store::{self, AggregateKey, EventFilter, StoredEvent};

/// Default cap on a command request body.
pub const DEFAULT_MAX_COMMAND_BYTES: usize = 1024 * 1024;

/// Default cap on the commands one host runs or forwards at once.
pub const DEFAULT_MAX_COMMANDS_IN_FLIGHT: usize = 2048;

/// Default bound on live event streams per host (`MERIDIAN_MAX_EVENT_STREAMS`).
pub const DEFAULT_MAX_EVENT_STREAMS: usize = 1024;

/// What a host adds to a command body it forwards (the `command_id` it gives it, an
/// explicit `expected_version`); the owner takes that much over the limit from a peer,
/// so a command just under the limit is not refused by the host it is forwarded to.
const FORWARD_ALLOWANCE: usize = 1024;

/// Longest `x-correlation-id` a command may carry: it is an identifier, copied into
/// the metadata of every event the command decides.
pub const MAX_CORRELATION_ID_BYTES: usize = 128;

/// The `aggregate_type` label of command metrics for a type this host has no plugin
/// for.
const UNKNOWN_TYPE_LABEL: &str = "(unknown)";

/// Most events one page of `GET /v1/events` returns.
pub const MAX_PAGE: i64 = 10_000;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Runs commands.
    pub executor: Executor,
    /// Routes commands to partition owners.
    pub cluster: Cluster,
    /// The region's database.
    pub pool: PgPool,
    /// Set once the host has caught up and may take work.
    pub ready: Arc<AtomicBool>,
    /// This node's id. (`Arc<str>`: axum clones the state for every request.)
    pub node_id: Arc<str>,
    /// Cap on command bodies.
    pub max_command_bytes: usize,
    /// Cap on plugin uploads (the per-type cap applies too).
    pub max_upload_bytes: usize,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Bearer tokens; empty: authentication off.
    pub tokens: Tokens,
    /// Home regions and forwarding between regions.
    pub regions: crate::region::Regions,
    /// The shared reader behind every live event stream.
    pub tail: store::Tail,
    /// Admission: one permit per command this host is running or forwarding.
    pub commands_in_flight: Admission,
    /// Admission: one permit per live event stream (SSE) open on this host.
    pub event_streams: Admission,
    /// Cancelled when the host starts draining (SIGTERM): live streams end then.
    pub draining: tokio_util::sync::CancellationToken,
    /// How long an upload waits for every live host of the region to run the new
    /// version before it is answered anyway.
    pub plugin_rollout_timeout: std::time::Duration,
}

/// Bounds the commands one host works on at once. Past the bound a command is answered
/// 503 `overloaded` with `Retry-After` straight away, before anything is decided or
/// written, instead of queueing: under overload a queue only makes every command late,
/// and a client that gave up would still have its command run after it left.
///
/// Live event streams are bounded the same way ([`Admission::streams`]): each one
/// catching up holds a page of events in memory and reads through the pool commands
/// use, so without a bound enough readers would starve the commands.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<tokio::sync::Semaphore>,
    limit: usize,
    streams: bool,
}

impl Admission {
    /// Admits at most `limit` commands at once (at least one).
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            streams: false,
        }
    }

    /// Admits at most `limit` live event streams at once (at least one).
    pub fn streams(limit: usize) -> Self {
        Self {
            streams: true,
            ..Self::new(limit)
        }
    }

    /// A permit for one command, held until it is answered; `None` when the host is
    /// full.
    fn admit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.permits.try_acquire().ok()
    }

    /// A permit a live stream carries until it ends; `None` when the host is full.
    fn admit_owned(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Commands admitted and not yet answered.
    pub fn in_use(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// The answer to a command turned away (a 503, so with `Retry-After`; logged at
    /// debug level only, since under overload there is one per command).
    fn overloaded(&self) -> Response {
        if self.streams {
            metrics::counter!("meridian_event_streams_refused_total").increment(1);
            tracing::debug!(
                limit = self.limit,
                "event stream turned away: host at its limit"
            );
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "this host already serves {} live event streams (MERIDIAN_MAX_EVENT_STREAMS): \
                     retry after a moment (with Last-Event-ID to resume), or on another host",
                    self.limit
                ),
            )
            .render();
        }
        metrics::counter!("meridian_commands_overloaded_total").increment(1);
        tracing::debug!(limit = self.limit, "command turned away: host overloaded");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "this host is already working on {} commands (MERIDIAN_MAX_COMMANDS_IN_FLIGHT); \
                 nothing was written: retry after a moment, with the same command_id",
                self.limit
            ),
        )
        .render()
    }
}

/// Builds the router.
pub fn router(state: AppState) -> axum::Router {
    let command_limit = state.max_command_bytes;
    let tokens = state.tokens.clone();
    let upload_limit = state.max_upload_bytes;
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(render_metrics))
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{aggregate_type}",
            put(upload_plugin)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(get_plugin),
        )
        .route(
            "/v1/plugins/{aggregate_type}/limits",
            put(set_limits).get(get_limits),
        )
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}",
            post(execute)
                .layer(DefaultBodyLimit::max(command_limit + FORWARD_ALLOWANCE))
                .get(get_aggregate),
        )
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
            get(aggregate_events),
        )
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}/move-home",
            post(regions::move_home),
        )
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}/home",
            get(regions::get_home),
        )
        .route("/", get(status_page))
        .route("/v1/events", get(list_events))
        .route("/v1/events/head", get(events_head))
        .route("/v1/groups/{group}", get(groups::status))
        .route("/v1/groups/{group}/members/{member}/ack", post(groups::ack))
        .route("/v1/cluster", get(cluster_status))
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route does not take {method}; the Allow header lists what it takes"),
            )
        })
        .layer(axum::middleware::map_response_with_state(
            (command_limit, upload_limit),
            plain_errors_as_json,
        ))
        .layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::authenticate,
        ))
        .with_state(state)
}

/// The API as served to clients over HTTP: [`router`] without the headers only
/// another region may send, and with what an HTTP connection needs that a request
/// over NATS does not ([`close_when_body_unread`]).
///
/// A region forwarding a command names the home it forwarded to and the version at
/// which it knew it (NATS headers, answered by the same router). From a client, that
/// claim would send the host into waiting for a move that is not happening: a command
/// slot and a database poll every 50 ms for seconds, per request. (The hop count and
/// path are honoured from anyone: they can only make the sender's own request give up
/// sooner.)
pub fn for_clients(router: axum::Router) -> axum::Router {
    router
        .layer(axum::middleware::map_request(
            |mut request: axum::extract::Request| async move {
                let headers = request.headers_mut();
                headers.remove(crate::region::HOME_HEADER);
                headers.remove(crate::region::HOME_VERSION_HEADER);
                request
            },
        ))
        .layer(axum::middleware::from_fn(close_when_body_unread))
}

/// Counts the requests whose handlers are running: a response being written (a live
/// stream's included) no longer counts. A draining host tells by it the requests still
/// being worked on from answers whose clients stopped reading them, which only closing
/// their connections ends.
#[derive(Clone, Default)]
pub struct HandlersRunning(Arc<std::sync::atomic::AtomicUsize>);

impl HandlersRunning {
    /// Handlers running now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// `router` with every request counted while its handler runs.
    pub fn count_in(&self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(
            self.clone(),
            count_handler,
        ))
    }
}

/// Given back when the handler is done or dropped (its client went away).
struct HandlerRunning(HandlersRunning);

impl Drop for HandlerRunning {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn count_handler(
    State(running): State<HandlersRunning>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    running.0.fetch_add(1, Ordering::AcqRel);
    let _running = HandlerRunning(running);
    next.run(request).await
}

/// Answers `Connection: close` to a request whose body was not read to its end.
///
/// A handler refusing a request on its query or path (or a body over the limit) does
/// not read the body, and the server then closes the connection once it has answered,
/// since it cannot tell where the next request starts. Without this header the client
/// does not know: it sends its next request on that connection and gets it cut off
/// (`IncompleteMessage` in Rust's clients), a failure that has nothing to do with the
/// request.
async fn close_when_body_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    if axum::body::HttpBody::is_end_stream(&body) {
        return next
            .run(axum::extract::Request::from_parts(parts, body))
            .await;
    }
    let read = Arc::new(AtomicBool::new(false));
    let tracked = ReadToEnd {
        inner: body,
        read: read.clone(),
    };
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::new(tracked));
    let mut response = next.run(request).await;
    if !read.load(Ordering::Acquire) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that records whether it was read to its end.
struct ReadToEnd {
    inner: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        // A reader may stop at the last frame when the body says it has ended.
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// axum answers some mistakes itself, in plain text: a body over a route's limit, or
/// one that cannot be read (a broken chunked encoding, a body cut short). The API
/// answers every mistake in its one JSON error shape: the body over a limit names the
/// limits and their settings, any other such answer keeps its status and text.
async fn plain_errors_as_json(
    State((command_limit, upload_limit)): State<(usize, usize)>,
    response: Response,
) -> Response {
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !response.status().is_client_error() || json {
        return response;
    }
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is over this route's limit: a command takes at most {command_limit} bytes (MERIDIAN_MAX_COMMAND_BYTES), a plugin upload {upload_limit} (MERIDIAN_MAX_UPLOAD_BYTES), any other request 2 MiB"
            ),
        )
        .into_response();
    }
    let status = response.status();
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let said = match text.trim() {
        "" => status.canonical_reason().unwrap_or("bad request"),
        said => said,
    };
    ApiError::new(
        status,
        "bad_request",
        format!("{said}; fix the request and send it again"),
    )
    .into_response()
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Meridian",
        description = "Commands, events and plugins of a Meridian region."
    ),
    paths(
        healthz,
        readyz,
        list_plugins,
        upload_plugin,
        get_plugin,
        set_limits,
        get_limits,
        execute,
        get_aggregate,
        aggregate_events,
        regions::move_home,
        regions::get_home,
        list_events,
        events_head,
        groups::ack,
        groups::status,
        cluster_status
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        CommandBody,
        CommandResult,
        crate::executor::ResultEvent,
        StateBody,
        EventsPage,
        StoredEvent,
        PluginInfo,
        UploadResult,
        Rollout,
        HistoryCheck,
        PluginDetail,
        SandboxLimits,
        regions::MoveHomeBody,
        regions::MoveHomeResult,
        regions::HomeView,
        store::regions::RelayStatus,
        HostLoad,
        EventsHead,
        groups::AckBody,
        groups::AckResult,
        groups::GroupStatus,
        store::groups::GroupPosition
    )),
    modifiers(&SharedAnswers)
)]
pub struct ApiDoc;

/// Adds to the document what every `/v1` route shares rather than repeating it on each:
/// the bearer scheme of [`auth`] and its 401 and 403 answers.
struct SharedAnswers;

impl utoipa::Modify for SharedAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

        openapi.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "a token from MERIDIAN_TOKENS, needed only when the host has tokens configured",
                    ))
                    .build(),
            ),
        );
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for operation in [&mut item.get, &mut item.put, &mut item.post]
                .into_iter()
                .flatten()
            {
                // Optional: a host without tokens serves every route without one.
                operation.security = Some(vec![
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                    SecurityRequirement::default(),
                ]);
                let responses = &mut operation.responses.responses;
                responses.entry("401".into()).or_insert_with(|| {
                    error("no token, or an unknown one (hosts with tokens only)").into()
                });
                responses
                    .entry("403".into())
                    .or_insert_with(|| error("the token lacks the scope this route needs").into());
                // Every `/v1` route reads the database (or reaches another host or
                // region), and says so with a retryable 503 when it cannot.
                responses.entry("503".into()).or_insert_with(|| {
                    let mut answer = error(
                        "the database, NATS or another host is out of reach for now (`store_unavailable` and others); send again after Retry-After",
                    );
                    answer.headers.insert(
                        "Retry-After".into(),
                        utoipa::openapi::HeaderBuilder::new()
                            .schema(utoipa::openapi::schema::Object::with_type(
                                utoipa::openapi::schema::Type::Integer,
                            ))
                            .description(Some("seconds to wait before sending again"))
                            .build(),
                    );
                    answer.into()
                });
            }
        }
    }
}

async fn openapi() -> Response {
    (
        [("content-type", "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
        .into_response()
}

/// Prometheus metrics: commands by type and outcome, command latency, append batch
/// sizes, cache hits and loads, partitions owned, plugin time.
async fn render_metrics(State(state): State<AppState>) -> Response {
    // Read at scrape time rather than counted per command: exact, and free between
    // scrapes.
    metrics::gauge!("meridian_commands_in_flight").set(state.commands_in_flight.in_use() as f64);
    metrics::gauge!("meridian_cached_aggregates").set(state.executor.cached_aggregates() as f64);
    metrics::gauge!("meridian_cached_state_bytes").set(state.executor.cached_bytes() as f64);
    let (checking, waiting) = state.executor.plugins().runtime().checks();
    metrics::gauge!("meridian_plugin_uploads_checking").set(checking as f64);
    metrics::gauge!("meridian_plugin_uploads_waiting").set(waiting as f64);
    match &state.metrics {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not enabled on this host").into_response(),
    }
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: migrations applied, plugins compiled, caught up; only then does the
/// node take work.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "starting or draining")))]
async fn readyz(State(state): State<AppState>) -> Response {
    // Out of touch with the database for longer than a host may go without a
    // heartbeat, the host has most likely lost its partitions: send work elsewhere.
    if state.ready.load(Ordering::Acquire) && state.cluster.in_touch() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The path of an aggregate's routes, for the OpenAPI document only: handlers take the
/// raw strings and check them with [`validate_type`] and [`validate_id`], whose messages
/// say what to fix. Keep the patterns and those checks in step.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct AggregatePath {
    /// The aggregate type, as its plugin was uploaded.
    #[param(pattern = "^[a-z0-9_-]{1,64}$")]
    aggregate_type: String,
    /// The aggregate id, chosen by the caller.
    #[param(pattern = "^[A-Za-z0-9._:@+=-]{1,200}$")]
    aggregate_id: String,
}

/// The path of an aggregate type's routes, for the OpenAPI document only (see
/// [`AggregatePath`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct TypePath {
    /// The aggregate type.
    #[param(pattern = "^[a-z0-9_-]{1,64}$")]
    aggregate_type: String,
}

/// Checks an aggregate type name: it becomes part of URLs and NATS subjects.
pub fn validate_type(aggregate_type: &str) -> Result<(), ApiError> {
    let ok = !aggregate_type.is_empty()
        && aggregate_type.len() <= 64
        && aggregate_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid aggregate type `{}`: use 1-64 characters of a-z, 0-9, `-` and `_`",
            shown(aggregate_type)
        )))
    }
}

/// Checks an aggregate id.
pub fn validate_id(aggregate_id: &str) -> Result<(), ApiError> {
    // URL parsers resolve them away (`/t/..` is `/`): no client or forwarding host could
    // name such an aggregate in a path.
    if aggregate_id == "." || aggregate_id == ".." {
        return Err(ApiError::bad_request(format!(
            "invalid aggregate id `{aggregate_id}`: an id of only `.` or `..` cannot stand in a URL path"
        )));
    }
    let ok = !aggregate_id.is_empty()
        && aggregate_id.len() <= 200
        && aggregate_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+=".contains(&b));
    if ok {
        return Ok(());
    }
    // A query string decodes `+` to a space: `?aggregate_id=user+1` arrives as `user 1`.
    let hint = if aggregate_id.contains(' ') {
        " (in a query string `+` stands for a space: send a `+` as `%2B`)"
    } else {
        ""
    };
    Err(ApiError::bad_request(format!(
        "invalid aggregate id `{}`: use 1-200 characters of A-Z, a-z, 0-9 and `-_.:@+=`{hint}",
        shown(aggregate_id)
    )))
}

/// Whether a component's failure while it is validated (its `describe` run) is the
/// component's fault, a 400 for whoever uploads it or tightens its limits, rather than
/// the host's: it trapped, ran out of time or memory, or returned what the host refuses.
fn components_fault(error: &crate::runtime::PluginError) -> bool {
    use crate::runtime::PluginError;
    matches!(
        error,
        PluginError::Trap { .. }
            | PluginError::DeadlineExceeded { .. }
            | PluginError::OutOfMemory { .. }
            | PluginError::InvalidOutput { .. }
    )
}

/// A refused value as an error message quotes it: at most 80 characters and with
/// control characters escaped, so a megabyte of garbage or a NUL byte does not end up
/// in the answer and the logs as it came.
pub(super) fn shown(value: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = value
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

fn key(aggregate_type: String, aggregate_id: String) -> Result<AggregateKey, ApiError> {
    validate_type(&aggregate_type)?;
    validate_id(&aggregate_id)?;
    Ok(AggregateKey {
        aggregate_type,
        aggregate_id,
    })
}

/// The body of a command request.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The command, passed to the plugin as is, e.g. `{"type":"Deposit","amount":10}`.
    #[schema(value_type = Object)]
    pub command: Box<RawValue>,
    /// Idempotency key: sending the same id again returns the first result.
    pub command_id: Option<Uuid>,
    /// Refuse with 409 unless the aggregate is at this version (0: it has no events).
    #[schema(minimum = 0)]
    pub expected_version: Option<i64>,
}

/// Parses a command body with messages that say what to fix.
pub fn parse_command_body(body: &[u8]) -> Result<CommandBody, ApiError> {
    const SHAPE: &str = r#"send {"command": {...}, "command_id": "<uuid>" (optional), "expected_version": n (optional)}"#;
    let parsed: CommandBody = json_object(body)
        .map_err(|e| ApiError::bad_request(format!("malformed command request: {e}; {SHAPE}")))?;
    if !is_object(parsed.command.get().as_bytes()) {
        return Err(ApiError::bad_request(format!(
            "`command` must be a JSON object; {SHAPE}"
        )));
    }
    // The plugin may copy the command's strings and numbers into its events, which are
    // stored as `jsonb`: what `jsonb` refuses is refused here, with what to change.
    if let Err(e) = store::jsonb::check(parsed.command.get()) {
        return Err(ApiError::bad_request(format!(
            "`command` cannot be stored: {e}; remove or change that value"
        )));
    }
    non_negative("expected_version", parsed.expected_version)?;
    // The nil UUID is what an id field left at its default holds (the max one, a
    // placeholder): taken as an id, every command sent so would be answered as a repeat
    // of the first, and never run.
    if let Some(id) = parsed.command_id.filter(|id| id.is_nil() || id.is_max()) {
        return Err(ApiError::bad_request(format!(
            "`command_id` is the {} UUID, which cannot tell one command from another; \
             send a fresh random UUID (v4 or v7) per command, or leave it out",
            if id.is_nil() { "nil" } else { "max" }
        )));
    }
    Ok(parsed)
}

/// Execute a command on an aggregate.
#[utoipa::path(
    post, path = "/v1/aggregates/{aggregate_type}/{aggregate_id}",
    request_body = CommandBody,
    params(AggregatePath),
    responses(
        (status = 200, body = CommandResult, description = "events appended (or the stored result of a retried command id)",
            headers(
                ("x-meridian-command-id" = String, description = "the command's id: the `command_id` sent, or the one the host gave it (on every answer once the command has one)"),
                ("x-meridian-region" = String, description = "the region that ran the command, when regions are configured"),
            )),
        (status = 400, body = ErrorBody, description = "malformed request"),
        (status = 404, body = ErrorBody, description = "unknown aggregate type"),
        (status = 409, body = ErrorBody, description = "expected version does not match"),
        (status = 413, body = ErrorBody, description = "body too large, the command too large to forward to its home region (`too_large_to_forward`), or the command decided an event too large to relay to other regions (`event_too_large`)"),
        (status = 422, body = ErrorBody, description = "the plugin rejected the command"),
        (status = 500, body = ErrorBody, description = "the plugin failed (trapped, ran out of time or memory, returned invalid output), or the type's stored version does not load on this host (`plugin_unloadable`)"),
        (status = 502, body = ErrorBody, description = "the command ran in its home region, but the answer is too large to come back over NATS (`answer_too_large`); read the aggregate's events for the result"),
        (status = 503, body = ErrorBody, description = "store unavailable, partition moving, or the host overloaded (`overloaded`); send again with the same `command_id`",
            headers(("Retry-After" = u32, description = "seconds to wait before sending again"))),
    )
)]
async fn execute(
    State(state): State<AppState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut command_id = None;
    let mut response = run_command(
        &state,
        aggregate_type,
        aggregate_id,
        &headers,
        &body,
        &mut command_id,
    )
    .await
    .unwrap_or_else(IntoResponse::into_response);
    // Whatever the outcome, the caller learns the id the command ran (or may have run)
    // under: an answer lost or unclear (a timeout, the store failing mid-commit) is
    // settled by sending the command again with it, which never applies it twice.
    if let Some(id) = command_id {
        response.headers_mut().insert(
            COMMAND_ID_HEADER,
            HeaderValue::from_str(&id.to_string()).expect("a UUID is a header value"),
        );
    }
    response
}

/// The header every answer to a command carries once the command has an id: the one
/// sent as `command_id`, or the one the host gave it.
pub const COMMAND_ID_HEADER: &str = "x-meridian-command-id";

/// [`execute`], recording the command's id in `assigned` once it has one.
async fn run_command(
    state: &AppState,
    aggregate_type: String,
    aggregate_id: String,
    headers: &HeaderMap,
    body: &Bytes,
    assigned: &mut Option<Uuid>,
) -> Result<Response, ApiError> {
    let state = state.clone();
    let key = key(aggregate_type, aggregate_id)?;
    // From another host of the region (the owner's partition) or from another region.
    // A client's copy of the header (sent by mistake, or passed on by a proxy) would
    // have a host that does not own the aggregate answer `not_owner` for good rather
    // than forward it: only a member's name counts.
    let forwarded = headers
        .get(FORWARDED_HEADER)
        .and_then(|by| by.to_str().ok())
        .is_some_and(|by| state.cluster.is_member(by));
    // The size allowance of a forward (the id the first host added) is anyone's to take:
    // the route's body limit grants it to every request already, and a forward from a
    // host that joined a moment ago, not yet observed here, must not be refused for it.
    let from_peer =
        headers.contains_key(FORWARDED_HEADER) || headers.contains_key(crate::region::HOME_HEADER);
    if body.len() > state.max_command_bytes && !from_peer {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the command body is {} bytes; a command takes at most {} (MERIDIAN_MAX_COMMAND_BYTES)",
                body.len(),
                state.max_command_bytes
            ),
        ));
    }
    let mut body = parse_command_body(body)?;
    // The caller's own id is named even in an answer given before the command runs
    // (`overloaded`).
    *assigned = body.command_id;
    let correlation_id = correlation_id(headers)?;
    let Some(_permit) = state.commands_in_flight.admit() else {
        return Ok(state.commands_in_flight.overloaded());
    };
    // Every command gets an id at the host that first takes it, so a retry after a
    // lost answer (between hosts, or during a partition move) cannot apply it twice.
    let command_id = *body.command_id.get_or_insert_with(Uuid::now_v7);
    *assigned = Some(command_id);
    let correlation_id = correlation_id
        .map(str::to_string)
        .or_else(|| Some(command_id.to_string()));
    // What another host or region gets if the command is forwarded: the body with its
    // id filled in, the command's own bytes unchanged.
    let forward_body = serde_json::to_vec(&body).expect("command body serialises");
    // A type no plugin is uploaded for is refused before the aggregate's home is
    // settled: claiming one would leave an entry in the directory for an aggregate
    // that can never exist.
    if state.regions.enabled()
        && !state
            .executor
            .plugins()
            .knows(&key.aggregate_type)
            .await
            .map_err(ApiError::from)?
    {
        return Err(
            crate::executor::plugins::RegistryError::UnknownType(key.aggregate_type).into(),
        );
    }
    // Written only in its home region: anywhere else, the home region answers.
    if let Some(answer) = regions::route_command(&state, &key, headers, &forward_body).await? {
        return Ok(answer);
    }
    let routed_key = key.clone();
    let command = Command {
        key,
        body: body.command,
        command_id: Some(command_id),
        expected_version: body.expected_version,
        correlation_id,
        fence: None,
    };
    let aggregate_type = command.key.aggregate_type.clone();
    let started = std::time::Instant::now();
    // The correlation id travels with forwarded commands (header) and into the events'
    // metadata, so one command can be followed through every host's logs.
    let span = tracing::info_span!(
        "command",
        correlation_id = command.correlation_id.as_deref().unwrap_or_default(),
        aggregate = %command.key,
        forwarded_by = headers
            .get(FORWARDED_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    );
    let dispatched = {
        use tracing::Instrument;
        state
            .cluster
            .dispatch(
                command,
                &forward_body,
                forwarded,
                headers.get("authorization").and_then(|v| v.to_str().ok()),
            )
            .instrument(span.clone())
            .await
    };
    // The home moved away while this region still believed it was here: the append
    // was refused and nothing was written, so the command goes to the new home.
    if let Dispatched::Local(Err(crate::executor::CommandError::Store(
        store::StoreError::NotHome { .. },
    ))) = &dispatched
    {
        state.regions.forget(&routed_key);
        if let Some(answer) =
            regions::route_command(&state, &routed_key, headers, &forward_body).await?
        {
            return Ok(answer);
        }
    }
    match &dispatched {
        Dispatched::Local(Ok(result)) => span.in_scope(|| {
            tracing::debug!(
                version = result.version,
                events = result.events.len(),
                "executed here"
            )
        }),
        Dispatched::Forwarded { status, .. } => {
            span.in_scope(|| tracing::debug!(status = status.as_u16(), "answered by the owner"))
        }
        _ => {}
    }
    // Every distinct label is a series kept for the life of the process: a type taken
    // from the path as sent would let any caller grow them without bound.
    let aggregate_type = if state.executor.plugins().is_loaded(&aggregate_type) {
        aggregate_type
    } else {
        UNKNOWN_TYPE_LABEL.to_string()
    };
    metrics::histogram!("meridian_command_seconds", "aggregate_type" => aggregate_type.clone())
        .record(started.elapsed().as_secs_f64());
    let (outcome, response) = match dispatched {
        Dispatched::Local(Ok(result)) => ("ok", Json(result).into_response()),
        Dispatched::Local(Err(crate::executor::CommandError::Rejected(m))) => (
            "rejected",
            ApiError::from(crate::executor::CommandError::Rejected(m)).into_response(),
        ),
        Dispatched::Local(Err(error)) => ("error", ApiError::from(error).into_response()),
        Dispatched::Forwarded {
            status,
            region,
            body,
        } => {
            return Ok(regions::passed_on(status, region, body));
        }
        Dispatched::Refused(error @ RouteError::NotOwner { .. }) => (
            "error",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_owner",
                error.to_string(),
            )
            .into_response(),
        ),
        Dispatched::Refused(error @ RouteError::Unavailable { .. }) => (
            "error",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "partition_unavailable",
                error.to_string(),
            )
            .into_response(),
        ),
    };
    if !forwarded || outcome != "error" {
        metrics::counter!("meridian_commands_total", "aggregate_type" => aggregate_type, "outcome" => outcome).increment(1);
    }
    Ok(response)
}

/// The cluster as this host sees it: members, partition owners, epochs.
#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = RegionalStatus)))]
async fn cluster_status(State(state): State<AppState>) -> Json<RegionalStatus> {
    // Members and partitions come from memory: an operator looking during a database
    // outage needs them most, so a relay status that cannot be read does not take them
    // down with it.
    let (regions, regions_error) = if state.regions.enabled() {
        match store::regions::relay_status(&state.pool).await {
            Ok(regions) => (regions, None),
            Err(error) => {
                tracing::warn!(%error, "cannot read the relay's status");
                (
                    Vec::new(),
                    Some(format!("the relay's status cannot be read: {error}")),
                )
            }
        }
    } else {
        (Vec::new(), None)
    };
    Json(RegionalStatus {
        cluster: state.cluster.status(),
        region: state.regions.local().to_string(),
        regions,
        regions_error,
        load: HostLoad {
            commands_in_flight: state.commands_in_flight.in_use(),
            max_commands_in_flight: state.commands_in_flight.limit,
            event_streams_open: state.tail.open_streams(),
            max_event_streams: state.event_streams.limit,
        },
    })
}

/// What the answering host is working on right now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct HostLoad {
    /// Commands it is running or forwarding.
    pub commands_in_flight: usize,
    /// Past this many it answers 503 `overloaded` (`MERIDIAN_MAX_COMMANDS_IN_FLIGHT`).
    pub max_commands_in_flight: usize,
    /// Live event streams (SSE) open on it.
    pub event_streams_open: usize,
    /// Past this many live streams it answers 503 `overloaded`
    /// (`MERIDIAN_MAX_EVENT_STREAMS`).
    pub max_event_streams: usize,
}

/// `GET /v1/cluster`: this region's cluster, and the relay from every other region.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RegionalStatus {
    /// Members, partitions and epochs.
    #[serde(flatten)]
    pub cluster: ClusterStatus,
    /// This region.
    pub region: String,
    /// The relay from each other region (empty for a single region, or when it cannot
    /// be read: see `regions_error`).
    pub regions: Vec<store::regions::RelayStatus>,
    /// Why the relay's progress is missing: the database did not answer. The rest of
    /// the answer is the host's own view and is still given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions_error: Option<String>,
    /// The answering host's load.
    pub load: HostLoad,
}

/// An aggregate's current state.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StateBody {
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Its version.
    pub version: i64,
    /// The plugin version that computed the state.
    pub plugin_version: i32,
    /// The state as the plugin serialised it.
    #[schema(value_type = serde_json::Value)]
    pub state: Box<RawValue>,
}

/// Read an aggregate's current state.
#[utoipa::path(
    get, path = "/v1/aggregates/{aggregate_type}/{aggregate_id}",
    params(AggregatePath),
    responses(
        (status = 200, body = StateBody),
        (status = 400, body = ErrorBody, description = "malformed type or id"),
        (status = 404, body = ErrorBody, description = "no such type, or the aggregate has no events"),
        (status = 500, body = ErrorBody, description = "replaying the aggregate failed in the plugin (trapped, ran out of time or memory, returned invalid output), or the type's stored version does not load on this host (`plugin_unloadable`)"),
    )
)]
async fn get_aggregate(
    State(state): State<AppState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
) -> Result<Json<StateBody>, ApiError> {
    let key = key(aggregate_type, aggregate_id)?;
    // The owner answers from its cache, once the store's version (one index probe)
    // says it is current; any other host reads the store, uncached. The check is not
    // only for events from other regions, which reach the store around the cache: a
    // host back from a pause is ready again at its first heartbeat, before its next
    // read of the leases tells it that another host took its partitions and wrote on.
    let current = if state.cluster.owns(&key.aggregate_type, &key.aggregate_id) {
        let stored = store::read::stream_version(&state.pool, &key).await?;
        state.executor.state_as_stored(&key, stored).await?
    } else {
        state.executor.read_state(&key).await?
    };
    if current.version == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_aggregate",
            format!("{key} has no events yet"),
        ));
    }
    let json = String::from_utf8(current.state)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_invalid_output",
                format!("the plugin's state for {key} is not JSON"),
            )
        })?;
    Ok(Json(StateBody {
        aggregate_type: key.aggregate_type,
        aggregate_id: key.aggregate_id,
        version: current.version,
        plugin_version: current.plugin_version,
        state: json,
    }))
}

/// Query of an aggregate's events.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AggregateEventsQuery {
    /// Only events with a version above this.
    #[serde(default)]
    #[param(required = false, minimum = 0)]
    pub after_version: i64,
    /// Most events to return (default 1000, at most 10000; a page stops early once
    /// its events reach 16 MiB).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
}

/// A page of events.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    /// The events, in order.
    pub events: Vec<StoredEvent>,
    /// Pass as `after` (or `after_version`) to read the next page.
    pub next: i64,
}

/// Read one aggregate's events in version order.
#[utoipa::path(
    get, path = "/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
    params(AggregatePath, AggregateEventsQuery),
    responses(
        (status = 200, body = EventsPage),
        (status = 400, body = ErrorBody, description = "malformed type or id, bad limit or `after_version`"),
    )
)]
async fn aggregate_events(
    State(state): State<AppState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    Query(query): Query<AggregateEventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    let key = key(aggregate_type, aggregate_id)?;
    let limit = page_limit(query.limit)?;
    non_negative("after_version", Some(query.after_version))?;
    let after = query.after_version;
    let events = store::read::aggregate_page(
        &state.pool,
        &key,
        after.saturating_add(1),
        after.saturating_add(limit),
        store::read::PAGE_BYTES,
    )
    .await?
    .events;
    let next = events.last().map_or(after, |e| e.version);
    Ok(Json(EventsPage { events, next }))
}

/// The request's `x-correlation-id`, checked: it is an identifier copied into the
/// metadata of every event the request writes, so it must be short printable ASCII.
fn correlation_id(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("x-correlation-id") else {
        return Ok(None);
    };
    if value.len() > MAX_CORRELATION_ID_BYTES {
        return Err(ApiError::bad_request(format!(
            "`x-correlation-id` is {} bytes; use at most {MAX_CORRELATION_ID_BYTES} (it is stored with every event the request writes)",
            value.len()
        )));
    }
    value.to_str().map(Some).map_err(|_| {
        ApiError::bad_request("`x-correlation-id` must be printable ASCII (it is stored with every event the request writes)")
    })
}

/// Positions and versions start at 1, so a resume point or expected version below 0 is
/// a client bug (an unset variable, an overflow) better reported than read as 0.
fn non_negative(name: &str, value: Option<i64>) -> Result<(), ApiError> {
    match value {
        Some(v) if v < 0 => Err(ApiError::bad_request(format!(
            "`{name}` must be 0 or more, got {v}"
        ))),
        _ => Ok(()),
    }
}

fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(1000),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}, got {n}"
        ))),
    }
}

/// Query of the region's events.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Resume after the event at this position (0: from the beginning; absent: from the
    /// beginning, or for a group member from its acknowledged position).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// The id of the event received at `after` (not with `group`): checked, so that a
    /// position from another region, or from a store since restored from a backup, is
    /// refused (400 `unknown_position`) rather than resumed after another event. An
    /// SSE message's id carries it (`<position>:<event id>`).
    pub after_event_id: Option<Uuid>,
    /// Most events to return (default 1000, at most 10000; a page stops early once
    /// its events reach 16 MiB). A stream has no pages, but a value out of range is
    /// refused there too.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
    /// Only this aggregate type.
    #[param(pattern = "^[a-z0-9_-]{1,64}$")]
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    #[param(pattern = "^[A-Za-z0-9._:@+=-]{1,200}$")]
    pub aggregate_id: Option<String>,
    /// Consumer group: only the events of the aggregates that hash to `member` of
    /// `members`, starting after the member's acknowledged position unless `after` (or
    /// `Last-Event-ID`) is given.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub group: Option<String>,
    /// This group member, from 0 (with `group`), below `members`.
    #[param(value_type = Option<u32>, maximum = 1023)]
    pub member: Option<String>,
    /// How many members the group has (with `group`).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1024)]
    pub members: Option<String>,
}

/// Read the region's events in commit order: a page as JSON, or with
/// `Accept: text/event-stream` a live Server-Sent Events stream (catch-up, then new
/// events; SSE id = `<position>:<event id>`, resumable with `Last-Event-ID`). With
/// `group=<name>&member=<i>&members=<n>`, only member `i`'s share of the aggregates
/// (each aggregate's events at one member, in version order), from its acknowledged
/// position; a group page's `next` is the last position scanned, to acknowledge or
/// resume from.
#[utoipa::path(
    get, path = "/v1/events",
    params(EventsQuery),
    responses(
        (status = 200, body = EventsPage, description = "a page, or (text/event-stream) a live stream of `event` messages whose data is a StoredEvent"),
        (status = 400, body = ErrorBody, description = "unknown position, bad limit, a filter no aggregate could match, or bad group parameters"),
        (status = 503, body = ErrorBody, description = "a live stream asked of a host already serving `MERIDIAN_MAX_EVENT_STREAMS` (`overloaded`), or of a host shutting down (`draining`), or a resume position the feed has not reached yet (`position_not_delivered`: a transaction older than it still runs); with `Retry-After`: retry, on another host for `draining`, resuming with Last-Event-ID"),
    )
)]
async fn list_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let wants_stream = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    non_negative("after", query.after)?;
    // A filter no stored aggregate could match is a mistake to point out, not a query
    // to run: PostgreSQL would refuse some (a NUL byte) with an error that reads as the
    // store being down.
    if let Some(aggregate_type) = &query.aggregate_type {
        validate_type(aggregate_type)?;
    }
    if let Some(aggregate_id) = &query.aggregate_id {
        validate_id(aggregate_id)?;
    }
    let group = groups::from_query(&query)?;
    if query.after_event_id.is_some() && (query.after.is_none() || group.is_some()) {
        return Err(ApiError::bad_request(
            "after_event_id names the event received at `after`: send both, and not with `group` \
             (a group's positions are its own region's)",
        ));
    }
    // Checked for a stream too, which has no pages: a `limit` out of range is a mistake
    // either way, and the same query should not be refused or taken by its `Accept`.
    let limit = page_limit(query.limit)?;
    if wants_stream {
        return stream_events(state, &headers, query, group).await;
    }
    let filter = EventFilter {
        aggregate_type: query.aggregate_type,
        aggregate_id: query.aggregate_id,
        origin_region: None,
    };
    if let Some(group) = group {
        let after = match query.after {
            Some(after) => after,
            None => store::groups::start(&state.pool, &group).await?.0,
        };
        let (events, next) = groups::page(&state, &group, after, limit, &filter).await?;
        return Ok(Json(EventsPage { events, next }).into_response());
    }
    let after = query.after.unwrap_or(0);
    let from = store::read::order_key_of(&state.pool, after, query.after_event_id).await?;
    let events = store::read::read_all_after(&state.pool, from, limit, &filter).await?;
    let next = events.last().map_or(after, |e| e.position);
    Ok(Json(EventsPage { events, next }).into_response())
}

/// The region's current head.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsHead {
    /// Pass as `after` to read only what commits from now on (0: no events yet).
    pub position: i64,
}

/// The position of the newest event in the region's commit order: a resume token for
/// "from now on" (what the status page's live tail starts after).
#[utoipa::path(get, path = "/v1/events/head", responses((status = 200, body = EventsHead)))]
async fn events_head(State(state): State<AppState>) -> Result<Json<EventsHead>, ApiError> {
    Ok(Json(EventsHead {
        position: store::read::head(&state.pool).await?,
    }))
}

/// The status page: static HTML that reads the JSON endpoints and the event stream
/// with the token the user gives it, so it is served without one.
async fn status_page() -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
        ],
        include_str!("status_page.html"),
    )
        .into_response()
}

/// How long a live event stream waits before reading again after a database error.
const STREAM_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A `Last-Event-ID`: what a stream's message id was, `<position>:<event id>`, or a
/// bare position (the ids of earlier releases, or one a client made up from a page's
/// `next`), which cannot be checked against the store.
fn parse_last_event_id(text: &str) -> Result<(i64, Option<Uuid>), ApiError> {
    let text = text.trim();
    let (position, event_id) = match text.split_once(':') {
        Some((position, event_id)) => (position, Some(event_id)),
        None => (text, None),
    };
    let position = position.parse::<i64>().ok().filter(|p| *p >= 0);
    let event_id = event_id.map(|id| Uuid::try_parse(id).ok());
    match (position, event_id) {
        (Some(position), None) => Ok((position, None)),
        (Some(position), Some(Some(id))) => Ok((position, Some(id))),
        _ => Err(ApiError::bad_request(format!(
            "Last-Event-ID `{}` is not a resume point: send the `id` of the last event received \
             (`<position>:<event id>`, or a position, 0 or more)",
            shown(text)
        ))),
    }
}

/// `GET /v1/events` as Server-Sent Events: everything after the resume point (the
/// `after` parameter, or the `Last-Event-ID` header a browser's `EventSource` sends
/// when it reconnects), then new events as they commit. Each SSE event's id is the
/// event's position and id (checked on resume) and its data the event as JSON, so
/// resuming never skips or repeats.
/// A group member's stream keeps only its aggregates' events and, without a resume
/// point, starts after the member's acknowledged position.
async fn stream_events(
    state: AppState,
    headers: &HeaderMap,
    query: EventsQuery,
    group: Option<store::groups::GroupMember>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};

    // A resume point that cannot be read is refused: taken as absent, the stream would
    // start over from the beginning (or the group's position) without a word.
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| parse_last_event_id(&String::from_utf8_lossy(v.as_bytes())))
        .transpose()?;
    let (after, after_event_id) = match (last_event_id, query.after, &group) {
        (Some(resume), _, _) => resume,
        (None, Some(after), _) => (after, query.after_event_id),
        (None, None, Some(group)) => (store::groups::start(&state.pool, group).await?.0, None),
        (None, None, None) => (0, None),
    };
    let filter = EventFilter {
        aggregate_type: query.aggregate_type,
        aggregate_id: query.aggregate_id,
        origin_region: None,
    };
    // Resolve the resume point now, so a bad one is a 400 rather than a stream that ends.
    // (First: it may wait for the feed, and the host may start draining meanwhile.)
    let after = store::read::order_key_of(&state.pool, after, after_event_id).await?;
    // A draining host would end the stream at once, with a 200 and no events, and a
    // client reconnecting through the same load balancer would loop on it until the
    // listener closes: a 503 says to go elsewhere (or come back), as a full host does.
    if state.draining.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this host is shutting down and opens no new event streams: retry on another host of the region (with Last-Event-ID to resume)",
        ));
    }
    let Some(permit) = state.event_streams.admit_owned() else {
        return Ok(state.event_streams.overloaded());
    };
    let subscription = state.tail.subscribe(after, filter);
    let draining = state.draining.clone();
    // The permit goes with the stream, and is given back when the response is dropped
    // (the client went away, or the stream ended).
    let stream =
        futures::stream::unfold((subscription, permit), move |(mut subscription, permit)| {
            let group = group.clone();
            let draining = draining.clone();
            async move {
                loop {
                    // A draining host ends its streams: the server waits for every open
                    // response before it exits, and a stream would otherwise hold it until
                    // the drain timeout. Clients resume from their last id on another host.
                    let next = tokio::select! {
                        _ = draining.cancelled() => return None,
                        next = subscription.next() => next,
                    };
                    let event = match next {
                        Ok(event) => event,
                        Err(error) => {
                            tracing::warn!(%error, "event stream read failed; retrying");
                            tokio::select! {
                                _ = draining.cancelled() => return None,
                                _ = tokio::time::sleep(STREAM_RETRY) => continue,
                            }
                        }
                    };
                    // Another member's event: move past it without sending it.
                    if group.as_ref().is_some_and(|g| !groups::keeps(g, &event)) {
                        continue;
                    }
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    let sse = Event::default()
                        .id(format!("{}:{}", event.position, event.event_id))
                        .event("event")
                        .data(data);
                    return Some((
                        Ok::<_, std::convert::Infallible>(sse),
                        (subscription, permit),
                    ));
                }
            }
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The outcome of an upload.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UploadResult {
    /// Aggregate type.
    pub aggregate_type: String,
    /// The version these bytes have.
    pub version: i32,
    /// Hex sha256 of the component.
    pub sha256: String,
    /// Component size.
    pub size_bytes: i64,
    /// Schema version the plugin reports.
    pub schema_version: i32,
    /// The contract version the component implements, e.g. `meridian:aggregate@0.2.0`
    /// (0.1.0 components run too, with one more call per event).
    pub contract: String,
    /// The stored histories the component replayed before it was accepted; absent
    /// when the upload was forced or repeated the newest version's bytes.
    pub history_checked: Option<HistoryCheck>,
    /// True for `?dry_run=true`: everything was checked and nothing stored; `version`
    /// is the one the component would get in this region.
    pub dry_run: bool,
    /// Which hosts of the region run the version when the upload is answered; absent
    /// for a dry run.
    pub rollout: Option<Rollout>,
}

/// How far a stored version has reached the region's hosts. An upload is answered
/// once every live host runs it, so a command sent anywhere in the region after the
/// answer runs it; if some host has not compiled it within the host's
/// `MERIDIAN_PLUGIN_ROLLOUT_TIMEOUT_MS`, the answer names it (it runs the previous
/// version until it has).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Rollout {
    /// Live hosts of the region that run this version (or a newer one).
    pub hosts_running: usize,
    /// Live hosts that do not run it yet, by node id (empty when it runs everywhere).
    pub hosts_pending: Vec<String>,
}

/// Query of an upload.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Accept the component without replaying stored histories through it first (for
    /// a fix that must go out although some old aggregate no longer replays).
    #[serde(default)]
    #[param(required = false)]
    pub force: bool,
    /// Check the component (validation and stored histories) and store nothing: what
    /// a plugin's own pipeline runs before it uploads for real.
    #[serde(default)]
    #[param(required = false)]
    pub dry_run: bool,
}

/// Upload a plugin component (the raw `.wasm` bytes as the body).
#[utoipa::path(
    put, path = "/v1/plugins/{aggregate_type}",
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    params(TypePath, UploadQuery),
    responses(
        (status = 201, body = UploadResult, description = "stored as a new version"),
        (status = 200, body = UploadResult, description = "the same bytes as the newest version, or a dry run that passed (`dry_run: true`, nothing stored)"),
        (status = 400, body = ErrorBody, description = "not a component, forbidden import, wrong world or type"),
        (status = 409, body = ErrorBody, description = "`incompatible_with_history`: a stored aggregate of the type does not replay through the component (names it and the event); `plugin_changed`: another version was stored while this one was being checked (upload again); `limits_changed`: the type's limits were changed while it was being checked under the previous ones (upload again). Nothing was stored"),
        (status = 413, body = ErrorBody, description = "over the size cap"),
    )
)]
async fn upload_plugin(
    State(state): State<AppState>,
    Path(aggregate_type): Path<String>,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Result<(StatusCode, Json<UploadResult>), ApiError> {
    validate_type(&aggregate_type)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "empty body: send the component bytes, e.g. `curl -T plugin.wasm`",
        ));
    }
    let runtime = state.executor.plugins().runtime().clone();
    // Held until the upload is stored or refused; the limits are read once it is this
    // upload's turn, so a change of limits while it waited is not a conflict.
    let check = runtime.check_permit().await;
    let limits = store::plugins::limits(&state.pool, &aggregate_type).await?;
    let bytes = body.clone();
    let started = std::time::Instant::now();
    tracing::info!(
        aggregate_type,
        size = body.len(),
        "validating uploaded plugin"
    );
    let validated = runtime.validate(bytes, &limits).await.map_err(|e| {
        if components_fault(&e) {
            ApiError::new(StatusCode::BAD_REQUEST, "plugin_invalid", e.to_string())
        } else {
            e.into()
        }
    })?;
    // The catalogue stores it as a PostgreSQL INT; checked here, not in `validate`, so
    // that a version stored before this check (wrapped negative) does not block
    // changes of its type's limits, which validate the stored newest version again.
    let Ok(schema_version) = i32::try_from(validated.schema_version) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "plugin_invalid",
            format!(
                "the component's schema version {} is above {}, the largest Meridian stores; number schema versions from 1 up",
                validated.schema_version,
                i32::MAX
            ),
        ));
    };
    if validated.aggregate_type != aggregate_type {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "type_mismatch",
            format!(
                "the component describes itself as `{}` but was uploaded as `{aggregate_type}`; upload it to /v1/plugins/{}",
                shown(&validated.aggregate_type),
                shown(&validated.aggregate_type)
            ),
        ));
    }
    // Every command runs the newest version, replaying older aggregates through it:
    // one that cannot read their events would fail all of them from now on.
    let newest = state
        .regions
        .newest_plugin(&state.pool, &aggregate_type)
        .await?;
    let repeated = newest
        .as_ref()
        .is_some_and(|v| v.sha256.as_deref() == Some(validated.sha256.as_str()));
    let history_checked = if query.force || repeated {
        None
    } else {
        let checked = history::check(&state.pool, &validated.plugin, &aggregate_type)
            .await
            .map_err(|e| match e {
                HistoryError::Incompatible { .. } => ApiError::new(
                    StatusCode::CONFLICT,
                    "incompatible_with_history",
                    format!(
                        "this component cannot replay the stored events of `{aggregate_type}`: {e}. Nothing was stored. Stored events are facts: keep old event names and fields readable (e.g. `#[serde(alias = \"OldName\")]`, `#[serde(default)]`), or upload with ?force=true to make it the active version anyway"
                    ),
                ),
                HistoryError::Store(e) => e.into(),
            })?;
        Some(checked)
    };
    if query.dry_run {
        let version = match newest {
            Some(newest) if repeated => newest.version,
            Some(newest) => newest.version + 1,
            None => 1,
        };
        tracing::info!(
            aggregate_type,
            version,
            ?history_checked,
            "plugin checked, not stored (dry run)"
        );
        return Ok((
            StatusCode::OK,
            Json(UploadResult {
                aggregate_type,
                version,
                sha256: validated.sha256,
                size_bytes: body.len() as i64,
                schema_version,
                contract: validated.contract.to_string(),
                history_checked,
                dry_run: true,
                rollout: None,
            }),
        ));
    }
    let (info, created) = state
        .regions
        .register_plugin(
            &state.pool,
            &aggregate_type,
            crate::region::plugins::Component {
                sha256: &validated.sha256,
                schema_version,
                bytes: &body,
            },
            newest,
            query.force,
            &limits,
        )
        .await?;
    // Stored: a change of limits queued behind this upload now checks this version.
    drop(check);
    state.executor.plugins().invalidate(&aggregate_type).await;
    tracing::info!(
        aggregate_type,
        version = info.version,
        sha256 = %info.sha256,
        created,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "plugin stored"
    );
    // This host first (its validation's compile is cached, so this is quick); the
    // others load it when they hear of it.
    state.executor.plugins().get(&aggregate_type).await?;
    let rollout = wait_for_rollout(&state, &aggregate_type, info.version).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(UploadResult {
            aggregate_type,
            version: info.version,
            sha256: info.sha256,
            size_bytes: info.size_bytes,
            schema_version: info.schema_version,
            contract: validated.contract.to_string(),
            history_checked,
            dry_run: false,
            rollout: Some(rollout),
        }),
    ))
}

/// Waits until every live host of the region runs `version` of the type (or a newer
/// one), at most the host's rollout timeout.
async fn wait_for_rollout(
    state: &AppState,
    aggregate_type: &str,
    version: i32,
) -> Result<Rollout, ApiError> {
    let started = std::time::Instant::now();
    let mut said = std::time::Duration::ZERO;
    loop {
        let hosts = store::plugins::hosts_running(
            &state.pool,
            aggregate_type,
            version,
            state.cluster.dead_after(),
        )
        .await?;
        let hosts_pending: Vec<String> = hosts
            .iter()
            .filter(|(_, running)| !running)
            .map(|(node, _)| node.clone())
            .collect();
        let rollout = Rollout {
            hosts_running: hosts.len() - hosts_pending.len(),
            hosts_pending,
        };
        let waited = started.elapsed();
        if rollout.hosts_pending.is_empty() {
            tracing::info!(
                aggregate_type,
                version,
                hosts = rollout.hosts_running,
                waited_ms = waited.as_millis() as u64,
                "every host runs the new plugin version"
            );
            return Ok(rollout);
        }
        if waited >= state.plugin_rollout_timeout {
            tracing::warn!(aggregate_type, version, pending = ?rollout.hosts_pending, "answering the upload before every host runs the new version (they run the previous one until they have compiled it)");
            return Ok(rollout);
        }
        if waited >= said + std::time::Duration::from_secs(2) {
            said = waited;
            tracing::info!(aggregate_type, version, running = rollout.hosts_running, pending = ?rollout.hosts_pending, "waiting for the region's hosts to run the new plugin version");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// List the newest plugin of every aggregate type.
#[utoipa::path(get, path = "/v1/plugins", responses((status = 200, body = Object)))]
async fn list_plugins(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let plugins = store::plugins::list_latest(&state.pool).await?;
    Ok(Json(serde_json::json!({ "plugins": plugins })))
}

/// One aggregate type's plugin versions and limits.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PluginDetail {
    /// Aggregate type.
    pub aggregate_type: String,
    /// The version new commands run.
    pub active_version: i32,
    /// All versions, newest first.
    pub versions: Vec<PluginInfo>,
    /// The sandbox limits in force.
    pub limits: SandboxLimits,
}

/// Show an aggregate type's plugin versions and limits.
#[utoipa::path(
    get, path = "/v1/plugins/{aggregate_type}",
    params(TypePath),
    responses(
        (status = 200, body = PluginDetail),
        (status = 400, body = ErrorBody, description = "malformed type"),
        (status = 404, body = ErrorBody, description = "no plugin uploaded for the type"),
    )
)]
async fn get_plugin(
    State(state): State<AppState>,
    Path(aggregate_type): Path<String>,
) -> Result<Json<PluginDetail>, ApiError> {
    validate_type(&aggregate_type)?;
    let versions = store::plugins::versions(&state.pool, &aggregate_type).await?;
    let Some(active) = versions.first() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_aggregate_type",
            format!("no plugin is uploaded for aggregate type `{aggregate_type}`"),
        ));
    };
    let active_version = active.version;
    let limits = store::plugins::limits(&state.pool, &aggregate_type).await?;
    Ok(Json(PluginDetail {
        aggregate_type,
        active_version,
        versions,
        limits,
    }))
}

/// Show the sandbox limits of an aggregate type.
#[utoipa::path(
    get, path = "/v1/plugins/{aggregate_type}/limits",
    params(TypePath),
    responses(
        (status = 200, body = SandboxLimits),
        (status = 400, body = ErrorBody, description = "malformed type"),
    )
)]
async fn get_limits(
    State(state): State<AppState>,
    Path(aggregate_type): Path<String>,
) -> Result<Json<SandboxLimits>, ApiError> {
    validate_type(&aggregate_type)?;
    Ok(Json(
        store::plugins::limits(&state.pool, &aggregate_type).await?,
    ))
}

/// Query parameters of `PUT /v1/plugins/{aggregate_type}/limits`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LimitsQuery {
    /// Set the limits without replaying stored histories under them first (to stop a
    /// misbehaving plugin although some stored aggregate no longer runs under them).
    #[serde(default)]
    #[param(required = false)]
    pub force: bool,
}

/// Set the sandbox limits of an aggregate type (missing fields take their defaults).
#[utoipa::path(
    put, path = "/v1/plugins/{aggregate_type}/limits",
    request_body = SandboxLimits,
    params(TypePath, LimitsQuery),
    responses(
        (status = 200, body = SandboxLimits),
        (status = 400, body = ErrorBody, description = "a limit out of its range, or `limits_too_tight`: the type's newest version cannot start under them (names the limit); nothing was changed"),
        (status = 409, body = ErrorBody, description = "`plugin_changed`: a new version was stored while the limits were being checked against the one before (set them again); or `limits_too_tight_for_history`: a stored aggregate does not replay under them (names it and the cause; raise the limit, or `?force=true`). Nothing was changed"),
        (status = 500, body = ErrorBody, description = "`plugin_unloadable`: the type's stored newest version does not load on this host, so no limits can be checked against it; nothing was changed"),
    )
)]
async fn set_limits(
    State(state): State<AppState>,
    Path(aggregate_type): Path<String>,
    Query(query): Query<LimitsQuery>,
    body: Bytes,
) -> Result<Json<SandboxLimits>, ApiError> {
    validate_type(&aggregate_type)?;
    let limits: SandboxLimits =
        json_object(&body).map_err(|e| ApiError::bad_request(format!("malformed limits: {e}")))?;
    limits.validate().map_err(ApiError::bad_request)?;
    // Limits within their ranges can still be too tight for the component in use (too
    // little memory for its start-up, a deadline shorter than its instantiation): every
    // command of the type would then fail. Run the newest version under them first, as
    // an upload is run. (A size cap applies to uploads: below the version in use, it
    // only refuses larger ones from now on.)
    // After any upload of this host being checked: that one is stored by then, and
    // these limits are checked against it rather than refused for it.
    let _check = state.executor.plugins().runtime().check_permit().await;
    let latest = store::plugins::latest_with_bytes(&state.pool, &aggregate_type).await?;
    let checked_with = latest.as_ref().map(|(info, _)| info.version);
    if let Some((info, bytes)) = latest {
        let running = SandboxLimits {
            max_component_bytes: limits.max_component_bytes.max(bytes.len() as u64),
            ..limits
        };
        let validated = state
            .executor
            .plugins()
            .runtime()
            .validate(Bytes::from(bytes), &running)
            .await
            .map_err(|e| match e {
                e if components_fault(&e) => ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "limits_too_tight",
                    format!(
                        "version {} of `{aggregate_type}` cannot run under these limits ({e}); nothing was changed: raise the limit this names",
                        info.version
                    ),
                ),
                // The stored bytes themselves do not load: the host's fault, not the
                // limits' nor the request's.
                e => crate::executor::plugins::RegistryError::Plugin(e).into(),
            })?;
        // A stored aggregate whose state or events need more than these limits allow
        // (a state over `max_output_bytes`, a replay past the memory cap) would fail
        // every command and read from now on: its history is replayed under them
        // first, as an upload's is.
        if !query.force {
            history::check(&state.pool, &validated.plugin, &aggregate_type)
                .await
                .map_err(|e| match e {
                    HistoryError::Incompatible { .. } => ApiError::new(
                        StatusCode::CONFLICT,
                        "limits_too_tight_for_history",
                        format!(
                            "under these limits, version {} of `{aggregate_type}` cannot replay a stored aggregate: {e}. Nothing was changed: raise the limit this names, or set them with ?force=true",
                            info.version
                        ),
                    ),
                    HistoryError::Store(e) => e.into(),
                })?;
        }
    }
    store::plugins::set_limits(&state.pool, &aggregate_type, &limits, checked_with).await?;
    state.executor.plugins().invalidate(&aggregate_type).await;
    Ok(Json(limits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PluginError;

    #[test]
    fn a_last_event_id_is_a_position_with_the_event_s_id_or_a_bare_position() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_last_event_id(&format!("42:{id}")).unwrap(),
            (42, Some(id))
        );
        assert_eq!(parse_last_event_id(" 7 ").unwrap(), (7, None));
        for bad in ["", "-1", "x", "42:", "42:nope", ":", &format!("-3:{id}")] {
            let error = parse_last_event_id(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_component_that_fails_its_validation_is_refused_not_a_server_fault() {
        let invalid = PluginError::InvalidOutput {
            plugin: "t@v1".into(),
            call: "describe",
            message: "it passed the host more than 2 MiB in one call".into(),
        };
        assert!(components_fault(&invalid));
        assert!(!components_fault(&PluginError::Internal(
            "disk full".into()
        )));
    }

    /// Generated clients treat an answer the document does not list as undefined.
    #[test]
    fn the_document_lists_every_answer_a_command_can_get() {
        use utoipa::openapi::RefOr;
        let doc = ApiDoc::openapi();
        let execute = doc.paths.paths["/v1/aggregates/{aggregate_type}/{aggregate_id}"]
            .post
            .as_ref()
            .unwrap();
        let answers = &execute.responses.responses;
        for status in ["200", "400", "413", "422", "500", "502", "503"] {
            assert!(answers.contains_key(status), "execute lacks {status}");
        }
        let RefOr::T(ok) = &answers["200"] else {
            panic!("200 is inline")
        };
        assert!(ok.headers.contains_key("x-meridian-command-id"));
        for (path, item) in doc
            .paths
            .paths
            .iter()
            .filter(|(p, _)| p.starts_with("/v1/"))
        {
            for operation in [&item.get, &item.put, &item.post].into_iter().flatten() {
                assert!(
                    operation.responses.responses.contains_key("503"),
                    "{path} lacks 503"
                );
            }
        }
    }

    #[test]
    fn a_refused_value_is_quoted_short_and_escaped() {
        let quoted = shown(&format!("a\u{0}{}", "x".repeat(10_000)));
        assert!(quoted.starts_with("a\\0x"), "{quoted}");
        assert!(quoted.chars().count() <= 90, "{quoted}");
    }
}
