//! The shared store against a real `redis-server` (Debian's; scripts/test
//! installs it): two nodes' stores on one Redis agree on redemptions
//! (leases), tickets and revocations, a node that stops renewing frees its
//! tokens within the lease, and a Redis that goes away is refused, never
//! trusted, until it comes back.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use porthole::config::StoreConfig;
use porthole::console::ConsoleType;
use porthole::hypervisor::ConsoleTarget;
use porthole::store::redemptions::RedisRedemptions;
use porthole::store::revocations::RedisRevocations;
use porthole::store::tickets::RedisTickets;
use porthole::store::{Leasing, Redis};
use porthole::token::claims::{Audience, ConsoleClaim, ConsoleClaims};
use porthole::token::redemption::{RedemptionStore, ReusePolicy};
use porthole::token::revocation::{RevocationError, RevocationStore};
use porthole::token::ticket::{ChannelRole, TicketRefusal, TicketStore};
use porthole::token::{Grant, RefusalReason, unix_now};
use tokio_util::sync::CancellationToken;

/// A `redis-server` on a free loopback port, stopped (by its PID) on drop.
struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (Debian: apt-get install redis-server)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One node's stores.
struct Node {
    redis: Arc<Redis>,
    redemptions: Arc<RedisRedemptions>,
    tickets: Arc<RedisTickets>,
    revocations: RedisRevocations,
    /// Cancelled: the node stops renewing (as if it died).
    stop: CancellationToken,
    /// What its leased stores renew on.
    leasing: Leasing,
}

impl Node {
    /// This node's session registry, publishing as `name`.
    fn registry(&self, name: &str) -> Arc<porthole::store::registry::RedisRegistry> {
        porthole::store::registry::RedisRegistry::new(self.leasing.clone(), name.into())
    }
}

const LEASE: Duration = Duration::from_secs(2);

/// A node's stores, once they know the store (its epoch).
async fn node(server: &RedisServer, name: &str) -> Node {
    node_renewing(server, name, Duration::from_millis(500)).await
}

/// [`node`], renewing its leases every `renew` (a test that must see what
/// a write left before a renewal writes it again renews never).
async fn node_renewing(server: &RedisServer, name: &str, renew: Duration) -> Node {
    let config = StoreConfig {
        url: format!("redis://127.0.0.1:{}", server.port),
        username: None,
        password: None,
        key_prefix: "test:".into(),
        timeout: Duration::from_millis(500),
        lease: LEASE,
        renew,
    };
    let stop = CancellationToken::new();
    let redis = Redis::connect(&config, name, stop.clone()).unwrap();
    let started = tokio::time::Instant::now();
    while !redis.healthy() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store never got ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leasing = Leasing {
        redis: redis.clone(),
        lease: LEASE,
        renew: config.renew,
        stop: stop.clone(),
    };
    Node {
        redemptions: RedisRedemptions::new(leasing.clone()),
        tickets: RedisTickets::new(leasing.clone()),
        leasing,
        revocations: RedisRevocations::new(redis.clone()),
        redis,
        stop,
    }
}

/// A noVNC session of vm-1 from one client, its token `jti`: each test
/// changes what it is about.
fn new_session(jti: &str) -> porthole::session::registry::NewSession {
    porthole::session::registry::NewSession {
        console: ConsoleType::Novnc,
        instance: "vm-1".into(),
        jti: jti.into(),
        user: None,
        client: "192.0.2.7".parse().unwrap(),
        target: "127.0.0.1:5900".into(),
        key: None,
        view_only: false,
        shadow_of: None,
        recorded: false,
    }
}

fn grant(jti: &str, console: ConsoleType) -> Grant {
    let now = unix_now();
    let target = ConsoleTarget {
        host: "127.0.0.1".into(),
        port: 5930,
        tls_port: None,
    };
    Grant {
        jti: jti.into(),
        instance: "vm-1".into(),
        console,
        target: target.clone(),
        backend: "lab".into(),
        expires_at: now + 600,
        issuer: "api".into(),
        kid: None,
        claims: ConsoleClaims {
            iss: "api".into(),
            aud: Audience::One("porthole".into()),
            sub: "vm-1".into(),
            user: None,
            exp: now + 600,
            nbf: None,
            iat: now,
            jti: jti.into(),
            ver: None,
            console: ConsoleClaim {
                kind: console,
                host: target.host,
                port: target.port,
                tls_port: None,
                view_only: false,
                record: false,
            },
            shadow_of: None,
            playback: None,
        },
    }
}

/// Polls `check` every 50 ms until it holds, for at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection of the test's own to `server`, to look at what the nodes wrote.
async fn connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", server.port)).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Two nodes' session registries on one `redis-server`, both following
/// the command channel, and a connection of the test's own to it.
struct TwoNodes {
    on_a: Arc<porthole::store::registry::RedisRegistry>,
    on_b: Arc<porthole::store::registry::RedisRegistry>,
    con: redis::aio::MultiplexedConnection,
    /// Node a's stores (`stop` to kill it).
    a: Node,
    /// Node b's, kept with the test.
    _b: Node,
    server: RedisServer,
}

async fn two_nodes() -> TwoNodes {
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    let con = connection(&server).await;
    both_nodes_subscribed(&con).await;
    TwoNodes {
        on_a,
        on_b,
        con,
        a,
        _b: b,
        server,
    }
}

/// How many clients follow `channel`.
async fn subscribers(con: &redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut con.clone())
        .await
        .unwrap();
    n
}

