//! The heap release on a real process: after a burst of allocations is
//! freed, with a few survivors pinning the heap's top (as a burst of
//! requests leaves some long-lived allocation behind), the pages come back
//! only when trimmed. One test in its own binary: no other thread allocates.

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn freed_burst_memory_goes_back_to_the_kernel() {
    if switchyard_trim::free_heap_bytes().is_none() {
        eprintln!("SKIPPED: not glibc's allocator");
        return;
    }
    // About 100 MiB in 4 KiB blocks, touched so they are resident; every
    // 1000th kept, the rest freed.
    let mut blocks: Vec<Vec<u8>> = (0..25_000).map(|i| vec![i as u8; 4000]).collect();
    let before_free = rss_kib();
    let survivors: Vec<Vec<u8>> = blocks
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| i % 1000 == 999)
        .map(|(_, b)| std::mem::take(b))
        .collect();
    drop(blocks);
    let held = rss_kib();
    assert!(
        held > before_free / 2,
        "freed memory still held before the trim: {held} of {before_free} KiB"
    );
    // Below the threshold: nothing done.
    assert_eq!(switchyard_trim::release_free_heap(usize::MAX), None);
    let free = switchyard_trim::release_free_heap(16 << 20).expect("over 16 MiB free");
    assert!(free > 64 << 20, "{free} bytes free");
    let after = rss_kib();
    assert!(
        after < held - 64 * 1024,
        "the trim gave back less than 64 MiB: {held} -> {after} KiB"
    );
    assert_eq!(survivors.len(), 25);
    assert!(survivors.iter().all(|b| b.len() == 4000));
}
