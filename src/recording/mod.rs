//! Recordings of console sessions, for audit.
//!
//! A session that is recorded hands every chunk its console sends to a
//! [`Recorder`]: a bounded queue to a writer task of its own. The relay
//! never waits for the disk: when the queue is full, the file is over its
//! size cap or the disk refuses a write, the recording stops there, and
//! that is audited (`recording_stopped`, with why); the session goes on.
//! At its end the writer audits the file (`recording_finished`: the
//! session, the path, its size and the SHA-256 of its bytes, so a file
//! changed afterwards no longer matches).
//!
//! Files are created `0600` (new, never overwritten) in the configured
//! folder, named by the session id. Serial consoles are recorded as
//! asciicast v2 ([`asciicast`]).

pub mod asciicast;
pub mod fbs;
pub mod spice;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::audit::{AuditEvent, SessionRecord};

/// Chunks a recording may queue before its writer: past them the writer is
/// behind, and the recording stops rather than the session wait.
pub const QUEUE_CHUNKS: usize = 1024;

/// Bytes a recording may queue before its writer, whatever their chunks:
/// past them too the writer is behind (a console's burst, a noVNC first
/// screen of a few MB, fits many times over).
pub const QUEUE_BYTES: usize = 16 << 20;

/// Output that came within this long of an event's first chunk, and is
/// queued when the writer gets to it, goes in that event.
const EVENT_SPAN: std::time::Duration = std::time::Duration::from_millis(10);

/// How a recording is written, by console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Serial consoles: asciicast v2.
    Asciicast,
    /// VNC consoles: FBS 001.000, the server's stream.
    Fbs,
    /// SPICE consoles: every channel's server side ([`spice`]).
    Spice,
}

impl Format {
    /// The file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Asciicast => "cast",
            Format::Fbs => "fbs",
            Format::Spice => "spice.gz",
        }
    }

    /// Its name in the admin API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Format::Asciicast => "asciicast-v2",
            Format::Fbs => "fbs-001",
            Format::Spice => "porthole-spice-001",
        }
    }

    const ALL: [Format; 3] = [Format::Asciicast, Format::Fbs, Format::Spice];
}

/// What to record, and where.
#[derive(Debug, Clone)]
pub struct RecordingSettings {
    /// The folder recordings are written to (`0700`).
    pub folder: PathBuf,
    /// Backend networks (by name) whose sessions are recorded.
    pub backends: Vec<String>,
    /// Backend networks whose sessions must be recorded: one that cannot
    /// be is refused, one whose recording stops is ended.
    pub required: Vec<String>,
    /// The most bytes one recording may take.
    pub max_bytes: u64,
    /// Recordings older than this are removed (`None`: kept).
    pub keep_for: Option<std::time::Duration>,
    /// The most bytes all recordings may take; the oldest go first.
    pub max_total_bytes: Option<u64>,
}

impl RecordingSettings {
    /// Whether a session on backend network `backend` is recorded, and
    /// whether its recording is required: `Some(true)` when its grant asks
    /// for one (`console.record`) or the network is in `required`,
    /// `Some(false)` when the network is in `backends`.
    pub fn wants(&self, backend: &str, grant_asks: bool) -> Option<bool> {
        let named = |list: &[String]| list.iter().any(|b| b == backend);
        if grant_asks || named(&self.required) {
            Some(true)
        } else {
            named(&self.backends).then_some(false)
        }
    }

