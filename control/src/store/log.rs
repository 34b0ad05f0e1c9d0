//! The audit log of a standalone replica: `events.jsonl` in `state_dir`,
//! one JSON event per line in sequence order, rotated by size into
//! `events.<first seq>.jsonl` files of which `audit.keep_files` are kept.
//!
//! Reading from a sequence number never scans from the start: the file that
//! holds it is found by name, and the line within it by a binary search on
//! byte offsets (sequence numbers only grow down a file), leaving at most
//! [`SCAN_WINDOW`] bytes to read through. Every read is bounded by the
//! file's length when opened, so a file that never ends (a device) cannot
//! hold a reader.
//!
//! An append that fails is cut back to where it began, and a line torn by a
//! crash is cut off when the log is opened: the next append never lands
//! behind half an event. The events an append loses that way are not lost:
//! the store wrote them into `state.json` first (`StateFile::unlogged`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::{Event, StoreError};
use crate::config::AuditConfig;

const ACTIVE: &str = "events.jsonl";
/// Below this many bytes between the bounds, a read scans instead of
/// bisecting further.
const SCAN_WINDOW: u64 = 64 * 1024;

/// The audit log files of one `state_dir`.
#[derive(Debug)]
pub(super) struct AuditLog {
    dir: PathBuf,
    config: AuditConfig,
    /// Serialises appends, rotation and reads: a read never sees a file
    /// renamed under it.
    files: Mutex<()>,
}

/// Only the sequence number of a line, for the search.
#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

impl AuditLog {
    /// The log in `dir`, a torn last line (a crash mid-append) cut off.
    pub fn open(dir: &Path, config: &AuditConfig) -> Result<AuditLog, StoreError> {
        let log = AuditLog {
            dir: dir.to_owned(),
            config: config.clone(),
            files: Mutex::new(()),
        };
        let active = log.active();
        if let Err(e) = cut_torn_tail(&active) {
            return Err(StoreError::Io(format!(
                "{}: cannot repair its last line: {e}",
                active.display()
            )));
        }
        Ok(log)
    }

    fn active(&self) -> PathBuf {
        self.dir.join(ACTIVE)
    }

