//! A lazy restore's checkpoint: everything but the memory pages staged, the
//! pages left where they are in the archive and served from there as the
//! restored process touches them ([`super::push`]).
//!
//! CRIU's restore still reads the pages it does not leave to the lazy-pages
//! daemon (those not marked `PE_LAZY`: the stack, a few KiB) from
//! `pages-<id>.img`, at their usual offset. So each process's pages image is
//! staged as a sparse file of its full length holding only those pages.
//! Pages images no process's pagemap names (shared memory's, restored in
//! full by CRIU) are copied whole.
//!
//! `lazy.json` beside the images ([`super::source::Plan`]) says where the
//! pages are, and whether the restore is a full one. Either way no page is
//! copied into the restore dir. An archive's `working-set.json`
//! ([`super::working_set`]) is checked here like any other member.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::archive::{check_entry, extract_except, regular_file};
use super::pagemap::{Pagemap, PAGE_SIZE};
use super::source::{pagemaps, Member, Plan, PLAN};
use crate::error::{Context, Error, Result};

/// The CreateContainer annotation that asks for a lazy restore (`"true"`) or
/// a full one (`"false"`), whatever the config's `lazy_pages` says.
pub const ANNOTATION: &str = "io.ckpt-shim.lazy-pages";

/// Whether a lazy restore is asked for: the request's annotation, else the config.
pub fn wanted(annotations: &HashMap<String, String>, config_default: bool) -> bool {
    match annotations.get(ANNOTATION).map(|v| v.trim()) {
        Some("true") => true,
        Some("false") => false,
        _ => config_default,
    }
}

/// Stages `archive` into `dest` (a fresh private dir) for a served restore
/// (lazy, or `full`), and writes `lazy.json` there. The pages' sizes are
/// checked against the pagemaps and the archive's length, so a truncated
/// archive fails here, before anything runs, not when the process touches the
/// missing page.
pub fn stage(archive: &Path, dest: &Path, full: bool, push_slots: Option<usize>) -> Result<Plan> {
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
    // A forged working set is refused here, like any other bad member.
    super::working_set::WorkingSet::read(&dest.join(super::working_set::MEMBER))?;
    let plan = Plan {
        archive: std::fs::canonicalize(archive).ctx(|| format!("resolve {}", archive.display()))?,
        pages: lazy,
        full,
        push_slots,
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

#[cfg(test)]
mod tests {
    use super::super::pagemap::{encode, PE_LAZY, PE_PRESENT};
    use super::super::source::Source;
    use super::*;
    use std::path::PathBuf;

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
        let plan = stage(&ar, &dest, false, None).unwrap();
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
        let err = stage(&ar, &dest, true, None).unwrap_err().to_string();
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
