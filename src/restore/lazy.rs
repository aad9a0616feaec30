//! A lazy restore's checkpoint: everything but the memory pages staged, the
//! pages left where they are in the archive and served from there as the
//! restored process touches them ([`super::page_server`]).
//!
//! CRIU's restore still reads the pages it does not leave to the lazy-pages
//! daemon (those not marked `PE_LAZY`: the stack, a few KiB) from
//! `pages-<id>.img`, at their usual offset, and opens that file even in the
//! daemon. So each process's pages image is staged as a sparse file of its
//! full length holding only those pages. Pages images no process's pagemap
//! names (shared memory's, restored in full by CRIU) are copied whole.
//!
//! `lazy.json` beside the images says where the pages are: the archive and
//! each pages image's offset and length in it, and whether the restore is a
//! full one: served the same way, but answered only once every page is in
//! ([`Plan::full`]). Either way no page is copied into the restore dir.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::archive::{check_entry, extract_except, regular_file};
use super::pagemap::{Pagemap, PAGE_SIZE};
use crate::error::{Context, Error, Result};

/// The CreateContainer annotation that asks for a lazy restore (`"true"`) or
/// a full one (`"false"`), whatever the config's `lazy_pages` says.
pub const ANNOTATION: &str = "io.ckpt-shim.lazy-pages";
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

/// Whether a lazy restore is asked for: the request's annotation, else the config.
pub fn wanted(annotations: &HashMap<String, String>, config_default: bool) -> bool {
    match annotations.get(ANNOTATION).map(|v| v.trim()) {
        Some("true") => true,
        Some("false") => false,
        _ => config_default,
    }
}

/// Whether the `criu` on PATH (what runc and the daemon run) speaks the
/// page-server protocol [`super::page_server`] does; asked once.
pub fn criu_supported() -> std::result::Result<(), String> {
    static ANSWER: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let out = std::process::Command::new("criu")
                .arg("--version")
                .output()
                .map_err(|e| format!("run criu --version: {e}"))?;
            super::page_server::check_criu_version(&String::from_utf8_lossy(&out.stdout))
        })
        .clone()
}

/// Stages `archive` into `dest` (a fresh private dir) for a served restore
/// (lazy, or `full`), and writes `lazy.json` there. The pages' sizes are
/// checked against the pagemaps and the archive's length, so a truncated
/// archive fails here, before anything runs, not when the process touches the
/// missing page.
pub fn stage(archive: &Path, dest: &Path, full: bool) -> Result<Plan> {
    let members = pages_members(archive)?;
    let skip: Vec<String> = members.keys().map(|id| member_name(*id)).collect();
    extract_except(archive, dest, &skip)?;
    let file = regular_file(archive)?;
    let archive_len = file
        .metadata()
        .ctx(|| format!("stat {}", archive.display()))?
        .len();
    let images = dest.join("checkpoint");
    let mut lazy = BTreeMap::new();
    for (_, pm) in pagemaps(&images)? {
        let m = *members.get(&pm.pages_id).ok_or_else(|| {
            Error::InvalidArgument(format!("the archive has no {}", member_name(pm.pages_id)))
        })?;
        check_member(archive, pm.pages_id, m, &pm, archive_len)?;
        write_resident(&file, m, &pm, &images.join(file_name(pm.pages_id)))?;
        lazy.insert(pm.pages_id, m);
    }
    for (id, m) in &members {
        if !lazy.contains_key(id) {
            let out = crate::safefs::create_new(&images.join(file_name(*id)), 0o600)?;
            crate::fcopy::copy_range(&file, m.at, &out, 0, m.len, true)
                .ctx(|| format!("extract {}", member_name(*id)))?;
        }
    }
    let plan = Plan {
        archive: std::fs::canonicalize(archive).ctx(|| format!("resolve {}", archive.display()))?,
        pages: lazy,
        full,
    };
    let json = serde_json::to_vec_pretty(&plan).expect("plain struct serialises");
    let mut f = crate::safefs::create_new(&dest.join(PLAN), 0o600)?;
    std::io::Write::write_all(&mut f, &json).ctx(|| PLAN.into())?;
    Ok(plan)
}

fn member_name(id: u32) -> String {
    format!("checkpoint/{}", file_name(id))
}

fn file_name(id: u32) -> String {
    format!("pages-{id}.img")
}

/// The archive's `checkpoint/pages-<id>.img` members, where they are.
fn pages_members(archive: &Path) -> Result<BTreeMap<u32, Member>> {
    let mut ar = tar::Archive::new(regular_file(archive)?);
    let mut out = BTreeMap::new();
    for entry in ar
        .entries_with_seek()
        .ctx(|| format!("read {}", archive.display()))?
    {
        let e = entry.ctx(|| format!("read {}", archive.display()))?;
        let name = check_entry(&e)?.to_string_lossy().into_owned();
        let id = name
            .strip_prefix("checkpoint/pages-")
            .and_then(|s| s.strip_suffix(".img"))
            .and_then(|s| s.parse().ok());
        if let Some(id) = id {
            let m = Member {
                at: e.raw_file_position(),
                len: e.size(),
            };
            out.insert(id, m);
        }
    }
    Ok(out)
}

