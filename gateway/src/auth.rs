//! Authentication: before the WebSocket upgrade (API keys, JWT from a
//! header or query parameter) and in-band (a JWT or a handshake in the
//! client's first message).
//!
//! Refusals before the upgrade are HTTP errors with a JSON body: 401 when no
//! credential was presented or a token is not valid, 403 when an API key is
//! wrong or the Origin is not allowed.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use crate::jwt::JwtVerifier;
use crate::template::{Template, get_path};

/// JWT settings of an endpoint.
pub struct JwtAuth {
    /// The verifier (algorithm pinned).
    pub verifier: JwtVerifier,
    /// Accept `Authorization: Bearer`.
    pub bearer: bool,
    /// Accept this query parameter.
    pub query: Option<String>,
    /// Accept a first message.
    pub inband: Option<Inband>,
}

/// An in-band first message: a JWT carrier or a handshake.
#[derive(Debug)]
pub struct Inband {
    /// Fields identifying the message.
    pub match_fields: Map<String, Value>,
    /// JWT: path of the token.
    pub token_field: Option<Vec<String>>,
    /// Handshake: fields that must be present.
    pub required: Vec<String>,
    /// Reply on success.
    pub reply: Option<Template>,
    /// Reply on failure.
    pub error_reply: Option<Template>,
    /// JSON Schema both replies must satisfy.
    pub schema: Option<Arc<jsonschema::Validator>>,
    /// Time allowed.
    pub timeout: Duration,
    /// Actions answered before it.
    pub allow_before: Vec<String>,
}

impl Inband {
    /// Whether `msg` is this message.
    pub fn matches(&self, msg: &Value) -> bool {
        self.match_fields.iter().all(|(k, v)| msg.get(k) == Some(v))
    }
}

/// The outcome of an in-band message.
pub enum InbandResult {
    /// Accepted; the principal, if any, and when its token expires (with
    /// `close_at_exp`).
    Accepted(Option<String>, Option<SystemTime>),
    /// Refused: (code, message).
    Refused(&'static str, String),
}

/// One accepted API key, kept as its SHA-256 digest.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
    principal: String,
}

impl ApiKey {
    /// An accepted key. Its principal, `api_key:` and the first 16 hex
    /// digits of the key's SHA-256, names the key wherever it is listed:
    /// one key on two endpoints is one principal, two keys are two, and a
    /// key keeps its name when others are added or removed. (It names the
    /// key without giving it away: 64 bits of a hash cannot be turned back
    /// into a key of any useful length.)
    pub fn new(key: &[u8]) -> ApiKey {
        let d = ring::digest::digest(&ring::digest::SHA256, key);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(d.as_ref());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        ApiKey {
            digest,
            principal: format!("api_key:{hex}"),
        }
    }
}

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
        keys: Vec<ApiKey>,
        /// What the operator should hear about them (short keys).
        warnings: Vec<String>,
    },
    /// A signed JWT.
    Jwt(Arc<JwtAuth>),
    /// An in-band handshake message.
    Handshake(Arc<Inband>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::ApiKey {
                query,
                header,
                keys,
                ..
            } => f
                .debug_struct("ApiKey")
                .field("query", query)
                .field("header", header)
                .field("keys", &format_args!("<{} redacted>", keys.len()))
                .finish(),
            Auth::Jwt(j) => f
                .debug_struct("Jwt")
                .field("verifier", &j.verifier)
                .field("bearer", &j.bearer)
                .field("query", &j.query)
                .field("inband", &j.inband)
                .finish(),
            Auth::Handshake(h) => f.debug_tuple("Handshake").field(h).finish(),
        }
    }
}

