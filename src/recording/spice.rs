//! SPICE recordings: every channel of a session in one file, each record
//! what one channel's server side sent after its link, with its time. No
//! tool outside Porthole reads SPICE recordings (none exists), so the
//! format is the simplest that replays: docs/recording.md describes it.
//!
//! ```text
//! magic    "PHSPICE 001\n"                       12 bytes
//! record   u32  milliseconds since the session's main channel linked
//!          u8   channel type (1 main, 2 display, 4 cursor, ...)
//!          u8   channel id
//!          u8   kind: 0 linked, 1 server data, 2 closed
//!          u32  length of what follows
//!          ...  linked: one byte, 1 when the channel uses mini headers;
//!               data: the bytes as the client received them; closed: none
//! ```
//!
//! All integers big-endian. The bytes are the channel's messages after the
//! link (the link itself, with its keys and ticket, is never recorded).

/// The file's first bytes.
pub const MAGIC: &[u8; 12] = b"PHSPICE 001\n";

/// What a record says about its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The channel linked; its payload says whether it uses mini headers.
    Linked = 0,
    /// What the server sent on it.
    Data = 1,
    /// The channel closed.
    Closed = 2,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Kind::Linked),
            1 => Some(Kind::Data),
            2 => Some(Kind::Closed),
            _ => None,
        }
    }
}

/// Which channel a record is about: its type and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelOf {
    /// SPICE channel type.
    pub kind: u8,
    /// Channel id.
    pub id: u8,
}

/// One record, as written or read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds since the recording began.
    pub ms: u32,
    /// Its channel.
    pub channel: ChannelOf,
    /// What it says.
    pub kind: Kind,
    /// Its payload.
    pub bytes: Vec<u8>,
}

/// Header bytes before a record's payload.
const RECORD_HEADER: usize = 11;

/// A record's bytes.
pub fn record(ms: u32, channel: ChannelOf, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record_len(payload.len()));
    record_into(&mut out, ms, channel, kind, payload);
    out
}

/// The length of a record of `n` bytes of payload.
pub fn record_len(n: usize) -> usize {
    RECORD_HEADER + n
}

/// Appends a record to `out`.
pub fn record_into(out: &mut Vec<u8>, ms: u32, channel: ChannelOf, kind: Kind, payload: &[u8]) {
    out.extend_from_slice(&ms.to_be_bytes());
    out.extend_from_slice(&[channel.kind, channel.id, kind as u8]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads records from a file's bytes after [`MAGIC`]. A record of an
/// unknown kind ends the file (`Err`); what a length field says is bounded
/// by the file (nothing is held beyond what was fed).
#[derive(Debug, Default)]
pub struct Records {
    buf: Vec<u8>,
}

/// A file that is not a SPICE recording past some point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a SPICE recording: unknown record kind {0}")]
pub struct Malformed(u8);

impl Records {
    /// More of the file.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole record, if it is there.
    pub fn next_record(&mut self) -> Result<Option<Record>, Malformed> {
        let Some(head) = self.buf.get(..RECORD_HEADER) else {
            return Ok(None);
        };
        let ms = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let channel = ChannelOf {
            kind: head[4],
            id: head[5],
        };
        let kind = Kind::from_u8(head[6]).ok_or(Malformed(head[6]))?;
        let len = u32::from_be_bytes([head[7], head[8], head[9], head[10]]) as usize;
        let Some(whole) = RECORD_HEADER.checked_add(len) else {
            return Ok(None);
        };
        if self.buf.len() < whole {
            return Ok(None);
        }
        let bytes = self.buf[RECORD_HEADER..whole].to_vec();
        self.buf.drain(..whole);
        Ok(Some(Record {
            ms,
            channel,
            kind,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISPLAY: ChannelOf = ChannelOf { kind: 2, id: 0 };

    #[test]
    fn records_read_back_whole_in_any_split() {
        // The display channel links with mini headers, sends a 6-byte mini
        // header message (type 0x0066, size 0), and closes.
        let mut body = record(5, DISPLAY, Kind::Linked, &[1]);
        body.extend(record(40, DISPLAY, Kind::Data, &[0x66, 0, 0, 0, 0, 0]));
        body.extend(record(41, DISPLAY, Kind::Closed, &[]));
        let want = vec![
            Record {
                ms: 5,
                channel: DISPLAY,
                kind: Kind::Linked,
                bytes: vec![1],
            },
            Record {
                ms: 40,
                channel: DISPLAY,
                kind: Kind::Data,
                bytes: vec![0x66, 0, 0, 0, 0, 0],
            },
            Record {
                ms: 41,
                channel: DISPLAY,
                kind: Kind::Closed,
                bytes: vec![],
            },
        ];
        for cut in 0..=body.len() {
            let mut r = Records::default();
            let mut got = Vec::new();
            for part in [&body[..cut], &body[cut..]] {
                r.feed(part);
                while let Some(rec) = r.next_record().unwrap() {
                    got.push(rec);
                }
            }
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn an_unknown_kind_is_refused_and_a_huge_length_holds_nothing_more() {
        let mut r = Records::default();
        r.feed(&[0, 0, 0, 0, 2, 0, 9, 0, 0, 0, 0]);
        assert_eq!(r.next_record(), Err(Malformed(9)));
        let mut r = Records::default();
        r.feed(&[0, 0, 0, 0, 2, 0, 1, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(r.next_record(), Ok(None));
    }
}
