//! Nova's console tokens beside signed JWTs (issue #11): session opens per
//! second on one Porthole with fresh JWTs and with fresh Nova tokens, cold
//! (Porthole just started: the first lookups wait for its Keystone
//! authentication) and warm (Keystone token cached); what the positive cache
//! (`[nova] cache_secs`, 5 s) gives where it applies, a page's preflight GET
//! followed by the upgrade with the same token; and the latency a lookup adds
//! (open latency with Nova tokens minus with JWTs, and Porthole's own
//! `porthole_nova_lookup_seconds`).
//!
//! Two Nova sides, side by side in one run:
//! - **fake**: Keystone and Nova's `os-console-auth-tokens` answered by this
//!   tool (axum, in-process, no added delay; the answers and headers of
//!   `tests/nova.rs`, i.e. Nova 34's): Porthole's own cost;
//! - **real**: Keystone 30 and Nova 34 from `target/nova-venv` under
//!   gunicorn (one worker, four threads), started by the e2e harness's
//!   `NovaLab` through `benches/load/novalab.py`, tokens minted by Nova's own
//!   objects: what an operator's Nova API sustains.
//!
//! Every open is `/vnc?token=` up to the far side's first byte (as in the
//! rest of the tool). Under `cargo test` only a tiny pass against the fake
//! runs (no venv, no network).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::sync::Mutex;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::*;

// ---------------------------------------------------------------- the fake Nova

/// Keystone and Nova's console-auth-tokens API, answering at once.
#[derive(Default)]
struct Fake {
    /// Console tokens Nova knows.
    known: Mutex<HashSet<String>>,
    /// Keystone tokens Nova accepts.
    valid: Mutex<Vec<String>>,
    /// The far side's port: where every console is.
    port: u16,
    /// The compute endpoint the catalog names.
    compute: Mutex<String>,
}

async fn fake_keystone(State(f): State<Arc<Fake>>) -> Response {
    let token = format!("ks-{}", uuid());
    f.valid.lock().unwrap().push(token.clone());
    let compute = f.compute.lock().unwrap().clone();
    (
        [("x-subject-token", token)],
        axum::Json(json!({"token": {
            "issued_at": "2026-12-01T12:00:00.000000Z",
            "expires_at": "2026-12-01T13:00:00.000000Z",
            "catalog": [{"type": "compute", "endpoints": [
                {"interface": "internal", "region_id": "RegionOne", "url": compute},
            ]}]
        }})),
    )
        .into_response()
}

async fn fake_lookup(
    State(f): State<Arc<Fake>>,
    Path(token): Path<String>,
    h: HeaderMap,
) -> Response {
    if h.get("openstack-api-version").and_then(|v| v.to_str().ok()) != Some("compute 2.99") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let ks = h.get("x-auth-token").and_then(|v| v.to_str().ok());
    if !ks.is_some_and(|ks| f.valid.lock().unwrap().iter().any(|t| t == ks)) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if !f.known.lock().unwrap().contains(&token) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"itemNotFound": {"code": 404, "message": "not found"}})),
        )
            .into_response();
    }
    axum::Json(json!({"console": {
        "instance_uuid": "11111111-2222-4333-8444-555555555555",
        "host": "127.0.0.1",
        "port": f.port,
        "internal_access_path": null,
    }}))
    .into_response()
}

/// Starts the fake on a free loopback port; its Keystone URL.
async fn start_fake(fake: Arc<Fake>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    *fake.compute.lock().unwrap() = format!("http://{addr}/v2.1");
    let app = Router::new()
        .route("/v3/auth/tokens", post(fake_keystone))
        .route("/v2.1/os-console-auth-tokens/{token}", get(fake_lookup))
        .with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v3")
}

/// A random token in Nova's form (a canonical lowercase UUID, version 4).
fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

// ---------------------------------------------------------------- the real Nova

/// `benches/load/novalab.py`: a real Keystone and Nova, and Nova's minter.
struct Lab {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    auth_url: String,
    password: String,
    /// gunicorn's master of Nova's API (its worker is a child).
    nova_pid: Option<u32>,
    /// The first tokens, minted before the lab was handed over.
    first: Vec<String>,
}