    /// The rotated files, oldest first, with the first sequence number each
    /// holds.
    fn rotated(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_prefix("events."))
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            files.push((first, self.dir.join(name)));
        }
        files.sort();
        Ok(files)
    }

    /// Every file, oldest first.
    fn all(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = self.rotated()?.into_iter().map(|(_, p)| p).collect();
        files.push(self.active());
        Ok(files)
    }

    fn error(&self, what: &str, e: std::io::Error) -> StoreError {
        StoreError::Io(format!("{}: {what}: {e}", self.active().display()))
    }

    /// The highest sequence number in the log (0 for none).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let _files = self.files.lock().expect("log lock");
        let files = self.all().map_err(|e| self.error("cannot list", e))?;
        for path in files.iter().rev() {
            let mut last = None;
            scan(path, u64::MAX - 1, |event| {
                last = Some(event.seq);
                true
            })
            .map_err(|e| self.error("cannot read", e))?;
            // `scan` skips what it can prove is older; a file it found
            // nothing in may still hold events below the bisected offset.
            if last.is_none() {
                scan(path, 0, |event| {
                    last = Some(event.seq);
                    true
                })
                .map_err(|e| self.error("cannot read", e))?;
            }
            if let Some(seq) = last {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    /// Appends `events` (in sequence order) and syncs them, rotating the
    /// file when it has grown past `audit.max_file_bytes`. On failure the
    /// file is cut back to where it was.
    pub fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for event in events {
            serde_json::to_writer(&mut bytes, event).expect("event serializes");
            bytes.push(b'\n');
        }
        let _files = self.files.lock().expect("log lock");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.active())
            .map_err(|e| self.error("cannot open", e))?;
        let before = file
            .metadata()
            .map_err(|e| self.error("cannot stat", e))?
            .len();
        if let Err(e) = file.write_all(&bytes).and_then(|()| file.sync_data()) {
            let _ = file.set_len(before);
            return Err(self.error("cannot append", e));
        }
        if before + bytes.len() as u64 > self.config.max_file_bytes {
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, file = %self.active().display(), "audit log not rotated");
            }
        }
        Ok(())
    }

    /// Renames the active file after its first event and deletes the oldest
    /// rotated files past `audit.keep_files`.
    fn rotate(&self) -> std::io::Result<()> {
        let active = self.active();
        let mut first = None;
        scan(&active, 0, |event| {
            first = Some(event.seq);
            false
        })?;
        let Some(first) = first else {
            return Ok(());
        };
        fs::rename(&active, self.dir.join(format!("events.{first:020}.jsonl")))?;
        File::open(&self.dir)?.sync_all()?;
        let rotated = self.rotated()?;
        let excess = rotated.len().saturating_sub(self.config.keep_files);
        for (_, path) in &rotated[..excess] {
            fs::remove_file(path)?;
        }
        tracing::info!(first, deleted = excess, "audit log rotated");
        Ok(())
    }

    /// Events with `seq > after`, oldest first, at most `limit`. Events the
    /// retention deleted are not there: the oldest kept come first.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let _files = self.files.lock().expect("log lock");
        let rotated = self.rotated().map_err(|e| self.error("cannot list", e))?;
        // The newest rotated file that starts at or before the first event
        // wanted holds it; none does when it is older than them all.
        let from = rotated
            .iter()
            .rposition(|(first, _)| *first <= after.saturating_add(1))
            .unwrap_or(0);
        let mut files: Vec<PathBuf> = rotated.into_iter().skip(from).map(|(_, p)| p).collect();
        files.push(self.active());
        let mut out = Vec::new();
        for path in files {
            scan(&path, after, |event| {
                if event.seq > after {
                    out.push(event);
                }
                out.len() < limit
            })
            .map_err(|e| self.error("cannot read", e))?;
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// Calls `each` with the readable events of `path` from near the first with
/// `seq > after` (some before it may come too) until it answers `false`.
/// A missing file has none.
fn scan(path: &Path, after: u64, mut each: impl FnMut(Event) -> bool) -> std::io::Result<()> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = bisect(&mut file, len, after)?;
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::new(file.take(len - start));
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
            return Ok(());
        }
        // Unreadable lines (written by hand, or an older format) are
        // skipped, not fatal to the whole log.
        if let Ok(event) = serde_json::from_slice::<Event>(&line) {
            if !each(event) {
                return Ok(());
            }
        }
    }
}

