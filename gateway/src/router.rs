//! Endpoint paths with `{param}` segments, and per-listener lookup.

use std::sync::Arc;

use crate::config::{EndpointCfg, HttpRouteCfg};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Param(String),
}

/// A path such as `/v1/jobs/{job_id}/ws`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segs: Vec<Seg>,
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let empty = p.is_empty();
    p.split('/').filter(move |_| !empty)
}

impl PathPattern {
    /// Parse a pattern; errors say what is wrong.
    pub fn parse(raw: &str) -> Result<PathPattern, String> {
        if !raw.starts_with('/') {
            return Err(format!("path {raw:?} must start with '/'"));
        }
        let mut segs = Vec::new();
        for s in split(raw) {
            if let Some(name) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "invalid path parameter {s:?} in {raw:?}: use letters, digits and '_', e.g. {{job_id}}"
                    ));
                }
                if segs.iter().any(|x| x == &Seg::Param(name.to_string())) {
                    return Err(format!(
                        "path parameter {{{name}}} appears twice in {raw:?}"
                    ));
                }
                segs.push(Seg::Param(name.to_string()));
            } else if s.contains(['{', '}']) {
                return Err(format!(
                    "path parameters must be whole segments, e.g. /v1/jobs/{{job_id}}/ws, not {raw:?}"
                ));
            } else {
                segs.push(Seg::Lit(s.to_string()));
            }
        }
        Ok(PathPattern {
            raw: raw.to_string(),
            segs,
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Parameter names in order.
    pub fn params(&self) -> Vec<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Param(p) => Some(p.as_str()),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    /// The pattern with parameter names erased: two patterns with the same
    /// shape match the same requests.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        for s in &self.segs {
            out.push('/');
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Param(_) => out.push_str("{}"),
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// Match a request path; returns the parameters (percent-decoded) on success.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut params = Vec::new();
        let mut it = split(path);
        for seg in &self.segs {
            let got = it.next()?;
            match seg {
                Seg::Lit(l) if l == got => {}
                Seg::Lit(_) => return None,
                Seg::Param(name) => {
                    if got.is_empty() {
                        return None;
                    }
                    let v = percent_encoding::percent_decode_str(got)
                        .decode_utf8()
                        .ok()?
                        .into_owned();
                    params.push((name.clone(), v));
                }
            }
        }
        if it.next().is_some() {
            return None;
        }
        Some(params)
    }
}

/// Path parameters of a matched request, in pattern order.
pub type Params = Vec<(String, String)>;

/// What a path leads to.
#[derive(Clone, Debug)]
pub enum Target {
    /// A WebSocket endpoint.
    Ws(Arc<EndpointCfg>),
    /// An HTTP JSON route.
    Http(Arc<HttpRouteCfg>),
}

/// The endpoints and routes of one listener.
#[derive(Default)]
pub struct Router {
    routes: Vec<(PathPattern, Target)>,
}

impl Router {
    /// Build from every endpoint and HTTP route of one listener.
    pub fn new(endpoints: Vec<Arc<EndpointCfg>>, http: Vec<Arc<HttpRouteCfg>>) -> Router {
        let mut routes: Vec<(PathPattern, Target)> = Vec::new();
        for e in endpoints {
            for p in &e.paths {
                routes.push((p.clone(), Target::Ws(e.clone())));
            }
        }
        for h in http {
            routes.push((h.path.clone(), Target::Http(h)));
        }
        // Literal paths first so `/ws/all` wins over `/ws/{name}`.
        routes.sort_by_key(|(p, _)| p.params().len());
        Router { routes }
    }

    /// Find what serves a request path.
    pub fn find(&self, path: &str) -> Option<(Target, Params)> {
        self.routes
            .iter()
            .find_map(|(p, t)| p.matches(path).map(|m| (t.clone(), m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_and_extract() {
        let p = PathPattern::parse("/v1/jobs/{job_id}/ws").unwrap();
        assert_eq!(p.shape(), "/v1/jobs/{}/ws");
        assert_eq!(
            p.matches("/v1/jobs/a%20b/ws"),
            Some(vec![("job_id".into(), "a b".into())])
        );
        assert_eq!(p.matches("/v1/jobs//ws"), None);
        assert_eq!(p.matches("/v1/jobs/1/ws/x"), None);
        assert_eq!(p.matches("/v1/jobs/1"), None);
        let root = PathPattern::parse("/").unwrap();
        assert_eq!(root.matches("/"), Some(vec![]));
        assert_eq!(root.matches("/x"), None);
        assert!(PathPattern::parse("ws").is_err());
        assert!(PathPattern::parse("/a/x{id}").is_err());
        assert!(PathPattern::parse("/a/{id}/{id}").is_err());
    }
}
