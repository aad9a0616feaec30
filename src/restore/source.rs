//! Where a served restore's pages are: the plan staged beside the images
//! (`lazy.json`, written by [`super::lazy::stage`]), and the page source
//! built from it, which the restore's pusher ([`super::push`]) reads the
//! pages through, its working set ([`super::working_set`]) first.
//!
//! The plan names the archive and each pages image's offset and length in
//! it, and whether the restore is a full one: served the same way, but
//! answered only once every page is in ([`Plan::full`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::archive::regular_file;
use super::pagemap::{Pagemap, PAGE_SIZE};
use super::working_set::{self, WorkingSet};
use crate::error::{Context, Error, Result};

/// The plan's file name in a served restore's dir.
pub const PLAN: &str = "lazy.json";

/// Where a served restore's pages are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub archive: PathBuf,
    /// Each lazily served `pages-<id>.img`, by id: where it is in the archive.
    pub pages: BTreeMap<u32, Member>,
    /// A full restore: the runtime's create returns only once the page source
    /// has pushed every page, so the memory is all in place when
    /// StartContainer is answered, as after a restore from copied images.
    #[serde(default)]
    pub full: bool,
    /// Background pushes in flight on the node at once (the config's
    /// `lazy_push_slots`; unset: [`super::slots::Slots::default_count`]).
    #[serde(default)]
    pub push_slots: Option<usize>,
}

impl Plan {
    /// The plan staged in `dir`, if the restore there is a served one.
    pub fn read(dir: &Path) -> Result<Option<Plan>> {
        let path = dir.join(PLAN);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Other(format!("{PLAN}: {e}")))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub at: u64,
    pub len: u64,
}

/// The process pagemaps in `images` (`pagemap-<pid>.img`), by pid.
pub fn pagemaps(images: &Path) -> Result<Vec<(u64, Pagemap)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(images).ctx(|| format!("list {}", images.display()))? {
        let e = e.ctx(|| format!("list {}", images.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("pagemap-")
            .and_then(|s| s.strip_suffix(".img"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(pid) = pid {
            let bytes = std::fs::read(e.path()).ctx(|| format!("read {name}"))?;
            let pm = Pagemap::parse(&bytes)
                .map_err(|err| Error::InvalidArgument(format!("{name}: {err}")))?;
            out.push((pid, pm));
        }
    }
    Ok(out)
}

/// Where the restored processes' lazy pages are: the archive, open, and
/// each process's pagemap with its pages' offset in the archive.
pub struct Source {
    file: File,
    procs: HashMap<u64, (Pagemap, u64)>,
    working_set: WorkingSet,
    /// Where the working set came from: the archive, a record of an
    /// earlier restore of it, or nowhere.
    pub working_set_from: WorkingSetFrom,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WorkingSetFrom {
    Archive,
    Recorded,
    None,
}

impl Source {
    /// From a staged lazy restore (`dir`: holding `lazy.json` and `checkpoint/`).
    pub fn open(dir: &Path) -> Result<Source> {
        let plan = Plan::read(dir)?.ok_or_else(|| {
            Error::Other(format!(
                "{} is not a served restore (no {PLAN})",
                dir.display()
            ))
        })?;
        let file = regular_file(&plan.archive)?;
        // The archive may have changed since it was checked at CreateContainer.
        let len = file.metadata().ctx(|| "stat the archive".into())?.len();
        if let Some(m) = plan.pages.values().find(|m| m.at + m.len > len) {
            return Err(Error::InvalidArgument(format!(
                "{} no longer holds its pages (cut at {len}, pages end at {})",
                plan.archive.display(),
                m.at + m.len
            )));
        }
        let mut procs = HashMap::new();
        for (pid, pm) in pagemaps(&dir.join("checkpoint"))? {
            if let Some(m) = plan.pages.get(&pm.pages_id) {
                procs.insert(pid, (pm, m.at));
            }
        }
        let (working_set, working_set_from) = find_working_set(dir, &plan.archive)?;
        Ok(Source {
            file,
            procs,
            working_set,
            working_set_from,
        })
    }

    /// Process `pid`'s working set, to go in first: (address, bytes) runs.
    pub fn working_set(&self, pid: u64) -> Vec<(u64, u64)> {
        self.working_set.ranges(pid)
    }

    /// Where in the archive process `pid`'s pages from `vaddr` on are, and how
    /// many (at most `max`) follow there.
    pub fn find(&self, pid: u64, vaddr: u64, max: u64) -> Option<(u64, u64)> {
        let (pm, base) = self.procs.get(&pid)?;
        pm.find(vaddr, max).map(|(off, n)| (base + off, n))
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Process `pid`'s pages the restore leaves to the page source, run by
    /// run: (address, bytes, offset in the archive).
    pub fn lazy_runs(&self, pid: u64) -> Vec<(u64, u64, u64)> {
        let Some((pm, base)) = self.procs.get(&pid) else {
            return Vec::new();
        };
        pm.runs
            .iter()
            .filter(|r| r.present() && r.lazy())
            .map(|r| (r.vaddr, r.nr_pages * PAGE_SIZE, base + r.offset))
            .collect()
    }

    /// Where in the archive each process's pages are: (offset, bytes).
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.procs
            .values()
            .map(|(pm, base)| (*base, pm.pages_bytes()))
            .collect()
    }

    /// How many pages are there to serve, over all processes.
    pub fn lazy_pages(&self) -> u64 {
        self.procs
            .values()
            .flat_map(|(pm, _)| pm.runs.iter())
            .filter(|r| r.present() && r.lazy())
            .map(|r| r.nr_pages)
            .sum()
    }
}

/// The working set staged from the archive, else one recorded by an earlier
/// lazy restore of it on this node (under the restore root, `dir`'s parent).
fn find_working_set(dir: &Path, archive: &Path) -> Result<(WorkingSet, WorkingSetFrom)> {
    if let Some(ws) = WorkingSet::read(&dir.join(working_set::MEMBER))? {
        return Ok((ws, WorkingSetFrom::Archive));
    }
    let recorded = dir
        .parent()
        .map(|root| working_set::recorded_path(root, archive))
        .transpose()?;
    // A record is only a hint of this node's: an unreadable one is ignored.
    match recorded.and_then(|p| WorkingSet::read(&p).ok().flatten()) {
        Some(ws) => Ok((ws, WorkingSetFrom::Recorded)),
        None => Ok((WorkingSet::default(), WorkingSetFrom::None)),
    }
}

/// A source for page-server tests: process `pid`'s pagemap image `pm`, its
/// pages image in a file of its own in `dir`, page `i` of it filled with
/// [`Source::test_byte`]`(i)`.
#[cfg(test)]
impl Source {
    pub fn for_test(dir: &Path, pid: u64, pm: &[u8]) -> Source {
        let pm = Pagemap::parse(pm).unwrap();
        let mut pages = Vec::new();
        for i in 0..pm.pages_bytes() / PAGE_SIZE {
            pages.extend(std::iter::repeat_n(Self::test_byte(i), PAGE_SIZE as usize));
        }
        let path = dir.join(format!("pages-{}.img", pm.pages_id));
        std::fs::write(&path, pages).unwrap();
        Source {
            file: File::open(path).unwrap(),
            procs: HashMap::from([(pid, (pm, 0))]),
            working_set: WorkingSet::default(),
            working_set_from: WorkingSetFrom::None,
        }
    }

    pub fn set_working_set(&mut self, ws: WorkingSet) {
        self.working_set = ws;
        self.working_set_from = WorkingSetFrom::Archive;
    }

    pub fn test_byte(page: u64) -> u8 {
        (page % 251) as u8 + 1
    }
}
