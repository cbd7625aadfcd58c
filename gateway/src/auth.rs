//! Authentication before the WebSocket upgrade.
//!
//! Refusals are HTTP errors with a JSON body: 401 when no credential was
//! presented, 403 when the credential is wrong.

use http::{HeaderMap, HeaderName, StatusCode};
use subtle::ConstantTimeEq;

/// A compiled auth mode.
#[derive(Clone)]
pub enum Auth {
    /// Anyone may connect.
    None,
    /// A key from a query parameter and/or header.
    ApiKey {
        /// Query parameter name.
        query: Option<String>,
        /// Header name.
        header: Option<HeaderName>,
        /// Accepted keys (never logged).
        keys: Vec<Vec<u8>>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::ApiKey {
                query,
                header,
                keys,
            } => f
                .debug_struct("ApiKey")
                .field("query", query)
                .field("header", header)
                .field("keys", &format_args!("<{} redacted>", keys.len()))
                .finish(),
        }
    }
}

/// Who connected, as far as auth could tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal(pub Option<String>);

/// Why a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub error: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl Auth {
    /// The mode's name, as written in the spec.
    pub fn mode(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::ApiKey { .. } => "api_key",
        }
    }

    /// Check a handshake request.
    pub fn check(&self, headers: &HeaderMap, query: &str) -> Result<Principal, AuthError> {
        match self {
            Auth::None => Ok(Principal(None)),
            Auth::ApiKey {
                query: qname,
                header,
                keys,
            } => {
                let from_header = header
                    .as_ref()
                    .and_then(|h| headers.get(h))
                    .map(|v| v.as_bytes().to_vec());
                let from_query = qname.as_ref().and_then(|q| {
                    form_urlencoded::parse(query.as_bytes())
                        .find(|(k, _)| k == q)
                        .map(|(_, v)| v.as_bytes().to_vec())
                });
                let Some(given) = from_header.or(from_query) else {
                    let mut wher = Vec::new();
                    if let Some(q) = qname {
                        wher.push(format!("query parameter `{q}`"));
                    }
                    if let Some(h) = header {
                        wher.push(format!("header `{h}`"));
                    }
                    return Err(AuthError {
                        status: StatusCode::UNAUTHORIZED,
                        error: "missing_api_key",
                        message: format!("an API key is required in the {}", wher.join(" or ")),
                    });
                };
                // Compare against every key without stopping early, so timing
                // does not tell which key (or how much of one) matched.
                let mut found: Option<usize> = None;
                for (i, k) in keys.iter().enumerate() {
                    let eq: bool = k.as_slice().ct_eq(given.as_slice()).into();
                    if eq && found.is_none() {
                        found = Some(i);
                    }
                }
                match found {
                    Some(i) => Ok(Principal(Some(format!("api_key#{i}")))),
                    None => Err(AuthError {
                        status: StatusCode::FORBIDDEN,
                        error: "invalid_api_key",
                        message: "the API key is not valid".into(),
                    }),
                }
            }
        }
    }
}
