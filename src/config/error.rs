//! The error type of everything a user can get wrong in a config (exit code 2).

/// A configuration or usage error; the message names the file/key and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// Several problems reported together, one per line.
    pub fn many(header: &str, problems: &[String]) -> Self {
        let mut msg = header.to_string();
        for p in problems {
            msg.push_str("\n  - ");
            msg.push_str(p);
        }
        ConfigError(msg)
    }
}

/// Shorthand for results carrying a [`ConfigError`].
pub type ConfigResult<T> = Result<T, ConfigError>;

/// Build a [`ConfigError`] with `format!` syntax.
#[macro_export]
macro_rules! config_err {
    ($($arg:tt)*) => { $crate::config::error::ConfigError(format!($($arg)*)) };
}
