//! Recording off and on, side by side in one run: the tool's own Porthole
//! and a second Porthole with the same config plus `[recording]` on its
//! backend network (every `/vnc` session written as FBS by its writer task)
//! and an `[audit]` file. Throughput both ways and Porthole's CPU per GB,
//! runs interleaved as everywhere in the tool; then what the recordings
//! hold against what was relayed, and whether any stopped
//! (`recording_stopped`: the writer fell behind, the cap, the disk).
//!
//! The recordings go to a folder under Cargo's target tmp dir (the disk a
//! deployment's folder would be on here, not a tmpfs). After each recorded
//! run, once the measurement is over, the tool waits for every session's
//! `recording_finished` (written out and synced), reads the files' block
//! headers and removes them, so a full run never holds more than one run's
//! recordings (a few GB).

use std::io::{Read as _, Seek as _};
use std::path::Path;

use super::*;

/// One recording's cap: above anything a run writes, so only the writer
/// falling behind (or the disk) can stop a recording.
const MAX_BYTES: u64 = 1 << 40;

/// How long the recordings of one run may take to be written and synced.
const SETTLE: Duration = Duration::from_secs(300);

/// The recorded Porthole's folder and audit trail, and what its runs held.
pub(super) struct Recorded {
    pub(super) public: SocketAddr,
    folder: tempfile::TempDir,
    audit: PathBuf,
    /// How far the audit trail has been read, and the tally since the last take.
    state: std::sync::Mutex<(u64, Tally)>,
}

/// What the recorded sessions of some runs held.
#[derive(Default, Clone)]
pub(super) struct Tally {
    recordings: usize,
    complete: usize,
    /// `bytes_down` of their `session_ended` events.
    relayed_down: u64,
    /// The server's bytes in the files (block data, less the two blocks of
    /// the RFB 3.3 greeting every file starts with).
    payload: u64,
    /// The files' sizes (`bytes` of `recording_finished`).
    files: u64,
    /// `recording_stopped` reasons.
    stopped: Vec<String>,
}

impl Recorded {
    /// Writes the recorded Porthole's config (`dir/recording.toml`).
    pub(super) fn configure(dir: &Path) -> Self {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&root).unwrap();
        let folder = tempfile::Builder::new()
            .prefix("load-recordings-")
            .tempdir_in(&root)
            .unwrap();
        let audit = dir.join("recording-audit.jsonl");
        let extra = format!(
            "[recording]\nfolder = \"{}\"\nbackends = [\"load\"]\nmax_bytes = {MAX_BYTES}\n\
             keep_days = 0\nmax_total_bytes = 0\n\n[audit]\npath = \"{}\"\n",
            folder.path().display(),
            audit.display()
        );
        let (public, _admin) = write_porthole_config(dir, "recording", &extra);
        Recorded {
            public,
            folder,
            audit,
            state: Default::default(),
        }
    }

    /// Waits for the ends of the last run's `sessions` sessions and their
    /// recordings, tallies them and removes the files.
    pub(super) async fn settle(&self, sessions: usize) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let from = self.state.lock().unwrap().0;
            let (lines, read) = new_lines(&self.audit, from);
            let count = |name: &str| lines.iter().filter(|e| e["event"] == name).count();
            if count("recording_finished") >= sessions && count("session_ended") >= sessions {
                let mut state = self.state.lock().unwrap();
                state.0 = from + read;
                for e in &lines {
                    tally(&mut state.1, e);
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sessions} recordings not finished within {SETTLE:?} (audit trail {}, folder {})",
                self.audit.display(),
                self.folder.path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the runs since the last take held.
    pub(super) fn take(&self) -> Tally {
        std::mem::take(&mut self.state.lock().unwrap().1)
    }
}

