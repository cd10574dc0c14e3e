//! Records in memory, framed as the file backend frames them: what
//! `--ephemeral` runs on (nothing survives the process), and what tests
//! reopen, tear and fill up.
//!
//! A [`MemoryMedium`] is the "disk": the synced bytes of the newest
//! snapshot and of the logs after it. A [`MemoryBackend`] writes to one
//! medium at a time (a second is refused, like a locked directory); what it
//! appends is in the medium once a sync returns, so dropping a backend with
//! unsynced records loses them, like a crash.
//!
//! [`MemoryBackend::new`] writes to a medium of its own that nobody can
//! reopen (`--ephemeral`, in-process stores): it keeps no snapshot (nothing
//! could restore it, so the store's records are never even encoded) and a
//! compaction only drops the log before it; following still works.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    check_size, damaged, frame, has_record_in, read_frames, revisions, snapshot_put, Backend, Cut, DurableSync, Follow, Loaded,
    LogRecord, Marker, NotLoaded, Recovered, SnapshotJob, SnapshotReader, StorageError, MAX_RECORD, SNAP_MAGIC, WAL_MAGIC,
};

#[derive(Debug, Default)]
struct Disk {
    /// The newest snapshot file's bytes, by revision.
    snapshot: Option<(u64, Vec<u8>)>,
    /// Log files by the revision they follow, each its framed bytes.
    logs: Vec<(u64, Vec<u8>)>,
    /// A backend is writing.
    locked: bool,
}

/// The shared "disk" a [`MemoryBackend`] writes to; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryMedium {
    disk: Arc<Mutex<Disk>>,
}

fn lock(disk: &Mutex<Disk>) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

fn place() -> PathBuf {
    PathBuf::from("memory")
}

impl MemoryMedium {
    pub fn new() -> MemoryMedium {
        MemoryMedium::default()
    }

    /// Appends `bytes` to the newest log as they are, as a crash in the
    /// middle of a write leaves them (fault tests).
    pub fn tear(&self, bytes: &[u8]) {
        let mut disk = lock(&self.disk);
        if let Some((_, log)) = disk.logs.last_mut() {
            log.extend_from_slice(bytes);
        }
    }

    /// The bytes of the newest log (fault tests).
    pub fn newest_log(&self) -> Vec<u8> {
        lock(&self.disk).logs.last().map(|(_, l)| l.clone()).unwrap_or_default()
    }
}

/// A backend on a [`MemoryMedium`].
#[derive(Debug)]
pub struct MemoryBackend {
    medium: MemoryMedium,
    /// Framed records appended since the last sync.
    unsynced: Vec<u8>,
    log_bytes: u64,
    compact_after: u64,
    max_record: u32,
    last: Option<u64>,
    /// The medium can be reopened, so snapshots are kept.
    keep_snapshots: bool,
}

struct MemorySync {
    medium: MemoryMedium,
    /// The log the bytes were appended to (by the revision it follows):
    /// a compaction may start a newer one before this sync runs.
    log: u64,
    bytes: Vec<u8>,
}

impl DurableSync for MemorySync {
    fn sync(self: Box<Self>) -> Result<(), StorageError> {
        let mut disk = lock(&self.medium.disk);
        match disk.logs.iter_mut().rev().find(|(start, _)| *start == self.log) {
            Some((_, log)) => {
                log.extend_from_slice(&self.bytes);
                Ok(())
            }
            None => Err(damaged(&place(), 0, format!("the log after revision {} is gone", self.log))),
        }
    }
}

impl MemoryBackend {
    /// A backend on a fresh medium that nobody else reads: `--ephemeral`.
    pub fn new(compact_after: u64) -> MemoryBackend {
        let medium = MemoryMedium::new();
        lock(&medium.disk).locked = true;
        MemoryBackend {
            medium,
            unsynced: Vec::new(),
            log_bytes: 8,
            compact_after,
            max_record: MAX_RECORD,
            last: None,
            keep_snapshots: false,
        }
    }

    /// Opens `medium` for writing; [`StorageError::Locked`] while another
    /// backend writes to it.
    pub fn open(medium: &MemoryMedium, compact_after: u64) -> Result<MemoryBackend, StorageError> {
        let mut disk = lock(&medium.disk);
        if disk.locked {
            return Err(StorageError::Locked(place()));
        }
        disk.locked = true;
        Ok(MemoryBackend {
            medium: medium.clone(),
            unsynced: Vec::new(),
            log_bytes: 8,
            compact_after,
            max_record: MAX_RECORD,
            last: None,
            keep_snapshots: true,
        })
    }

