//! The composition root: builds shared state from a [`Config`], binds the
//! listeners, spawns the long-lived tasks and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SigningKey};
use crate::frontend::admin::{self, AdminState};
use crate::issuance::Issuer;
use crate::token::signing::Signer;
use crate::token::{MemoryRedemptions, TokenValidator};

/// Everything the front ends share, built once from a [`Config`].
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Verifies console tokens.
    pub validator: Arc<TokenValidator>,
    /// Issues tokens, when `[issuance]` is configured.
    pub issuer: Option<Arc<Issuer>>,
    /// Remembers redeemed and revoked tokens.
    pub redemptions: Arc<MemoryRedemptions>,
}

impl App {
    /// Loads keys and builds the shared state.
    pub fn build(config: Config) -> anyhow::Result<App> {
        let allow = Arc::new(config.allow.clone());
        let validator = Arc::new(
            TokenValidator::new(
                config.tokens.policy.clone(),
                config.tokens.keys.clone(),
                config.tokens.allow_hmac,
                allow,
            )
            .context("token keys")?,
        );
        let issuer = match &config.issuance {
            None => None,
            Some(iss) => {
                let signer = match &iss.signing_key {
                    SigningKey::PrivatePem(path) => {
                        Signer::from_private_pem_file(path, iss.signing_kid.clone())
                            .map_err(anyhow::Error::msg)
                            .context("issuance.signing_key")?
                    }
                    SigningKey::Secret(path) => {
                        let secret = std::fs::read(path).with_context(|| {
                            format!("issuance.signing_key: cannot read {}", path.display())
                        })?;
                        Signer::from_secret(&secret, iss.signing_kid.clone())
                    }
                };
                Some(Arc::new(Issuer::new(
                    signer,
                    iss.issuer.clone(),
                    iss.audience.clone(),
                    iss.ttl_secs,
                    config.listen.public_base_url.clone(),
                    validator.clone(),
                )))
            }
        };
        let redemptions = Arc::new(MemoryRedemptions::new(
            config.tokens.store_capacity,
            config.tokens.policy.leeway_secs,
        ));
        Ok(App {
            config,
            validator,
            issuer,
            redemptions,
        })
    }

    /// The admin router over this app's state.
    pub fn admin_state(
        &self,
        metrics: Option<PrometheusHandle>,
        ready: Arc<AtomicBool>,
    ) -> AdminState {
        AdminState {
            validator: self.validator.clone(),
            issuer: self.issuer.clone(),
            bearer_key_hashes: Arc::new(
                self.config
                    .issuance
                    .as_ref()
                    .map(|i| AdminState::hash_bearer_keys(&i.bearer_keys))
                    .unwrap_or_default(),
            ),
            metrics,
            ready,
        }
    }
}

/// Bound listeners, so callers (and tests binding port 0) learn the real addresses.
#[derive(Debug)]
pub struct Listeners {
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let admin = TcpListener::bind(config.listen.admin)
            .await
            .with_context(|| format!("cannot listen on {} (listen.admin)", config.listen.admin))?;
        Ok(Listeners { admin })
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(
    app: App,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ready = Arc::new(AtomicBool::new(false));
    let admin_router = admin::router(app.admin_state(metrics, ready.clone()));

    #[cfg(unix)]
    spawn_reload_on_sighup(app.validator.clone(), shutdown.clone())?;

    let admin_shutdown = shutdown.clone();
    let admin = tokio::spawn(async move {
        axum::serve(listeners.admin, admin_router)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await
    });
    ready.store(true, Ordering::Relaxed);
    shutdown.cancelled().await;
    ready.store(false, Ordering::Relaxed);
    admin
        .await
        .context("admin listener task")?
        .context("admin listener")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_sighup(
    validator: Arc<TokenValidator>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match validator.reload() {
                Ok(n) => {
                    crate::metrics::key_reload(true);
                    tracing::info!(keys = n, kids = ?validator.kids(), "SIGHUP: token keys reloaded");
                }
                Err(e) => {
                    crate::metrics::key_reload(false);
                    tracing::warn!("SIGHUP: key reload failed, old keys kept: {e}");
                }
            }
        }
    });
    Ok(())
}
