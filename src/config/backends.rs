//! `[[backends]]`: the hypervisor networks Porthole may connect to (the
//! allow-list, with each network's console port ranges) and the credentials
//! it presents to their SPICE and VNC servers.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::issues::{Issues, Paths, parse_each, parse_net};
use crate::hypervisor::{BackendNetwork, PortRange, SpiceBackendConfig, VncBackendConfig};
use crate::token::ConsoleType;

/// One `[[backends]]` entry: a hypervisor network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// Name for logs (and, later, credentials).
    pub name: Option<String>,
    /// CIDR ranges hypervisor hosts live in.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Host names accepted verbatim.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Console port ranges, e.g. `"5900-6923"`. Default `["5900-65535"]`.
    pub ports: Option<Vec<String>>,
    /// `[backends.ports_by_type]`: console type to its own port ranges
    /// (replacing `ports` for that type), e.g. `serial = ["10000-20000"]`.
    #[serde(default)]
    pub ports_by_type: HashMap<String, Vec<String>>,
    /// SPICE credentials for this network.
    pub spice: Option<RawSpiceBackend>,
    /// VNC credentials for this network.
    pub vnc: Option<RawVncBackend>,
}

/// `[backends.spice]`: what Porthole presents to the SPICE servers of a backend network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpiceBackend {
    /// File holding the SPICE ticket (password) the hypervisors expect. Absent: none.
    pub password_file: Option<PathBuf>,
    /// CA (PEM) that signs the hypervisors' SPICE TLS certificates. Without
    /// it Porthole uses the plain port only.
    pub ca: Option<PathBuf>,
    /// Name to check in the hypervisor's certificate. Default: the token's host.
    pub tls_name: Option<String>,
    /// Which port to link on first, `"tls"` (default, when `ca` is set and the
    /// token has a `tls_port`) or `"plain"` (then TLS only on NEED_SECURED).
    pub prefer: Option<String>,
    /// The channels a client may link (`"main"`, `"display"`, `"inputs"`,
    /// `"cursor"`, `"playback"`, `"record"`, `"smartcard"`, `"usbredir"`,
    /// `"port"`, `"webdav"`): any other is refused at its link. Absent: all.
    pub channels: Option<Vec<String>>,
}

/// `[backends.vnc]`: how Porthole authenticates to the VNC servers of a backend network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVncBackend {
    /// File holding the VNC password (VNC authentication uses its first 8 bytes).
    pub password_file: Option<PathBuf>,
    /// CA (PEM) that signs the hypervisors' VeNCrypt x509 certificates.
    pub ca: Option<PathBuf>,
    /// Name to check in the hypervisor's certificate. Default: the token's host.
    pub tls_name: Option<String>,
    /// Client certificate chain (PEM) for hypervisors that verify peers.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Schemes, most preferred first: `x509-vnc`, `x509-none`, `vnc`, `none`.
    pub auth: Option<Vec<String>>,
    /// Ask hypervisors to share the console with other viewers, whatever the
    /// client asks (QEMU disconnects the others for an exclusive client). Default true.
    pub force_shared: Option<bool>,
}

/// `[[backends]]`, validated: the allow-list and each network's credentials.
pub(super) struct Backends {
    pub(super) networks: Vec<BackendNetwork>,
    pub(super) spice: HashMap<String, SpiceBackendConfig>,
    pub(super) vnc: HashMap<String, VncBackendConfig>,
}

