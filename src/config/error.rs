//! The problems of a configuration. Validation collects them instead of stopping at the
//! first, because someone fixing a file wants every mistake at once, each with the place
//! (file, line, column) and the field it concerns.

use std::fmt;
use std::path::PathBuf;

/// A place in a configuration file, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as it was named.
    pub file: PathBuf,
    /// The line.
    pub line: usize,
    /// The column, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// One problem of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file; `None` for flags and for the file as a whole.
    pub location: Option<Location>,
    /// The field: `exports[1].image`, `tls.mode`, or a flag such as `--tls`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.location {
            write!(f, "{at}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a configuration, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub(super) fn one(
        location: Option<Location>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigErrors(vec![ConfigError {
            location,
            field: field.into(),
            message: message.into(),
        }])
    }

    /// The problems, one per item.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems as validation goes on.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<ConfigError>);

impl Problems {
    pub(super) fn add(
        &mut self,
        at: Option<Location>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.0.push(ConfigError {
            location: at,
            field: field.into(),
            message: message.into(),
        });
    }

    pub(super) fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}