/// Until both nodes follow the command channel, before anything is said on it.
async fn both_nodes_subscribed(con: &redis::aio::MultiplexedConnection) {
    eventually(
        "both nodes to subscribe",
        Duration::from_secs(10),
        || async { subscribers(con, "test:commands").await >= 2 },
    )
    .await;
}

#[tokio::test]
async fn one_session_per_token_across_nodes_and_a_dead_nodes_tokens_come_free() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let exp = unix_now() + 600;
    let reconnect = ReusePolicy::Reconnect;
    a.redemptions
        .redeem("t1", exp, reconnect, None, 0)
        .await
        .unwrap();
    let held = b
        .redemptions
        .redeem("t1", exp, reconnect, None, 0)
        .await
        .unwrap_err();
    assert_eq!(held.reason, RefusalReason::Replayed);
    assert!(
        b.redemptions
            .would_redeem("t1", reconnect, None)
            .await
            .is_err()
    );
    // Held past its lease: node a renews it.
    tokio::time::sleep(LEASE * 2).await;
    assert!(
        b.redemptions
            .redeem("t1", exp, reconnect, None, 0)
            .await
            .is_err()
    );
    a.redemptions.release("t1").await;
    b.redemptions
        .redeem("t1", exp, reconnect, None, 0)
        .await
        .unwrap();

    // Node b dies (stops renewing): within the lease, the token is free.
    b.stop.cancel();
    eventually("a dead node's lease runs out", LEASE * 5, || async {
        a.redemptions
            .redeem("t1", exp, reconnect, None, 0)
            .await
            .is_ok()
    })
    .await;

    // Single use: spent on one node is spent on every node.
    let single = ReusePolicy::SingleUse;
    a.redemptions
        .redeem("s1", exp, single, None, 0)
        .await
        .unwrap();
    a.redemptions.release("s1").await;
    let spent = a2(&server)
        .await
        .redemptions
        .redeem("s1", exp, single, None, 0)
        .await
        .unwrap_err();
    assert_eq!(spent.reason, RefusalReason::Replayed);

    // A killed token is dead everywhere.
    a.redemptions.revoke("k1", exp, 0).await.unwrap();
    let c = a2(&server).await;
    assert!(c.redemptions.is_revoked("k1").await.unwrap());
    let killed = c
        .redemptions
        .redeem("k1", exp, reconnect, None, 0)
        .await
        .unwrap_err();
    assert_eq!(killed.reason, RefusalReason::Revoked);
}

/// A third node on the same Redis.
async fn a2(server: &RedisServer) -> Node {
    node(server, "c").await
}

#[tokio::test]
async fn a_ticket_issued_on_one_node_opens_and_joins_its_session_on_another() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let now = unix_now();
    let spice = ConsoleType::SpiceDirect;
    let first = a.tickets.issue(grant("j", spice), 60, now).await.unwrap();
    let ticket = a.tickets.issue(grant("j", spice), 60, now).await.unwrap();
    let (first, ticket) = (first.expose().as_bytes(), ticket.expose().as_bytes());
    assert_eq!(
        b.tickets
            .admit(first, spice, ChannelRole::Opens, now)
            .await
            .unwrap_err(),
        TicketRefusal::Unknown,
        "a new exchange replaced it"
    );
    assert_eq!(
        b.tickets
            .admit(ticket, ConsoleType::VncDirect, ChannelRole::Opens, now)
            .await
            .unwrap_err(),
        TicketRefusal::WrongConsoleType
    );
    let opened = b
        .tickets
        .admit(ticket, spice, ChannelRole::Opens, now)
        .await
        .unwrap();
    assert_eq!(
        (opened.grant.jti.as_str(), opened.grant.console),
        ("j", spice),
        "the grant travels with the ticket"
    );
    assert_eq!(
        a.tickets
            .admit(ticket, spice, ChannelRole::Opens, now)
            .await
            .unwrap_err(),
        TicketRefusal::Used
    );
    let join = |sid| ChannelRole::Joins { session_id: sid };
    assert_eq!(
        a.tickets
            .admit(ticket, spice, join(7), now)
            .await
            .unwrap_err(),
        TicketRefusal::NoSession,
        "before the hypervisor named the session"
    );
    b.tickets.bind(&opened.id, 7).await;
    // Past the fresh ticket's life, its session's channels still join: node
    // b renews the open ticket's lease.
    tokio::time::sleep(LEASE * 2).await;
    a.tickets.admit(ticket, spice, join(7), now).await.unwrap();
    assert_eq!(
        a.tickets
            .admit(ticket, spice, join(8), now)
            .await
            .unwrap_err(),
        TicketRefusal::ForeignSession
    );
    // A channel carrying the token instead of the ticket (spice_auto.html)
    // finds the session by token and id on another node, on the same lease.
    let bound = a.tickets.admit_bound("j", spice, 7).await.unwrap();
    assert_eq!(
        (bound.id.clone(), bound.grant.jti.as_str()),
        (opened.id.clone(), "j")
    );
    for (jti, console, sid) in [
        ("j", spice, 8),
        ("k", spice, 7),
        ("j", ConsoleType::SpiceHtml5, 7),
    ] {
        assert_eq!(
            a.tickets.admit_bound(jti, console, sid).await.unwrap_err(),
            TicketRefusal::NoSession,
            "{jti} {console} {sid}"
        );
    }
    b.tickets.end(&opened.id).await;
    assert_eq!(
        a.tickets
            .admit(ticket, spice, join(7), now)
            .await
            .unwrap_err(),
        TicketRefusal::Unknown
    );
    assert_eq!(
        a.tickets.admit_bound("j", spice, 7).await.unwrap_err(),
        TicketRefusal::NoSession,
        "gone with its session"
    );
    // Revocation kills the token's unused ticket on every node.
    let fresh = a.tickets.issue(grant("r", spice), 60, now).await.unwrap();
    b.tickets.revoke_jti("r").await;
    assert_eq!(
        a.tickets
            .admit(fresh.expose().as_bytes(), spice, ChannelRole::Opens, now)
            .await
            .unwrap_err(),
        TicketRefusal::Unknown
    );
}

