//! The composition root: builds shared state from a [`Config`], binds the
//! listeners, spawns the long-lived tasks and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SigningKey};
use crate::frontend::admin::{self, AdminState};
use crate::frontend::public::{self, PublicState};
use crate::frontend::spice::SpiceDetails;
use crate::frontend::vnc::VncDetails;
use crate::hypervisor::{SpiceUpstreams, VncUpstreams};
use crate::issuance::Issuer;
use crate::reload::{Reloader, Swappable};
use crate::session::{self, Sessions, admission::Limits};
use crate::token::MemoryTickets;
use crate::token::signing::Signer;
use crate::token::{MemoryRedemptions, TokenValidator};
use crate::transport::listener::{self, HttpDeadlines, TlsSlot};

/// Everything the front ends share, built once from a [`Config`].
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Verifies console tokens (and holds their keys, for reloads).
    pub validator: Arc<TokenValidator>,
    /// Issues tokens, when `[issuance]` is configured.
    pub issuer: Option<Arc<Issuer>>,
    /// Remembers redeemed and revoked tokens.
    pub redemptions: Arc<MemoryRedemptions>,
    /// Every console session; its cancellation token ends them all.
    pub sessions: Arc<Sessions>,
    /// The public listener's TLS config, when it has one.
    pub tls: Option<TlsSlot>,
    /// What native SPICE clients are told.
    pub spice_details: SpiceDetails,
    /// What native VNC clients are told.
    pub vnc_details: VncDetails,
    /// Swaps keys, certificates and backends in (SIGHUP, `POST /v1/reload`).
    pub reloader: Arc<Reloader>,
}

impl App {
    /// Loads keys and builds the shared state, for listeners at the
    /// configured addresses and no config file to reload from.
    pub fn build(config: Config) -> anyhow::Result<App> {
        Self::build_for(config, None, None)
    }

