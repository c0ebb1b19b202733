//! Porthole's integration tests, in-process, as one test binary: one link
//! instead of one per file (the suite's build time). Each module is the
//! suite its file's comment describes; `common` is what they share.
//! `proxy_protocol` is a binary of its own: it names this process's node
//! (`porthole::node`, set once per process).

mod common;

mod build_profile;
mod config_files;
mod dependency_rule;
mod issuance;
mod nova;
mod oversight;
mod recording;
mod reload;
mod session_proxies;
mod shared_store;
mod tokens;
mod ws_front;
