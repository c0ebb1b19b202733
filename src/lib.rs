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
//! - [`issuance`]: minting tokens for API servers that hold no signing key.
//! - [`frontend`]: how requests arrive (the admin listener today).
//! - [`config`]: the TOML file, parsed raw and validated into a ready [`config::Config`].
//! - [`bootstrap`]: first-start development material for running on embedded defaults.
//! - [`app`]: the composition root: builds state, binds listeners, owns shutdown.
//! - [`cli`]: the `porthole` command line.
//! - Leaves: [`error`] (blame), [`metrics`], [`secret`] (redaction), [`shutdown`].
//!
//! Dependency rule: `cli → app → frontend → {issuance, token}`; `token → hypervisor`;
//! every module may use the leaves. `hypervisor` imports nothing else of ours.

pub mod app;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod frontend;
pub mod hypervisor;
pub mod issuance;
pub mod metrics;
pub mod secret;
pub mod session;
pub mod shutdown;
pub mod token;
pub mod transport;
