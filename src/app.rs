//! The composition root: builds shared state from a [`Config`], binds the
//! listeners, spawns the long-lived tasks and owns shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigSource};
use crate::frontend::state::{AdminState, PublicState, SpiceDetails, VncDetails};
use crate::frontend::{Native, admin, public};
use crate::issuance::Issuer;
use crate::reload::{Reloadable, Reloader, Swappable};
use crate::session::{self, Sessions, admission::Limits};
use crate::store::redemptions::RedisRedemptions;
use crate::store::registry::RedisRegistry;
use crate::store::revocations::RedisRevocations;
use crate::store::tickets::RedisTickets;
use crate::store::{Leasing, Redis};
use crate::token::nova::{NovaResolver, Resolvers};
use crate::token::redemption::RedemptionStore;
use crate::token::revocation::{RevocationStore, Revocations};
use crate::token::ticket::TicketStore;
use crate::token::{MemoryRedemptions, MemoryTickets, TokenValidator};
use crate::transport::listener::{self, HttpDeadlines, ProxyHeaders, TlsSlot};

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
    pub redemptions: Arc<dyn RedemptionStore>,
    /// The shared store, when `[store]` is configured.
    pub store: Option<Arc<Redis>>,
    /// Ends the store's background tasks (probe, lease renewals) when the
    /// gateway stops.
    pub background: CancellationToken,
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
    /// What `/readyz` answers, on the admin and public listeners.
    pub readiness: crate::frontend::readiness::Readiness,
}

impl App {
    /// Loads keys and builds the shared state, for listeners at the
    /// configured addresses and no config file to reload from.
    pub fn build(config: Config) -> anyhow::Result<App> {
        Self::build_for(config, None, None)
    }

    /// Builds the shared state for `listeners` as bound (their real ports are
    /// what native clients are told), reloading from `source`.
    pub fn build_for(
        config: Config,
        listeners: Option<&Listeners>,
        source: Option<ConfigSource>,
    ) -> anyhow::Result<App> {
        // The same check as `config check` and every reload.
        let nova = match &config.nova {
            Some(n) => Some(Arc::new(NovaResolver::new(n.clone())?)),
            None => None,
        };
        let ready = Reloadable::load(config)?;
        Self::from_ready(ready, nova, listeners, source)
    }

    /// The shared state over what [`Reloadable::load`] made.
    fn from_ready(
        ready: Reloadable,
        nova: Option<Arc<NovaResolver>>,
        listeners: Option<&Listeners>,
        source: Option<ConfigSource>,
    ) -> anyhow::Result<App> {
        let config = ready.config;
        // Once per process (the CLI names it earlier, for its first log lines).
        crate::node::set(&config.node_name);
        let background = CancellationToken::new();
        if let Some(r) = &config.recording {
            crate::recording::prepare_folder(&r.folder)
                .with_context(|| format!("the recordings folder {}", r.folder.display()))?;
        }
        let stores = Stores::new(&config, background.clone())?;
        let validator = Arc::new(
            TokenValidator::with_keys(
                config.tokens.policy.clone(),
                ready.keys,
                Arc::new(config.allow.clone()),
            )
            .with_revocations(stores.revocations.clone()),
        );
        let issuer = match (&config.issuance, ready.signer) {
            (Some(iss), Some(signer)) => Some(Arc::new(Issuer::new(
                signer,
                iss.issuer.clone(),
                iss.audience.clone(),
                iss.ttl_secs,
                config.listen.public_base_url.clone(),
                validator.clone(),
            ))),
            _ => None,
        };
        let redemptions = stores.redemptions.clone();
        let slot = |c: Option<rustls::ServerConfig>| c.map(|c| Arc::new(ArcSwap::from_pointee(c)));
        let (spice_details, vnc_details) = console_details(&config, listeners, ready.spice_ca_pem);
        let swappable = Swappable {
            validator: validator.clone(),
            signer: issuer.as_ref().map(|i| i.signer_slot()),
            public_tls: slot(ready.public_tls),
            spice_tls: slot(ready.spice_tls),
            vnc_tls: slot(ready.vnc_tls),
            spice_upstreams: Arc::new(ArcSwap::from_pointee(ready.spice_upstreams)),
            vnc_upstreams: Arc::new(ArcSwap::from_pointee(ready.vnc_upstreams)),
        };
        // Nova's tokens beside signed ones: the one resolver every ingress asks.
        let readiness =
            crate::frontend::readiness::Readiness::new(stores.redis.clone(), nova.clone());
        let resolver = Arc::new(Resolvers::new(validator.clone(), nova));
        let sessions = Arc::new(Sessions::new(session_parts(
            &config, &stores, &swappable, resolver,
        )));
        let tls = swappable.public_tls.clone();
        let reloader = Arc::new(Reloader::new(config.clone(), swappable, source));
        Ok(App {
            config,
            validator,
            issuer,
            redemptions,
            store: stores.redis,
            background,
            sessions,
            tls,
            spice_details,
            vnc_details,
            reloader,
            readiness,
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
            readiness: self.readiness.clone(),
            validator: self.validator.clone(),
        })
    }