#[tokio::test]
async fn revocations_made_on_one_node_hold_on_every_node() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let now = unix_now();
    assert_eq!(b.revocations.check("j1", "vm", now).await.unwrap(), None);
    a.revocations
        .revoke_jti("j1", now + 600, now)
        .await
        .unwrap();
    assert!(
        b.revocations
            .check("j1", "vm", now)
            .await
            .unwrap()
            .is_some()
    );
    a.revocations
        .revoke_instance("vm-9", now + 600, now)
        .await
        .unwrap();
    assert!(
        b.revocations
            .check("j2", "vm-9", now)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        b.revocations.check("j3", "vm-9", now + 1).await.unwrap(),
        None,
        "a token issued after the revocation"
    );
}

#[tokio::test]
async fn a_store_that_is_down_is_refused_never_trusted_until_it_is_back() {
    let mut server = RedisServer::start();
    let a = node(&server, "a").await;
    let exp = unix_now() + 600;
    a.redemptions
        .redeem("before", exp, ReusePolicy::Reconnect, None, 0)
        .await
        .unwrap();
    eventually("healthy", Duration::from_secs(10), || async {
        a.redis.healthy()
    })
    .await;
    // What must survive a Redis that comes back empty.
    let now = unix_now();
    a.revocations
        .revoke_jti("revoked-before", now + 600, now)
        .await
        .unwrap();
    a.redemptions
        .redeem("spent-before", exp, ReusePolicy::SingleUse, None, 0)
        .await
        .unwrap();
    server.stop();
    let refused = a
        .redemptions
        .redeem("t", exp, ReusePolicy::Reconnect, None, 0)
        .await
        .unwrap_err();
    assert_eq!(refused.reason, RefusalReason::Unavailable);
    assert!(matches!(
        a.revocations.check("t", "vm", 0).await,
        Err(RevocationError::Unavailable(_))
    ));
    assert_eq!(
        a.tickets
            .admit(b"x", ConsoleType::SpiceDirect, ChannelRole::Opens, 0)
            .await
            .unwrap_err(),
        TicketRefusal::Unavailable
    );
    assert!(a.redemptions.is_revoked("t").await.is_err());
    assert!(!a.redis.healthy());

    // Back (empty): the node reconnects by itself, and re-takes the lease
    // of the session it still runs.
    let _server = RedisServer::start_on(server.port);
    // Ready (what /readyz says) only once the probe has found the epoch
    // gone and re-seeded: from the first moment it says so, the re-seeded
    // revocation answers.
    eventually("ready again", Duration::from_secs(15), || async {
        a.redis.healthy()
    })
    .await;
    assert!(
        a.revocations
            .check("revoked-before", "vm", now)
            .await
            .unwrap()
            .is_some()
    );
    eventually("reconnected", Duration::from_secs(15), || async {
        a.redemptions
            .redeem("t", exp, ReusePolicy::Reconnect, None, 0)
            .await
            .is_ok()
    })
    .await;
    assert!(a.redis.healthy());
    // Re-seeded from what node a remembered: the revocation and the spent
    // single-use token hold, for node a and for a node that starts now.
    let b = node(&_server, "b").await;
    eventually("b knows the store", Duration::from_secs(10), || async {
        b.redis.healthy()
    })
    .await;
    assert!(
        b.revocations
            .check("revoked-before", "vm", now)
            .await
            .unwrap()
            .is_some()
    );
    let spent = b
        .redemptions
        .redeem("spent-before", exp, ReusePolicy::SingleUse, None, 0)
        .await
        .unwrap_err();
    assert_eq!(spent.reason, RefusalReason::Replayed);
    eventually(
        "the running session's lease is back",
        Duration::from_secs(10),
        || async {
            b.redemptions
                .would_redeem("before", ReusePolicy::Reconnect, None)
                .await
                .is_err()
        },
    )
    .await;
}