    /// Starts the recording of session `who` in `format`: its file, created
    /// now, and the writer behind the returned recorder (audited
    /// `recording_started`). `Err` (audited `recording_stopped`) says why
    /// the file cannot be created.
    pub fn start(
        &self,
        format: Format,
        who: &SessionRecord<'_>,
        required: bool,
    ) -> Result<Recorder, String> {
        let session = who.id;
        let path = self
            .folder
            .join(format!("{session}.{}", format.extension()));
        let file = match create_private(&path) {
            Ok(f) => f,
            Err(e) => {
                let why = format!("cannot create the file: {e}");
                stopped(session, &path, &why);
                return Err(why);
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE_CHUNKS);
        let header = match format {
            Format::Asciicast => asciicast::header(
                unix_now(),
                &format!("{} serial console ({session})", who.instance),
            ),
            Format::Fbs => fbs::header(),
            Format::Spice => spice::MAGIC.to_vec(),
        };
        let behind = Arc::new(AtomicBool::new(false));
        AuditEvent::new("recording_started")
            .session(who)
            .field("path", Some(path.display().to_string()))
            .field("format", Some(format.name()))
            .field("required", Some(required))
            .emit();
        let writer = Writer {
            owner: Owner::of(who),
            path,
            max_bytes: self.max_bytes,
            format,
        };
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(writer.run(file, header, rx, behind.clone(), queued.clone()));
        crate::metrics::recording_started(format.name());
        Ok(Recorder {
            tx: Some(tx),
            behind,
            queued,
            required,
            channel: None,
        })
    }
}

/// Whom a recording belongs to, as its `recording_finished` event says.
#[derive(Debug)]
struct Owner {
    session: String,
    console: &'static str,
    instance: String,
    jti: String,
    client: String,
    target: String,
    started: u64,
}

impl Owner {
    fn of(who: &SessionRecord<'_>) -> Self {
        Self {
            session: who.id.to_string(),
            console: who.console,
            instance: who.instance.to_string(),
            jti: who.jti.to_string(),
            client: who.client.to_string(),
            target: who.target.to_string(),
            started: unix_now(),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A recording on this node's disk, as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordingInfo {
    /// Its id: the recorded session's.
    pub id: String,
    /// `asciicast-v2`.
    pub format: &'static str,
    /// Its size.
    pub bytes: u64,
    /// When it was last written (Unix seconds).
    pub modified: u64,
}

impl RecordingSettings {
    /// This node's recordings, newest first.
    pub fn list(&self) -> Vec<RecordingInfo> {
        self.files().into_iter().map(|(_, r)| r).collect()
    }

    /// This node's recordings and their files, newest first.
    fn files(&self) -> Vec<(PathBuf, RecordingInfo)> {
        let Ok(entries) = std::fs::read_dir(&self.folder) else {
            return Vec::new();
        };
        let mut all: Vec<(PathBuf, RecordingInfo)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (id, format) = Format::ALL.iter().find_map(|f| {
                    let id = name.strip_suffix(&format!(".{}", f.extension()))?;
                    is_id(id).then_some((id, *f))
                })?;
                let meta = e.metadata().ok()?;
                let modified = meta
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                let info = RecordingInfo {
                    id: id.to_string(),
                    format: format.name(),
                    bytes: meta.len(),
                    modified,
                };
                Some((e.path(), info))
            })
            .collect();
        all.sort_by(|(_, a), (_, b)| b.modified.cmp(&a.modified).then(a.id.cmp(&b.id)));
        all
    }

    /// The file of recording `id`, and its format, if it is one here.
    pub fn path_of(&self, id: &str) -> Option<(PathBuf, Format)> {
        if !is_id(id) {
            return None;
        }
        Format::ALL.iter().find_map(|f| {
            let path = self.folder.join(format!("{id}.{}", f.extension()));
            path.is_file().then_some((path, *f))
        })
    }
}

impl RecordingSettings {
    /// Removes what retention says must go, as of `now`: recordings older
    /// than `keep_for`, then the oldest until all fit `max_total_bytes`;
    /// never one being written. Each removal is audited.
    pub fn sweep(&self, now: std::time::SystemTime) {
        let mut all = self.files();
        // Those being written count toward the total; they are never removed.
        let mut total: u64 = all.iter().map(|(_, r)| r.bytes).sum();
        all.retain(|(path, _)| !being_written(path));
        // Oldest first.
        all.reverse();
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (path, r) in all {
            let too_old = self
                .keep_for
                .is_some_and(|keep| now.saturating_sub(r.modified) > keep.as_secs());
            let too_much = self.max_total_bytes.is_some_and(|max| total > max);
            let why = match (too_old, too_much) {
                (true, _) => "age",
                (false, true) => "total_size",
                (false, false) => continue,
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total = total.saturating_sub(r.bytes);
                    tracing::info!(recording = %r.id, why, "recording removed by retention");
                    AuditEvent::new("recording_removed")
                        .field("recording", Some(r.id.as_str()))
                        .field("path", Some(path.display().to_string()))
                        .field("why", Some(why))
                        .emit();
                }
                Err(e) => tracing::warn!(recording = %r.id, "retention could not remove it: {e}"),
            }
        }
    }

