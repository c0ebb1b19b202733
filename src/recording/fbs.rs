//! FBS 001.000, the de-facto format of RFB session recordings (rfbproxy,
//! vnc2flv, pyvnc2swf, TigerVNC's rfbplayer read it): the magic line, then
//! blocks of `[u32 length][bytes, zero-padded to 4][u32 milliseconds]`, all
//! big-endian, holding what the server sent. The first two blocks are an
//! RFB 3.3 server's greeting (its version, security type None) as those
//! tools expect; the rest is the server's stream from its ServerInit on.

/// The file's first bytes.
pub const MAGIC: &[u8; 12] = b"FBS 001.000\n";

/// The magic and the greeting blocks, at time 0.
pub fn header() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(block(b"RFB 003.003\n", 0));
    out.extend(block(&1u32.to_be_bytes(), 0));
    out
}

/// One block: `data` the server sent at `ms` milliseconds.
pub fn block(data: &[u8], ms: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(block_len(data.len()));
    block_into(&mut out, data, ms);
    out
}

/// The length of the block of `n` bytes of data.
pub fn block_len(n: usize) -> usize {
    8 + n.div_ceil(4) * 4
}

/// Appends the block of `data` at `ms` to `out`.
pub fn block_into(out: &mut Vec<u8>, data: &[u8], ms: u32) {
    let end = out.len() + block_len(data.len()) - 4;
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(end, 0);
    out.extend_from_slice(&ms.to_be_bytes());
}

/// Reads blocks from a file's bytes after [`MAGIC`]: (data, milliseconds).
/// Bounded by the file, whatever a length field says.
#[derive(Debug, Default)]
pub struct Blocks {
    buf: Vec<u8>,
}

impl Blocks {
    /// More of the file.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole block, if it is there.
    pub fn next_block(&mut self) -> Option<(Vec<u8>, u32)> {
        let len = u32::from_be_bytes(self.buf.get(..4)?.try_into().ok()?) as usize;
        let padded = len.div_ceil(4) * 4;
        let whole = 4usize.checked_add(padded)?.checked_add(4)?;
        if self.buf.len() < whole {
            return None;
        }
        let data = self.buf[4..4 + len].to_vec();
        let ms = u32::from_be_bytes(self.buf[4 + padded..whole].try_into().ok()?);
        self.buf.drain(..whole);
        Some((data, ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_read_back_whole_in_any_split() {
        let mut file = header();
        file.extend(block(b"\x00\x00\x00\x01abc", 40));
        file.extend(block(b"", 41));
        let body = &file[MAGIC.len()..];
        for cut in 0..=body.len() {
            let mut r = Blocks::default();
            let mut got = Vec::new();
            for part in [&body[..cut], &body[cut..]] {
                r.feed(part);
                while let Some(b) = r.next_block() {
                    got.push(b);
                }
            }
            assert_eq!(
                got,
                vec![
                    (b"RFB 003.003\n".to_vec(), 0),
                    (vec![0, 0, 0, 1], 0),
                    (b"\x00\x00\x00\x01abc".to_vec(), 40),
                    (vec![], 41),
                ],
                "cut at {cut}"
            );
        }
    }
}