impl Lab {
    /// Starts the lab and mints `count` tokens for the far side's port;
    /// `None` (saying why) when the venvs are not there.
    fn start(dir: &std::path::Path, far_port: u16, count: usize) -> Option<Lab> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join("target/venv/bin/python");
        if !python.exists() || !root.join("target/nova-venv/bin/python").exists() {
            println!(
                "\n(target/venv or target/nova-venv missing: the real Nova is skipped; \
                 `python3 tests/e2e/nova.py install` makes the latter)"
            );
            return None;
        }
        let folder = dir.join("novalab");
        std::fs::create_dir_all(&folder).unwrap();
        let mut child = Command::new(python)
            .arg(root.join("benches/load/novalab.py"))
            .arg(&folder)
            .args([far_port.to_string(), count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("novalab.stderr")).unwrap())
            .spawn()
            .expect("start benches/load/novalab.py");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lab = Lab {
            stdin: child.stdin.take(),
            child,
            lines,
            auth_url: String::new(),
            password: String::new(),
            nova_pid: None,
            first: Vec::new(),
        };
        // Installing nothing, starting both and minting: about a minute here.
        let hello = lab.answer(Duration::from_secs(300), dir);
        lab.auth_url = hello["auth_url"].as_str().unwrap().to_owned();
        lab.password = hello["password"].as_str().unwrap().to_owned();
        lab.nova_pid = hello["nova_pid"].as_u64().map(|p| p as u32);
        lab.first = tokens_of(&hello);
        println!(
            "\n(real Keystone and Nova up in {} s; {count} tokens minted by Nova's objects in {} s)",
            hello["started_secs"], hello["mint_secs"]
        );
        Some(lab)
    }

    /// The helper's next JSON line, within `within`.
    fn answer(&self, within: Duration, dir: &std::path::Path) -> Value {
        match self.lines.recv_timeout(within) {
            Ok(line) => serde_json::from_str(&line).expect("novalab.py's JSON line"),
            Err(e) => panic!(
                "novalab.py gave no answer ({e}):\n{}",
                std::fs::read_to_string(dir.join("novalab.stderr")).unwrap_or_default()
            ),
        }
    }

    /// `n` more tokens from Nova's own objects.
    fn mint(&mut self, n: usize, dir: &std::path::Path) -> Vec<String> {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{n}").and_then(|()| stdin.flush()).unwrap();
        // About 25 ms a token here.
        tokens_of(&self.answer(Duration::from_secs(60 + n as u64 / 5), dir))
    }
}

