//! JWT (JSON Web Token) verification: one endpoint's `jwt` settings, compiled
//! once at config load into a [`JwtVerifier`] that checks bearer tokens.
//!
//! # Settings
//!
//! Written in YAML as [`JwtSettings`]; unknown keys are an error.
//!
//! | key | required | default | meaning |
//! | --- | --- | --- | --- |
//! | `algorithm` | yes | | The one signing algorithm accepted: `HS256`, `HS384`, `HS512` (shared secret), `RS256`, `RS384`, `RS512` (RSA public key), `ES256` (EC P-256 public key) or `ES384` (EC P-384 public key). Written exactly so, upper case. |
//! | `secret_env` | HS* | | Name of the environment variable that holds the shared secret. Its value is used byte for byte (no base64 decoding, no trimming). A secret shorter than the algorithm's hash (32, 48 or 64 bytes; RFC 7518 §3.2) is warned about. |
//! | `secret_default` | no | | HS* only: the secret used when `secret_env` is not given or the variable is not set. For demos and local runs: a secret written in a config file is not a secret. A warning is logged when it is used. |
//! | `public_key_file` | RS*/ES*, one of | | A PEM file holding the public key (`-----BEGIN PUBLIC KEY-----`, or `-----BEGIN RSA PUBLIC KEY-----` for RSA). Relative paths are relative to the directory of the config file that names it. |
//! | `jwks_file` | RS*/ES*, one of | | A JWKS file (`{"keys": [...]}`, RFC 7517) holding one or more public keys. Relative like `public_key_file`. |
//! | `issuer` | no | | When set, the token must carry an `iss` claim equal to it. |
//! | `audience` | no | | A list of strings. When set, the token must carry an `aud` claim (a string or a list) that contains at least one of them. When not set, `aud` is not checked, whatever the token carries. |
//! | `leeway` | no | `30s` | Clock skew allowed when checking `exp` and `nbf`: a duration such as `0s`, `30s`, `2m`; whole seconds (a fraction is dropped), at most `1h`. |
//! | `require_exp` | no | `true` | Refuse a token without an `exp` claim. When `false`, a token without `exp` never expires; an `exp` that is present is still checked. |
//! | `close_at_exp` | no | `false` | Close a WebSocket connection when its token expires (`exp` plus `leeway`), with 1008 `token expired`. An in-band authentication with a fresh token moves the deadline; one refused leaves it. Without it a token is checked when it is presented, and the connection it opened lives on. |
//! | `principal_claim` | no | `sub` | The claim that names who connected: a string (an empty one counts as absent) or a number (its decimal text). Any other type, or no such claim, leaves the principal unset; the token is still valid. |
//!
//! Which keys go together:
//! - HS*: `secret_env` and/or `secret_default`; `public_key_file` and
//!   `jwks_file` are refused. With both, `secret_env` wins when the variable is
//!   set. A variable that is set but empty is an error (it does not fall back
//!   to `secret_default`); so is an empty `secret_default`. The secret is read
//!   once, at config load.
//! - RS*/ES*: exactly one of `public_key_file` or `jwks_file`; `secret_env`
//!   and `secret_default` are refused. The key must fit the algorithm: an RSA
//!   key of at least 2048 bits for RS*, an EC key on P-256 for ES256 and on
//!   P-384 for ES384. A private key or a certificate given as the public key
//!   is refused (the message says how to extract the public key).
//!
//! A JWKS file may hold keys of other kinds too (as identity providers publish
//! them): only keys that fit the algorithm are used (RSA keys for RS*, EC keys
//! on the right curve for ES*), and of those, keys marked `"use": "enc"` or
//! with an `alg` other than the configured one are skipped. At least one key
//! must remain, and no two of them may share a `kid`. A token is matched to a
//! key by the `kid` in its header; a token without `kid` is accepted only when
//! a single key remains. A `kid` that names none of the keys is refused
//! (`invalid_token`), except that a single remaining key without a `kid` of its
//! own is used for any token. With `public_key_file` or an HS* secret there is
//! one key and the token's `kid` is not looked at. Keys embedded in or
//! pointed to by the token (`jwk`, `jku`, `x5c`, `x5u`) are never used.
//!
//! # Verification
//!
//! In order; the first failure is the answer ([`JwtError::code`]):
//! 1. The token is three base64url parts separated by dots, at most 16 KiB,
//!    and its header is a JSON object with a string `alg` and no `crit`
//!    (no extensions are supported) — else `invalid_token`.
//! 2. `alg` must be exactly the configured algorithm. `none`, another
//!    algorithm of the same family (HS384 for an HS256 endpoint) and another
//!    family (an HS256 token for an RS256 endpoint, the "algorithm
//!    confusion" attack) are all `invalid_token`.
//! 3. The key is chosen (JWKS: by `kid`) — else `invalid_token`.
//! 4. The signature must verify — else `invalid_token`.
//! 5. The payload must be a JSON object. With `require_exp`, `exp` must be
//!    present and a number (`missing_exp`); otherwise `exp`, and `nbf`
//!    always, must be numbers when present (`invalid_token`).
//! 6. `exp` must not be earlier than now minus leeway (`token_expired`);
//!    `nbf` must not be later than now plus leeway (`token_not_yet_valid`).
//! 7. `iss` (when `issuer` is set; missing counts as wrong):
//!    `invalid_issuer`. `aud` (when `audience` is set; missing counts as
//!    wrong): `invalid_audience`.
//!
//! Time claims are only reported after the signature has verified, so a
//! forged token never learns more than `invalid_token`.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

/// The crypto backend: keys are checked with it at compile time, and
/// [`JwtVerifier::compile`] makes it `jsonwebtoken`'s process default, which
/// it is anyway while `rust_crypto` is the only backend feature compiled in
/// (with two, `jsonwebtoken` would otherwise panic at the first token).
use jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER as CRYPTO;

/// The algorithms a `jwt` setting may name, in the order error messages list
/// them.
const ALGORITHMS: [(&str, Algorithm); 8] = [
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
];

/// Clock skew allowed when `leeway` is not given.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The largest `leeway` accepted.
pub const MAX_LEEWAY: Duration = Duration::from_secs(3600);
/// Longer tokens are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// JWT settings as written in YAML (one endpoint's `jwt` block). See the
/// [module documentation](self) for what each key means and which go
/// together. `Debug` hides `secret_default`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The one accepted signing algorithm: HS256, HS384, HS512, RS256, RS384,
    /// RS512, ES256 or ES384.
    pub algorithm: String,
    /// HS*: name of the environment variable holding the shared secret.
    pub secret_env: Option<String>,
    /// HS*: the secret when `secret_env` is absent or unset (demos only).
    pub secret_default: Option<String>,
    /// RS*/ES*: PEM public key file, relative to the config's directory.
    pub public_key_file: Option<String>,
    /// RS*/ES*: JWKS file, relative to the config's directory.
    pub jwks_file: Option<String>,
    /// Required value of the `iss` claim.
    pub issuer: Option<String>,
    /// Accepted `aud` values: the token's `aud` must contain one of them.
    pub audience: Option<Vec<String>>,
    /// Allowed clock skew (`30s` by default, at most `1h`).
    pub leeway: Option<String>,
    /// Refuse tokens without `exp` (default `true`).
    pub require_exp: Option<bool>,
    /// Close a connection when its token expires (default `false`).
    pub close_at_exp: Option<bool>,
    /// The claim naming the principal (default `sub`).
    pub principal_claim: Option<String>,
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("algorithm", &self.algorithm)
            .field("secret_env", &self.secret_env)
            .field(
                "secret_default",
                &self.secret_default.as_ref().map(|_| Redacted),
            )
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("require_exp", &self.require_exp)
            .field("close_at_exp", &self.close_at_exp)
            .field("principal_claim", &self.principal_claim)
            .finish()
    }
}

