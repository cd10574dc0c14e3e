//! Durable state on the sidecar's own disk: a write-ahead log of records
//! plus snapshots, in a data directory.
//!
//! Files in the data directory:
//! - `LOCK`: held (advisory lock) while a sidecar uses the directory.
//! - `snap-REVISION.tws`: the whole state at REVISION, written to a
//!   temporary name, synced and renamed, so it is complete or absent.
//! - `wal-REVISION.twl`: the records after REVISION, appended and synced
//!   (one sync for every record that arrived meanwhile: group commit).
//!
//! Both kinds of file use the framing of [`crate::storage`]. Only the tail
//! of the newest log may be torn.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{
    check_size, damaged, frame, has_record_in, io, read_frames, revisions, snapshot_put, Backend, Cut, DurableSync, Follow,
    Loaded, LogRecord, Marker, NotLoaded, ReadRecords, Recovered, SnapshotJob, SnapshotReader, StorageError, MAX_RECORD,
    SNAP_MAGIC, WAL_MAGIC,
};

/// The write-ahead log and snapshots in a directory.
pub struct FileBackend {
    dir: PathBuf,
    _lock: File,
    /// The log being appended to (after recovery).
    wal: Option<Wal>,
    compact_after: u64,
    max_record: u32,
    /// The revision of the last record appended (or recovered).
    last: Option<u64>,
    /// Bytes in every log file since the newest snapshot began: what the
    /// compaction threshold is measured against, across restarts.
    log_bytes: u64,
}

struct Wal {
    out: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
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

/// Reads the framed records of a file.
fn read_records(
    path: &Path,
    magic: &[u8; 8],
    each: impl FnMut(u64, &[u8]) -> Result<(), StorageError>,
) -> Result<ReadRecords, StorageError> {
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    read_frames(path, BufReader::with_capacity(1 << 20, file), len, magic, each)
}

/// Is there a whole, valid record somewhere after the bad one at `offset`?
fn has_record_after(path: &Path, offset: u64) -> Result<bool, StorageError> {
    let mut file = File::open(path).map_err(io(path))?;
    file.seek(SeekFrom::Start(offset + 1)).map_err(io(path))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).map_err(io(path))?;
    Ok(has_record_in(&rest))
}

fn new_log(path: &Path) -> Result<Wal, StorageError> {
    let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io(path))?;
    file.write_all(WAL_MAGIC).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(Wal { out: BufWriter::with_capacity(1 << 16, file), path: path.to_path_buf(), bytes: 8 })
}

fn read_snapshot(
    path: &Path,
    revision: u64,
    load: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>,
) -> Result<(), StorageError> {
    let mut reader = SnapshotReader::new(path.to_path_buf(), revision, load);
    let (_, bad, _) = read_records(path, SNAP_MAGIC, |offset, payload| reader.item(offset, payload))?;
    // What is still batched is handed over first: a record that does not
    // load, before damage later in the file, is what is reported.
    reader.finish()?;
    if let Some((offset, reason)) = bad {
        return Err(damaged(path, offset, reason));
    }
    if !reader.ended() {
        return Err(damaged(path, fs::metadata(path).map(|m| m.len()).unwrap_or(0), "the snapshot has no end record"));
    }
    Ok(())
}

impl FileBackend {
    /// Opens (creating if needed) and locks a data directory, compacting
    /// once the log holds `compact_after` bytes. [`Backend::recover`] reads
    /// it back.
    pub fn open(dir: &Path, compact_after: u64) -> Result<FileBackend, StorageError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StorageError::Locked(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let backend = FileBackend {
            dir: dir.to_path_buf(),
            _lock: lock,
            wal: None,
            compact_after,
            max_record: MAX_RECORD,
            last: None,
            log_bytes: 0,
        };
        backend.remove_stale_snapshots()?;
        Ok(backend)
    }