    /// Sweeps at once and then every minute, until `stop`.
    pub async fn retain(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.sweep(std::time::SystemTime::now())).await;
                }
            }
        }
    }
}

/// Whether `id` can name a recording (a session id): nothing that walks
/// out of the folder.
fn is_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Creates `path` for writing, readable by its owner only; never an
/// existing file. The file stays locked (`flock`, exclusive) while it is
/// written: retention, on this node or another sharing the folder (NFS
/// passes `flock` on as a lock of the whole file), leaves it alone.
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::Error(e) => e,
        std::fs::TryLockError::WouldBlock => io::Error::other("locked by another writer"),
    })?;
    Ok(file)
}

/// Whether a writer holds `path` (its lock); a file that cannot be opened
/// is left alone as well.
fn being_written(path: &Path) -> bool {
    match std::fs::File::open(path) {
        Ok(f) => matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
        Err(_) => true,
    }
}

/// Creates the recordings folder (`0700`) if it is missing.
pub fn prepare_folder(folder: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// A chunk for the writer: when it came, what it was (and, in a SPICE
/// recording, its channel's and what it says).
#[derive(Debug)]
struct Chunk {
    at: Instant,
    bytes: Bytes,
    channel: Option<(spice::ChannelOf, spice::Kind)>,
}

/// The relay's end of a recording.
#[derive(Debug)]
pub struct Recorder {
    /// `None` once the recording stopped.
    tx: Option<mpsc::Sender<Chunk>>,
    /// Set when the queue was full: the writer audits the stop.
    behind: Arc<AtomicBool>,
    /// Bytes queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    /// The session may not go on unrecorded.
    required: bool,
    /// The SPICE channel it records, if it is one's.
    channel: Option<spice::ChannelOf>,
}

/// A required recording stopped: its session must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingLost;

impl Recorder {
    /// Queues what the console sent; never waits. A full queue stops the
    /// recording: the writer writes what it holds and audits the stop.
    /// `Err` when the recording is required and has stopped (full queue,
    /// size cap, disk): the chunk must not reach the client.
    pub fn record(&mut self, chunk: &[u8]) -> Result<(), RecordingLost> {
        let kind = self.channel.map(|c| (c, spice::Kind::Data));
        self.queue(Bytes::copy_from_slice(chunk), kind)
    }

    /// The recorder of one channel of a SPICE session: its records carry
    /// the channel, the first says it linked (and its framing), the last
    /// (when it is dropped) that it closed. `None` once the recording stopped.
    pub fn channel(&self, kind: u8, id: u8, mini_header: bool) -> Option<Recorder> {
        let tx = self.tx.clone().filter(|_| !self.behind.load(Relaxed))?;
        let channel = spice::ChannelOf { kind, id };
        let mut recorder = Recorder {
            tx: Some(tx),
            behind: self.behind.clone(),
            queued: self.queued.clone(),
            required: self.required,
            channel: Some(channel),
        };
        let linked = Bytes::from(vec![u8::from(mini_header)]);
        recorder
            .queue(linked, Some((channel, spice::Kind::Linked)))
            .ok()?;
        recorder.tx.is_some().then_some(recorder)
    }

    /// Whether the session may not go on unrecorded.
    pub fn required(&self) -> bool {
        self.required
    }

    fn queue(
        &mut self,
        bytes: Bytes,
        channel: Option<(spice::ChannelOf, spice::Kind)>,
    ) -> Result<(), RecordingLost> {
        // Another channel's recorder found the queue full: stopped for all.
        if self.behind.load(Relaxed) {
            self.tx = None;
        }
        let Some(tx) = &self.tx else {
            return if self.required {
                Err(RecordingLost)
            } else {
                Ok(())
            };
        };
        let len = bytes.len();
        let item = Chunk {
            at: Instant::now(),
            bytes,
            channel,
        };
        let over = self.queued.fetch_add(len, Relaxed) + len > QUEUE_BYTES;
        let sent = if over {
            Err(mpsc::error::TrySendError::Full(item))
        } else {
            tx.try_send(item)
        };
        if sent.is_err() {
            self.queued.fetch_sub(len, Relaxed);
        }
        match sent {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.behind.store(true, Relaxed);
                crate::metrics::recording_stopped("writer_behind");
                self.tx = None;
            }
            // The writer stopped (cap, disk) and audited why.
            Err(mpsc::error::TrySendError::Closed(_)) => self.tx = None,
        }
        if self.required {
            Err(RecordingLost)
        } else {
            Ok(())
        }
    }
}

