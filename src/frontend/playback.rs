//! Playing recordings back in the console pages: `/playback?token=` (the
//! serial page, which sees from its path that it plays a recording) and its
//! socket `/playback/serial?token=`, which sends the recording's output at
//! the speed it was recorded. A playback's token (minted by
//! `POST /v1/recordings/{id}/playback`) names a recording and opens no
//! console: a playback never touches a hypervisor.

use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::public::{origin_allowed, serve_page, switching_protocols, websocket_handshake};
use super::respond::refuse;
use super::state::{PublicState, TokenQuery};
use crate::recording::asciicast;

/// The recording's file a playback's token names, or the refusal's status
/// and code.
fn recording_of(
    s: &PublicState,
    q: &TokenQuery,
) -> Result<std::path::PathBuf, (StatusCode, &'static str)> {
    let Some(token) = q.token() else {
        return Err((StatusCode::UNAUTHORIZED, "refused"));
    };
    let id = s.validator.playback_of(token).map_err(|r| {
        crate::metrics::token_refused(r.reason.as_str());
        tracing::info!(reason = r.reason.as_str(), "playback refused: {}", r.detail);
        (
            StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::FORBIDDEN),
            r.reason.client_code(),
        )
    })?;
    let settings = s.sessions.recording.as_ref();
    settings
        .and_then(|r| r.path_of(&id))
        .ok_or((StatusCode::NOT_FOUND, "unavailable"))
}

/// `GET /playback?token=`: the serial page, playing the recording.
pub async fn page(State(s): State<PublicState>, Query(q): Query<TokenQuery>) -> Response {
    match recording_of(&s, &q) {
        Ok(_) => serve_page(&s, "serial.html", StatusCode::OK, "").await,
        Err((status, code)) => refuse(status, code),
    }
}

/// `GET /playback/serial?token=`: the recording's output over a WebSocket,
/// event by event at its recorded times; closed (1000) at its end.
pub async fn serial(
    State(s): State<PublicState>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    mut request: Request,
) -> Response {
    if let Err(why) = origin_allowed(&headers, &s.listen) {
        return refuse(why.reason().1, "refused");
    }
    let path = match recording_of(&s, &q) {
        Ok(p) => p,
        Err((status, code)) => return refuse(status, code),
    };
    let Some(handshake) = websocket_handshake(&headers) else {
        // The page's preflight: it would play.
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "ok" })),
        )
            .into_response();
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let sessions = s.sessions.clone();
    s.sessions.tracker.spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default().max_message_size(Some(64 * 1024));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        tokio::select! {
            () = play(socket, &path) => {}
            () = sessions.cancel.cancelled() => {}
        }
    });
    switching_protocols(&handshake)
}

/// Sends the recording at `path` over `socket`; returns when it is over,
/// or the client left.
async fn play<S>(socket: WebSocketStream<S>, path: &std::path::Path)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let Ok(file) = tokio::fs::File::open(path).await else {
        let _ = sink.send(close(1011, "recording unreadable")).await;
        return;
    };
    let mut lines = tokio::io::BufReader::new(file).lines();
    let started = tokio::time::Instant::now();
    let playing = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let Some((at, text)) = asciicast::parse_output(&line) else {
                continue;
            };
            tokio::time::sleep_until(started + Duration::from_secs_f64(at)).await;
            if sink.send(Message::binary(text.into_bytes())).await.is_err() {
                return;
            }
        }
        let _ = sink.send(close(1000, "playback ended")).await;
    };
    // Whatever the client sends is not for the recording; its close ends it.
    let listening = async {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                return;
            }
        }
    };
    tokio::select! {
        () = playing => {}
        () = listening => {}
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}
