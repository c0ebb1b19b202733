//! The shared store: the state several Porthole nodes must agree on, in
//! Redis (`[store]`), behind the same traits the in-memory stores implement.
//!
//! - [`redemptions::RedisRedemptions`]: which token runs a session now (a
//!   *lease* the holding node renews, so a node that dies frees its tokens
//!   within the lease), spent single-use tokens, killed tokens;
//! - [`tickets::RedisTickets`]: tickets issued on any node, redeemed on any
//!   node, bound to the session the hypervisor named;
//! - [`revocations::RedisRevocations`]: revoked tokens and instances.
//!
//! Every operation has a deadline (`store.timeout_ms`) and fails closed: a
//! store that cannot answer refuses (`unavailable`), never admits. The
//! connection reconnects by itself; [`Redis::healthy`] says whether the last
//! operation or probe reached it and, after a failure, whether the probe has
//! read the store's epoch again (`/readyz` follows it); each change of state
//! is logged once. Scripts run atomically on one Redis (or a Sentinel
//! pair's primary); Redis Cluster is not supported (the scripts touch keys
//! they derive).

pub mod redemptions;
pub mod registry;
mod remembered;
pub mod revocations;
pub mod tickets;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, IntoConnectionInfo as _, Script};
use tokio_util::sync::CancellationToken;

use crate::config::StoreConfig;

/// Why the store did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(String);

/// Why the store could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum StoreSetupError {
    /// The URL or credentials are unusable.
    #[error("store.url: {0}")]
    Url(redis::RedisError),
}

