//! The operator's allow-list of hypervisor networks and console ports.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::ConsoleTarget;
use crate::console::ConsoleType;

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
    /// Console ports that may be reached on those hosts, for every console
    /// type not in `ports_by_type`.
    pub ports: Vec<PortRange>,
    /// The ports of the console types that have their own (libvirt's serial
    /// consoles are TCP chardevs from a range of their own): a token of such
    /// a type may reach only these, and one of another type never these
    /// unless `ports` holds them too. So a token of the wrong type at an
    /// endpoint (a Nova token names no type) is refused, not connected.
    pub ports_by_type: HashMap<ConsoleType, Vec<PortRange>>,
}

impl BackendNetwork {
    fn holds_host(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            // A mapped address is the IPv4 host it names (and is connected
            // to as such), as a mapped network is the IPv4 one it means.
            Ok(ip) => {
                let ip = ip.to_canonical();
                self.networks.iter().any(|n| n.contains(&ip))
            }
            Err(_) => self.hostnames.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }

    fn holds_port(&self, port: u16, console: ConsoleType) -> bool {
        self.ports_by_type
            .get(&console)
            .unwrap_or(&self.ports)
            .iter()
            .any(|r| r.contains(port))
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No backend network holds the host.
    #[error("host {0} is in no allowed hypervisor network")]
    HostNotAllowed(String),
    /// The host is known but the port is outside every range allowed to
    /// the console type.
    #[error("port {port} is not allowed for {console} consoles on {host}")]
    PortNotAllowed {
        /// The target host.
        host: String,
        /// The refused port.
        port: u16,
        /// The console type it was asked for.
        console: ConsoleType,
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

    /// Finds the backend network that allows every port of `target` to a
    /// console of type `console`.
    pub fn check(
        &self,
        target: &ConsoleTarget,
        console: ConsoleType,
    ) -> Result<&BackendNetwork, TargetError> {
        let host = target.host.trim_start_matches('[').trim_end_matches(']');
        let mut host_known = false;
        let mut refused_port = target.port;
        for backend in self.backends.iter().filter(|b| b.holds_host(host)) {
            host_known = true;
            match std::iter::once(target.port)
                .chain(target.tls_port)
                .find(|p| !backend.holds_port(*p, console))
            {
                None => return Ok(backend),
                Some(p) => refused_port = p,
            }
        }
        if host_known {
            Err(TargetError::PortNotAllowed {
                host: host.to_string(),
                port: refused_port,
                console,
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
            ports_by_type: HashMap::from([(
                ConsoleType::Serial,
                vec!["20000-20099".parse().unwrap()],
            )]),
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
            l.check(&target("10.1.2.3", 5901, None), ConsoleType::Novnc)
                .unwrap()
                .name,
            "lab"
        );
        assert!(
            l.check(&target("::1", 10000, Some(5900)), ConsoleType::Novnc)
                .is_ok()
        );
        assert!(
            l.check(&target("[::1]", 5900, None), ConsoleType::Novnc)
                .is_ok()
        );
        assert!(
            l.check(&target("COMPUTE-1.lab", 5900, None), ConsoleType::Novnc)
                .is_ok()
        );
        // An IPv4 host in mapped form is that host.
        assert!(
            l.check(&target("::ffff:10.1.2.3", 5901, None), ConsoleType::Novnc)
                .is_ok()
        );
        assert!(
            l.check(&target("::ffff:10.2.0.1", 5901, None), ConsoleType::Novnc)
                .is_err()
        );
    }

    #[test]
    fn a_type_with_ports_of_its_own_reaches_only_those_and_no_other_type_does() {
        let l = list();
        let serial = ConsoleType::Serial;
        assert!(l.check(&target("10.1.0.1", 20001, None), serial).is_ok());
        // A serial token at a VNC port (a Nova noVNC token on the serial
        // route) and a noVNC token at a serial port: refused, not connected.
        assert_eq!(
            l.check(&target("10.1.0.1", 5901, None), serial)
                .map(|b| b.name.as_str()),
            Err(TargetError::PortNotAllowed {
                host: "10.1.0.1".into(),
                port: 5901,
                console: serial,
            })
        );
        for other in [
            ConsoleType::Novnc,
            ConsoleType::SpiceHtml5,
            ConsoleType::SpiceDirect,
        ] {
            assert!(
                l.check(&target("10.1.0.1", 20001, None), other).is_err(),
                "{other}"
            );
        }
    }

    #[test]
    fn other_hosts_and_ports_are_refused() {
        let l = list();
        assert_eq!(
            l.check(&target("10.2.0.1", 5900, None), ConsoleType::Novnc)
                .map(|b| b.name.as_str()),
            Err(TargetError::HostNotAllowed("10.2.0.1".into()))
        );
        assert_eq!(
            l.check(&target("169.254.169.254", 80, None), ConsoleType::Novnc)
                .map(|b| b.name.as_str()),
            Err(TargetError::HostNotAllowed("169.254.169.254".into()))
        );
        assert_eq!(
            l.check(&target("10.1.0.1", 22, None), ConsoleType::Novnc)
                .map(|b| b.name.as_str()),
            Err(TargetError::PortNotAllowed {
                host: "10.1.0.1".into(),
                port: 22,
                console: ConsoleType::Novnc,
            })
        );
        // The TLS port is checked too: a token cannot smuggle a second port in.
        assert_eq!(
            l.check(&target("10.1.0.1", 5900, Some(6379)), ConsoleType::Novnc)
                .map(|b| b.name.as_str()),
            Err(TargetError::PortNotAllowed {
                host: "10.1.0.1".into(),
                port: 6379,
                console: ConsoleType::Novnc,
            })
        );
        // Names are never resolved: an unlisted name is refused even if it would resolve inside.
        assert!(
            l.check(&target("localhost", 5900, None), ConsoleType::Novnc)
                .is_err()
        );
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
