//! The command line: `serve`, `token mint|inspect`, `keys generate`, `config check`.
//!
//! Start-up and one-shot commands use `anyhow`; errors print once, with their
//! context chain, and map to exit codes: 0 success, 1 refused or invalid, 2 usage.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

use crate::app::{self, App, Listeners};
use crate::bootstrap::{DEV_KID, DevState};
use crate::config::{Config, ConfigSource, ListenOverrides, RawConfig, default_state_dir};
use crate::issuance::{IssueRequest, console_url};
use crate::reload::{ReloadError, Reloadable};
use crate::token::claims::ConsoleClaim;
use crate::token::signing::{KeyKind, MintRequest, Signer, generate};
use crate::token::{ConsoleType, unix_now};

/// Porthole: a console proxy gateway.
#[derive(Debug, Parser)]
#[command(name = "porthole", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (on embedded development defaults without --config).
    Serve {
        /// Config file; without it Porthole runs on embedded defaults.
        #[arg(long, short, env = "PORTHOLE_CONFIG")]
        config: Option<PathBuf>,
        /// Override `listen.admin` (e.g. `127.0.0.1:0` for any free port).
        #[arg(long, env = "PORTHOLE_ADMIN_LISTEN")]
        admin_listen: Option<std::net::SocketAddr>,
        /// Override `listen.public`; on embedded defaults the public base URL follows it.
        #[arg(long, env = "PORTHOLE_PUBLIC_LISTEN")]
        public_listen: Option<std::net::SocketAddr>,
        /// Override `spice.listen_tls` (the native SPICE TLS listener).
        #[arg(long, env = "PORTHOLE_SPICE_LISTEN")]
        spice_listen: Option<std::net::SocketAddr>,
        /// Override `vnc.listen` (the native VNC listener).
        #[arg(long, env = "PORTHOLE_VNC_LISTEN")]
        vnc_listen: Option<std::net::SocketAddr>,
        /// Start the demo VM (default: on embedded defaults, when QEMU is installed).
        #[arg(long, overrides_with = "no_demo")]
        demo: bool,
        /// Do not start the demo VM.
        #[arg(long)]
        no_demo: bool,
        /// Log format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Console tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Live console sessions (through the admin API).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Nova's console tokens (`[nova]`).
    #[command(subcommand)]
    Nova(NovaCommand),
}

#[derive(Debug, Subcommand)]
enum NovaCommand {
    /// Check `[nova]` against the real Keystone and Nova: authenticate, find
    /// the compute endpoint, check the microversion, and look up a random
    /// token (404: the policy lets Porthole look tokens up; 403: it does not).
    /// Exit 0 when every step passes, 1 when one fails.
    Check {
        /// Config file.
        #[arg(long, short, env = "PORTHOLE_CONFIG")]
        config: PathBuf,
    },
}

/// Where the admin API is (for `sessions` and `token revoke`).
#[derive(Debug, Args)]
struct AdminArgs {
    /// The admin listener's URL.
    #[arg(
        long,
        env = "PORTHOLE_ADMIN_URL",
        default_value = "http://127.0.0.1:6090"
    )]
    admin: String,
    /// File with an admin bearer key (an `[issuance]` bearer key). Default: the
    /// development key in the state folder.
    #[arg(long, env = "PORTHOLE_ADMIN_BEARER_FILE")]
    bearer_file: Option<PathBuf>,
}

/// Which sessions.
#[derive(Debug, Args)]
struct SessionFilter {
    /// One session.
    #[arg(long, allow_hyphen_values = true)]
    id: Option<String>,
    /// Every session of an instance.
    #[arg(long)]
    instance: Option<String>,
    /// Every session of a token. A jti may begin with `-` (base64url).
    #[arg(long, allow_hyphen_values = true)]
    jti: Option<String>,
    /// Every session of a user (their tokens' `user` claim).
    #[arg(long, allow_hyphen_values = true)]
    user: Option<String>,
    /// Every session of a console type.
    #[arg(long = "type")]
    console: Option<String>,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List the live sessions.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: SessionFilter,
        /// Print the admin API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// End sessions now (their tokens are revoked too).
    Kill {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: SessionFilter,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Watch a running session: prints a view-only link that opens once,
    /// within a minute, and ends with the session (VNC and serial).
    Shadow {
        #[command(flatten)]
        admin: AdminArgs,
        /// The session's id (`porthole sessions list`).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Print the admin API's JSON (it holds the token).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a console token and print it with its console URL.
    Mint(MintArgs),
    /// Validate a token with the configured keys and print its claims or the reason it is refused.
    Inspect {
        /// The token, or `-` to read it from standard input (keeps it out of shell history).
        token: String,
        /// Config file with the keys; default: the embedded development setup.
        #[arg(long, short, env = "PORTHOLE_CONFIG")]
        config: Option<PathBuf>,
        /// Also require this console type.
        #[arg(long = "type")]
        console: Option<ConsoleType>,
    },
    /// Revoke tokens before (or while) they are used, through the admin API:
    /// one by its jti, or every token of an instance issued until now.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        /// The token's jti (it may begin with `-`: base64url).
        #[arg(
            long,
            allow_hyphen_values = true,
            conflicts_with = "instance",
            required_unless_present = "instance"
        )]
        jti: Option<String>,
        /// The instance.
        #[arg(long)]
        instance: Option<String>,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Args)]