    /// Builds the shared state for `listeners` as bound (their real ports are
    /// what native clients are told), reloading from `config_path`.
    pub fn build_for(
        config: Config,
        listeners: Option<&Listeners>,
        config_path: Option<std::path::PathBuf>,
    ) -> anyhow::Result<App> {
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
        let issuer = Self::build_issuer(&config, &validator)?;
        let redemptions = Arc::new(MemoryRedemptions::new(
            config.tokens.store_capacity,
            config.tokens.policy.leeway_secs,
        ));
        let tls = match &config.listen.tls {
            None => None,
            Some((cert, key)) => Some(Arc::new(arc_swap::ArcSwap::from_pointee(
                listener::load_tls(cert, key, config.listen.tls13_only)
                    .context("listen.tls_cert")?,
            ))),
        };
        let spice_upstreams = Arc::new(ArcSwap::from_pointee(
            SpiceUpstreams::load(&config.spice_backends).context("backends.spice")?,
        ));
        let spice_tls = match (&config.spice.listen_tls, &config.spice.tls) {
            (Some(_), Some((cert, key))) => Some(Arc::new(ArcSwap::from_pointee(
                load_console_tls(cert, key, config.spice.tls13_only).context("spice.tls_cert")?,
            ))),
            (Some(addr), None) => {
                anyhow::bail!(
                    "spice.listen_tls ({addr}) needs a certificate: spice.tls_cert/tls_key or listen.tls_cert/tls_key"
                )
            }
            (None, _) => None,
        };
        let ca_pem = match &config.spice.ca {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("spice.ca: cannot read {}", p.display()))?,
            ),
            None => None,
        };
        let (spice_tls_addr, spice_plain_addr) = match listeners {
            Some(l) => l.spice_addrs(),
            None => (config.spice.listen_tls, config.spice.listen_plain),
        };
        let vnc_addr = match listeners {
            Some(l) => l.vnc_addr(),
            None => config.vnc.listen,
        };
        let spice_details = SpiceDetails {
            host: config.spice.public_host.clone(),
            tls_port: config
                .spice
                .public_tls_port
                .or(spice_tls_addr.map(|a| a.port())),
            port: spice_plain_addr.map(|a| a.port()),
            ca_pem,
            host_subject: config.spice.host_subject.clone(),
        };
        let vnc_upstreams = Arc::new(ArcSwap::from_pointee(
            VncUpstreams::load(&config.vnc_backends).context("backends.vnc")?,
        ));
        let vnc_tls = match (&config.vnc.listen, &config.vnc.tls) {
            (Some(_), Some((cert, key))) => Some(Arc::new(ArcSwap::from_pointee(
                load_console_tls(cert, key, config.vnc.tls13_only).context("vnc.tls_cert")?,
            ))),
            (Some(addr), None) => {
                anyhow::bail!(
                    "vnc.listen ({addr}) needs a certificate: vnc.tls_cert/tls_key, spice.tls_* or listen.tls_*"
                )
            }
            (None, _) => None,
        };
        let vnc_details = VncDetails {
            host: config.spice.public_host.clone(),
            port: config.vnc.public_port.or(vnc_addr.map(|a| a.port())),
            ca_pem: spice_details.ca_pem.clone(),
        };
        let ws = &config.websocket;
        let sessions = Arc::new(Sessions::new(session::admission::Parts {
            resolver: validator.clone(),
            redemptions: redemptions.clone(),
            tickets: Arc::new(MemoryTickets::new(config.tokens.store_capacity)),
            tokens: config.tokens.clone(),
            browser: ws.clone(),
            limits: Limits {
                max_sessions: ws.max_sessions,
                per_client: ws.max_sessions_per_client,
                per_token: ws.max_sessions_per_token,
                connect_timeout: ws.connect_timeout,
                max_age: ws.max_session_age,
                idle: ws.idle_timeout,
                spice_handshake: config.spice.handshake_timeout,
                vnc_handshake: config.vnc.handshake_timeout,
                ticket_ttl_secs: config.spice.ticket_ttl_secs,
            },
            spice_upstreams: spice_upstreams.clone(),
            vnc_upstreams: vnc_upstreams.clone(),
            spice_tls: spice_tls.clone(),
            vnc_tls: vnc_tls.clone(),
        }));
        let reloader = Arc::new(Reloader::new(
            &config,
            Swappable {
                validator: validator.clone(),
                public_tls: tls.clone(),
                spice_tls,
                vnc_tls,
                spice_upstreams,
                vnc_upstreams,
            },
            config_path,
        ));
        Ok(App {
            config,
            validator,
            issuer,
            redemptions,
            sessions,
            tls,
            spice_details,
            vnc_details,
            reloader,
        })
    }

    fn build_issuer(
        config: &Config,
        validator: &Arc<TokenValidator>,
    ) -> anyhow::Result<Option<Arc<Issuer>>> {
        Ok(match &config.issuance {
            None => None,
            Some(iss) => {
                let signer = match &iss.signing_key {
                    SigningKey::PrivatePem(path) => {
                        Signer::from_private_pem_file(path, iss.signing_kid.clone())
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
        })
    }

    /// The public router over this app's state.
    pub fn public_router(&self) -> axum::Router {
        public::router(PublicState {
            sessions: self.sessions.clone(),
            listen: Arc::new(self.config.listen.clone()),
            web: Arc::new(self.config.web.clone()),
            spice: Some(Arc::new(self.spice_details.clone())),
            vnc: Arc::new(self.vnc_details.clone()),
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
            sessions: self.sessions.clone(),
            revoke_for_secs: self.config.tokens.policy.max_ttl_secs
                + 2 * self.config.tokens.policy.leeway_secs,
            reloader: self.reloader.clone(),
        }
    }
}

/// A TLS config for a native console listener (SPICE, VNC): no ALPN.
fn load_console_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    tls13_only: bool,
) -> anyhow::Result<rustls::ServerConfig> {
    Ok(listener::load_console_tls(cert, key, tls13_only)?)
}

/// Bound listeners, so callers (and tests binding port 0) learn the real addresses.
#[derive(Debug)]
pub struct Listeners {
    /// The admin listener.
    pub admin: TcpListener,
    /// The public listeners (`listen.public`, then `listen.public_extra`).
    pub public: Vec<TcpListener>,
    /// The native SPICE TLS listener.
    pub spice_tls: Option<TcpListener>,
    /// The NEED_SECURED-only plain SPICE listener.
    pub spice_plain: Option<TcpListener>,
    /// The native VNC listener.
    pub vnc: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let admin = TcpListener::bind(config.listen.admin)
            .await
            .with_context(|| format!("cannot listen on {} (listen.admin)", config.listen.admin))?;
        let mut public = Vec::new();
        for addr in std::iter::once(&config.listen.public).chain(&config.listen.public_extra) {
            public.push(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (listen.public)"))?,
            );
        }
        let bind = |addr: Option<SocketAddr>, key: &'static str| async move {
            match addr {
                None => Ok(None),
                Some(a) => TcpListener::bind(a)
                    .await
                    .map(Some)
                    .with_context(|| format!("cannot listen on {a} ({key})")),
            }
        };
        let spice_tls = bind(config.spice.listen_tls, "spice.listen_tls").await?;
        let spice_plain = bind(config.spice.listen_plain, "spice.listen_plain").await?;
        let vnc = bind(config.vnc.listen, "vnc.listen").await?;
        Ok(Listeners {
            admin,
            public,
            spice_tls,
            spice_plain,
            vnc,
        })
    }

    /// The public listeners' addresses.
    pub fn public_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.public.iter().map(TcpListener::local_addr).collect()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The native VNC listener's address.
    pub fn vnc_addr(&self) -> Option<SocketAddr> {
        self.vnc.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The native SPICE listeners' addresses (TLS, plain).
    pub fn spice_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        (addr(&self.spice_tls), addr(&self.spice_plain))
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
    spawn_reload_on_sighup(app.reloader.clone(), shutdown.clone())?;

    // Listeners stop accepting first; sessions are told afterwards, so the
    // admin listener (readiness) outlives the drain.
    let stop_accepting = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let admin = tokio::spawn(
        axum::serve(listeners.admin, admin_router)
            .with_graceful_shutdown(stop_admin.clone().cancelled_owned())
            .into_future(),
    );
    let deadlines = HttpDeadlines {
        tls_handshake: app.config.websocket.upgrade_timeout,
        request_headers: app.config.websocket.upgrade_timeout,
    };
    let sessions = &app.sessions;
    sessions
        .keys
        .spawn_rotation(app.config.spice.key_rotation, stop_accepting.clone());
    let mut native = Vec::new();
    if let Some(l) = listeners.spice_tls {
        native.push(tokio::spawn(crate::frontend::spice::serve_tls(
            l,
            sessions.clone(),
            stop_accepting.clone(),
        )));
    }
    if let Some(l) = listeners.spice_plain {
        native.push(tokio::spawn(crate::frontend::spice::serve_plain(
            l,
            sessions.clone(),
            stop_accepting.clone(),
        )));
    }
    if let Some(l) = listeners.vnc {
        native.push(tokio::spawn(crate::frontend::vnc::serve(
            l,
            sessions.clone(),
            stop_accepting.clone(),
        )));
    }
    let public_router = app.public_router();
    let mut public = Vec::new();
    for l in listeners.public {
        public.push(tokio::spawn(listener::serve(
            l,
            app.tls.clone(),
            public_router.clone(),
            deadlines,
            stop_accepting.clone(),
        )));
    }
    ready.store(true, Ordering::Relaxed);
    shutdown.cancelled().await;

    // One shutdown path: stop accepting, then tell every session (browser
    // ones get a close frame, native ones are cut), then wait for them.
    ready.store(false, Ordering::Relaxed);
    stop_accepting.cancel();
    tracing::info!(sessions = sessions.active(), grace = ?app.config.websocket.shutdown_grace, "draining");
    sessions.cancel.cancel();
    sessions.tracker.close();
    if tokio::time::timeout(app.config.websocket.shutdown_grace, sessions.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = sessions.active(),
            "grace period over; ending remaining sessions"
        );
    }
    for p in public.into_iter().chain(native) {
        let _ = p.await;
    }
    stop_admin.cancel();
    admin
        .await
        .context("admin listener task")?
        .context("admin listener")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_sighup(
    reloader: Arc<crate::reload::Reloader>,
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
            // Reading files: off the async threads.
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload_logged("SIGHUP")).await;
        }
    });
    Ok(())
}
