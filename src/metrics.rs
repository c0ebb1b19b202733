//! Metric names and the Prometheus recorder.
//!
//! Labels are bounded enums only (a refusal reason, a console type): never an
//! id, an address or a token.

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Tokens refused, by reason.
pub const TOKEN_REFUSALS: &str = "porthole_token_refusals_total";
/// Tokens issued by the issuance API, by console type.
pub const TOKENS_ISSUED: &str = "porthole_tokens_issued_total";
/// Issuance API calls refused, by reason.
pub const ISSUANCE_REFUSALS: &str = "porthole_issuance_refusals_total";
/// Key reloads, by outcome.
pub const KEY_RELOADS: &str = "porthole_key_reloads_total";

/// Why the metrics recorder could not be installed (at start, so the process stops).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The histogram buckets were refused.
    #[error("metrics buckets: {0}")]
    Buckets(BuildError),
    /// A recorder is installed already, or the exporter would not build.
    #[error("cannot install the metrics recorder: {0}")]
    Install(BuildError),
}

/// Installs the process-wide recorder and returns the handle `/metrics` renders.
/// Every token refusal reason in `token_refusals` starts at zero so
/// dashboards see the full set.
pub fn install(token_refusals: &[&'static str]) -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(MetricsError::Buckets)?
        .install_recorder()
        .map_err(MetricsError::Install)?;
    for &reason in token_refusals {
        metrics::counter!(TOKEN_REFUSALS, "reason" => reason).absolute(0);
    }
    Ok(handle)
}

/// This node's name, as an info metric (`porthole_node_info{node="..."} 1`)
/// rather than a label on every metric: dashboards join on it, and the
/// other series stay as they are on a single node.
pub const NODE_INFO: &str = "porthole_node_info";

/// Publishes this node's name (once, at start).
pub fn node_info(node: &str) {
    metrics::gauge!(NODE_INFO, "node" => node.to_string()).set(1.0);
}

/// Counts one refused token.
pub fn token_refused(reason: &'static str) {
    metrics::counter!(TOKEN_REFUSALS, "reason" => reason).increment(1);
}

/// Counts one issued token.
pub fn token_issued(console: &'static str) {
    metrics::counter!(TOKENS_ISSUED, "console" => console).increment(1);
}

/// Counts one refused issuance call.
pub fn issuance_refused(reason: &'static str) {
    metrics::counter!(ISSUANCE_REFUSALS, "reason" => reason).increment(1);
}

/// Counts one key reload.
pub fn key_reload(ok: bool) {
    metrics::counter!(KEY_RELOADS, "outcome" => if ok { "ok" } else { "failed" }).increment(1);
}

/// Sessions started, by console type.
pub const SESSIONS_STARTED: &str = "porthole_sessions_started_total";
/// Sessions ended, by console type and reason.
pub const SESSIONS_ENDED: &str = "porthole_sessions_ended_total";
/// Session requests refused after the token (origin, busy, overload, unreachable), by reason.
pub const SESSION_REFUSALS: &str = "porthole_session_refusals_total";

/// Counts a started session.
pub fn session_started(console: &'static str) {
    metrics::counter!(SESSIONS_STARTED, "console" => console).increment(1);
}

/// Counts an ended session.
pub fn session_ended(console: &'static str, reason: &'static str) {
    metrics::counter!(SESSIONS_ENDED, "console" => console, "reason" => reason).increment(1);
}

/// Counts a refused session request.
pub fn session_refused(reason: &'static str) {
    metrics::counter!(SESSION_REFUSALS, "reason" => reason).increment(1);
}

/// SPICE link keys rotated.
pub const SPICE_KEY_ROTATIONS: &str = "porthole_spice_link_key_rotations_total";
/// SPICE channel links refused, by reason and blame.
pub const SPICE_LINK_REFUSALS: &str = "porthole_spice_link_refusals_total";
/// SPICE channel links established, by channel type.
pub const SPICE_LINKS: &str = "porthole_spice_links_total";
/// Tickets issued, by console type.
pub const TICKETS_ISSUED: &str = "porthole_tickets_issued_total";

/// Counts a link key rotation.
pub fn spice_key_rotated() {
    metrics::counter!(SPICE_KEY_ROTATIONS).increment(1);
}

/// Counts a refused SPICE channel link.
pub fn spice_link_refused(reason: &'static str, blame: &'static str) {
    metrics::counter!(SPICE_LINK_REFUSALS, "reason" => reason, "blame" => blame).increment(1);
}

/// Client SPICE messages refused before the hypervisor saw them, by why.
pub const SPICE_MESSAGES_REFUSED: &str = "porthole_spice_messages_refused_total";

/// Counts a client SPICE message refused before the hypervisor saw it.
pub fn spice_message_refused(why: &'static str) {
    metrics::counter!(SPICE_MESSAGES_REFUSED, "why" => why).increment(1);
}

/// Messages a view-only client sent that Porthole left out, by protocol
/// and message name.
pub const VIEW_ONLY_DROPPED: &str = "porthole_view_only_dropped_total";
/// Client streams a filter could not frame, ended there, by protocol and why.
pub const CLIENT_STREAMS_REFUSED: &str = "porthole_client_streams_refused_total";

/// Recordings started, by format.
pub const RECORDINGS_STARTED: &str = "porthole_recordings_started_total";
/// Recordings that stopped before their session, by why.
pub const RECORDINGS_STOPPED: &str = "porthole_recordings_stopped_total";

/// Counts a recording started.
pub fn recording_started(format: &'static str) {
    metrics::counter!(RECORDINGS_STARTED, "format" => format).increment(1);
}

/// Counts a recording stopped before its session ended.
pub fn recording_stopped(why: &'static str) {
    metrics::counter!(RECORDINGS_STOPPED, "why" => why).increment(1);
}

/// Counts `n` messages of one type dropped from a view-only client.
pub fn view_only_dropped(protocol: &'static str, message: &'static str, n: u64) {
    metrics::counter!(VIEW_ONLY_DROPPED, "protocol" => protocol, "message" => message).increment(n);
}

/// Counts a client stream ended at a message its filter could not frame.
pub fn client_stream_refused(protocol: &'static str, why: &'static str) {
    metrics::counter!(CLIENT_STREAMS_REFUSED, "protocol" => protocol, "why" => why).increment(1);
}

/// Counts an established SPICE channel link.
pub fn spice_linked(channel: &'static str) {
    metrics::counter!(SPICE_LINKS, "channel" => channel).increment(1);
}

/// SPICE display channels drained after their client left, by how the drain ended.
pub const SPICE_DRAINS: &str = "porthole_spice_display_drains_total";
/// SPICE display channel drains running now.
pub const SPICE_DRAINS_ACTIVE: &str = "porthole_spice_display_drains_active";

/// Counts a finished display drain (`end`: how it ended, or why there was none).
pub fn spice_drain_ended(end: &'static str) {
    metrics::counter!(SPICE_DRAINS, "end" => end).increment(1);
}

/// Moves the running-drains gauge by `delta`.
pub fn spice_drains_active(delta: i64) {
    metrics::gauge!(SPICE_DRAINS_ACTIVE).increment(delta as f64);
}

/// Counts an issued ticket.
pub fn ticket_issued(console: &'static str) {
    metrics::counter!(TICKETS_ISSUED, "console" => console).increment(1);
}

/// Console handshakes that failed, by protocol, reason and blame.
pub const HANDSHAKE_FAILURES: &str = "porthole_handshake_failures_total";

/// Counts a failed console handshake.
pub fn handshake_failed(protocol: &'static str, reason: &'static str, blame: &'static str) {
    metrics::counter!(HANDSHAKE_FAILURES, "protocol" => protocol, "reason" => reason, "blame" => blame).increment(1);
}

/// Sessions live now, by console type.
pub const SESSIONS_ACTIVE: &str = "porthole_sessions_active";

/// Moves the live-session gauge of `console` by `delta`.
pub fn sessions_active(console: &'static str, delta: i64) {
    metrics::gauge!(SESSIONS_ACTIVE, "console" => console).increment(delta as f64);
}

/// Admin actions, by kind.
pub const ADMIN_ACTIONS: &str = "porthole_admin_actions_total";
/// Audit events that could not be written.
pub const AUDIT_DROPPED: &str = "porthole_audit_events_dropped_total";

/// Counts an admin action.
pub fn admin_action(kind: &'static str) {
    metrics::counter!(ADMIN_ACTIONS, "action" => kind).increment(1);
}

/// Counts a dropped audit event.
pub fn audit_dropped() {
    metrics::counter!(AUDIT_DROPPED).increment(1);
}

/// Limits hit, by limit.
pub const LIMITS_HIT: &str = "porthole_limits_hit_total";

/// Whether the shared store answers (1) or not (0).
pub const STORE_UP: &str = "porthole_store_up";
/// Store operations that failed (refused as `unavailable`).
pub const STORE_UNAVAILABLE: &str = "porthole_store_unavailable_total";

/// Records whether the shared store answered.
pub fn store_up(up: bool) {
    metrics::gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
}

/// Counts a store operation that failed.
pub fn store_unavailable() {
    metrics::counter!(STORE_UNAVAILABLE).increment(1);
}

/// Failed accepts (out of descriptors, say).
pub const ACCEPT_FAILURES: &str = "porthole_accept_failures_total";

/// Counts a failed accept.
pub fn accept_failed() {
    metrics::counter!(ACCEPT_FAILURES).increment(1);
}

/// Counts a limit hit (`max_sessions`, `per_client`, `per_token`,
/// `pending_per_address`, `failed_tickets`; the gates' labels are in
/// `transport::gate`).
pub fn limit_hit(limit: &'static str) {
    metrics::counter!(LIMITS_HIT, "limit" => limit).increment(1);
}

/// Bytes relayed, by console type and direction (`up`: client to hypervisor).
pub const BYTES_RELAYED: &str = "porthole_bytes_relayed_total";
/// Seconds to connect to a hypervisor.
pub const CONNECT_SECONDS: &str = "porthole_connect_seconds";
/// Seconds a console handshake (RFB, SPICE link) took, by protocol.
pub const HANDSHAKE_SECONDS: &str = "porthole_handshake_seconds";

/// Adds a finished connection's bytes.
pub fn bytes_relayed(console: &'static str, up: u64, down: u64) {
    metrics::counter!(BYTES_RELAYED, "console" => console, "direction" => "up").increment(up);
    metrics::counter!(BYTES_RELAYED, "console" => console, "direction" => "down").increment(down);
}

/// Records a hypervisor connect time.
pub fn connect_took(secs: f64) {
    metrics::histogram!(CONNECT_SECONDS).record(secs);
}

/// Records a successful handshake's time.
pub fn handshake_took(protocol: &'static str, secs: f64) {
    metrics::histogram!(HANDSHAKE_SECONDS, "protocol" => protocol).record(secs);
}

/// Nova console-token lookups, by outcome (`found`, `not_found`, `cached`,
/// `keystone_failed`, `nova_failed`, `policy`, `microversion`, `timeout`;
/// refused before asking: `busy`, `budget_spent`).
pub const NOVA_LOOKUPS: &str = "porthole_nova_lookups_total";
/// Whether the last lookup that asked got an answer from Keystone and
/// Nova (1) or not (0); absent until one asked.
pub const NOVA_UP: &str = "porthole_nova_up";

/// Records whether Keystone and Nova answered a lookup.
pub fn nova_up(up: bool) {
    metrics::gauge!(NOVA_UP).set(if up { 1.0 } else { 0.0 });
}
/// Seconds a Nova lookup took (Keystone included when it authenticated).
pub const NOVA_LOOKUP_SECONDS: &str = "porthole_nova_lookup_seconds";
/// Keystone authentications, by outcome (`ok`, `failed`).
pub const KEYSTONE_AUTHS: &str = "porthole_keystone_auths_total";

/// Counts a Nova lookup, and records its time when it asked Nova.
pub fn nova_lookup(outcome: &'static str, secs: Option<f64>) {
    metrics::counter!(NOVA_LOOKUPS, "outcome" => outcome).increment(1);
    if let Some(secs) = secs {
        metrics::histogram!(NOVA_LOOKUP_SECONDS).record(secs);
    }
}

/// Counts a Keystone authentication.
pub fn keystone_auth(outcome: &'static str) {
    metrics::counter!(KEYSTONE_AUTHS, "outcome" => outcome).increment(1);
}
