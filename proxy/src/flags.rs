//! Stage: evaluate every feature flag for the request's user, so the
//! application needs no flag SDK: the flags that are on travel upstream in
//! one header (`x-feature-flags: a,b`), and route rules can act on them.
//! Evaluation itself is `switchyard_control::flags`, shared with OFREP.

use http::request::Parts;
use switchyard_control::flags::parse_groups;

use crate::snapshot::Snapshot;

/// The flags of one request.
pub struct Evaluated {
    /// Indexed like `snapshot.flags`.
    pub on: Vec<bool>,
    /// The upstream header's value (`a,b`; flag names are checked when
    /// configured, so it needs no check as a header value); `None` when no
    /// flag is configured.
    pub header: Option<Vec<u8>>,
}

/// Evaluates every flag for the user `key`, with the groups of the trusted
/// groups header if there is one.
pub fn evaluate(snapshot: &Snapshot, parts: &Parts, key: &[u8]) -> Evaluated {
    if snapshot.flags.is_empty() {
        return Evaluated {
            on: Vec::new(),
            header: None,
        };
    }
    let groups: Vec<&str> = match &snapshot.groups_header {
        Some(name) => parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_groups)
            .collect(),
        None => Vec::new(),
    };
    let mut on = Vec::with_capacity(snapshot.flags.len());
    let mut len = 0;
    for f in snapshot.flags.iter() {
        let (value, _) = f.flag.evaluate(key, groups.iter().copied());
        if let Some(counters) = &f.counters {
            counters.count(value);
        }
        if value {
            len += f.flag.name.len() + 1;
        }
        on.push(value);
    }
    Evaluated {
        header: Some(header(snapshot, &on, len.saturating_sub(1))),
        on,
    }
}

/// `a,b`: the names of the flags that are on, in `len` bytes allocated once.
fn header(snapshot: &Snapshot, on: &[bool], len: usize) -> Vec<u8> {
    let mut names = Vec::with_capacity(len);
    for (f, _) in snapshot.flags.iter().zip(on).filter(|(_, on)| **on) {
        if !names.is_empty() {
            names.push(b',');
        }
        names.extend_from_slice(f.flag.name.as_bytes());
    }
    names
}
