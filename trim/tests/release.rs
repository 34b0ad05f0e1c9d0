//! The release on a real process: this test binary's own code. One test in
//! its own binary, so no other test thread runs code meanwhile.

use std::fs;

/// Resident KiB of this executable's code mappings, from /proc/self/smaps.
fn resident_code_kib() -> u64 {
    let exe = fs::read_link("/proc/self/exe").unwrap();
    let exe = exe.to_str().unwrap();
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_code = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some((range, rest)) = line.split_once(' ') {
            if range.contains('-') && !range.ends_with(':') {
                in_code = rest.starts_with("r-xp") && rest.trim_end().ends_with(exe);
                continue;
            }
        }
        if in_code {
            if let Some(v) = line.strip_prefix("Rss:") {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
    }
    kib
}

#[test]
fn released_code_leaves_the_resident_set_and_runs_on() {
    if fs::metadata("/proc/self/smaps").is_err() {
        eprintln!("skipped: no /proc/self/smaps on this system");
        return;
    }
    let before = resident_code_kib();
    let released = switchyard_trim::release_program_text();
    let after = resident_code_kib();
    assert!(released.bytes > 0, "{released:?}");
    assert_eq!((released.kept, released.failed), (0, 0), "{released:?}");
    // Only what ran since (returning, reading smaps, with the pages the
    // kernel maps around each fault) is mapped again. Without the release
    // nothing would leave, and reading smaps maps more.
    assert!(
        after < before,
        "resident code {before} KiB before, {after} KiB after"
    );
    // And the code still runs: the same functions, called again.
    let again = switchyard_trim::release_program_text();
    assert!(again.bytes > 0, "{again:?}");
}
