//! Durable state on the sidecar's own disk: a write-ahead log of changes
//! plus snapshots, behind the narrow [`Storage`] interface the [`Store`]
//! writes through (a shared backend on an existing distributed store can
//! implement the same interface: entries carry the revisions they lead from
//! and to, which map onto that store's own revisions).
//!
//! Files in the data directory:
//! - `LOCK`: held (advisory lock) while a sidecar uses the directory.
//! - `snap-REVISION.tws`: the whole state at REVISION, written to a
//!   temporary name, synced and renamed, so it is complete or absent.
//! - `wal-REVISION.twl`: the changes after REVISION, appended and synced
//!   (one sync for every change that arrived meanwhile: group commit).
//!
//! Both kinds of file are a magic header then records framed as
//! `[u32 length][u32 CRC-32 of the payload][payload: JSON]`, little-endian.
//! A record cut short or failing its CRC at the very end of the newest log
//! is a torn write from a crash: it is cut off, and the log line says where.
//! Damage anywhere else stops the start with the file and the offset.
//!
//! [`Store`]: crate::store::Store

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use tagward_core::change::Update;
use tagward_core::state::State;
use tagward_core::world::{principal_spec, resource_spec};

const WAL_MAGIC: &[u8; 8] = b"TGWWAL01";
const SNAP_MAGIC: &[u8; 8] = b"TGWSNP01";
/// A record larger than this is damage, not data (recovery), and is never
/// written (the writers refuse it first, so a start never refuses what a
/// running sidecar wrote). A writer's limit may be lower, never higher.
pub const MAX_RECORD: u32 = 1 << 30;

/// One change in the log: the update that led from `prev` to `rev`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub prev: u64,
    pub rev: u64,
    pub time_unix_ms: i64,
    pub actor: String,
    pub change: Update,
}

/// What a snapshot file holds, record by record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SnapRecord {
    Begin { revision: u64 },
    Put(Box<Update>),
    End { revision: u64, records: u64 },
}

/// Why storage failed; file and offset where it is about damage.
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

/// What recovery found, item by item, in the order to apply them.
pub enum LoadItem {
    /// A snapshot's state begins; `Put`s follow, then `SnapshotEnd`.
    SnapshotBegin {
        revision: u64,
    },
    Put(Update),
    SnapshotEnd {
        revision: u64,
    },
    /// A logged change, after the snapshot.
    Entry(Entry),
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone)]
pub struct Cut {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
}

/// Makes the entries appended so far durable. Runs without the writer lock.
pub trait DurableSync: Send {
    fn sync(self: Box<Self>) -> Result<(), StorageError>;
}

/// The narrow interface the store writes through.
pub trait Storage: Send {
    /// Appends an entry; it is durable once a later `prepare_sync`'s sync
    /// returns.
    fn append(&mut self, entry: &Entry) -> Result<(), StorageError>;
    /// Hands the appended bytes to the medium and returns the sync that
    /// makes them durable.
    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError>;
    /// True when the log has grown enough to be worth a snapshot.
    fn wants_compaction(&self) -> bool;
    /// Starts a new log after `state`'s revision and returns the job that
    /// writes `state` as a snapshot and removes what it makes obsolete.
    fn begin_compaction(
        &mut self,
        state: Arc<State>,
    ) -> Result<Box<dyn FnOnce() -> Result<(), StorageError> + Send>, StorageError>;
}

/// The write-ahead log and snapshots in a directory.
pub struct FileStorage {
    dir: PathBuf,
    _lock: File,
    wal: BufWriter<File>,
    wal_path: PathBuf,
    wal_bytes: u64,
    compact_after: u64,
    /// The largest record this writer writes (at most [`MAX_RECORD`]).
    max_record: u32,
}

struct FileSync {
    file: File,
    path: PathBuf,
}

