//! The module dependency rule of Porthole, checked from the source text.
//!
//! The top-level modules form layers, and a module may import (through
//! `crate::…` or `super::…` paths) only modules in layers below its own. That
//! keeps the module graph acyclic, so the bottom (tokens, hypervisor targets,
//! the sans-IO protocol machines, the leaves) can be read, tested and changed
//! without the top (listeners, the app, the CLI); a cycle such as
//! `token -> audit -> session -> token` ties every module on it to the others.
//!
//! The rule is data: edit `LAYERS`, `EXTRA_ALLOWED` and `ONLY_LEAVES`,
//! not the scanner; `docs/architecture.md` shows `LAYERS` as a table, and a
//! test keeps the two naming the same modules. The scanner is a small lexer: it blanks comments, string
//! and char literals and `#[cfg(test)] mod … { … }` blocks (test code may reach
//! anywhere), reads every `crate::` and `super::` path (grouped imports and
//! inline modules included), resolves it, and reduces it to an edge between
//! top-level modules; edges inside one top-level module are free.
//! `src/main.rs` (the binary) may import anything; `src/lib.rs` only declares.
//!
//! It needs only std, so it also runs without cargo, from the crate directory:
//! `rustc --edition 2024 --test tests/dependency_rule.rs -o /tmp/deprule && /tmp/deprule`

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level modules in layers, top first. A module may import modules of
/// any later layer; modules of one layer may not import each other unless
/// [`EXTRA_ALLOWED`] lists the edge. The last layer holds the leaves.
const LAYERS: &[&[&str]] = &[
    // The command line, and its client of the admin API (only `cli` uses it).
    &["cli", "admin_client"],
    // The composition root.
    &["app"],
    // How requests arrive: pages, WebSockets, native listeners, the admin API.
    &["frontend"],
    // What the admin API and the composition root call beside sessions,
    // and the shared store behind the session registry and token traits.
    &["reload", "issuance", "demo", "bootstrap", "store"],
    // Console sessions, from admission to their end.
    &["session"],
    // Settings: parsed raw, validated into the types the layers below own.
    &["config"],
    // Tokens and tickets: grants out of what a client brings.
    &["token"],
    // Hypervisor targets, the allow-list, backend credentials; recordings'
    // formats and writers.
    &["hypervisor", "recording"],
    // Sans-IO protocol machines; async adapters that know nothing of consoles.
    &["protocol", "transport"],
    // Leaves.
    &[
        "error", "secret", "shutdown", "metrics", "audit", "console", "node",
    ],
];

/// Edges allowed although [`LAYERS`] forbids them; `"*"` imports means any module.
const EXTRA_ALLOWED: &[(&str, &str)] = &[
    ("cli", "admin_client"),
    // The audit trail counts the events it had to drop.
    ("audit", "metrics"),
    // The audit trail names the node; naming it publishes its info metric.
    ("audit", "node"),
    ("node", "metrics"),
    // Every module, leaves included, may use `error` and `secret`.
    ("*", "error"),
    ("*", "secret"),
];

/// Edges forbidden although the layers allow them.
const FORBIDDEN: &[(&str, &str)] = &[
    // Front ends hand requests to the session layer; hypervisors are its business.
    ("frontend", "hypervisor"),
];

/// Modules that may import nothing of ours but leaves, whatever else says.
const ONLY_LEAVES: &[&str] = &["protocol", "transport"];

/// Whether top-level module `from` may import top-level module `to`.
fn allowed(from: &str, to: &str) -> bool {
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let extra = |&(f, t): &(&str, &str)| (f == from || f == "*") && t == to;
    if FORBIDDEN.contains(&(from, to)) {
        return false;
    }
    match (layer(from), layer(to)) {
        _ if ONLY_LEAVES.contains(&from) => layer(to) == Some(LAYERS.len() - 1),
        (Some(f), Some(t)) => f < t || EXTRA_ALLOWED.iter().any(extra),
        _ => false,
    }
}

