//! The console type: the one word that says which ingress a token or ticket
//! opens, and the label every log line, metric and audit event carries.
//!
//! A leaf: tokens, sessions, metrics and the config all name console types,
//! so the type lives below all of them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What kind of console a token grants, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsoleType {
    /// VNC in the browser through noVNC over WebSocket.
    Novnc,
    /// SPICE in the browser through spice-html5 over WebSocket.
    SpiceHtml5,
    /// A serial console in the browser (raw bytes over WebSocket).
    Serial,
    /// SPICE for native clients (remote-viewer) over TCP/TLS.
    SpiceDirect,
    /// VNC for native clients over VeNCrypt.
    VncDirect,
}

impl ConsoleType {
    /// Every type, in a stable order (for help texts and metrics).
    pub const ALL: [ConsoleType; 5] = [
        ConsoleType::Novnc,
        ConsoleType::SpiceHtml5,
        ConsoleType::Serial,
        ConsoleType::SpiceDirect,
        ConsoleType::VncDirect,
    ];

    /// The name used in tokens, URLs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleType::Novnc => "novnc",
            ConsoleType::SpiceHtml5 => "spice-html5",
            ConsoleType::Serial => "serial",
            ConsoleType::SpiceDirect => "spice-direct",
            ConsoleType::VncDirect => "vnc-direct",
        }
    }

    /// The page of this type's own route (a token that names no type, such
    /// as Nova's, opens only there), for the types a browser opens.
    pub fn page_route(self) -> Option<&'static str> {
        match self {
            ConsoleType::Novnc => Some("/console-novnc"),
            ConsoleType::SpiceHtml5 => Some("/console-spice-html5"),
            ConsoleType::Serial => Some("/console-serial"),
            ConsoleType::SpiceDirect | ConsoleType::VncDirect => None,
        }
    }

    /// The wire protocol, as Nova's remote-console API names it.
    pub fn protocol(self) -> &'static str {
        match self {
            ConsoleType::Novnc | ConsoleType::VncDirect => "vnc",
            ConsoleType::SpiceHtml5 | ConsoleType::SpiceDirect => "spice",
            ConsoleType::Serial => "serial",
        }
    }
}

impl fmt::Display for ConsoleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no console type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown console type `{name}` (known: {})", known_names())]
pub struct UnknownConsoleType {
    /// The name given.
    pub name: String,
}

fn known_names() -> String {
    let known: Vec<_> = ConsoleType::ALL.iter().map(|t| t.as_str()).collect();
    known.join(", ")
}

impl FromStr for ConsoleType {
    type Err = UnknownConsoleType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConsoleType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownConsoleType {
                name: s.to_string(),
            })
    }
}