    /// Lowers the size limit of one record (tests).
    pub fn limit_records(mut self, max_record: u32) -> MemoryBackend {
        self.max_record = max_record.min(MAX_RECORD);
        self
    }

    /// The medium this backend writes to.
    pub fn medium(&self) -> &MemoryMedium {
        &self.medium
    }

    /// The revision the newest log follows (made if there is none).
    fn current_log(&self) -> u64 {
        let mut disk = lock(&self.medium.disk);
        if let Some((start, _)) = disk.logs.last() {
            return *start;
        }
        let start = self.last.unwrap_or(0);
        disk.logs.push((start, WAL_MAGIC.to_vec()));
        start
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        lock(&self.medium.disk).locked = false;
    }
}

impl Backend for MemoryBackend {
    fn place(&self) -> PathBuf {
        place()
    }

    fn max_record(&self) -> u32 {
        self.max_record
    }

    fn recover(&mut self, load: &mut dyn FnMut(Loaded<'_>) -> Result<(), NotLoaded>) -> Result<Recovered, StorageError> {
        let path = place();
        let mut disk = lock(&self.medium.disk);
        let mut found = false;
        let mut base = 0u64;
        if let Some((revision, bytes)) = &disk.snapshot {
            base = *revision;
            found = true;
            let mut reader = SnapshotReader::new(path.clone(), base, load);
            let (_, bad, _) = read_frames(&path, &bytes[..], bytes.len() as u64, SNAP_MAGIC, |offset, p| reader.item(offset, p))?;
            reader.finish()?;
            if let Some((offset, reason)) = bad {
                return Err(damaged(&path, offset, reason));
            }
            if !reader.ended() {
                return Err(damaged(&path, bytes.len() as u64, "the snapshot has no end record"));
            }
        }
        let mut last = base;
        let mut cut = None;
        let count = disk.logs.len();
        for (i, (_, log)) in disk.logs.iter_mut().enumerate() {
            let (good, bad, len) = read_frames(&path, &log[..], log.len() as u64, WAL_MAGIC, |offset, payload| {
                let (prev, rev) = revisions(&path, offset, payload)?;
                if rev <= base {
                    return Ok(());
                }
                found = true;
                last = rev;
                load(Loaded::Record(LogRecord { prev, rev, bytes: payload.to_vec() }))
                    .map_err(|refused| damaged(&path, offset, refused.reason))
            })?;
            let Some((offset, reason)) = bad else { continue };
            if i + 1 != count {
                return Err(damaged(&path, offset, format!("{reason}, and newer logs follow")));
            }
            if has_record_in(log.get(offset as usize + 1..).unwrap_or(&[])) {
                return Err(damaged(&path, offset, format!("{reason}, and complete records follow it")));
            }
            let good = good.max(8);
            log.truncate(good as usize);
            if log.len() < 8 {
                *log = WAL_MAGIC.to_vec();
            }
            cut = Some(Cut { path: path.clone(), offset: good, bytes: len.saturating_sub(good), reason });
        }
        disk.logs.push((last, WAL_MAGIC.to_vec()));
        self.last = found.then_some(last);
        Ok(Recovered { found, revision: last, cut })
    }

    fn append(&mut self, record: &LogRecord) -> Result<(), StorageError> {
        check_size(&place(), || format!("the change to revision {}", record.rev), &record.bytes, self.max_record)?;
        if let Some(last) = self.last.filter(|l| *l != record.prev) {
            return Err(StorageError::OutOfOrder { path: place(), prev: record.prev, last });
        }
        let framed = frame(&record.bytes);
        self.log_bytes += framed.len() as u64;
        self.unsynced.extend_from_slice(&framed);
        self.last = Some(record.rev);
        Ok(())
    }

    fn prepare_sync(&mut self) -> Result<Box<dyn DurableSync>, StorageError> {
        let log = self.current_log();
        Ok(Box::new(MemorySync { medium: self.medium.clone(), log, bytes: std::mem::take(&mut self.unsynced) }))
    }

    fn wants_compaction(&self) -> bool {
        self.log_bytes >= self.compact_after
    }

    fn begin_compaction(&mut self, revision: u64) -> Result<Box<dyn SnapshotJob>, StorageError> {
        self.prepare_sync()?.sync()?;
        lock(&self.medium.disk).logs.push((revision, WAL_MAGIC.to_vec()));
        self.log_bytes = 8;
        self.last = Some(revision);
        Ok(Box::new(MemorySnapshot {
            medium: self.medium.clone(),
            revision,
            max_record: self.max_record,
            keep: self.keep_snapshots,
        }))
    }

    fn follow(&self, from: u64) -> Result<Follow, StorageError> {
        let path = place();
        let disk = lock(&self.medium.disk);
        let oldest = disk.logs.first().map_or(0, |(start, _)| *start);
        if from < oldest {
            return Err(StorageError::Gone { path, from, oldest });
        }
        let mut out = Vec::new();
        for (_, log) in &disk.logs {
            read_frames(&path, &log[..], log.len() as u64, WAL_MAGIC, |offset, payload| {
                let (prev, rev) = revisions(&path, offset, payload)?;
                if rev > from {
                    out.push(LogRecord { prev, rev, bytes: payload.to_vec() });
                }
                Ok(())
            })?;
        }
        Ok(Box::new(out.into_iter()))
    }
}

struct MemorySnapshot {
    medium: MemoryMedium,
    revision: u64,
    max_record: u32,
    /// False on a medium nobody can reopen: drop the older logs only.
    keep: bool,
}

impl SnapshotJob for MemorySnapshot {
    fn write(self: Box<Self>, records: &mut dyn Iterator<Item = Result<Vec<u8>, StorageError>>) -> Result<(), StorageError> {
        let path = place();
        let revision = self.revision;
        if !self.keep {
            lock(&self.medium.disk).logs.retain(|(start, _)| *start >= revision);
            return Ok(());
        }
        let marker = |m: &Marker| serde_json::to_vec(m).map_err(|e| damaged(&path, 0, format!("cannot encode: {e}")));
        let mut bytes = SNAP_MAGIC.to_vec();
        bytes.extend_from_slice(&frame(&marker(&Marker::Begin { revision })?));
        let mut count = 0u64;
        for record in records {
            let payload = snapshot_put(&record?);
            check_size(&path, || format!("snapshot record {count}"), &payload, self.max_record)?;
            bytes.extend_from_slice(&frame(&payload));
            count += 1;
        }
        bytes.extend_from_slice(&frame(&marker(&Marker::End { revision, records: count })?));
        let mut disk = lock(&self.medium.disk);
        if disk.snapshot.as_ref().is_some_and(|(r, _)| *r > revision) {
            return Ok(()); // a newer snapshot is already there
        }
        disk.snapshot = Some((revision, bytes));
        disk.logs.retain(|(start, _)| *start >= revision);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(prev: u64) -> LogRecord {
        LogRecord { prev, rev: prev + 1, bytes: format!("{{\"prev\":{prev},\"rev\":{}}}", prev + 1).into_bytes() }
    }

    #[test]
    fn a_private_medium_keeps_no_snapshot_and_drops_the_log_before_one() {
        let mut b = MemoryBackend::new(u64::MAX);
        b.recover(&mut |_| Ok(())).unwrap();
        for i in 0..3 {
            b.append(&record(i)).unwrap();
        }
        let job = b.begin_compaction(3).unwrap();
        let mut encoded = 0;
        job.write(&mut std::iter::from_fn(|| {
            encoded += 1;
            None
        }))
        .unwrap();
        assert_eq!(encoded, 0, "the records are never asked for");
        b.append(&record(3)).unwrap();
        b.prepare_sync().unwrap().sync().unwrap();
        let disk = lock(&b.medium.disk);
        assert!(disk.snapshot.is_none());
        assert_eq!(disk.logs.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3]);
        drop(disk);
        assert_eq!(b.follow(3).unwrap().map(|r| r.rev).collect::<Vec<_>>(), vec![4]);
        assert!(matches!(b.follow(1), Err(StorageError::Gone { from: 1, oldest: 3, .. })));
    }

    #[test]
    fn a_sync_prepared_before_a_compaction_lands_in_its_own_log() {
        let medium = MemoryMedium::new();
        let mut b = MemoryBackend::open(&medium, u64::MAX).unwrap();
        b.recover(&mut |_| Ok(())).unwrap();
        b.append(&record(0)).unwrap();
        let sync = b.prepare_sync().unwrap();
        let _job = b.begin_compaction(1).unwrap();
        sync.sync().unwrap();
        let disk = lock(&medium.disk);
        assert_eq!(disk.logs.len(), 2);
        assert!(disk.logs[0].1.len() > 8, "the record is in the log it was appended to");
        assert_eq!(disk.logs[1].1, WAL_MAGIC.to_vec(), "the newer log is empty");
    }
}