impl DurableSync for FileSync {
    fn sync(self: Box<Self>) -> Result<(), StorageError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Refuses a payload over `limit` before it is framed and written.
fn check_size(path: &Path, what: impl FnOnce() -> String, payload: &[u8], limit: u32) -> Result<(), StorageError> {
    if payload.len() > limit as usize {
        return Err(StorageError::TooLarge { path: path.to_path_buf(), what: what(), bytes: payload.len(), limit });
    }
    Ok(())
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

/// Files of one kind, each with the revision in its name, sorted.
type Numbered = Vec<(u64, PathBuf)>;

/// The files of a data directory, sorted by revision: snapshots and logs.
fn listing(dir: &Path) -> Result<(Numbered, Numbered), StorageError> {
    let mut snaps = Vec::new();
    let mut wals = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rev) = numbered(&name, "snap-", ".tws") {
            snaps.push((rev, entry.path()));
        } else if let Some(rev) = numbered(&name, "wal-", ".twl") {
            wals.push((rev, entry.path()));
        }
    }
    snaps.sort();
    wals.sort();
    Ok((snaps, wals))
}

/// What reading a file of records found: the offset after the last complete
/// record, the first bad record (its offset and what is wrong) if any, and the
/// file's length.
type ReadRecords = (u64, Option<(u64, String)>, u64);