/// Who connected, as far as auth could tell, and when the credential stops
/// holding the connection open (a JWT's `exp` plus leeway, with
/// `close_at_exp`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal(pub Option<String>, pub Option<SystemTime>);

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
            Auth::Jwt(_) => "jwt",
            Auth::Handshake(_) => "handshake",
        }
    }

    /// The in-band message this mode may wait for after the upgrade.
    pub fn inband(&self) -> Option<&Inband> {
        match self {
            Auth::Jwt(j) => j.inband.as_ref(),
            Auth::Handshake(h) => Some(h),
            _ => None,
        }
    }

    /// What the operator should be told about this mode's settings.
    pub fn warnings(&self) -> &[String] {
        match self {
            Auth::Jwt(j) => j.verifier.warnings(),
            Auth::ApiKey { warnings, .. } => warnings,
            _ => &[],
        }
    }

    /// Whether the mode can only be satisfied by a message (not usable for HTTP).
    pub fn needs_message(&self) -> bool {
        match self {
            Auth::Jwt(j) => !j.bearer && j.query.is_none(),
            Auth::Handshake(_) => true,
            _ => false,
        }
    }

    /// Check an in-band message (`msg` already matched `inband()`).
    pub fn check_message(&self, msg: &Value) -> InbandResult {
        match self {
            Auth::Jwt(j) => {
                let Some(ib) = &j.inband else {
                    return InbandResult::Refused(
                        "invalid_token",
                        "no in-band token expected".into(),
                    );
                };
                let path = ib.token_field.as_deref().unwrap_or(&[]);
                match get_path(msg, path) {
                    Some(Value::String(t)) => match j.verifier.verify(t) {
                        Ok(v) => InbandResult::Accepted(v.principal, v.expires),
                        Err(e) => InbandResult::Refused(e.code, e.message),
                    },
                    _ => InbandResult::Refused(
                        "missing_token",
                        format!("the message needs a token in `{}`", path.join(".")),
                    ),
                }
            }
            Auth::Handshake(h) => {
                let missing: Vec<&str> = h
                    .required
                    .iter()
                    .filter(|f| msg.get(f.as_str()).is_none_or(Value::is_null))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    InbandResult::Accepted(None, None)
                } else {
                    InbandResult::Refused(
                        "invalid_handshake",
                        format!(
                            "the handshake lacks required fields: {}",
                            missing.join(", ")
                        ),
                    )
                }
            }
            _ => InbandResult::Accepted(None, None),
        }
    }

    /// Check a handshake request. `Ok(None)`: the credential must come
    /// in-band, after the upgrade.
    pub fn check_request(
        &self,
        headers: &HeaderMap,
        query: &str,
    ) -> Result<Option<Principal>, AuthError> {
        match self {
            Auth::Jwt(j) => {
                let bearer = j
                    .bearer
                    .then(|| headers.get(http::header::AUTHORIZATION))
                    .flatten()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .map(|t| t.trim().to_string());
                let from_query = j.query.as_ref().and_then(|q| {
                    form_urlencoded::parse(query.as_bytes())
                        .find(|(k, _)| k == q)
                        .map(|(_, v)| v.into_owned())
                });
                match bearer.or(from_query) {
                    Some(t) => match j.verifier.verify(&t) {
                        Ok(v) => Ok(Some(Principal(v.principal, v.expires))),
                        Err(e) => Err(AuthError {
                            status: StatusCode::UNAUTHORIZED,
                            error: e.code,
                            message: e.message,
                        }),
                    },
                    None if j.inband.is_some() => Ok(None),
                    None => {
                        let mut wher = Vec::new();
                        if j.bearer {
                            wher.push("an `Authorization: Bearer` header".to_string());
                        }
                        if let Some(q) = &j.query {
                            wher.push(format!("query parameter `{q}`"));
                        }
                        Err(AuthError {
                            status: StatusCode::UNAUTHORIZED,
                            error: "missing_token",
                            message: format!("a JWT is required in {}", wher.join(" or ")),
                        })
                    }
                }
            }
            Auth::Handshake(_) => Ok(None),
            other => other.check_key(headers, query).map(Some),
        }
    }

    /// Check a request against the `none` and `api_key` modes.
    fn check_key(&self, headers: &HeaderMap, query: &str) -> Result<Principal, AuthError> {
        match self {
            Auth::None => Ok(Principal(None, None)),
            Auth::Jwt(_) | Auth::Handshake(_) => Err(AuthError {
                status: StatusCode::UNAUTHORIZED,
                error: "unauthorized",
                message: "not authenticated".into(),
            }),
            Auth::ApiKey {
                query: qname,
                header,
                keys,
                ..
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
                // does not tell which key (or how much of one) matched. The
                // SHA-256 digests are compared, not the keys: comparing slices
                // of different lengths returns at once, which would tell a
                // guess of a key's length from the others.
                let given = ring::digest::digest(&ring::digest::SHA256, &given);
                let mut found: Option<&ApiKey> = None;
                for k in keys {
                    let eq: bool = k.digest.as_slice().ct_eq(given.as_ref()).into();
                    if eq && found.is_none() {
                        found = Some(k);
                    }
                }
                match found {
                    Some(k) => Ok(Principal(Some(k.principal.clone()), None)),
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
