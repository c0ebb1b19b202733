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

/// One channel of a SPICE recording, read as it is played: the file
/// inflated as it is read, the records of the other channels skipped.
#[derive(Debug)]
pub struct ChannelReader {
    file: tokio::fs::File,
    inflated: flate2::write::GzDecoder<Vec<u8>>,
    records: Records,
    buf: Vec<u8>,
    wanted: ChannelOf,
    mini_header: bool,
    /// The recorded channel's link time, once its link record is read.
    linked_at: Option<u32>,
}

impl ChannelReader {
    /// The recording at `path`, for the channel `wanted` linked by a client
    /// with (or without) mini headers. `Err` says why it cannot be played.
    pub async fn open(
        path: &std::path::Path,
        wanted: ChannelOf,
        mini_header: bool,
    ) -> Result<Self, &'static str> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|_| "recording unreadable")?;
        let mut r = Self {
            file,
            inflated: flate2::write::GzDecoder::new(Vec::new()),
            records: Records::default(),
            buf: vec![0u8; 64 * 1024],
            wanted,
            mini_header,
            linked_at: None,
        };
        let mut head = Vec::new();
        while head.len() < MAGIC.len() {
            match r.read_more().await {
                Some(more) => head.extend_from_slice(&more),
                None => break,
            }
        }
        if !head.starts_with(MAGIC) {
            return Err("not a SPICE recording");
        }
        r.records.feed(&head[MAGIC.len()..]);
        Ok(r)
    }

    /// More of the file, inflated; `None` at its end (or where it breaks).
    async fn read_more(&mut self) -> Option<Vec<u8>> {
        use std::io::Write as _;
        use tokio::io::AsyncReadExt as _;
        loop {
            let n = self
                .file
                .read(&mut self.buf)
                .await
                .ok()
                .filter(|n| *n > 0)?;
            self.inflated.write_all(&self.buf[..n]).ok()?;
            // The decoder hands its output on at a flush.
            self.inflated.flush().ok()?;
            let out = std::mem::take(self.inflated.get_mut());
            if !out.is_empty() {
                return Some(out);
            }
        }
    }

    /// What the channel's server side sent next, and when after its link;
    /// `Ok(None)` at the channel's end (its first connection's close, or
    /// the file's end). `Err` when the recording cannot be played to this
    /// client (its framing differs, the file breaks).
    pub async fn next(&mut self) -> Result<Option<(std::time::Duration, Vec<u8>)>, &'static str> {
        loop {
            while let Some(record) = self
                .records
                .next_record()
                .map_err(|_| "a broken record in the recording")?
            {
                if record.channel != self.wanted {
                    continue;
                }
                match (record.kind, self.linked_at) {
                    (Kind::Linked, None) => {
                        if record.bytes.first() != Some(&u8::from(self.mini_header)) {
                            return Err("recorded with other framing");
                        }
                        self.linked_at = Some(record.ms);
                    }
                    (Kind::Data, Some(at)) => {
                        let after = u64::from(record.ms.saturating_sub(at));
                        return Ok(Some((
                            std::time::Duration::from_millis(after),
                            record.bytes,
                        )));
                    }
                    // Its first session's channel ended: a later one with
                    // the same type and id is another connection.
                    (Kind::Closed, Some(_)) => return Ok(None),
                    _ => {}
                }
            }
            match self.read_more().await {
                Some(more) => self.records.feed(&more),
                None => return Ok(None),
            }
        }
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
