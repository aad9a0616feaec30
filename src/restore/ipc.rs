//! A restore into an IPC namespace it joins: a pod's, shared by its
//! containers.
//!
//! CRIU dumps the whole IPC namespace of a task with each checkpoint, so each
//! container of a pod checkpoint carries the pod's SysV objects (PostgreSQL's
//! interlock segment, say). At restore, CRIU recreates every object of its
//! images in the namespace the task ends up in, even one it joins
//! (`--join-ns`, what runc asks for a namespace the spec names by path), and
//! creating one that exists fails (`criu/ipc_ns.c: Failed to create shm set:
//! File exists`). So the first container of a restored pod recreates the
//! pod's objects, and the next one would fail.
//!
//! The rule: before a restore into a joined IPC namespace, an object of the
//! images that the namespace already holds, the same one (its id, key,
//! permissions, owner and size), is left out of the images, and the process
//! finds it as it was shared. One that takes its id or its key but differs is
//! refused ([`Error::IpcTaken`]): the process would be attached to another
//! object. One the namespace does not hold stays, for CRIU to create.

use std::path::{Path, PathBuf};

use criu_rpc::image::{self, IpcObject, Kind};
use criu_rpc::images::IpcDescEntry;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Context, Error, Result};

/// The three kinds of SysV object, in the order of [`Class::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Shm,
    Msg,
    Sem,
}

impl Class {
    const ALL: [Class; 3] = [Class::Shm, Class::Msg, Class::Sem];

    fn kind(self) -> Kind {
        match self {
            Class::Shm => Kind::IpcShm,
            Class::Msg => Kind::IpcMsg,
            Class::Sem => Kind::IpcSem,
        }
    }

    /// Its name in /proc/sysvipc and in CRIU's `ipcns-<name>-<id>.img`.
    fn name(self) -> &'static str {
        match self {
            Class::Shm => "shm",
            Class::Msg => "msg",
            Class::Sem => "sem",
        }
    }

    /// The columns of /proc/sysvipc/<name> for its id and its size (none for
    /// a queue: its messages come and go).
    fn columns(self) -> (&'static str, Option<&'static str>) {
        match self {
            Class::Shm => ("shmid", Some("size")),
            Class::Msg => ("msqid", None),
            Class::Sem => ("semid", Some("nsems")),
        }
    }
}

/// A SysV object, as the namespace lists it or the checkpoint has it: what
/// makes it the same object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub id: u32,
    pub key: u32,
    /// The permission bits (not SHM_DEST, SHM_LOCKED).
    pub perms: u32,
    pub uid: u32,
    pub gid: u32,
    /// A segment's bytes or a set's semaphores; none for a queue.
    pub size: Option<u64>,
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "id {} key {:#010x} perms {:o} uid {} gid {}",
            self.id, self.key, self.perms, self.uid, self.gid
        )?;
        match self.size {
            Some(s) => write!(f, " size {s}"),
            None => Ok(()),
        }
    }
}

/// Leaves out of the images at `images` the SysV objects that the IPC
/// namespace the spec joins already holds (the module's rule); nothing to do
/// when the spec has an IPC namespace of its own.
pub fn drop_live_objects(spec: &Spec, images: &Path) -> Result<()> {
    let Some(ns) = joined_ipc(spec) else {
        return Ok(());
    };
    let files = ipc_images(images)?;
    if files.is_empty() {
        return Ok(());
    }
    let live = live_objects(&ns)?;
    for (class, path) in files {
        let bytes = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
        let attached = match class {
            Class::Shm => attached_segments(images)?,
            _ => Vec::new(),
        };
        if let Some(kept) = without_live(&bytes, class, &live[class as usize], &attached)? {
            std::fs::write(&path, kept).ctx(|| format!("write {}", path.display()))?;
        }
    }
    Ok(())
}

/// CRIU's mark of a mapping of a SysV segment (criu/include/image.h).
const VMA_AREA_SYSVIPC: u32 = 1 << 10;

