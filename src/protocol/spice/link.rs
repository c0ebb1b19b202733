//! The SPICE link handshake as a proxy runs it, one channel connection at a
//! time: [`ClientLink`] is Porthole playing the server to a SPICE client,
//! [`ServerLink`] is Porthole playing the client to the hypervisor.
//!
//! Both are sans-IO: the caller feeds received bytes with `feed`, asks `poll`
//! for the next complete step, and sends the bytes the machine hands back.
//! Decisions that need keys, tickets or a network (decrypting the ticket,
//! looking up its grant, connecting upstream) stay with the caller; the
//! machines only know the wire. Anything a peer sends past the handshake
//! stays in the buffer and comes back from `into_leftover`, so the splice
//! that follows loses no byte.
//!
//! Capabilities: Porthole must answer the client before it knows which
//! hypervisor the ticket leads to, so it offers a fixed set per channel
//! ([`offered_caps`]) that spice-server grants too, and forwards the client's
//! own capabilities upstream minus those a proxy must not pass
//! ([`upstream_caps`]). [`framing_agrees`] checks afterwards that both legs
//! ended up with the same data framing.

use super::messages::{
    Caps, LinkError, LinkMess, LinkReply, PUBKEY_LEN, channel, common_cap, display_cap, main_cap,
};
use crate::protocol::WireError;

/// Length of an encrypted SPICE ticket (RSA-1024).
pub const TICKET_CIPHERTEXT_LEN: usize = 128;

/// `SpiceLinkAuthMechanism` values.
const AUTH_MECHANISM_SPICE: u32 = 1;
const AUTH_MECHANISM_SASL: u32 = 2;

/// Why a link handshake failed, and what the peer is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct LinkFailure {
    /// The link error code the peer gets.
    pub code: LinkError,
    /// A stable label for logs and metrics.
    pub reason: &'static str,
    /// What the wire looked like, when a parse failed.
    pub wire: Option<WireError>,
}

impl LinkFailure {
    fn wire(e: WireError) -> Self {
        let code = match &e {
            WireError::Invalid("link magic is not REDQ") => LinkError::InvalidMagic,
            WireError::Invalid("unsupported SPICE major version") => LinkError::VersionMismatch,
            _ => LinkError::InvalidData,
        };
        let reason = match &e {
            WireError::TooLarge { .. } => "oversized_link_message",
            _ if code == LinkError::InvalidMagic => "bad_magic",
            _ if code == LinkError::VersionMismatch => "version_mismatch",
            _ => "malformed_link_message",
        };
        Self {
            code,
            reason,
            wire: Some(e),
        }
    }

    fn new(code: LinkError, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            wire: None,
        }
    }
}

/// What the client has sent, once a step is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Its link message. Answer with [`ClientLink::accept`] or [`ClientLink::refuse`].
    Linked(LinkMess),
    /// Its RSA-encrypted ticket. Answer with [`ClientLink::result`].
    Ticket(Box<[u8; TICKET_CIPHERTEXT_LEN]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitLinkMess,
    /// The message was handed out; the caller has not answered yet.
    AwaitReply,
    AwaitTicket {
        auth_selection: bool,
    },
    AwaitResult,
    Done,
}

/// Porthole as a SPICE server, facing the client on one channel connection.
#[derive(Debug)]
pub struct ClientLink {
    state: ClientState,
    buf: Vec<u8>,
}

impl Default for ClientLink {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientLink {
    /// A connection that has sent nothing yet.
    pub fn new() -> Self {
        Self {
            state: ClientState::AwaitLinkMess,
            buf: Vec::new(),
        }
    }