    /// The admin router over this app's state.
    pub fn admin_state(&self, metrics: Option<PrometheusHandle>) -> AdminState {
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
            readiness: self.readiness.clone(),
            sessions: self.sessions.clone(),
            revoke_for_secs: self.config.tokens.policy.max_ttl_secs
                + 2 * self.config.tokens.policy.leeway_secs,
            reloader: self.reloader.clone(),
        }
    }
}

/// What native SPICE and VNC clients are told: the listeners where they
/// really are (`listeners` as bound, else as configured), and the CA to trust.
fn console_details(
    config: &Config,
    listeners: Option<&Listeners>,
    ca_pem: Option<String>,
) -> (SpiceDetails, VncDetails) {
    let (spice_tls_addr, spice_plain_addr, vnc_addr) = match listeners {
        Some(l) => {
            let (tls, plain) = l.spice_addrs();
            (tls, plain, l.vnc_addr())
        }
        None => (
            config.spice.listen_tls.as_ref().map(|l| l.addr),
            config.spice.listen_plain,
            config.vnc.listen.as_ref().map(|l| l.addr),
        ),
    };
    let spice = SpiceDetails {
        host: config.spice.public_host.clone(),
        tls_port: config
            .spice
            .public_tls_port
            .or(spice_tls_addr.map(|a| a.port())),
        port: spice_plain_addr.map(|a| a.port()),
        ca_pem: ca_pem.clone(),
        host_subject: config.spice.host_subject.clone(),
    };
    let vnc = VncDetails {
        host: config.spice.public_host.clone(),
        port: config.vnc.public_port.or(vnc_addr.map(|a| a.port())),
        ca_pem,
    };
    (spice, vnc)
}

/// What the session layer is built from: `[sessions]` caps and timers, the
/// native listeners' deadlines, and the credentials and certificates a reload swaps.
fn session_parts(
    config: &Config,
    stores: &Stores,
    swappable: &Swappable,
    resolver: Arc<Resolvers>,
) -> session::admission::Parts {
    let s = &config.sessions;
    session::admission::Parts {
        resolver,
        redemptions: stores.redemptions.clone(),
        tickets: stores.tickets.clone(),
        registry: stores.registry.clone(),
        tokens: config.tokens.clone(),
        browser: config.websocket.clone(),
        limits: Limits {
            max_sessions: s.max_sessions,
            per_client: s.max_sessions_per_client,
            per_token: s.max_sessions_per_token,
            connect_timeout: s.connect_timeout,
            hypervisor_keepalive: s.hypervisor_keepalive,
            client_keepalive: s.client_keepalive,
            max_age: s.max_session_age,
            idle: s.idle_timeout,
            spice_handshake: config.spice.handshake_timeout,
            vnc_handshake: config.vnc.handshake_timeout,
            ticket_ttl_secs: config.spice.ticket_ttl_secs,
            spice_drain_grace: config.spice.drain_grace,
            spice_drain_max: config.spice.drain_max,
            tell_watched: s.tell_watched,
        },
        spice_upstreams: swappable.spice_upstreams.clone(),
        vnc_upstreams: swappable.vnc_upstreams.clone(),
        spice_tls: swappable.spice_tls.clone(),
        vnc_tls: swappable.vnc_tls.clone(),
        recording: config.recording.clone(),
        pending: crate::transport::gate::Gate::new(
            config.listen.max_pending_connections,
            Some(config.listen.max_pending_per_address),
            config.listen.trusted_proxies.clone(),
        ),
    }
}

/// Where tokens' state lives: in this process, or in the shared store.
struct Stores {
    redis: Option<Arc<Redis>>,
    registry: Arc<dyn session::registry::SessionRegistry>,
    redemptions: Arc<dyn RedemptionStore>,
    tickets: Arc<dyn TicketStore>,
    revocations: Arc<dyn RevocationStore>,
}