struct MintArgs {
    /// Console type: novnc, spice-html5, serial, spice-direct, vnc-direct.
    #[arg(long = "type", value_parser = parse_console_type)]
    console: ConsoleType,
    /// Instance (VM) id: the `sub` claim.
    #[arg(long)]
    instance: String,
    /// Who the console is for (the `user` claim): shown in the session
    /// list and the audit trail.
    #[arg(long)]
    user: Option<String>,
    /// Hypervisor host.
    #[arg(long)]
    host: String,
    /// Console port on the hypervisor.
    #[arg(long)]
    port: u16,
    /// SPICE TLS port on the hypervisor.
    #[arg(long)]
    tls_port: Option<u16>,
    /// A view-only console: Porthole drops the client's input.
    #[arg(long)]
    view_only: bool,
    /// The session must be recorded (`[recording]` on the gateway).
    #[arg(long)]
    record: bool,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 120)]
    ttl: u64,
    /// Signing key: PKCS#8 PEM private key (or a shared secret with --hmac).
    /// Default: the development key in the state folder.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The key file is an HS256 shared secret.
    #[arg(long)]
    hmac: bool,
    /// Key id written into the token header.
    #[arg(long)]
    kid: Option<String>,
    /// `aud` claim.
    #[arg(long, default_value = "porthole")]
    audience: String,
    /// `iss` claim.
    #[arg(long, default_value = "porthole")]
    issuer: String,
    /// Public base URL the console URL is built on.
    #[arg(long, default_value = "http://127.0.0.1:6080")]
    base_url: String,
    /// Print JSON (`token`, `url`, `jti`, `expires_at`) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Write a new signing key pair (PEM) and its public JWK set.
    Generate {
        /// Key type.
        #[arg(long = "type", value_enum, default_value = "ed25519")]
        kind: KeyKind,
        /// Key id.
        #[arg(long)]
        kid: String,
        /// Output folder: KID.pem (private), KID.pub.pem, KID.jwks.json; KID.secret for HS256.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file (and load its keys); report every error with its location.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

/// `--type`: clap takes the typed error and prints its message.
fn parse_console_type(s: &str) -> Result<ConsoleType, crate::console::UnknownConsoleType> {
    s.parse()
}

impl clap::ValueEnum for ConsoleType {
    fn value_variants<'a>() -> &'a [Self] {
        &ConsoleType::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Runs the CLI.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            admin_listen,
            public_listen,
            spice_listen,
            vnc_listen,
            demo,
            no_demo,
            log_format,
        } => serve(
            config,
            Overrides {
                admin_listen,
                public_listen,
                spice_listen,
                vnc_listen,
                demo: if no_demo {
                    Some(false)
                } else {
                    demo.then_some(true)
                },
            },
            &log_format,
        ),
        Command::Token(TokenCommand::Mint(args)) => mint(args),
        Command::Token(TokenCommand::Inspect {
            token,
            config,
            console,
        }) => inspect(&token, config.as_deref(), console),
        Command::Keys(KeysCommand::Generate { kind, kid, out }) => keys_generate(kind, &kid, &out),
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Nova(NovaCommand::Check { config }) => nova_check(&config),
        Command::Sessions(SessionsCommand::List {
            admin,
            filter,
            json,
        }) => sessions_list(&admin, &filter, json),
        Command::Sessions(SessionsCommand::Kill {
            admin,
            filter,
            reason,
        }) => sessions_kill(&admin, &filter, reason),
        Command::Sessions(SessionsCommand::Shadow { admin, id, json }) => {
            sessions_shadow(&admin, &id, json)
        }
        Command::Token(TokenCommand::Revoke {
            admin,
            jti,
            instance,
            reason,
        }) => token_revoke(&admin, jti, instance, reason),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("porthole: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTHOLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| OneLine(std::io::stderr()));
    if format == "json" {
        let inner = tracing_subscriber::fmt::format().json();
        builder.event_format(JsonWithNode(inner)).init();
    } else {
        builder.with_timer(TimeAndNode::default()).init();
    }
}

/// The text format's timestamp, then this node's name once it is set
/// (`node=...`). In the timestamp's place because that one is written
/// for every record, by the formatter that knows about colours; not in a
/// span, because spawned tasks do not inherit spans and every line must
/// carry it.
#[derive(Debug, Default)]
struct TimeAndNode(tracing_subscriber::fmt::time::SystemTime);

impl tracing_subscriber::fmt::time::FormatTime for TimeAndNode {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        self.0.format_time(w)?;
        match crate::node::get() {
            Some(node) => write!(w, " node={node}"),
            None => Ok(()),
        }
    }
}

/// The JSON format with this node's name as the record's first key (once it
/// is set).
struct JsonWithNode<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JsonWithNode<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(node) = crate::node::get() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut record = String::with_capacity(256);
        let into = tracing_subscriber::fmt::format::Writer::new(&mut record);
        self.0.format_event(ctx, into, event)?;
        // The name is letters, digits, `.`, `-`, `_`: nothing to escape.
        match record.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":\"{node}\",{rest}"),
            None => writer.write_str(&record),
        }
    }
}

