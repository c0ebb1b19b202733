//! `[recording]`: which sessions are recorded, and where.

use std::path::PathBuf;

use serde::Deserialize;

use super::issues::{Issues, Paths};
use crate::hypervisor::BackendNetwork;
use crate::recording::RecordingSettings;

/// `[recording]`. Absent: nothing is recorded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecording {
    /// Folder recordings are written to (created `0700` when missing).
    pub folder: Option<PathBuf>,
    /// Backend networks (their `name`) whose sessions are recorded: if a
    /// recording cannot be made or stops, the session goes on (audited).
    #[serde(default)]
    pub backends: Vec<String>,
    /// Backend networks whose sessions must be recorded: a session whose
    /// recording cannot be made is refused, one whose recording stops (disk
    /// full, size cap, writer behind) is ended (4007). A token's
    /// `console.record` asks the same of its own session.
    #[serde(default)]
    pub required: Vec<String>,
    /// Most bytes one recording may take; past it the recording stops (the
    /// session goes on, the stop is audited). Default 67108864 (64 MiB).
    pub max_bytes: Option<u64>,
    /// Recordings older than this many days are removed. Default 90 (0: kept).
    pub keep_days: Option<u64>,
    /// The most bytes all recordings may take; the oldest are removed first.
    /// Default 10737418240 (10 GiB; 0: no limit).
    pub max_total_bytes: Option<u64>,
}

/// `[recording]`, validated against the backend networks it names.
pub(super) fn validate_recording(
    raw: RawRecording,
    networks: &[BackendNetwork],
    paths: Paths<'_>,
    issues: &mut Issues,
) -> Option<RecordingSettings> {
    let Some(folder) = raw.folder else {
        issues.push("recording.folder", "required: where recordings are written");
        return None;
    };
    for (key, names) in [
        ("recording.backends", &raw.backends),
        ("recording.required", &raw.required),
    ] {
        for name in names {
            if !networks.iter().any(|n| &n.name == name) {
                issues.push(
                    key,
                    format!("{name:?} names no [[backends]] entry (its `name`)"),
                );
            }
        }
    }
    let max_bytes = raw.max_bytes.unwrap_or(64 << 20);
    if max_bytes < 4096 {
        issues.push("recording.max_bytes", "must be at least 4096");
    }
    let keep_days = raw.keep_days.unwrap_or(90);
    let max_total = raw.max_total_bytes.unwrap_or(10 << 30);
    if max_total != 0 && max_total < max_bytes {
        issues.push(
            "recording.max_total_bytes",
            "must hold at least one recording (recording.max_bytes), or be 0",
        );
    }
    Some(RecordingSettings {
        folder: paths.resolve(&folder),
        backends: raw.backends,
        required: raw.required,
        max_bytes,
        keep_for: (keep_days > 0).then(|| std::time::Duration::from_secs(keep_days * 86_400)),
        max_total_bytes: (max_total > 0).then_some(max_total),
    })
}
