//! What validation finds, and where: the one collector every section's
//! validator adds its problems and warnings to, how each is placed at its
//! line and column in the file, and the checks and parsers the sections share.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `tokens.keys[1].algorithm`.
    pub key: String,
    /// 1-based line and column of the key in the file, when it is there.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, col)) => write!(
                f,
                "line {line}, column {col}: `{}`: {}",
                self.key, self.message
            ),
            None => write!(f, "`{}`: {}", self.key, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// The problems, in file order where known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .file
            .as_ref()
            .map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
        write!(f, "{name}: {} problem(s)", self.issues.len())?;
        for issue in &self.issues {
            write!(f, "\n  {issue}")?;
        }
        Ok(())
    }
}

/// What validation found: problems (the file is refused) and warnings (it is
/// taken, but should change). Every section's validator adds to the one collector.
#[derive(Default)]
pub(super) struct Issues {
    pub(super) problems: Vec<ConfigIssue>,
    pub(super) warnings: Vec<ConfigIssue>,
}

impl Issues {
    /// A problem at `key`. The same problem found twice is reported once
    /// (two settings can share one message).
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let issue = ConfigIssue {
            key: key.into(),
            at: None,
            message: message.into(),
        };
        if !self.problems.contains(&issue) {
            self.problems.push(issue);
        }
    }

    /// A warning at `key`.
    pub(super) fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(ConfigIssue {
            key: key.into(),
            at: None,
            message: message.into(),
        });
    }
}

/// Resolves the file's relative paths against its folder.
#[derive(Debug, Clone, Copy)]
pub(super) struct Paths<'a>(pub(super) &'a Path);

impl Paths<'_> {
    pub(super) fn resolve(self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.0.join(p)
        }
    }
}

/// Gives each issue its line and column in `text`, and sorts them into file order.
pub(super) fn place(text: &str, issues: &mut [ConfigIssue]) {
    if issues.is_empty() {
        return;
    }
    let doc = toml::de::DeTable::parse(text).ok();
    for issue in issues.iter_mut() {
        issue.at = doc
            .as_ref()
            .and_then(|d| locate(d.get_ref(), &issue.key))
            .map(|offset| line_col(text, offset));
    }
    issues.sort_by_key(|i| i.at.unwrap_or((usize::MAX, 0)));
}

/// Finds the byte offset of a dotted key path like `tokens.keys[1].kid`,
/// falling back to the nearest enclosing key that exists.
pub(super) fn locate(doc: &toml::de::DeTable<'_>, key: &str) -> Option<usize> {
    use toml::de::DeValue;
    let mut best = None;
    let mut table = Some(doc);
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let t = match (table, value.map(|v| v.get_ref())) {
            (Some(t), _) => t,
            (None, Some(DeValue::Table(t))) => t,
            _ => break,
        };
        let Some((k, v)) = t.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        best = Some(k.span().start);
        value = Some(v);
        table = None;
        if let Some(i) = index {
            match v.get_ref() {
                DeValue::Array(items) if i < items.len() => {
                    best = Some(items[i].span().start);
                    value = Some(&items[i]);
                }
                _ => break,
            }
        }
    }
    best
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// `v`, with a problem at `key` unless it is within `min..=max`.
pub(super) fn within(issues: &mut Issues, key: &str, v: usize, min: usize, max: usize) -> usize {
    if !(min..=max).contains(&v) {
        issues.push(key, format!("between {min} and {max}"));
    }
    v
}

/// Seconds at `key` (`default` when absent), with a problem unless within `min..=max`.
pub(super) fn secs_within(
    issues: &mut Issues,
    key: &str,
    v: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> u64 {
    let v = v.unwrap_or(default);
    if !(min..=max).contains(&v) {
        issues.push(key, format!("must be within {min}..={max}"));
    }
    v
}

/// Seconds as a duration, where 0 means off.
pub(super) fn nonzero_secs(secs: u64) -> Option<Duration> {
    Some(Duration::from_secs(secs)).filter(|d| !d.is_zero())
}

/// A listener's address, `default` when absent (and, after a problem, when it does not parse).
pub(super) fn parse_addr(
    issues: &mut Issues,
    key: &str,
    value: Option<&str>,
    default: &str,
) -> SocketAddr {
    let text = value.unwrap_or(default);
    text.parse::<SocketAddr>().unwrap_or_else(|_| {
        issues.push(key, format!("`{text}` is not an address:port"));
        default.parse().expect("default address parses")
    })
}

/// An optional listener's address; a problem at `key` when it does not parse.
pub(super) fn parse_listener_addr(
    issues: &mut Issues,
    key: &str,
    text: &str,
) -> Option<SocketAddr> {
    let addr = text.parse::<SocketAddr>().ok();
    if addr.is_none() {
        issues.push(key, format!("`{text}` is not an address:port"));
    }
    addr
}

/// Every item of the list at `key` that parses; a problem at `key[i]` for each
/// that does not (saying it is not `what`).
pub(super) fn parse_each<T>(
    issues: &mut Issues,
    key: &str,
    items: &[String],
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match parse(item) {
            Some(v) => out.push(v),
            None => issues.push(format!("{key}[{i}]"), format!("`{item}` is not {what}")),
        }
    }
    out
}

/// A network, or one address; one written in IPv4-mapped form
/// (`::ffff:10.0.0.0/104`) is the IPv4 network it means, as client
/// addresses are IPv4 whichever socket they came in on.
pub(super) fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let net = s
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))?;
    if let ipnet::IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .ok()
            .map(ipnet::IpNet::V4);
    }
    Some(net)
}

/// The host of an http(s) URL, without brackets or port.
pub(super) fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_in_mapped_form_is_the_ipv4_network_it_means() {
        let net = |s: &str| parse_net(s).map(|n| n.to_string());
        assert_eq!(net("::ffff:10.0.0.0/104").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("::ffff:192.0.2.7").as_deref(), Some("192.0.2.7/32"));
        assert_eq!(net("10.0.0.0/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("2001:db8::/32").as_deref(), Some("2001:db8::/32"));
        // Wider than the mapped block: left as written.
        assert_eq!(net("::/64").as_deref(), Some("::/64"));
        assert_eq!(net("not a network"), None);
    }
}
