//! asciicast v2 (<https://docs.asciinema.org/manual/asciicast/v2/>): a
//! serial console's recording, as the `asciinema` program and the
//! asciinema-player web player read it. One JSON header line, then one
//! `[seconds, "o", text]` event per chunk the console sent.
//!
//! A serial console sends bytes, not text, and a chunk may end inside a
//! UTF-8 sequence: [`Utf8Stream`] carries an unfinished sequence over to the
//! next chunk and writes what is not UTF-8 at all as U+FFFD, so every event
//! is valid JSON and the text plays as the console showed it.

use serde_json::json;

/// The header line (with its newline) of a recording that started at
/// `timestamp` (Unix seconds), for a terminal of 80x24.
pub fn header(timestamp: u64, title: &str) -> Vec<u8> {
    let mut line = json!({
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": timestamp,
        "title": title,
        "env": { "TERM": "xterm-256color" },
    })
    .to_string()
    .into_bytes();
    line.push(b'\n');
    line
}

/// One output event line (with its newline): `text` at `seconds` since the
/// recording started.
pub fn output(seconds: f64, text: &str) -> Vec<u8> {
    let mut line = json!([(seconds * 1e6).round() / 1e6, "o", text])
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

/// An output event line's time (seconds) and text; `None` for any other
/// line (the header, input or marker events, junk).
pub fn parse_output(line: &str) -> Option<(f64, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let [at, kind, text] = v.as_array()?.as_slice() else {
        return None;
    };
    (kind == "o").then_some(())?;
    Some((at.as_f64()?.max(0.0), text.as_str()?.to_string()))
}

/// Console bytes to text, chunk by chunk.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    /// The start of a sequence the last chunk ended in (at most 3 bytes).
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The text of `chunk`, after what the last chunk left unfinished; an
    /// unfinished sequence at its end waits for the next chunk.
    pub fn text(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(chunk);
        let keep = unfinished_tail(&bytes);
        self.pending = bytes.split_off(bytes.len() - keep);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How many bytes at the end of `b` start a UTF-8 sequence that is not
/// complete yet (0 when `b` ends at a character boundary, or in bytes that
/// will never be UTF-8).
fn unfinished_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let byte = b[b.len() - back];
        let len = match byte {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            0x80..=0xbf => continue,
            _ => return 0,
        };
        return if len > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_split_inside_a_character_comes_out_whole_and_junk_as_replacement() {
        // "é" (c3 a9) and "€" (e2 82 ac) cut in every place, then a byte
        // that is never UTF-8.
        let bytes = b"SeaBIOS \xc3\xa9\xe2\x82\xac\xff!";
        for cut in 0..=bytes.len() {
            let mut s = Utf8Stream::default();
            let text = s.text(&bytes[..cut]) + &s.text(&bytes[cut..]);
            assert_eq!(text, "SeaBIOS é€\u{fffd}!", "cut at {cut}");
        }
    }

    #[test]
    fn lines_are_json_as_asciinema_reads_them() {
        let h: serde_json::Value =
            serde_json::from_slice(&header(1_800_000_000, "vm serial")).unwrap();
        assert_eq!(
            (h["version"].as_u64(), h["width"].as_u64()),
            (Some(2), Some(80))
        );
        let e: serde_json::Value =
            serde_json::from_slice(&output(1.25, "a\"\r\n\u{1b}[0m")).unwrap();
        assert_eq!(e, json!([1.25, "o", "a\"\r\n\u{1b}[0m"]));
        let line = String::from_utf8(output(1.25, "é")).unwrap();
        assert_eq!(parse_output(line.trim_end()), Some((1.25, "é".to_string())));
        assert_eq!(parse_output(r#"[1.0, "i", "x"]"#), None);
        assert_eq!(parse_output(r#"{"version": 2}"#), None);
    }
}
