//! The storage seam: the [`Backend`] trait the [`Store`] writes through,
//! and what every backend shares (the record framing, the torn-tail rules,
//! the errors). A backend frames bytes and revisions; it knows no `State`
//! and no change vocabulary: the store encodes [`Record`]s and snapshot
//! records and hands it the bytes with the revisions they lead from and to.
//!
//! Backends: [`file::FileBackend`] (a data directory: write-ahead log plus
//! snapshots) and [`memory::MemoryBackend`] (the same framing in memory;
//! what `--ephemeral` runs on, and what tests reopen). A backend on a shared
//! store (etcd) fills the same trait: records carry the revisions they lead
//! from and to, which map onto that store's own revisions, and
//! [`Backend::follow`] streams what other writers wrote.
//!
//! Framing, in files and in memory alike: a magic header, then records as
//! `[u32 length][u32 CRC-32 of the payload][payload]`, little-endian. A
//! record cut short or failing its CRC at the very end of the newest log is
//! a torn write from a crash: recovery cuts it off and says where. Damage
//! anywhere else stops recovery with the place and the offset.
//!
//! [`Store`]: crate::store::Store
//! [`Record`]: tagward_core::change::Record

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub mod file;
pub mod memory;

pub use file::FileBackend;
pub use memory::{MemoryBackend, MemoryMedium};

pub(crate) const WAL_MAGIC: &[u8; 8] = b"TGWWAL01";
pub(crate) const SNAP_MAGIC: &[u8; 8] = b"TGWSNP01";
/// A record larger than this is damage, not data (recovery), and is never
/// written (the writers refuse it first, so a start never refuses what a
/// running sidecar wrote). A writer's limit may be lower, never higher.
pub const MAX_RECORD: u32 = 1 << 30;

/// One encoded log record: the change that led from `prev` to `rev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub prev: u64,
    pub rev: u64,
    /// The encoded record (JSON of a `tagward_core::change::Record`, which
    /// repeats `prev` and `rev`).
    pub bytes: Vec<u8>,
}

/// What recovery hands the store, item by item, in the order to apply them.
#[derive(Debug)]
pub enum Loaded<'a> {
    /// The newest snapshot's state begins; its records follow, then
    /// `SnapshotEnd`.
    SnapshotBegin {
        revision: u64,
    },
    /// Encoded snapshot records, in order: a batch of them, so that the
    /// store can decode one part while it applies another. An `Err` names
    /// the record it refuses by its place in the batch ([`NotLoaded::record`]).
    SnapshotRecords(&'a [&'a [u8]]),
    SnapshotEnd {
        revision: u64,
    },
    /// A logged record after the snapshot.
    Record(LogRecord),
}

/// Why `load` refused an item during [`Backend::recover`]: the reason, and
/// for [`Loaded::SnapshotRecords`] which record of the batch (0 for any
/// other item), so that the damage is reported at that record's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLoaded {
    pub reason: String,
    pub record: usize,
}

impl From<String> for NotLoaded {
    fn from(reason: String) -> Self {
        NotLoaded { reason, record: 0 }
    }
}

/// Snapshot records handed to `load` at once: at most this many, or as
/// many as fill [`SNAPSHOT_BATCH_BYTES`].
pub(crate) const SNAPSHOT_BATCH: usize = 2_048;
pub(crate) const SNAPSHOT_BATCH_BYTES: usize = 4 << 20;

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Anything was found (a snapshot or logged records).
    pub found: bool,
    /// The revision of the last snapshot or record found (0 when none).
    pub revision: u64,
    /// A torn tail that recovery cut off.
    pub cut: Option<Cut>,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone)]
pub struct Cut {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
}