    /// Removes `snap-*.tws.tmp` files: snapshots a crash interrupted before
    /// their rename (a complete snapshot is never a `.tmp`).
    fn remove_stale_snapshots(&self) -> Result<(), StorageError> {
        let mut removed = false;
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("snap-") && name.ends_with(".tws.tmp") {
                let path = entry.path();
                fs::remove_file(&path).map_err(io(&path))?;
                tracing::info!(file = %path.display(), "removed an unfinished snapshot left by an interrupted run");
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Lowers the size limit of the records written from now on (tests);
    /// it never goes above [`MAX_RECORD`], what recovery accepts.
    pub fn limit_records(mut self, max_record: u32) -> FileBackend {
        self.max_record = max_record.min(MAX_RECORD);
        self
    }

    /// The log being appended to.
    pub fn log_path(&self) -> Option<&Path> {
        self.wal.as_ref().map(|w| w.path.as_path())
    }

    fn wal(&mut self) -> Result<&mut Wal, StorageError> {
        if self.wal.is_none() {
            let revision = self.last.unwrap_or(0);
            self.wal = Some(new_log(&self.dir.join(format!("wal-{revision:020}.twl")))?);
            sync_dir(&self.dir)?;
        }
        self.wal.as_mut().ok_or_else(|| damaged(&self.dir, 0, "no log"))
    }
}

impl Backend for FileBackend {
    fn place(&self) -> PathBuf {
        self.dir.clone()
    }

    fn max_record(&self) -> u32 {
        self.max_record
    }

    fn recover(&mut self, load: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>) -> Result<Recovered, StorageError> {
        let (snaps, wals) = listing(&self.dir)?;
        let mut found = false;
        let mut base = 0u64;
        if let Some((rev, path)) = snaps.last() {
            base = *rev;
            found = true;
            read_snapshot(path, *rev, load)?;
        }
        let mut last = base;
        let mut cut = None;
        // The logs that may hold records after the snapshot: the last one
        // starting at or before it, and every later one.
        let first = wals.iter().rposition(|(start, _)| *start <= base).unwrap_or(0);
        let relevant = wals.get(first..).unwrap_or(&[]);
        for (i, (_, path)) in relevant.iter().enumerate() {
            let newest = i + 1 == relevant.len();
            let (good, bad, len) = read_records(path, WAL_MAGIC, |offset, payload| {
                let (prev, rev) = revisions(path, offset, payload)?;
                if rev <= base {
                    return Ok(());
                }
                found = true;
                last = rev;
                load(Loaded::Record(LogRecord { prev, rev, bytes: payload.to_vec() }))
                    .map_err(|refused| damaged(path, offset, refused.reason))
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
        self.last = found.then_some(last);
        // A new log after what was found.
        let path = self.dir.join(format!("wal-{last:020}.twl"));
        self.wal = Some(new_log(&path)?);
        sync_dir(&self.dir)?;
        // The threshold counts every log kept since the snapshot, so that
        // restarts (each starting a new log) do not reset it.
        let (_, wals) = listing(&self.dir)?;
        self.log_bytes = wals.iter().filter_map(|(_, p)| fs::metadata(p).ok()).map(|m| m.len()).sum();
        Ok(Recovered { found, revision: last, cut })
    }

    fn append(&mut self, record: &LogRecord) -> Result<(), StorageError> {
        let max_record = self.max_record;
        let last = self.last;
        let wal = self.wal()?;
        // Checked before anything is written: the log stays as it was.
        check_size(&wal.path, || format!("the change to revision {}", record.rev), &record.bytes, max_record)?;
        if let Some(last) = last.filter(|l| *l != record.prev) {
            return Err(StorageError::OutOfOrder { path: wal.path.clone(), prev: record.prev, last });
        }
        let framed = frame(&record.bytes);
        wal.out.write_all(&framed).map_err(io(&wal.path))?;
        wal.bytes += framed.len() as u64;
        self.log_bytes += framed.len() as u64;
        self.last = Some(record.rev);
        Ok(())
    }

    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError> {
        let wal = self.wal()?;
        wal.out.flush().map_err(io(&wal.path))?;
        let file = wal.out.get_ref().try_clone().map_err(io(&wal.path))?;
        Ok(Box::new(FileSync { file, path: wal.path.clone() }))
    }

    fn wants_compaction(&self) -> bool {
        self.wal.is_some() && self.log_bytes >= self.compact_after
    }

    fn begin_compaction(&mut self, revision: u64) -> Result<Box<dyn SnapshotJob>, StorageError> {
        // The old log must be durable before a newer one is started: recovery
        // treats only the newest log's tail as possibly torn.
        let wal = self.wal()?;
        wal.out.flush().map_err(io(&wal.path))?;
        wal.out.get_ref().sync_data().map_err(io(&wal.path))?;
        self.wal = Some(new_log(&self.dir.join(format!("wal-{revision:020}.twl")))?);
        self.last = Some(revision);
        self.log_bytes = 8;
        sync_dir(&self.dir)?;
        Ok(Box::new(FileSnapshot { dir: self.dir.clone(), revision, max_record: self.max_record }))
    }

    fn follow(&self, from: u64) -> Result<Follow, StorageError> {
        let (_, wals) = listing(&self.dir)?;
        let oldest = wals.first().map_or(0, |(start, _)| *start);
        if from < oldest {
            return Err(StorageError::Gone { path: self.dir.clone(), from, oldest });
        }
        let mut out = Vec::new();
        for (start, path) in &wals {
            if wals.iter().any(|(s, _)| *s > *start && *s <= from) {
                continue; // a later log starts at or before `from`
            }
            // A bad record here is a write in progress: what follows it is
            // not durable yet.
            read_records(path, WAL_MAGIC, |offset, payload| {
                let (prev, rev) = revisions(path, offset, payload)?;
                if rev > from {
                    out.push(LogRecord { prev, rev, bytes: payload.to_vec() });
                }
                Ok(())
            })?;
        }
        Ok(Box::new(out.into_iter()))
    }
}

/// Writes a snapshot file, then removes the files it makes obsolete.
struct FileSnapshot {
    dir: PathBuf,
    revision: u64,
    max_record: u32,
}

impl SnapshotJob for FileSnapshot {
    fn write(self: Box<Self>, records: &mut dyn Iterator<Item = Result<Vec<u8>, StorageError>>) -> Result<(), StorageError> {
        let revision = self.revision;
        let tmp = self.dir.join(format!("snap-{revision:020}.tws.tmp"));
        // A record over the limit refuses the whole snapshot: the temporary
        // file is removed; an older snapshot and the log stay.
        let written = write_snapshot_file(&self.dir, &tmp, revision, records, self.max_record);
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        // Older snapshots and logs that end before this one are obsolete.
        let (snaps, wals) = listing(&self.dir)?;
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
        sync_dir(&self.dir)
    }
}

fn write_snapshot_file(
    dir: &Path,
    tmp: &Path,
    revision: u64,
    records: &mut dyn Iterator<Item = Result<Vec<u8>, StorageError>>,
    max_record: u32,
) -> Result<PathBuf, StorageError> {
    let path = dir.join(format!("snap-{revision:020}.tws"));
    let file = File::create(tmp).map_err(io(tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let marker = |m: &Marker| serde_json::to_vec(m).map_err(|e| damaged(tmp, 0, format!("cannot encode: {e}")));
    out.write_all(SNAP_MAGIC).map_err(io(tmp))?;
    out.write_all(&frame(&marker(&Marker::Begin { revision })?)).map_err(io(tmp))?;
    let mut count = 0u64;
    for record in records {
        let payload = snapshot_put(&record?);
        check_size(tmp, || format!("snapshot record {count}"), &payload, max_record)?;
        out.write_all(&frame(&payload)).map_err(io(tmp))?;
        count += 1;
    }
    out.write_all(&frame(&marker(&Marker::End { revision, records: count })?)).map_err(io(tmp))?;
    let file = out.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
    file.sync_all().map_err(io(tmp))?;
    fs::rename(tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tagward-storage-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn record(prev: u64) -> LogRecord {
        let bytes =
            serde_json::to_vec(&serde_json::json!({"prev": prev, "rev": prev + 1, "change": format!("p{prev}")})).unwrap();
        LogRecord { prev, rev: prev + 1, bytes }
    }

    fn open(d: &Path) -> Result<(FileBackend, Vec<u64>, Option<Cut>), StorageError> {
        let mut revs = Vec::new();
        let mut b = FileBackend::open(d, u64::MAX)?;
        let r = b.recover(&mut |item| {
            if let Loaded::Record(e) = item {
                revs.push(e.rev);
            }
            Ok(())
        })?;
        Ok((b, revs, r.cut))
    }

    fn recover(d: &Path) -> Result<(Vec<u64>, Option<Cut>), StorageError> {
        open(d).map(|(_, revs, cut)| (revs, cut))
    }

    /// Appends `n` records after revision 0 and syncs; returns the log path.
    fn write_log(d: &Path, n: u64) -> PathBuf {
        let (mut b, _, _) = open(d).unwrap();
        for i in 0..n {
            b.append(&record(i)).unwrap();
        }
        b.prepare_sync().unwrap().sync().unwrap();
        b.log_path().unwrap().to_path_buf()
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_complete_record() {
        let d = dir("torn");
        let log = write_log(&d, 5);
        let whole = fs::metadata(&log).unwrap().len();
        // A crash in the middle of writing a sixth record.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&frame(&record(5).bytes)[..20]).unwrap();
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
    fn a_zero_filled_tail_is_torn_and_stale_snapshot_files_are_removed() {
        let d = dir("zeros");
        let log = write_log(&d, 5);
        let whole = fs::metadata(&log).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        drop(f);
        fs::write(d.join("snap-00000000000000000003.tws.tmp"), b"half a snapshot").unwrap();
        let (revs, cut) = recover(&d).unwrap();
        assert_eq!(revs, vec![1, 2, 3, 4, 5]);
        let cut = cut.expect("the zeros were cut");
        assert_eq!((cut.offset, cut.bytes), (whole, 4096), "{}", cut.reason);
        assert!(!d.join("snap-00000000000000000003.tws.tmp").exists(), "the unfinished snapshot is gone");
    }

    #[test]
    fn the_compaction_threshold_counts_the_logs_of_earlier_runs() {
        let d = dir("threshold");
        write_log(&d, 5);
        let size = {
            let (_, wals) = listing(&d).unwrap();
            wals.iter().map(|(_, p)| fs::metadata(p).unwrap().len()).sum::<u64>()
        };
        // A restart starts a new log; the old one still counts.
        let mut b = FileBackend::open(&d, size).unwrap();
        b.recover(&mut |_| Ok(())).unwrap();
        assert!(b.wants_compaction(), "{size} bytes of logs reach the threshold");
        b.begin_compaction(5).unwrap();
        assert!(!b.wants_compaction(), "after a snapshot begins, only the new log counts");
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
        let first = FileBackend::open(&d, u64::MAX).unwrap();
        assert!(matches!(FileBackend::open(&d, u64::MAX), Err(StorageError::Locked(_))));
        drop(first);
        assert!(FileBackend::open(&d, u64::MAX).is_ok());
    }

    #[test]
    fn a_snapshot_without_its_end_record_is_damage() {
        let d = dir("snap");
        let (mut b, _, _) = open(&d).unwrap();
        b.begin_compaction(0).unwrap().write(&mut std::iter::empty()).unwrap();
        drop(b);
        let path = d.join(format!("snap-{:020}.tws", 0));
        let bytes = fs::read(&path).unwrap();
        // Cut the end record off.
        let end = serde_json::to_vec(&Marker::End { revision: 0, records: 0 }).unwrap();
        fs::write(&path, &bytes[..bytes.len() - end.len() - 8]).unwrap();
        match recover(&d) {
            Err(StorageError::Damaged { reason, .. }) => assert!(reason.contains("no end record"), "{reason}"),
            Err(e) => panic!("expected damage, got {e}"),
            Ok(_) => panic!("expected damage, got a recovery"),
        }
    }

    #[test]
    fn the_snapshot_format_is_the_one_older_versions_wrote() {
        let d = dir("snap-format");
        let (mut b, _, _) = open(&d).unwrap();
        let put = br#"{"put_policy":{"name":"P","document":{}}}"#.to_vec();
        b.begin_compaction(3).unwrap().write(&mut std::iter::once(Ok(put))).unwrap();
        drop(b);
        let bytes = fs::read(d.join(format!("snap-{:020}.tws", 3))).unwrap();
        let mut payloads = Vec::new();
        read_frames(&d, &bytes[..], bytes.len() as u64, SNAP_MAGIC, |_, p| {
            payloads.push(String::from_utf8(p.to_vec()).unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            payloads,
            vec![
                r#"{"begin":{"revision":3}}"#.to_string(),
                r#"{"put":{"put_policy":{"name":"P","document":{}}}}"#.to_string(),
                r#"{"end":{"revision":3,"records":1}}"#.to_string()
            ]
        );
    }

    #[test]
    fn a_record_over_the_limit_is_refused_before_anything_is_written() {
        let d = dir("too-large");
        let (b, _, _) = open(&d).unwrap();
        let mut b = b.limit_records(200);
        b.append(&record(0)).unwrap();
        b.prepare_sync().unwrap().sync().unwrap();
        let log = b.log_path().unwrap().to_path_buf();
        let len = fs::metadata(&log).unwrap().len();
        let mut big = record(1);
        big.bytes = vec![b'x'; 300];
        match b.append(&big) {
            Err(e @ StorageError::TooLarge { .. }) => {
                assert!(e.refused_only_this());
                let StorageError::TooLarge { bytes, limit, what, .. } = e else { unreachable!() };
                assert!(bytes == 300 && limit == 200, "{bytes} {limit}");
                assert_eq!(what, "the change to revision 2");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        b.append(&record(1)).unwrap();
        b.prepare_sync().unwrap().sync().unwrap();
        drop(b);
        assert!(fs::metadata(&log).unwrap().len() > len);
        let (revs, cut) = recover(&d).unwrap();
        assert_eq!((revs, cut.is_none()), (vec![1, 2], true), "the refused record left no trace");
        // The write limit never exceeds what recovery accepts.
        assert_eq!(FileBackend::open(&d, u64::MAX).unwrap().limit_records(u32::MAX).max_record, MAX_RECORD);
    }
}