/// The ids of the SysV segments the checkpoint's processes attach (their
/// `mm-<pid>.img` mappings).
fn attached_segments(images: &Path) -> Result<Vec<u32>> {
    use prost::Message;
    let mut ids = Vec::new();
    for e in std::fs::read_dir(images).ctx(|| format!("list {}", images.display()))? {
        let e = e.ctx(|| format!("list {}", images.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("mm-") && name.ends_with(".img")) {
            continue;
        }
        let bad = |why: String| Error::BadImage {
            image: name.clone(),
            why,
        };
        let bytes = std::fs::read(e.path()).ctx(|| format!("read {}", e.path().display()))?;
        let entry = image::first(&bytes, Kind::Mm).map_err(|e| bad(e.to_string()))?;
        let mm = criu_rpc::images::MmEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
        let sysv = mm.vmas.iter().filter(|v| v.status & VMA_AREA_SYSVIPC != 0);
        ids.extend(sysv.map(|v| v.shmid as u32));
    }
    Ok(ids)
}

/// The IPC namespace the spec joins by path, if it does.
fn joined_ipc(spec: &Spec) -> Option<PathBuf> {
    crate::oci::joined(spec, LinuxNamespaceType::Ipc)
}

/// The checkpoint's `ipcns-{shm,msg,sem}-<id>.img`.
fn ipc_images(images: &Path) -> Result<Vec<(Class, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(images).ctx(|| format!("list {}", images.display()))? {
        let e = e.ctx(|| format!("list {}", images.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let class = Class::ALL
            .into_iter()
            .find(|c| name.starts_with(&format!("ipcns-{}-", c.name())) && name.ends_with(".img"));
        if let Some(c) = class {
            out.push((c, e.path()));
        }
    }
    Ok(out)
}

/// The objects of the IPC namespace at `path`, by [`Class::ALL`], read from
/// a thread that joins it: /proc/sysvipc lists those of the reader's.
fn live_objects(path: &Path) -> Result<Vec<Vec<Object>>> {
    let f = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWIPC)
                .ctx(|| format!("join {}", path.display()))?;
            Class::ALL
                .into_iter()
                .map(|c| {
                    let list = format!("/proc/sysvipc/{}", c.name());
                    let text = std::fs::read_to_string(&list).ctx(|| format!("read {list}"))?;
                    parse_sysvipc(&text, c)
                        .ok_or_else(|| Error::Other(format!("{list}: unexpected format")))
                })
                .collect()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Other("IPC namespace thread panicked".into())))
    })
}

/// The objects of a /proc/sysvipc listing, its columns found by the header.
pub fn parse_sysvipc(text: &str, class: Class) -> Option<Vec<Object>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (id_col, size_col) = class.columns();
    let (key, id, perms, uid, gid) = (
        col("key")?,
        col(id_col)?,
        col("perms")?,
        col("uid")?,
        col("gid")?,
    );
    let size = match size_col {
        Some(s) => Some(col(s)?),
        None => None,
    };
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Object {
                // Printed signed (%d); the images hold them unsigned.
                key: f.get(key)?.parse::<i32>().ok()? as u32,
                id: f.get(id)?.parse::<i32>().ok()? as u32,
                perms: u32::from_str_radix(f.get(perms)?, 8).ok()? & 0o777,
                uid: f.get(uid)?.parse().ok()?,
                gid: f.get(gid)?.parse().ok()?,
                size: match size {
                    Some(s) => Some(f.get(s)?.parse().ok()?),
                    None => None,
                },
            })
        })
        .collect()
}

/// The checkpoint's object, as [`Object`] has it.
fn image_object(class: Class, o: &IpcObject<'_>) -> Object {
    let d: &IpcDescEntry = &o.desc;
    Object {
        id: d.id,
        key: d.key,
        perms: d.mode & 0o777,
        uid: d.uid,
        gid: d.gid,
        size: (class != Class::Msg).then_some(o.size),
    }
}

