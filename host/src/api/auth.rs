//! Bearer tokens with scopes.
//!
//! When tokens are configured (`MERIDIAN_TOKENS` or `MERIDIAN_TOKENS_FILE`), every
//! route but `/healthz`, `/readyz` and `/` (the status page) needs
//! `Authorization: Bearer <token>`: `read` for events, state, plugins and cluster
//! status, `write` for commands, `admin` for uploading plugins and changing limits;
//! `admin` also grants the other two. No token is a 401, a token without the scope a
//! 403. Hosts forward a command with the
//! caller's `Authorization` header, so the owner checks the same token.
//!
//! A consumer group's acknowledgement (`POST /v1/groups/...`) needs `read` only: the
//! position is the consumer's own state, not the region's data. The status page at `/`
//! is static HTML with no data in it, so it is served without a token; it asks for one
//! and sends it with every request it makes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Read events, state, plugins, cluster status, metrics.
    Read,
    /// Send commands.
    Write,
    /// Upload plugins, change limits; implies read and write.
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text.trim() {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// The configured tokens. Empty: authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Arc<HashMap<String, Vec<Scope>>>,
}

impl Tokens {
    /// Parses `token:scope[+scope...]` entries separated by commas or newlines (a
    /// file may also use `token scope scope` per line; `#` starts a comment).
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut tokens = HashMap::new();
        for entry in text.split([',', '\n']) {
            let entry = entry.split('#').next().unwrap_or_default().trim();
            if entry.is_empty() {
                continue;
            }
            let (token, scopes) = entry.split_once([':', ' ']).ok_or_else(|| {
                format!(
                    "token entry `{}` has no scopes; write `<token>:read+write`",
                    mask(entry)
                )
            })?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(format!(
                    "token `{}` is shorter than 16 characters",
                    mask(token)
                ));
            }
            let scopes = scopes
                .split(['+', ' '])
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    // Masked: in `secret:more-secret read` the scope is part of a secret.
                    Scope::parse(s).ok_or_else(|| {
                        format!(
                            "unknown scope `{}` for token `{}`; use read, write or admin",
                            mask(s),
                            mask(token)
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if scopes.is_empty() {
                return Err(format!(
                    "token `{}` has no scopes; write `<token>:read+write`",
                    mask(token)
                ));
            }
            tokens.insert(token.to_string(), scopes);
        }
        Ok(Tokens {
            tokens: Arc::new(tokens),
        })
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn scopes(&self, presented: &str) -> Option<&[Scope]> {
        // Compare every configured token in full, so timing says nothing about which
        // prefix matched.
        let mut found = None;
        for (token, scopes) in self.tokens.iter() {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(scopes.as_slice());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token in an `Authorization` value. The scheme name is case-insensitive
/// (RFC 9110 §11.1), so `bearer x` is as good as `Bearer x`.
fn bearer(value: &str) -> Result<&str, &'static str> {
    let (scheme, token) = value.trim().split_once(' ').ok_or("it holds no token")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("only the `Bearer` scheme is accepted");
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("it holds no token");
    }
    Ok(token)
}

fn mask(token: &str) -> String {
    format!("{}…", token.chars().take(4).collect::<String>())
}

/// The scope a request needs, or `None` for the open probes.
fn required(method: &Method, path: &str) -> Option<Scope> {
    // axum answers HEAD with the GET handler, so HEAD must need what GET needs.
    let reads = method == Method::GET || method == Method::HEAD;
    if path == "/healthz" || path == "/readyz" || (path == "/" && reads) {
        return None;
    }
    if path.starts_with("/v1/groups/") {
        return Some(Scope::Read);
    }
    if path.starts_with("/v1/plugins") && !reads {
        return Some(Scope::Admin);
    }
    if let Some(rest) = path.strip_prefix("/v1/aggregates/")
        && method == Method::POST
    {
        // `{type}/{id}/move-home`: moving a home (and forcing one) decides where an
        // aggregate may be written, an operator's call; an id that happens to read
        // `move-home` is a command like any other.
        let is_move = matches!(rest.split('/').collect::<Vec<_>>()[..], [_, _, "move-home"]);
        return Some(if is_move { Scope::Admin } else { Scope::Write });
    }
    Some(Scope::Read)
}

/// Middleware enforcing the tokens.
pub async fn authenticate(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    if !tokens.enabled() {
        return next.run(request).await;
    }
    let Some(needed) = required(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let presented = request.headers().get("authorization").map(|v| {
        v.to_str()
            .map_err(|_| "it is not ASCII text")
            .and_then(bearer)
    });
    if let Some(Err(problem)) = presented {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("the `Authorization` header cannot be read: {problem}; send `Authorization: Bearer <token>`"),
        )
        .into_response();
    }
    let Some(Ok(presented)) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("this host requires a token: send `Authorization: Bearer <token>` with the `{}` scope", needed.as_str()),
        )
        .into_response();
    };
    match tokens.scopes(presented) {
        None => ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown token")
            .into_response(),
        Some(scopes) if scopes.contains(&needed) || scopes.contains(&Scope::Admin) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token lacks the `{}` scope needed here",
                needed.as_str()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_refuses_bad_ones() {
        let tokens = Tokens::parse("aaaaaaaaaaaaaaaa:read+write, bbbbbbbbbbbbbbbb:admin").unwrap();
        assert_eq!(
            tokens.scopes("aaaaaaaaaaaaaaaa"),
            Some(&[Scope::Read, Scope::Write][..])
        );
        assert_eq!(tokens.scopes("nope"), None);
        assert!(Tokens::parse("short:read").is_err());
        assert!(Tokens::parse("aaaaaaaaaaaaaaaa:root").is_err());
        assert!(!Tokens::parse("").unwrap().enabled());
        // A token that can do nothing is a mistake, not a token.
        assert!(Tokens::parse("aaaaaaaaaaaaaaaa:").is_err());
    }

    #[test]
    fn an_unknown_scope_does_not_print_what_may_be_a_secret() {
        // A token with a colon in it: what follows reads as scopes.
        let error = Tokens::parse("0123456789abcdef:SECRETPART read").unwrap_err();
        assert!(error.contains("unknown scope"), "{error}");
        assert!(!error.contains("SECRETPART"), "{error}");
    }

    #[test]
    fn routes_need_the_right_scope() {
        assert_eq!(required(&Method::GET, "/healthz"), None);
        assert_eq!(required(&Method::PUT, "/v1/plugins/x"), Some(Scope::Admin));
        assert_eq!(
            required(&Method::POST, "/v1/aggregates/t/i"),
            Some(Scope::Write)
        );
        assert_eq!(
            required(&Method::POST, "/v1/aggregates/t/i/move-home"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required(&Method::POST, "/v1/aggregates/t/move-home"),
            Some(Scope::Write)
        );
        assert_eq!(required(&Method::GET, "/v1/events"), Some(Scope::Read));
        assert_eq!(
            required(&Method::POST, "/v1/groups/g/members/0/ack"),
            Some(Scope::Read)
        );
        assert_eq!(required(&Method::GET, "/"), None);
        assert_eq!(required(&Method::POST, "/"), Some(Scope::Read));
        assert_eq!(required(&Method::HEAD, "/"), None);
        assert_eq!(required(&Method::HEAD, "/v1/plugins/x"), Some(Scope::Read));
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_case() {
        assert_eq!(bearer("Bearer abc"), Ok("abc"));
        assert_eq!(bearer("bearer  abc "), Ok("abc"));
        assert_eq!(bearer("BEARER abc"), Ok("abc"));
        assert!(bearer("Basic YWxhZGRpbjpvcGVu").is_err());
        assert!(bearer("Bearer").is_err());
    }
}