    /// Bytes received from the client.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete step, `None` while more bytes are needed (or while an
    /// answer from the caller is due).
    pub fn poll(&mut self) -> Result<Option<ClientStep>, LinkFailure> {
        match self.state {
            ClientState::AwaitLinkMess => match LinkMess::decode(&self.buf) {
                Ok((mess, used)) => {
                    self.buf.drain(..used);
                    self.state = ClientState::AwaitReply;
                    Ok(Some(ClientStep::Linked(mess)))
                }
                Err(WireError::Incomplete) => Ok(None),
                Err(e) => Err(LinkFailure::wire(e)),
            },
            ClientState::AwaitTicket { auth_selection } => {
                let mechanism_len = if auth_selection { 4 } else { 0 };
                if auth_selection && self.buf.len() >= 4 {
                    let mechanism =
                        u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    match mechanism {
                        AUTH_MECHANISM_SPICE => {}
                        AUTH_MECHANISM_SASL => {
                            return Err(LinkFailure::new(
                                LinkError::PermissionDenied,
                                "sasl_not_offered",
                            ));
                        }
                        _ => {
                            return Err(LinkFailure::new(
                                LinkError::InvalidData,
                                "unknown_auth_mechanism",
                            ));
                        }
                    }
                }
                let need = mechanism_len + TICKET_CIPHERTEXT_LEN;
                if self.buf.len() < need {
                    return Ok(None);
                }
                let mut ticket = Box::new([0u8; TICKET_CIPHERTEXT_LEN]);
                ticket.copy_from_slice(&self.buf[mechanism_len..need]);
                self.buf.drain(..need);
                self.state = ClientState::AwaitResult;
                Ok(Some(ClientStep::Ticket(ticket)))
            }
            ClientState::AwaitReply | ClientState::AwaitResult | ClientState::Done => Ok(None),
        }
    }

    /// Answers the link message: Porthole's public key for the ticket, and the
    /// capabilities it offers. Returns the bytes to send.
    pub fn accept(&mut self, public_key: &[u8; PUBKEY_LEN], client: &LinkMess) -> Vec<u8> {
        debug_assert_eq!(self.state, ClientState::AwaitReply);
        let offered = offered_caps(client.channel_type);
        // Legacy clients (no AUTH_SELECTION) send the ticket straight away.
        let auth_selection = client.caps.has_common(common_cap::AUTH_SELECTION);
        self.state = ClientState::AwaitTicket { auth_selection };
        LinkReply {
            error: LinkError::Ok as u32,
            public_key: *public_key,
            caps: offered,
        }
        .encode()
    }

    /// The bytes that tell the client the handshake failed with `code`: a
    /// link reply in its error form before Porthole replied, else a link result.
    pub fn refuse(&mut self, code: LinkError) -> Vec<u8> {
        let before_reply = matches!(
            self.state,
            ClientState::AwaitLinkMess | ClientState::AwaitReply
        );
        self.state = ClientState::Done;
        if before_reply {
            LinkReply::failure(code).encode()
        } else {
            (code as u32).to_le_bytes().to_vec()
        }
    }

    /// The link result for the ticket: `Ok` ends the handshake.
    pub fn result(&mut self, code: LinkError) -> Vec<u8> {
        debug_assert_eq!(self.state, ClientState::AwaitResult);
        self.state = ClientState::Done;
        (code as u32).to_le_bytes().to_vec()
    }

    /// Whatever the client sent past the handshake: the start of its data.
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf
    }
}

/// What the hypervisor has sent, once a step is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStep {
    /// Its link reply: encrypt the hypervisor's ticket to `public_key` and
    /// send [`ServerLink::ticket`].
    Replied(Box<LinkReply>),
    /// It refused the link (`NEED_SECURED` means: use the TLS port).
    Refused(u32),
    /// The link result after the ticket; 0 is success.
    Result(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    AwaitReply,
    AwaitTicket,
    AwaitResult,
    Done,
}

/// Porthole as a SPICE client, linking one channel to the hypervisor.
#[derive(Debug)]
pub struct ServerLink {
    state: ServerState,
    buf: Vec<u8>,
    sent: LinkMess,
}

impl ServerLink {
    /// Starts the link with `mess`; returns the machine and the bytes to send.
    pub fn start(mess: LinkMess) -> (Self, Vec<u8>) {
        let bytes = mess.encode();
        (
            Self {
                state: ServerState::AwaitReply,
                buf: Vec::new(),
                sent: mess,
            },
            bytes,
        )
    }

    /// The link message this machine sent.
    pub fn sent(&self) -> &LinkMess {
        &self.sent
    }