/// The image without the objects `live` holds; `None` when it holds none of
/// them (the image stays as it is). Refused if one of `live` takes the id or
/// the key (other than IPC_PRIVATE, 0) of an object of the image and is not
/// that object, or if a segment it holds is one of `attached`: CRIU attaches
/// a restored process only to a segment it created in this restore (it
/// fails on any other: `Can't find sysv shmem`).
pub fn without_live(
    bytes: &[u8],
    class: Class,
    live: &[Object],
    attached: &[u32],
) -> Result<Option<Vec<u8>>> {
    let objects = image::ipc_objects(bytes, class.kind()).map_err(|e| Error::BadImage {
        image: format!("ipcns-{}", class.name()),
        why: e.to_string(),
    })?;
    let mut kept = Vec::with_capacity(objects.len());
    for o in &objects {
        let mine = image_object(class, o);
        let taken = live
            .iter()
            .find(|l| l.id == mine.id || (mine.key != 0 && l.key == mine.key));
        match taken {
            Some(l) if *l == mine && attached.contains(&mine.id) => {
                return Err(Error::IpcAttached { id: mine.id })
            }
            Some(l) if *l == mine => {}
            Some(l) => {
                return Err(Error::IpcTaken {
                    class: class.name(),
                    live: l.to_string(),
                    image: mine.to_string(),
                })
            }
            None => kept.push(o.span),
        }
    }
    Ok((kept.len() < objects.len()).then(|| image::encode_spans(class.kind(), &kept)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use criu_rpc::image::{encode_spans, framed};
    use criu_rpc::images::{IpcMsg, IpcMsgEntry, IpcSemEntry, IpcShmEntry};
    use prost::Message;

    fn desc(id: u32, key: u32) -> IpcDescEntry {
        IpcDescEntry {
            key,
            uid: 0,
            gid: 0,
            cuid: 999,
            cgid: 999,
            mode: 0o600,
            id,
        }
    }

    /// A segment as CRIU 4 writes it (its pages elsewhere), or with its
    /// bytes after the entry, as older CRIUs did.
    fn shm(id: u32, key: u32, size: u64, inline: bool) -> Vec<u8> {
        let e = IpcShmEntry {
            desc: desc(id, key),
            size,
            in_pagemaps: Some(!inline),
            hugetlb_flag: None,
        };
        let bytes = vec![
            id as u8;
            if inline {
                size.div_ceil(4) as usize * 4
            } else {
                0
            }
        ];
        framed(&e.encode_to_vec(), &bytes)
    }

    fn live(id: u32, key: u32, size: Option<u64>) -> Object {
        Object {
            id,
            key,
            perms: 0o600,
            uid: 0,
            gid: 0,
            size,
        }
    }

    #[test]
    fn objects_the_namespace_holds_go_others_stay_byte_for_byte() {
        let (a, b, c) = (
            shm(0, 0x52e2c1, 56, false),
            shm(1, 0, 10, true),
            shm(2, 7, 4096, true),
        );
        let img = encode_spans(Kind::IpcShm, &[&a, &b, &c]);
        // Segment 0 is there, as it was; 1 (IPC_PRIVATE) and 2 are not.
        let held = [live(0, 0x52e2c1, Some(56)), live(5, 0, Some(10))];
        let kept = without_live(&img, Class::Shm, &held, &[]).unwrap().unwrap();
        assert_eq!(kept, encode_spans(Kind::IpcShm, &[&b, &c]));
        // Nothing held: the image stays as it is.
        assert_eq!(
            without_live(&img, Class::Shm, &[live(9, 9, Some(1))], &[]).unwrap(),
            None
        );
        // Everything held: an image of no object.
        let all = [
            live(0, 0x52e2c1, Some(56)),
            live(1, 0, Some(10)),
            live(2, 7, Some(4096)),
        ];
        let none = without_live(&img, Class::Shm, &all, &[]).unwrap().unwrap();
        assert_eq!(image::ipc_objects(&none, Kind::IpcShm).unwrap(), vec![]);
    }

    #[test]
    fn an_object_that_takes_the_id_or_key_but_differs_is_refused() {
        let img = encode_spans(Kind::IpcShm, &[shm(0, 0x52e2c1, 56, false)]);
        let other_size = live(0, 0x52e2c1, Some(4096));
        let mut other_perms = live(0, 0x52e2c1, Some(56));
        other_perms.perms = 0o666;
        let mut other_owner = live(0, 0x52e2c1, Some(56));
        other_owner.uid = 1000;
        let other_key = live(0, 0x1234, Some(56));
        let other_id = live(3, 0x52e2c1, Some(56));
        for held in [other_size, other_perms, other_owner, other_key, other_id] {
            let err = without_live(&img, Class::Shm, std::slice::from_ref(&held), &[]).unwrap_err();
            assert!(
                matches!(&err, Error::IpcTaken { class: "shm", live, .. } if *live == held.to_string()),
                "{held}: {err}"
            );
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::FailedPrecondition
            );
        }
    }

    #[test]
    fn queues_and_semaphore_sets_go_with_their_contents() {
        let msg = |msize| IpcMsg { mtype: 1, msize }.encode_to_vec();
        let queue = |id, qnum: u32| {
            let e = IpcMsgEntry {
                desc: desc(id, 100 + id),
                qbytes: 16384,
                qnum,
            };
            let body: Vec<u8> = (0..qnum)
                .flat_map(|i| framed(&msg(i + 1), &[i as u8; 8]))
                .collect();
            framed(&e.encode_to_vec(), &body)
        };
        let (q0, q1) = (queue(0, 3), queue(1, 1));
        let img = encode_spans(Kind::IpcMsg, &[&q0, &q1]);
        // A queue's messages come and go: no size to hold it to.
        let held = [live(0, 100, None)];
        let kept = without_live(&img, Class::Msg, &held, &[]).unwrap().unwrap();
        assert_eq!(kept, encode_spans(Kind::IpcMsg, &[&q1]));

        let set = |id, nsems| {
            let e = IpcSemEntry {
                desc: desc(id, 200 + id),
                nsems,
            };
            framed(
                &e.encode_to_vec(),
                &vec![1; (2 * nsems as usize).div_ceil(8) * 8],
            )
        };
        let (s0, s1) = (set(0, 5), set(1, 1));
        let img = encode_spans(Kind::IpcSem, &[&s0, &s1]);
        let kept = without_live(&img, Class::Sem, &[live(1, 201, Some(1))], &[])
            .unwrap()
            .unwrap();
        assert_eq!(kept, encode_spans(Kind::IpcSem, &[&s0]));
        let err = without_live(&img, Class::Sem, &[live(1, 201, Some(2))], &[]).unwrap_err();
        assert!(matches!(err, Error::IpcTaken { class: "sem", .. }), "{err}");
    }

    #[test]
    fn a_held_segment_the_checkpoint_attaches_is_refused() {
        use criu_rpc::images::{MmEntry, VmaEntry};
        let dir = tempfile::tempdir().unwrap();
        let vma = |shmid, status| VmaEntry {
            start: 0x7f00_0000_0000,
            end: 0x7f00_0000_1000,
            shmid,
            status,
        };
        // A private mapping (status: anonymous, private) names no segment.
        let mm = MmEntry {
            vmas: vec![vma(7, 1 | 1 << 5), vma(0, 1 | VMA_AREA_SYSVIPC)],
        };
        let img = image::encode(Kind::Mm, &[mm.encode_to_vec()]);
        std::fs::write(dir.path().join("mm-1.img"), img).unwrap();
        let attached = attached_segments(dir.path()).unwrap();
        assert_eq!(attached, [0]);

        let img = encode_spans(
            Kind::IpcShm,
            &[shm(0, 0x52e2c1, 56, false), shm(1, 0, 8, false)],
        );
        let held = [live(0, 0x52e2c1, Some(56))];
        let err = without_live(&img, Class::Shm, &held, &attached).unwrap_err();
        assert!(matches!(err, Error::IpcAttached { id: 0 }), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
        // Not held, CRIU creates it and attaches the process: kept.
        let kept = without_live(&img, Class::Shm, &[live(1, 0, Some(8))], &attached).unwrap();
        assert_eq!(
            kept,
            Some(encode_spans(Kind::IpcShm, &[shm(0, 0x52e2c1, 56, false)]))
        );
    }

    #[test]
    fn a_cut_image_is_a_bad_image() {
        let img = encode_spans(Kind::IpcShm, &[shm(1, 0, 10, true)]);
        let err = without_live(&img[..img.len() - 1], Class::Shm, &[], &[]).unwrap_err();
        assert!(matches!(err, Error::BadImage { .. }), "{err}");
    }

    #[test]
    fn proc_sysvipc_listings_are_read_by_their_header() {
        // As Linux prints them: keys signed, the mode with SHM_DEST (01000).
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                   -1349519896          0  1600               1048576  1756     0      1     0     0     0     0          0          0 1796645244                     0                     0\n";
        let got = parse_sysvipc(shm, Class::Shm).unwrap();
        assert_eq!(
            got,
            [Object {
                perms: 0o600,
                ..live(0, -1349519896i32 as u32, Some(1048576))
            }]
        );
        let sem = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n\
                   \x20     4660          3   644          2     0    10     0     0          0 1796645244\n";
        let got = parse_sysvipc(sem, Class::Sem).unwrap();
        assert_eq!(
            got,
            [Object {
                perms: 0o644,
                gid: 10,
                ..live(3, 4660, Some(2))
            }]
        );
        let msg = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime\n";
        assert_eq!(parse_sysvipc(msg, Class::Msg).unwrap(), []);
        assert_eq!(parse_sysvipc("key id\n", Class::Msg), None);
    }
}
