//! The dev profile's list of crates that run only while building.
//!
//! `[profile.dev.package."*"]` optimises every dependency, and that reaches
//! proc macros and the dependencies of build scripts too, where it only
//! slows a cold build (by minutes here). Cargo.toml names each of those at
//! `opt-level = 0`; a new dependency can bring another, so this test reads
//! the dependency graph (`cargo metadata`, for this machine's platform) and
//! checks that the list names exactly the crates that never run in a test or
//! in Porthole, and those that run unoptimised on purpose
//! ([`RUN_UNOPTIMISED`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn host_triple() -> String {
    let out = Command::new(cargo())
        .arg("-vV")
        .output()
        .expect("cargo -vV");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("cargo -vV names the host")
}

/// Every package of the build, and those reached from the workspace only
/// through proc macros and build dependencies.
fn dependency_graph() -> (BTreeSet<String>, BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(cargo())
        .current_dir(root)
        // Not --offline: a plain `cargo test` has not fetched what only the
        // fuzz crate uses.
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &host_triple()])
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let proc_macros: HashSet<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["targets"].as_array().unwrap().iter().any(|t| {
                t["kind"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k == "proc-macro")
            })
        })
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    let nodes = meta["resolve"]["nodes"].as_array().unwrap();
    let deps_of: HashMap<&str, &serde_json::Value> = nodes
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), &n["deps"]))
        .collect();
    // What runs: the workspace and everything it reaches through normal and
    // dev dependencies, stopping at proc macros.
    let mut runs = HashSet::new();
    let mut todo: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    while let Some(id) = todo.pop() {
        if proc_macros.contains(id) || !runs.insert(id) {
            continue;
        }
        for dep in deps_of[id].as_array().unwrap() {
            let at_run_time = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "dev");
            if at_run_time {
                todo.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    let runs: HashSet<&str> = runs.iter().map(|id| name_of[id]).collect();
    let all: BTreeSet<String> = nodes
        .iter()
        .map(|n| name_of[n["id"].as_str().unwrap()].to_owned())
        .collect();
    let build_time = all
        .iter()
        .filter(|name| !runs.contains(name.as_str()))
        .cloned()
        .collect();
    (all, build_time)
}

/// Crates that do run, unoptimised on purpose (Cargo.toml says why).
const RUN_UNOPTIMISED: &[&str] = &[
    "axum",
    "clap_builder",
    "combine",
    "criterion",
    "jsonwebtoken",
    "metrics-exporter-prometheus",
    "redis",
    "regex-automata",
    "regex-syntax",
    "reqwest",
    "rustls",
    "toml",
    "tracing-subscriber",
];

#[test]
fn every_crate_that_runs_only_while_building_stays_unoptimised() {
    let manifest = include_str!("../Cargo.toml")
        .parse::<toml::Table>()
        .unwrap();
    let packages = manifest["profile"]["dev"]["package"].as_table().unwrap();
    let listed: BTreeSet<String> = packages
        .iter()
        .filter(|(_, p)| p.get("opt-level").and_then(|o| o.as_integer()) == Some(0))
        .map(|(name, _)| name.clone())
        .collect();
    let (all, build_time) = dependency_graph();
    let on_purpose: BTreeSet<String> = RUN_UNOPTIMISED.iter().map(|c| c.to_string()).collect();
    let wanted: BTreeSet<String> = build_time.union(&on_purpose).cloned().collect();
    let missing: Vec<_> = wanted.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&wanted).collect();
    let gone: Vec<_> = on_purpose.difference(&all).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && gone.is_empty(),
        "Cargo.toml's [profile.dev.package]: add {missing:?} at opt-level 0 \
         (they run only while building); {extra:?} run in tests or in \
         Porthole: remove them, or add them to RUN_UNOPTIMISED with a reason \
         in Cargo.toml; {gone:?} are no longer built"
    );
}