    /// Bytes received from the hypervisor.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete step, `None` while more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<ServerStep>, LinkFailure> {
        match self.state {
            ServerState::AwaitReply => match LinkReply::decode(&self.buf) {
                Ok((reply, used)) => {
                    self.buf.drain(..used);
                    if reply.error != LinkError::Ok as u32 {
                        self.state = ServerState::Done;
                        return Ok(Some(ServerStep::Refused(reply.error)));
                    }
                    self.state = ServerState::AwaitTicket;
                    Ok(Some(ServerStep::Replied(Box::new(reply))))
                }
                Err(WireError::Incomplete) => Ok(None),
                Err(e) => Err(LinkFailure::wire(e)),
            },
            ServerState::AwaitResult => {
                if self.buf.len() < 4 {
                    return Ok(None);
                }
                let code = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                self.buf.drain(..4);
                self.state = ServerState::Done;
                Ok(Some(ServerStep::Result(code)))
            }
            ServerState::AwaitTicket | ServerState::Done => Ok(None),
        }
    }

    /// The bytes that authenticate: mechanism (Porthole always selects) and
    /// the encrypted ticket.
    pub fn ticket(&mut self, ciphertext: &[u8; TICKET_CIPHERTEXT_LEN]) -> Vec<u8> {
        debug_assert_eq!(self.state, ServerState::AwaitTicket);
        self.state = ServerState::AwaitResult;
        let mut out = Vec::with_capacity(4 + TICKET_CIPHERTEXT_LEN);
        out.extend_from_slice(&AUTH_MECHANISM_SPICE.to_le_bytes());
        out.extend_from_slice(ciphertext);
        out
    }

    /// Whatever the hypervisor sent past the handshake: the start of its data.
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf
    }
}

impl crate::protocol::Machine for ClientLink {
    type Step = ClientStep;
    type Failure = LinkFailure;

    fn feed(&mut self, data: &[u8]) {
        ClientLink::feed(self, data);
    }

    fn poll(&mut self) -> Result<Option<ClientStep>, LinkFailure> {
        ClientLink::poll(self)
    }
}

impl crate::protocol::Machine for ServerLink {
    type Step = ServerStep;
    type Failure = LinkFailure;

    fn feed(&mut self, data: &[u8]) {
        ServerLink::feed(self, data);
    }

    fn poll(&mut self) -> Result<Option<ServerStep>, LinkFailure> {
        ServerLink::poll(self)
    }
}

/// The capabilities Porthole offers a client on a channel of `channel_type`:
/// what spice-server offers, minus migration (its messages would send the
/// client straight to a hypervisor) and minus SASL (the ticket is Porthole's
/// own credential; SASL would need the hypervisor's).
pub fn offered_caps(channel_type: u8) -> Caps {
    let common = bits(&[
        common_cap::AUTH_SELECTION,
        common_cap::AUTH_SPICE,
        common_cap::MINI_HEADER,
    ]);
    let channel = match channel_type {
        channel::MAIN => bits(&[main_cap::NAME_AND_UUID, main_cap::AGENT_CONNECTED_TOKENS]),
        channel::DISPLAY => bits(&[
            display_cap::SIZED_STREAM,
            display_cap::MONITORS_CONFIG,
            display_cap::COMPOSITE,
            display_cap::A8_SURFACE,
            display_cap::STREAM_REPORT,
            display_cap::PREF_COMPRESSION,
            display_cap::MULTI_CODEC,
            display_cap::CODEC_MJPEG,
            display_cap::PREF_VIDEO_CODEC_TYPE,
        ]),
        // Inputs: KEY_SCANCODE. Playback/record: VOLUME (bit 1 in both).
        channel::INPUTS => bits(&[0]),
        channel::PLAYBACK | channel::RECORD => bits(&[1]),
        _ => Vec::new(),
    };
    Caps { common, channel }
}

/// The client's capabilities as Porthole forwards them upstream: ticket
/// authentication with mechanism selection, never SASL, never migration,
/// never GL_SCANOUT (a local unix-socket feature).
pub fn upstream_caps(client: &LinkMess) -> Caps {
    let mut caps = client.caps.clone();
    caps.clear_common(common_cap::AUTH_SASL);
    set(&mut caps.common, common_cap::AUTH_SELECTION);
    set(&mut caps.common, common_cap::AUTH_SPICE);
    match client.channel_type {
        channel::MAIN => {
            caps.clear_channel(main_cap::SEMI_SEAMLESS_MIGRATE);
            caps.clear_channel(main_cap::SEAMLESS_MIGRATE);
        }
        channel::DISPLAY => caps.clear_channel(display_cap::GL_SCANOUT),
        _ => {}
    }
    caps
}

