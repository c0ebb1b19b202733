//! Porthole as the client of a hypervisor's VNC server, up to and including
//! its SecurityResult.
//!
//! The scheme is the first of the configured preferences that the server
//! offers: VeNCrypt X509Vnc / X509None (TLS, the server's certificate checked
//! by the caller), VNC authentication, or None. The anonymous-TLS VeNCrypt
//! subtypes are never chosen: they authenticate nobody.

use super::{
    Inbox, MAX_REASON, RfbFailure, VERSION_3_8, parse_version, printable, security, vencrypt,
    vnc_auth,
};

/// A way of authenticating to a hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// No authentication.
    None,
    /// VNC authentication with the backend's password.
    VncPassword,
    /// VeNCrypt X509None: TLS with the server's certificate.
    X509None,
    /// VeNCrypt X509Vnc: TLS, then VNC authentication.
    X509Vnc,
}

impl UpstreamAuth {
    /// Parses a configuration name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "vnc" => Self::VncPassword,
            "x509-none" => Self::X509None,
            "x509-vnc" => Self::X509Vnc,
            _ => return None,
        })
    }

    fn security_type(self) -> u8 {
        match self {
            Self::None => security::NONE,
            Self::VncPassword => security::VNC_AUTH,
            Self::X509None | Self::X509Vnc => security::VENCRYPT,
        }
    }

    fn subtype(self) -> Option<u32> {
        match self {
            Self::X509None => Some(vencrypt::X509_NONE),
            Self::X509Vnc => Some(vencrypt::X509_VNC),
            _ => None,
        }
    }
}

/// What the hypervisor leg has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamStep {
    /// Start TLS now; feed the bytes from inside it from here on.
    StartTls,
    /// The server accepted (SecurityResult OK): relay OK to the client,
    /// then ClientInit.
    Authenticated(UpstreamAuth),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Version,
    Types,
    VeVersion,
    VeStatus,
    Subtypes,
    Accept,
    /// Waiting for the caller to finish the TLS handshake.
    Tls,
    Challenge,
    Result,
    Done,
}

/// The hypervisor leg of one VNC session.
#[derive(Debug)]
pub struct Upstream {
    state: State,
    inbox: Inbox,
    out: Vec<u8>,
    prefs: Vec<UpstreamAuth>,
    password: Vec<u8>,
    chosen: Option<UpstreamAuth>,
}

impl Upstream {
    /// A leg that will use the first of `prefs` the server offers, with
    /// `password` for VNC authentication.
    pub fn new(prefs: Vec<UpstreamAuth>, password: &[u8]) -> Self {
        Self {
            state: State::Version,
            inbox: Inbox::default(),
            out: Vec::new(),
            prefs,
            password: password.to_vec(),
            chosen: None,
        }
    }

    /// Bytes received from the hypervisor.
    pub fn feed(&mut self, data: &[u8]) {
        self.inbox.feed(data);
    }

    /// Bytes to send to the hypervisor now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The caller finished the TLS handshake.
    pub fn tls_started(&mut self) {
        debug_assert_eq!(self.state, State::Tls);
        self.state = match self.chosen {
            Some(UpstreamAuth::X509Vnc) => State::Challenge,
            _ => State::Result,
        };
    }

    /// Whatever the server sent past the SecurityResult.
    pub fn into_leftover(self) -> Vec<u8> {
        self.inbox.into_inner()
    }