/// Prints as `<redacted>` in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Compiled JWT settings (from one endpoint's config): the pinned algorithm,
/// its key or keys, and the claim checks. Cheap to share behind an `Arc`;
/// [`verify`](JwtVerifier::verify) takes `&self`. `Debug` names where the key
/// came from but never shows a secret.
#[derive(Clone)]
pub struct JwtVerifier {
    alg_name: &'static str,
    keys: Keys,
    /// Where the key(s) came from, for `Debug` and logs (no secret in it).
    key_source: String,
    validation: Validation,
    /// `iss` must be this string (the library also takes an array holding it).
    issuer: Option<String>,
    principal_claim: String,
    leeway: Duration,
    /// Report when a token expires ([`Verified::expires`]).
    close_at_exp: bool,
    /// What the operator should hear about these settings (a secret from
    /// the config file, a secret shorter than the algorithm needs).
    warnings: Vec<String>,
}

/// The verification key(s).
#[derive(Clone)]
enum Keys {
    /// An HS* secret or a PEM public key: used whatever the token's `kid`.
    Single(DecodingKey),
    /// The usable keys of a JWKS file, with their `kid`s.
    Set(Vec<(Option<String>, DecodingKey)>),
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.keys {
            Keys::Single(_) => 1,
            Keys::Set(k) => k.len(),
        };
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.alg_name)
            .field("key_source", &self.key_source)
            .field("keys", &keys)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway", &self.leeway)
            .field(
                "require_exp",
                &self.validation.required_spec_claims.contains("exp"),
            )
            .field("principal_claim", &self.principal_claim)
            .finish()
    }
}

/// A token that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// The value of the principal claim (`sub` by default): a string, or a
    /// number's decimal text; `None` when the claim is absent, empty or of
    /// another type.
    pub principal: Option<String>,
    /// Every claim of the token (a JSON object).
    pub claims: Value,
    /// With `close_at_exp`: when the token stops being valid (`exp` plus
    /// the leeway); `None` without it, or for a token without `exp`.
    pub expires: Option<SystemTime>,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtError {
    /// Machine-readable: one of the `JwtError::*` code constants.
    pub code: &'static str,
    /// Human-readable, for logs and the client; never contains a key or
    /// secret (values taken from the token are quoted and shortened).
    pub message: String,
}

impl JwtError {
    /// Malformed token, bad signature, refused algorithm (including `none`),
    /// unknown `kid`.
    pub const INVALID_TOKEN: &'static str = "invalid_token";
    /// `exp` is in the past by more than the leeway.
    pub const TOKEN_EXPIRED: &'static str = "token_expired";
    /// `nbf` is in the future by more than the leeway.
    pub const TOKEN_NOT_YET_VALID: &'static str = "token_not_yet_valid";
    /// `iss` missing or not the configured issuer.
    pub const INVALID_ISSUER: &'static str = "invalid_issuer";
    /// `aud` missing or containing none of the configured audiences.
    pub const INVALID_AUDIENCE: &'static str = "invalid_audience";
    /// No `exp` while `require_exp` is on.
    pub const MISSING_EXP: &'static str = "missing_exp";

    fn new(code: &'static str, message: impl Into<String>) -> JwtError {
        JwtError {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> JwtError {
        JwtError::new(JwtError::INVALID_TOKEN, message)
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for JwtError {}

/// A value taken from a token, fit for a message: quoted, escaped, shortened.
fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

impl JwtVerifier {
    /// Check `s` and load its secret or key(s). `base_dir` is what relative
    /// `public_key_file` and `jwks_file` paths are resolved against (the
    /// config file's directory). Errors are one line, name the setting or
    /// file at fault, and never contain a secret.
    pub fn compile(s: &JwtSettings, base_dir: &Path) -> Result<JwtVerifier, String> {
        // Fails harmlessly when a provider is already in place.
        let _ = CRYPTO.install_default();
        let Some(&(alg_name, algorithm)) = ALGORITHMS.iter().find(|(n, _)| *n == s.algorithm)
        else {
            let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown algorithm {:?}; accepted: {}",
                s.algorithm,
                names.join(", ")
            ));
        };

        let leeway = match &s.leeway {
            None => DEFAULT_LEEWAY,
            Some(text) => match humantime::parse_duration(text.trim()) {
                Ok(d) if d <= MAX_LEEWAY => Duration::from_secs(d.as_secs()),
                Ok(_) => return Err(format!("leeway {text:?} is too large: at most 1h")),
                Err(_) => {
                    return Err(format!(
                        "invalid leeway {text:?}: write a number and a unit, e.g. 0s, 30s, 2m"
                    ));
                }
            },
        };

        let principal_claim = s.principal_claim.as_deref().unwrap_or("sub");
        if principal_claim.is_empty() {
            return Err("principal_claim must not be empty".into());
        }
        if s.issuer.as_deref() == Some("") {
            return Err("issuer must not be empty (leave it out to accept any issuer)".into());
        }
        if let Some(aud) = &s.audience {
            if aud.is_empty() {
                return Err(
                    "audience must list at least one value (leave it out to accept any audience)"
                        .into(),
                );
            }
            if aud.iter().any(String::is_empty) {
                return Err("audience values must not be empty".into());
            }
        }

        let mut warnings = Vec::new();
        let (keys, key_source) = match algorithm.family() {
            AlgorithmFamily::Hmac => {
                if s.public_key_file.is_some() || s.jwks_file.is_some() {
                    return Err(format!(
                        "{alg_name} uses a shared secret (secret_env / secret_default); \
                         public_key_file and jwks_file are for RS*/ES* algorithms: \
                         give one or the other, not both"
                    ));
                }
                let (secret, source) = resolve_secret(s, alg_name, &mut warnings)?;
                (Keys::Single(DecodingKey::from_secret(&secret)), source)
            }
            _ => {
                if s.secret_env.is_some() || s.secret_default.is_some() {
                    return Err(format!(
                        "{alg_name} verifies with a public key (public_key_file or jwks_file); \
                         secret_env and secret_default are for HS* algorithms: \
                         give one or the other, not both"
                    ));
                }
                match (&s.public_key_file, &s.jwks_file) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "give either public_key_file or jwks_file, not both".to_string()
                        );
                    }
                    (None, None) => {
                        return Err(format!(
                            "{alg_name} needs a public key: set public_key_file (PEM) or jwks_file (JWKS)"
                        ));
                    }
                    (Some(file), None) => {
                        let path = base_dir.join(file);
                        let key = load_pem(&path, algorithm, alg_name)?;
                        (
                            Keys::Single(key),
                            format!("public_key_file {}", path.display()),
                        )
                    }
                    (None, Some(file)) => {
                        let path = base_dir.join(file);
                        let keys = load_jwks(&path, algorithm, alg_name)?;
                        (Keys::Set(keys), format!("jwks_file {}", path.display()))
                    }
                }
            }
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::new();
        if s.require_exp.unwrap_or(true) {
            validation.required_spec_claims.insert("exp".into());
        }
        if let Some(iss) = &s.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &s.audience {
            Some(aud) => {
                validation.set_audience(aud);
                validation.validate_aud = true;
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }

        Ok(JwtVerifier {
            alg_name,
            keys,
            key_source,
            validation,
            issuer: s.issuer.clone(),
            principal_claim: principal_claim.to_string(),
            leeway,
            close_at_exp: s.close_at_exp.unwrap_or(false),
            warnings,
        })
    }

    /// What the operator should be told about these settings (logged at
    /// start and at each reload, printed by `gateway check`).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The pinned algorithm's name, e.g. `"RS256"`.
    pub fn algorithm(&self) -> &'static str {
        self.alg_name
    }

