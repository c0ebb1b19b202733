//! Porthole as the VNC server a client talks to, up to its ClientInit.
//!
//! Browsers are offered only None: their token already authenticated them
//! before the WebSocket opened. Native clients are offered only VeNCrypt
//! X509Plain: RFB starts in clear, TLS starts once the subtype is accepted,
//! and the "password" inside TLS is a ticket. Never the anonymous TLS
//! subtypes (anonymous Diffie-Hellman: rustls does not do it, and it would
//! hand the ticket to a man in the middle).
//!
//! The SecurityResult the client gets is the hypervisor's: the caller links
//! upstream, then calls [`ClientLeg::security_result`].

use super::{
    Inbox, MAX_CREDENTIAL, RfbFailure, VERSION_3_8, parse_version, printable, security, vencrypt,
};
use crate::secret::Secret;

/// What a client is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOffer {
    /// Security type None (browsers).
    None,
    /// VeNCrypt X509Plain (native clients with a ticket).
    X509Plain,
}

/// What the client leg has reached.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// The client chose None: link upstream, then give the result.
    SecurityChosen,
    /// Start TLS (as server) now; feed the bytes from inside it from here on.
    StartTls,
    /// The client's username and password (a ticket): check them, link
    /// upstream, then give the result.
    Credentials {
        /// The username (Porthole ignores it; gtk-vnc asks for one).
        username: String,
        /// The password: the ticket.
        password: Secret<Vec<u8>>,
    },
    /// The client's ClientInit: whether it wants to share the console.
    ClientInit {
        /// The shared flag as the client sent it.
        shared: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Version,
    Choice,
    VeVersion,
    Subtype,
    Tls,
    Plain,
    AwaitResult,
    ClientInit,
    Done,
}

/// The client leg of one VNC session.
#[derive(Debug)]
pub struct ClientLeg {
    state: State,
    inbox: Inbox,
    out: Vec<u8>,
    offer: ClientOffer,
}

/// What a client is told when anything fails: never why (the log says).
const GENERIC_FAILURE: &[u8] = b"console unavailable";

impl ClientLeg {
    /// A leg that has queued the server's version.
    pub fn new(offer: ClientOffer) -> Self {
        Self {
            state: State::Version,
            inbox: Inbox::default(),
            out: VERSION_3_8.to_vec(),
            offer,
        }
    }