    /// Advances as far as the received bytes allow.
    pub fn poll(&mut self) -> Result<Option<UpstreamStep>, RfbFailure> {
        loop {
            match self.state {
                State::Version => {
                    let Some(v) = self.inbox.take(12) else {
                        return Ok(None);
                    };
                    let v: [u8; 12] = v.try_into().expect("12 bytes");
                    match parse_version(&v) {
                        Some((3, minor)) if minor >= 8 => {}
                        Some(_) => {
                            return Err(RfbFailure::new("version_unsupported", printable(&v)));
                        }
                        None => return Err(RfbFailure::new("not_rfb", printable(&v))),
                    }
                    self.out.extend_from_slice(VERSION_3_8);
                    self.state = State::Types;
                }
                State::Types => {
                    let Some(&[n]) = self.inbox.peek(1) else {
                        return Ok(None);
                    };
                    if n == 0 {
                        // The server refuses us, with a reason.
                        let mut rest = Inbox::default();
                        rest.feed(&self.inbox.buf[1..]);
                        let Some(reason) = rest
                            .counted(MAX_REASON, "failure reason")
                            .map_err(RfbFailure::wire)?
                        else {
                            return Ok(None);
                        };
                        return Err(RfbFailure::new("hypervisor_refused", printable(&reason)));
                    }
                    let Some(list) = self.inbox.take(1 + n as usize) else {
                        return Ok(None);
                    };
                    let offered = &list[1..];
                    let Some(choice) = self
                        .prefs
                        .iter()
                        .copied()
                        .find(|p| offered.contains(&p.security_type()))
                    else {
                        return Err(RfbFailure::new(
                            "no_acceptable_auth",
                            format!("the hypervisor offers security types {offered:?}"),
                        ));
                    };
                    self.out.push(choice.security_type());
                    self.chosen = Some(choice);
                    self.state = match choice {
                        UpstreamAuth::None => State::Result,
                        UpstreamAuth::VncPassword => State::Challenge,
                        UpstreamAuth::X509None | UpstreamAuth::X509Vnc => State::VeVersion,
                    };
                }
                State::VeVersion => {
                    let Some(v) = self.inbox.take(2) else {
                        return Ok(None);
                    };
                    if v != [0, 2] {
                        return Err(RfbFailure::new(
                            "vencrypt_version",
                            format!("VeNCrypt {}.{}", v[0], v[1]),
                        ));
                    }
                    self.out.extend_from_slice(&[0, 2]);
                    self.state = State::VeStatus;
                }
                State::VeStatus => {
                    let Some(status) = self.inbox.u8() else {
                        return Ok(None);
                    };
                    if status != 0 {
                        return Err(RfbFailure::new("vencrypt_refused", "version 0.2 refused"));
                    }
                    self.state = State::Subtypes;
                }
                State::Subtypes => {
                    let Some(&[m]) = self.inbox.peek(1) else {
                        return Ok(None);
                    };
                    let Some(list) = self.inbox.take(1 + 4 * m as usize) else {
                        return Ok(None);
                    };
                    let offered: Vec<u32> = list[1..]
                        .chunks_exact(4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    // The first preference whose subtype is offered; X509 only.
                    let Some(choice) = self
                        .prefs
                        .iter()
                        .copied()
                        .find(|p| p.subtype().is_some_and(|s| offered.contains(&s)))
                    else {
                        return Err(RfbFailure::new(
                            "no_acceptable_auth",
                            format!("the hypervisor offers VeNCrypt subtypes {offered:?}"),
                        ));
                    };
                    self.chosen = Some(choice);
                    let subtype = choice.subtype().expect("an X509 subtype");
                    self.out.extend_from_slice(&subtype.to_be_bytes());
                    self.state = State::Accept;
                }
                State::Accept => {
                    let Some(accepted) = self.inbox.u8() else {
                        return Ok(None);
                    };
                    if accepted != 1 {
                        return Err(RfbFailure::new("vencrypt_refused", "subtype refused"));
                    }
                    if !self.inbox.is_empty() {
                        return Err(RfbFailure::new(
                            "malformed_handshake",
                            "bytes in clear before the TLS handshake",
                        ));
                    }
                    self.state = State::Tls;
                    return Ok(Some(UpstreamStep::StartTls));
                }
                State::Tls => return Ok(None),
                State::Challenge => {
                    let Some(c) = self.inbox.take(16) else {
                        return Ok(None);
                    };
                    let challenge: [u8; 16] = c.try_into().expect("16 bytes");
                    self.out
                        .extend_from_slice(&vnc_auth::response(&self.password, &challenge));
                    self.state = State::Result;
                }
                State::Result => {
                    let Some(head) = self.inbox.peek(4) else {
                        return Ok(None);
                    };
                    let result = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                    if result == 0 {
                        self.inbox.take(4);
                        self.state = State::Done;
                        let chosen = self.chosen.expect("chosen before the result");
                        return Ok(Some(UpstreamStep::Authenticated(chosen)));
                    }
                    let mut rest = Inbox::default();
                    rest.feed(&self.inbox.buf[4..]);
                    let Some(reason) = rest
                        .counted(MAX_REASON, "failure reason")
                        .map_err(RfbFailure::wire)?
                    else {
                        return Ok(None);
                    };
                    return Err(RfbFailure::new(
                        "hypervisor_auth_failed",
                        printable(&reason),
                    ));
                }
                State::Done => return Ok(None),
            }
        }
    }
}

/// Fuzzing entry point: arbitrary hypervisor bytes against every preference
/// order. Must never panic.
pub fn fuzz_upstream(data: &[u8]) {
    let prefs = [
        vec![
            UpstreamAuth::X509Vnc,
            UpstreamAuth::X509None,
            UpstreamAuth::VncPassword,
            UpstreamAuth::None,
        ],
        vec![UpstreamAuth::None],
        vec![UpstreamAuth::VncPassword],
    ];
    let pick = data.first().map_or(0, |b| *b as usize % prefs.len());
    let mut up = Upstream::new(prefs[pick].clone(), b"secret");
    for chunk in data.chunks(3) {
        up.feed(chunk);
        match up.poll() {
            Ok(Some(UpstreamStep::StartTls)) => up.tls_started(),
            Ok(Some(UpstreamStep::Authenticated(_))) | Err(_) => return,
            Ok(None) => {}
        }
        let _ = up.take_output();
    }
}

impl crate::protocol::Machine for Upstream {
    type Step = UpstreamStep;
    type Failure = RfbFailure;