/// Every `[[backends]]` entry.
pub(super) fn validate_backends(
    raw: Vec<RawBackend>,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> Backends {
    let mut out = Backends {
        networks: Vec::new(),
        spice: HashMap::new(),
        vnc: HashMap::new(),
    };
    let mut names = std::collections::HashSet::new();
    for (i, b) in raw.into_iter().enumerate() {
        let key = format!("backends[{i}]");
        let name = b.name.unwrap_or_else(|| format!("backend-{i}"));
        if !names.insert(name.clone()) {
            // A name selects a network's credentials, channel list and
            // recording policy: two of one name would take each other's.
            issues.push(
                format!("{key}.name"),
                format!("another [[backends]] entry is named `{name}`"),
            );
        }
        let networks = parse_each(
            issues,
            &format!("{key}.networks"),
            &b.networks,
            parse_net,
            "a CIDR range or address",
        );
        if networks.is_empty() && b.hostnames.is_empty() {
            issues.push(key.clone(), "list at least one network or hostname");
        }
        let ports = port_ranges(
            issues,
            &format!("{key}.ports"),
            &b.ports.unwrap_or_else(|| vec!["5900-65535".into()]),
        );
        let mut ports_by_type = HashMap::new();
        for (console, ranges) in &b.ports_by_type {
            let at = format!("{key}.ports_by_type.{console}");
            match console.parse::<ConsoleType>() {
                Ok(c) if ranges.is_empty() => {
                    issues.push(at, format!("list at least one port range for {c} consoles"));
                }
                Ok(c) => {
                    ports_by_type.insert(c, port_ranges(issues, &at, ranges));
                }
                Err(e) => issues.push(at, e.to_string()),
            }
        }
        if let Some(sp) = b.spice {
            let c = validate_spice_backend(&key, sp, paths, issues);
            out.spice.insert(name.clone(), c);
        }
        if let Some(v) = b.vnc {
            let c = validate_vnc_backend(&key, v, paths, issues);
            out.vnc.insert(name.clone(), c);
        }
        out.networks.push(BackendNetwork {
            name,
            networks,
            hostnames: b.hostnames,
            ports,
            ports_by_type,
        });
    }
    out
}

/// Port ranges at `key` (`"5900-6923"`, `"10000"`), each located when bad.
fn port_ranges(issues: &mut Issues, key: &str, raw: &[String]) -> Vec<PortRange> {
    let mut ports = Vec::new();
    for (j, p) in raw.iter().enumerate() {
        match p.parse::<PortRange>() {
            Ok(r) => ports.push(r),
            Err(e) => issues.push(format!("{key}[{j}]"), e),
        }
    }
    ports
}

/// A TLS name to check in hypervisor certificates, at `key`.
fn check_tls_name(issues: &mut Issues, key: String, name: Option<&str>) {
    if let Some(name) = name
        && rustls::pki_types::ServerName::try_from(name).is_err()
    {
        issues.push(key, format!("`{name}` is not a DNS name or IP address"));
    }
}

/// `[backends.spice]` of the backend at `key`.
fn validate_spice_backend(
    key: &str,
    sp: RawSpiceBackend,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> SpiceBackendConfig {
    check_tls_name(
        issues,
        format!("{key}.spice.tls_name"),
        sp.tls_name.as_deref(),
    );
    let prefer_plain = match sp.prefer.as_deref() {
        None | Some("tls") => false,
        Some("plain") => true,
        Some(other) => {
            issues.push(
                format!("{key}.spice.prefer"),
                format!("`{other}` is not \"tls\" or \"plain\""),
            );
            false
        }
    };
    let channels = sp.channels.map(|names| {
        let key = format!("{key}.spice.channels");
        let kinds: Vec<u8> = names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let kind = crate::protocol::spice::messages::channel::by_name(name);
                if kind.is_none() {
                    issues.push(
                        format!("{key}[{i}]"),
                        format!("`{name}` is not a SPICE channel this gateway relays"),
                    );
                }
                kind
            })
            .collect();
        if !names.iter().any(|n| n == "main") {
            issues.push(&key, "must hold \"main\": every session opens with it");
        }
        kinds
    });
    SpiceBackendConfig {
        password_file: sp.password_file.map(|p| paths.resolve(&p)),
        ca: sp.ca.map(|p| paths.resolve(&p)),
        tls_name: sp.tls_name,
        prefer_plain,
        channels,
    }
}

/// `[backends.vnc]` of the backend at `key`.
fn validate_vnc_backend(
    key: &str,
    v: RawVncBackend,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> VncBackendConfig {
    check_tls_name(issues, format!("{key}.vnc.tls_name"), v.tls_name.as_deref());
    let mut c = VncBackendConfig {
        password_file: v.password_file.map(|p| paths.resolve(&p)),
        ca: v.ca.map(|p| paths.resolve(&p)),
        tls_name: v.tls_name,
        force_shared: v.force_shared.unwrap_or(true),
        ..VncBackendConfig::default()
    };
    c.client_identity = match (v.client_cert, v.client_key) {
        (Some(cert), Some(k)) => Some((paths.resolve(&cert), paths.resolve(&k))),
        (None, None) => None,
        _ => {
            issues.push(
                format!("{key}.vnc.client_cert"),
                "set both `client_cert` and `client_key`, or neither",
            );
            None
        }
    };
    if let Some(list) = v.auth {
        c.auth.clear();
        for (j, a) in list.iter().enumerate() {
            match crate::protocol::rfb::upstream::UpstreamAuth::parse(a) {
                Some(x) => c.auth.push(x),
                None => issues.push(
                    format!("{key}.vnc.auth[{j}]"),
                    format!("`{a}` is not one of x509-vnc, x509-none, vnc, none"),
                ),
            }
        }
        if c.auth.is_empty() {
            issues.push(format!("{key}.vnc.auth"), "name at least one scheme");
        }
    }
    c
}
