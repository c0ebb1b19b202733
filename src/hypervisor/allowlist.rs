//! The operator's allow-list of hypervisor networks and console ports.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::ConsoleTarget;

/// An inclusive range of TCP ports, written `5900-6923` or `5900`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First allowed port.
    pub first: u16,
    /// Last allowed port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` falls inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if first == 0 || first > last {
            return Err(format!("`{s}` is not a port range (1-65535, low-high)"));
        }
        Ok(PortRange { first, last })
    }
}

/// One hypervisor network: the hosts and ports that consoles may live on.
#[derive(Debug, Clone)]
pub struct BackendNetwork {
    /// The operator's name for it; appears in logs and, later, selects credentials.
    pub name: String,
    /// Address ranges that hypervisor hosts may have.
    pub networks: Vec<IpNet>,
    /// Host names accepted verbatim (compared case-insensitively, never resolved here).
    pub hostnames: Vec<String>,
    /// Console ports that may be reached on those hosts.
    pub ports: Vec<PortRange>,
}

impl BackendNetwork {
    fn holds_host(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.networks.iter().any(|n| n.contains(&ip)),
            Err(_) => self.hostnames.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }

    fn holds_port(&self, port: u16) -> bool {
        self.ports.iter().any(|r| r.contains(port))
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No backend network holds the host.
    #[error("host {0} is in no allowed hypervisor network")]
    HostNotAllowed(String),
    /// The host is known but the port is outside every allowed range.
    #[error("port {port} is not allowed on {host}")]
    PortNotAllowed {
        /// The target host.
        host: String,
        /// The refused port.
        port: u16,
    },
}

/// The allow-list: every backend network Porthole may connect to.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    backends: Vec<BackendNetwork>,
}

impl AllowList {
    /// Builds the list; order matters, the first match wins.
    pub fn new(backends: Vec<BackendNetwork>) -> Self {
        Self { backends }
    }

    /// The backend networks, in match order.
    pub fn backends(&self) -> &[BackendNetwork] {
        &self.backends
    }

    /// Finds the backend network that allows every port of `target`.
    pub fn check(&self, target: &ConsoleTarget) -> Result<&BackendNetwork, TargetError> {
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let mut host_known = false;
        let mut refused_port = target.port;
        for backend in self.backends.iter().filter(|b| b.holds_host(host)) {
            host_known = true;
            match std::iter::once(target.port)
                .chain(target.tls_port)
                .find(|p| !backend.holds_port(*p))
            {
                None => return Ok(backend),
                Some(p) => refused_port = p,
            }
        }
        if host_known {
            Err(TargetError::PortNotAllowed {
                host: host.to_string(),
                port: refused_port,
            })
        } else {
            Err(TargetError::HostNotAllowed(host.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> AllowList {
        AllowList::new(vec![BackendNetwork {
            name: "lab".into(),
            networks: vec!["10.1.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()],
            hostnames: vec!["compute-1.lab".into()],
            ports: vec!["5900-5999".parse().unwrap(), "10000".parse().unwrap()],
        }])
    }

    fn target(host: &str, port: u16, tls_port: Option<u16>) -> ConsoleTarget {
        ConsoleTarget {
            host: host.into(),
            port,
            tls_port,
        }
    }

    #[test]
    fn allowed_hosts_and_ports_pass() {
        let l = list();
        assert_eq!(
            l.check(&target("10.1.2.3", 5901, None)).unwrap().name,
            "lab"
        );
        assert!(l.check(&target("::1", 10000, Some(5900))).is_ok());
        assert!(l.check(&target("[::1]", 5900, None)).is_ok());
        assert!(l.check(&target("COMPUTE-1.lab", 5900, None)).is_ok());
    }

    #[test]
    fn other_hosts_and_ports_are_refused() {
        let l = list();
        assert_eq!(
            l.check(&target("10.2.0.1", 5900, None))
                .map(|b| b.name.as_str()),
            Err(TargetError::HostNotAllowed("10.2.0.1".into()))
        );
        assert_eq!(
            l.check(&target("169.254.169.254", 80, None))
                .map(|b| b.name.as_str()),
            Err(TargetError::HostNotAllowed("169.254.169.254".into()))
        );
        assert_eq!(
            l.check(&target("10.1.0.1", 22, None))
                .map(|b| b.name.as_str()),
            Err(TargetError::PortNotAllowed {
                host: "10.1.0.1".into(),
                port: 22
            })
        );
        // The TLS port is checked too: a token cannot smuggle a second port in.
        assert_eq!(
            l.check(&target("10.1.0.1", 5900, Some(6379)))
                .map(|b| b.name.as_str()),
            Err(TargetError::PortNotAllowed {
                host: "10.1.0.1".into(),
                port: 6379
            })
        );
        // Names are never resolved: an unlisted name is refused even if it would resolve inside.
        assert!(l.check(&target("localhost", 5900, None)).is_err());
    }

    #[test]
    fn port_ranges_parse_strictly() {
        assert_eq!(
            "5900".parse::<PortRange>().unwrap(),
            PortRange {
                first: 5900,
                last: 5900
            }
        );
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("6000-5900".parse::<PortRange>().is_err());
        assert!("59x".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }
}