    fn feed(&mut self, data: &[u8]) {
        Upstream::feed(self, data);
    }

    fn poll(&mut self) -> Result<Option<UpstreamStep>, RfbFailure> {
        Upstream::poll(self)
    }

    fn take_output(&mut self) -> Vec<u8> {
        Upstream::take_output(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    #[derive(Debug, PartialEq)]
    struct Run {
        steps: Vec<UpstreamStep>,
        sent: Vec<u8>,
        leftover: Vec<u8>,
    }

    /// Feeds `server` cut at `cuts`; a `|` in the transcript (split out by
    /// `run`) marks where TLS starts: bytes after it come from inside TLS.
    fn run_in(prefs: &[UpstreamAuth], server: &[&[u8]], cuts: &[usize]) -> Result<Run, RfbFailure> {
        let mut up = Upstream::new(prefs.to_vec(), b"labvnc12");
        let mut steps = Vec::new();
        let mut sent = Vec::new();
        for chunk in server.iter().flat_map(|part| chunks(part, cuts)) {
            up.feed(chunk);
            while let Some(step) = up.poll()? {
                if step == UpstreamStep::StartTls {
                    up.tls_started();
                }
                steps.push(step);
            }
            sent.extend(up.take_output());
        }
        Ok(Run {
            steps,
            sent,
            leftover: up.into_leftover(),
        })
    }

    fn run(prefs: &[UpstreamAuth], server: &[u8]) -> Result<Run, RfbFailure> {
        run_parts(prefs, &[server])
    }

    /// Every part in every split (cut points past a part's end are ignored).
    fn run_parts(prefs: &[UpstreamAuth], parts: &[&[u8]]) -> Result<Run, RfbFailure> {
        let whole = run_in(prefs, parts, &[]);
        let longest = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        for cuts in splits(longest) {
            assert_eq!(run_in(prefs, parts, &cuts), whole, "split at {cuts:?}");
        }
        whole
    }

    const ALL: &[UpstreamAuth] = &[
        UpstreamAuth::X509Vnc,
        UpstreamAuth::X509None,
        UpstreamAuth::VncPassword,
        UpstreamAuth::None,
    ];

    #[test]
    fn qemu_with_x509_and_a_password_gets_vencrypt_x509vnc() {
        let clear = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a   # RFB 003.008
            01 13                                 # one security type: VeNCrypt
            00 02                                 # VeNCrypt 0.2
            00                                    # version accepted
            01 00 00 01 05                        # one subtype: X509Vnc (261)
            01                                    # subtype accepted; TLS starts
        ");
        let inside_tls = hex("
            00 11 22 33 44 55 66 77 88 99 aa bb cc dd ee ff   # challenge
            00 00 00 00                           # SecurityResult OK
        ");
        let r = run_parts(ALL, &[&clear, &inside_tls]).unwrap();
        assert_eq!(
            r.steps,
            vec![
                UpstreamStep::StartTls,
                UpstreamStep::Authenticated(UpstreamAuth::X509Vnc)
            ]
        );
        let mut expected = VERSION_3_8.to_vec();
        expected.push(19); // VeNCrypt
        expected.extend([0, 2]); // version 0.2
        expected.extend(261u32.to_be_bytes());
        let challenge: [u8; 16] = hex("00112233445566778899aabbccddeeff").try_into().unwrap();
        expected.extend(vnc_auth::response(b"labvnc12", &challenge));
        assert_eq!(r.sent, expected);
        assert!(r.leftover.is_empty());
    }

    #[test]
    fn plain_vnc_auth_and_none_follow_the_preferences() {
        let server = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a   # RFB 003.008
            02 01 02                              # None and VNC auth offered
            00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00   # challenge
            00 00 00 00                           # OK
        ");
        let r = run(&[UpstreamAuth::VncPassword, UpstreamAuth::None], &server).unwrap();
        assert_eq!(
            r.steps,
            vec![UpstreamStep::Authenticated(UpstreamAuth::VncPassword)]
        );
        assert_eq!(r.sent[12], 2);
        // Preferring None: no challenge comes, the result follows the choice.
        let server = hex("52 46 42 20 30 30 33 2e 30 30 38 0a  02 01 02  00 00 00 00  ff");
        let r = run(&[UpstreamAuth::None, UpstreamAuth::VncPassword], &server).unwrap();
        assert_eq!(
            r.steps,
            vec![UpstreamStep::Authenticated(UpstreamAuth::None)]
        );
        assert_eq!(
            r.leftover,
            vec![0xff],
            "ServerInit bytes are kept for the splice"
        );
    }

    #[test]
    fn anonymous_tls_subtypes_are_never_chosen() {
        let server = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a  01 13  00 02  00
            02 00 00 01 01 00 00 01 02           # TLSNone, TLSVnc only
        ");
        let e = run(ALL, &server).unwrap_err();
        assert_eq!(e.reason, "no_acceptable_auth");
    }

    #[test]
    fn a_wrong_password_reports_the_servers_reason_capped() {
        let server = hex("
            52 46 42 20 30 30 33 2e 30 30 38 0a  01 02
            00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
            00 00 00 01                           # SecurityResult: failed
            00 00 00 0e                           # reason, 14 bytes
            41 75 74 68 65 6e 74 69 63 61 74 69 6f 6e   # Authentication
        ");
        let e = run(&[UpstreamAuth::VncPassword], &server).unwrap_err();
        assert_eq!(
            (e.reason, e.detail.as_str()),
            ("hypervisor_auth_failed", "Authentication")
        );
        // A 4 GiB reason is refused from its length alone.
        let server = hex("52 46 42 20 30 30 33 2e 30 30 38 0a  01 01  00 00 00 01  ff ff ff ff");
        let e = run(&[UpstreamAuth::None], &server).unwrap_err();
        assert_eq!(e.reason, "oversized_message");
        let server = hex("52 46 42 20 30 30 33 2e 30 30 38 0a  00  ff ff ff ff");
        assert_eq!(run(ALL, &server).unwrap_err().reason, "oversized_message");
    }

    #[test]
    fn old_versions_junk_and_unwanted_types_are_refused() {
        assert_eq!(
            run(ALL, b"RFB 003.003\n").unwrap_err().reason,
            "version_unsupported"
        );
        assert_eq!(
            run(ALL, b"SSH-2.0-OpenSSH_9\r\n").unwrap_err().reason,
            "not_rfb"
        );
        let server = hex("52 46 42 20 30 30 33 2e 30 30 38 0a  01 01");
        assert_eq!(
            run(&[UpstreamAuth::VncPassword], &server)
                .unwrap_err()
                .reason,
            "no_acceptable_auth"
        );
        let server = hex("52 46 42 20 30 30 33 2e 30 30 38 0a  00  00 00 00 04 62 75 73 79");
        let e = run(ALL, &server).unwrap_err();
        assert_eq!(
            (e.reason, e.detail.as_str()),
            ("hypervisor_refused", "busy")
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xbeef);
        for len in 0..3000 {
            let mut data: Vec<u8> = b"RFB 003.008\n".to_vec();
            data.truncate(len % 13);
            // Small values hit the type and length branches.
            data.extend((0..len % 200).map(|_| (noise.next() % 24) as u8));
            fuzz_upstream(&data);
        }
    }
}
#[cfg(test)]
mod qemu_none {
    use super::*;
    #[test]
    fn qemu_plain_none() {
        let mut up = Upstream::new(vec![UpstreamAuth::VncPassword, UpstreamAuth::None], b"");
        assert_eq!(up.poll().unwrap(), None);
        up.feed(b"RFB 003.008\n");
        assert_eq!(up.poll().unwrap(), None);
        assert_eq!(up.take_output(), b"RFB 003.008\n");
        up.feed(&[1, 1]);
        assert_eq!(up.poll().unwrap(), None);
        assert_eq!(up.take_output(), vec![1]);
        up.feed(&[0, 0, 0, 0]);
        assert_eq!(
            up.poll().unwrap(),
            Some(UpstreamStep::Authenticated(UpstreamAuth::None))
        );
    }
}
