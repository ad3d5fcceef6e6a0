//! This process's resident set size, for `embed_worker_resident_memory_bytes`.

/// The resident-memory gauge's resolution (1 MiB): far below what a dashboard or an alert on a
/// ~300 MB worker looks at, far above an idle process's page-level noise.
pub const RESIDENT_STEP: u64 = 1 << 20;

/// VmRSS from /proc/self/status (Linux), in bytes.
pub fn resident_set_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
