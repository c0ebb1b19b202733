//! The shared store's cost, side by side in one run: Porthole with its
//! in-memory stores (the tool's own Porthole), one node with `[store]` on a
//! local redis-server, and two such nodes behind HAProxy (HTTP mode, round
//! robin). Measured: session opens (`/vnc`) and ticket exchanges
//! (`GET /vnc-direct?token=`) per second, each with a fresh token; the CPU
//! Porthole and Redis spend per operation; Redis commands per operation
//! (`CONFIG RESETSTAT`, then `INFO commandstats`); one-at-a-time latency;
//! Redis memory per open session and per unused ticket.
//!
//! Under `cargo test` only the in-memory target runs (the smoke pass must not
//! need redis-server); the full mode skips Redis and HAProxy, saying so, when
//! either is not installed.

use super::*;

/// What a timed loop does, each time with a fresh token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A `/vnc` WebSocket open, up to the far side's first byte.
    Open,
    /// `GET /vnc-direct?token=`: a ticket, answered 200.
    Exchange,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Exchange => "exchange",
        }
    }

    fn kind(self) -> porthole::token::claims::ConsoleType {
        match self {
            Op::Open => porthole::token::claims::ConsoleType::Novnc,
            Op::Exchange => porthole::token::claims::ConsoleType::VncDirect,
        }
    }
}

/// One way in: where clients connect, the Porthole processes behind it.
#[derive(Clone)]
struct Way {
    name: &'static str,
    public: SocketAddr,
    porthole_pids: Vec<u32>,
    uses_redis: bool,
}

/// Children this module started (redis-server, nodes, HAProxy), killed by PID on drop.
struct Spawned(Vec<Child>);

impl Drop for Spawned {
    fn drop(&mut self) {
        for child in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Redis {
    port: u16,
    pid: u32,
}

impl Redis {
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `INFO` field `key` of section `section`.
    fn info(&self, section: &str, key: &str) -> Option<String> {
        self.cli(&["INFO", section]).lines().find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_owned())
        })
    }

    /// `INFO commandstats`: (command, calls, µs per call).
    fn commandstats(&self) -> Vec<(String, u64, f64)> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |k: &str| {
                    rest.split(',')
                        .find_map(|f| f.strip_prefix(&format!("{k}=")))
                        .and_then(|v| v.parse::<f64>().ok())
                };
                Some((
                    name.to_owned(),
                    field("calls")? as u64,
                    field("usec_per_call")?,
                ))
            })
            .filter(|(name, ..)| name != "info" && !name.starts_with("config"))
            .collect()
    }
}

