//! A wrapper that keeps secrets out of logs.
//!
//! Tokens, bearer keys, private key PEM and (later) hypervisor passwords live in
//! a [`Secret`]. Its `Debug` and `Display` print `[redacted]`, so a stray
//! `debug!("{config:?}")` cannot leak one. Reading the value takes an explicit
//! [`Secret::expose`], which is easy to grep for.

use std::fmt;

/// A value that must never reach a log line, a metric label or an error body.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Reads the secret. Every call site is a place where the secret leaves the
    /// wrapper on purpose.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-token".to_string());
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "hunter2-token");
    }
}