/// Why storage failed; place and offset where it is about damage.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} at offset {offset}: {reason}")]
    Damaged { path: PathBuf, offset: u64, reason: String },
    #[error("{0}: another tagward process is using this data directory")]
    Locked(PathBuf),
    /// One record would be larger than the limit: refused before anything
    /// was written (not a failure of the medium).
    #[error("{what} encodes to {bytes} bytes, more than the {limit}-byte limit of one record in {path}")]
    TooLarge { path: PathBuf, what: String, bytes: usize, limit: u32 },
    /// A record does not follow the one before it (`prev` is not the last
    /// revision written): refused before anything was written.
    #[error("{path}: a record from revision {prev} does not follow revision {last}")]
    OutOfOrder { path: PathBuf, prev: u64, last: u64 },
    /// Following from a revision whose records are no longer kept.
    #[error("{path}: records after revision {from} are no longer kept (the oldest kept follows revision {oldest})")]
    Gone { path: PathBuf, from: u64, oldest: u64 },
    /// The store could not encode a record.
    #[error("cannot encode {what}: {reason}")]
    Encode { what: String, reason: String },
}

impl StorageError {
    /// This one record was refused and nothing was written: the backend
    /// carries on (every other error may have left the medium in doubt).
    pub fn refused_only_this(&self) -> bool {
        matches!(self, StorageError::TooLarge { .. } | StorageError::Encode { .. })
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn damaged(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Damaged { path: path.to_path_buf(), offset, reason: reason.into() }
}

/// Makes the records appended so far durable. Runs without the writer lock,
/// so many appends share one sync (group commit).
pub trait DurableSync: Send {
    fn sync(self: Box<Self>) -> Result<(), StorageError>;
}

/// Writes one snapshot, off the writer lock, from the records the store
/// hands it; then drops what the snapshot makes obsolete.
pub trait SnapshotJob: Send {
    fn write(self: Box<Self>, records: &mut dyn Iterator<Item = Result<Vec<u8>, StorageError>>) -> Result<(), StorageError>;
}

/// Encoded records following a revision.
pub type Follow = Box<dyn Iterator<Item = LogRecord> + Send>;

/// Where the store's records live. One writer per backend at a time (a
/// second is refused with [`StorageError::Locked`]).
pub trait Backend: Send {
    /// Where the records live, for messages (a directory, `memory`).
    fn place(&self) -> PathBuf;

    /// The largest record this backend writes (at most [`MAX_RECORD`]).
    fn max_record(&self) -> u32;

    /// Reads back what was written: `load` gets the newest snapshot and then
    /// the records after it, in order (an `Err` from it is reported as damage
    /// at that record); a torn tail is cut off. Afterwards the backend
    /// appends after the last revision found. Called once, before anything
    /// else.
    fn recover(&mut self, load: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>) -> Result<Recovered, StorageError>;

    /// Appends a record; it is durable once a later `prepare_sync`'s sync
    /// returns. A record over [`Backend::max_record`] is refused with
    /// [`StorageError::TooLarge`] and nothing is written.
    fn append(&mut self, record: &LogRecord) -> Result<(), StorageError>;

    /// Hands the appended records to the medium and returns the sync that
    /// makes them durable.
    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError>;

    /// True when the log has grown enough to be worth a snapshot.
    fn wants_compaction(&self) -> bool;

    /// Makes what was appended durable, starts appending after `revision`
    /// (the revision of the state the store will snapshot) and returns the
    /// job that writes the snapshot at `revision` and drops what it makes
    /// obsolete.
    fn begin_compaction(&mut self, revision: u64) -> Result<Box<dyn SnapshotJob>, StorageError>;

    /// The durable records after revision `from`, in order: what this
    /// process wrote and, on a shared backend, what others wrote. The file
    /// and memory backends have one writer, so nothing beyond what this
    /// process wrote ever arrives. [`StorageError::Gone`] when records after
    /// `from` were dropped by a compaction.
    fn follow(&self, from: u64) -> Result<Follow, StorageError>;
}

/// Frames a payload for a file or memory log.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Refuses a payload over `limit` before it is framed and written.
pub(crate) fn check_size(path: &Path, what: impl FnOnce() -> String, payload: &[u8], limit: u32) -> Result<(), StorageError> {
    if payload.len() > limit as usize {
        return Err(StorageError::TooLarge { path: path.to_path_buf(), what: what(), bytes: payload.len(), limit });
    }
    Ok(())
}

/// What reading framed records found: the offset after the last complete
/// record, the first bad record (its offset and what is wrong) if any, and
/// the length.
pub(crate) type ReadRecords = (u64, Option<(u64, String)>, u64);

/// Reads framed records from `reader` (`len` bytes, header included).
pub(crate) fn read_frames(
    path: &Path,
    mut reader: impl Read,
    len: u64,
    magic: &[u8; 8],
    mut each: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
) -> Result<ReadRecords, StorageError> {
    let mut head = [0u8; 8];
    if len < 8 {
        let bad = (len > 0).then(|| (0, format!("the file is {len} bytes, shorter than its header")));
        return Ok((0, bad, len));
    }
    reader.read_exact(&mut head).map_err(io(path))?;
    if &head != magic {
        return Err(damaged(path, 0, "not a tagward file (wrong header)"));
    }
    let mut offset = 8u64;
    let mut payload = Vec::new();
    loop {
        if offset == len {
            return Ok((offset, None, len));
        }
        if len - offset < 8 {
            return Ok((offset, Some((offset, format!("{} bytes where a record header needs 8", len - offset))), len));
        }
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(io(path))?;
        let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if size > MAX_RECORD {
            return Ok((offset, Some((offset, format!("a record length of {size} bytes"))), len));
        }
        // No record is empty, and an empty one would pass its checksum: a
        // header of zeros is a zero-filled tail (some filesystems leave one
        // after a crash), never a record.
        if size == 0 {
            return Ok((
                offset,
                Some((offset, "zero bytes where a record header belongs (a zero-filled tail)".to_string())),
                len,
            ));
        }
        if len - offset - 8 < size as u64 {
            let left = len - offset - 8;
            return Ok((offset, Some((offset, format!("a record of {size} bytes with only {left} left in the file"))), len));
        }
        payload.resize(size as usize, 0);
        reader.read_exact(&mut payload).map_err(io(path))?;
        if crc32fast::hash(&payload) != crc {
            return Ok((offset, Some((offset, "the record fails its checksum".to_string())), len));
        }
        each(offset, &payload)?;
        offset += 8 + size as u64;
    }
}

/// Is there a whole, valid record somewhere in `rest` (the bytes after the
/// first byte of a bad record)? Scans byte by byte for a frame whose
/// checksum holds.
pub(crate) fn has_record_in(rest: &[u8]) -> bool {
    let mut i = 0usize;
    while i + 8 <= rest.len() {
        let size = u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]) as usize;
        let crc = u32::from_le_bytes([rest[i + 4], rest[i + 5], rest[i + 6], rest[i + 7]]);
        if size > 0 && i + 8 + size <= rest.len() && crc32fast::hash(&rest[i + 8..i + 8 + size]) == crc {
            let payload = &rest[i + 8..i + 8 + size];
            if payload.first() == Some(&b'{') {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// The revisions of an encoded log record (the rest of it is the store's).
#[derive(serde::Deserialize)]
struct Revisions {
    prev: u64,
    rev: u64,
}

/// Reads `prev` and `rev` out of an encoded log record.
pub(crate) fn revisions(path: &Path, offset: u64, payload: &[u8]) -> Result<(u64, u64), StorageError> {
    let r: Revisions =
        serde_json::from_slice(payload).map_err(|e| damaged(path, offset, format!("the record is not a log entry: {e}")))?;
    Ok((r.prev, r.rev))
}

/// A snapshot's framing records around the store's: `{"begin":..}`,
/// `{"put": RECORD}` for each, `{"end":..}`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Marker {
    Begin { revision: u64 },
    End { revision: u64, records: u64 },
}

const PUT_OPEN: &[u8] = b"{\"put\":";

/// Wraps an encoded snapshot record as the snapshot file holds it.
pub(crate) fn snapshot_put(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + PUT_OPEN.len() + 1);
    out.extend_from_slice(PUT_OPEN);
    out.extend_from_slice(record);
    out.push(b'}');
    out
}

/// One record of a snapshot, read back.
pub(crate) enum SnapItem<'a> {
    Begin(u64),
    Put(&'a [u8]),
    End { revision: u64, records: u64 },
}

pub(crate) fn snapshot_item<'a>(path: &Path, offset: u64, payload: &'a [u8]) -> Result<SnapItem<'a>, StorageError> {
    if let Some(inner) = payload.strip_prefix(PUT_OPEN).and_then(|p| p.strip_suffix(b"}")) {
        return Ok(SnapItem::Put(inner));
    }
    match serde_json::from_slice::<Marker>(payload) {
        Ok(Marker::Begin { revision }) => Ok(SnapItem::Begin(revision)),
        Ok(Marker::End { revision, records }) => Ok(SnapItem::End { revision, records }),
        Err(e) => Err(damaged(path, offset, format!("the record is not a snapshot record: {e}"))),
    }
}

