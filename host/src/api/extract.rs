//! Extractors whose rejections are [`ApiError`]s: a bad query string or path gets the
//! same JSON error body (`{"error": {"code", "message"}}`) as every other mistake,
//! not axum's plain-text one, so clients parse one error shape.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;

/// `axum::extract::Query` with a JSON 400 on a malformed query string.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "{}; see /openapi.json for the parameters",
                rejection.body_text()
            ))),
        }
    }
}

/// `axum::extract::Path` with a JSON 400 on a path segment that is not valid UTF-8 or
/// not of the expected type.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// Parses a request body that must be a JSON object. serde also builds a struct from an
/// array of its fields in order (`[5, 2]`), which the API does not document and which
/// would quietly assign values by position; only an object is accepted.
pub fn json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if !is_object(body) {
        return Err("the body must be a JSON object".into());
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Whether JSON text is an object: whether its first non-blank byte opens one.
pub fn is_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Ack {
        position: i64,
        members: u32,
    }

    #[test]
    fn only_an_object_makes_a_body() {
        assert_eq!(
            json_object::<Ack>(br#" {"position": 5, "members": 2}"#),
            Ok(Ack {
                position: 5,
                members: 2
            })
        );
        // serde_json alone takes the array, field by field.
        assert!(serde_json::from_slice::<Ack>(b"[5, 2]").is_ok());
        for bad in [&b"[5, 2]"[..], b"", b"null", b"5"] {
            assert!(json_object::<Ack>(bad).is_err(), "{bad:?}");
        }
    }
}
