//! A checkpoint's working set: the pages each process touched last before
//! the freeze, or first after a restore, which a lazy restore's page source
//! puts in before any other background copy ([`super::push`]).
//!
//! It travels in the archive as `working-set.json` (beside `config.dump`):
//! a member like any other, so a checkpoint image, whose layer is the archive,
//! keeps it. Per process (the image pid of `pagemap-<pid>.img`): runs of
//! (address, pages), in the order they are to go in. It is a hint: a page
//! it names that the checkpoint does not leave to the page source is skipped.
//!
//! A lazy restore also records the pages its processes faulted on before
//! its background push was done (REAP's record of a first invocation), and
//! keeps them on the node beside the restore dirs, by the archive's identity
//! ([`recorded_path`]): the next lazy restore of the same archive or image
//! layer, if the archive holds no working set, pushes those first.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pagemap::PAGE_SIZE;
use crate::error::{Context, Error, Result};

/// The archive member (and its name in a staged restore's dir).
pub const MEMBER: &str = "working-set.json";
/// Where recorded working sets are kept, under the restore root.
pub const RECORDED_DIR: &str = ".working-sets";
/// A working set larger than this is refused: it is a list of runs, small
/// next to the pages it names.
const MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkingSet {
    pub version: u32,
    /// Runs of (address, pages) by image pid, in push order.
    pub processes: BTreeMap<u64, Vec<(u64, u64)>>,
}

impl WorkingSet {
    pub const VERSION: u32 = 1;

    /// Process `pid`'s runs as (address, bytes), in order.
    pub fn ranges(&self, pid: u64) -> Vec<(u64, u64)> {
        let runs = self.processes.get(&pid).map(Vec::as_slice).unwrap_or(&[]);
        runs.iter()
            .map(|&(addr, pages)| (addr, pages.saturating_mul(PAGE_SIZE)))
            .collect()
    }

    pub fn pages(&self) -> u64 {
        self.processes.values().flatten().map(|r| r.1).sum()
    }

    /// Parses and checks one (`what` names it in errors).
    pub fn parse(bytes: &[u8], what: &str) -> Result<WorkingSet> {
        let ws: WorkingSet = serde_json::from_slice(bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        if ws.version != Self::VERSION {
            return Err(Error::InvalidArgument(format!(
                "{what}: version {} (this shim reads {})",
                ws.version,
                Self::VERSION
            )));
        }
        let bad = ws.processes.values().flatten().find(|&&(addr, pages)| {
            !addr.is_multiple_of(PAGE_SIZE)
                || pages
                    .checked_mul(PAGE_SIZE)
                    .and_then(|l| addr.checked_add(l))
                    .is_none()
        });
        if let Some((addr, pages)) = bad {
            return Err(Error::InvalidArgument(format!(
                "{what}: run of {pages} pages at {addr:#x} is not page-aligned or overflows"
            )));
        }
        Ok(ws)
    }

    /// The one at `path`, if there is one.
    pub fn read(path: &Path) -> Result<Option<WorkingSet>> {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("open {}", path.display())),
        };
        let mut bytes = Vec::new();
        f.take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .ctx(|| format!("read {}", path.display()))?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{}: larger than {MAX_BYTES} bytes",
                path.display()
            )));
        }
        Self::parse(&bytes, &path.display().to_string()).map(Some)
    }

    /// Writes it to `path` (replacing what was there, atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let json = serde_json::to_vec(self).expect("plain struct serialises");
        let mut f = crate::safefs::create_new(&tmp, 0o600)?;
        std::io::Write::write_all(&mut f, &json).ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))
    }
}

/// A working set being recorded from faults: each process's runs in the
/// order they were first served, adjacent ones joined.
#[derive(Debug, Default)]
pub struct Recorder(BTreeMap<u64, Vec<(u64, u64)>>);

impl Recorder {
    /// `pid` faulted on `[addr, addr + len)` (page-aligned), served now.
    pub fn note(&mut self, pid: u64, addr: u64, len: u64) {
        let runs = self.0.entry(pid).or_default();
        let pages = len / PAGE_SIZE;
        match runs.last_mut() {
            Some(last) if last.0 + last.1 * PAGE_SIZE == addr => last.1 += pages,
            _ => runs.push((addr, pages)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn finish(self) -> WorkingSet {
        WorkingSet {
            version: WorkingSet::VERSION,
            processes: self.0,
        }
    }
}

/// Where a working set recorded for `archive` is kept under the restore
/// root: named by the archive's path, device, inode, size and change time,
/// so a changed or replaced archive never gets another's.
pub fn recorded_path(root: &Path, archive: &Path) -> Result<PathBuf> {
    let m = std::fs::metadata(archive).ctx(|| format!("stat {}", archive.display()))?;
    let mut h = Sha256::new();
    h.update(archive.as_os_str().as_encoded_bytes());
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        h.update(v.to_le_bytes());
    }
    let name: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(root.join(RECORDED_DIR).join(format!("{name}.json")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_faults_join_into_runs_in_order_and_read_back() {
        let p = PAGE_SIZE;
        let mut r = Recorder::default();
        r.note(1, 10 * p, 2 * p);
        r.note(1, 12 * p, p);
        r.note(1, 3 * p, p);
        r.note(2, 0, p);
        let ws = r.finish();
        assert_eq!(ws.processes[&1], [(10 * p, 3), (3 * p, 1)]);
        assert_eq!(ws.ranges(1), [(10 * p, 3 * p), (3 * p, p)]);
        assert_eq!(ws.pages(), 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMBER);
        ws.write(&path).unwrap();
        assert_eq!(WorkingSet::read(&path).unwrap(), Some(ws));
        assert_eq!(WorkingSet::read(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn forged_working_sets_are_refused() {
        let bad = |s: &str| {
            WorkingSet::parse(s.as_bytes(), "ws")
                .unwrap_err()
                .to_string()
        };
        assert!(bad(r#"{"version":2,"processes":{}}"#).contains("version 2"));
        assert!(bad(r#"{"version":1,"processes":{"1":[[4097,1]]}}"#).contains("aligned"));
        let huge = format!(
            r#"{{"version":1,"processes":{{"1":[[4096,{}]]}}}}"#,
            u64::MAX
        );
        assert!(bad(&huge).contains("overflows"));
        assert!(bad("nope").contains("ws:"));
    }

    #[test]
    fn a_recorded_set_is_named_by_the_archives_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tar");
        std::fs::write(&a, "one").unwrap();
        let first = recorded_path(dir.path(), &a).unwrap();
        assert_eq!(first, recorded_path(dir.path(), &a).unwrap());
        assert!(first.starts_with(dir.path().join(RECORDED_DIR)));
        std::fs::write(&a, "other").unwrap();
        assert_ne!(first, recorded_path(dir.path(), &a).unwrap());
    }
}