    /// Bytes received from the client.
    pub fn feed(&mut self, data: &[u8]) {
        self.inbox.feed(data);
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The caller finished the TLS handshake.
    pub fn tls_started(&mut self) {
        debug_assert_eq!(self.state, State::Tls);
        self.state = State::Plain;
    }

    /// Queues the SecurityResult: OK, or a generic failure (the reason stays
    /// in Porthole's log). After OK the client sends ClientInit.
    pub fn security_result(&mut self, ok: bool) {
        if ok {
            self.out.extend_from_slice(&0u32.to_be_bytes());
            self.state = State::ClientInit;
        } else {
            self.fail();
        }
    }

    /// Queues the refusal that fits where the handshake is: a failed
    /// SecurityResult once security is under way, else an empty type list
    /// with a reason.
    pub fn fail(&mut self) {
        match self.state {
            State::Version => {
                // Before the client's version: it can still read a type list.
                self.out.push(0);
                self.out
                    .extend_from_slice(&(GENERIC_FAILURE.len() as u32).to_be_bytes());
                self.out.extend_from_slice(GENERIC_FAILURE);
            }
            State::Choice
            | State::AwaitResult
            | State::Plain
            | State::Tls
            | State::Subtype
            | State::VeVersion => {
                self.out.extend_from_slice(&1u32.to_be_bytes());
                self.out
                    .extend_from_slice(&(GENERIC_FAILURE.len() as u32).to_be_bytes());
                self.out.extend_from_slice(GENERIC_FAILURE);
            }
            State::ClientInit | State::Done => {}
        }
        self.state = State::Done;
    }

    /// Whatever the client sent past its ClientInit.
    pub fn into_leftover(self) -> Vec<u8> {
        self.inbox.into_inner()
    }

    /// Advances as far as the received bytes allow.
    pub fn poll(&mut self) -> Result<Option<ClientStep>, RfbFailure> {
        loop {
            match self.state {
                State::Version => {
                    let Some(v) = self.inbox.take(12) else {
                        return Ok(None);
                    };
                    let v: [u8; 12] = v.try_into().expect("12 bytes");
                    match parse_version(&v) {
                        Some((3, 8)) => {}
                        Some(_) => {
                            return Err(RfbFailure::new("version_unsupported", printable(&v)));
                        }
                        None => return Err(RfbFailure::new("not_rfb", printable(&v))),
                    }
                    self.out.push(1);
                    self.out.push(match self.offer {
                        ClientOffer::None => security::NONE,
                        ClientOffer::X509Plain => security::VENCRYPT,
                    });
                    self.state = State::Choice;
                }
                State::Choice => {
                    let Some(choice) = self.inbox.u8() else {
                        return Ok(None);
                    };
                    match (self.offer, choice) {
                        (ClientOffer::None, security::NONE) => {
                            self.state = State::AwaitResult;
                            return Ok(Some(ClientStep::SecurityChosen));
                        }
                        (ClientOffer::X509Plain, security::VENCRYPT) => {
                            self.out.extend_from_slice(&[0, 2]);
                            self.state = State::VeVersion;
                        }
                        // Never accept a type that was not offered (CVE-2006-2369).
                        _ => {
                            return Err(RfbFailure::new(
                                "security_type_not_offered",
                                format!("the client chose type {choice}"),
                            ));
                        }
                    }
                }
                State::VeVersion => {
                    let Some(v) = self.inbox.take(2) else {
                        return Ok(None);
                    };
                    if v != [0, 2] {
                        self.out.push(1); // version refused
                        return Err(RfbFailure::new(
                            "vencrypt_version",
                            format!("VeNCrypt {}.{}", v[0], v[1]),
                        ));
                    }
                    self.out.push(0); // version accepted
                    self.out.push(1);
                    self.out
                        .extend_from_slice(&vencrypt::X509_PLAIN.to_be_bytes());
                    self.state = State::Subtype;
                }
                State::Subtype => {
                    let Some(subtype) = self.inbox.u32() else {
                        return Ok(None);
                    };
                    if subtype != vencrypt::X509_PLAIN {
                        self.out.push(0); // refused
                        return Err(RfbFailure::new(
                            "security_type_not_offered",
                            format!("the client chose VeNCrypt subtype {subtype}"),
                        ));
                    }
                    self.out.push(1); // accepted; TLS starts now
                    if !self.inbox.is_empty() {
                        // Bytes in clear after the subtype would be fed to TLS as if
                        // they came from inside it: a client must wait.
                        return Err(RfbFailure::new(
                            "malformed_handshake",
                            "bytes in clear before the TLS handshake",
                        ));
                    }
                    self.state = State::Tls;
                    return Ok(Some(ClientStep::StartTls));
                }
                State::Tls => return Ok(None),
                State::Plain => {
                    let Some(head) = self.inbox.peek(8) else {
                        return Ok(None);
                    };
                    let ulen = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                    let plen = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                    for (len, what) in [(ulen, "username"), (plen, "password")] {
                        if len > MAX_CREDENTIAL {
                            return Err(RfbFailure::wire(crate::protocol::WireError::TooLarge {
                                what,
                                got: len.into(),
                                max: MAX_CREDENTIAL.into(),
                            }));
                        }
                    }
                    let Some(all) = self.inbox.take(8 + ulen as usize + plen as usize) else {
                        return Ok(None);
                    };
                    let username = printable(&all[8..8 + ulen as usize]);
                    let password = Secret::new(all[8 + ulen as usize..].to_vec());
                    self.state = State::AwaitResult;
                    return Ok(Some(ClientStep::Credentials { username, password }));
                }
                State::AwaitResult => return Ok(None),
                State::ClientInit => {
                    let Some(flag) = self.inbox.u8() else {
                        return Ok(None);
                    };
                    self.state = State::Done;
                    return Ok(Some(ClientStep::ClientInit { shared: flag != 0 }));
                }
                State::Done => return Ok(None),
            }
        }
    }
}

/// Fuzzing entry point: arbitrary client bytes against both offers.
pub fn fuzz_client(data: &[u8]) {
    let offer = if data.first().is_some_and(|b| b & 1 == 1) {
        ClientOffer::X509Plain
    } else {
        ClientOffer::None
    };
    let mut leg = ClientLeg::new(offer);
    for chunk in data.chunks(5) {
        leg.feed(chunk);
        match leg.poll() {
            Ok(Some(ClientStep::StartTls)) => leg.tls_started(),
            Ok(Some(ClientStep::SecurityChosen | ClientStep::Credentials { .. })) => {
                leg.security_result(true)
            }
            Ok(Some(ClientStep::ClientInit { .. })) | Err(_) => return,
            Ok(None) => {}
        }
        let _ = leg.take_output();
    }
}

impl crate::protocol::Machine for ClientLeg {
    type Step = ClientStep;
    type Failure = RfbFailure;