/// The whole lines of `path` from byte `from`, parsed, and the bytes they took.
fn new_lines(path: &Path, from: u64) -> (Vec<serde_json::Value>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let mut text = String::new();
    f.seek(std::io::SeekFrom::Start(from)).unwrap();
    f.read_to_string(&mut text).unwrap();
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    let lines = text[..whole]
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line"))
        .collect();
    (lines, whole as u64)
}

fn tally(t: &mut Tally, e: &serde_json::Value) {
    match e["event"].as_str() {
        Some("session_ended") => t.relayed_down += e["bytes_down"].as_u64().unwrap_or(0),
        Some("recording_stopped") => t.stopped.push(e["why"].as_str().unwrap_or("?").to_string()),
        Some("recording_finished") => {
            t.recordings += 1;
            t.complete += usize::from(e["complete"] == true);
            t.files += e["bytes"].as_u64().unwrap_or(0);
            let path = PathBuf::from(e["path"].as_str().expect("a recording's path"));
            t.payload += fbs_payload(&path);
            std::fs::remove_file(&path).expect("remove a recording");
        }
        _ => {}
    }
}

/// The server's bytes an FBS file holds: its blocks' data, less the RFB 3.3
/// greeting it starts with (12 + 4 bytes). Reads the block headers only.
fn fbs_payload(path: &Path) -> u64 {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).expect("a recording"));
    let mut magic = [0u8; 12];
    f.read_exact(&mut magic).expect("an FBS header");
    assert_eq!(&magic, b"FBS 001.000\n", "{}", path.display());
    let mut data = 0u64;
    let mut len = [0u8; 4];
    while f.read_exact(&mut len).is_ok() {
        let n = u64::from(u32::from_be_bytes(len));
        data += n;
        f.seek_relative((n.div_ceil(4) * 4 + 4) as i64)
            .expect("seek past a block");
    }
    data.saturating_sub(16)
}

/// Porthole with recording off and on, then what the recordings hold.
pub(super) async fn compare(s: &Arc<Setup>, full: bool) {
    let (secs, repeats) = if full { (3.0, 3) } else { (0.3, 1) };
    let targets = [Target::Porthole, Target::PortholeRecording];
    super::throughput_table("recording off and on", repeats, &targets);
    let grid: Vec<(bool, usize, usize)> = if full {
        [true, false]
            .into_iter()
            .flat_map(|d| {
                [1, 16]
                    .into_iter()
                    .flat_map(move |c| [4096, 65536].into_iter().map(move |f| (d, c, f)))
            })
            .collect()
    } else {
        vec![(true, 1, 65536), (false, 1, 4096)]
    };
    let mut held = Vec::new();
    for row in grid {
        throughput_rows(s, &targets, vec![row], secs, repeats).await;
        held.push((row, s.recorded.take()));
    }

    println!(
        "\n## what the recordings hold (the recorded runs of each row; only the server's side is recorded)"
    );
    println!(
        "| direction | clients | frame | recordings | complete | relayed down (MB) | recorded (MB) | recorded / relayed | files (MB) | stopped |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (mut all, mut complete) = (0, 0);
    for ((down, clients, frame), t) in held {
        all += t.recordings;
        complete += t.complete;
        let mut why: Vec<(String, usize)> = Vec::new();
        for w in t.stopped {
            match why.iter_mut().find(|(x, _)| *x == w) {
                Some((_, n)) => *n += 1,
                None => why.push((w, 1)),
            }
        }
        let stopped = if why.is_empty() {
            "none".to_string()
        } else {
            why.iter()
                .map(|(w, n)| format!("{n}× {w}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        println!(
            "| {} | {clients} | {} KiB | {} | {} | {:.1} | {:.1} | {:.4} | {:.1} | {stopped} |",
            if down { "down" } else { "up" },
            frame / 1024,
            t.recordings,
            t.complete,
            t.relayed_down as f64 / 1e6,
            t.payload as f64 / 1e6,
            t.payload as f64 / (t.relayed_down.max(1)) as f64,
            t.files as f64 / 1e6,
        );
    }
    println!("\nrecordings complete: {complete} of {all}");
}
