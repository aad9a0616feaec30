//! The node's memory as `/proc/meminfo` reports it, read in one place: the
//! hold budget ([`crate::checkpoint::hold::budget`]) and the sink's writeback estimate
//! both ask for `MemAvailable`.

/// `MemAvailable` in bytes: what can be had without swapping.
pub fn available() -> Option<u64> {
    value("MemAvailable")
}

/// The `key` line's value in bytes (the file counts in kB); `None` if the
/// file cannot be read, or has no such line in kB.
pub fn value(key: &str) -> Option<u64> {
    parse(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn parse(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_in_kb_is_read_in_bytes() {
        let m = "MemTotal:        8000 kB\nMemAvailable:    2048 kB\nHugePages_Total:       0\n";
        assert_eq!(parse(m, "MemAvailable"), Some(2 << 20));
        assert_eq!(parse(m, "MemTotal"), Some(8000 * 1024));
        assert_eq!(parse(m, "Mem"), None, "a whole key only");
        assert_eq!(parse(m, "HugePages_Total"), None, "not in kB");
        assert!(available().is_some_and(|n| n > 0));
    }
}