/// An offset of a line start in `file` (of `len` bytes) before which every
/// event has `seq <= after`, within [`SCAN_WINDOW`] of the first one that
/// does not.
fn bisect(file: &mut File, len: u64, after: u64) -> std::io::Result<u64> {
    let (mut lo, mut hi) = (0, len);
    while hi - lo > SCAN_WINDOW {
        let mid = lo + (hi - lo) / 2;
        match line_from(file, mid, hi)? {
            Some((start, seq)) if seq <= after => lo = start,
            Some((start, _)) => hi = start,
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// The start and sequence number of the first whole, readable line that
/// starts at or after `at` and before `end`.
fn line_from(file: &mut File, at: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    file.seek(SeekFrom::Start(at - 1))?;
    let mut reader = BufReader::new((&mut *file).take(end - (at - 1)));
    let mut line = Vec::new();
    // The rest of the line `at` falls in (only its newline when `at` starts
    // a line).
    let skipped = reader.read_until(b'\n', &mut line)? as u64;
    let start = at - 1 + skipped;
    if line.last() != Some(&b'\n') || start >= end {
        return Ok(None);
    }
    line.clear();
    reader.read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<Seq>(&line)
        .ok()
        .map(|s| (start, s.seq)))
}

/// Cuts `path` back to its last newline (a crash mid-append leaves a line
/// without one). Only regular files: a device standing in for the log is
/// left alone.
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(());
    }
    let mut end = meta.len();
    let mut chunk = vec![0; SCAN_WINDOW as usize];
    while end > 0 {
        let from = end.saturating_sub(SCAN_WINDOW);
        let buf = &mut chunk[..(end - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            let keep = from + i as u64 + 1;
            if keep != meta.len() {
                tracing::warn!(file = %path.display(), cut = meta.len() - keep, "audit log ended in a torn line; cut off");
                file.set_len(keep)?;
            }
            return Ok(());
        }
        end = from;
    }
    tracing::warn!(file = %path.display(), "audit log held only a torn line; emptied");
    file.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("switchyard-log-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// An event whose line is a few hundred bytes, longer for some.
    fn event(seq: u64) -> Event {
        Event {
            seq,
            time: "2026-12-03T00:00:00Z".into(),
            actor: "test".into(),
            action: "weights.set".into(),
            target: format!("route-{seq}"),
            before: json!({ "pad": "x".repeat((seq % 7 * 90) as usize) }),
            after: json!({ "stable": 90, "canary": 10 }),
            version: seq,
            replica: None,
        }
    }

    fn config(max_file_bytes: u64, keep_files: usize) -> AuditConfig {
        AuditConfig {
            max_file_bytes,
            keep_files,
        }
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn reading_from_any_sequence_number_finds_exactly_what_follows_it() {
        // One file of about 800 KB: the search bisects it.
        let dir = Dir::new("bisect");
        let log = AuditLog::open(&dir.0, &config(1 << 30, 8)).unwrap();
        let all: Vec<Event> = (1..=2000).map(event).collect();
        for chunk in all.chunks(100) {
            log.append(chunk).unwrap();
        }
        assert!(fs::metadata(dir.0.join(ACTIVE)).unwrap().len() > 8 * SCAN_WINDOW);
        assert_eq!(log.last_seq().unwrap(), 2000);
        for after in (0..=2001).step_by(7).chain([1999, 2000]) {
            let got = log.events(after, 25).unwrap();
            let want: Vec<u64> = (after + 1..=2000).take(25).collect();
            assert_eq!(seqs(&got), want, "after {after}");
        }
    }

    #[test]
    fn rotation_keeps_the_newest_files_and_reads_across_them() {
        let dir = Dir::new("rotate");
        let log = AuditLog::open(&dir.0, &config(16 * 1024, 3)).unwrap();
        for seq in 1..=600 {
            log.append(&[event(seq)]).unwrap();
        }
        let rotated = log.rotated().unwrap();
        assert_eq!(rotated.len(), 3, "{rotated:?}");
        let oldest = rotated[0].0;
        assert!(oldest > 1, "the oldest files were deleted");
        assert_eq!(log.last_seq().unwrap(), 600);
        // From before what is kept: the oldest kept come first.
        assert_eq!(
            seqs(&log.events(0, 5).unwrap()),
            (oldest..oldest + 5).collect::<Vec<_>>()
        );
        // Across a file boundary.
        let boundary = rotated[1].0;
        assert_eq!(
            seqs(&log.events(boundary - 3, 6).unwrap()),
            (boundary - 2..=boundary + 3).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&log.events(598, 10).unwrap()), vec![599, 600]);
        assert!(log.events(600, 10).unwrap().is_empty());
        // Reopened, it finds its last event in the rotated files too.
        fs::write(dir.0.join(ACTIVE), b"").unwrap();
        let reopened = AuditLog::open(&dir.0, &config(16 * 1024, 3)).unwrap();
        assert!(reopened.last_seq().unwrap() >= rotated[2].0);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_before_the_next_append() {
        let dir = Dir::new("torn");
        let log = AuditLog::open(&dir.0, &config(1 << 20, 1)).unwrap();
        log.append(&[event(1), event(2)]).unwrap();
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.0.join(ACTIVE))
            .unwrap();
        file.write_all(br#"{"seq":3,"time":"2026-"#).unwrap();
        drop(file);
        let log = AuditLog::open(&dir.0, &config(1 << 20, 1)).unwrap();
        assert_eq!(log.last_seq().unwrap(), 2);
        log.append(&[event(3)]).unwrap();
        assert_eq!(seqs(&log.events(0, 10).unwrap()), vec![1, 2, 3]);
    }

    #[test]
    fn a_log_that_is_a_device_is_read_as_empty_and_refuses_appends() {
        let dir = Dir::new("device");
        std::os::unix::fs::symlink("/dev/full", dir.0.join(ACTIVE)).unwrap();
        let log = AuditLog::open(&dir.0, &config(1 << 20, 1)).unwrap();
        assert_eq!(log.last_seq().unwrap(), 0);
        assert!(log.events(0, 10).unwrap().is_empty());
        let e = log.append(&[event(1)]).unwrap_err().to_string();
        assert!(
            e.contains("events.jsonl") && e.contains("cannot append"),
            "{e}"
        );
    }
}