impl Drop for Recorder {
    /// A SPICE channel's recorder says that its channel closed.
    fn drop(&mut self) {
        if let Some(channel) = self.channel {
            let _ = self.queue(Bytes::new(), Some((channel, spice::Kind::Closed)));
        }
    }
}

/// The task that writes one recording.
#[derive(Debug)]
struct Writer {
    owner: Owner,
    path: PathBuf,
    max_bytes: u64,
    format: Format,
}

/// The most bytes one of the writer's disk calls takes: what the queue
/// holds when the writer gets to it, up to this, goes in one call (one hop
/// to the blocking pool, one hash update, one `write`).
const BATCH_BYTES: usize = 1 << 20;

/// The file and its hash, handed to the blocking pool for each write.
struct Disk {
    file: std::fs::File,
    hash: Sha256,
    /// Bytes in the file (what `hash` has seen).
    on_disk: u64,
    /// A SPICE recording's gzip stream (flushed at every batch, so that
    /// the file can be read up to its last write).
    gzip: Option<flate2::write::GzEncoder<Vec<u8>>>,
    /// A write failed: the file ends at the last whole write.
    failed: bool,
}

impl Disk {
    fn new(file: std::fs::File, format: Format) -> Self {
        let gzip = (format == Format::Spice)
            .then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        Self {
            file,
            hash: Sha256::new(),
            on_disk: 0,
            gzip,
            failed: false,
        }
    }

    /// Writes `batch` (compressed, for a SPICE recording).
    fn put(&mut self, batch: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        let Some(gzip) = &mut self.gzip else {
            return self.commit(batch);
        };
        gzip.write_all(batch)?;
        gzip.flush()?;
        let compressed = std::mem::take(gzip.get_mut());
        self.commit(&compressed)
    }

    /// Appends `bytes` to the file and the hash. A write the disk refuses
    /// may have put part of them in the file: it is cut back, so that the
    /// file holds exactly what was hashed.
    fn commit(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.hash.update(bytes);
                self.on_disk += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                let _ = self.file.set_len(self.on_disk);
                Err(e)
            }
        }
    }

    /// Ends the gzip stream (unless a write failed), syncs; the file's
    /// hash and size.
    fn finish(mut self) -> (Sha256, u64) {
        if let Some(gzip) = self.gzip.take()
            && !self.failed
            && let Ok(tail) = gzip.finish()
        {
            let _ = self.commit(&tail);
        }
        let _ = self.file.sync_all();
        (self.hash, self.on_disk)
    }
}