/// A TCP relay between one node and Redis that counts round trips: a turn
/// begins each time the node sends after Redis last spoke on that connection
/// (a pipeline or a script is one turn, however many commands it holds).
async fn counting_relay(listener: TcpListener, redis: SocketAddr, turns: Arc<AtomicU64>) {
    while let Ok((node, _)) = listener.accept().await {
        let turns = turns.clone();
        tokio::spawn(async move {
            let upstream = TcpStream::connect(redis).await?;
            let _ = (node.set_nodelay(true), upstream.set_nodelay(true));
            let (mut from_node, mut to_node) = node.into_split();
            let (mut from_redis, mut to_redis) = upstream.into_split();
            // Whether Redis spoke since the node last sent: the next send is a new turn.
            let answered = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let up = {
                let answered = answered.clone();
                async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = from_node.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        if answered.swap(false, Relaxed) {
                            turns.fetch_add(1, Relaxed);
                        }
                        to_redis.write_all(&buf[..n]).await?;
                    }
                }
            };
            let down = async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = from_redis.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    answered.store(true, Relaxed);
                    to_node.write_all(&buf[..n]).await?;
                }
            };
            tokio::select! { r = up => r, r = down => r }
        });
    }
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Waits until a node's `/readyz` answers 200 (it has met its store).
pub(super) async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    loop {
        let ready = client
            .get(format!("http://{admin}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "node on {admin} never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `start_cluster` started.
struct Cluster {
    redis: Redis,
    /// node-a alone.
    one: Way,
    /// node-a and node-b behind HAProxy.
    two: Way,
    /// node-c, whose Redis connections pass `counting_relay` (never timed).
    counted: Way,
    turns: Arc<AtomicU64>,
}

/// redis-server (no persistence), two nodes on it and HAProxy in front of
/// both, and a third node that reaches Redis through `counting_relay`.
async fn start_cluster(dir: &std::path::Path, spawned: &mut Spawned) -> Cluster {
    let port = free_addr().port();
    let redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let pid = redis.id();
    spawned.0.push(redis);
    let redis = Redis { port, pid };
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)));

    let turns = Arc::new(AtomicU64::new(0));
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    tokio::spawn(counting_relay(
        relay,
        SocketAddr::from(([127, 0, 0, 1], port)),
        turns.clone(),
    ));
    let mut nodes = Vec::new();
    for (name, port) in [("node-a", port), ("node-b", port), ("node-c", relay_port)] {
        // The defaults an operator would run with: 30 s leases renewed every 10 s.
        let extra = format!(
            "[store]\nurl = \"redis://127.0.0.1:{port}\"\nkey_prefix = \"load:\"\n\n[node]\nname = \"{name}\"\n"
        );
        let (public, admin) = write_porthole_config(dir, name, &extra);
        let child = start_porthole(dir, name, public);
        nodes.push((public, child.id()));
        spawned.0.push(child);
        wait_ready(admin).await;
    }
    let front = free_addr();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            // Within this machine's descriptor limit (20,000; two per connection).
            "global\n    maxconn 9000\ndefaults\n    mode http\n    timeout connect 5s\n\
             timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n\
             frontend public\n    bind {front}\n    default_backend nodes\n\
             backend nodes\n    balance roundrobin\n\
             server node-a {}\n    server node-b {}\n",
            nodes[0].0, nodes[1].0
        ),
    )
    .unwrap();
    let haproxy = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .expect("start haproxy");
    spawned.0.push(haproxy);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(front).is_err() {
        let exited = spawned.0.last_mut().unwrap().try_wait().ok().flatten();
        let log = || std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
        assert!(exited.is_none(), "haproxy exited ({exited:?}):\n{}", log());
        assert!(
            Instant::now() < deadline,
            "haproxy never listened:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let way = |name, public, porthole_pids| Way {
        name,
        public,
        porthole_pids,
        uses_redis: true,
    };
    Cluster {
        redis,
        one: way("redis, 1 node", nodes[0].0, vec![nodes[0].1]),
        two: way(
            "redis, 2 nodes + HAProxy",
            front,
            vec![nodes[0].1, nodes[1].1],
        ),
        counted: way("redis, counted", nodes[2].0, vec![nodes[2].1]),
        turns,
    }
}

/// One operation against `addr` with `token`.
async fn once(
    op: Op,
    http: &reqwest::Client,
    addr: SocketAddr,
    token: &str,
) -> std::io::Result<()> {
    match op {
        Op::Open => {
            let mut c =
                ws_connect(format!("ws://{addr}/vnc?token={token}"), Some(4096), true).await?;
            c.read_exact(12).await.map(drop)
        }
        Op::Exchange => {
            let r = http
                .get(format!("http://{addr}/vnc-direct?token={token}"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(std::io::Error::other)?;
            let status = r.status();
            let body = r.bytes().await.map_err(std::io::Error::other)?;
            if status.is_success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body)
                )))
            }
        }
    }
}

/// Fresh tokens for `op`, minted before a timed run so minting does not share its CPU.
fn tokens(s: &Setup, op: Op, n: usize) -> Arc<std::sync::Mutex<Vec<String>>> {
    Arc::new(std::sync::Mutex::new(
        (0..n)
            .map(|_| mint_kind(&s.signer, s.far.port(), op.kind()))
            .collect(),
    ))
}