fn check_member(archive: &Path, id: u32, m: Member, pm: &Pagemap, archive_len: u64) -> Result<()> {
    let want = pm.pages_bytes();
    if m.len != want || m.at + m.len > archive_len {
        return Err(Error::InvalidArgument(format!(
            "{}: {} holds {} of the {want} bytes of pages its pagemap lists (truncated?)",
            archive.display(),
            member_name(id),
            m.len.min(archive_len.saturating_sub(m.at)),
        )));
    }
    Ok(())
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

/// Writes `out`: a sparse file as long as the pages image, holding only the
/// pages the restore reads itself (present, not lazy), read from the archive.
fn write_resident(archive: &File, m: Member, pm: &Pagemap, out: &Path) -> Result<()> {
    let f = crate::safefs::create_new(out, 0o600)?;
    f.set_len(m.len).ctx(|| format!("size {}", out.display()))?;
    let mut buf = Vec::new();
    for r in pm.runs.iter().filter(|r| r.present() && !r.lazy()) {
        buf.resize((r.nr_pages * PAGE_SIZE) as usize, 0);
        archive
            .read_exact_at(&mut buf, m.at + r.offset)
            .ctx(|| format!("read pages at {:#x}", r.vaddr))?;
        f.write_all_at(&buf, r.offset)
            .ctx(|| format!("write {}", out.display()))?;
    }
    Ok(())
}

/// Where the restored processes' lazy pages are: the archive, open, and
/// each process's pagemap with its pages' offset in the archive.
pub struct Source {
    file: File,
    procs: HashMap<u64, (Pagemap, u64)>,
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
        Ok(Source { file, procs })
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
        }
    }

    pub fn test_byte(page: u64) -> u8 {
        (page % 251) as u8 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::super::pagemap::{encode, PE_LAZY, PE_PRESENT};
    use super::*;

    /// An archive of pid 1's images: 2 resident pages, then 3 lazy ones; each
    /// page filled with its index.
    fn archive(dir: &Path, cut: u64) -> PathBuf {
        let lp = PE_LAZY | PE_PRESENT;
        let pm = encode(1, &[(0x1000, 2, PE_PRESENT), (0x10000, 3, lp)]);
        let mut pages = Vec::new();
        for i in 0..5u8 {
            pages.extend(std::iter::repeat_n(i + 1, PAGE_SIZE as usize));
        }
        let path = dir.join("a.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        for (name, data) in [
            ("checkpoint/inventory.img", b"inv".to_vec()),
            ("checkpoint/pagemap-1.img", pm),
            ("checkpoint/pages-1.img", pages),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - cut)
            .unwrap();
        path
    }

    #[test]
    fn only_resident_pages_are_staged_and_lazy_ones_map_into_the_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let ar = archive(tmp.path(), 0);
        let dest = tmp.path().join("stage");
        std::fs::create_dir(&dest).unwrap();
        let plan = stage(&ar, &dest, false).unwrap();
        let staged = dest.join("checkpoint/pages-1.img");
        let data = std::fs::read(&staged).unwrap();
        assert_eq!(data.len() as u64, 5 * PAGE_SIZE);
        assert_eq!((data[0], data[PAGE_SIZE as usize]), (1, 2));
        assert!(data[2 * PAGE_SIZE as usize..].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&staged).unwrap().blocks() * 512 < 5 * PAGE_SIZE);
        let src = Source::open(&dest).unwrap();
        assert_eq!(src.lazy_pages(), 3);
        let (at, n) = src.find(1, 0x11000, 8).unwrap();
        assert_eq!((at, n), (plan.pages[&1].at + 3 * PAGE_SIZE, 2));
        let mut b = [0u8; 1];
        src.file().read_exact_at(&mut b, at).unwrap();
        assert_eq!(b[0], 4);
        assert_eq!(src.find(2, 0x11000, 1), None);
    }

    #[test]
    fn a_cut_in_the_pages_is_found_at_staging() {
        let tmp = tempfile::tempdir().unwrap();
        // Cut into the pages (past the tar's 1 KiB end and the padding).
        let ar = archive(tmp.path(), 1024 + 3 * 512 + 100);
        let dest = tmp.path().join("stage");
        std::fs::create_dir(&dest).unwrap();
        let err = stage(&ar, &dest, true).unwrap_err().to_string();
        assert!(err.contains("truncated") || err.contains("read"), "{err}");
    }

    #[test]
    fn the_annotation_wins_over_the_config() {
        let a = |v: &str| HashMap::from([(ANNOTATION.to_string(), v.to_string())]);
        assert!(wanted(&a("true"), false));
        assert!(!wanted(&a("false"), true));
        assert!(wanted(&HashMap::new(), true));
        assert!(!wanted(&a("maybe"), false));
    }
}