/// Keeps each log record on one line: control characters in it (a CR/LF a
/// client put in a header, a token's claims, a hostname) are written
/// escaped, whichever field they came in, so no value can forge a line. The
/// formatter hands over each record whole, ending with its one newline; ESC
/// is left alone (the formatter escapes it in values, and colours use it).
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (&*text, ""),
        };
        if !body
            .chars()
            .any(|c| c.is_control() && c != '\x1b' && c != '\t')
        {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut line = String::with_capacity(buf.len() + 16);
        for c in body.chars() {
            match c {
                '\n' => line.push_str("\\n"),
                '\r' => line.push_str("\\r"),
                '\x1b' | '\t' => line.push(c),
                c if c.is_control() => line.push_str(&c.escape_unicode().to_string()),
                c => line.push(c),
            }
        }
        line.push_str(end);
        self.0.write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The config to use: the file, or the embedded defaults (creating the state
/// folder), with `adjust` applied before validation.
fn load_config(
    path: Option<&Path>,
    adjust: impl FnOnce(&mut RawConfig),
) -> anyhow::Result<(Config, Option<DevState>)> {
    match path {
        Some(p) => Ok((Config::load_with(p, adjust)?, None)),
        None => {
            let dev = DevState::ensure(&default_state_dir())?;
            let mut raw = dev.embedded_config();
            adjust(&mut raw);
            let config = raw
                .validate(Path::new("."))
                .map_err(|issues| crate::config::ConfigError { file: None, issues })
                .context("embedded defaults")?;
            Ok((config, Some(dev)))
        }
    }
}

/// Command-line overrides of `serve`.
#[derive(Debug)]
struct Overrides {
    admin_listen: Option<std::net::SocketAddr>,
    public_listen: Option<std::net::SocketAddr>,
    spice_listen: Option<std::net::SocketAddr>,
    vnc_listen: Option<std::net::SocketAddr>,
    demo: Option<bool>,
}

fn serve(config: Option<PathBuf>, o: Overrides, log_format: &str) -> anyhow::Result<ExitCode> {
    init_tracing(log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // First, so that a SIGTERM or SIGHUP at any point of the start-up
        // (binding, the demo VM) does not take the signal's default action,
        // which would leave a demo VM running without us: SIGTERM takes the
        // one shutdown path, an early SIGHUP is ignored.
        let shutdown = crate::shutdown::on_signals();
        let overrides = ListenOverrides {
            admin: o.admin_listen,
            public: o.public_listen,
            spice_tls: o.spice_listen,
            vnc: o.vnc_listen,
        };
        let source = config.map(|path| ConfigSource { path, overrides });
        let (mut config, dev) = match &source {
            // A reload reads the file with the same overrides.
            Some(s) => (s.load()?, None),
            None => {
                let (mut c, dev) = load_config(None, |raw| overrides.adjust_raw(raw))?;
                overrides.adjust(&mut c);
                (c, dev)
            }
        };
        for w in &config.warnings {
            tracing::warn!("config: {w}");
        }
        let reasons: Vec<&'static str> = crate::token::RefusalReason::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        let metrics = crate::metrics::install(&reasons)?;
        // After the recorder, so that the node's info metric is recorded;
        // from here on every log line carries `node=`.
        crate::node::set(&config.node_name);
        if let Some(path) = &config.audit_path {
            crate::audit::to_file(path)
                .with_context(|| format!("audit.path: cannot open {}", path.display()))?;
        }
        // Listeners are bound once, before the app is built: what clients
        // are told (ports, the base URL on embedded defaults) is where they
        // really are.
        let listeners = Listeners::bind(&config).await?;
        let admin_addr = listeners.admin_addr()?;
        let public_addrs = listeners.public_addrs()?;
        if dev.is_some() {
            // On embedded defaults the base URL follows wherever the listener really is.
            let base = format!("http://{}", public_addrs[0]);
            config.listen.public_base_url = base.clone();
            config.listen.allowed_origins = vec![base];
        }
        let app = App::build_for(config, Some(&listeners), source)?;
        let descriptors = raise_descriptor_limit(&app.config);
        tracing::info!(admin = %admin_addr, public = ?public_addrs, keys = ?app.validator.kids(), descriptors, "porthole is up");
        warn_missing_clients(&app.config.web);
        let want_demo = o.demo.unwrap_or(dev.is_some());
        let demo = if !want_demo || shutdown.is_cancelled() {
            None
        } else if !crate::demo::qemu_available() {
            eprintln!("\nNo demo VM: {} is not installed (Debian: apt-get install qemu-system-x86).", crate::demo::QEMU);
            None
        } else {
            let spice_pw = dev.as_ref().map(|d| d.demo_spice_password.clone());
            // Told to stop while the VM starts: the start is dropped, and
            // its QEMU with it (killed on drop).
            let start = crate::demo::DemoVm::start(&app.config.state_dir, spice_pw.as_deref());
            match shutdown.run_until_cancelled(start).await {
                Some(Ok(vm)) => Some(vm),
                Some(Err(e)) => {
                    eprintln!("\nNo demo VM: {e:#}");
                    None
                }
                None => None,
            }
        };
        // Not for a gateway already told to stop.
        if let Some(dev) = dev.as_ref().filter(|_| !shutdown.is_cancelled()) {
            print_dev_banner(&app, dev, admin_addr);
        }
        if let Some(vm) = demo.as_ref().filter(|_| !shutdown.is_cancelled()) {
            print_demo_urls(&app, vm);
        }
        let result = app::run(std::sync::Arc::new(app), listeners, Some(metrics), shutdown).await;
        if let Some(vm) = demo {
            vm.stop().await;
        }
        result?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Raises the soft limit on open descriptors to the hard one (each console
/// session holds two, and a flood must hit Porthole's own caps first), and
/// warns when even that is below what the caps allow. Returns the limit.
fn raise_descriptor_limit(config: &crate::config::Config) -> u64 {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("cannot raise the open-descriptor limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    };
    let wanted = descriptors_wanted(config);
    if limit < wanted {
        tracing::warn!(
            limit,
            wanted,
            "the open-descriptor limit is below what sessions.max_sessions and listen.max_pending_connections allow: lower them or raise the limit (LimitNOFILE=)"
        );
    }
    limit
}

/// Descriptors the caps allow Porthole to hold at once: two per session
/// (client, hypervisor), one per connection not yet admitted and per admin
/// connection, and some for listeners and files. With recording on, each of
/// those may hold a recording's file as well (a session's own, a download),
/// and the playbacks have their own pool (a socket and a file each).
fn descriptors_wanted(config: &crate::config::Config) -> u64 {
    let file = u64::from(config.recording.is_some());
    let sessions = config.sessions.max_sessions as u64;
    let connections =
        config.listen.max_pending_connections as u64 + crate::app::ADMIN_MAX_CONNECTIONS as u64;
    (2 + file) * sessions + 2 * file * sessions + (1 + file) * connections + 256
}

fn print_dev_banner(app: &App, dev: &DevState, admin: std::net::SocketAddr) {
    let exe = std::env::args().next().unwrap_or_else(|| "porthole".into());
    let base = &app.config.listen.public_base_url;
    eprintln!(
        "
Porthole is running on embedded development defaults (loopback only).

  state folder      {dir}
  token signing key {sk}  (kid {DEV_KID}, Ed25519; public key {pk}, JWK set {jwks})
  development CA    {ca}  (server certificate {cert} for localhost, 127.0.0.1, ::1)
  admin listener    http://{admin}  (/healthz /readyz /metrics, issuance API)
  console pages     {base}  (WebSockets: /vnc /websockify /serial /spice)
  native SPICE      {spice}  (TLS with the development CA; tickets from {base}/spice-direct)
  native VNC        {vnc}  (VeNCrypt X509Plain, the development CA; tickets from {base}/vnc-direct)

Mint a console token for a VNC console on this machine (port 5900):
  {exe} token mint --type novnc --instance demo --host 127.0.0.1 --port 5900
Check it (prints its claims, or exactly why it is refused):
  {exe} token inspect <TOKEN>
Or ask the issuance API, as an API server would:
  curl -s -H \"Authorization: Bearer $(cat {bearer})\" -H 'Content-Type: application/json' \\
    -d '{{\"instance\":\"demo\",\"type\":\"novnc\",\"target\":{{\"host\":\"127.0.0.1\",\"port\":5900}}}}' \\
    http://{admin}/v1/consoles
Open the console URL it returns in a browser.
",
        dir = dev.dir.display(),
        sk = dev.signing_key.display(),
        pk = dev.public_key.display(),
        jwks = dev.jwks.display(),
        ca = dev.ca_cert.display(),
        cert = dev.server_cert.display(),
        bearer = dev.issuance_key.display(),
        spice = app
            .spice_details
            .tls_port
            .map_or_else(|| "off".to_string(), |p| format!("{}:{p}", app.spice_details.host)),
        vnc = app
            .vnc_details
            .port
            .map_or_else(|| "off".to_string(), |p| format!("{}:{p}", app.vnc_details.host)),
    );
}

/// The pages load their client libraries from packages; say which are missing.
fn warn_missing_clients(web: &crate::config::WebConfig) {
    if !web.root.join("pages").is_dir() {
        tracing::warn!("no console pages in {} (set web.root)", web.root.display());
    }
    if !web.novnc_dir.join("core/rfb.js").is_file() {
        tracing::warn!(
            "noVNC not found in {}: VNC pages will not load (Debian: apt-get install novnc)",
            web.novnc_dir.display()
        );
    }
    if !web.spice_html5_dir.join("main.js").is_file() {
        tracing::warn!(
            "spice-html5 not found in {}: SPICE pages will not load (Debian: apt-get install spice-html5)",
            web.spice_html5_dir.display()
        );
    }
    let player = web.root.join(crate::frontend::playback::PLAYER_DIR);
    if !player.join("asciinema-player.min.js").is_file() {
        tracing::warn!(
            "asciinema-player not found in {}: the web player's page will say so, serial \
             recordings still play in the serial page (run `npm ci` in web/)",
            player.display()
        );
    }
    use crate::frontend::xterm::Flavour;
    let xterm = web.xterm_dir.display();
    match Flavour::of(&web.xterm_dir) {
        Flavour::Module => tracing::info!("serial pages use xterm.js from {xterm}"),
        Flavour::CommonJs => tracing::info!(
            "serial pages use Debian's xterm.js 3.8 from {xterm} (`npm ci` in web/ for the current one)"
        ),
        Flavour::Missing => tracing::warn!(
            "xterm.js not found in {xterm}: serial pages will say so (run `npm ci` in web/, \
             or Debian: apt-get install node-xterm)"
        ),
    }
}

fn print_demo_urls(app: &App, vm: &crate::demo::DemoVm) {
    let Some(issuer) = &app.issuer else {
        eprintln!(
            "demo VM running (VNC 127.0.0.1:{}, serial 127.0.0.1:{}); configure [issuance] to get console URLs",
            vm.vnc_port, vm.serial_port
        );
        return;
    };
    let ttl = app.config.tokens.policy.max_ttl_secs;
    let issue = |console, port| {
        issuer.issue(&IssueRequest {
            instance: "porthole-demo".into(),
            console,
            target: crate::hypervisor::ConsoleTarget {
                host: "127.0.0.1".into(),
                port,
                tls_port: None,
            },
            ttl_secs: Some(ttl),
            view_only: false,
            record: false,
            shadow_of: None,
            user: None,
        })
    };
    match (
        issue(ConsoleType::Novnc, vm.vnc_port),
        issue(ConsoleType::Serial, vm.serial_port),
    ) {
        (Ok(vnc), Ok(serial)) => eprintln!(
            "
A demo VM is running (QEMU, no disk: SeaBIOS on screen and on its serial port).
Open its consoles in a browser (valid for {} minutes; mint more with `token mint`):
  screen (noVNC): {}
  serial console: {}",
            ttl / 60,
            vnc.url.expose(),
            serial.url.expose()
        ),
        (Err(e), _) | (_, Err(e)) => eprintln!("demo VM running, but no console URL: {e}"),
    }
    if let Some(port) = vm.spice_port {
        match (
            issue(ConsoleType::SpiceHtml5, port),
            issue(ConsoleType::SpiceDirect, port),
        ) {
            (Ok(html5), Ok(direct)) => eprintln!(
                "  screen (SPICE, spice-html5): {}
SPICE in remote-viewer (virt-viewer), through Porthole's TLS listener:
  curl -so console.vv '{}' && remote-viewer console.vv
  (the .vv file holds a one-session ticket and the development CA; JSON: add &format=json)",
                html5.url.expose(),
                direct.url.expose()
            ),
            (Err(e), _) | (_, Err(e)) => eprintln!("no SPICE console URL: {e}"),
        }
    }
    eprintln!();
}

fn mint(a: MintArgs) -> anyhow::Result<ExitCode> {
    let signer = match (&a.key, a.hmac) {
        (Some(path), true) => {
            let secret =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Signer::from_secret(&secret, a.kid.clone())
        }
        (Some(path), false) => Signer::from_private_pem_file(path, a.kid.clone())?,
        (None, true) => bail!("--hmac needs --key"),
        (None, false) => {
            let dev = DevState::ensure(&default_state_dir())?;
            let kid = a.kid.clone().or_else(|| Some(DEV_KID.to_string()));
            Signer::from_private_pem_file(&dev.signing_key, kid)?
        }
    };
    let max = 86_400;
    if a.ttl == 0 || a.ttl > max {
        bail!("--ttl must be between 1 and {max} seconds");
    }
    if a.user
        .as_deref()
        .is_some_and(|u| !crate::token::claims::user_fits(u))
    {
        // What every gateway would refuse as malformed.
        bail!("--user must be 1 to 255 bytes, none of them control characters");
    }
    let req = MintRequest {
        issuer: a.issuer,
        audience: a.audience,
        instance: a.instance,
        user: a.user,
        console: ConsoleClaim {
            kind: a.console,
            host: a.host,
            port: a.port,
            tls_port: a.tls_port,
            view_only: a.view_only,
            record: a.record,
        },
        ttl_secs: a.ttl,
    };
    let claims = req.claims(unix_now());
    let token = signer.sign(&claims)?;
    let url = console_url(a.base_url.trim_end_matches('/'), a.console, token.expose());
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "token": token.expose(), "url": url, "jti": claims.jti, "expires_at": claims.exp })
        );
    } else {
        println!("{}", token.expose());
        eprintln!("console URL (valid for {} s): {url}", a.ttl);
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(
    token: &str,
    config: Option<&Path>,
    console: Option<ConsoleType>,
) -> anyhow::Result<ExitCode> {
    let token = if token == "-" {
        let mut s = String::new();
        std::io::stdin().take(1 << 20).read_to_string(&mut s)?;
        s.trim().to_string()
    } else {
        token.to_string()
    };
    let (config, _) = load_config(config, |_| {})?;
    let app = App::build(config)?;
    match app.validator.check(&token, console, unix_now()) {
        Ok(grant) => {
            println!("{}", serde_json::to_string_pretty(&grant.claims)?);
            eprintln!(
                "valid: {} console for instance {} at {} (key {}, backend network {}), expires in {} s",
                grant.console,
                grant.instance,
                grant.target,
                grant.kid.as_deref().unwrap_or("-"),
                grant.backend,
                grant.expires_at.saturating_sub(unix_now()),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => {
            println!("refused: {}: {}", refusal.reason, refusal.detail);
            Ok(ExitCode::from(1))
        }
    }
}

fn keys_generate(kind: KeyKind, kid: &str, out: &Path) -> anyhow::Result<ExitCode> {
    if kid.is_empty()
        || !kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || kid.starts_with('.')
    {
        bail!("--kid must be letters, digits, '-', '_' or '.' (it names the files)");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = generate(kind, kid)?;
    let private_path = out.join(if kind == KeyKind::Hs256 {
        format!("{kid}.secret")
    } else {
        format!("{kid}.pem")
    });
    if private_path.exists() {
        bail!("{} exists; not overwriting a key", private_path.display());
    }
    crate::bootstrap::write_private(&private_path, key.private.expose(), false)?;
    println!("private key:  {}", private_path.display());
    if let Some(public) = &key.public_pem {
        let p = out.join(format!("{kid}.pub.pem"));
        std::fs::write(&p, public)?;
        println!("public key:   {}", p.display());
    }
    if let Some(jwks) = &key.jwks {
        let p = out.join(format!("{kid}.jwks.json"));
        std::fs::write(&p, serde_json::to_string_pretty(jwks)?)?;
        println!("public JWKS:  {}", p.display());
    }
    println!("algorithm:    {:?}\nkid:          {kid}", key.algorithm);
    Ok(ExitCode::SUCCESS)
}

fn config_check(file: &Path) -> anyhow::Result<ExitCode> {
    // What a reload checks: the file, then everything it names (keys,
    // certificates, credentials), which the file alone cannot show.
    match Reloadable::check(file) {
        Ok(ready) => {
            let c = &ready.config;
            for w in &c.warnings {
                println!("{}: warning: {w}", file.display());
            }
            println!(
                "{}: ok ({} verification key(s): {:?}; {} backend network(s); issuance {})",
                file.display(),
                ready.keys.ring().len(),
                ready.keys.ring().kids(),
                c.allow.backends().len(),
                if c.issuance.is_some() { "on" } else { "off" },
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(ReloadError::Config(e)) => {
            println!("{e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            println!("{}: {e}", file.display());
            Ok(ExitCode::from(1))
        }
    }
}

fn nova_check(file: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load_with(file, |_| {})?;
    let Some(settings) = config.nova else {
        println!("{}: no [nova] section: nothing to check", file.display());
        return Ok(ExitCode::from(1));
    };
    let resolver = crate::token::nova::NovaResolver::new(settings)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let steps = runtime.block_on(resolver.check());
    for s in &steps {
        match &s.outcome {
            Ok(text) => println!("{}: ok: {text}", s.what),
            Err(text) => println!("{}: FAILED: {text}", s.what),
        }
    }
    Ok(if steps.iter().all(|s| s.outcome.is_ok()) {
        println!("[nova]: ok: Porthole can resolve Nova's console tokens");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn admin_client(a: &AdminArgs) -> anyhow::Result<crate::admin_client::AdminClient> {
    crate::admin_client::AdminClient::new(&a.admin, a.bearer_file.as_deref(), &default_state_dir())
}

fn filter_json(f: &SessionFilter) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("id", &f.id),
        ("instance", &f.instance),
        ("jti", &f.jti),
        ("user", &f.user),
        ("type", &f.console),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), serde_json::Value::String(v.clone()));
        }
    }
    serde_json::Value::Object(m)
}

fn answer_ok(status: u16, body: &serde_json::Value) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        anyhow::bail!("the admin API answered {status}: {body}")
    }
}

fn sessions_list(a: &AdminArgs, f: &SessionFilter, json: bool) -> anyhow::Result<ExitCode> {
    let client = admin_client(a)?;
    // A user id may hold anything but control characters: `&`, `#`, spaces.
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in filter_json(f).as_object().into_iter().flatten() {
        query.append_pair(k, v.as_str().unwrap_or_default());
    }
    let query = query.finish();
    let path = if query.is_empty() {
        "/v1/sessions".to_string()
    } else {
        format!("/v1/sessions?{query}")
    };
    let (status, body) = client.call("GET", &path, None)?;
    answer_ok(status, &body)?;
    if json {
        println!("{body:#}");
        return Ok(ExitCode::SUCCESS);
    }
    let sessions = body["sessions"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<15} {:<13} {:<24} {:<16} {:<24} {:<16} {:>10} {:>10} {:<12} OVERSIGHT",
        "ID", "TYPE", "INSTANCE", "USER", "JTI", "CLIENT", "UP", "DOWN", "STATE"
    );
    for s in &sessions {
        println!(
            "{:<15} {:<13} {:<24} {:<16} {:<24} {:<16} {:>10} {:>10} {:<12} {}",
            s["id"].as_str().unwrap_or("-"),
            s["console"].as_str().unwrap_or("-"),
            s["instance"].as_str().unwrap_or("-"),
            s["user"].as_str().unwrap_or("-"),
            s["jti"].as_str().unwrap_or("-"),
            s["client"].as_str().unwrap_or("-"),
            s["bytes_up"],
            s["bytes_down"],
            s["state"].as_str().unwrap_or("-"),
            oversight_cell(s),
        );
    }
    eprintln!("{} session(s)", sessions.len());
    Ok(ExitCode::SUCCESS)
}

fn sessions_kill(
    a: &AdminArgs,
    f: &SessionFilter,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut body = filter_json(f);
    if body.as_object().is_none_or(|m| m.is_empty()) {
        anyhow::bail!("name the sessions to end: --id, --instance, --jti, --user or --type");
    }
    if let Some(r) = reason {
        body["reason"] = serde_json::Value::String(r);
    }
    let (status, answer) = admin_client(a)?.call("POST", "/v1/sessions/terminate", Some(&body))?;
    answer_ok(status, &answer)?;
    let ended = answer["terminated"].as_array().cloned().unwrap_or_default();
    for id in &ended {
        println!("{}", id.as_str().unwrap_or("-"));
    }
    eprintln!("{} session(s) terminated", ended.len());
    Ok(ExitCode::SUCCESS)
}

/// How a listed session is watched: `shadow of <id>`, `view-only`, or its
/// shadows (`watched by <ids>`); `-` for none of these.
fn oversight_cell(s: &serde_json::Value) -> String {
    let shadows: Vec<&str> = s["shadows"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    match (s["shadow_of"].as_str(), s["view_only"].as_bool()) {
        (Some(of), _) => format!("shadow of {of}"),
        (None, Some(true)) => "view-only".into(),
        _ if !shadows.is_empty() => format!("watched by {}", shadows.join(",")),
        _ => "-".into(),
    }
}

fn sessions_shadow(a: &AdminArgs, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        anyhow::bail!("not a session id: {id:?} (see `porthole sessions list`)");
    }
    let (status, answer) = admin_client(a)?.call(
        "POST",
        &format!("/v1/sessions/{id}/shadow"),
        Some(&serde_json::json!({})),
    )?;
    answer_ok(status, &answer)?;
    if json {
        println!("{answer}");
    } else {
        println!("{}", answer["url"].as_str().unwrap_or("-"));
        eprintln!(
            "view-only shadow of {} ({}): opens once, until {} (unix time)",
            answer["session"].as_str().unwrap_or("-"),
            answer["type"].as_str().unwrap_or("-"),
            answer["expires_at"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn token_revoke(
    a: &AdminArgs,
    jti: Option<String>,
    instance: Option<String>,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let body = serde_json::json!({ "jti": jti, "instance": instance, "reason": reason });
    let body: serde_json::Value = body
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .map(serde_json::Value::Object)
        .unwrap_or_default();
    let (status, answer) = admin_client(a)?.call("POST", "/v1/revocations", Some(&body))?;
    answer_ok(status, &answer)?;
    println!(
        "revoked until {} (unix time); {} session(s) terminated",
        answer["revoked_until"],
        answer["terminated"].as_array().map_or(0, Vec::len)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jti_that_begins_with_a_dash_is_a_value_not_a_flag() {
        use clap::Parser as _;
        let jti = "-Xk3_9aQ";
        let revoke = Cli::try_parse_from(["porthole", "token", "revoke", "--jti", jti]).unwrap();
        assert!(
            matches!(&revoke.command, Command::Token(TokenCommand::Revoke { jti: Some(j), .. }) if j == jti),
            "{revoke:?}"
        );
        let list = Cli::try_parse_from(["porthole", "sessions", "list", "--jti", jti]).unwrap();
        assert!(
            matches!(&list.command, Command::Sessions(SessionsCommand::List { filter, .. }) if filter.jti.as_deref() == Some(jti)),
            "{list:?}"
        );
        let kill = Cli::try_parse_from([
            "porthole", "sessions", "kill", "--jti", "--x-", "--reason", "y",
        ]);
        assert!(
            matches!(&kill.as_ref().unwrap().command, Command::Sessions(SessionsCommand::Kill { filter, reason: Some(r), .. }) if filter.jti.as_deref() == Some("--x-") && r == "y"),
            "{kill:?}"
        );
    }

    #[test]
    fn a_log_record_stays_on_one_line_whatever_its_values_hold() {
        use std::io::Write as _;
        let mut out = OneLine(Vec::new());
        out.write_all(
            b"INFO token refused sub=vm\r\nINFO forged line \x07\xc2\x9b[31m\x1b[0m\tok\n",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "INFO token refused sub=vm\\r\\nINFO forged line \\u{7}\\u{9b}[31m\x1b[0m\tok\n"
        );
        let mut out = OneLine(Vec::new());
        out.write_all(b"plain line\n").unwrap();
        assert_eq!(out.0, b"plain line\n");
    }
}
