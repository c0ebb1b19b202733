//! `[node]`: this node's name among several behind a balancer.

use serde::Deserialize;

use super::issues::Issues;

/// `[node]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// This node's name in logs, metrics, the audit trail and the session
    /// list: letters, digits, `.`, `-`, `_`, at most 63. Default: the host name.
    pub name: Option<String>,
}

/// Longest node name: one DNS label.
const NODE_NAME_MAX: usize = 63;

/// `[node] name`, or the host name (its first label when the host name
/// will not do as it is), or `porthole`.
pub(super) fn validate_node(raw: RawNode, issues: &mut Issues) -> String {
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= NODE_NAME_MAX
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match raw.name {
        Some(name) if valid(&name) => name,
        Some(_) => {
            issues.push(
                "node.name",
                "must be 1 to 63 letters, digits, `.`, `-` or `_`",
            );
            String::new()
        }
        None => {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            let short = host.split('.').next().unwrap_or_default().to_string();
            [host, short]
                .into_iter()
                .find(|n| valid(n))
                .unwrap_or_else(|| "porthole".into())
        }
    }
}