#[tokio::test]
async fn every_node_lists_every_session_and_a_terminate_reaches_the_node_that_runs_it() {
    use porthole::session::registry::{NewSession, Selector, SessionRegistry};
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    let session = |jti: &str, key: Option<&str>| NewSession {
        console: ConsoleType::SpiceDirect,
        target: "127.0.0.1:5930".into(),
        key: key.map(str::to_owned),
        ..new_session(jti)
    };
    let live = on_a
        .register(session("j1", Some("ticket-1")), CancellationToken::new())
        .await;
    let listed = on_b.list(&Selector::default()).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].node.as_str()),
        (live.id.as_str(), "node-a")
    );

    // A SPICE channel on node b joins the session node a runs, and ends with it.
    let joined = on_b
        .by_key("ticket-1")
        .await
        .expect("found through the store");
    assert_eq!(joined.id, live.id);

    // Terminated through node b: node a's session is told, wherever it runs.
    let all = Selector {
        jti: Some("j1".into()),
        ..Selector::default()
    };
    let ended = on_b.terminate(&all, "erin", "leaked link").await;
    assert_eq!(ended.len(), 1);
    tokio::time::timeout(Duration::from_secs(10), live.cancel.cancelled())
        .await
        .expect("node a's session was told to end");
    assert_eq!(live.terminated.get().unwrap().by, "erin");
    on_a.deregister(&live).await;
    tokio::time::timeout(Duration::from_secs(10), joined.ended.cancelled())
        .await
        .expect("the channel that joined it on node b ends too");
    eventually("the list empties", Duration::from_secs(10), || async {
        on_b.list(&Selector::default()).await.is_empty()
    })
    .await;

    // A node that dies (stops renewing): its sessions leave the list.
    let _orphan = on_a
        .register(session("j2", None), CancellationToken::new())
        .await;
    assert_eq!(on_b.list(&Selector::default()).await.len(), 1);
    a.stop.cancel();
    eventually(
        "a dead node's sessions leave the list",
        LEASE * 5,
        || async { on_b.list(&Selector::default()).await.is_empty() },
    )
    .await;
}

#[tokio::test]
async fn another_nodes_sessions_are_listed_by_their_user() {
    use porthole::session::registry::{NewSession, Selector, SessionRegistry};
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    let _alice = on_a
        .register(
            NewSession {
                user: Some("alice & co".into()),
                ..new_session("j1")
            },
            CancellationToken::new(),
        )
        .await;
    let _anonymous = on_a
        .register(new_session("j2"), CancellationToken::new())
        .await;
    let hers = on_b
        .list(&Selector {
            user: Some("alice & co".into()),
            ..Selector::default()
        })
        .await;
    let seen: Vec<_> = hers
        .iter()
        .map(|s| (s.jti.clone(), s.user.clone()))
        .collect();
    assert_eq!(seen, [("j1".to_string(), Some("alice & co".to_string()))]);
    // A session without a user is listed without one, not with "".
    let all = on_b.list(&Selector::default()).await;
    let bare = all.iter().find(|s| s.jti == "j2").expect("listed");
    assert_eq!(bare.user, None);
}

#[tokio::test]
async fn a_page_on_any_node_learns_that_its_session_is_recorded() {
    use porthole::session::registry::{NewSession, Oversight, SessionRegistry};
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    let _recorded = on_a
        .register(
            NewSession {
                recorded: true,
                ..new_session("j1")
            },
            CancellationToken::new(),
        )
        .await;
    let _not = on_a
        .register(new_session("j2"), CancellationToken::new())
        .await;
    let told = |recorded| {
        Ok(Some(Oversight {
            watchers: 0,
            recorded,
        }))
    };
    for on in [&on_a, &on_b] {
        assert_eq!(on.told_of("j1").await, told(true));
        assert_eq!(on.told_of("j2").await, told(false));
        assert_eq!(on.told_of("nobody").await, Ok(None));
    }
    // An older node's session hash has no `recorded`: not said to be.
    let older = on_a
        .register(new_session("j3"), CancellationToken::new())
        .await;
    let mut con = connection(&server).await;
    let hash = format!("test:session:{}", older.id);
    let removed: i64 = redis::cmd("HDEL")
        .arg(&hash)
        .arg("recorded")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the field was written, under {hash}");
    assert_eq!(on_b.told_of("j3").await, told(false));
}

#[tokio::test]
async fn a_node_that_sees_a_terminates_revocation_first_ends_the_session_in_the_operators_name() {
    use porthole::session::registry::{Selector, SessionRegistry};
    // An operator's terminate on node b revokes the token, then tells node
    // a. Node a's renewal may read the revocation first: here it always
    // does (nothing is told), and ends the session itself.
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    let (named, bare, taken_back) = (
        on_a.register(new_session("j1"), CancellationToken::new())
            .await,
        on_a.register(new_session("j2"), CancellationToken::new())
            .await,
        on_a.register(new_session("j3"), CancellationToken::new())
            .await,
    );
    let listed = |jti: &str| Selector {
        jti: Some(jti.into()),
        ..Selector::default()
    };
    let (one, three) = (
        on_b.list(&listed("j1")).await,
        on_b.list(&listed("j3")).await,
    );
    assert_eq!((one.len(), three.len()), (1, 1));
    // Who ends it is written before the revocation: the renewal reads both.
    on_b.ending(&one, "dave", "maintenance").await;
    // Said, then taken back (that revocation failed): a later one is not
    // credited to mallory.
    on_b.ending(&three, "mallory", "cleanup").await;
    on_b.not_ending(&three).await;
    let now = unix_now();
    for jti in ["j1", "j2", "j3"] {
        b.revocations.revoke_jti(jti, now + 600, now).await.unwrap();
    }
    for live in [&named, &bare, &taken_back] {
        tokio::time::timeout(LEASE * 5, live.cancel.cancelled())
            .await
            .expect("node a's renewal ended the session of a revoked token");
    }
    let by = |live: &porthole::session::registry::LiveSession| {
        let t = live.terminated.get().unwrap();
        (t.by.clone(), t.reason.clone())
    };
    assert_eq!(by(&named), ("dave".into(), "maintenance".into()));
    // A revocation nobody said more of ends its session as a revocation.
    for live in [&bare, &taken_back] {
        assert_eq!(
            by(live),
            ("revocation".into(), "its token was revoked".into())
        );
    }
}

