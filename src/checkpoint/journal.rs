//! Part of step 2 (freeze): the crash journal. A note on disk for each cgroup
//! the shim froze and each staging dir it uses, so that a shim restarted
//! after a crash ([`recover`]) thaws what it left frozen and removes what it
//! left staged. SIGKILL skips every guard; the journal does not need them.

use std::path::{Path, PathBuf};

use super::freeze::Freezer;
use crate::error::{Context, Result};

/// A note on disk, removed when dropped, for [`recover`] after a crash: that we
/// froze a cgroup ([`record`](Self::record)), or that a staging dir is in use
/// ([`staging`](Self::staging)).
#[derive(Debug)]
pub struct JournalEntry(PathBuf);

impl JournalEntry {
    /// Written before freezing and removed once the cgroup is thawed for good. If
    /// the shim dies in between (SIGKILL skips every guard) and CRIU, aborting,
    /// re-freezes the cgroup it found frozen, the restarted shim thaws it.
    pub fn record(dir: &Path, freezer: &Freezer) -> Result<JournalEntry> {
        let (kind, cg) = match freezer {
            Freezer::V1(p) => ("v1", p),
            Freezer::V2(p) => ("v2", p),
        };
        // One entry per cgroup: checkpoints of one container are serialised.
        Self::write(dir, cg, "frozen", &format!("{kind} {}\n", cg.display()))
    }

    /// Kept from the staging dir's creation until it is removed: a shim that dies
    /// at any point (during the dump, or after the thaw while it builds the
    /// archive) leaves its staging, with images or an unfinished archive inside,
    /// for [`recover`] to remove.
    pub fn staging(dir: &Path, staging: &Path) -> Result<JournalEntry> {
        Self::write(
            dir,
            staging,
            "staging",
            &format!("staging {}\n", staging.display()),
        )
    }

    /// The entry `<hash of key>.<kind>` in `dir`, holding `text`.
    fn write(dir: &Path, key: &Path, kind: &str, text: &str) -> Result<JournalEntry> {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let name = format!("{:016x}.{kind}", fnv1a(key.as_os_str().as_encoded_bytes()));
        let path = dir.join(name);
        std::fs::write(&path, text).ctx(|| format!("write {}", path.display()))?;
        Ok(JournalEntry(path))
    }
}

impl Drop for JournalEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Thaws every cgroup a previous shim left recorded as frozen by it, removes its
/// staging dir, and forgets the entry. Returns the cgroups it thawed.
pub fn recover(dir: &Path) -> Vec<PathBuf> {
    let mut thawed = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            let freezer = match line.split_once(' ') {
                Some(("v1", p)) => Freezer::V1(PathBuf::from(p)),
                Some(("v2", p)) => Freezer::V2(PathBuf::from(p)),
                Some(("staging", p)) => {
                    let p = Path::new(p);
                    if p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".ckpt-shim-staging-"))
                    {
                        let _ = std::fs::remove_dir_all(p);
                    }
                    continue;
                }
                _ => continue,
            };
            // A cgroup that is gone (container removed) needs nothing.
            if freezer.path().exists() && freezer.request(false).is_ok() {
                thawed.push(freezer.path().to_path_buf());
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    thawed
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_removes_a_noted_staging_dir_and_the_note() {
        let d = tempfile::tempdir().unwrap();
        let journal = d.path().join("frozen");
        let staging = d.path().join(".ckpt-shim-staging-abc");
        std::fs::create_dir_all(staging.join("checkpoint")).unwrap();
        std::fs::write(staging.join(".x.tar.1.ckpt-shim-tmp"), b"pages").unwrap();
        let other = d.path().join("not-staging");
        std::fs::create_dir(&other).unwrap();
        // A crash: the notes are never dropped.
        std::mem::forget(JournalEntry::staging(&journal, &staging).unwrap());
        std::mem::forget(JournalEntry::staging(&journal, &other).unwrap());
        assert_eq!(recover(&journal), Vec::<PathBuf>::new());
        assert!(!staging.exists(), "staging left");
        assert!(
            other.exists(),
            "only the shim's own staging dirs are removed"
        );
        assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
    }
}