impl Stores {
    fn new(config: &Config, background: CancellationToken) -> anyhow::Result<Self> {
        let Some(store) = &config.store else {
            return Ok(Self {
                redis: None,
                registry: Arc::new(session::registry::Registry::default()),
                redemptions: Arc::new(MemoryRedemptions::new(
                    config.tokens.store_capacity,
                    config.tokens.policy.leeway_secs,
                )),
                tickets: Arc::new(MemoryTickets::new(config.tokens.store_capacity)),
                revocations: Arc::new(Revocations::default()),
            });
        };
        // rustls for `rediss://` takes the process's default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let redis = Redis::connect(store, crate::node::name(), background.clone())?;
        let leasing = Leasing {
            redis: redis.clone(),
            lease: store.lease,
            renew: store.renew,
            stop: background,
        };
        Ok(Self {
            redemptions: RedisRedemptions::new(leasing.clone()),
            tickets: RedisTickets::new(leasing.clone()),
            revocations: Arc::new(RedisRevocations::new(redis.clone())),
            registry: RedisRegistry::new(leasing, crate::node::name().to_string()),
            redis: Some(redis),
        })
    }
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
        let admin = listener::bind(config.listen.admin)
            .with_context(|| format!("cannot listen on {} (listen.admin)", config.listen.admin))?;
        let mut public = Vec::new();
        for addr in std::iter::once(&config.listen.public).chain(&config.listen.public_extra) {
            public.push(
                listener::bind(*addr)
                    .with_context(|| format!("cannot listen on {addr} (listen.public)"))?,
            );
        }
        let bind = |addr: Option<SocketAddr>, key: &'static str| async move {
            match addr {
                None => Ok(None),
                Some(a) => listener::bind(a)
                    .map(Some)
                    .with_context(|| format!("cannot listen on {a} ({key})")),
            }
        };
        let spice_tls = bind(
            config.spice.listen_tls.as_ref().map(|l| l.addr),
            "spice.listen_tls",
        )
        .await?;
        let spice_plain = bind(config.spice.listen_plain, "spice.listen_plain").await?;
        let vnc = bind(config.vnc.listen.as_ref().map(|l| l.addr), "vnc.listen").await?;
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

/// Most admin connections open at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_router = admin::router(app.admin_state(metrics));

    #[cfg(unix)]
    spawn_reload_on_sighup(app.reloader.clone(), shutdown.clone())?;
    if let Some(r) = app.sessions.recording.clone() {
        // Retention: at once, then every minute.
        tokio::spawn(r.retain(app.background.clone()));
    }

    // Listeners stop accepting first; sessions are told afterwards, so the
    // admin listener (readiness) outlives the drain.
    let stop_accepting = CancellationToken::new();
    let stop_admin = CancellationToken::new();
    let deadlines = HttpDeadlines {
        tls_handshake: app.config.websocket.upgrade_timeout,
        request_headers: app.config.websocket.upgrade_timeout,
        write_stall: app.config.websocket.upgrade_timeout,
    };
    // The admin listener gets the public one's deadlines, and a cap on open
    // connections (see `Gate::admin`): idle ones must not exhaust the
    // descriptors that consoles need.
    let admin = tokio::spawn(listener::serve(
        listeners.admin,
        None,
        admin_router,
        deadlines,
        stop_admin.clone(),
        crate::transport::gate::Gate::admin(ADMIN_MAX_CONNECTIONS),
        ProxyHeaders::none(),
    ));
    let trusted = app.config.listen.trusted_proxies.clone();
    let proxy = |expected: bool| ProxyHeaders::from_trusted(expected, &trusted);
    let sessions = &app.sessions;
    sessions
        .keys
        .spawn_rotation(app.config.spice.key_rotation, stop_accepting.clone());
    let natives = [
        (
            listeners.spice_tls,
            Native::SpiceTls,
            app.config.spice.proxy_protocol,
        ),
        (
            listeners.spice_plain,
            Native::SpicePlain,
            app.config.spice.proxy_protocol,
        ),
        (listeners.vnc, Native::Vnc, app.config.vnc.proxy_protocol),
    ];
    let mut native = Vec::new();
    for (l, kind, expects_proxy) in natives {
        let Some(l) = l else { continue };
        native.push(tokio::spawn(crate::frontend::serve_native(
            kind,
            l,
            sessions.clone(),
            stop_accepting.clone(),
            proxy(expects_proxy),
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
            sessions.pending.clone(),
            proxy(app.config.listen.proxy_protocol),
        )));
    }
    app.readiness.set_accepting(true);
    shutdown.cancelled().await;

    // One shutdown path: stop accepting, then tell every session (browser
    // ones get a close frame, native ones are cut), then wait for them.
    app.readiness.set_accepting(false);
    stop_accepting.cancel();
    tracing::info!(sessions = sessions.active(), grace = ?app.config.sessions.shutdown_grace, "draining");
    sessions.cancel.cancel();
    sessions.tracker.close();
    if tokio::time::timeout(app.config.sessions.shutdown_grace, sessions.tracker.wait())
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
    admin.await.context("admin listener task")?;
    app.background.cancel();
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
