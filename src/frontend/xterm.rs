//! Which xterm.js the serial page gets, and how.
//!
//! npm's `@xterm/xterm` ships an ES module (`lib/xterm.mjs`), served as is.
//! Debian 12 ships xterm.js 3.8 only as CommonJS files (`node-xterm`, in
//! `/usr/share/nodejs/xterm`); the "browser build" of `libjs-xterm` next to
//! it is a 288-byte stub that itself calls `require`, so no browser can load
//! either. Porthole therefore wraps those files, once at start, into one ES
//! module with a small `require` of its own, and serves it at the URL the npm
//! copy's module has. Nothing is evaluated from strings: every wrapped file
//! is a plain function in a script from 'self', so the pages'
//! Content-Security-Policy (`script-src 'self'`, no `'unsafe-eval'`) holds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::get;

/// Where Debian's `libjs-xterm` (a dependency of `node-xterm`) keeps the
/// stylesheet `node-xterm` itself lacks.
pub const DEBIAN_CSS: &str = "/usr/share/javascript/xterm/xterm.css";

/// The CommonJS entry point of xterm.js 3.x, relative to `lib/`.
const COMMONJS_ENTRY: &str = "public/Terminal";

/// What kind of xterm.js a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// An ES module build (npm's `@xterm/xterm` 5 and later).
    Module,
    /// CommonJS files only (Debian's `node-xterm` 3.8).
    CommonJs,
    /// Neither: the serial page says so and how to fix it.
    Missing,
}

impl Flavour {
    /// Looks at the files `dir` holds.
    pub fn of(dir: &Path) -> Self {
        let lib = dir.join("lib");
        if lib.join("xterm.mjs").is_file() {
            Flavour::Module
        } else if lib.join(format!("{COMMONJS_ENTRY}.js")).is_file() {
            Flavour::CommonJs
        } else {
            Flavour::Missing
        }
    }
}

/// Why Debian's xterm.js could not be wrapped.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// A file or folder under `lib/` could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The folder is not xterm.js 3.x.
    #[error("{} has no public/Terminal.js", .0.display())]
    NoEntry(PathBuf),
}

/// The `/vendor/xterm` routes for the xterm.js in `dir`, and which flavour
/// it is. A module build is served from its folder; a CommonJS one as the
/// wrapped module plus Debian's stylesheet, both read once here.
pub fn routes<S: Clone + Send + Sync + 'static>(
    dir: &Path,
    serve_dir: impl Fn(PathBuf) -> tower_http::services::ServeDir,
) -> Router<S> {
    match Flavour::of(dir) {
        Flavour::Module | Flavour::Missing => {
            Router::new().nest_service("/vendor/xterm", serve_dir(dir.to_path_buf()))
        }
        Flavour::CommonJs => {
            let module = match wrap_commonjs(&dir.join("lib")) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!("xterm.js from {} cannot be served: {e}", dir.display());
                    return Router::new();
                }
            };
            let mut router = Router::new().route(
                "/vendor/xterm/lib/xterm.mjs",
                get(move || async move { (js_headers(), module) }),
            );
            let css = [dir.join("css/xterm.css"), PathBuf::from(DEBIAN_CSS)]
                .into_iter()
                .find_map(|p| std::fs::read(p).ok());
            match css {
                Some(css) => {
                    router = router.route(
                        "/vendor/xterm/css/xterm.css",
                        get(move || async move { (css_headers(), css) }),
                    );
                }
                None => tracing::warn!(
                    "xterm.js stylesheet not found ({DEBIAN_CSS}; Debian: apt-get install libjs-xterm)"
                ),
            }
            router
        }
    }
}

fn js_headers() -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    )]
}

fn css_headers() -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    )]
}

