//! Configuration errors: `file:line:col: field.path: what is wrong (and what would be right)`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

/// One configuration mistake, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// File the mistake is in, as the operator named it (relative paths stay relative).
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: u64,
    /// 1-based column (0 when unknown).
    pub col: u64,
    /// Dotted field path, e.g. `source.interval` or `endpoints[0].path` (`.` for the whole file).
    pub field: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.field,
            self.message
        )
    }
}

/// Every mistake found in one load, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors for one file.
pub(crate) struct Sink<'a> {
    pub file: &'a Path,
    pub errors: &'a mut Vec<ConfigError>,
}

impl Sink<'_> {
    pub fn at<T>(
        &mut self,
        span: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.push(
            span.referenced.line(),
            span.referenced.column(),
            field,
            message,
        );
    }

    pub fn push(
        &mut self,
        line: u64,
        col: u64,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            field: field.into(),
            message: message.into(),
        });
    }
}
