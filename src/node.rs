//! This node's name (`[node] name`, default the host name): what tells
//! several Porthole nodes behind one balancer apart in logs, metrics, the
//! audit trail, the session list and the admin API's answers.
//!
//! One process is one node, so the name is process-wide: set once at start,
//! before the listeners open, and read by whoever writes a record. Reading it
//! is a load, cheap enough for every log line.

use std::sync::OnceLock;

static NAME: OnceLock<String> = OnceLock::new();

/// Names this process `name`; the first call wins (a reload cannot rename a
/// node: `node.name` needs a restart). Returns whether this call set it.
pub fn set(name: &str) -> bool {
    let set = NAME.set(name.to_string()).is_ok();
    if set {
        crate::metrics::node_info(name);
    }
    set
}

/// This node's name, once [`set`]; `None` before (the log lines of start-up
/// before the config is read).
pub fn get() -> Option<&'static str> {
    NAME.get().map(String::as_str)
}

/// This node's name, or `"unnamed"` before it is set (in-process tests that
/// build no app).
pub fn name() -> &'static str {
    get().unwrap_or("unnamed")
}