/// Reads framed records. Returns the offset after the last complete record
/// and, for a bad record, its offset and what is wrong.
fn read_records(
    path: &Path,
    magic: &[u8; 8],
    mut each: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
) -> Result<ReadRecords, StorageError> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut head = [0u8; 8];
    if len < 8 {
        let bad = (len > 0).then(|| (0, format!("the file is {len} bytes, shorter than its header")));
        return Ok((0, bad, len));
    }
    file.read_exact(&mut head).map_err(io(path))?;
    if &head != magic {
        return Err(StorageError::Damaged {
            path: path.to_path_buf(),
            offset: 0,
            reason: "not a tagward file (wrong header)".into(),
        });
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
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

fn damaged(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Damaged { path: path.to_path_buf(), offset, reason: reason.into() }
}

/// A data directory read back and locked, ready to start its log.
pub struct Recovered {
    dir: PathBuf,
    lock: File,
    compact_after: u64,
    max_record: u32,
    /// A torn tail that was cut off.
    pub cut: Option<Cut>,
    /// Anything was found (a snapshot or logged changes).
    pub found: bool,
}

impl FileStorage {
    /// Opens (creating if needed) and locks a data directory, and reads it
    /// back: `load` gets the newest snapshot and then the logged changes
    /// after it, in order; an `Err` from it is reported as damage at that
    /// record. Call [`Recovered::start`] with the rebuilt state's revision.
    pub fn recover(
        dir: &Path,
        compact_after: u64,
        mut load: impl FnMut(LoadItem) -> Result<(), String>,
    ) -> Result<Recovered, StorageError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StorageError::Locked(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let (snaps, wals) = listing(dir)?;
        let mut found = false;
        let mut base = 0u64;
        if let Some((rev, path)) = snaps.last() {
            base = *rev;
            found = true;
            read_snapshot(path, *rev, &mut load)?;
        }
        let mut cut = None;
        // The logs that may hold changes after the snapshot: the last one
        // starting at or before it, and every later one.
        let first = wals.iter().rposition(|(start, _)| *start <= base).unwrap_or(0);
        let relevant = wals.get(first..).unwrap_or(&[]);
        for (i, (_, path)) in relevant.iter().enumerate() {
            let newest = i + 1 == relevant.len();
            let (good, bad, len) = read_records(path, WAL_MAGIC, |offset, payload| {
                let entry: Entry = serde_json::from_slice(payload)
                    .map_err(|e| damaged(path, offset, format!("the record is not a log entry: {e}")))?;
                if entry.rev <= base {
                    return Ok(());
                }
                found = true;
                load(LoadItem::Entry(entry)).map_err(|reason| damaged(path, offset, reason))
            })?;
            let Some((offset, reason)) = bad else { continue };
            if !newest {
                return Err(damaged(path, offset, format!("{reason}, and newer log files follow")));
            }
            // Only the tail of the newest log may be torn: a bad record with a
            // whole record after it is damage, not an interrupted write.
            if has_record_after(path, offset)? {
                return Err(damaged(path, offset, format!("{reason}, and complete records follow it")));
            }
            let file = OpenOptions::new().write(true).open(path).map_err(io(path))?;
            if good < 8 {
                // Not even the header survived the crash: the log was empty.
                file.set_len(0).map_err(io(path))?;
                (&file).write_all(WAL_MAGIC).map_err(io(path))?;
            } else {
                file.set_len(good).map_err(io(path))?;
            }
            file.sync_all().map_err(io(path))?;
            cut = Some(Cut { path: path.clone(), offset: good.max(8), bytes: len.saturating_sub(good.max(8)), reason });
        }
        Ok(Recovered { dir: dir.to_path_buf(), lock, compact_after, max_record: MAX_RECORD, cut, found })
    }
}

impl Recovered {
    /// Lowers the size limit of the records written from now on (tests);
    /// it never goes above [`MAX_RECORD`], what recovery accepts.
    pub fn limit_records(&mut self, max_record: u32) {
        self.max_record = max_record.min(MAX_RECORD);
    }

    /// Writes `seed` as the first snapshot of a directory that held
    /// nothing, so a restart needs no world file.
    pub fn seed(&self, seed: &State) -> Result<(), StorageError> {
        write_snapshot_limited(&self.dir, seed, self.max_record).map(|_| ())
    }

    /// Starts a new log after `revision` (the rebuilt state's).
    pub fn start(self, revision: u64) -> Result<FileStorage, StorageError> {
        let wal_path = self.dir.join(format!("wal-{revision:020}.twl"));
        let wal = new_log(&wal_path)?;
        sync_dir(&self.dir)?;
        Ok(FileStorage {
            dir: self.dir,
            _lock: self.lock,
            wal,
            wal_path,
            wal_bytes: 8,
            compact_after: self.compact_after,
            max_record: self.max_record,
        })
    }
}

/// Is there a whole, valid record somewhere after the bad one at `offset`?
/// (Scans byte by byte for a frame whose checksum holds.)
fn has_record_after(path: &Path, offset: u64) -> Result<bool, StorageError> {
    let mut file = File::open(path).map_err(io(path))?;
    file.seek(SeekFrom::Start(offset + 1)).map_err(io(path))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).map_err(io(path))?;
    let mut i = 0usize;
    while i + 8 <= rest.len() {
        let size = u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]) as usize;
        let crc = u32::from_le_bytes([rest[i + 4], rest[i + 5], rest[i + 6], rest[i + 7]]);
        if size > 0 && i + 8 + size <= rest.len() && crc32fast::hash(&rest[i + 8..i + 8 + size]) == crc {
            let payload = &rest[i + 8..i + 8 + size];
            if payload.first() == Some(&b'{') {
                return Ok(true);
            }
        }
        i += 1;
    }
    Ok(false)
}

fn new_log(path: &Path) -> Result<BufWriter<File>, StorageError> {
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io(path))?;
    file.write_all(WAL_MAGIC).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(BufWriter::with_capacity(1 << 16, file))
}

fn read_snapshot(path: &Path, revision: u64, load: &mut impl FnMut(LoadItem) -> Result<(), String>) -> Result<(), StorageError> {
    let mut records = 0u64;
    let mut ended = false;
    let mut begun = false;
    let (_, bad, _) = read_records(path, SNAP_MAGIC, |offset, payload| {
        let record: SnapRecord = serde_json::from_slice(payload)
            .map_err(|e| damaged(path, offset, format!("the record is not a snapshot record: {e}")))?;
        if ended {
            return Err(damaged(path, offset, "records after the end record"));
        }
        match record {
            SnapRecord::Begin { revision: r } if !begun && r == revision => {
                begun = true;
                load(LoadItem::SnapshotBegin { revision }).map_err(|reason| damaged(path, offset, reason))
            }
            SnapRecord::Put(update) if begun => {
                records += 1;
                load(LoadItem::Put(*update)).map_err(|reason| damaged(path, offset, reason))
            }
            SnapRecord::End { revision: r, records: n } if begun && r == revision && n == records => {
                ended = true;
                load(LoadItem::SnapshotEnd { revision }).map_err(|reason| damaged(path, offset, reason))
            }
            _ => Err(damaged(path, offset, "a snapshot record out of place")),
        }
    })?;
    if let Some((offset, reason)) = bad {
        return Err(damaged(path, offset, reason));
    }
    if !ended {
        return Err(damaged(path, fs::metadata(path).map(|m| m.len()).unwrap_or(0), "the snapshot has no end record"));
    }
    Ok(())
}