/// One Redis, shared by the stores of this node.
pub struct Redis {
    conn: ConnectionManager,
    /// For the subscriber's own connection (RESP3, for pushed messages).
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    healthy: AtomicBool,
    /// Set until this node knows the store's epoch, and while it re-seeds a
    /// store that lost its data: operations are refused meanwhile.
    reseeding: AtomicBool,
    /// Cleared by any failure, set once the probe has read the store's
    /// epoch again: a store that answers again may have come back empty,
    /// and until the probe has looked, this node is not ready (admissions
    /// there would meet the epoch check and be refused). Operations still
    /// run meanwhile: each checks the epoch itself.
    epoch_checked: AtomicBool,
    /// What this node would re-seed a store that lost its data with.
    remembered: remembered::Remembered,
    /// The store's epoch as this node knows it.
    epoch: std::sync::Mutex<Option<String>>,
    /// This process's name in the leases it holds (node and a random part,
    /// so that a restarted node never mistakes an old lease for its own).
    pub holder: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects lazily (the first operation, or the health probe, dials;
    /// until then the store counts as down) and starts the probe, which
    /// runs until `stop` fires.
    pub fn connect(
        config: &StoreConfig,
        node: &str,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, StoreSetupError> {
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(StoreSetupError::Url)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &config.password {
            settings = settings.set_password(password.expose());
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info.clone()).map_err(StoreSetupError::Url)?;
        let push_settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let push_client = redis::Client::open(info.set_redis_settings(push_settings))
            .map_err(StoreSetupError::Url)?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(StoreSetupError::Url)?;
        let redis = Arc::new(Self {
            conn,
            client: push_client,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            healthy: AtomicBool::new(false),
            reseeding: AtomicBool::new(true),
            epoch_checked: AtomicBool::new(false),
            remembered: remembered::Remembered::default(),
            epoch: std::sync::Mutex::default(),
            holder: format!("{node}/{}", crate::token::signing::random_token(9)),
        });
        tokio::spawn(redis.clone().probe(stop.clone()));
        tokio::spawn(redis.clone().follow_events(stop));
        Ok(redis)
    }

    /// Whether the store answered lately, and holds what it must (its
    /// epoch is the one this node knows, or it has been re-seeded).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
            && self.epoch_checked.load(Relaxed)
            && !self.reseeding.load(Relaxed)
    }

    /// `prefix` + `parts`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                key.push(':');
            }
            key.push_str(p);
        }
        key
    }

    /// The key prefix (scripts derive keys from it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn answered(&self, ok: bool, why: Option<&dyn std::fmt::Display>) {
        let was = self.healthy.swap(ok, Relaxed);
        crate::metrics::store_up(ok);
        if was != ok {
            match why {
                None => tracing::info!("store reachable"),
                Some(e) => tracing::warn!(
                    "store unreachable: new sessions and exchanges are refused until it answers: {e}"
                ),
            }
        }
        if !ok {
            self.epoch_checked.store(false, Relaxed);
            crate::metrics::store_unavailable();
        }
    }

    /// Runs `op` on the connection under the deadline; any failure marks
    /// the store down.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.reseeding.load(Relaxed) {
            return Err(StoreError(
                "not ready: the store's epoch is unknown or it is being re-seeded".into(),
            ));
        }
        self.run_now(op).await
    }

    /// [`Redis::run`], also while re-seeding (the probe's own operations).
    async fn run_now<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, op(self.conn.clone())).await {
            Ok(Ok(v)) => {
                if !self.healthy.load(Relaxed) {
                    self.answered(true, None);
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.answered(false, Some(&e));
                Err(StoreError(e.to_string()))
            }
            Err(_) => {
                self.answered(false, Some(&"timed out"));
                Err(StoreError("timed out".into()))
            }
        }
    }

    /// Runs a command.
    pub async fn cmd<T: FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    /// Runs a pipeline.
    pub async fn pipe<T: FromRedisValue>(&self, pipe: redis::Pipeline) -> Result<T, StoreError> {
        self.run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    /// Runs `script` (EVALSHA, loading it when Redis does not know it) on
    /// `keys` and `args`.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        self.run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }

    /// Subscribes to `channels` on a connection of its own, which
    /// reconnects and resubscribes by itself; messages arrive on the
    /// returned receiver as (channel, payload).
    pub async fn subscribe(
        &self,
        channels: &[String],
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>, StoreError> {
        let (push_tx, mut push_rx) = tokio::sync::mpsc::unbounded_channel();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_max_delay(Duration::from_secs(2))
            .set_push_sender(push_tx)
            .set_automatic_resubscription();
        let mut conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| StoreError(e.to_string()))?;
        for channel in channels {
            tokio::time::timeout(self.timeout, conn.subscribe(channel))
                .await
                .map_err(|_| StoreError("timed out".into()))?
                .map_err(|e| StoreError(e.to_string()))?;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let timeout = self.timeout;
        tokio::spawn(async move {
            // The connection lives as long as someone listens. A subscriber
            // sends nothing, so nothing would notice a lost connection and
            // reconnect (and resubscribe) once the manager's own retries
            // are spent: a ping every second does, however long Redis was
            // away (a failover, a restart).
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let push = tokio::select! {
                    push = push_rx.recv() => match push {
                        Some(push) => push,
                        None => return,
                    },
                    _ = tick.tick() => {
                        let ping = redis::cmd("PING");
                        let _ = tokio::time::timeout(timeout, ping.query_async::<()>(&mut conn)).await;
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                };
                let redis::PushInfo { kind, data } = push;
                if kind != redis::PushKind::Message {
                    continue;
                }
                if let [channel, payload] = &data[..] {
                    let (Ok(channel), Ok(payload)) = (
                        String::from_redis_value(channel.clone()),
                        Vec::<u8>::from_redis_value(payload.clone()),
                    ) else {
                        continue;
                    };
                    if tx.send((channel, payload)).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Pings every second, so the store's state is known (and logged on
    /// change) even while nothing asks it anything.
    async fn probe(self: Arc<Self>, stop: CancellationToken) {
        every(Duration::from_secs(1), stop, || self.check_epoch()).await;
    }

    /// Hands every message published on `channels` to `handle`, until
    /// `stop`: subscribes (retrying each second until the store answers;
    /// the subscription then reconnects and resubscribes by itself).
    pub(crate) async fn follow(
        &self,
        channels: &[String],
        stop: CancellationToken,
        mut handle: impl FnMut(&[u8]),
    ) {
        let mut rx = loop {
            match self.subscribe(channels).await {
                Ok(rx) => break rx,
                Err(e) => {
                    tracing::debug!("cannot subscribe yet: {e}");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                m = rx.recv() => match m {
                    Some((_, payload)) => handle(&payload),
                    None => return,
                },
            }
        }
    }
}

/// A store whose entries live on leases this node renews.
trait Leases: Send + Sync + 'static {
    /// Renews every lease this node holds, in one round trip.
    fn renew(&self) -> impl Future<Output = ()> + Send;
}

/// What a store that keeps leases is built on: the shared Redis, the
/// lease, and how often this node renews the leases it holds, until when.
#[derive(Debug, Clone)]
pub struct Leasing {
    /// The shared Redis.
    pub redis: Arc<Redis>,
    /// How long a lease lasts unrenewed.
    pub lease: Duration,
    /// How often this node renews the leases it holds.
    pub renew: Duration,
    /// Renewals stop when this fires.
    pub stop: CancellationToken,
}

impl Leasing {
    /// The store `make` builds on this Redis and lease, its leases renewed
    /// every `renew` until `stop`.
    fn start<S: Leases>(self, make: impl FnOnce(Arc<Redis>, Duration) -> S) -> Arc<S> {
        let store = Arc::new(make(self.redis, self.lease));
        let renewing = store.clone();
        let (period, stop) = (self.renew, self.stop);
        tokio::spawn(async move { every(period, stop, || renewing.renew()).await });
        store
    }
}

/// Runs `work` every `period` until `stop` (a late tick waits; ticks never
/// bunch up): the probe and every renewal loop.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        work().await;
    }
}