impl Writer {
    async fn run(
        self,
        file: std::fs::File,
        header: Vec<u8>,
        mut rx: mpsc::Receiver<Chunk>,
        behind: Arc<AtomicBool>,
        queued: Arc<AtomicUsize>,
    ) {
        let mut disk = Some(Disk::new(file, self.format));
        let mut written = 0u64;
        let mut text = asciicast::Utf8Stream::default();
        let started = Instant::now();
        let mut why_stopped: Option<String> = None;
        let mut next: Option<Chunk> = None;
        // The header always fits: the cap is at least 4096 bytes.
        let mut out = header;
        while why_stopped.is_none() {
            // Wait for output only with nothing to write.
            if out.is_empty() && next.is_none() {
                match rx.recv().await {
                    Some(c) => next = Some(c),
                    None => break,
                }
            }
            while out.len() < BATCH_BYTES {
                let Some(chunk) = next.take().or_else(|| rx.try_recv().ok()) else {
                    break;
                };
                queued.fetch_sub(chunk.bytes.len(), Relaxed);
                let since = chunk.at.saturating_duration_since(started);
                let ms = u32::try_from(since.as_millis()).unwrap_or(u32::MAX);
                // Each record is written straight into the batch.
                let planned = written + out.len() as u64;
                match (self.format, chunk.channel) {
                    (Format::Spice, Some((channel, kind))) => {
                        if !self.fits(
                            planned,
                            spice::record_len(chunk.bytes.len()),
                            &mut why_stopped,
                        ) {
                            break;
                        }
                        spice::record_into(&mut out, ms, channel, kind, &chunk.bytes);
                    }
                    // A session's own recorder is only its channels' template.
                    (Format::Spice, None) => {}
                    (Format::Fbs, _) => {
                        if !self.fits(planned, fbs::block_len(chunk.bytes.len()), &mut why_stopped)
                        {
                            break;
                        }
                        fbs::block_into(&mut out, &chunk.bytes, ms);
                    }
                    (Format::Asciicast, _) => {
                        // A console that writes a character at a time
                        // (SeaBIOS, a kernel at 115200 baud) would cost a
                        // line per character: what is already queued within
                        // one event's span goes in one event.
                        let mut bytes = chunk.bytes.to_vec();
                        while let Ok(more) = rx.try_recv() {
                            if more.at.saturating_duration_since(chunk.at) > EVENT_SPAN {
                                next = Some(more);
                                break;
                            }
                            queued.fetch_sub(more.bytes.len(), Relaxed);
                            bytes.extend_from_slice(&more.bytes);
                        }
                        let line = asciicast::output(since.as_secs_f64(), &text.text(&bytes));
                        if !self.fits(planned, line.len(), &mut why_stopped) {
                            break;
                        }
                        out.extend_from_slice(&line);
                    }
                }
            }
            if !out.is_empty() {
                let batch = std::mem::take(&mut out);
                let n = batch.len() as u64;
                match self.write(&mut disk, batch).await {
                    Ok(()) => written += n,
                    Err(why) => why_stopped = Some(why),
                }
            }
            if let Some(why) = &why_stopped {
                crate::metrics::recording_stopped("cap_or_disk");
                stopped(&self.owner.session, &self.path, why);
            }
        }
        // Nothing more is written; a closed queue tells the relay.
        rx.close();
        if why_stopped.is_none() && behind.load(Relaxed) {
            let why = format!(
                "its writer fell {QUEUE_CHUNKS} chunks or {} MiB behind the console",
                QUEUE_BYTES >> 20
            );
            stopped(&self.owner.session, &self.path, &why);
            why_stopped = Some(why);
        }
        let finished = match disk.take() {
            Some(d) => tokio::task::spawn_blocking(move || d.finish()).await.ok(),
            None => None,
        };
        let (sha256, bytes) = finished.map_or((String::new(), 0), |(h, n)| (hex(&h.finalize()), n));
        tracing::info!(session = %self.owner.session, path = %self.path.display(), bytes, %sha256, "recording finished");
        let o = &self.owner;
        AuditEvent::new("recording_finished")
            .field("session", Some(o.session.as_str()))
            .field("console", Some(o.console))
            .field("instance", Some(o.instance.as_str()))
            .field("jti", Some(o.jti.as_str()))
            .field("client", Some(o.client.as_str()))
            .field("target", Some(o.target.as_str()))
            .field("started", Some(o.started))
            .field("ended", Some(unix_now()))
            .field("path", Some(self.path.display().to_string()))
            .field("format", Some(self.format.name()))
            .field("bytes", Some(bytes))
            .field("sha256", Some(sha256))
            .field("complete", Some(why_stopped.is_none()))
            .emit();
    }