/// Whether the client leg and the hypervisor leg use the same data framing
/// (mini headers or full ones) after the link. The client's framing was
/// agreed with Porthole's offer; the hypervisor's with what Porthole sent up.
pub fn framing_agrees(client: &LinkMess, sent_up: &LinkMess, reply: &LinkReply) -> bool {
    let client_mini = client.caps.has_common(common_cap::MINI_HEADER);
    let server_mini = sent_up.caps.has_common(common_cap::MINI_HEADER)
        && reply.caps.has_common(common_cap::MINI_HEADER);
    client_mini == server_mini
}

fn bits(list: &[u32]) -> Vec<u32> {
    let mut words = Vec::new();
    for &b in list {
        set(&mut words, b);
    }
    words
}

fn set(words: &mut Vec<u32>, bit: u32) {
    let i = (bit / 32) as usize;
    if words.len() <= i {
        words.resize(i + 1, 0);
    }
    words[i] |= 1 << (bit % 32);
}

/// Fuzzing entry point: arbitrary bytes from a client, then from a server,
/// through both machines. Must never panic.
pub fn fuzz_handshake(data: &[u8]) {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (client_bytes, server_bytes) = data.split_at(split);
    let mut client = ClientLink::new();
    for chunk in client_bytes.chunks(7) {
        client.feed(chunk);
        while let Ok(Some(step)) = client.poll() {
            match step {
                ClientStep::Linked(mess) => {
                    let _ = client.accept(&[0; PUBKEY_LEN], &mess);
                }
                ClientStep::Ticket(_) => {
                    let _ = client.result(LinkError::Ok);
                }
            }
        }
    }
    let mess = LinkMess {
        connection_id: 0,
        channel_type: channel::MAIN,
        channel_id: 0,
        caps: offered_caps(channel::MAIN),
    };
    let (mut server, _) = ServerLink::start(mess);
    for chunk in server_bytes.chunks(5) {
        server.feed(chunk);
        while let Ok(Some(step)) = server.poll() {
            if let ServerStep::Replied(_) = step {
                let _ = server.ticket(&[0; TICKET_CIPHERTEXT_LEN]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    /// spice-gtk linking a display channel of session 0x2a2a2a2a, then its
    /// mechanism and ticket, all in one go.
    const DISPLAY_LINK: &str = "
        52 45 44 51  02 00 00 00  02 00 00 00  1a 00 00 00   # REDQ 2.2, body 26
        2a 2a 2a 2a                                          # connection id: the session
        02 00                                                # display channel 0
        01 00 00 00  01 00 00 00  12 00 00 00                # 1 + 1 cap words at 18
        0b 00 00 00                                          # AUTH_SELECTION|AUTH_SPICE|MINI_HEADER
        80 00 00 00                                          # display: GL_SCANOUT
    ";

    fn ticket_bytes() -> String {
        let mut s = String::from("01 00 00 00 # mechanism: SPICE ticket\n");
        for i in 0..TICKET_CIPHERTEXT_LEN {
            s.push_str(&format!("{:02x} ", i as u8 ^ 0x5a));
        }
        s.push_str("# 128 bytes of RSA-OAEP ciphertext\n");
        s.push_str("ff ff # the client's first data bytes, sent early\n");
        s
    }

    type Outcome = Result<(Vec<ClientStep>, Vec<u8>, Vec<u8>), LinkFailure>;

    /// Drives a `ClientLink` over `bytes` arriving in `cuts`, answering each
    /// step, and returns the steps, the bytes sent back, and the leftover.
    fn run_client_in(bytes: &[u8], cuts: &[usize]) -> Outcome {
        let mut link = ClientLink::new();
        let mut steps = Vec::new();
        let mut sent = Vec::new();
        for chunk in chunks(bytes, cuts) {
            link.feed(chunk);
            while let Some(step) = link.poll()? {
                match &step {
                    ClientStep::Linked(m) => sent.extend(link.accept(&[7; PUBKEY_LEN], m)),
                    ClientStep::Ticket(_) => sent.extend(link.result(LinkError::Ok)),
                }
                steps.push(step);
            }
        }
        Ok((steps, sent, link.into_leftover()))
    }

    /// The same outcome whole, byte by byte and in random splits.
    fn run_client(bytes: &[u8]) -> Outcome {
        let whole = run_client_in(bytes, &[]);
        for cuts in splits(bytes.len()) {
            assert_eq!(run_client_in(bytes, &cuts), whole, "split at {cuts:?}");
        }
        whole
    }

    #[test]
    fn a_client_links_then_sends_its_ticket_and_early_data_is_kept() {
        let mut bytes = hex(DISPLAY_LINK);
        bytes.extend(hex(&ticket_bytes()));
        let (steps, sent, leftover) = run_client(&bytes).expect("a whole handshake");
        let [ClientStep::Linked(mess), ClientStep::Ticket(t)] = &steps[..] else {
            panic!("steps: {steps:?}")
        };
        assert_eq!(mess.connection_id, 0x2a2a_2a2a);
        assert_eq!(mess.channel_type, channel::DISPLAY);
        assert_eq!(t[0], 0x5a);
        assert_eq!(t[127], 127 ^ 0x5a);
        assert_eq!(
            leftover,
            vec![0xff, 0xff],
            "early data is kept for the splice"
        );
        // Porthole's reply, then the 4-byte OK result.
        let (reply, used) = LinkReply::decode(&sent).expect("a link reply");
        assert_eq!(reply.error, 0);
        assert_eq!(reply.public_key, [7; PUBKEY_LEN]);
        assert!(reply.caps.has_common(common_cap::MINI_HEADER));
        assert!(!reply.caps.has_channel(display_cap::GL_SCANOUT));
        assert_eq!(&sent[used..], &[0, 0, 0, 0]);
    }

    #[test]
    fn a_legacy_client_sends_the_ticket_without_a_mechanism() {
        let mut bytes = hex("
            52 45 44 51  02 00 00 00  02 00 00 00  16 00 00 00   # body 22
            00 00 00 00  01 00                                   # new session, main 0
            01 00 00 00  00 00 00 00  12 00 00 00                # 1 common word, no channel words
            08 00 00 00                                          # MINI_HEADER only
        ");
        bytes.extend([0x11; TICKET_CIPHERTEXT_LEN]);
        let (steps, _, leftover) = run_client(&bytes).unwrap();
        assert_eq!(steps[1], ClientStep::Ticket(Box::new([0x11; 128])));
        assert!(leftover.is_empty());
    }

    #[test]
    fn sasl_is_refused_with_permission_denied() {
        let mut bytes = hex(DISPLAY_LINK);
        bytes.extend(hex("02 00 00 00 # mechanism: SASL"));
        let err = run_client(&bytes).unwrap_err();
        assert_eq!(err.code, LinkError::PermissionDenied);
        assert_eq!(err.reason, "sasl_not_offered");
    }

    #[test]
    fn junk_gets_invalid_magic_and_an_oversized_header_invalid_data() {
        let err = run_client(b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(
            (err.code, err.reason),
            (LinkError::InvalidMagic, "bad_magic")
        );
        let err = run_client(&hex("52 45 44 51 02 00 00 00 02 00 00 00 ff ff ff 7f")).unwrap_err();
        assert_eq!(
            (err.code, err.reason),
            (LinkError::InvalidData, "oversized_link_message")
        );
        let err = run_client(&hex("52 45 44 51 03 00 00 00 02 00 00 00 00 00 00 00")).unwrap_err();
        assert_eq!(err.code, LinkError::VersionMismatch);
    }

    #[test]
    fn a_refusal_before_the_reply_is_an_error_form_reply_and_after_it_a_result() {
        let mut link = ClientLink::new();
        let refused = link.refuse(LinkError::NeedSecured);
        let (reply, used) = LinkReply::decode(&refused).unwrap();
        assert_eq!(
            (reply.error, used),
            (LinkError::NeedSecured as u32, refused.len())
        );

        let mut link = ClientLink::new();
        link.feed(&hex(DISPLAY_LINK));
        let Some(ClientStep::Linked(m)) = link.poll().unwrap() else {
            panic!()
        };
        let _ = link.accept(&[0; PUBKEY_LEN], &m);
        assert_eq!(link.refuse(LinkError::PermissionDenied), vec![7, 0, 0, 0]);
    }

    /// spice-server's reply to a main channel link (key shortened to a pattern).
    fn server_reply(error: u32) -> Vec<u8> {
        let mut reply = LinkReply::failure(LinkError::Ok);
        reply.error = error;
        reply.public_key = [0x30; PUBKEY_LEN];
        if error == 0 {
            reply.caps = Caps {
                common: vec![0b1011],
                channel: vec![0b1111],
            };
        }
        reply.encode()
    }

    #[test]
    fn upstream_the_reply_then_the_ticket_then_the_result_and_data_is_kept() {
        let client = LinkMess::decode(&hex(DISPLAY_LINK)).unwrap().0;
        let up = LinkMess {
            caps: upstream_caps(&client),
            ..client.clone()
        };
        assert!(
            !up.caps.has_channel(display_cap::GL_SCANOUT),
            "never forwarded"
        );
        let (mut link, sent) = ServerLink::start(up.clone());
        assert_eq!(LinkMess::decode(&sent).unwrap().0, up);

        let mut bytes = server_reply(0);
        bytes.extend(hex(
            "00 00 00 00  # link result OK\n 06 00 # first data bytes",
        ));
        let mut steps = Vec::new();
        for b in bytes.chunks(3) {
            link.feed(b);
            while let Some(step) = link.poll().unwrap() {
                if let ServerStep::Replied(reply) = &step {
                    assert!(framing_agrees(&client, link.sent(), reply));
                    let out = link.ticket(&[9; TICKET_CIPHERTEXT_LEN]);
                    assert_eq!(&out[..4], &[1, 0, 0, 0], "mechanism: SPICE ticket");
                    assert_eq!(out.len(), 132);
                }
                steps.push(step);
            }
        }
        assert!(matches!(steps[0], ServerStep::Replied(_)));
        assert_eq!(steps[1], ServerStep::Result(0));
        assert_eq!(link.into_leftover(), vec![6, 0]);
    }

    #[test]
    fn upstream_need_secured_is_a_refusal_step() {
        let mess = LinkMess::decode(&hex(DISPLAY_LINK)).unwrap().0;
        let (mut link, _) = ServerLink::start(mess);
        link.feed(&server_reply(LinkError::NeedSecured as u32));
        assert_eq!(
            link.poll().unwrap(),
            Some(ServerStep::Refused(LinkError::NeedSecured as u32))
        );
    }

    #[test]
    fn migration_and_sasl_never_go_upstream() {
        let mut main = LinkMess::decode(&hex("52 45 44 51 02 00 00 00 02 00 00 00 1a 00 00 00
             00 00 00 00 01 00 01 00 00 00 01 00 00 00 12 00 00 00
             0d 00 00 00   # AUTH_SELECTION|AUTH_SASL|MINI_HEADER
             0f 00 00 00   # both migration caps, name/uuid, agent tokens"))
        .unwrap()
        .0;
        main.caps = upstream_caps(&main);
        assert!(!main.caps.has_common(common_cap::AUTH_SASL));
        assert!(main.caps.has_common(common_cap::AUTH_SPICE));
        assert!(!main.caps.has_channel(main_cap::SEMI_SEAMLESS_MIGRATE));
        assert!(!main.caps.has_channel(main_cap::SEAMLESS_MIGRATE));
        assert!(main.caps.has_channel(main_cap::NAME_AND_UUID));
    }

    #[test]
    fn a_hypervisor_without_mini_headers_is_detected() {
        let client = LinkMess::decode(&hex(DISPLAY_LINK)).unwrap().0;
        let mut reply = LinkReply::decode(&server_reply(0)).unwrap().0;
        reply.caps.clear_common(common_cap::MINI_HEADER);
        assert!(!framing_agrees(&client, &client, &reply));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0x1234_5678);
        for len in 0..600 {
            fuzz_handshake(&noise.bytes(len));
        }
        // Valid prefixes with junk after them reach the later states too.
        let mut data = vec![64];
        data.extend(hex(DISPLAY_LINK));
        data.extend([0xee; 200]);
        fuzz_handshake(&data);
    }
}