    /// Check `token` (the bare compact JWT, without `Bearer `): its algorithm,
    /// signature and claims, in the order the module documentation gives.
    pub fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::invalid(format!(
                "token is longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let header = peek_header(token)?;
        if header.alg != self.alg_name {
            return Err(JwtError::invalid(format!(
                "token algorithm {} is not accepted; this endpoint requires {}",
                quoted(&header.alg),
                self.alg_name
            )));
        }
        let key = self.select_key(header.kid.as_deref())?;
        let data = jsonwebtoken::decode::<Value>(token, key, &self.validation)
            .map_err(|e| map_error(e.into_kind()))?;
        let claims = data.claims;
        if !claims.is_object() {
            return Err(JwtError::invalid("token payload is not a JSON object"));
        }
        if let Some(iss) = &self.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err(map_error(ErrorKind::InvalidIssuer));
        }
        let principal = match claims.get(&self.principal_claim) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let expires = claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|_| self.close_at_exp)
            .and_then(|exp| Duration::try_from_secs_f64(exp.max(0.0)).ok())
            .and_then(|exp| UNIX_EPOCH.checked_add(exp + self.leeway));
        Ok(Verified {
            principal,
            claims,
            expires,
        })
    }

    fn select_key(&self, kid: Option<&str>) -> Result<&DecodingKey, JwtError> {
        let keys = match &self.keys {
            Keys::Single(key) => return Ok(key),
            Keys::Set(keys) => keys,
        };
        match kid {
            Some(kid) => keys
                .iter()
                .find(|(k, _)| k.as_deref() == Some(kid))
                .or(match keys.as_slice() {
                    [only @ (None, _)] => Some(only),
                    _ => None,
                })
                .map(|(_, key)| key)
                .ok_or_else(|| JwtError::invalid(format!("unknown key id (kid) {}", quoted(kid)))),
            None => match keys.as_slice() {
                [(_, key)] => Ok(key),
                _ => Err(JwtError::invalid(format!(
                    "token has no kid, and {} keys could verify it: a kid is needed to choose",
                    keys.len()
                ))),
            },
        }
    }
}

/// What [`JwtVerifier::verify`] reads from the header before trusting it.
struct PeekedHeader {
    alg: String,
    kid: Option<String>,
}

/// Split the token, decode its header and read `alg` and `kid`. Only
/// well-formedness is checked here; the signature comes later.
fn peek_header(token: &str) -> Result<PeekedHeader, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::invalid(
            "malformed token: expected three base64url parts separated by dots",
        ));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::invalid("malformed token: header is not base64url"))?;
    let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(JwtError::invalid(
            "malformed token: header is not a JSON object",
        ));
    };
    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(JwtError::invalid("malformed token: header has no alg"));
    };
    if header.contains_key("crit") {
        return Err(JwtError::invalid(
            "token header lists crit extensions, which are not supported",
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::invalid("malformed token: kid is not a string")),
    };
    Ok(PeekedHeader {
        alg: alg.clone(),
        kid,
    })
}

/// The answer for a `jsonwebtoken` failure.
fn map_error(kind: ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::new(JwtError::TOKEN_EXPIRED, "token has expired"),
        ErrorKind::ImmatureSignature => JwtError::new(
            JwtError::TOKEN_NOT_YET_VALID,
            "token is not valid yet (nbf is in the future)",
        ),
        ErrorKind::InvalidIssuer => JwtError::new(
            JwtError::INVALID_ISSUER,
            "token issuer (iss) is not accepted",
        ),
        ErrorKind::InvalidAudience => JwtError::new(
            JwtError::INVALID_AUDIENCE,
            "token audience (aud) is not accepted",
        ),
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => JwtError::new(
                JwtError::MISSING_EXP,
                "token has no exp claim (or it is not a number)",
            ),
            "iss" => JwtError::new(JwtError::INVALID_ISSUER, "token has no iss claim"),
            "aud" => JwtError::new(JwtError::INVALID_AUDIENCE, "token has no aud claim"),
            other => JwtError::invalid(format!("token has no {other} claim")),
        },
        ErrorKind::InvalidClaimFormat(claim) => {
            JwtError::invalid(format!("token claim {claim} is not a valid number"))
        }
        ErrorKind::InvalidSignature => JwtError::invalid("bad token signature"),
        ErrorKind::InvalidAlgorithm => JwtError::invalid("token algorithm is not accepted"),
        _ => JwtError::invalid("malformed token"),
    }
}

/// The HS* secret and where it came from; what to warn about it goes to
/// `warnings`.
fn resolve_secret(
    s: &JwtSettings,
    alg_name: &str,
    warnings: &mut Vec<String>,
) -> Result<(Vec<u8>, String), String> {
    let (secret, source) = find_secret(s, alg_name)?;
    if source == "secret_default" {
        warnings.push(match &s.secret_env {
            Some(var) => format!(
                "JWT {alg_name} verification uses secret_default from the config file: \
                 environment variable {var} (secret_env) is not set; set it outside demos"
            ),
            None => format!(
                "JWT {alg_name} verification uses secret_default from the config file; \
                 set the secret through secret_env outside demos"
            ),
        });
    }
    // RFC 7518 §3.2: a key of at least the hash's size. A shorter one can be
    // found offline by trying candidates against any one signed token.
    let need = match alg_name {
        "HS384" => 48,
        "HS512" => 64,
        _ => 32,
    };
    if secret.len() < need {
        warnings.push(format!(
            "the JWT {alg_name} secret ({source}) is {} bytes; {alg_name} needs at least {need} \
             (RFC 7518 §3.2): a shorter one can be guessed offline from any one token; \
             use e.g. `openssl rand -hex {need}`",
            secret.len()
        ));
    }
    Ok((secret, source))
}

