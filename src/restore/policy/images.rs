//! The CRIU images a restore would act on, read and decoded as hostile input:
//! every file is bounded in size, every entry must decode, and the entries
//! the checks judge may hold no field the checks do not know.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use criu_rpc::image::{self, Kind};
use criu_rpc::images::{
    CoreEntry, GhostFileEntry, InventoryEntry, MntEntry, PstreeEntry, SeccompEntry,
    TaskKobjIdsEntry, TtyInfoEntry,
};
use prost::Message;

use crate::error::{Error, Result};
use crate::pbwire::Fields;

/// No image the checks read is near this size; a bigger one is forged.
const MAX_IMAGE: u64 = 16 << 20;
/// Processes and threads one checkpoint may hold.
const MAX_THREADS: usize = 1 << 16;

/// One thread's core image, decoded, with its raw bytes for a rewrite.
#[derive(Debug)]
pub struct Thread {
    pub tid: u32,
    pub file: PathBuf,
    pub raw: Vec<u8>,
    pub core: CoreEntry,
}

#[derive(Debug)]
pub struct Task {
    pub pstree: PstreeEntry,
    /// Its namespaces (`ids-<pid>.img`), which CRIU creates or joins by.
    pub ids: Option<TaskKobjIdsEntry>,
    /// The leader first.
    pub threads: Vec<Thread>,
}

/// CRIU's `TASK_DEAD`: a zombie.
const TASK_DEAD: u32 = 2;

impl Thread {
    /// A zombie's core: a task state of dead and no thread state.
    pub fn zombie(&self) -> bool {
        self.core.thread_core.is_none()
            && self.core.tc.as_ref().and_then(|t| t.task_state) == Some(TASK_DEAD)
    }
}

impl Task {
    pub fn leader(&self) -> &Thread {
        &self.threads[0]
    }

    /// How a refusal names it: `pid 7 (nginx)`.
    pub fn name(&self) -> String {
        let comm = self
            .leader()
            .core
            .tc
            .as_ref()
            .and_then(|t| t.comm.clone())
            .unwrap_or_default();
        format!("pid {} ({comm})", self.pstree.pid)
    }
}

#[derive(Debug)]
pub struct Images {
    pub dir: PathBuf,
    pub inventory: InventoryEntry,
    /// The root of the tree first.
    pub tasks: Vec<Task>,
    pub seccomp: Option<SeccompEntry>,
    /// Mount images by file name.
    pub mounts: BTreeMap<String, Vec<MntEntry>>,
    pub ghosts: Vec<(String, GhostFileEntry)>,
    pub ttys: Vec<TtyInfoEntry>,
    /// The tmpfs contents CRIU unpacks (`tmpfs-dev-<mnt>.tar.gz.img`).
    pub tmpfs: Vec<String>,
}

pub fn bad(image: impl AsRef<Path>, why: impl std::fmt::Display) -> Error {
    let name = image
        .as_ref()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    Error::BadImage {
        image: name.into_owned(),
        why: why.to_string(),
    }
}

impl Images {
    pub fn read(dir: &Path) -> Result<Images> {
        let inventory = decode_one::<InventoryEntry>(dir, "inventory.img", Kind::Inventory)?;
        let tasks = read_tasks(dir)?;
        let mut out = Images {
            dir: dir.to_path_buf(),
            inventory,
            tasks,
            seccomp: None,
            mounts: BTreeMap::new(),
            ghosts: Vec::new(),
            ttys: Vec::new(),
            tmpfs: Vec::new(),
        };
        if dir.join("seccomp.img").exists() {
            out.seccomp = Some(decode_one(dir, "seccomp.img", Kind::Seccomp)?);
        }
        for name in file_names(dir)? {
            if name.starts_with("mountpoints-") {
                let entries = decode_all::<MntEntry>(dir, &name, Kind::Mountpoints)?;
                out.mounts.insert(name, entries);
            } else if name.starts_with("ghost-file-") {
                let bytes = read(&dir.join(&name))?;
                let first = image::first(&bytes, Kind::GhostFile).map_err(|e| bad(&name, e))?;
                let g = GhostFileEntry::decode(first).map_err(|e| bad(&name, e))?;
                out.ghosts.push((name, g));
            } else if name.starts_with("pagemap-") {
                pages_match(dir, &name)?;
            } else if name.starts_with("tmpfs-dev-") {
                out.tmpfs.push(name);
            } else if name.starts_with("creds-") {
                return Err(bad(
                    &name,
                    "per-task creds images (CRIU before 3.x) are not restored",
                ));
            }
        }
        if dir.join("tty-info.img").exists() {
            out.ttys = decode_all(dir, "tty-info.img", Kind::TtyInfo)?;
        }
        Ok(out)
    }
}