fn tokens_of(v: &Value) -> Vec<String> {
    v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Closing its stdin stops Keystone and Nova (their process groups).
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- Portholes

/// A Porthole with `[nova]` on one Nova side (and the tool's JWT key).
struct Node {
    name: String,
    public: SocketAddr,
    admin: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Node {
    fn start(
        dir: &std::path::Path,
        name: &str,
        auth_url: &str,
        password: &str,
        cache: u64,
    ) -> Node {
        let pw = dir.join(format!("{name}.nova-password"));
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        let extra = format!(
            "[nova]\nauth_url = \"{auth_url}\"\nusername = \"porthole\"\npassword_file = \"{}\"\n\
             project_name = \"service\"\nregion_name = \"RegionOne\"\ninterface = \"internal\"\n\
             cache_secs = {cache}\n\
             # Every open here is a fresh token from one address: the budget\n\
             # for never-seen tokens (a flood guard) would measure itself.\n\
             unseen_lookups_per_sec = 10000\nunseen_lookup_burst = 100000\n",
            pw.display()
        );
        let (public, admin) = write_porthole_config(dir, name, &extra);
        let child = start_porthole(dir, name, public);
        Node {
            name: name.to_owned(),
            public,
            admin,
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// A fresh process on the same config: nothing cached, no Keystone
    /// token. Ready (`/readyz`), and given a moment to finish starting, so
    /// what follows measures Nova's side of a cold start, not the process's.
    async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = start_porthole(&self.dir, &self.name, self.public);
        store::wait_ready(self.admin).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/metrics`: each series (name with labels) and its value.
    async fn metrics(&self) -> BTreeMap<String, f64> {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("/metrics body");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Changes between two `/metrics` scrapes, of the series that matter here.
struct Delta {
    found: f64,
    cached: f64,
    keystone_auths: f64,
    lookup_secs: f64,
    lookups_timed: f64,
    /// `le` bound (s) and how many lookups took at most that.
    buckets: Vec<(f64, f64)>,
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Delta {
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let buckets = after
        .keys()
        .filter_map(|k| {
            let le = k.strip_prefix("porthole_nova_lookup_seconds_bucket{le=\"")?;
            let le = le.strip_suffix("\"}")?.parse::<f64>().ok()?;
            Some((le, d(k)))
        })
        .collect();
    Delta {
        found: d("porthole_nova_lookups_total{outcome=\"found\"}"),
        cached: d("porthole_nova_lookups_total{outcome=\"cached\"}"),
        keystone_auths: d("porthole_keystone_auths_total{outcome=\"ok\"}"),
        lookup_secs: d("porthole_nova_lookup_seconds_sum"),
        lookups_timed: d("porthole_nova_lookup_seconds_count"),
        buckets,
    }
}

impl Delta {
    /// The histogram's bucket holding quantile `q`, in ms ("2.5-5").
    fn quantile_bound(&self, q: f64) -> String {
        let mut b = self.buckets.clone();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let at = b
            .iter()
            .position(|(_, n)| *n >= q * self.lookups_timed && self.lookups_timed > 0.0);
        match at {
            None => "> 10000".into(),
            Some(0) => format!("0-{}", b[0].0 * 1e3),
            Some(i) => format!("{}-{}", b[i - 1].0 * 1e3, b[i].0 * 1e3),
        }
    }
}

// ---------------------------------------------------------------- one Nova side

/// A Nova side: where its tokens come from, and its two Portholes.
struct Side {
    name: &'static str,
    fake: Option<Arc<Fake>>,
    lab: Option<Lab>,
    /// `cache_secs = 5` (the default): preflight and upgrade cost one lookup.
    node: Node,
    /// `cache_secs = 0`: every resolution asks Nova.
    uncached: Node,
    /// Nova tokens not used yet.
    pool: Vec<String>,
    /// The fastest Nova-token rate seen, to size the next pool.
    best_rate: f64,
}

impl Side {
    /// Makes sure `n` unused Nova tokens are at hand.
    fn stock(&mut self, n: usize) {
        let missing = n.saturating_sub(self.pool.len());
        if missing == 0 {
            return;
        }
        if let Some(f) = &self.fake {
            let fresh: Vec<String> = (0..missing).map(|_| uuid()).collect();
            f.known.lock().unwrap().extend(fresh.iter().cloned());
            self.pool.extend(fresh);
        } else if let Some(lab) = &mut self.lab {
            let dir = self.node.dir.clone();
            self.pool.extend(lab.mint(missing, &dir));
        }
    }

    /// Nova tokens enough for a run of `secs` (one token an open).
    fn stock_for(&mut self, secs: f64) {
        // Three times the best rate so far, and a floor for the first run.
        let floor = if self.fake.is_some() {
            40_000.0
        } else {
            1_000.0
        };
        let n = (self.best_rate * secs * 3.0).max(floor * secs.min(1.0));
        self.stock(n as usize);
    }

    fn take(&mut self, n: usize) -> Vec<String> {
        let at = self.pool.len().saturating_sub(n);
        self.pool.split_off(at)
    }
}

async fn fake_side(s: &Setup) -> Side {
    let fake = Arc::new(Fake {
        port: s.far.port(),
        ..Fake::default()
    });
    let url = start_fake(fake.clone()).await;
    Side {
        name: "fake Nova (in-process)",
        fake: Some(fake),
        lab: None,
        node: Node::start(&s.dir, "nova-fake", &url, "unused", 5),
        uncached: Node::start(&s.dir, "nova-fake-uncached", &url, "unused", 0),
        pool: Vec::new(),
        best_rate: 0.0,
    }
}

fn real_side(s: &Setup) -> Option<Side> {
    let mut lab = Lab::start(&s.dir, s.far.port(), 600)?;
    let node = Node::start(&s.dir, "nova-real", &lab.auth_url, &lab.password, 5);
    let uncached = Node::start(
        &s.dir,
        "nova-real-uncached",
        &lab.auth_url,
        &lab.password,
        0,
    );
    let pool = std::mem::take(&mut lab.first);
    Some(Side {
        name: "real Nova 34 (gunicorn)",
        fake: None,
        lab: Some(lab),
        node,
        uncached,
        pool,
        best_rate: 0.0,
    })
}

// ---------------------------------------------------------------- operations

/// What a timed loop does each time, with a fresh token.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    /// A fresh Ed25519 JWT.
    Jwt,
    /// A fresh Nova token on a Porthole started just before the run.
    Cold,
    /// A fresh Nova token, Keystone token cached.
    Warm,
    /// A page's preflight `GET /vnc?token=`, then the upgrade (cache 5 s).
    Preflight,
    /// The same with `cache_secs = 0`.
    PreflightUncached,
}

impl Row {
    const ALL: [Row; 5] = [
        Row::Jwt,
        Row::Cold,
        Row::Warm,
        Row::Preflight,
        Row::PreflightUncached,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::Jwt => "JWT (Ed25519): opens/s",
            Row::Cold => "Nova token, cold (Porthole just started): opens/s",
            Row::Warm => "Nova token, warm (Keystone token cached): opens/s",
            Row::Preflight => "Nova token, preflight GET + upgrade, cache_secs = 5: opens/s",
            Row::PreflightUncached => {
                "Nova token, preflight GET + upgrade, cache_secs = 0: opens/s"
            }
        }
    }
}

/// One open: `/vnc?token=` up to the far side's first byte, after a
/// preflight GET with the same token when `preflight`.
async fn open(
    http: &reqwest::Client,
    addr: SocketAddr,
    token: &str,
    preflight: bool,
) -> std::io::Result<()> {
    if preflight {
        let r = http
            .get(format!("http://{addr}/vnc?token={token}"))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(std::io::Error::other)?;
        let status = r.status();
        let body = r.text().await.map_err(std::io::Error::other)?;
        if !status.is_success() {
            return Err(std::io::Error::other(format!("preflight {status}: {body}")));
        }
    }
    let mut c = ws_connect(format!("ws://{addr}/vnc?token={token}"), Some(4096), true).await?;
    c.read_exact(12).await.map(drop)
}

/// What one rate run measured.
struct Rate {
    per_s: f64,
    /// Porthole's CPU per open (µs).
    cpu_us: f64,
    /// Nova's API CPU per open (µs), the real side only.
    nova_cpu_us: Option<f64>,
    /// Lookups Nova answered, and answers from the cache, per open.
    lookups: f64,
    cached: f64,
    keystone_auths: f64,
}

/// 16 concurrent openers for `secs`, each open with a token taken from
/// `pool` (what is left stays there).
async fn rate(
    node: &Node,
    nova_pid: Option<u32>,
    pool: &Arc<Mutex<Vec<String>>>,
    preflight: bool,
    secs: f64,
) -> Rate {
    let before = node.metrics().await;
    let (cpu0, nova0) = (cpu_seconds(Some(node.pid())), cpu_seconds(nova_pid));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (done, pool, addr) = (done.clone(), pool.clone(), node.public);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while Instant::now() < deadline {
                let token = pool.lock().unwrap().pop();
                // Out of tokens: the rate is still opens over the time they lasted.
                let Some(token) = token else { break };
                open(&http, addr, &token, preflight).await?;
                done.fetch_add(1, Relaxed);
            }
            Ok::<_, std::io::Error>(())
        }));
    }
    for t in tasks {
        if let Err(e) = t.await.expect("opener") {
            panic!("{}: an open failed: {e}", node.name);
        }
    }
    // The last opens may end a little after the deadline.
    let elapsed = started.elapsed().as_secs_f64();
    if pool.lock().unwrap().is_empty() {
        eprintln!(
            "({}: the token pool ran dry after {elapsed:.1} s; the rate is over that time)",
            node.name
        );
    }
    let n = done.load(Relaxed) as f64;
    let per_op = |b: Option<f64>, a: Option<f64>| a.zip(b).map(|(a, b)| (a - b) * 1e6 / n);
    let d = delta(&before, &node.metrics().await);
    Rate {
        per_s: n / elapsed,
        cpu_us: per_op(cpu0, cpu_seconds(Some(node.pid()))).unwrap_or(0.0),
        nova_cpu_us: per_op(nova0, cpu_seconds(nova_pid)),
        lookups: d.found / n,
        cached: d.cached / n,
        keystone_auths: d.keystone_auths,
    }
}

/// One rate run of `row` on `side`.
async fn run_row(s: &Setup, side: &mut Side, row: Row, secs: f64) -> Rate {
    let nova_pid = side.lab.as_ref().and_then(|l| l.nova_pid);
    if row == Row::Jwt {
        // About twice the best JWT rate seen on this machine.
        let tokens = (0..(secs * 12_000.0) as usize)
            .map(|_| mint(&s.signer, s.far.port()))
            .collect();
        return rate(
            &side.node,
            nova_pid,
            &Arc::new(Mutex::new(tokens)),
            false,
            secs,
        )
        .await;
    }
    side.stock_for(secs);
    let pool = Arc::new(Mutex::new(std::mem::take(&mut side.pool)));
    if row == Row::Cold {
        side.node.restart().await;
    }
    let preflight = matches!(row, Row::Preflight | Row::PreflightUncached);
    let node = match row {
        Row::PreflightUncached => &side.uncached,
        _ => &side.node,
    };
    let r = rate(node, nova_pid, &pool, preflight, secs).await;
    // Tokens never shown to Porthole are as good as new.
    side.pool = std::mem::take(&mut *pool.lock().unwrap());
    if r.per_s > side.best_rate {
        side.best_rate = r.per_s;
    }
    r
}

fn median_of(v: &[Rate], f: impl Fn(&Rate) -> f64) -> f64 {
    median(v.iter().map(f).collect())
}

/// The rate table: every row on every side, interleaved with a rotating order.
async fn rates(s: &Setup, sides: &mut [Side], repeats: usize, secs: f64) {
    let runs: Vec<(usize, Row)> = (0..sides.len())
        .flat_map(|i| Row::ALL.into_iter().map(move |r| (i, r)))
        .collect();
    let mut results: BTreeMap<(usize, usize), Vec<Rate>> = BTreeMap::new();
    for r in 0..repeats {
        for k in 0..runs.len() {
            let (side, row) = runs[(k + r * 3) % runs.len()];
            let out = run_row(s, &mut sides[side], row, secs).await;
            let at = Row::ALL.iter().position(|x| *x == row).unwrap();
            results.entry((at, side)).or_default().push(out);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    println!(
        "\n## Nova tokens beside JWTs: opens per second (16 concurrent, fresh token each, {secs} s), median of {repeats}, runs interleaved"
    );
    println!(
        "Median [lowest-highest run]; in brackets: Porthole's CPU per open (µs); Nova's API CPU\n\
         per open (µs, real Nova); Nova lookups and cache answers per open; Keystone\n\
         authentications in the run.\n"
    );
    println!(
        "| | {} |",
        sides.iter().map(|s| s.name).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(sides.len()));
    for (at, row) in Row::ALL.iter().enumerate() {
        let cells: Vec<String> = (0..sides.len())
            .map(|side| {
                let v = &results[&(at, side)];
                let per_s: Vec<f64> = v.iter().map(|r| r.per_s).collect();
                let (lo, hi) = per_s
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                let mut cell = format!(
                    "{:.0} [{lo:.0}-{hi:.0}] (Porthole {:.0} µs",
                    median(per_s),
                    median_of(v, |r| r.cpu_us)
                );
                if *row != Row::Jwt && v.iter().all(|r| r.nova_cpu_us.is_some()) {
                    cell += &format!(", Nova {:.0} µs", median_of(v, |r| r.nova_cpu_us.unwrap()));
                }
                if *row != Row::Jwt {
                    cell += &format!(
                        "; {:.2} lookups, {:.2} cached",
                        median_of(v, |r| r.lookups),
                        median_of(v, |r| r.cached)
                    );
                }
                if *row == Row::Cold {
                    cell += &format!("; {:.0} Keystone auth", median_of(v, |r| r.keystone_auths));
                }
                cell + ")"
            })
            .collect();
        println!("| {} | {} |", row.name(), cells.join(" | "));
    }
}

/// `n` opens one at a time on `node`: client-side p50 / p99 (µs).
async fn serial(node: &Node, tokens: Vec<String>) -> (f64, f64) {
    let http = reqwest::Client::new();
    let mut samples = Vec::with_capacity(tokens.len());
    for token in tokens {
        let t = Instant::now();
        if let Err(e) = open(&http, node.public, &token, false).await {
            panic!("{}: one-at-a-time open: {e}", node.name);
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (p(0.5), p(0.99))
}

/// The latency a lookup adds, on each side: JWT and Nova opens one at a
/// time (interleaved in blocks), Porthole's lookup histogram over the Nova
/// opens, and the first open after a start (cold).
async fn latencies(s: &Setup, side: &mut Side, n: usize, colds: usize) {
    let block = (n / 5).max(1);
    let (mut jwt, mut nova) = (Vec::new(), Vec::new());
    let mut delta_total = None;
    for _ in 0..n / block {
        let tokens = (0..block).map(|_| mint(&s.signer, s.far.port())).collect();
        jwt.push(serial(&side.node, tokens).await);
        side.stock(block);
        let tokens = side.take(block);
        let m0 = side.node.metrics().await;
        nova.push(serial(&side.node, tokens).await);
        let d = delta(&m0, &side.node.metrics().await);
        delta_total = Some(match delta_total {
            None => d,
            Some(t) => sum(t, d),
        });
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (j50, j99) = (med(&jwt, |x| x.0), med(&jwt, |x| x.1));
    let (n50, n99) = (med(&nova, |x| x.0), med(&nova, |x| x.1));
    let d = delta_total.unwrap();
    println!("\n### {}", side.name);
    println!(
        "- open latency, one at a time ({n} each, in blocks of {block}, median of the blocks' p50 / p99): \
         JWT {j50:.0} / {j99:.0} µs; Nova {n50:.0} / {n99:.0} µs; a lookup adds {:.0} / {:.0} µs",
        n50 - j50,
        n99 - j99
    );
    println!(
        "- Porthole's porthole_nova_lookup_seconds over those opens: {:.0} lookups, mean {:.0} µs, p50 in {} ms, p99 in {} ms (its buckets)",
        d.lookups_timed,
        d.lookup_secs * 1e6 / d.lookups_timed.max(1.0),
        d.quantile_bound(0.5),
        d.quantile_bound(0.99)
    );
    // Cold: a fresh process each time; the first Nova token authenticates
    // to Keystone first. The first JWT after a start is the control.
    let (mut first_jwt, mut first_nova) = (Vec::new(), Vec::new());
    for _ in 0..colds {
        side.node.restart().await;
        let jwt = vec![mint(&s.signer, s.far.port())];
        first_jwt.push(serial(&side.node, jwt).await.0);
        side.node.restart().await;
        side.stock(1);
        let token = side.take(1);
        first_nova.push(serial(&side.node, token).await.0);
    }
    let all = |v: &[f64]| {
        v.iter()
            .map(|f| format!("{:.1}", f / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "- the first open after a start, median of {colds}: Nova {:.1} ms ({}; Keystone authentication included), JWT {:.1} ms ({})",
        median(first_nova.clone()) / 1e3,
        all(&first_nova),
        median(first_jwt.clone()) / 1e3,
        all(&first_jwt)
    );
}

fn sum(a: Delta, b: Delta) -> Delta {
    let mut buckets = a.buckets;
    for (le, n) in b.buckets {
        match buckets.iter_mut().find(|x| x.0 == le) {
            Some(x) => x.1 += n,
            None => buckets.push((le, n)),
        }
    }
    Delta {
        found: a.found + b.found,
        cached: a.cached + b.cached,
        keystone_auths: a.keystone_auths + b.keystone_auths,
        lookup_secs: a.lookup_secs + b.lookup_secs,
        lookups_timed: a.lookups_timed + b.lookups_timed,
        buckets,
    }
}

/// The comparison; `full`: the real Nova too (when its venv is there), 3 s
/// runs, medians of 3. Otherwise a tiny pass on the fake.
pub(super) async fn compare(s: &Arc<Setup>, full: bool) {
    let mut sides = vec![fake_side(s).await];
    if full && let Some(real) = real_side(s) {
        sides.push(real);
    }
    let (secs, repeats, n, colds) = if full {
        (3.0, 3, 500, 3)
    } else {
        (0.3, 1, 20, 1)
    };
    rates(s, &mut sides, repeats, secs).await;
    println!("\n## the latency a Nova lookup adds");
    for side in &mut sides {
        latencies(s, side, n, colds).await;
    }
}