#[tokio::test]
async fn a_token_revoked_with_keep_sessions_keeps_its_session_on_every_node_until_a_revocation_that_ends_it()
 {
    use porthole::session::registry::SessionRegistry;
    // `POST /v1/revocations` with `keep_sessions` on node b: the token opens
    // nothing more, anywhere, and the renewals of node a (which end the
    // sessions of a terminate's revoked token) leave its session running,
    // also once the store lost its data and was re-seeded. A bare
    // revocation beside it is the sync point: its session ending shows a
    // renewal read both.
    let mut server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let on_a = a.registry("node-a");
    let kept = on_a
        .register(new_session("kept"), CancellationToken::new())
        .await;
    let now = unix_now();
    b.revocations
        .revoke_jti_keeping_sessions("kept", now + 600, now)
        .await
        .unwrap();
    let renewed = |jti: &'static str| {
        let (on_a, b) = (&on_a, &b);
        async move {
            let bare = on_a
                .register(new_session(jti), CancellationToken::new())
                .await;
            // (After a restart, a connection may fail once more.)
            eventually("node b revokes", Duration::from_secs(10), || async {
                b.revocations.revoke_jti(jti, now + 600, now).await.is_ok()
            })
            .await;
            tokio::time::timeout(LEASE * 5, bare.cancel.cancelled())
                .await
                .expect("node a's renewal ended the session of a revoked token");
        }
    };
    renewed("bare-1").await;
    assert!(!kept.cancel.is_cancelled(), "{:?}", kept.terminated.get());
    assert!(
        a.revocations
            .check("kept", "vm", now)
            .await
            .unwrap()
            .is_some()
    );

    // Redis comes back empty: the keep is re-seeded with the revocation.
    server.stop();
    let _server = RedisServer::start_on(server.port);
    for n in [&a, &b] {
        eventually("ready again", Duration::from_secs(15), || async {
            n.redis.healthy()
        })
        .await;
    }
    renewed("bare-2").await;
    assert!(!kept.cancel.is_cancelled(), "{:?}", kept.terminated.get());
    assert!(
        b.revocations
            .check("kept", "vm", now)
            .await
            .unwrap()
            .is_some()
    );

    // Keeping again changes nothing; a revocation that ends sessions (a
    // terminate's, whose message this node may have missed, and whose
    // `ending` record lasts two leases) supersedes the keep for as long as
    // the revocation lasts: the renewal ends the session.
    b.revocations
        .revoke_jti_keeping_sessions("kept", now + 600, now)
        .await
        .unwrap();
    renewed("bare-3").await;
    assert!(!kept.cancel.is_cancelled(), "{:?}", kept.terminated.get());
    b.revocations
        .revoke_jti("kept", now + 600, now)
        .await
        .unwrap();
    b.revocations
        .revoke_jti_keeping_sessions("kept", now + 600, now)
        .await
        .unwrap();
    tokio::time::timeout(LEASE * 5, kept.cancel.cancelled())
        .await
        .expect("a revocation that ends sessions ends a kept one");
    let t = kept.terminated.get().unwrap();
    assert_eq!(
        (t.by.as_str(), t.reason.as_str()),
        ("revocation", "its token was revoked")
    );
}

#[tokio::test]
async fn the_shared_store_treats_takeover_as_reconnect_as_the_memory_store_does() {
    // The session layer ends the running session, then redeems: the store
    // itself still refuses a second session while the first holds the token.
    let server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let exp = unix_now() + 600;
    let takeover = ReusePolicy::Takeover;
    a.redemptions
        .redeem("t1", exp, takeover, None, 0)
        .await
        .unwrap();
    let held = b
        .redemptions
        .redeem("t1", exp, takeover, None, 0)
        .await
        .unwrap_err();
    assert_eq!(held.reason, RefusalReason::Replayed);
    a.redemptions.release("t1").await;
    b.redemptions
        .redeem("t1", exp, takeover, None, 0)
        .await
        .expect("free once the old session gave it back, on any node");
    b.redemptions.release("t1").await;
    a.redemptions
        .redeem("t1", exp, takeover, None, 0)
        .await
        .expect("and again: takeover is never spent");
}

