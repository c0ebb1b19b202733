//! The admin API's client, for `porthole sessions ...` and `porthole token
//! revoke`: HTTP/1.1 over a plain socket to the (loopback) admin listener,
//! with a bearer key, a deadline, and a capped answer.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Largest answer read.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;
/// Deadline for connecting, and for each read or write.
const DEADLINE: Duration = Duration::from_secs(10);

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    host_port: String,
    bearer: crate::secret::Secret<String>,
    actor: String,
}

impl AdminClient {
    /// A client for `url` (`http://HOST:PORT`), with the key in `bearer_file`
    /// (default: the development key in `state_dir`).
    pub fn new(url: &str, bearer_file: Option<&Path>, state_dir: &Path) -> anyhow::Result<Self> {
        let Some(host_port) = url.strip_prefix("http://") else {
            bail!(
                "--admin must be an http://HOST:PORT URL (the admin listener is plain HTTP on a trusted network)"
            );
        };
        let host_port = host_port.trim_end_matches('/').to_string();
        let file: PathBuf =
            bearer_file.map_or_else(|| state_dir.join("issuance-bearer.key"), Path::to_path_buf);
        let bearer = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "cannot read the admin bearer key {} (--bearer-file)",
                file.display()
            )
        })?;
        let actor = std::env::var("USER").unwrap_or_else(|_| "cli".into());
        Ok(Self {
            host_port,
            bearer: crate::secret::Secret::new(bearer.trim().to_string()),
            actor: format!("cli:{actor}"),
        })
    }

    /// Sends a request; returns the status and the JSON answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = self
            .host_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", self.host_port))?
            .next()
            .context("no address")?;
        let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
            .with_context(|| format!("cannot reach the admin listener at {addr}"))?;
        s.set_read_timeout(Some(DEADLINE))?;
        s.set_write_timeout(Some(DEADLINE))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nX-Porthole-Actor: {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host_port,
            self.bearer.expose(),
            self.actor,
            body.len()
        );
        s.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut answer)?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("a malformed HTTP answer")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
        Ok((status, json))
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