/// A rate run: operations per second, with the CPU Porthole and Redis spent
/// per operation (µs). Panics if any operation fails.
async fn rate(
    s: &Arc<Setup>,
    op: Op,
    way: &Way,
    redis: Option<&Redis>,
    concurrency: usize,
    secs: f64,
) -> (f64, f64, Option<f64>) {
    // About twice what the fastest target managed on this machine.
    let pool = tokens(s, op, (secs * 12_000.0) as usize);
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|&p| cpu_seconds(Some(p))).sum() };
    let (porthole_before, redis_before) = (cpu(&way.porthole_pids), redis.map(|r| cpu(&[r.pid])));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (s, done, pool, addr) = (s.clone(), done.clone(), pool.clone(), way.public);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < deadline {
                let token = pool.lock().unwrap().pop();
                let token = token.unwrap_or_else(|| mint_kind(&s.signer, s.far.port(), op.kind()));
                once(op, &http, addr, &token).await?;
                done.fetch_add(1, Relaxed);
            }
            Ok::<_, std::io::Error>(())
        }));
    }
    for t in tasks {
        if let Err(e) = t.await.expect("rate task") {
            panic!("{} {}: an operation failed: {e}", way.name, op.name());
        }
    }
    let n = done.load(Relaxed) as f64;
    let per_op = |before: f64, after: f64| (after - before) * 1e6 / n;
    (
        n / secs,
        per_op(porthole_before, cpu(&way.porthole_pids)),
        redis
            .zip(redis_before)
            .map(|(r, b)| per_op(b, cpu(&[r.pid]))),
    )
}

/// `n` operations one at a time: client-side p50 / p99 (µs); with `redis`,
/// the commands they caused per operation (with µs per call in Redis; the
/// commands a script runs count too).
async fn one_at_a_time(
    s: &Setup,
    op: Op,
    way: &Way,
    redis: Option<&Redis>,
    n: usize,
) -> ((f64, f64), Vec<(String, f64, f64)>) {
    let pool = tokens(s, op, n);
    let http = reqwest::Client::new();
    if let Some(r) = redis {
        r.cli(&["CONFIG", "RESETSTAT"]);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let token = pool.lock().unwrap().pop().unwrap();
        let t = Instant::now();
        if let Err(e) = once(op, &http, way.public, &token).await {
            panic!("{} {}: {e}", way.name, op.name());
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Let the sessions' ends (they close as the client drops) reach Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let commands = redis.map_or_else(Vec::new, |r| {
        r.commandstats()
            .into_iter()
            .map(|(name, calls, usec)| (name, calls as f64 / n as f64, usec))
            .collect()
    });
    samples.sort_by(f64::total_cmp);
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    ((p(0.5), p(0.99)), commands)
}

