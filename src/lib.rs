//! Porthole: a console proxy gateway.
//!
//! A cloud's API server signs a console token (a JWT); the user's client
//! brings it to Porthole; Porthole checks it and bridges the client to the
//! right console on the right hypervisor.
//!
//! # Layout
//!
//! - [`token`]: signed console tokens in, a [`token::Grant`] or a named refusal out; keys,
//!   signing, and the `jti` reuse store.
//! - [`hypervisor`]: console targets and the operator's allow-list of hypervisor networks.
//! - [`protocol`]: sans-IO RFB and SPICE handshake machines: bytes in, bytes and decisions out.
//! - [`session`]: console sessions: slots, redemption, the live registry, the SPICE link
//!   proxy and the VNC security proxy drivers, splicing.
//! - [`transport`]: listeners (plain/TLS), the lazily buffered socket reader, the WebSocket bridge.
//! - [`issuance`]: minting tokens for API servers that hold no signing key.
//! - [`frontend`]: how requests arrive: the public listener (pages, WebSockets) and the admin one.
//! - [`demo`]: the throwaway QEMU VM started on embedded defaults.
//! - [`config`]: the TOML file, parsed raw and validated into a ready [`config::Config`].
//! - [`bootstrap`]: first-start development material for running on embedded defaults.
//! - [`app`]: the composition root: builds state, binds listeners, owns shutdown;
//!   [`reload`]: swapping keys, certificates and backends in without a restart.
//! - [`cli`]: the `porthole` command line; [`admin_client`]: its client of the admin API.
//! - Leaves: [`audit`] (the JSON-lines trail), [`error`] (blame), [`metrics`], [`secret`]
//!   (redaction), [`shutdown`].
//!
//! Dependency rule: `cli → app → frontend → {session, issuance, token}`;
//! `session → {token, transport}`; `token → hypervisor`; every module may use
//! the leaves. `hypervisor` and `protocol` import nothing else of ours
//! (`grep -r "tokio\|axum" src/protocol` stays empty).

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
pub mod protocol;
pub mod reload;
pub mod secret;
pub mod session;
pub mod shutdown;
pub mod token;
pub mod transport;