/// One path in the code that names something of ours.
struct Ref {
    line: usize,
    /// The path as written, whitespace removed; each item of a group at the
    /// crate root is its own `Ref` (`crate::{a, b}` gives `crate::a`, `crate::b`).
    text: String,
    /// The absolute path it resolves to, such as `["session", "vnc", "Driver"]`.
    target: Vec<String>,
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Whether `s` stands in `c` at `i`.
fn at(c: &[char], i: usize, s: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    c.get(i..i + s.len()) == Some(&s[..])
}

/// Where `s` next stands in `c`, from `i` on.
fn find(c: &[char], i: usize, s: &str) -> Option<usize> {
    (i..c.len()).find(|&k| at(c, k, s))
}

/// The index after the chars from `i` on that satisfy `pred`.
fn run(c: &[char], i: usize, pred: fn(char) -> bool) -> usize {
    i + c[i..].iter().take_while(|&&ch| pred(ch)).count()
}

fn skip_ws(c: &[char], i: usize) -> usize {
    run(c, i, char::is_whitespace)
}

/// The identifier at `i` (empty if none) and the index after it.
fn ident(c: &[char], i: usize) -> (String, usize) {
    let end = run(c, i, is_ident);
    (c[i..end].iter().collect(), end)
}

/// The index after the bracket that closes the one at `i`.
fn close(c: &[char], i: usize, open: char, shut: char) -> usize {
    let mut depth = 0;
    for (k, &ch) in c.iter().enumerate().skip(i) {
        depth += usize::from(ch == open);
        if ch == shut {
            depth -= 1;
            if depth == 0 {
                return k + 1;
            }
        }
    }
    c.len()
}

fn line_of(c: &[char], i: usize) -> usize {
    c[..i].iter().filter(|&&ch| ch == '\n').count() + 1
}

fn blank(c: &mut [char]) {
    for ch in c.iter_mut().filter(|ch| **ch != '\n') {
        *ch = ' ';
    }
}

/// The source as chars, comments and string and char literals turned into
/// spaces (newlines kept, so line numbers survive).
fn blank_literals(src: &str) -> Vec<char> {
    let mut c: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < c.len() {
        // Raw strings: r"…", r#"…"#, br"…", cr"…".
        let word_start = i == 0 || !is_ident(c[i - 1]);
        let r = i + usize::from(word_start && (at(&c, i, "br") || at(&c, i, "cr")));
        let hashes = c[r + 1..].iter().take_while(|&&ch| ch == '#').count();
        let end = if word_start && c[r] == 'r' && c.get(r + 1 + hashes) == Some(&'"') {
            let closing = format!("\"{}", "#".repeat(hashes));
            find(&c, r + 2 + hashes, &closing).map_or(c.len(), |k| k + 1 + hashes)
        } else if at(&c, i, "//") {
            find(&c, i, "\n").unwrap_or(c.len())
        } else if at(&c, i, "/*") {
            let (mut k, mut depth) = (i + 2, 1);
            while k < c.len() && depth > 0 {
                let (open, shut) = (at(&c, k, "/*"), at(&c, k, "*/"));
                depth = depth + usize::from(open) - usize::from(shut);
                k += if open || shut { 2 } else { 1 };
            }
            k
        } else if c[i] == '"' {
            let mut k = i + 1;
            while k < c.len() && c[k] != '"' {
                k += if c[k] == '\\' { 2 } else { 1 };
            }
            k + 1
        } else if at(&c, i, "'\\") {
            find(&c, i + 3, "'").map_or(c.len(), |k| k + 1)
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            i + 3
        } else {
            i += 1; // Code, lifetimes and labels included.
            continue;
        };
        let end = end.min(c.len());
        blank(&mut c[i..end]);
        i = end;
    }
    c
}

/// Blanks every `#[cfg(test)] mod name { … }` block (more attributes may
/// stand between).
fn blank_test_modules(c: &mut [char]) {
    const CFG_TEST: &str = "#[cfg(test)]";
    let mut i = 0;
    while let Some(start) = find(c, i, CFG_TEST) {
        let mut j = skip_ws(c, start + CFG_TEST.len());
        while at(c, j, "#[") {
            j = skip_ws(c, close(c, j + 1, '[', ']'));
        }
        let (word, after) = ident(c, j);
        let (name, after) = ident(c, skip_ws(c, after));
        let brace = skip_ws(c, after);
        i = if word == "mod" && !name.is_empty() && c.get(brace) == Some(&'{') {
            let end = close(c, brace, '{', '}');
            blank(&mut c[start..end]);
            end
        } else {
            start + 1
        };
    }
}

/// Reads `a::b::c` from `i`: the segments, the index after them, and whether
/// the path goes on into a `{ … }` group (the index is then at the `{`).
fn read_path(c: &[char], mut i: usize) -> (Vec<String>, usize, bool) {
    let mut segs = Vec::new();
    loop {
        let (seg, end) = ident(c, i);
        if seg.is_empty() {
            return (segs, i, c.get(i) == Some(&'{'));
        }
        segs.push(seg);
        let colons = skip_ws(c, end);
        if !at(c, colons, "::") {
            return (segs, end, false);
        }
        i = skip_ws(c, colons + 2);
    }
}

fn text_of(c: &[char], from: usize, to: usize, group: bool) -> String {
    let mut text: String = c[from..to].iter().collect();
    text.retain(|ch| !ch.is_whitespace());
    if group { text + "{..}" } else { text }
}

/// Resolves the `crate::…` or `super::…` path at `start`, seen from module
/// `scope`, into `refs`; returns the index after it.
fn path_refs(c: &[char], start: usize, scope: &[String], refs: &mut Vec<Ref>) -> usize {
    let (segs, end, group) = read_path(c, start);
    let supers = segs.iter().take_while(|s| *s == "super").count();
    if (segs.len() < 2 && !group) || supers > scope.len() {
        return end; // `pub(crate)`, `pub(super)`, a glob at the root, or no module.
    }
    let mut target = scope[..scope.len() - supers].to_vec();
    if segs[0] == "crate" {
        target = segs[1..].to_vec();
    } else {
        target.extend_from_slice(&segs[supers..]);
    }
    if !target.is_empty() || !group {
        let (line, text) = (line_of(c, start), text_of(c, start, end, group));
        if !target.is_empty() {
            refs.push(Ref { line, text, target });
        }
        return end;
    }
    // A group at the crate root: each item of its first level names a module.
    let prefix = text_of(c, start, end, false);
    let (mut j, mut depth, mut item_start) = (end + 1, 1, true);
    while j < c.len() && depth > 0 {
        match c[j] {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 1 => item_start = true,
            ch if depth == 1 && item_start && is_ident(ch) => {
                let (target, item_end, nested) = read_path(c, j);
                if target[0] != "self" {
                    let line = line_of(c, j);
                    let text = prefix.clone() + &text_of(c, j, item_end, nested);
                    refs.push(Ref { line, text, target });
                }
                (item_start, j) = (false, item_end);
                continue;
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// Every path in `src` that names something of ours, resolved from a file
/// whose module is `module` (empty for the crate root).
fn references(src: &str, module: &[String]) -> Vec<Ref> {
    let mut c = blank_literals(src);
    blank_test_modules(&mut c);
    let (mut refs, mut scope, mut inline_mods) = (Vec::new(), module.to_vec(), Vec::new());
    let (mut i, mut depth) = (0, 0_usize);
    while i < c.len() {
        match c[i] {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline_mods.last() == Some(&depth) {
                    inline_mods.pop();
                    scope.pop();
                }
            }
            ch if is_ident(ch) => {
                let (word, end) = ident(&c, i);
                if word == "crate" || word == "super" {
                    i = path_refs(&c, i, &scope, &mut refs);
                    continue;
                }
                let (name, after) = ident(&c, skip_ws(&c, end));
                if word == "mod" && !name.is_empty() && c.get(skip_ws(&c, after)) == Some(&'{') {
                    inline_mods.push(depth); // The depth outside its braces.
                    scope.push(name);
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// The module of a file, from its path under the crate; `None` for binaries.
fn module_of(rel: &Path) -> Option<Vec<String>> {
    let parts = rel.strip_prefix("src").ok()?.with_extension("");
    let parts: Vec<String> = parts.iter().map(|p| p.to_string_lossy().into()).collect();
    match parts.as_slice() {
        [main] if main == "main" => None,
        [bin, ..] if bin == "bin" => None,
        [lib] if lib == "lib" => Some(Vec::new()),
        [dir @ .., last] if last == "mod" => Some(dir.to_vec()),
        _ => Some(parts),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_follow_the_dependency_rule() {
    let root = PathBuf::from(option_env!("CARGO_MANIFEST_DIR").unwrap_or("."));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let (mut modules, mut ours) = (Vec::new(), BTreeSet::new()); // Files' modules, top ones.
    for file in &files {
        let rel = file.strip_prefix(&root).expect("a file under the crate");
        if let Some(module) = module_of(rel) {
            ours.extend(module.first().cloned());
            modules.push((rel, module));
        }
    }
    let placed = |m: &str| LAYERS.iter().any(|l| l.contains(&m));
    let mut problems = Vec::new();
    for m in ours.iter().filter(|m| !placed(m)) {
        problems.push(format!("module `{m}` is in no layer: place it in LAYERS"));
    }
    let (mut forbidden, mut n_refs) = (BTreeSet::new(), 0);
    for (rel, module) in &modules {
        let refs = references(&fs::read_to_string(root.join(rel)).expect("source"), module);
        n_refs += refs.len();
        let Some(from) = module.first() else { continue }; // The crate root declares modules.
        for r in refs.iter().filter(|r| r.target[0] != *from) {
            let to = r.target[0].as_str();
            let edge = format!("{from} -> {to}  ({}:{}: {})", rel.display(), r.line, r.text);
            if !ours.contains(to) {
                problems.push(format!("{edge}: `{to}` is no module: name its module"));
            } else if placed(from) && placed(to) && !allowed(from, to) {
                forbidden.insert(edge);
            }
        }
    }
    let n_files = files.len();
    println!("read {n_files} files and {n_refs} references");
    assert!(n_files > 30, "only {n_files} files: wrong directory?");
    assert!(n_refs > 100, "only {n_refs} references: scanner broken?");
    problems.extend(forbidden.into_iter().map(|e| format!("forbidden: {e}")));
    let (n, report) = (problems.len(), problems.join("\n"));
    assert!(n == 0, "{n} breaches of the dependency rule:\n{report}\n");
}

/// The modules each row of the layer table in `docs/architecture.md` names
/// (its second column's `code` words, a folder's `/` dropped), top first.
fn documented_layers(doc: &str) -> Vec<BTreeSet<String>> {
    let mut layers = Vec::new();
    for row in doc.lines().filter_map(|l| l.strip_prefix('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(number) = cells.first().and_then(|c| c.parse::<usize>().ok()) else {
            continue; // The header, its rule, and any other table.
        };
        assert_eq!(number, layers.len() + 1, "layer rows out of order: {row}");
        let names = cells[1].split('`').skip(1).step_by(2);
        layers.push(names.map(|n| n.trim_end_matches('/').to_string()).collect());
    }
    layers
}

#[test]
fn the_architecture_doc_names_the_same_layers() {
    let root = PathBuf::from(option_env!("CARGO_MANIFEST_DIR").unwrap_or("."));
    let doc = fs::read_to_string(root.join("docs/architecture.md")).expect("the architecture doc");
    let documented = documented_layers(&doc);
    let coded: Vec<BTreeSet<String>> = LAYERS
        .iter()
        .map(|l| l.iter().map(|m| m.to_string()).collect())
        .collect();
    assert_eq!(
        documented, coded,
        "docs/architecture.md's layer table and LAYERS disagree"
    );
}

/// Parser cases: `== the snippet's module => the modules it names`, then the snippet.
const CASES: &str = r##"
== app => config metrics session
use crate::{
    config::{self, Config},
    session::{vnc::{A, B}, Sessions},
    metrics,
};
== frontend::public => audit metrics
fn f<'a>(x: &'a str) -> &'a str { crate::metrics::inc(); crate ::
    audit::event() }
== app => shutdown
macro_rules! m { () => { $crate::shutdown::Stop::new() } }
pub(crate) fn f() {} pub(super) fn g() { my_crate::x(); }
== protocol::spice => token
use super::super::token::Grant;
== protocol::spice::link => protocol
use super::super::{Reader, WireError};
== session::vnc => hypervisor
let x = super::super::hypervisor::X;
== audit => session token
use super::{session::X, token};
== audit => token
mod inner { use super::super::token::X; }
== app => error
// crate::session::x
/// crate::token
//! crate::app
/* crate::cli /* nested */ crate::demo */
let s = "crate::config \" crate::issuance"; let r = r#"crate::reload "q" "#;
let q = '"'; let b = '\''; let e = crate::error::E; let s = "crate::cli";
== token => shutdown
#[cfg(test)]
#[allow(unused)]
mod tests { use crate::cli::X;
    fn f() { if x { crate::demo::d(); } } }
use crate::shutdown::Y;
"##;

#[test]
fn extractor_reads_paths_the_way_rustc_does() {
    let mut cases = Vec::new();
    for case in CASES.split("\n== ").skip(1) {
        let (head, src) = case.split_once('\n').expect("a snippet");
        let (module, expected) = head.split_once(" =>").expect("module => modules");
        let module: Vec<String> = module.split("::").map(String::from).collect();
        let refs = references(src, &module);
        let found: BTreeSet<&str> = refs.iter().map(|r| r.target[0].as_str()).collect();
        assert_eq!(found, expected.split_whitespace().collect(), "in:\n{src}");
        cases.push(refs);
    }
    assert_eq!(cases.len(), 10);
    let lines: Vec<usize> = cases[0].iter().map(|r| r.line).collect();
    assert_eq!(lines, [2, 3, 4]);
    assert_eq!(cases[0][0].text, "crate::config::{..}");
    assert_eq!(cases[9][0].line, 5);

    assert!(allowed("cli", "admin_client") && !allowed("app", "admin_client"));
    assert!(allowed("metrics", "error") && !allowed("metrics", "token"));
    assert!(allowed("config", "token") && !allowed("token", "config"));
    assert!(allowed("session", "protocol") && !allowed("protocol", "hypervisor"));
}