    /// Whether a record of `len` bytes still fits the size cap after
    /// `planned` bytes (written and batched); when it does not, says so in
    /// `why_stopped`.
    fn fits(&self, planned: u64, len: usize, why_stopped: &mut Option<String>) -> bool {
        if planned + len as u64 <= self.max_bytes {
            return true;
        }
        *why_stopped = Some(format!("its size cap ({} bytes)", self.max_bytes));
        false
    }

    /// Hashes and writes `batch` in the blocking pool; the file and hash
    /// come back.
    async fn write(&self, disk: &mut Option<Disk>, batch: Vec<u8>) -> Result<(), String> {
        let Some(mut d) = disk.take() else {
            return Err("its file was lost".into());
        };
        let done = tokio::task::spawn_blocking(move || {
            let r = d.put(&batch);
            (d, r)
        })
        .await;
        match done {
            Ok((d, r)) => {
                *disk = Some(d);
                r.map_err(|e| format!("the disk refused a write: {e}"))
            }
            Err(e) => Err(format!("its writer failed: {e}")),
        }
    }
}

/// Audits a recording that stopped before its session did.
fn stopped(session: &str, path: &Path, why: &str) {
    tracing::warn!(session, path = %path.display(), "recording stopped: {why}");
    AuditEvent::new("recording_stopped")
        .field("session", Some(session))
        .field("path", Some(path.display().to_string()))
        .field("why", Some(why))
        .emit();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_spice_recording_is_a_gzip_stream_readable_up_to_each_write_and_its_hash_is_the_files() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s-1.spice.gz");
        let mut disk = Disk::new(create_private(&path).unwrap(), Format::Spice);
        let first = [spice::MAGIC.as_slice(), &[0; 4096]].concat();
        disk.put(&first).unwrap();
        // Flushed at each write: what is on disk inflates to all of it so
        // far (a reader stops at the missing trailer).
        let mut so_far = Vec::new();
        let _ = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_end(&mut so_far);
        assert_eq!(so_far, first);
        disk.put(b"more").unwrap();
        let (hash, n) = disk.finish();
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(n, stored.len() as u64);
        assert!(
            stored.len() < 200,
            "4 KiB of zeros compress: {} bytes",
            stored.len()
        );
        assert_eq!(hex(&hash.finalize()), hex(&Sha256::digest(&stored)));
        let mut all = Vec::new();
        flate2::read::GzDecoder::new(&stored[..])
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, [first.as_slice(), b"more"].concat());
    }

    #[test]
    fn retention_removes_the_old_then_the_oldest_and_never_one_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let file = |name: &str, bytes: usize, age: Duration| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![b'x'; bytes]).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(now - age).unwrap();
            path
        };
        let day = Duration::from_secs(86_400);
        file("s-old.cast", 100, 10 * day);
        file("s-big.fbs", 300, Duration::from_secs(7200));
        file("s-new.cast", 300, Duration::from_secs(3600));
        let live = file("s-live.cast", 100, 10 * day);
        // Its writer holds it, as a node's writer does.
        let held = std::fs::File::open(&live).unwrap();
        held.lock().unwrap();
        file("notes.txt", 5000, 10 * day);
        let settings = RecordingSettings {
            folder: dir.path().to_path_buf(),
            backends: Vec::new(),
            required: Vec::new(),
            max_bytes: 4096,
            keep_for: Some(day),
            max_total_bytes: Some(500),
        };
        settings.sweep(now);
        let mut left: Vec<String> = settings.list().into_iter().map(|r| r.id).collect();
        left.sort();
        // Too old: s-old; then over 500 bytes (300 + 300 + 100): the oldest
        // that is not being written, s-big. Not a recording: notes.txt.
        assert_eq!(left, ["s-live", "s-new"]);
        assert!(dir.path().join("notes.txt").exists());
        drop(held);
    }
}