/// Writes `state` as a snapshot file, atomically.
pub fn write_snapshot(dir: &Path, state: &State) -> Result<PathBuf, StorageError> {
    write_snapshot_limited(dir, state, MAX_RECORD)
}

/// Writes `state` as a snapshot, one record per entity, each at most
/// `max_record` bytes: an entity over it refuses the whole snapshot (the
/// temporary file is removed; an older snapshot and the log stay).
fn write_snapshot_limited(dir: &Path, state: &State, max_record: u32) -> Result<PathBuf, StorageError> {
    let revision = state.revision();
    let tmp = dir.join(format!("snap-{revision:020}.tws.tmp"));
    let written = write_snapshot_records(dir, &tmp, state, max_record);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn write_snapshot_records(dir: &Path, tmp: &Path, state: &State, max_record: u32) -> Result<PathBuf, StorageError> {
    let revision = state.revision();
    let path = dir.join(format!("snap-{revision:020}.tws"));
    let file = File::create(tmp).map_err(io(tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut records = 0u64;
    let put = |out: &mut BufWriter<File>, record: &SnapRecord| -> Result<(), StorageError> {
        let payload = serde_json::to_vec(record).map_err(|e| damaged(tmp, 0, format!("cannot encode: {e}")))?;
        let what = || match record {
            SnapRecord::Put(update) => match &**update {
                Update::PutPolicy { name, .. } => format!("the snapshot record of policy {name:?}"),
                Update::PutPrincipal(p) => format!("the snapshot record of principal {:?}", p.arn),
                Update::PutResource(r) => format!("the snapshot record of resource {:?}", r.arn),
                _ => "a snapshot record".to_string(),
            },
            _ => "a snapshot record".to_string(),
        };
        check_size(tmp, what, &payload, max_record)?;
        out.write_all(&frame(&payload)).map_err(io(tmp))
    };
    out.write_all(SNAP_MAGIC).map_err(io(tmp))?;
    put(&mut out, &SnapRecord::Begin { revision })?;
    let mut policies: Vec<_> = state.policies().collect();
    policies.sort_by(|a, b| a.0.cmp(b.0));
    for (name, policy) in policies {
        put(
            &mut out,
            &SnapRecord::Put(Box::new(Update::PutPolicy {
                name: name.to_string(),
                document: serde_json::Value::clone(&policy.source),
            })),
        )?;
        records += 1;
    }
    for p in state.principals() {
        put(&mut out, &SnapRecord::Put(Box::new(Update::PutPrincipal(principal_spec(p)))))?;
        records += 1;
    }
    for r in state.resources() {
        put(&mut out, &SnapRecord::Put(Box::new(Update::PutResource(resource_spec(r)))))?;
        records += 1;
    }
    put(&mut out, &SnapRecord::End { revision, records })?;
    let file = out.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
    file.sync_all().map_err(io(tmp))?;
    fs::rename(tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    Ok(path)
}

impl Storage for FileStorage {
    fn append(&mut self, entry: &Entry) -> Result<(), StorageError> {
        let payload =
            serde_json::to_vec(entry).map_err(|e| damaged(&self.wal_path, self.wal_bytes, format!("cannot encode: {e}")))?;
        // Checked before anything is written: the log stays as it was.
        let what = || format!("the change to revision {}", entry.rev);
        check_size(&self.wal_path, what, &payload, self.max_record)?;
        let framed = frame(&payload);
        self.wal.write_all(&framed).map_err(io(&self.wal_path))?;
        self.wal_bytes += framed.len() as u64;
        Ok(())
    }

    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError> {
        self.wal.flush().map_err(io(&self.wal_path))?;
        let file = self.wal.get_ref().try_clone().map_err(io(&self.wal_path))?;
        Ok(Box::new(FileSync { file, path: self.wal_path.clone() }))
    }

    fn wants_compaction(&self) -> bool {
        self.wal_bytes >= self.compact_after
    }

    fn begin_compaction(
        &mut self,
        state: Arc<State>,
    ) -> Result<Box<dyn FnOnce() -> Result<(), StorageError> + Send>, StorageError> {
        // The old log must be durable before a newer one is started: recovery
        // treats only the newest log's tail as possibly torn.
        self.wal.flush().map_err(io(&self.wal_path))?;
        self.wal.get_ref().sync_data().map_err(io(&self.wal_path))?;
        let revision = state.revision();
        let path = self.dir.join(format!("wal-{revision:020}.twl"));
        self.wal = new_log(&path)?;
        self.wal_path = path;
        self.wal_bytes = 8;
        sync_dir(&self.dir)?;
        let dir = self.dir.clone();
        let max_record = self.max_record;
        Ok(Box::new(move || {
            write_snapshot_limited(&dir, &state, max_record)?;
            // Older snapshots and logs that end before this one are obsolete.
            let (snaps, wals) = listing(&dir)?;
            for (rev, path) in snaps {
                if rev < revision {
                    fs::remove_file(&path).map_err(io(&path))?;
                }
            }
            for (start, path) in wals {
                if start < revision {
                    fs::remove_file(&path).map_err(io(&path))?;
                }
            }
            sync_dir(&dir)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tagward-storage-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn entry(prev: u64) -> Entry {
        Entry {
            prev,
            rev: prev + 1,
            time_unix_ms: 0,
            actor: "test".into(),
            change: Update::DeletePolicy { name: format!("p{prev}") },
        }
    }

    /// Appends `n` entries after revision 0 and syncs; returns the log path.
    fn write_log(d: &Path, n: u64) -> PathBuf {
        let recovered = FileStorage::recover(d, u64::MAX, |_| Ok(())).unwrap();
        let mut storage = recovered.start(0).unwrap();
        for i in 0..n {
            storage.append(&entry(i)).unwrap();
        }
        storage.prepare_sync().unwrap().sync().unwrap();
        storage.wal_path.clone()
    }

    fn recover(d: &Path) -> Result<(Vec<u64>, Option<Cut>), StorageError> {
        let mut revs = Vec::new();
        let r = FileStorage::recover(d, u64::MAX, |item| {
            if let LoadItem::Entry(e) = item {
                revs.push(e.rev);
            }
            Ok(())
        })?;
        Ok((revs, r.cut))
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_complete_record() {
        let d = dir("torn");
        let log = write_log(&d, 5);
        let whole = fs::metadata(&log).unwrap().len();
        // A crash in the middle of writing a sixth record.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        let payload = serde_json::to_vec(&entry(5)).unwrap();
        f.write_all(&frame(&payload)[..20]).unwrap();
        drop(f);
        let (revs, cut) = recover(&d).unwrap();
        assert_eq!(revs, vec![1, 2, 3, 4, 5]);
        let cut = cut.expect("the tail was cut");
        assert_eq!((cut.offset, cut.bytes), (whole, 20));
        assert_eq!(fs::metadata(&log).unwrap().len(), whole, "the file ends at the last complete record");
        let (again, cut) = recover(&d).unwrap();
        assert_eq!((again.len(), cut.is_none()), (5, true), "a second start finds nothing to cut");
    }

    #[test]
    fn a_bad_checksum_at_the_end_is_torn_but_in_the_middle_is_damage() {
        let d = dir("crc-end");
        let log = write_log(&d, 3);
        let len = fs::metadata(&log).unwrap().len();
        let mut bytes = fs::read(&log).unwrap();
        bytes[len as usize - 2] ^= 0xff;
        fs::write(&log, &bytes).unwrap();
        let (revs, cut) = recover(&d).unwrap();
        assert_eq!(revs, vec![1, 2]);
        assert!(cut.unwrap().reason.contains("checksum"));

        let d = dir("crc-middle");
        let log = write_log(&d, 3);
        let mut bytes = fs::read(&log).unwrap();
        bytes[8 + 8 + 3] ^= 0xff; // inside the first record's payload
        fs::write(&log, &bytes).unwrap();
        match recover(&d) {
            Err(StorageError::Damaged { path, offset, reason }) => {
                assert_eq!((path, offset), (log.clone(), 8));
                assert!(reason.contains("complete records follow"), "{reason}");
            }
            other => panic!("expected damage, got {:?}", other.map(|(r, _)| r)),
        }
        assert_eq!(fs::read(&log).unwrap(), bytes, "a damaged log is left as it was");
    }

    #[test]
    fn a_second_process_cannot_use_the_directory() {
        let d = dir("lock");
        let first = FileStorage::recover(&d, u64::MAX, |_| Ok(())).unwrap();
        assert!(matches!(FileStorage::recover(&d, u64::MAX, |_| Ok(())), Err(StorageError::Locked(_))));
        drop(first);
        assert!(FileStorage::recover(&d, u64::MAX, |_| Ok(())).is_ok());
    }

    #[test]
    fn a_snapshot_without_its_end_record_is_damage() {
        let d = dir("snap");
        fs::create_dir_all(&d).unwrap();
        let path = write_snapshot(&d, &State::default()).unwrap();
        let bytes = fs::read(&path).unwrap();
        // Cut the end record off.
        let end = serde_json::to_vec(&SnapRecord::End { revision: 0, records: 0 }).unwrap();
        fs::write(&path, &bytes[..bytes.len() - end.len() - 8]).unwrap();
        match FileStorage::recover(&d, u64::MAX, |_| Ok(())) {
            Err(StorageError::Damaged { reason, .. }) => assert!(reason.contains("no end record"), "{reason}"),
            Err(e) => panic!("expected damage, got {e}"),
            Ok(_) => panic!("expected damage, got a recovery"),
        }
    }
    #[test]
    fn a_record_over_the_limit_is_refused_before_anything_is_written() {
        let d = dir("too-large");
        let mut recovered = FileStorage::recover(&d, u64::MAX, |_| Ok(())).unwrap();
        recovered.limit_records(200);
        let mut storage = recovered.start(0).unwrap();
        storage.append(&entry(0)).unwrap();
        storage.prepare_sync().unwrap().sync().unwrap();
        let len = fs::metadata(&storage.wal_path).unwrap().len();
        let mut big = entry(1);
        big.change = Update::DeletePolicy { name: "x".repeat(300) };
        match storage.append(&big) {
            Err(StorageError::TooLarge { bytes, limit, what, .. }) => {
                assert!(bytes > 300 && limit == 200, "{bytes} {limit}");
                assert_eq!(what, "the change to revision 2");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        storage.append(&entry(1)).unwrap();
        storage.prepare_sync().unwrap().sync().unwrap();
        drop(storage);
        assert!(fs::metadata(d.join(format!("wal-{:020}.twl", 0))).unwrap().len() > len);
        let (revs, cut) = recover(&d).unwrap();
        assert_eq!((revs, cut.is_none()), (vec![1, 2], true), "the refused entry left no trace");
        // The write limit never exceeds what recovery accepts.
        let mut r = FileStorage::recover(&d, u64::MAX, |_| Ok(())).unwrap();
        r.limit_records(u32::MAX);
        assert_eq!(r.max_record, MAX_RECORD);
    }
}
