//! Porthole: a console proxy gateway.
//!
//! A cloud's API server signs a console token (a JWT); the user's client
//! brings it to Porthole; Porthole checks it and bridges the client to the
//! right console on the right hypervisor.
//!
//! # Layout
//!
//! Layers, top first; each imports only layers below it (and the leaves).
//! `tests/dependency_rule.rs` enforces it; `docs/architecture.md` follows a
//! byte through it.
//!
//! 1. [`cli`] (the `porthole` command line) and [`admin_client`] (its client
//!    of the admin API).
//! 2. [`app`]: the composition root: builds state, binds listeners, owns the
//!    one shutdown path.
//! 3. [`frontend`]: how requests arrive: pages, WebSocket upgrades, ticket
//!    exchanges, native listeners, the admin API. Parses, checks the Origin,
//!    asks the session layer, answers; never touches a hypervisor.
//! 4. [`reload`] (checking a config file and what it names; swapping keys,
//!    the issuance key, certificates and backends), [`issuance`]
//!    (minting tokens), [`demo`] (the throwaway QEMU VM), [`bootstrap`]
//!    (first-start material), [`store`] (the token, ticket and revocation
//!    stores in Redis, for several nodes).
//! 5. [`session`]: a console session from admission to its end: resolving
//!    tokens, caps and reuse, tickets, the registry, the hypervisor
//!    handshakes (VNC security proxy, SPICE link proxy) under one driver, the
//!    WebSocket relay and the byte splice, one lifecycle guard.
//! 6. [`config`]: the TOML file, parsed raw and validated into settings.
//! 7. [`token`]: signed console tokens and tickets in, a [`token::Grant`] or
//!    a refusal out; keys, signing, the reuse and ticket stores.
//! 8. [`hypervisor`]: console targets, the allow-list, backend credentials;
//!    [`recording`]: recordings of sessions (formats, the writer, the disk).
//! 9. [`protocol`] (sans-IO RFB and SPICE machines: bytes in, bytes and
//!    decisions out; no tokio) and [`transport`] (listeners, TLS, a
//!    WebSocket seen as bytes, the lazy read buffer; nothing about consoles).
//!    Both import only leaves.
//! 10. Leaves: [`console`] (the console type), [`error`] (blame),
//!     [`secret`] (redaction), [`shutdown`], [`metrics`], [`audit`] (the
//!     JSON-lines trail), [`node`] (this node's name).

pub mod admin_client;
pub mod app;
pub mod audit;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo;
pub mod error;
pub mod frontend;
pub mod hypervisor;
pub mod issuance;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod recording;
pub mod reload;
pub mod secret;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod token;
pub mod transport;
