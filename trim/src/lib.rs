//! Start-up touches a lot of program code that a running proxy never runs
//! again: the command line, configuration parsing and its error reports,
//! validation, loading state. The kernel maps those code pages into the
//! process as they run (with their neighbours: it maps pages in around the
//! one asked for), and they stay in its resident set for good, about
//! 1.5 MiB of the 8.7 MiB an idle Switchyard held (loadtests/RESULTS.md,
//! "Busy connections keep their buffers; start-up code let go").
//!
//! [`release_program_text`] drops the executable's code pages from the
//! process's page tables once start-up is over; the mappings themselves
//! stay. Nothing is lost: the pages are clean copies of the executable file,
//! which stay in the page cache, and the next instruction fetched from one
//! maps it again (a minor fault). What the request path runs comes back on
//! the first requests; what only start-up ran stays out. (Out of the
//! resident set, not out of memory: the page cache keeps those pages, and a
//! container's memory charge with them, but as clean unmapped file pages
//! the kernel reclaims first, where it protects mapped code.)
//!
//! [`release_free_heap`] does the same for the heap after a burst of
//! requests: the allocator's free pages go back to the kernel.
//!
//! [`watch_epoll`] registers the parking lot's own epoll set with tokio.
//!
//! This is the workspace's only `unsafe` code, isolated here as the
//! project's style guide asks, with the benchmarks above as the need.

use std::fs;
use std::path::Path;

/// What [`release_program_text`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Bytes of code mappings whose pages were dropped.
    pub bytes: usize,
    /// Code mappings left alone: they hold private copies of pages (a
    /// debugger's breakpoint or a uprobe writes one; dropping it would
    /// silently remove the breakpoint), or /proc did not say whether they do.
    pub kept: usize,
    /// Mappings the kernel refused to drop, or 1 if /proc could not be read.
    pub failed: usize,
}

/// Drops the pages of the executable's own code mappings (`r-xp`, backed by
/// the file `/proc/self/exe` names) that are all clean copies of the file.
/// Without `/proc` it does nothing, and says so in `failed`.
pub fn release_program_text() -> Released {
    let mut released = Released::default();
    let (Ok(exe), Ok(smaps)) = (
        fs::read_link("/proc/self/exe"),
        fs::read("/proc/self/smaps"),
    ) else {
        released.failed = 1;
        return released;
    };
    // Paths need not be UTF-8; compared the same lossy way on both sides.
    let smaps = String::from_utf8_lossy(&smaps);
    for mapping in code_mappings(&smaps, &exe) {
        if !mapping.only_file_pages() {
            released.kept += 1;
        } else if madvise_dontneed(mapping.start, mapping.end - mapping.start) {
            released.bytes += mapping.end - mapping.start;
        } else {
            released.failed += 1;
        }
    }
    released
}

/// One executable mapping of `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct CodeMapping {
    start: usize,
    end: usize,
    /// `Anonymous:`: pages of the mapping that are private copies in memory.
    anonymous_kib: Option<u64>,
    /// `Swap:`: private copies swapped out.
    swap_kib: Option<u64>,
}

impl CodeMapping {
    /// Every page is the file's own: /proc said so for both the private
    /// copies in memory and those swapped out. (`Private_Dirty` would not
    /// do: it also counts file pages the page cache has not yet written
    /// back, as for an executable just copied.)
    fn only_file_pages(&self) -> bool {
        self.anonymous_kib == Some(0) && self.swap_kib == Some(0)
    }
}

/// The `r-xp` mappings of `exe` in `smaps`.
fn code_mappings(smaps: &str, exe: &Path) -> Vec<CodeMapping> {
    let exe = exe.to_string_lossy();
    let mut found = Vec::new();
    let mut current: Option<CodeMapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        // A mapping's header: "start-end perms offset dev inode   path"; no
        // field line's name has a '-' in it.
        if let Some((start, end)) = first.split_once('-') {
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
                if path == exe && end > start {
                    current = Some(CodeMapping {
                        start,
                        end,
                        anonymous_kib: None,
                        swap_kib: None,
                    });
                }
            }
            continue;
        }
        let Some(mapping) = current.as_mut() else {
            continue;
        };
        // Unreadable stays `None`: when unsure, the mapping is left alone.
        let kib = fields.next().and_then(|v| v.parse().ok());
        match first {
            "Anonymous:" => mapping.anonymous_kib = kib,
            "Swap:" => mapping.swap_kib = kib,
            _ => {}
        }
    }
    found.extend(current);
    found
}

/// Drops the page-table entries of `start..start + len`; false if the
/// kernel refused.
#[cfg(target_os = "linux")]
fn madvise_dontneed(start: usize, len: usize) -> bool {
    // SAFETY: `start..start + len` is a whole mapping of this process, read
    // from /proc/self/smaps a moment ago: a private, read-only, executable
    // mapping of the executable file with no private copy of any page, in
    // memory or in swap (checked by the caller). For such a mapping
    // MADV_DONTNEED only drops page-table entries, exactly what the kernel
    // does when it reclaims clean file pages, which it may do at any time
    // anyway: every later access maps the same bytes again from the file,
    // so no thread, this one included, running code in the range can tell
    // except by the time of a minor fault. The mapping itself stays. (A
    // breakpoint set in the moment between reading smaps and this call
    // would be lost; a debugger attaching at start-up is the one case, and
    // it can set breakpoints after the "serving" log line.)
    #[allow(unsafe_code)]
    let done = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    done == 0
}

#[cfg(not(target_os = "linux"))]
fn madvise_dontneed(_start: usize, _len: usize) -> bool {
    false
}

