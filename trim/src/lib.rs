//! Start-up touches a lot of program code that a running proxy never runs
//! again: the command line, configuration parsing and its error reports,
//! validation, the first snapshot. The kernel maps those code pages into the
//! process when they run (with their neighbours: it faults pages in around
//! the one asked for), and they stay in its resident set for good, about
//! 1.5 MiB of the 8.7 MiB an idle Switchyard held (loadtests/RESULTS.md,
//! "Idle RSS: start-up code let go").
//!
//! [`release_program_text`] unmaps the executable's code pages once start-up
//! is over. Nothing is lost: the pages are clean copies of the executable
//! file, still in the page cache, and the next instruction fetched from one
//! maps it again (a minor fault). What the request path runs comes back on
//! the first requests; what only start-up ran stays out.
//!
//! This is the workspace's only `unsafe` code (STYLE.md: "isolated and
//! commented", with the benchmark above as the need).

use std::fs;
use std::io;
use std::path::Path;

/// What [`release_program_text`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Bytes of code mappings handed back.
    pub bytes: usize,
    /// Code mappings left alone because they held private copies of pages
    /// (a debugger's breakpoint or a uprobe writes one): dropping those
    /// would silently remove the breakpoint.
    pub skipped: usize,
}

/// Unmaps the pages of the executable's own code mappings (`r-xp`, backed
/// by the file `/proc/self/exe` names) that are clean copies of the file.
/// On systems without `/proc` it does nothing.
pub fn release_program_text() -> io::Result<Released> {
    let exe = fs::read_link("/proc/self/exe")?;
    let smaps = fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for mapping in code_mappings(&smaps, &exe) {
        if mapping.private_copies_kib > 0 {
            released.skipped += 1;
            continue;
        }
        madvise_dontneed(mapping.start, mapping.end - mapping.start)?;
        released.bytes += mapping.end - mapping.start;
    }
    Ok(released)
}

/// One executable mapping of `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct CodeMapping {
    start: usize,
    end: usize,
    private_copies_kib: u64,
}

/// The `r-xp` mappings of `exe` in `smaps`, with their `Anonymous` size:
/// the pages of the mapping that are private copies, not the file's.
/// (`Private_Dirty` would not do: it also counts file pages the page cache
/// has not yet written back, as for an executable just copied.)
fn code_mappings(smaps: &str, exe: &Path) -> Vec<CodeMapping> {
    let mut found = Vec::new();
    let mut current: Option<CodeMapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            // A mapping's header line: "start-end perms offset dev inode path".
            found.extend(current.take());
            let perms = fields.next();
            // The path is the rest of the line, spaces and all (a deleted
            // executable's ends in " (deleted)", as /proc/self/exe's does).
            let path = line
                .splitn(6, char::is_whitespace)
                .nth(5)
                .map(str::trim)
                .filter(|p| !p.is_empty());
            let range = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            );
            if let (Some("r-xp"), Some(path), (Ok(start), Ok(end))) = (perms, path, range) {
                if Path::new(path) == exe && end > start {
                    current = Some(CodeMapping {
                        start,
                        end,
                        private_copies_kib: 0,
                    });
                }
            }
        } else if first == "Anonymous:" {
            if let (Some(mapping), Some(kib)) = (current.as_mut(), fields.next()) {
                // Unreadable counts as dirty: when unsure, leave it mapped.
                mapping.private_copies_kib = kib.parse().unwrap_or(u64::MAX);
            }
        }
    }
    found.extend(current);
    found
}

#[cfg(target_os = "linux")]
fn madvise_dontneed(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: `start..start + len` is a whole mapping of this process, read
    // from /proc/self/smaps a moment ago: a private, read-only, executable
    // mapping of the executable file, with no private copy of any page
    // (`Anonymous` 0, checked by the caller). MADV_DONTNEED on such a
    // mapping drops the page-table entries only; every later access maps the
    // same bytes again from the file's page cache, so no thread, including
    // this one, running code in the range can observe a difference except
    // the time of a minor fault. Code is never unmapped from under a
    // running thread: the mapping itself stays. The executable cannot be
    // written to while it runs (ETXTBSY); replacing it by rename leaves this
    // process on the old file.
    #[allow(unsafe_code)]
    let done = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn madvise_dontneed(_start: usize, _len: usize) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c6e00000-55d0c6f00000 r--p 00000000 fd:01 1234 /usr/bin/switchyard
Rss:                 832 kB
Private_Dirty:         0 kB
55d0c6f00000-55d0c7700000 r-xp 00100000 fd:01 1234 /usr/bin/switchyard
Rss:                5160 kB
Private_Dirty:         0 kB
55d0c7700000-55d0c7733000 r--p 00900000 fd:01 1234 /usr/bin/switchyard
Private_Dirty:       204 kB
7f0000000000-7f0000100000 r-xp 00028000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Private_Dirty:         0 kB
7f0000200000-7f0000300000 r-xp 00000000 fd:01 1234 /usr/bin/switchyard (deleted)
Private_Dirty:         0 kB
7f0000400000-7f0000401000 r-xp 00001000 fd:01 1234 /usr/bin/switchyard
Private_Dirty:         4 kB
Anonymous:             4 kB
";

    #[test]
    fn only_the_executables_own_code_mappings_are_found_with_their_private_copies() {
        let found = code_mappings(SMAPS, Path::new("/usr/bin/switchyard"));
        assert_eq!(
            found,
            vec![
                CodeMapping {
                    start: 0x55d0c6f00000,
                    end: 0x55d0c7700000,
                    private_copies_kib: 0
                },
                CodeMapping {
                    start: 0x7f0000400000,
                    end: 0x7f0000401000,
                    private_copies_kib: 4
                },
            ]
        );
    }

    #[test]
    fn a_mapping_whose_private_copies_cannot_be_read_counts_as_copied() {
        let smaps = "1000-2000 r-xp 0 fd:01 1 /bin/x\nAnonymous: ? kB\n";
        let found = code_mappings(smaps, Path::new("/bin/x"));
        assert_eq!(found[0].private_copies_kib, u64::MAX);
    }
}
