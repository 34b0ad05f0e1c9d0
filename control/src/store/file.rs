//! The file backend: a standalone replica's state in `state_dir` (also a
//! fleet replica's cache of the last state it saw in etcd).
//!
//! `state.json` is written atomically (temp file, fsync, rename, fsync the
//! directory), carrying the audit events of the change it records; they are
//! then appended to the audit log (`log.rs`). Every write
//! runs off the async runtime: an fsync must never stall the data plane
//! sharing it (with `workers: 1`, the same thread).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::log::AuditLog;
use super::{Event, Overrides, StoreError};
use crate::config::AuditConfig;

const STATE_FORMAT: u32 = 1;
pub(super) const STATE_FILE: &str = "state.json";

/// `state.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateFile {
    pub format: u32,
    pub version: u64,
    pub overrides: Overrides,
    /// Audit events not yet known to be in `events.jsonl`: written in the
    /// same atomic step as the state they describe, so a crash leaves both
    /// or neither, then appended to the log (again at start-up, when a
    /// crash came between).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlogged: Vec<Event>,
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
    log: Arc<AuditLog>,
}

impl StateDir {
    /// Creates `dir` if needed and opens its audit log.
    pub fn open(dir: &Path, audit: &AuditConfig) -> Result<StateDir, StoreError> {
        fs::create_dir_all(dir).map_err(|e| {
            StoreError::Io(format!("state_dir {}: cannot create: {e}", dir.display()))
        })?;
        Ok(StateDir {
            dir: dir.to_owned(),
            log: Arc::new(AuditLog::open(dir, audit)?),
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

    /// The audit log.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Appends `events` to the audit log off the runtime.
    pub async fn append(&self, events: Vec<Event>) -> Result<(), StoreError> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.append(&events))
            .await
            .map_err(|e| StoreError::Io(format!("audit append task failed: {e}")))?
    }

    /// Audit events with `seq > after` off the runtime.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.events(after, limit))
            .await
            .map_err(|e| StoreError::Io(format!("audit read task failed: {e}")))?
    }
}

pub(super) fn new_state(
    version: u64,
    overrides: Overrides,
    unlogged: Vec<Event>,
    fleet: Option<FleetCache>,
) -> StateFile {
    StateFile {
        format: STATE_FORMAT,
        version,
        overrides,
        unlogged,
        fleet,
    }
}

pub(super) fn read_state(path: &Path) -> Result<StateFile, StoreError> {
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