/// Redis memory for `n` live sessions (held open) and `n` unused tickets on
/// one node: `used_memory` before and after, and `MEMORY USAGE` of one key
/// of each kind with how many there are.
async fn redis_memory(s: &Setup, way: &Way, redis: &Redis, n: usize) {
    let used = || -> i64 {
        redis
            .info("memory", "used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = used();
    let pool = tokens(s, Op::Open, n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let token = pool.lock().unwrap().pop().unwrap();
        let url = format!("ws://{}/vnc?token={token}", way.public);
        let mut c = ws_connect(url, Some(4096), true)
            .await
            .expect("idle session");
        c.read_exact(12).await.expect("idle session's first byte");
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_sessions = used();
    println!(
        "- {n} open sessions: used_memory +{:.0} bytes per session",
        (with_sessions - before) as f64 / n as f64
    );
    let http = reqwest::Client::new();
    let pool = tokens(s, Op::Exchange, n);
    for _ in 0..n {
        let token = pool.lock().unwrap().pop().unwrap();
        once(Op::Exchange, &http, way.public, &token)
            .await
            .expect("exchange");
    }
    println!(
        "- {n} unused tickets: used_memory +{:.0} bytes per ticket",
        (used() - with_sessions) as f64 / n as f64
    );
    // Keys by kind (the part after the prefix, up to the next ':').
    let mut kinds: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    for key in redis.cli(&["--scan", "--pattern", "load:*"]).lines() {
        let kind = key.trim_start_matches("load:");
        let kind = kind.split(':').next().unwrap_or(kind).to_owned();
        kinds.entry(kind).or_insert((0, key.to_owned())).0 += 1;
    }
    for (kind, (count, sample)) in kinds {
        let bytes = redis.cli(&["MEMORY", "USAGE", &sample, "SAMPLES", "0"]);
        println!(
            "- `{kind}`: {count} keys; MEMORY USAGE of one: {} bytes",
            bytes.trim()
        );
    }
    drop(held);
}

/// The comparison; `full`: Redis and HAProxy too, 3 s runs, medians of 3.
pub(super) async fn compare(s: &Arc<Setup>, full: bool) {
    let mut spawned = Spawned(Vec::new());
    let memory = Way {
        name: "memory",
        public: s.porthole,
        porthole_pids: s.pid(Target::Porthole).into_iter().collect(),
        uses_redis: false,
    };
    let mut ways = vec![memory];
    let mut cluster = None;
    if full && installed("redis-server") && installed("haproxy") {
        let c = start_cluster(&s.dir, &mut spawned).await;
        ways.extend([c.one.clone(), c.two.clone()]);
        cluster = Some(c);
    } else if full {
        println!("\n(redis-server or haproxy not installed: the shared store is skipped)");
    }
    let redis = cluster.as_ref().map(|c| &c.redis);
    let (secs, repeats, serial) = if full { (3.0, 3, 500) } else { (0.3, 1, 20) };

    println!(
        "\n## the shared store: operations per second (16 concurrent, fresh token each), median of {repeats}, runs interleaved"
    );
    println!("CPU per operation in µs (Porthole: every node; Redis: redis-server), medians.\n");
    println!(
        "| operation | {} |",
        ways.iter().map(|w| w.name).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(ways.len()));
    for op in [Op::Open, Op::Exchange] {
        let mut results = vec![Vec::new(); ways.len()];
        for r in 0..repeats {
            for k in 0..ways.len() {
                let i = (k + r) % ways.len();
                let on_redis = redis.filter(|_| ways[i].uses_redis);
                results[i].push(rate(s, op, &ways[i], on_redis, 16, secs).await);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let cells: Vec<String> = results
            .into_iter()
            .map(|r| {
                let per_s = median(r.iter().map(|x| x.0).collect());
                let cpu = median(r.iter().map(|x| x.1).collect());
                let redis_cpu: Vec<f64> = r.iter().filter_map(|x| x.2).collect();
                match redis_cpu.is_empty() {
                    true => format!("{per_s:.0}/s (Porthole {cpu:.0} µs)"),
                    false => format!(
                        "{per_s:.0}/s (Porthole {cpu:.0} µs, Redis {:.0} µs)",
                        median(redis_cpu)
                    ),
                }
            })
            .collect();
        println!("| {}s | {} |", op.name(), cells.join(" | "));
    }

    println!("\n## one at a time ({serial} each): client-side latency (µs, p50 / p99)");
    for op in [Op::Open, Op::Exchange] {
        let mut line = format!("- {}:", op.name());
        for way in &ways {
            let ((p50, p99), _) = one_at_a_time(s, op, way, None, serial).await;
            line += &format!(" {} {p50:.0} / {p99:.0};", way.name);
        }
        println!("{}", line.trim_end_matches(';'));
    }
    if let Some(c) = &cluster {
        println!(
            "\n## Redis per operation ({serial} one at a time on a node whose Redis connections pass a counting relay)"
        );
        for op in [Op::Open, Op::Exchange] {
            c.turns.store(0, Relaxed);
            let (_, commands) = one_at_a_time(s, op, &c.counted, Some(&c.redis), serial).await;
            let turns = c.turns.load(Relaxed) as f64 / serial as f64;
            let total: f64 = commands.iter().map(|c| c.1).sum();
            let each: Vec<String> = commands
                .iter()
                .map(|(name, per, usec)| format!("{name} {per:.2} ({usec:.1} µs/call)"))
                .collect();
            let what = match op {
                Op::Open => "open and the session's end",
                Op::Exchange => "exchange",
            };
            println!(
                "- {what}: {turns:.2} round trips, {total:.2} commands (scripts' own included) = {}",
                each.join(", ")
            );
        }
    }

    if let Some(c) = &cluster {
        println!("\n## Redis memory (node-a, key prefix `load:`)");
        redis_memory(s, &c.one, &c.redis, 1000).await;
    }
    drop(spawned);
}