/// One ES module exporting `Terminal` from the CommonJS files under `lib`
/// (tests and source maps left out). Every file becomes a function of
/// `(exports, require, module)`, as Node runs it; `require` resolves the
/// relative names xterm.js uses (it has no outside dependencies).
pub fn wrap_commonjs(lib: &Path) -> Result<String, WrapError> {
    let mut files = Vec::new();
    collect_js(lib, lib, &mut files)?;
    files.sort();
    if !files.iter().any(|(id, _)| id == COMMONJS_ENTRY) {
        return Err(WrapError::NoEntry(lib.to_path_buf()));
    }
    let mut out = format!(
        "// xterm.js from {}, {} CommonJS files wrapped by Porthole into one module.\n\
         const sources = {{\n",
        lib.display(),
        files.len()
    );
    for (id, source) in &files {
        let id = serde_json::Value::String(id.clone());
        let _ = writeln!(out, "{id}: function (exports, require, module) {{");
        for line in source.lines() {
            // Maps name files the wrapper does not serve.
            if !line.starts_with("//# sourceMappingURL=") {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str("},\n");
    }
    out.push_str("};\n");
    out.push_str(LOADER);
    let entry = serde_json::Value::String(COMMONJS_ENTRY.into());
    let _ = writeln!(out, "export const {{ Terminal }} = load({entry});");
    Ok(out)
}

/// Node's module cache and relative resolution, as much as xterm.js needs.
const LOADER: &str = r#"const cache = new Map();
function resolve(dir, name) {
  const parts = dir ? dir.split('/') : [];
  for (const p of name.split('/')) {
    if (p === '..') parts.pop();
    else if (p !== '.') parts.push(p);
  }
  const id = parts.join('/').replace(/\.js$/, '');
  if (Object.hasOwn(sources, id)) return id;
  if (Object.hasOwn(sources, `${id}/index`)) return `${id}/index`;
  throw new Error(`xterm.js: no module ${name} from ${dir || '.'}`);
}
function load(id) {
  if (cache.has(id)) return cache.get(id).exports;
  const module = { exports: {} };
  cache.set(id, module);
  const dir = id.includes('/') ? id.slice(0, id.lastIndexOf('/')) : '';
  sources[id].call(module.exports, module.exports, (name) => load(resolve(dir, name)), module);
  return module.exports;
}
"#;

/// Every `.js` file under `dir` except tests, as (id relative to `root`
/// without `.js`, source). Symlinked folders are not followed.
fn collect_js(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), WrapError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WrapError::Read { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(read_err(&path))?;
        if kind.is_dir() {
            collect_js(root, &path, out)?;
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".js") || name.ends_with(".test.js") {
            continue;
        }
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let Some(id) = rel.to_str().and_then(|r| r.strip_suffix(".js")) else {
            continue;
        };
        let source = std::fs::read_to_string(&path).map_err(read_err(&path))?;
        out.push((id.replace('\\', "/"), source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn flavour_follows_the_files() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Flavour::of(d.path()), Flavour::Missing);
        write(d.path(), "lib/public/Terminal.js", "");
        assert_eq!(Flavour::of(d.path()), Flavour::CommonJs);
        write(d.path(), "lib/xterm.mjs", "");
        assert_eq!(Flavour::of(d.path()), Flavour::Module);
    }

    #[test]
    fn wrapping_keeps_sources_and_drops_tests_and_maps() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "public/Terminal.js",
            "var T = require(\"../Terminal\");\nexports.Terminal = T.Terminal;\n//# sourceMappingURL=Terminal.js.map",
        );
        write(
            d.path(),
            "Terminal.js",
            "exports.Terminal = 1; // no newline",
        );
        write(d.path(), "Terminal.test.js", "throw 'test';");
        write(d.path(), "Terminal.js.map", "{}");
        let m = wrap_commonjs(d.path()).unwrap();
        assert!(m.contains("\"public/Terminal\": function (exports, require, module) {"));
        assert!(m.contains("\"Terminal\": function"));
        // A trailing line comment must not swallow the wrapper's brace.
        assert!(m.contains("exports.Terminal = 1; // no newline\n},"));
        assert!(!m.contains("throw 'test'") && !m.contains("sourceMappingURL"));
        assert!(m.ends_with("export const { Terminal } = load(\"public/Terminal\");\n"));
    }

    #[test]
    fn a_folder_without_the_entry_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "other.js", "");
        assert!(matches!(
            wrap_commonjs(d.path()),
            Err(WrapError::NoEntry(_))
        ));
    }
}