/// The HS* secret and where it came from.
fn find_secret(s: &JwtSettings, alg_name: &str) -> Result<(Vec<u8>, String), String> {
    if let Some(var) = &s.secret_env {
        if var.is_empty() || var.contains(['=', '\0']) {
            return Err(format!(
                "secret_env {var:?} is not a valid environment variable name"
            ));
        }
        match std::env::var_os(var) {
            Some(value) if value.is_empty() => {
                return Err(format!(
                    "environment variable {var} (secret_env) is set but empty"
                ));
            }
            Some(value) => {
                return Ok((
                    value.into_encoded_bytes(),
                    format!("environment variable {var}"),
                ));
            }
            None if s.secret_default.is_none() => {
                return Err(format!(
                    "environment variable {var} (secret_env) is not set, and there is no secret_default"
                ));
            }
            None => {}
        }
    }
    match &s.secret_default {
        Some(secret) if secret.is_empty() => Err("secret_default must not be empty".into()),
        Some(secret) => Ok((secret.as_bytes().to_vec(), "secret_default".into())),
        None => Err(format!(
            "{alg_name} needs a secret: set secret_env (the environment variable holding it) \
             and/or secret_default"
        )),
    }
}

/// What a PEM file holds, for messages.
fn pem_kind(family: AlgorithmFamily) -> &'static str {
    match family {
        AlgorithmFamily::Rsa => "an RSA",
        AlgorithmFamily::Ec => "an EC",
        AlgorithmFamily::Ed => "an Ed25519",
        AlgorithmFamily::Hmac => "a secret",
    }
}

/// What the algorithm needs, for messages.
fn needs(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "an EC public key on curve P-256",
        Algorithm::ES384 => "an EC public key on curve P-384",
        _ => "an RSA public key",
    }
}

/// Load a PEM public key for `alg` from `path`.
fn load_pem(path: &Path, alg: Algorithm, alg_name: &str) -> Result<DecodingKey, String> {
    let shown = path.display();
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read public_key_file {shown}: {e}"))?;
    let text = String::from_utf8_lossy(&bytes);
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .ok_or_else(|| format!("public_key_file {shown} is not a PEM file (no -----BEGIN line)"))?;
    match label {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        l if l.contains("PRIVATE KEY") => {
            return Err(format!(
                "public_key_file {shown} holds a private key; give the public key \
                 (openssl pkey -in PRIVATE.pem -pubout -out public.pem)"
            ));
        }
        "CERTIFICATE" => {
            return Err(format!(
                "public_key_file {shown} holds a certificate; give its public key \
                 (openssl x509 -in CERT.pem -pubkey -noout > public.pem)"
            ));
        }
        other => {
            return Err(format!(
                "public_key_file {shown} holds a PEM {other:?}, not a public key"
            ));
        }
    }
    let found = [
        (AlgorithmFamily::Rsa, DecodingKey::from_rsa_pem(&bytes)),
        (AlgorithmFamily::Ec, DecodingKey::from_ec_pem(&bytes)),
        (AlgorithmFamily::Ed, DecodingKey::from_ed_pem(&bytes)),
    ]
    .into_iter()
    .find_map(|(family, key)| key.ok().map(|k| (family, k)));
    let Some((family, key)) = found else {
        return Err(format!(
            "public_key_file {shown}: invalid PEM public key (not an RSA or EC key, or corrupt)"
        ));
    };
    if family != alg.family() {
        return Err(format!(
            "public_key_file {shown} holds {} key, but {alg_name} needs {}",
            pem_kind(family),
            needs(alg)
        ));
    }
    checked_key(key, alg, alg_name).map_err(|e| format!("public_key_file {shown}: {e}"))
}

