//! `[web]`: where the console pages and the client libraries are.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::issues::Paths;

/// `[web]`: where the console pages and client libraries are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    /// Porthole's pages (`pages/`, `static/`). Default: `web` in the working
    /// folder, else the source tree's.
    pub root: Option<PathBuf>,
    /// noVNC (the folder holding `core/rfb.js`). Default `/usr/share/novnc` (Debian's `novnc`).
    pub novnc_dir: Option<PathBuf>,
    /// xterm.js: npm's build (the folder holding `lib/xterm.mjs`) or Debian's
    /// `node-xterm` (`/usr/share/nodejs/xterm`). Default `<root>/node_modules/@xterm/xterm`,
    /// or Debian's where that is missing and `node-xterm` is installed.
    pub xterm_dir: Option<PathBuf>,
    /// spice-html5 (the folder holding `main.js`). Default `/usr/share/spice-html5` (Debian's `spice-html5`).
    pub spice_html5_dir: Option<PathBuf>,
}

/// Validated `[web]`.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Porthole's pages and static files.
    pub root: PathBuf,
    /// noVNC.
    pub novnc_dir: PathBuf,
    /// xterm.js.
    pub xterm_dir: PathBuf,
    /// spice-html5.
    pub spice_html5_dir: PathBuf,
}

/// `[web]`: nothing to refuse; missing folders are warned about at start.
pub(super) fn validate_web(raw: RawWeb, paths: Paths<'_>) -> WebConfig {
    let root = raw
        .root
        .map(|p| paths.resolve(&p))
        .unwrap_or_else(default_web_root);
    let dir = |v: Option<PathBuf>, default: PathBuf| v.map_or(default, |p| paths.resolve(&p));
    WebConfig {
        novnc_dir: dir(raw.novnc_dir, PathBuf::from("/usr/share/novnc")),
        xterm_dir: dir(raw.xterm_dir, default_xterm_dir(&root)),
        spice_html5_dir: dir(raw.spice_html5_dir, PathBuf::from("/usr/share/spice-html5")),
        root,
    }
}

/// npm's copy under the web root (`npm ci` in `web/`); where that was never
/// run, Debian's `node-xterm` if installed, so a first run without npm still
/// has a serial console; else npm's path again, which start-up warns about.
fn default_xterm_dir(root: &Path) -> PathBuf {
    let npm = root.join("node_modules/@xterm/xterm");
    let debian = PathBuf::from(DEBIAN_XTERM_DIR);
    if !npm.join("lib/xterm.mjs").is_file() && debian.join("lib/public/Terminal.js").is_file() {
        return debian;
    }
    npm
}

/// Where Debian's `node-xterm` installs xterm.js (3.8, CommonJS files).
pub const DEBIAN_XTERM_DIR: &str = "/usr/share/nodejs/xterm";

/// `web` in the working folder if it has the pages, else the source tree's
/// (so `cargo run` works from anywhere in a checkout).
fn default_web_root() -> PathBuf {
    let here = PathBuf::from("web");
    if here.join("pages").is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web")
}