#[tokio::test]
async fn after_redis_comes_back_empty_a_running_session_and_its_ticket_are_whole_again_within_a_renewal()
 {
    use porthole::session::registry::{NewSession, Selector, SessionRegistry};
    let mut server = RedisServer::start();
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    // A SPICE session on node a: its ticket opened it and is bound to the
    // hypervisor's session id 7; its join key is published.
    let spice = ConsoleType::SpiceDirect;
    let now = unix_now();
    let ticket = a.tickets.issue(grant("j", spice), 60, now).await.unwrap();
    let ticket = ticket.expose().as_bytes();
    let opened = a
        .tickets
        .admit(ticket, spice, ChannelRole::Opens, now)
        .await
        .unwrap();
    a.tickets.bind(&opened.id, 7).await;
    let live = on_a
        .register(
            NewSession {
                console: spice,
                target: "127.0.0.1:5930".into(),
                key: Some("key-7".into()),
                ..new_session("j")
            },
            CancellationToken::new(),
        )
        .await;
    assert_eq!(on_b.list(&Selector::default()).await.len(), 1);

    // Redis restarts empty.
    server.stop();
    let server = RedisServer::start_on(server.port);
    let join = ChannelRole::Joins { session_id: 7 };
    eventually(
        "node b lists node a's session again",
        Duration::from_secs(15),
        || async { on_b.list(&Selector::default()).await.len() == 1 },
    )
    .await;
    // Within a renewal of that: a channel joins the session on node b, by
    // ticket or by token and session id, and finds the session by its key.
    eventually(
        "a channel joins on node b",
        Duration::from_secs(5),
        || async { b.tickets.admit(ticket, spice, join, now).await.is_ok() },
    )
    .await;
    assert_eq!(
        b.tickets.admit_bound("j", spice, 7).await.unwrap().id,
        opened.id
    );
    let joined = on_b.by_key("key-7").await.expect("the join key is back");
    assert_eq!(joined.id, live.id);
    // Ended through node b: node a's session is told.
    let ended = on_b.terminate(&Selector::default(), "erin", "audit").await;
    assert_eq!(ended.len(), 1);
    tokio::time::timeout(Duration::from_secs(10), live.cancel.cancelled())
        .await
        .expect("node a's session was told to end");
    // Its end removes what the renewals wrote back, and no renewal brings it back.
    on_a.deregister(&live).await;
    a.tickets.end(&opened.id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(on_b.list(&Selector::default()).await.is_empty());
    assert_eq!(
        b.tickets.admit(ticket, spice, join, now).await.unwrap_err(),
        TicketRefusal::Unknown
    );
    drop(server);
}

#[tokio::test]
async fn a_shadow_on_another_node_is_counted_where_its_session_runs_and_read_from_any_node() {
    use porthole::session::registry::{NewSession, SessionRegistry};
    use std::sync::atomic::Ordering::Relaxed;
    // Both nodes follow the command channel before anything is said on it.
    let mut nodes = two_nodes().await;
    let (on_a, on_b, con) = (&nodes.on_a, &nodes.on_b, nodes.con.clone());
    let live = on_a
        .register(
            NewSession {
                target: "127.0.0.1:5901".into(),
                ..new_session("owner")
            },
            CancellationToken::new(),
        )
        .await;
    assert_eq!(on_b.watchers_of("owner").await, Ok(Some(0)));
    assert_eq!(on_b.watchers_of("nobody").await, Ok(None));

    // A shadow starts on node b: node a counts it, node b reads the count.
    let shadow_of = |jti: &str| NewSession {
        client: "192.0.2.8".parse().unwrap(),
        target: "127.0.0.1:5901".into(),
        view_only: true,
        shadow_of: Some(live.id.clone()),
        ..new_session(jti)
    };
    let on_b_shadow = on_b
        .register(shadow_of("shadow-b"), CancellationToken::new())
        .await;
    on_b.watched(&live.id, &on_b_shadow.id, 1).await;
    eventually(
        "node a to count the shadow",
        Duration::from_secs(10),
        || async { live.watchers.load(Relaxed) == 1 },
    )
    .await;
    eventually("node b to read it", Duration::from_secs(10), || async {
        on_b.watchers_of("owner").await == Ok(Some(1))
    })
    .await;
    assert_eq!(on_a.watchers_of("owner").await, Ok(Some(1)));
    // Said twice (a repeated message): still one.
    on_b.watched(&live.id, &on_b_shadow.id, 1).await;
    on_b.deregister(&on_b_shadow).await;
    on_b.watched(&live.id, &on_b_shadow.id, -1).await;
    eventually(
        "the shadow's end to be read",
        Duration::from_secs(10),
        || async { on_b.watchers_of("owner").await == Ok(Some(0)) },
    )
    .await;
    assert_eq!(live.watchers.load(Relaxed), 0);

    // A shadow whose start was never heard (the store was away) is counted
    // from its node's next renewal; once that node dies, its entry runs
    // out and it is no longer counted.
    let c = node(&nodes.server, "c").await;
    let on_c = c.registry("node-c");
    on_c.register(shadow_of("shadow-c"), CancellationToken::new())
        .await;
    eventually(
        "node a to count node c's shadow",
        Duration::from_secs(10),
        || async { live.watchers.load(Relaxed) == 1 },
    )
    .await;
    // A node of the version before shadows were named (a rolling upgrade)
    // says +1 and -1 without the shadow's id: counted as a sum, as it was,
    // and an end too many takes nothing from node c's shadow.
    let older = |id: String, delta: i32| {
        let mut con = con.clone();
        let message = format!(r#"{{"op":"watched","id":"{id}","delta":{delta}}}"#);
        async move {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("test:commands")
                .arg(message)
                .query_async(&mut con)
                .await
                .unwrap();
        }
    };
    older(live.id.clone(), 1).await;
    older(live.id.clone(), 1).await;
    eventually(
        "node a to count an older node's two shadows beside node c's",
        Duration::from_secs(10),
        || async { live.watchers.load(Relaxed) == 3 },
    )
    .await;
    for _ in 0..3 {
        older(live.id.clone(), -1).await;
    }
    // Node a reads its messages in order: once a later one is counted on
    // another session, the three ends have been.
    let other = on_a
        .register(
            NewSession {
                jti: "other".into(),
                shadow_of: None,
                view_only: false,
                ..shadow_of("other")
            },
            CancellationToken::new(),
        )
        .await;
    older(other.id.clone(), 1).await;
    eventually("node a to read on", Duration::from_secs(10), || async {
        other.watchers.load(Relaxed) == 1
    })
    .await;
    assert_eq!(
        live.watchers.load(Relaxed),
        1,
        "node c's shadow still counts"
    );
    on_a.deregister(&other).await;
    c.stop.cancel();
    eventually(
        "node a to stop counting the dead node's shadow",
        LEASE * 5,
        || async { live.watchers.load(Relaxed) == 0 },
    )
    .await;
    eventually("node b to read it", Duration::from_secs(10), || async {
        on_b.watchers_of("owner").await == Ok(Some(0))
    })
    .await;
    on_a.deregister(&live).await;
    assert_eq!(on_b.watchers_of("owner").await, Ok(None));
    // No store: a session elsewhere can be neither seen nor ruled out.
    nodes.server.stop();
    assert_eq!(
        on_b.watchers_of("owner").await,
        Err(porthole::session::registry::StoreUnanswered)
    );
}

#[tokio::test]
async fn a_serial_shadow_on_another_node_reads_the_output_through_the_store() {
    use porthole::session::registry::{NewSession, SessionRegistry};
    let nodes = two_nodes().await;
    let (on_a, on_b, con) = (&nodes.on_a, &nodes.on_b, nodes.con.clone());
    let live = on_a
        .register(
            NewSession {
                console: ConsoleType::Serial,
                target: "127.0.0.1:4555".into(),
                ..new_session("owner")
            },
            CancellationToken::new(),
        )
        .await;
    let fan_out = live.fan_out.clone().expect("a serial session fans out");
    let mut shadow = on_b.output_of(&live.id).await.expect("through the store");
    let output = format!("test:output:{}", live.id);
    assert_eq!(subscribers(&con, &output).await, 1);
    // The shadow's lifecycle tells the session's node that it watches.
    let on_b_shadow = on_b
        .register(
            NewSession {
                console: ConsoleType::Serial,
                client: "192.0.2.8".parse().unwrap(),
                target: "127.0.0.1:4555".into(),
                view_only: true,
                shadow_of: Some(live.id.clone()),
                ..new_session("shadow")
            },
            CancellationToken::new(),
        )
        .await;
    on_b.watched(&live.id, &on_b_shadow.id, 1).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            // Sent until node a forwards (it starts on the Watched message).
            let _ = fan_out.send(bytes::Bytes::from_static(b"SeaBIOS"));
            match tokio::time::timeout(Duration::from_millis(100), shadow.recv()).await {
                Ok(Ok(chunk)) => return chunk,
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("node b's shadow reads node a's serial output");
    assert_eq!(&seen[..], b"SeaBIOS");
    // The session ends: the shadow's stream ends, its subscription goes.
    drop(shadow);
    on_a.deregister(&live).await;
    live.ended.cancel();
    eventually(
        "the output channel to be let go",
        Duration::from_secs(10),
        || async { subscribers(&con, &output).await == 0 },
    )
    .await;
}

/// How many HGETALLs (session hashes read whole) the server has answered.
async fn hgetalls(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn who_is_on_a_console_is_read_from_its_own_index_on_every_node_not_from_every_session() {
    use porthole::session::registry::{NewSession, Selector, SessionRegistry};
    let nodes = two_nodes().await;
    let (on_a, on_b, mut con) = (&nodes.on_a, &nodes.on_b, nodes.con.clone());
    let on = |jti: &str, target: String| NewSession {
        target,
        ..new_session(jti)
    };
    // Forty consoles in use through node a, and one console (the one asked
    // about) with a session through each node.
    let mut elsewhere = Vec::new();
    for i in 0..40 {
        let s = on(&format!("other-{i}"), format!("127.0.0.1:{}", 6000 + i));
        elsewhere.push(on_a.register(s, CancellationToken::new()).await);
    }
    // One SPICE server, named by one token with its plain port only and by
    // the other with its TLS port too: one console.
    let console = "127.0.0.1:5930".to_string();
    let with_tls = format!("{console} (tls 5931)");
    let via_a = on_a
        .register(on("via-a", console.clone()), CancellationToken::new())
        .await;
    let via_b = on_b
        .register(on("via-b", with_tls.clone()), CancellationToken::new())
        .await;
    let on_console = Selector {
        target: Some(console.clone()),
        ..Selector::default()
    };
    let mut both = vec![via_a.id.clone(), via_b.id.clone()];
    both.sort();
    for (name, registry) in [("a", &on_a), ("b", &on_b)] {
        let before = hgetalls(&mut con).await;
        let mut ids: Vec<String> = registry
            .list(&on_console)
            .await
            .into_iter()
            .map(|v| v.id)
            .collect();
        let read = hgetalls(&mut con).await - before;
        ids.sort();
        assert_eq!(ids, both, "node {name} lists the console's two sessions");
        // Two hashes (one on this node, which it reads anyway), not 42; a
        // renewal running meanwhile reads none.
        assert!(
            read <= 2,
            "node {name} read {read} session hashes to list one console's sessions"
        );
    }
    assert_eq!(on_b.list(&Selector::default()).await.len(), 42);

    // An operator ends everything on the console, through either node.
    let ended = on_a
        .terminate(&on_console, "erin", "host maintenance")
        .await;
    let mut ids: Vec<String> = ended.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, both);
    tokio::time::timeout(Duration::from_secs(10), via_b.cancel.cancelled())
        .await
        .expect("node b's session was told to end");
    assert!(via_a.cancel.is_cancelled());
    assert!(elsewhere.iter().all(|s| !s.cancel.is_cancelled()));

    // A session that ends leaves the index; one whose node stops renewing
    // it leaves it once its lease runs out.
    on_b.deregister(&via_b).await;
    let listed = on_a.list(&on_console).await;
    assert_eq!(
        listed.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [via_a.id.as_str()]
    );
    // Another session on the console, through node b, lives on (and keeps
    // the index's lease) while node a dies.
    let stays = on_b
        .register(on("stays", with_tls), CancellationToken::new())
        .await;
    nodes.a.stop.cancel();
    eventually(
        "a dead node's session leaves the console's list",
        LEASE * 5,
        || async {
            let listed = on_b.list(&on_console).await;
            listed.len() == 1 && listed[0].id == stays.id
        },
    )
    .await;
    let left: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("test:sessions-on:{console}"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        left,
        std::slice::from_ref(&stays.id),
        "the index keeps no id of a session that is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_written_again_as_it_ends_does_not_come_back_as_a_ghost_on_its_console() {
    use porthole::session::registry::{NewSession, Selector, SessionRegistry};
    use redis::AsyncCommands;
    use std::sync::atomic::Ordering::Relaxed;
    let nodes = two_nodes().await;
    let (on_a, on_b, con) = (&nodes.on_a, &nodes.on_b, nodes.con.clone());
    let target = "127.0.0.1:5902";
    // A shadow starts on a session of node a, whose node writes the session
    // again (its watchers changed), and the session ends the moment node a
    // has counted the shadow: its end's deletes and that write race to
    // Redis (the test spins on its own thread while a worker of the
    // runtime runs node a's write). Each time the write lands last, the
    // ended session is back for a lease, on its console's index too,
    // unless its node deletes it again. The shadow runs on node b (node a
    // hears it on the command channel and writes in the background) or,
    // every other time, on node a itself.
    let mut ended = Vec::new();
    for i in 0..80 {
        let live = on_a
            .register(
                NewSession {
                    target: target.into(),
                    ..new_session(&format!("owner-{i}"))
                },
                CancellationToken::new(),
            )
            .await;
        let shadow = format!("shadow-{i}");
        if i % 2 == 0 {
            on_b.watched(&live.id, &shadow, 1).await;
        } else {
            let (on_a, id) = (on_a.clone(), live.id.clone());
            tokio::spawn(async move { on_a.watched(&id, &shadow, 1).await });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while live.watchers.load(Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "node a never counted the shadow"
            );
            std::hint::spin_loop();
        }
        on_a.deregister(&live).await;
        ended.push(live.id.clone());
    }
    // Gone well within the lease a late write gives: nobody is on the
    // console, on either node (a view-only SPICE client would be refused
    // while an ended session still counted).
    let index = format!("test:sessions-on:{target}");
    eventually(
        "the ended sessions to stay gone from the store",
        LEASE / 2,
        || {
            let mut con = con.clone();
            let (index, ended) = (index.clone(), ended.clone());
            async move {
                for id in &ended {
                    let exists: bool = con.exists(format!("test:session:{id}")).await.unwrap();
                    let listed: bool = con.sismember(&index, id).await.unwrap();
                    if exists || listed {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let on_console = Selector {
        target: Some(target.into()),
        ..Selector::default()
    };
    assert!(on_b.list(&on_console).await.is_empty());
}

#[tokio::test]
async fn a_session_that_ends_after_its_takeover_leaves_the_newer_session_findable_by_its_token() {
    use porthole::session::registry::SessionRegistry;
    let server = RedisServer::start();
    // No renewal during the test: what each node's writes and deletes
    // left is what the test reads (a renewal would write it over).
    let never = Duration::from_secs(3600);
    let a = node_renewing(&server, "a", never).await;
    let b = node_renewing(&server, "b", never).await;
    let (on_a, on_b) = (a.registry("node-a"), b.registry("node-b"));
    // A client takes its console over on node b while its old session on
    // node a still runs; a shadow's start then writes the old session
    // again (any write of it would: its node's renewal too) before it
    // ends.
    let old = on_a
        .register(new_session("owner"), CancellationToken::new())
        .await;
    let newer = on_b
        .register(new_session("owner"), CancellationToken::new())
        .await;
    on_a.watched(&old.id, "shadow-of-old", 1).await;
    on_a.deregister(&old).await;
    // The newer session's page asks, through a node that does not run
    // it, whether it is watched: its token names it, unwatched...
    assert_eq!(
        on_a.watchers_of("owner").await,
        Ok(Some(0)),
        "the old session's end took the newer session's place by its token"
    );
    // ...and once a shadow watches it, the page is told...
    on_b.watched(&newer.id, "shadow-of-newer", 1).await;
    assert_eq!(on_a.watchers_of("owner").await, Ok(Some(1)));
    // ...also through a node that runs an unwatched session of the same
    // token (a token may run several, on several nodes).
    let here = on_a
        .register(new_session("owner"), CancellationToken::new())
        .await;
    assert_eq!(on_a.watchers_of("owner").await, Ok(Some(1)));
    on_a.deregister(&here).await;
    on_b.deregister(&newer).await;
    assert_eq!(on_a.watchers_of("owner").await, Ok(None));

    // A session whose node died without taking it out of the token's set
    // (its entry ran out) counts for nothing and is dropped from the set.
    use redis::AsyncCommands;
    let mut con = connection(&server).await;
    let dead = on_b
        .register(new_session("owner"), CancellationToken::new())
        .await;
    let _: () = con.del(format!("test:session:{}", dead.id)).await.unwrap();
    assert_eq!(on_a.watchers_of("owner").await, Ok(None));
    let left: Vec<String> = con.smembers("test:sessions-of:owner").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}
