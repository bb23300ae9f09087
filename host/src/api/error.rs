//! The one error type of the HTTP API: a status, a stable code and a message that says
//! what to fix. Internal details (SQL, wasmtime internals) stay in the logs.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::executor::{CommandError, RegistryError};
use crate::runtime::PluginError;
use crate::store::StoreError;

/// An API error, rendered as `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// The JSON body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `rejected`, `version_conflict`, `unknown_aggregate_type`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 with code `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        }
        self.render()
    }
}

impl ApiError {
    /// The response, without the warning [`IntoResponse`] logs for a server error: for
    /// answers given so often that a line each would flood the log (a host turning
    /// commands away under overload).
    pub fn render(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        say_when_to_retry(&mut response);
        response
    }
}

/// Every 503 is worth retrying (a partition moving, the store or a home region
/// unreachable, the host full): says when, for clients and proxies that honour it. For
/// this host's answers and those it passes on from another host or region.
pub(super) fn say_when_to_retry(response: &mut Response) {
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::Conflict { .. } => {
                Self::new(StatusCode::CONFLICT, "version_conflict", error.to_string())
            }
            StoreError::CommandIdReused { .. } => {
                Self::new(StatusCode::CONFLICT, "command_id_reused", error.to_string())
            }
            StoreError::Fenced { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_owner",
                format!("{error}; retry the command"),
            ),
            StoreError::NotHome { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_home",
                format!("{error} (its home moved while the command ran); retry the command"),
            ),
            // Its own code: a client that follows the region resumes from the head (the
            // store was restored, or the address now reaches another region).
            StoreError::UnknownPosition(_) | StoreError::OtherEventAt { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                "unknown_position",
                error.to_string(),
            ),
            // Worth sending again (with Retry-After): the transaction ahead of it ends.
            StoreError::NotDelivered(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "position_not_delivered",
                error.to_string(),
            ),
            StoreError::PluginChanged { .. } | StoreError::LimitsOutdated { .. } => {
                Self::new(StatusCode::CONFLICT, "plugin_changed", error.to_string())
            }
            StoreError::LimitsChanged { .. } => {
                Self::new(StatusCode::CONFLICT, "limits_changed", error.to_string())
            }
            StoreError::Database(inner) => {
                tracing::error!(error = %inner, "database error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the event store is unavailable; retry later. A command may or may not have \
                     been stored (the store can fail as it commits): send it again with the same \
                     command_id (answered in x-meridian-command-id), which never applies twice",
                )
            }
            StoreError::NodeIdTaken { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_id_taken",
                error.to_string(),
            ),
            StoreError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                error.to_string(),
            ),
            StoreError::Unstorable(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unstorable",
                format!(
                    "{error}; nothing was written, and sending the same command again will fail the same way"
                ),
            ),
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(error: PluginError) -> Self {
        let code = match &error {
            PluginError::NotAComponent(_) => "not_a_component",
            PluginError::ForbiddenImport(_) => "forbidden_import",
            PluginError::UnsupportedVersion(_) => "unsupported_version",
            PluginError::WrongWorld(_) => "wrong_world",
            PluginError::TooLarge { .. } => {
                return Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "component_too_large",
                    error.to_string(),
                );
            }
            PluginError::DeadlineExceeded { .. } => "plugin_deadline_exceeded",
            PluginError::OutOfMemory { .. } => "plugin_out_of_memory",
            PluginError::Trap { .. } => "plugin_trapped",
            PluginError::InvalidOutput { .. } => "plugin_invalid_output",
            PluginError::ApplyFailed { .. } => "plugin_apply_failed",
            PluginError::Internal(_) => "internal",
        };
        let status = if refuses_the_component(&error) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self::new(status, code, error.to_string())
    }
}

/// What an upload is refused for: the component's bytes themselves (not a component,
/// an import or version not served, the wrong world, too large).
fn refuses_the_component(error: &PluginError) -> bool {
    matches!(
        error,
        PluginError::NotAComponent(_)
            | PluginError::ForbiddenImport(_)
            | PluginError::UnsupportedVersion(_)
            | PluginError::WrongWorld(_)
            | PluginError::TooLarge { .. }
    )
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::UnknownType(_) => Self::new(
                StatusCode::NOT_FOUND,
                "unknown_aggregate_type",
                error.to_string(),
            ),
            // What an upload is refused for, found in a stored version (its bytes
            // damaged, its limits changed under it): the request is not at fault, and
            // "build it with cargo" would send its sender the wrong way.
            RegistryError::Plugin(e) if refuses_the_component(&e) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_unloadable",
                format!(
                    "the stored plugin of this aggregate type does not load on this host: {e}; upload a working version, or set the type's limits back"
                ),
            ),
            RegistryError::Plugin(e) => e.into(),
            RegistryError::Store(e) => e.into(),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Rejected(message) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "rejected", message)
            }
            CommandError::WrongVersion { .. } => {
                Self::new(StatusCode::CONFLICT, "version_conflict", error.to_string())
            }
            CommandError::Conflict(e)
            | CommandError::Fenced(e)
            | CommandError::CommandIdReused(e)
            | CommandError::Store(e) => e.into(),
            CommandError::Registry(e) => e.into(),
            CommandError::Plugin(e) => e.into(),
            CommandError::EventTooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                error.to_string(),
            ),
        }
    }
}