    fn feed(&mut self, data: &[u8]) {
        ClientLeg::feed(self, data);
    }

    fn poll(&mut self) -> Result<Option<ClientStep>, RfbFailure> {
        ClientLeg::poll(self)
    }

    fn take_output(&mut self) -> Vec<u8> {
        ClientLeg::take_output(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    #[derive(Debug, PartialEq)]
    struct Run {
        steps: Vec<String>,
        sent: Vec<u8>,
        leftover: Vec<u8>,
    }

    /// Feeds each part of `client` cut at `cuts`: parts after the first come
    /// from inside TLS.
    fn run_in(offer: ClientOffer, client: &[&[u8]], cuts: &[usize]) -> Result<Run, RfbFailure> {
        let mut leg = ClientLeg::new(offer);
        let mut steps = Vec::new();
        let mut sent = Vec::new();
        for chunk in client.iter().flat_map(|part| chunks(part, cuts)) {
            leg.feed(chunk);
            while let Some(step) = leg.poll()? {
                match &step {
                    ClientStep::StartTls => leg.tls_started(),
                    ClientStep::SecurityChosen => leg.security_result(true),
                    ClientStep::Credentials { password, .. } => {
                        leg.security_result(password.expose() == b"T1cket")
                    }
                    ClientStep::ClientInit { .. } => {}
                }
                steps.push(match step {
                    ClientStep::Credentials { username, password } => {
                        format!(
                            "credentials {username} {}",
                            String::from_utf8_lossy(password.expose())
                        )
                    }
                    other => format!("{other:?}"),
                });
            }
            sent.extend(leg.take_output());
        }
        Ok(Run {
            steps,
            sent,
            leftover: leg.into_leftover(),
        })
    }

    fn run(offer: ClientOffer, client: &[u8]) -> Result<Run, RfbFailure> {
        run_parts(offer, &[client])
    }

    fn run_parts(offer: ClientOffer, parts: &[&[u8]]) -> Result<Run, RfbFailure> {
        let whole = run_in(offer, parts, &[]);
        let longest = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        for cuts in splits(longest) {
            assert_eq!(run_in(offer, parts, &cuts), whole, "split at {cuts:?}");
        }
        whole
    }

    #[test]
    fn novnc_is_offered_none_and_its_client_init_is_read() {
        let client = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a   # RFB 003.008
            01                                    # chooses None
            01                                    # ClientInit: shared
            00 00 00 00 20 18 00 01               # SetPixelFormat, sent early
        ");
        let r = run(ClientOffer::None, &client).unwrap();
        assert_eq!(
            r.steps,
            vec!["SecurityChosen", "ClientInit { shared: true }"]
        );
        let mut expected = VERSION_3_8.to_vec();
        expected.extend([1, 1]); // one type: None
        expected.extend([0, 0, 0, 0]); // the (hypervisor's) SecurityResult: OK
        assert_eq!(r.sent, expected);
        assert_eq!(r.leftover, hex("00 00 00 00 20 18 00 01"));
    }

    #[test]
    fn a_native_client_gets_vencrypt_x509plain_and_sends_its_ticket_inside_tls() {
        let clear = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a   # RFB 003.008
            13                                    # chooses VeNCrypt
            00 02                                 # VeNCrypt 0.2
            00 00 01 06                           # X509Plain (262); TLS starts
        ");
        let inside_tls = hex("
            00 00 00 04  00 00 00 06              # username 4 bytes, password 6
            75 73 65 72  54 31 63 6b 65 74        # user, T1cket
            00                                    # ClientInit: exclusive
        ");
        let r = run_parts(ClientOffer::X509Plain, &[&clear, &inside_tls]).unwrap();
        assert_eq!(
            r.steps,
            vec![
                "StartTls",
                "credentials user T1cket",
                "ClientInit { shared: false }"
            ]
        );
        let mut expected = VERSION_3_8.to_vec();
        expected.extend([1, 19]); // one type: VeNCrypt
        expected.extend([0, 2]); // VeNCrypt 0.2
        expected.extend([0, 1, 0, 0, 1, 6]); // version OK; one subtype: X509Plain
        expected.push(1); // subtype accepted
        expected.extend([0, 0, 0, 0]); // SecurityResult OK
        assert_eq!(r.sent, expected);
    }

    #[test]
    fn types_not_offered_and_anonymous_tls_are_refused() {
        // A browser leg choosing VNC auth, a native leg choosing None.
        let client = hex("52 46 42 20 30 30 33 2e 30 30 38 0a 02");
        assert_eq!(
            run(ClientOffer::None, &client).unwrap_err().reason,
            "security_type_not_offered"
        );
        let client = hex("52 46 42 20 30 30 33 2e 30 30 38 0a 01");
        assert_eq!(
            run(ClientOffer::X509Plain, &client).unwrap_err().reason,
            "security_type_not_offered"
        );
        // TLSPlain (anonymous DH) instead of X509Plain.
        let client = hex("52 46 42 20 30 30 33 2e 30 30 38 0a 13 00 02 00 00 01 03");
        assert_eq!(
            run(ClientOffer::X509Plain, &client).unwrap_err().reason,
            "security_type_not_offered"
        );
    }

    #[test]
    fn oversized_credentials_and_old_versions_are_refused() {
        let clear = hex("52 46 42 20 30 30 33 2e 30 30 38 0a 13 00 02 00 00 01 06");
        let inside = hex("00 00 00 01 7f ff ff ff  # a 2 GiB password");
        assert_eq!(
            run_parts(ClientOffer::X509Plain, &[&clear, &inside])
                .unwrap_err()
                .reason,
            "oversized_message"
        );
        // Bytes sent in clear after the subtype are refused, not taken as TLS.
        let early = hex("52 46 42 20 30 30 33 2e 30 30 38 0a 13 00 02 00 00 01 06 16 03 01");
        assert_eq!(
            run_in(ClientOffer::X509Plain, &[&early], &[])
                .unwrap_err()
                .reason,
            "malformed_handshake"
        );
        assert_eq!(
            run(ClientOffer::None, b"RFB 003.003\n").unwrap_err().reason,
            "version_unsupported"
        );
    }

    #[test]
    fn a_failure_before_the_clients_version_is_an_empty_type_list() {
        let mut leg = ClientLeg::new(ClientOffer::None);
        let _ = leg.take_output();
        leg.fail();
        assert_eq!(
            leg.take_output(),
            hex("00 00 00 00 13")
                .into_iter()
                .chain(*b"console unavailable")
                .collect::<Vec<_>>()
        );
        // After the choice: a failed SecurityResult with the same generic reason.
        let mut leg = ClientLeg::new(ClientOffer::None);
        leg.feed(&hex("52 46 42 20 30 30 33 2e 30 30 38 0a 01"));
        assert_eq!(leg.poll().unwrap(), Some(ClientStep::SecurityChosen));
        let _ = leg.take_output();
        leg.security_result(false);
        let out = leg.take_output();
        assert_eq!(&out[..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xcafe);
        for len in 0..3000 {
            let mut data: Vec<u8> = vec![(len % 2) as u8];
            data.extend_from_slice(&b"RFB 003.008\n"[..len % 13]);
            // Small values hit the type and length branches.
            data.extend((0..len % 150).map(|_| (noise.next() % 24) as u8));
            fuzz_client(&data);
        }
    }
}
