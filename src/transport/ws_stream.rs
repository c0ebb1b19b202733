//! A WebSocket seen as a byte stream: binary messages in, bytes out, and
//! each write sent as one binary message.
//!
//! The SPICE link proxy runs over TCP, TLS and (for spice-html5) WebSockets
//! alike; this adapter lets it ignore which. A text message is a protocol
//! error; a close message or the end of the socket is the end of the stream.
//! Pings are answered by tungstenite itself as the stream is read.

use std::io;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _, future};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

/// Turns `socket` into one `AsyncRead + AsyncWrite`.
pub fn byte_stream<S>(socket: WebSocketStream<S>) -> impl AsyncRead + AsyncWrite + Unpin + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = socket.split();
    let incoming = stream
        .take_while(|m| future::ready(!matches!(m, Ok(Message::Close(_)))))
        .filter_map(|m| {
            future::ready(match m {
                Ok(Message::Binary(data)) => Some(Ok::<Bytes, io::Error>(data)),
                Ok(Message::Text(_)) => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "text message on a binary console",
                ))),
                Ok(_) => None,
                Err(e) => Some(Err(io::Error::other(e))),
            })
        });
    let reader = StreamReader::new(Box::pin(incoming));
    let outgoing = sink
        .sink_map_err(io::Error::other)
        .with(|data: Bytes| future::ready(Ok::<_, io::Error>(Message::Binary(data))));
    let writer = SinkWriter::new(CopyToBytes::new(Box::pin(outgoing)));
    tokio::io::join(reader, writer)
}