fn read_tasks(dir: &Path) -> Result<Vec<Task>> {
    let pstree = decode_all::<PstreeEntry>(dir, "pstree.img", Kind::Pstree)?;
    if pstree.is_empty() {
        return Err(bad("pstree.img", "no process"));
    }
    let total: usize = pstree.iter().map(|p| p.threads.len().max(1)).sum();
    if total > MAX_THREADS {
        return Err(bad(
            "pstree.img",
            format!("{total} threads (at most {MAX_THREADS})"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut tasks = Vec::with_capacity(pstree.len());
    for p in pstree {
        let tids = if p.threads.is_empty() {
            vec![p.pid]
        } else {
            p.threads.clone()
        };
        if tids[0] != p.pid {
            return Err(bad(
                "pstree.img",
                format!("pid {}: its first thread is {}", p.pid, tids[0]),
            ));
        }
        let mut threads = Vec::with_capacity(tids.len());
        for tid in tids {
            if !seen.insert(tid) {
                return Err(bad("pstree.img", format!("thread {tid} appears twice")));
            }
            threads.push(read_thread(dir, tid)?);
        }
        let ids_img = format!("ids-{}.img", p.pid);
        let ids = match dir.join(&ids_img).exists() {
            true => decode_all::<TaskKobjIdsEntry>(dir, &ids_img, Kind::Ids)?.pop(),
            false => None,
        };
        if threads[0].zombie() && (threads.len() > 1 || tasks.is_empty()) {
            return Err(bad(
                "pstree.img",
                format!("pid {} is dead but is the root or has threads", p.pid),
            ));
        }
        tasks.push(Task {
            pstree: p,
            ids,
            threads,
        });
    }
    Ok(tasks)
}

fn read_thread(dir: &Path, tid: u32) -> Result<Thread> {
    let name = format!("core-{tid}.img");
    let file = dir.join(&name);
    let raw = read(&file)?;
    let entries = image::entries(&raw, Kind::Core).map_err(|e| bad(&name, e))?;
    let [entry] = entries.as_slice() else {
        return Err(bad(
            &name,
            format!("{} entries, one expected", entries.len()),
        ));
    };
    let core = CoreEntry::decode(*entry).map_err(|e| bad(&name, e))?;
    let creds = core.thread_core.as_ref().and_then(|t| t.creds.as_ref());
    let raw = entries[0].to_vec();
    if creds.is_none() {
        // A zombie is dumped with no thread state: CRIU restores it as a
        // child that exits at once, with nothing of its own.
        let thread = Thread {
            tid,
            file,
            raw,
            core,
        };
        return match thread.zombie() {
            true => Ok(thread),
            false => Err(bad(&name, "a thread without credentials")),
        };
    }
    // The credentials are rewritten whole: a field this schema lacks would be lost, or trusted.
    let creds_raw = Fields::parse(entry)
        .ok()
        .and_then(|c| c.get(5).map(<[u8]>::to_vec))
        .and_then(|t| Fields::parse(&t).ok()?.get(10).map(<[u8]>::to_vec))
        .unwrap_or_default();
    only_known(&name, "credentials", &creds_raw, 1..=19)?;
    Ok(Thread {
        tid,
        file,
        raw,
        core,
    })
}

/// Refuses a message with a field numbered outside `known`.
pub fn only_known(
    image: &str,
    what: &str,
    raw: &[u8],
    known: std::ops::RangeInclusive<u32>,
) -> Result<()> {
    let fields = Fields::parse(raw).map_err(|e| bad(image, e))?;
    let unknown = fields.numbers().find(|n| !known.contains(n));
    match unknown {
        Some(n) => Err(bad(image, format!("unknown field {n} in {what}"))),
        None => Ok(()),
    }
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| bad(path, e))?;
    let meta = f.metadata().map_err(|e| bad(path, e))?;
    if !meta.is_file() || meta.len() > MAX_IMAGE {
        return Err(bad(
            path,
            format!("not a regular file of at most {MAX_IMAGE} bytes"),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_IMAGE)
        .read_to_end(&mut out)
        .map_err(|e| bad(path, e))?;
    Ok(out)
}

fn decode_all<M: Message + Default>(dir: &Path, name: &str, kind: Kind) -> Result<Vec<M>> {
    let bytes = read(&dir.join(name))?;
    let entries = image::entries(&bytes, kind).map_err(|e| bad(name, e))?;
    entries
        .into_iter()
        .map(|e| M::decode(e).map_err(|e| bad(name, e)))
        .collect()
}

fn decode_one<M: Message + Default>(dir: &Path, name: &str, kind: Kind) -> Result<M> {
    let mut all = decode_all::<M>(dir, name, kind)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        n => Err(bad(name, format!("{n} entries, one expected"))),
    }
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| bad(dir, e))? {
        let e = e.map_err(|e| bad(dir, e))?;
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// A pagemap must parse, and its pages image must hold exactly the pages it
/// lists: CRIU would read past the end of a shorter one, late in the restore.
fn pages_match(dir: &Path, name: &str) -> Result<()> {
    let pm = crate::restore::pagemap::Pagemap::parse(&read(&dir.join(name))?)
        .map_err(|e| bad(name, e))?;
    let pages = format!("pages-{}.img", pm.pages_id);
    let len = std::fs::symlink_metadata(dir.join(&pages))
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    match len {
        Some(len) if len == pm.pages_bytes() => Ok(()),
        found => Err(bad(
            name,
            format!(
                "lists {} bytes of pages; {pages} holds {found:?}",
                pm.pages_bytes()
            ),
        )),
    }
}
