//! `[audit]`: where the audit trail goes.

use std::path::PathBuf;

use serde::Deserialize;

use super::issues::Paths;

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// JSON-lines file the audit trail is appended to. Absent: the log.
    pub path: Option<PathBuf>,
}

/// `[audit]`: nothing to refuse; the path resolves against the file's folder.
pub(super) fn validate_audit(raw: RawAudit, paths: Paths<'_>) -> Option<PathBuf> {
    raw.path.map(|p| paths.resolve(&p))
}