/// Make sure `key` can verify `alg` now rather than at the first token: RSA
/// keys are parsed and sized (and turned into their components, which need
/// no parsing per token), EC keys must be on the algorithm's curve.
fn checked_key(key: DecodingKey, alg: Algorithm, alg_name: &str) -> Result<DecodingKey, String> {
    let key = match alg.family() {
        AlgorithmFamily::Rsa => {
            let (n, e) = match key.kind() {
                jsonwebtoken::DecodingKeyKind::SecretOrDer(der) => {
                    (CRYPTO.key_utils.rsa_pub_components_from_public_key)(der)
                        .map_err(|e| format!("invalid RSA public key: {e}"))?
                }
                jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => {
                    (n.clone(), e.clone())
                }
            };
            let n = strip_leading_zeros(&n);
            let bits = n
                .first()
                .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
                ));
            }
            if strip_leading_zeros(&e).is_empty() {
                return Err("invalid RSA public key: zero exponent".into());
            }
            DecodingKey::from_rsa_raw_components(n, &e)
        }
        AlgorithmFamily::Ec => {
            let curve = match key.try_get_as_bytes().map(<[u8]>::len) {
                Ok(65) => "P-256",
                Ok(97) => "P-384",
                _ => "an unsupported curve",
            };
            let want = if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            };
            if curve != want {
                return Err(format!(
                    "the EC key is on {curve}, but {alg_name} needs {want}"
                ));
            }
            key
        }
        _ => key,
    };
    (CRYPTO.verifier_factory)(&alg, &key)
        .map_err(|e| format!("the key cannot verify {alg_name}: {e}"))?;
    Ok(key)
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// Load the keys of a JWKS file that can verify `alg`, with their `kid`s.
fn load_jwks(
    path: &Path,
    alg: Algorithm,
    alg_name: &str,
) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read jwks_file {shown}: {e}"))?;
    let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| {
        format!("jwks_file {shown} is not a JWKS ({e}); expected {{\"keys\": [...]}}")
    })?;
    let want_curve = match alg {
        Algorithm::ES256 => Some(EllipticCurve::P256),
        Algorithm::ES384 => Some(EllipticCurve::P384),
        _ => None,
    };
    let mut keys: Vec<(Option<String>, DecodingKey)> = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let fits = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => alg.family() == AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) => want_curve.as_ref() == Some(&p.curve),
            _ => false,
        };
        let for_signing = !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
        let alg_ok = jwk
            .common
            .key_algorithm
            .is_none_or(|a| a == KeyAlgorithm::from(alg));
        if !(fits && for_signing && alg_ok) {
            continue;
        }
        let kid = jwk.common.key_id.clone();
        let which = match &kid {
            Some(kid) => format!("key {kid:?}"),
            None => format!("key #{}", i + 1),
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| format!("jwks_file {shown}: {which} is invalid: {e}"))
            .and_then(|key| {
                checked_key(key, alg, alg_name)
                    .map_err(|e| format!("jwks_file {shown}: {which}: {e}"))
            })?;
        if kid.is_some() && keys.iter().any(|(k, _)| *k == kid) {
            return Err(format!(
                "jwks_file {shown}: two keys usable for {alg_name} share the kid {:?}",
                kid.unwrap_or_default()
            ));
        }
        keys.push((kid, key));
    }
    if keys.is_empty() {
        return Err(format!(
            "jwks_file {shown} has no key usable for {alg_name} (it needs {}, not marked \
             \"use\": \"enc\", with no \"alg\" or \"alg\": \"{alg_name}\"); the file has {} key(s)",
            needs(alg),
            set.keys.len()
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    const SECRET: &str = "test-secret-of-reasonable-length-0123456789";

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jwt")
    }

    fn now() -> u64 {
        get_current_timestamp()
    }

    fn settings(alg: &str) -> JwtSettings {
        JwtSettings {
            algorithm: alg.into(),
            ..JwtSettings::default()
        }
    }

    fn hs_settings(alg: &str) -> JwtSettings {
        JwtSettings {
            secret_default: Some(SECRET.into()),
            ..settings(alg)
        }
    }

    fn compile(s: &JwtSettings) -> JwtVerifier {
        JwtVerifier::compile(s, &data_dir()).expect("settings compile")
    }

    fn compile_err(s: &JwtSettings) -> String {
        JwtVerifier::compile(s, &data_dir()).expect_err("settings must be refused")
    }

    /// The usual claims: `sub` alice, expiring in ten minutes.
    fn claims() -> Value {
        json!({"sub": "alice", "exp": now() + 600})
    }

    fn sign_secret(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn sign_hs(alg: Algorithm, claims: &Value) -> String {
        sign_secret(alg, SECRET.as_bytes(), claims)
    }

    /// Sign with a private key file from tests/data/jwt.
    fn sign_key(alg: Algorithm, private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
        let pem = std::fs::read(data_dir().join(private_pem)).unwrap();
        let key = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem).unwrap(),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem).unwrap(),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key).unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// The refusal code of `r`, failing the test if it was accepted.
    fn code(r: Result<Verified, JwtError>) -> &'static str {
        match r {
            Ok(v) => panic!("token accepted: {v:?}"),
            Err(e) => e.code,
        }
    }

    fn rs256_pem() -> JwtVerifier {
        compile(&JwtSettings {
            public_key_file: Some("rsa_public.pem".into()),
            ..settings("RS256")
        })
    }

    fn rs256_jwks() -> JwtVerifier {
        compile(&JwtSettings {
            jwks_file: Some("jwks.json".into()),
            ..settings("RS256")
        })
    }

    // ---- accepted tokens ----

    #[test]
    fn hs256_valid_token_accepted() {
        let v = compile(&hs_settings("HS256"));
        let ok = v.verify(&sign_hs(Algorithm::HS256, &claims())).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice"));
        assert_eq!(ok.claims["sub"], "alice");
    }

    #[test]
    fn hs384_valid_token_accepted() {
        let v = compile(&hs_settings("HS384"));
        let ok = v.verify(&sign_hs(Algorithm::HS384, &claims())).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice"));
    }

    #[test]
    fn hs512_valid_token_accepted() {
        let v = compile(&hs_settings("HS512"));
        let ok = v.verify(&sign_hs(Algorithm::HS512, &claims())).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice"));
    }

    #[test]
    fn rs256_valid_token_accepted() {
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", None, &claims());
        let ok = rs256_pem().verify(&token).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice"));
    }

    #[test]
    fn rs384_and_rs512_valid_tokens_accepted() {
        for (name, alg) in [("RS384", Algorithm::RS384), ("RS512", Algorithm::RS512)] {
            let v = compile(&JwtSettings {
                public_key_file: Some("rsa_public.pem".into()),
                ..settings(name)
            });
            let token = sign_key(alg, "rsa_private.pem", None, &claims());
            assert_eq!(
                v.verify(&token).unwrap().principal.as_deref(),
                Some("alice")
            );
        }
    }

    #[test]
    fn es256_valid_token_accepted() {
        let v = compile(&JwtSettings {
            public_key_file: Some("ec_public.pem".into()),
            ..settings("ES256")
        });
        let token = sign_key(Algorithm::ES256, "ec_private.pem", None, &claims());
        let ok = v.verify(&token).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice"));
    }

    #[test]
    fn es384_valid_token_accepted() {
        let v = compile(&JwtSettings {
            public_key_file: Some("ec384_public.pem".into()),
            ..settings("ES384")
        });
        let token = sign_key(Algorithm::ES384, "ec384_private.pem", None, &claims());
        assert_eq!(
            v.verify(&token).unwrap().principal.as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn rs256_pkcs1_public_key_accepted() {
        let v = compile(&JwtSettings {
            public_key_file: Some("rsa_public_pkcs1.pem".into()),
            ..settings("RS256")
        });
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", None, &claims());
        assert_eq!(
            v.verify(&token).unwrap().principal.as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn pem_key_ignores_token_kid() {
        let token = sign_key(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("whatever"),
            &claims(),
        );
        assert!(rs256_pem().verify(&token).is_ok());
    }

    // ---- refused algorithms ----

    #[test]
    fn alg_none_refused() {
        let v = compile(&hs_settings("HS256"));
        let payload = b64(&claims());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = b64(&json!({"alg": alg, "typ": "JWT"}));
            let token = format!("{header}.{payload}.");
            let err = v.verify(&token).unwrap_err();
            assert_eq!(err.code, "invalid_token", "alg {alg}");
            assert!(err.message.contains("not accepted"), "{err}");
            // With a signature part that is not empty, too.
            let token = format!("{header}.{payload}.c2ln");
            assert_eq!(code(v.verify(&token)), "invalid_token", "alg {alg}");
        }
        // The same for an RS256 endpoint.
        let header = b64(&json!({"alg": "none"}));
        assert_eq!(
            code(rs256_pem().verify(&format!("{header}.{payload}."))),
            "invalid_token"
        );
    }

    #[test]
    fn algorithm_confusion_hs256_signed_with_rsa_public_key_refused() {
        // The classic attack: sign HS256 with the verifier's *public* key as the
        // HMAC secret and hope the verifier uses its key bytes for HMAC.
        let public_pem = std::fs::read(data_dir().join("rsa_public.pem")).unwrap();
        let token = sign_secret(Algorithm::HS256, &public_pem, &claims());
        let err = rs256_pem().verify(&token).unwrap_err();
        assert_eq!(err.code, "invalid_token");
        assert!(err.message.contains("requires RS256"), "{err}");
        assert_eq!(code(rs256_jwks().verify(&token)), "invalid_token");
        // And the JWKS n/e bytes, base64url or raw, make no difference.
        let jwks = std::fs::read(data_dir().join("jwks.json")).unwrap();
        let token = sign_secret(Algorithm::HS256, &jwks, &claims());
        assert_eq!(code(rs256_jwks().verify(&token)), "invalid_token");
    }

    #[test]
    fn other_pinned_algorithm_refused() {
        let v = compile(&hs_settings("HS256"));
        // Same secret, valid signature, but HS384 is not the pinned algorithm.
        let err = v.verify(&sign_hs(Algorithm::HS384, &claims())).unwrap_err();
        assert_eq!(err.code, "invalid_token");
        assert!(err.message.contains("\"HS384\""), "{err}");
        assert_eq!(
            code(v.verify(&sign_hs(Algorithm::HS512, &claims()))),
            "invalid_token"
        );
        // RS384 token for an RS256 endpoint, same key.
        let token = sign_key(Algorithm::RS384, "rsa_private.pem", None, &claims());
        assert_eq!(code(rs256_pem().verify(&token)), "invalid_token");
        // An ES256 token for an RS256 endpoint.
        let token = sign_key(Algorithm::ES256, "ec_private.pem", None, &claims());
        assert_eq!(code(rs256_pem().verify(&token)), "invalid_token");
    }

    // ---- signatures ----

    #[test]
    fn bad_signature_refused() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_secret(Algorithm::HS256, b"another secret", &claims());
        let err = v.verify(&token).unwrap_err();
        assert_eq!(err.code, "invalid_token");
        assert!(err.message.contains("signature"), "{err}");

        // A valid token whose payload was swapped for another.
        let good = sign_hs(Algorithm::HS256, &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let forged = b64(&json!({"sub": "admin", "exp": now() + 600}));
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(code(v.verify(&tampered)), "invalid_token");

        // RS256 signed by another RSA key.
        let token = sign_key(Algorithm::RS256, "rsa2_private.pem", None, &claims());
        assert_eq!(code(rs256_pem().verify(&token)), "invalid_token");

        // A signature part that is not base64url.
        let broken = format!("{}.{}.!!!", parts[0], parts[1]);
        assert_eq!(code(v.verify(&broken)), "invalid_token");
    }

    #[test]
    fn forged_expired_token_reports_only_invalid_token() {
        // Claims are judged after the signature: a forger learns nothing more.
        let v = compile(&hs_settings("HS256"));
        let token = sign_secret(
            Algorithm::HS256,
            b"wrong",
            &json!({"sub": "alice", "exp": now() - 3600}),
        );
        assert_eq!(code(v.verify(&token)), "invalid_token");
    }

    #[test]
    fn malformed_tokens_refused() {
        let v = compile(&hs_settings("HS256"));
        let good = sign_hs(Algorithm::HS256, &claims());
        let parts: Vec<&str> = good.split('.').collect();
        let not_object = b64(&json!(["alg", "HS256"]));
        let no_alg = b64(&json!({"typ": "JWT"}));
        let payload_not_json = URL_SAFE_NO_PAD.encode("not json");
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        let cases = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{good}.extra"),
            format!("Bearer {good}"),
            format!("%%%.{}.{}", parts[1], parts[2]),
            format!("{not_object}.{}.{}", parts[1], parts[2]),
            format!("{no_alg}.{}.{}", parts[1], parts[2]),
            format!("{}.{payload_not_json}.{}", parts[0], parts[2]),
            long,
        ];
        for token in &cases {
            assert_eq!(code(v.verify(token)), "invalid_token", "token {token:.60}");
        }
        // A payload that is valid JSON but not an object, properly signed.
        let token = encode(
            &Header::new(Algorithm::HS256),
            &json!("just a string"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(v.verify(&token)), "invalid_token");
    }

    #[test]
    fn crit_header_refused() {
        let v = compile(&hs_settings("HS256"));
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let token = encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(code(v.verify(&token)), "invalid_token");
    }

    // ---- time claims ----

    #[test]
    fn expired_token_refused() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() - 120}),
        );
        let err = v.verify(&token).unwrap_err();
        assert_eq!(err.code, "token_expired");
    }

    #[test]
    fn expired_within_leeway_accepted() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() - 10}),
        );
        assert!(v.verify(&token).is_ok());
        // With no leeway, the same token is refused.
        let strict = compile(&JwtSettings {
            leeway: Some("0s".into()),
            ..hs_settings("HS256")
        });
        assert_eq!(code(strict.verify(&token)), "token_expired");
    }

    #[test]
    fn nbf_in_future_refused() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() + 1200, "nbf": now() + 600}),
        );
        assert_eq!(code(v.verify(&token)), "token_not_yet_valid");
        // Within the leeway it is fine.
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() + 1200, "nbf": now() + 10}),
        );
        assert!(v.verify(&token).is_ok());
    }

    #[test]
    fn missing_exp_refused_when_required() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(Algorithm::HS256, &json!({"sub": "alice"}));
        assert_eq!(code(v.verify(&token)), "missing_exp");
        let explicit = compile(&JwtSettings {
            require_exp: Some(true),
            ..hs_settings("HS256")
        });
        assert_eq!(code(explicit.verify(&token)), "missing_exp");
    }

    #[test]
    fn missing_exp_accepted_when_not_required() {
        let v = compile(&JwtSettings {
            require_exp: Some(false),
            ..hs_settings("HS256")
        });
        let token = sign_hs(Algorithm::HS256, &json!({"sub": "alice"}));
        assert!(v.verify(&token).is_ok());
        // An exp that is present is still checked.
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() - 3600}),
        );
        assert_eq!(code(v.verify(&token)), "token_expired");
    }

    #[test]
    fn non_numeric_exp_refused() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": "tomorrow"}),
        );
        // Required: a non-numeric exp is no exp.
        assert_eq!(code(v.verify(&token)), "missing_exp");
        // Not required: present but malformed.
        let lax = compile(&JwtSettings {
            require_exp: Some(false),
            ..hs_settings("HS256")
        });
        assert_eq!(code(lax.verify(&token)), "invalid_token");
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() + 600, "nbf": "now"}),
        );
        assert_eq!(code(v.verify(&token)), "invalid_token");
    }

    // ---- issuer and audience ----

    #[test]
    fn wrong_issuer_refused() {
        let v = compile(&JwtSettings {
            issuer: Some("https://issuer.example".into()),
            ..hs_settings("HS256")
        });
        let with_iss = |iss: &str| {
            sign_hs(
                Algorithm::HS256,
                &json!({"sub": "alice", "exp": now() + 600, "iss": iss}),
            )
        };
        assert!(v.verify(&with_iss("https://issuer.example")).is_ok());
        assert_eq!(
            code(v.verify(&with_iss("https://evil.example"))),
            "invalid_issuer"
        );
        // Missing iss counts as wrong.
        assert_eq!(
            code(v.verify(&sign_hs(Algorithm::HS256, &claims()))),
            "invalid_issuer"
        );
        // iss is one string: an array holding the issuer is not it.
        let listed = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() + 600,
                    "iss": ["https://evil.example", "https://issuer.example"]}),
        );
        assert_eq!(code(v.verify(&listed)), "invalid_issuer");
    }

    #[test]
    fn wrong_audience_refused() {
        let v = compile(&JwtSettings {
            audience: Some(vec!["gateway".into(), "ws".into()]),
            ..hs_settings("HS256")
        });
        let with_aud = |aud: Value| {
            sign_hs(
                Algorithm::HS256,
                &json!({"sub": "alice", "exp": now() + 600, "aud": aud}),
            )
        };
        assert!(v.verify(&with_aud(json!("gateway"))).is_ok());
        assert!(v.verify(&with_aud(json!("ws"))).is_ok());
        assert!(v.verify(&with_aud(json!(["other", "ws"]))).is_ok());
        assert_eq!(
            code(v.verify(&with_aud(json!("other")))),
            "invalid_audience"
        );
        assert_eq!(
            code(v.verify(&with_aud(json!(["a", "b"])))),
            "invalid_audience"
        );
        // Missing aud counts as wrong.
        assert_eq!(
            code(v.verify(&sign_hs(Algorithm::HS256, &claims()))),
            "invalid_audience"
        );
    }

    #[test]
    fn audience_not_checked_when_not_configured() {
        let v = compile(&hs_settings("HS256"));
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "exp": now() + 600, "aud": "anything"}),
        );
        assert!(v.verify(&token).is_ok());
    }

    // ---- principal ----

    #[test]
    fn principal_claim_configurable() {
        let v = compile(&JwtSettings {
            principal_claim: Some("email".into()),
            ..hs_settings("HS256")
        });
        let token = sign_hs(
            Algorithm::HS256,
            &json!({"sub": "alice", "email": "alice@example.com", "exp": now() + 600}),
        );
        let ok = v.verify(&token).unwrap();
        assert_eq!(ok.principal.as_deref(), Some("alice@example.com"));
        assert_eq!(ok.claims["sub"], "alice");

        // A number counts; an absent, empty or other-typed claim leaves it unset.
        let uid = compile(&JwtSettings {
            principal_claim: Some("uid".into()),
            ..hs_settings("HS256")
        });
        let with_uid =
            |uid: Value| sign_hs(Algorithm::HS256, &json!({"uid": uid, "exp": now() + 600}));
        let p = |token: String| uid.verify(&token).unwrap().principal;
        assert_eq!(p(with_uid(json!(42))).as_deref(), Some("42"));
        assert_eq!(p(with_uid(json!(""))), None);
        assert_eq!(p(with_uid(json!({"id": 1}))), None);
        assert_eq!(p(with_uid(Value::Null)), None);
        let no_sub = sign_hs(Algorithm::HS256, &json!({"exp": now() + 600}));
        let v = compile(&hs_settings("HS256"));
        assert_eq!(v.verify(&no_sub).unwrap().principal, None);
    }

    // ---- JWKS ----

    #[test]
    fn jwks_two_keys_selected_by_kid() {
        let v = rs256_jwks();
        let one = sign_key(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("rsa-1"),
            &claims(),
        );
        let two = sign_key(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("rsa-2"),
            &json!({"sub": "bob", "exp": now() + 600}),
        );
        assert_eq!(v.verify(&one).unwrap().principal.as_deref(), Some("alice"));
        assert_eq!(v.verify(&two).unwrap().principal.as_deref(), Some("bob"));
        // Key 2's signature under key 1's kid does not verify.
        let swapped = sign_key(
            Algorithm::RS256,
            "rsa2_private.pem",
            Some("rsa-1"),
            &claims(),
        );
        assert_eq!(code(v.verify(&swapped)), "invalid_token");
    }

    #[test]
    fn jwks_unknown_kid_refused() {
        let v = rs256_jwks();
        let token = sign_key(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("rsa-9"),
            &claims(),
        );
        let err = v.verify(&token).unwrap_err();
        assert_eq!(err.code, "invalid_token");
        assert!(err.message.contains("\"rsa-9\""), "{err}");
        // The EC key's kid names no key an RS256 token can use.
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", Some("ec-1"), &claims());
        assert_eq!(code(v.verify(&token)), "invalid_token");
    }

    #[test]
    fn jwks_token_without_kid_needs_a_single_key() {
        // Two RSA keys: a token without kid is ambiguous.
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", None, &claims());
        let err = rs256_jwks().verify(&token).unwrap_err();
        assert_eq!(err.code, "invalid_token");
        assert!(err.message.contains("kid"), "{err}");
        // One EC key in the same file: ES256 tokens need no kid.
        let es = compile(&JwtSettings {
            jwks_file: Some("jwks.json".into()),
            ..settings("ES256")
        });
        let token = sign_key(Algorithm::ES256, "ec_private.pem", None, &claims());
        assert_eq!(
            es.verify(&token).unwrap().principal.as_deref(),
            Some("alice")
        );
        let token = sign_key(Algorithm::ES256, "ec_private.pem", Some("ec-1"), &claims());
        assert!(es.verify(&token).is_ok());
    }

    #[test]
    fn jwks_single_key_without_kid_used_for_any_kid() {
        let dir = std::env::temp_dir().join(format!("gateway-jwt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let all: Value =
            serde_json::from_slice(&std::fs::read(data_dir().join("jwks.json")).unwrap()).unwrap();
        let mut key = all["keys"][0].clone();
        key.as_object_mut().unwrap().remove("kid");
        std::fs::write(dir.join("one.json"), json!({"keys": [key]}).to_string()).unwrap();
        let v = JwtVerifier::compile(
            &JwtSettings {
                jwks_file: Some("one.json".into()),
                ..settings("RS256")
            },
            &dir,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", Some("any"), &claims());
        assert!(v.verify(&token).is_ok());
        let token = sign_key(Algorithm::RS256, "rsa_private.pem", None, &claims());
        assert!(v.verify(&token).is_ok());
    }

    // ---- secrets ----

    #[test]
    fn secret_from_env_var() {
        // PATH is set for every test process; no unsafe set_var needed.
        let path = std::env::var_os("PATH").expect("PATH is set");
        let v = compile(&JwtSettings {
            secret_env: Some("PATH".into()),
            secret_default: Some(SECRET.into()),
            ..settings("HS256")
        });
        assert!(format!("{v:?}").contains("environment variable PATH"));
        let token = sign_secret(Algorithm::HS256, path.as_encoded_bytes(), &claims());
        assert!(v.verify(&token).is_ok());
        // The variable wins over secret_default.
        assert_eq!(
            code(v.verify(&sign_hs(Algorithm::HS256, &claims()))),
            "invalid_token"
        );
    }

    #[test]
    fn secret_env_unset_is_an_error_naming_it() {
        let var = "GATEWAY_JWT_TEST_SURELY_UNSET_7F3A9C";
        assert!(std::env::var_os(var).is_none());
        let err = compile_err(&JwtSettings {
            secret_env: Some(var.into()),
            ..settings("HS256")
        });
        assert!(err.contains(var) && err.contains("not set"), "{err}");
    }

    #[test]
    fn secret_env_unset_falls_back_to_secret_default() {
        let v = compile(&JwtSettings {
            secret_env: Some("GATEWAY_JWT_TEST_SURELY_UNSET_7F3A9C".into()),
            secret_default: Some(SECRET.into()),
            ..settings("HS256")
        });
        assert!(v.verify(&sign_hs(Algorithm::HS256, &claims())).is_ok());
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = hs_settings("HS256");
        let v = compile(&s);
        for text in [format!("{v:?}"), format!("{v:#?}"), format!("{s:?}")] {
            assert!(!text.contains(SECRET), "secret leaked: {text}");
        }
        assert!(format!("{s:?}").contains("<redacted>"));
        let path = std::env::var("PATH").unwrap();
        let v = compile(&JwtSettings {
            secret_env: Some("PATH".into()),
            ..settings("HS256")
        });
        assert!(!format!("{v:?}").contains(&path));
    }

    // ---- compile errors ----

    #[test]
    fn compile_refuses_unknown_algorithm_listing_accepted_ones() {
        for alg in ["none", "hs256", "PS256", "EdDSA", ""] {
            let err = compile_err(&hs_settings(alg));
            assert!(err.contains("unknown algorithm"), "{err}");
            assert!(
                err.contains("HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384"),
                "{err}"
            );
        }
    }

    #[test]
    fn compile_refuses_hs_without_secret() {
        let err = compile_err(&settings("HS256"));
        assert!(
            err.contains("secret_env") && err.contains("secret_default"),
            "{err}"
        );
        let err = compile_err(&JwtSettings {
            secret_default: Some(String::new()),
            ..settings("HS256")
        });
        assert!(err.contains("empty"), "{err}");
        let err = compile_err(&JwtSettings {
            secret_env: Some("A=B".into()),
            ..settings("HS256")
        });
        assert!(
            err.contains("not a valid environment variable name"),
            "{err}"
        );
    }

    #[test]
    fn compile_refuses_secret_and_key_together() {
        let err = compile_err(&JwtSettings {
            public_key_file: Some("rsa_public.pem".into()),
            ..hs_settings("HS256")
        });
        assert!(err.contains("not both"), "{err}");
        let err = compile_err(&JwtSettings {
            secret_default: Some(SECRET.into()),
            public_key_file: Some("rsa_public.pem".into()),
            ..settings("RS256")
        });
        assert!(err.contains("not both"), "{err}");
        let err = compile_err(&JwtSettings {
            public_key_file: Some("rsa_public.pem".into()),
            jwks_file: Some("jwks.json".into()),
            ..settings("RS256")
        });
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn compile_refuses_rs_es_without_key_file() {
        for alg in ["RS256", "ES256"] {
            let err = compile_err(&settings(alg));
            assert!(
                err.contains("public_key_file") && err.contains("jwks_file"),
                "{err}"
            );
        }
    }

    #[test]
    fn compile_names_unreadable_or_invalid_files() {
        let err = compile_err(&JwtSettings {
            public_key_file: Some("missing.pem".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("cannot read") && err.contains("missing.pem"),
            "{err}"
        );
        let err = compile_err(&JwtSettings {
            jwks_file: Some("missing.json".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("cannot read") && err.contains("missing.json"),
            "{err}"
        );
        // A JSON file that is not a PEM file.
        let err = compile_err(&JwtSettings {
            public_key_file: Some("jwks.json".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("jwks.json") && err.contains("not a PEM"),
            "{err}"
        );
        // A PEM file that is not a JWKS.
        let err = compile_err(&JwtSettings {
            jwks_file: Some("rsa_public.pem".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("rsa_public.pem") && err.contains("not a JWKS"),
            "{err}"
        );
        // A PEM file with a corrupt body.
        let dir = std::env::temp_dir().join(format!("gateway-jwt-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.pem"),
            "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let err = JwtVerifier::compile(
            &JwtSettings {
                public_key_file: Some("bad.pem".into()),
                ..settings("RS256")
            },
            &dir,
        )
        .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("bad.pem") && err.contains("invalid PEM"),
            "{err}"
        );
    }

    #[test]
    fn compile_refuses_key_type_not_matching_algorithm() {
        let err = compile_err(&JwtSettings {
            public_key_file: Some("ec_public.pem".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("ec_public.pem") && err.contains("an EC key") && err.contains("RS256"),
            "{err}"
        );
        let err = compile_err(&JwtSettings {
            public_key_file: Some("rsa_public.pem".into()),
            ..settings("ES256")
        });
        assert!(err.contains("an RSA key") && err.contains("ES256"), "{err}");
        // The right family on the wrong curve.
        let err = compile_err(&JwtSettings {
            public_key_file: Some("ec384_public.pem".into()),
            ..settings("ES256")
        });
        assert!(err.contains("P-384") && err.contains("P-256"), "{err}");
        let err = compile_err(&JwtSettings {
            public_key_file: Some("ec_public.pem".into()),
            ..settings("ES384")
        });
        assert!(err.contains("P-256") && err.contains("P-384"), "{err}");
    }

    #[test]
    fn compile_refuses_private_key_and_small_rsa_key() {
        let err = compile_err(&JwtSettings {
            public_key_file: Some("rsa_private.pem".into()),
            ..settings("RS256")
        });
        assert!(
            err.contains("private key") && err.contains("-pubout"),
            "{err}"
        );
        let err = compile_err(&JwtSettings {
            public_key_file: Some("rsa1024_public.pem".into()),
            ..settings("RS256")
        });
        assert!(err.contains("1024 bits") && err.contains("2048"), "{err}");
    }

    #[test]
    fn compile_refuses_jwks_without_usable_key() {
        // jwks.json's RSA keys are marked alg RS256, its EC key is P-256.
        for alg in ["RS384", "ES384"] {
            let err = compile_err(&JwtSettings {
                jwks_file: Some("jwks.json".into()),
                ..settings(alg)
            });
            assert!(
                err.contains("jwks.json") && err.contains("no key usable"),
                "{err}"
            );
        }
    }

    #[test]
    fn compile_checks_leeway_and_claims_settings() {
        let err = compile_err(&JwtSettings {
            leeway: Some("soon".into()),
            ..hs_settings("HS256")
        });
        assert!(err.contains("invalid leeway"), "{err}");
        let err = compile_err(&JwtSettings {
            leeway: Some("2h".into()),
            ..hs_settings("HS256")
        });
        assert!(err.contains("too large"), "{err}");
        let v = compile(&JwtSettings {
            leeway: Some("2m".into()),
            ..hs_settings("HS256")
        });
        assert_eq!(v.leeway, Duration::from_secs(120));
        assert_eq!(compile(&hs_settings("HS256")).leeway, DEFAULT_LEEWAY);
        for bad in [
            JwtSettings {
                audience: Some(vec![]),
                ..hs_settings("HS256")
            },
            JwtSettings {
                issuer: Some(String::new()),
                ..hs_settings("HS256")
            },
            JwtSettings {
                principal_claim: Some(String::new()),
                ..hs_settings("HS256")
            },
        ] {
            assert!(compile_err(&bad).contains("empty") || compile_err(&bad).contains("at least"));
        }
    }

    #[test]
    fn settings_deny_unknown_fields() {
        let ok: JwtSettings = serde_json::from_value(json!({
            "algorithm": "RS256",
            "jwks_file": "jwks.json",
            "issuer": "https://issuer.example",
            "audience": ["gateway"],
            "leeway": "10s",
            "require_exp": false,
            "principal_claim": "email"
        }))
        .unwrap();
        assert_eq!(ok.audience, Some(vec!["gateway".to_string()]));
        let err = serde_json::from_value::<JwtSettings>(json!({
            "algorithm": "HS256",
            "secret": "oops"
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        assert!(serde_json::from_value::<JwtSettings>(json!({"secret_env": "X"})).is_err());
    }

    #[test]
    fn error_display_has_code_and_message() {
        let e = JwtError::new(JwtError::TOKEN_EXPIRED, "token has expired");
        assert_eq!(e.to_string(), "token_expired: token has expired");
    }
}
