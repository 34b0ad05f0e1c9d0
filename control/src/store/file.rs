//! The file backend: a standalone replica's state in `state_dir` (also a
//! fleet replica's cache of the last state it saw in etcd).
//!
//! `state.json` is written atomically (temp file, fsync, rename, fsync the
//! directory); `events.jsonl` is appended and synced per event. Every write
//! runs off the async runtime: an fsync must never stall the data plane
//! sharing it (with `workers: 1`, the same thread).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Event, Overrides, StoreError};

const STATE_FORMAT: u32 = 1;
pub(super) const STATE_FILE: &str = "state.json";
const EVENTS_FILE: &str = "events.jsonl";

/// `state.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateFile {
    pub format: u32,
    pub version: u64,
    pub overrides: Overrides,
    /// Set when this file is a fleet replica's cache of etcd's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetCache>,
}

/// Where a cached state came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FleetCache {
    /// The fleet's etcd prefix: a cache of another fleet is not used.
    pub prefix: String,
    /// The etcd revision the state was written at.
    pub revision: i64,
    pub next_seq: u64,
}

/// A state directory.
#[derive(Debug, Clone)]
pub(super) struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    /// Creates `dir` if needed.
    pub fn open(dir: &Path) -> Result<StateDir, StoreError> {
        fs::create_dir_all(dir).map_err(|e| {
            StoreError::Io(format!("state_dir {}: cannot create: {e}", dir.display()))
        })?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The state file, if there is one.
    pub fn read(&self) -> Result<Option<StateFile>, StoreError> {
        let path = self.state_path();
        if !path.exists() {
            return Ok(None);
        }
        read_state(&path).map(Some)
    }

    /// Moves the state file aside (kept, never overwritten); where to.
    pub fn move_aside(&self) -> Result<PathBuf, StoreError> {
        let path = self.state_path();
        let aside = self.dir.join(format!("{STATE_FILE}.reset-{}", unix_now()));
        fs::rename(&path, &aside)
            .map_err(|e| StoreError::Io(format!("{}: cannot move aside: {e}", path.display())))?;
        Ok(aside)
    }

    /// Writes the state file, blocking.
    pub fn write_blocking(&self, state: &StateFile) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&self.dir, STATE_FILE, &bytes).map_err(|e| {
            StoreError::Io(format!(
                "{}: cannot write: {e}",
                self.state_path().display()
            ))
        })
    }

    /// Writes the state file off the runtime.
    pub async fn write(&self, state: StateFile) -> Result<(), StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.write_blocking(&state))
            .await
            .map_err(|e| StoreError::Io(format!("state write task failed: {e}")))?
    }

    /// The highest audit sequence number written (0 for none).
    pub fn last_event_seq(&self) -> Result<u64, StoreError> {
        let mut last = 0;
        self.scan_events(|event| {
            last = last.max(event.seq);
            true
        })?;
        Ok(last)
    }

    /// Appends `event`, blocking.
    pub fn append_blocking(&self, event: &Event) -> Result<(), StoreError> {
        let path = self.dir.join(EVENTS_FILE);
        let mut line = serde_json::to_vec(event).expect("event serializes");
        line.push(b'\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&line).and_then(|()| f.sync_data()))
            .map_err(|e| {
                StoreError::Io(format!(
                    "{}: change applied but audit append failed: {e}",
                    path.display()
                ))
            })
    }

    /// Appends `event` off the runtime.
    pub async fn append(&self, event: Event) -> Result<(), StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.append_blocking(&event))
            .await
            .map_err(|e| StoreError::Io(format!("audit append task failed: {e}")))?
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        self.scan_events(|event| {
            if event.seq > after {
                out.push(event);
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Calls `each` with every readable event until it answers `false`.
    fn scan_events(&self, mut each: impl FnMut(Event) -> bool) -> Result<(), StoreError> {
        let path = self.dir.join(EVENTS_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
            // A torn last line from a crash mid-append: skip it.
            let Ok(event) = serde_json::from_str::<Event>(&line) else {
                continue;
            };
            if !each(event) {
                break;
            }
        }
        Ok(())
    }
}

pub(super) fn new_state(
    version: u64,
    overrides: Overrides,
    fleet: Option<FleetCache>,
) -> StateFile {
    StateFile {
        format: STATE_FORMAT,
        version,
        overrides,
        fleet,
    }
}

fn read_state(path: &Path) -> Result<StateFile, StoreError> {
    let corrupt = |why: String| {
        StoreError::Io(format!(
            "state file {} is unreadable ({why}); fix or remove it, or start with --reset-state to move it aside",
            path.display()
        ))
    };
    let bytes = fs::read(path).map_err(|e| corrupt(e.to_string()))?;
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if state.format != STATE_FORMAT {
        return Err(corrupt(format!(
            "format {} is not {STATE_FORMAT}",
            state.format
        )));
    }
    Ok(state)
}

/// Writes `dir/name` so a crash leaves either the old or the new contents:
/// temp file, fsync, rename over, fsync the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        // A full disk leaves no half-written temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)?.sync_all()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