/// Memory the C allocator holds for the process but nobody uses, after a
/// burst: glibc's malloc keeps what a burst of requests freed (10,000 in
/// flight at once left about 190 MiB resident, loadtests/RESULTS.md "Memory
/// through request bursts"), returning to the kernel only what sits at the
/// very top of its heap. [`release_free_heap`] hands the rest back.
///
/// Bytes the allocator holds free (`fordblks` of `mallinfo2`); `None` where
/// the allocator is not glibc's.
pub fn free_heap_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallinfo2` takes no arguments and returns a struct by
        // value; glibc takes each arena's lock while it sums that arena, so
        // it is safe to call from any thread while others allocate.
        #[allow(unsafe_code)]
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// When the allocator holds more than `above` bytes free, gives every whole
/// free page back to the kernel (`malloc_trim(0)`, which since glibc 2.8
/// releases free pages inside each arena, not only at its top). Returns the
/// free bytes it saw, when it trimmed. It walks the arenas under their
/// locks: call it off the runtime's threads, and not often.
pub fn release_free_heap(above: usize) -> Option<usize> {
    let free = free_heap_bytes().filter(|free| *free > above)?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes a padding size (0: keep none at the
        // top) and only returns free pages of glibc's own arenas to the
        // kernel under their locks (`MADV_DONTNEED` on whole free pages,
        // shrinking the heap top); memory any live allocation uses is never
        // touched, so it is safe while other threads allocate and free.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0)
        };
    }
    Some(free)
}

/// Has tokio's reactor watch `poll`'s own epoll set, as one descriptor (the
/// parking lot's, `proxy/src/lot.rs`: idle connections watched by an epoll
/// set of the proxy's own, woken as one readable event).
///
/// tokio's safe `AsyncFd::new` is deprecated (tokio#8587): an arbitrary
/// `AsRawFd` could close or swap its descriptor while registered. What is
/// left is `unsafe` `AsyncFd::register`, whose contract the caller keeps,
/// so it is here with the workspace's other unsafe calls.
pub fn watch_epoll(poll: mio::Poll) -> std::io::Result<tokio::io::unix::AsyncFd<mio::Poll>> {
    // SAFETY: the descriptor must be valid, open and the same one for as
    // long as the `AsyncFd` owns `poll`. A `mio::Poll` creates its epoll
    // descriptor in `Poll::new` and closes it only when dropped; it never
    // replaces it, and `as_raw_fd` returns that one descriptor. The
    // `AsyncFd` takes `poll` by value and owns it until it is dropped or
    // `into_inner` hands it back, so the descriptor outlives the
    // registration and no other code can close it meanwhile.
    #[allow(unsafe_code)]
    let watched = unsafe { tokio::io::unix::AsyncFd::register(poll) };
    watched.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXE: &str = "/usr/local/bin/switchyard";

    /// As the kernel writes it: the path after padding.
    fn header(range: &str, perms: &str, path: &str) -> String {
        format!("{range} {perms} 00000000 fd:01 1234                       {path}\n")
    }

    fn fields(anonymous: &str, swap: &str) -> String {
        format!(
            "Rss:                 832 kB\nPrivate_Dirty:       832 kB\nAnonymous:      {anonymous} kB\nSwap:           {swap} kB\nVmFlags: rd ex mr mw me dw sd\n"
        )
    }

    #[test]
    fn the_executables_own_code_mappings_are_found_with_their_private_copies() {
        let smaps = [
            header("55d0c6e00000-55d0c6f00000", "r--p", EXE) + &fields("0", "0"),
            header("55d0c6f00000-55d0c7700000", "r-xp", EXE) + &fields("0", "0"),
            header("55d0c7700000-55d0c7733000", "r--p", EXE) + &fields("204", "0"),
            header("7f0000000000-7f0000100000", "r-xp", "/usr/lib/libc.so.6") + &fields("0", "0"),
            header(
                "7f0000200000-7f0000300000",
                "r-xp",
                &format!("{EXE} (deleted)"),
            ) + &fields("0", "0"),
            header("7f0000400000-7f0000401000", "r-xp", EXE) + &fields("4", "0"),
            header("7f0000500000-7f0000501000", "r-xp", EXE) + &fields("0", "4"),
        ]
        .concat();
        let found = code_mappings(&smaps, Path::new(EXE));
        let summary: Vec<_> = found
            .iter()
            .map(|m| (m.start, m.only_file_pages()))
            .collect();
        assert_eq!(
            summary,
            [
                (0x55d0c6f00000, true),
                (0x7f0000400000, false), // a private copy in memory
                (0x7f0000500000, false), // a private copy swapped out
            ]
        );
        assert_eq!(found[0].end, 0x55d0c7700000);
    }

    #[test]
    fn a_deleted_executable_is_found_by_the_name_proc_gives_it() {
        let deleted = format!("{EXE} (deleted)");
        let smaps = header("1000-2000", "r-xp", &deleted) + &fields("0", "0");
        let found = code_mappings(&smaps, Path::new(&deleted));
        assert_eq!(found.len(), 1);
        assert!(found[0].only_file_pages());
    }

    #[test]
    fn a_mapping_proc_says_too_little_about_is_left_alone() {
        for smaps in [
            header("1000-2000", "r-xp", EXE) + "Anonymous: ? kB\nSwap: 0 kB\n",
            header("1000-2000", "r-xp", EXE) + "Swap: 0 kB\n",
            header("1000-2000", "r-xp", EXE) + "Anonymous: 0 kB\n",
        ] {
            let found = code_mappings(&smaps, Path::new(EXE));
            assert!(!found[0].only_file_pages(), "{smaps}");
        }
    }
}