/// Checks the order of a snapshot's records and hands them to `load`, the
/// records in batches. A backend calls [`SnapshotReader::item`] for each
/// record it reads and [`SnapshotReader::finish`] once the file ends (or
/// stops on damage), which hands over what is still batched.
pub(crate) struct SnapshotReader<'l> {
    path: PathBuf,
    revision: u64,
    records: u64,
    begun: bool,
    ended: bool,
    load: &'l mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>,
    /// The batched records' bytes, one after the other, and each one's
    /// offset in the file and end in `bytes`.
    bytes: Vec<u8>,
    batched: Vec<(u64, usize)>,
}

impl<'l> SnapshotReader<'l> {
    pub fn new(path: PathBuf, revision: u64, load: &'l mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>) -> Self {
        SnapshotReader { path, revision, records: 0, begun: false, ended: false, load, bytes: Vec::new(), batched: Vec::new() }
    }

    /// The end record was read (and everything before it handed over).
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn item(&mut self, offset: u64, payload: &[u8]) -> Result<(), StorageError> {
        let path = self.path.clone();
        if self.ended {
            return Err(damaged(&path, offset, "records after the end record"));
        }
        let loaded = match snapshot_item(&path, offset, payload)? {
            SnapItem::Begin(r) if !self.begun && r == self.revision => {
                self.begun = true;
                Loaded::SnapshotBegin { revision: r }
            }
            SnapItem::Put(record) if self.begun => {
                self.records += 1;
                self.bytes.extend_from_slice(record);
                self.batched.push((offset, self.bytes.len()));
                if self.batched.len() >= SNAPSHOT_BATCH || self.bytes.len() >= SNAPSHOT_BATCH_BYTES {
                    self.finish()?;
                }
                return Ok(());
            }
            SnapItem::End { revision: r, records: n } if self.begun && r == self.revision && n == self.records => {
                self.finish()?;
                self.ended = true;
                Loaded::SnapshotEnd { revision: r }
            }
            _ => return Err(damaged(&path, offset, "a snapshot record out of place")),
        };
        (self.load)(loaded).map_err(|refused| damaged(&path, offset, refused.reason))
    }

    /// Hands the batched records to `load`; a refusal is reported at the
    /// offset of the record refused.
    pub fn finish(&mut self) -> Result<(), StorageError> {
        if self.batched.is_empty() {
            return Ok(());
        }
        let mut start = 0;
        let records: Vec<&[u8]> = self
            .batched
            .iter()
            .map(|&(_, end)| {
                let record = self.bytes.get(start..end).unwrap_or_default();
                start = end;
                record
            })
            .collect();
        let handed = (self.load)(Loaded::SnapshotRecords(&records));
        drop(records);
        let result = handed.map_err(|refused| {
            let offset = self.batched.get(refused.record).or(self.batched.last()).map_or(0, |&(offset, _)| offset);
            damaged(&self.path, offset, refused.reason)
        });
        self.bytes.clear();
        self.batched.clear();
        result
    }
}
