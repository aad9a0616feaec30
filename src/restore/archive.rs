//! A checkpoint archive, opened for a restore: checked member by member before
//! anything is written, its metadata read, and extracted into a private dir.
//!
//! An archive is hostile input: anyone may hand a node one. Every rule of
//! `docs/security-archive.md` is checked by [`Checkpoint::open`] (a sealed
//! archive's `rootfs-diff.tar` and `deleted.files` by [`Checkpoint::unseal`],
//! which every restore runs next), so a bad archive is refused before a
//! container is created; extraction and [`super::rootfs`] check again.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::Deserialize;

use super::rootfs::{self, DELETED, DIFF};
use crate::checkpoint::archive::{safe_member_name, ArchiveWriter, Target};
use crate::checkpoint::collect::ConfigDump;
use crate::error::{Context, Error, Result};
use crate::safefs;
use crate::seal::decrypt::{self, PartAt, Parts};
use crate::seal::{self, Identities, Marker};
use std::sync::Arc;

/// Members read into memory while checking the archive; they are small.
const METADATA: &[&str] = &[
    "spec.dump",
    "config.dump",
    "bind.mounts",
    seal::MARKER,
    DELETED,
];
const METADATA_MAX: u64 = 16 << 20;

/// At most this many members in an archive. CRIU writes a handful of images
/// per process and per namespace, so even a large process tree stays in the
/// thousands; every member becomes a file in the restore dir, and an archive
/// of a million empty members would only be there to exhaust its inodes.
const MEMBERS_MAX: usize = 100_000;

/// Extension headers (PAX records, GNU long names) longer than this are
/// refused: the tar reader holds each whole in memory, however long the
/// archive says it is, and real ones carry a path and a few attributes.
const EXTENSION_MAX: u64 = 1 << 20;

/// CRI-O's `bind.mounts` entry, as `collect::bind_mounts` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    pub file_type: String,
}

/// What a restore needs to know of an archive before extracting it.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub spec: Spec,
    pub config: ConfigDump,
    pub bind_mounts: Vec<BindMount>,
    /// A sealed archive's parts (see [`crate::seal`]); `spec` is then the
    /// readable one, with its secrets out, until [`Checkpoint::unseal`].
    pub sealed: Option<Sealed>,
}

#[derive(Debug)]
pub struct Sealed {
    pub marker: Marker,
    pub parts: Parts,
    /// The identities that opened it.
    opened: Option<Arc<Identities>>,
}

impl Checkpoint {
    /// Checks `path` as a checkpoint archive and reads its metadata. Refused
    /// (InvalidArgument, or TooLarge past a limit) unless it is a regular file
    /// holding a tar of safe regular files and directories, no name twice,
    /// with `checkpoint/inventory.img`, `spec.dump` and `config.dump`, and a
    /// `rootfs-diff.tar` and `deleted.files` that keep every rule of
    /// [`rootfs::check_diff`] and [`rootfs::check_deleted`]; sealed, with
    /// every part `encryption.json` lists (its diff is checked at
    /// [`unseal`](Self::unseal)). Page data is skipped, not read.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let file = regular_file(path)?;
        Scan::read(&file, path)?.into_checkpoint(&file, path)
    }

    /// Opens a sealed archive with `ids`: its full spec is read (so a wrong key
    /// fails here, before anything is written), its `deleted.files` and
    /// `rootfs-diff.tar` are decrypted and checked as [`open`](Self::open)
    /// checks a plain archive's, and [`extract`](Self::extract) can decrypt
    /// the rest. Nothing to do for a plain archive.
    pub fn unseal(&mut self, ids: Arc<Identities>) -> Result<()> {
        let Some(sealed) = &mut self.sealed else {
            return Ok(());
        };
        let spec_parts = sealed.parts.get("spec.dump").ok_or_else(|| {
            Error::InvalidArgument(format!("{}: no sealed spec.dump", self.path.display()))
        })?;
        let file = regular_file(&self.path)?;
        let mut spec = Vec::new();
        decrypt::open_member(&ids, &file, "spec.dump", spec_parts, &mut spec)?;
        self.spec = serde_json::from_slice(&spec)
            .map_err(|e| Error::InvalidArgument(format!("sealed spec.dump: {e}")))?;
        check_sealed(&ids, &file, &sealed.parts)?;
        sealed.opened = Some(ids);
        Ok(())
    }

    /// Extracts the archive into `dest`, a fresh private directory; a sealed
    /// one decrypted (it must have been [`unseal`](Self::unseal)ed).
    pub fn extract(&self, dest: &Path) -> Result<()> {
        let Some(sealed) = &self.sealed else {
            return extract(&self.path, dest);
        };
        let Some(ids) = &sealed.opened else {
            return Err(Error::Sealed(format!(
                "{} is encrypted; give the identity that opens it",
                self.path.display()
            )));
        };
        extract_except(&self.path, dest, &sealed.marker.redacted)?;
        decrypt::open_into(ids, &regular_file(&self.path)?, &sealed.parts, dest)
    }

    /// Writes the plain archive of an unsealed one at `output` (new, root-only,
    /// renamed into place when complete): the members as they were, each
    /// sealed member decrypted in its place, without the readable spec or the
    /// marker. Returns its size.
    pub fn write_plain(&self, output: &Path) -> Result<u64> {
        let (sealed, ids) = match &self.sealed {
            Some(Sealed {
                opened: Some(ids), ..
            }) => (self.sealed.as_ref().expect("matched"), ids),
            Some(_) => return Err(Error::Sealed("give the identity that opens it".into())),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not encrypted",
                    self.path.display()
                )))
            }
        };
        let src = regular_file(&self.path)?;
        let mut w = ArchiveWriter::create(&Target::new(output)?)?;
        let mut ar = tar::Archive::new(Guard::new(
            src.try_clone()
                .ctx(|| format!("open {}", self.path.display()))?,
        ));
        let mut done = std::collections::HashSet::new();
        let mut names = Members::default();
        for entry in ar
            .entries_with_seek()
            .ctx(|| format!("read {}", self.path.display()))?
        {
            let e = entry.ctx(|| format!("read {}", self.path.display()))?;
            let name = names.check(&e)?.to_string_lossy().into_owned();
            if let Some((base, _)) = seal::parse_part(&name) {
                if done.insert(base.to_string()) {
                    let bytes = sealed
                        .marker
                        .members
                        .iter()
                        .find(|m| m.name == base)
                        .map_or(0, |m| m.bytes);
                    let parts = &sealed.parts[base];
                    w.add_with(base, bytes, |out| {
                        decrypt::open_member(ids, &src, base, parts, out)
                    })?;
                }
            } else if e.header().entry_type() == tar::EntryType::Directory {
                w.add_dir(&name)?;
            } else if name != seal::MARKER && !sealed.marker.redacted.contains(&name) {
                w.add_file_range(&name, &src, e.raw_file_position(), e.size())?;
            }
        }
        w.commit(true)
    }

    /// The image the checkpointed container ran: its ID or digest, then its name.
    pub fn base_image(&self) -> (Option<&str>, Option<&str>) {
        let c = &self.config;
        let name = c.rootfs_image_name.as_deref().or(c.rootfs_image.as_deref());
        (
            c.rootfs_image_ref.as_deref().filter(|s| !s.is_empty()),
            name.filter(|s| !s.is_empty()),
        )
    }
}

pub(crate) fn regular_file(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::InvalidArgument(format!("{}: no such file", path.display()))
        }
        _ => Error::InvalidArgument(format!("{}: {e}", path.display())),
    })?;
    let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// A member's name, if it is one a restore may write: relative, without `..`,
/// and a regular file or a directory.
pub(crate) fn check_entry<R: Read>(e: &tar::Entry<R>) -> Result<PathBuf> {
    let name = e.path().ctx(|| "member name".into())?.into_owned();
    if !safe_member_name(&name) {
        return Err(Error::UnsafeArchive(name.display().to_string()));
    }
    match e.header().entry_type() {
        tar::EntryType::Directory | tar::EntryType::Regular | tar::EntryType::Continuous => {
            Ok(name)
        }
        other => Err(Error::UnsafeArchive(format!(
            "{} ({other:?} entries are refused)",
            name.display()
        ))),
    }
}

/// Members at least this large are moved with [`crate::fcopy`] (shared extents
/// where the file system has them); smaller ones are read and written.
const MOVE_FROM: u64 = 1 << 20;

/// Extracts `archive` into `dest` (a fresh directory): regular files and
/// directories only, relative names without `..`, no name twice, nothing
/// followed or replaced.
/// Large members (the memory pages) move file to file in the kernel, and share
/// the archive's extents on XFS or btrfs (archives 4 KiB-align them). Sealed
/// parts and the seal's marker are left out (see [`Checkpoint::extract`]).
pub fn extract(archive: &Path, dest: &Path) -> Result<()> {
    extract_except(archive, dest, &[])
}

/// [`extract`], leaving out the `skip`ped members too.
pub(crate) fn extract_except(archive: &Path, dest: &Path, skip: &[String]) -> Result<()> {
    let source = regular_file(archive)?;
    let mut ar = tar::Archive::new(Guard::new(
        source
            .try_clone()
            .ctx(|| format!("open {}", archive.display()))?,
    ));
    let mut names = Members::default();
    for entry in ar
        .entries_with_seek()
        .ctx(|| format!("read {}", archive.display()))?
    {
        let mut e = entry.ctx(|| format!("read {}", archive.display()))?;
        let name = names.check(&e)?;
        let text = name.to_string_lossy();
        if seal::parse_part(&text).is_some()
            || text == seal::MARKER
            || skip.iter().any(|s| *s == text)
        {
            continue;
        }
        let out = dest.join(&name);
        let dir = if e.header().entry_type() == tar::EntryType::Directory {
            Some(out.as_path())
        } else {
            out.parent()
        };
        if let Some(d) = dir {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .ctx(|| format!("create {}", d.display()))?;
        }
        if e.header().entry_type() == tar::EntryType::Directory {
            continue;
        }
        // Parents were made by us from checked names, so no link can redirect this.
        let mut f = safefs::create_new(&out, 0o600)?;
        let size = e.size();
        if size >= MOVE_FROM {
            crate::fcopy::copy_range(&source, e.raw_file_position(), &f, 0, size, true)
                .ctx(|| format!("extract {}", out.display()))?;
        } else {
            std::io::copy(&mut e, &mut f).ctx(|| format!("extract {}", out.display()))?;
        }
    }
    Ok(())
}

fn not_archive(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!(
        "{} is not a checkpoint archive: {why}",
        path.display()
    ))
}

/// An archive's members as [`Checkpoint::open`] meets them.
#[derive(Default)]
struct Scan {
    names: Members,
    inventory: bool,
    meta: HashMap<String, Vec<u8>>,
    parts: Parts,
    /// Where a plain `rootfs-diff.tar` lies in the archive.
    diff: Option<PartAt>,
}

impl Scan {
    fn read(file: &File, path: &Path) -> Result<Scan> {
        let mut ar = tar::Archive::new(Guard::new(file));
        let mut scan = Scan::default();
        for entry in ar.entries_with_seek().map_err(|e| not_archive(path, e))? {
            let mut e = entry.map_err(|e| not_archive(path, e))?;
            let name = scan.names.check(&e)?.to_string_lossy().into_owned();
            scan.member(&name, &mut e, path)?;
        }
        Ok(scan)
    }

    /// Notes member `name` (in its normal form): a sealed part, the diff, or
    /// metadata read into memory.
    fn member<R: Read>(&mut self, name: &str, e: &mut tar::Entry<R>, path: &Path) -> Result<()> {
        let (base, part) = match seal::parse_part(name) {
            Some((base, k)) => (base, Some(k)),
            None => (name, None),
        };
        self.inventory |= base == "checkpoint/inventory.img";
        let at = PartAt {
            at: e.raw_file_position(),
            len: e.size(),
        };
        if let Some(k) = part {
            if self
                .parts
                .entry(base.into())
                .or_default()
                .insert(k, at)
                .is_some()
            {
                return Err(Error::UnsafeArchive(format!(
                    "{name} (part {k} of {base} twice)"
                )));
            }
            return Ok(());
        }
        if e.header().entry_type().is_dir() {
            if [DIFF, DELETED].contains(&name) {
                return Err(Error::UnsafeArchive(format!("{name} (a directory)")));
            }
            return Ok(());
        }
        if name == DIFF {
            self.diff = Some(at);
        }
        if METADATA.contains(&name) {
            if e.size() > METADATA_MAX {
                return Err(not_archive(path, format!("{name} is {} bytes", e.size())));
            }
            let mut buf = Vec::with_capacity(e.size() as usize);
            e.read_to_end(&mut buf).map_err(|e| not_archive(path, e))?;
            self.meta.insert(name.to_string(), buf);
        }
        Ok(())
    }

    fn take_json<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        path: &Path,
    ) -> Result<Option<T>> {
        match self.meta.remove(name) {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| not_archive(path, format!("{name}: {e}"))),
            None => Ok(None),
        }
    }

    fn into_checkpoint(mut self, file: &File, path: &Path) -> Result<Checkpoint> {
        if !self.inventory {
            return Err(not_archive(path, "no checkpoint/inventory.img"));
        }
        let spec = self.take_json("spec.dump", path)?;
        let spec = spec.ok_or_else(|| not_archive(path, "no spec.dump"))?;
        let config = self.take_json("config.dump", path)?;
        let config = config.ok_or_else(|| not_archive(path, "no config.dump"))?;
        let bind_mounts = self.take_json("bind.mounts", path)?.unwrap_or_default();
        if let Some(list) = self.meta.remove(DELETED) {
            rootfs::check_deleted(&list)?;
        }
        if let Some(at) = self.diff {
            check_plain_diff(file, at)?;
        }
        let sealed = self.sealed(path)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            spec,
            config,
            bind_mounts,
            sealed,
        })
    }

    /// The seal, if the archive has one: every part its marker lists, and no
    /// sealed member also plain (but the readable spec, which is redacted).
    fn sealed(&mut self, path: &Path) -> Result<Option<Sealed>> {
        let Some(m) = self.meta.remove(seal::MARKER) else {
            if self.parts.is_empty() {
                return Ok(None);
            }
            return Err(not_archive(
                path,
                format!("sealed parts but no {}", seal::MARKER),
            ));
        };
        let marker = Marker::parse(&m)?;
        decrypt::check_parts(&marker, &self.parts)?;
        if let Some(both) = self
            .parts
            .keys()
            .find(|b| self.names.has(b) && !marker.redacted.contains(b))
        {
            return Err(Error::UnsafeArchive(format!(
                "{both} (both sealed and plain)"
            )));
        }
        Ok(Some(Sealed {
            marker,
            parts: std::mem::take(&mut self.parts),
            opened: None,
        }))
    }
}

/// A plain `rootfs-diff.tar` checked where it lies in the archive: its
/// headers read, its data skipped.
fn check_plain_diff(file: &File, at: PartAt) -> Result<()> {
    let mut ar = tar::Archive::new(Guard::new(Slice::new(file, at)));
    let entries = ar.entries_with_seek().map_err(rootfs::unreadable)?;
    rootfs::check_diff(entries, Some(at.len)).map(drop)
}

/// A sealed archive's `deleted.files` and `rootfs-diff.tar`, decrypted with
/// `ids` and held to the rules a plain archive's meet at open.
fn check_sealed(ids: &Identities, file: &File, parts: &Parts) -> Result<()> {
    if let Some(p) = parts.get(DELETED) {
        let mut out = Capped::new(METADATA_MAX as usize);
        let opened = decrypt::open_member(ids, file, DELETED, p, &mut out);
        if out.over {
            return Err(Error::InvalidArgument(format!(
                "{DELETED} is over {METADATA_MAX} bytes"
            )));
        }
        opened?;
        rootfs::check_deleted(&out.buf)?;
    }
    match parts.get(DIFF) {
        Some(p) => check_sealed_diff(ids, file, p),
        None => Ok(()),
    }
}

/// The sealed diff streamed through the checks as it is decrypted (a pipe to
/// a thread that reads it as a tar); none of it is kept.
fn check_sealed_diff(ids: &Identities, file: &File, parts: &BTreeMap<usize, PartAt>) -> Result<()> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx(|| "create a pipe".into())?;
    let mut w = File::from(w);
    std::thread::scope(|s| {
        let scan = s.spawn(move || {
            let mut ar = tar::Archive::new(Guard::new(File::from(r)));
            let checked = ar
                .entries()
                .map_err(rootfs::unreadable)
                .and_then(|en| rootfs::check_diff(en, None));
            if checked.is_ok() {
                // The blocks after the tar's end are read too, so that the
                // decryption is not cut short.
                let _ = std::io::copy(&mut ar.into_inner().into_inner(), &mut std::io::sink());
            }
            checked
        });
        // A failed check drops the pipe's end: the decryption stops on EPIPE.
        let fed = decrypt::open_member(ids, file, DIFF, parts, &mut w);
        drop(w);
        let checked = scan
            .join()
            .unwrap_or_else(|_| Err(Error::Other(format!("the check of {DIFF} panicked"))));
        checked.and(fed).map(drop)
    })
}

/// A buffer that takes at most `max` bytes; past that, writes fail and
/// `over` says why.
struct Capped {
    buf: Vec<u8>,
    max: usize,
    over: bool,
}

impl Capped {
    fn new(max: usize) -> Capped {
        Capped {
            buf: Vec::new(),
            max,
            over: false,
        }
    }
}

impl Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("over the limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What an archive's members must be, one by one and together: each as
/// [`check_entry`] says, no name twice (`./a/` and `a` are one name), a file
/// never in the root's place, at most [`MEMBERS_MAX`].
pub(crate) struct Members {
    seen: Seen<()>,
    /// [`MEMBERS_MAX`] (lowered by tests).
    max: usize,
}

impl Default for Members {
    fn default() -> Self {
        Members {
            seen: Seen::default(),
            max: MEMBERS_MAX,
        }
    }
}

impl Members {
    /// The member's name in its normal form, if it may be extracted.
    pub(crate) fn check<R: Read>(&mut self, e: &tar::Entry<R>) -> Result<PathBuf> {
        let name = check_entry(e)?;
        let parts = normal(&name).expect("check_entry refuses absolute and climbing names");
        let refuse = |why: &str| Error::UnsafeArchive(format!("{} ({why})", name.display()));
        if parts.is_empty() && !e.header().entry_type().is_dir() {
            return Err(refuse("a file in the place of the archive's root"));
        }
        if self.seen.len() >= self.max {
            return Err(Error::TooLarge(format!(
                "the archive has more than {} members",
                self.max
            )));
        }
        let key = self.seen.key(&parts);
        if self.seen.insert(key, ()).is_some() {
            return Err(refuse("a second member of this name"));
        }
        Ok(parts.iter().collect())
    }

    /// Whether a member of this (normal) name was met.
    fn has(&self, name: &str) -> bool {
        normal(Path::new(name)).is_some_and(|p| self.seen.get(&self.seen.key(&p)).is_some())
    }
}

/// A name's normal components (`./a//b/` is `a`, `b`; the root's are none),
/// or None if it is absolute or climbs (`..`).
pub(crate) fn normal(name: &Path) -> Option<Vec<&OsStr>> {
    name.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// A name's key in a [`Seen`].
pub(crate) type Key = (u64, u64);

/// Names met in a tar, by their normal components, each with what it was.
/// Kept as 128-bit hashes under keys drawn afresh for each tar, so that no
/// archive can aim at a collision and memory stays a few dozen bytes a name
/// whatever the names' lengths; every leading part of a name is keyed in one
/// pass over it.
pub(crate) struct Seen<K> {
    keys: [RandomState; 2],
    map: HashMap<Key, K>,
}

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Seen {
            keys: [RandomState::new(), RandomState::new()],
            map: HashMap::new(),
        }
    }
}

impl<K: Copy> Seen<K> {
    /// The keys of `parts[..1]`, `parts[..2]`, …, `parts`: each leading part
    /// of a name, the whole name last (the root's key alone for no parts).
    pub(crate) fn keys(&self, parts: &[&OsStr]) -> Vec<Key> {
        let mut h = self.keys.each_ref().map(|k| k.build_hasher());
        let mut out = Vec::with_capacity(parts.len().max(1));
        if parts.is_empty() {
            out.push((h[0].finish(), h[1].finish()));
        }
        for p in parts {
            for x in &mut h {
                x.write(p.as_bytes());
                x.write_u8(b'/');
            }
            out.push((h[0].finish(), h[1].finish()));
        }
        out
    }

    pub(crate) fn key(&self, parts: &[&OsStr]) -> Key {
        *self.keys(parts).last().expect("one key at least")
    }

    pub(crate) fn get(&self, key: &Key) -> Option<K> {
        self.map.get(key).copied()
    }

    /// Notes `key` as `kind`; what it was, if it was met before.
    pub(crate) fn insert(&mut self, key: Key, kind: K) -> Option<K> {
        self.map.insert(key, kind)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// A tar read through, its headers followed as the tar crate follows them,
/// so that no extension header (PAX, GNU long name) past [`EXTENSION_MAX`] is
/// read: the crate reads each whole into memory. Seeks over member data pass
/// through; one over a header fails, as does a GNU sparse member, whose extra
/// header blocks the crate reads where this would see data.
pub(crate) struct Guard<R> {
    inner: R,
    pos: u64,
    /// Where the next header starts.
    next: u64,
    header: [u8; 512],
    filled: usize,
    /// A PAX header's records, as they are read, and their length.
    pax: Option<(Vec<u8>, u64)>,
    /// The size PAX records gave the member they describe.
    pax_size: Option<u64>,
}

impl<R> Guard<R> {
    pub(crate) fn new(inner: R) -> Guard<R> {
        Guard {
            inner,
            pos: 0,
            next: 0,
            header: [0; 512],
            filled: 0,
            pax: None,
            pax_size: None,
        }
    }

    fn observe(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.pos < self.next {
                let n = data.len().min((self.next - self.pos) as usize);
                if let Some((records, len)) = &mut self.pax {
                    let want = (*len as usize).saturating_sub(records.len()).min(n);
                    records.extend_from_slice(&data[..want]);
                }
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(512 - self.filled);
            self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            (self.filled, self.pos, data) = (self.filled + n, self.pos + n as u64, &data[n..]);
            if self.filled == 512 {
                self.filled = 0;
                self.header_read()?;
            }
        }
        Ok(())
    }

    /// A header is complete: where the next one starts, as the tar crate
    /// reckons it (a PAX size applies to the first member that is not an
    /// extension, and only PAX and GNU headers of ustar or GNU form are
    /// extensions to the crate).
    fn header_read(&mut self) -> std::io::Result<()> {
        let refuse = |why: String| std::io::Error::other(why);
        if let Some((records, _)) = self.pax.take() {
            self.pax_size = pax_size(&records);
        }
        if self.header.iter().all(|b| *b == 0) {
            self.next = self.pos;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.header);
        let t = h.entry_type();
        if t.is_gnu_sparse() {
            return Err(refuse("a GNU sparse member (refused)".into()));
        }
        let long = t.is_gnu_longname() || t.is_gnu_longlink() || t.is_pax_local_extensions();
        let extension = long || t.is_pax_global_extensions();
        let mut size = h.entry_size()?;
        if extension && size > EXTENSION_MAX {
            return Err(refuse(format!(
                "an extension header of {size} bytes (at most {EXTENSION_MAX})"
            )));
        }
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        if !extension {
            size = self.pax_size.unwrap_or(size);
        }
        if !(recognized && long) {
            self.pax_size = None;
        }
        if recognized && t.is_pax_local_extensions() {
            self.pax = Some((Vec::new(), size));
        }
        let padded = size
            .checked_add(511)
            .ok_or_else(|| refuse("size overflow".into()))?;
        self.next = self.pos + (padded & !511);
        Ok(())
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

/// The `size` record of PAX records, as the tar crate reads it.
fn pax_size(records: &[u8]) -> Option<u64> {
    for r in tar::PaxExtensions::new(records) {
        let r = r.ok()?;
        if r.key() == Ok("size") {
            return r.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

impl<R: Seek> Seek for Guard<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = self.inner.seek(to)?;
        let pax_unread = matches!(&self.pax, Some((r, len)) if (r.len() as u64) < *len);
        if p < self.pos || p > self.next || self.filled != 0 || (pax_unread && p != self.pos) {
            return Err(std::io::Error::other(
                "a seek over a tar header or PAX records",
            ));
        }
        self.pos = p;
        Ok(p)
    }
}

/// A range of a file, read and sought by position (the file's own offset
/// is not used).
pub(crate) struct Slice<'a> {
    file: &'a File,
    at: PartAt,
    pos: u64,
}

impl<'a> Slice<'a> {
    pub(crate) fn new(file: &'a File, at: PartAt) -> Slice<'a> {
        Slice { file, at, pos: 0 }
    }
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.at.len.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at.at + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.at.len.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one entry whose name and type are written raw, bypassing the
    /// tar crate's own checks, as a hostile archive would be.
    fn hostile(name: &str, kind: tar::EntryType, link: Option<&str>) -> tempfile::NamedTempFile {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        b.append(&h, std::io::empty()).unwrap();
        b.finish().unwrap();
        f
    }

    #[test]
    fn extraction_refuses_traversal_links_and_devices() {
        let cases = [
            ("/etc/evil", tar::EntryType::Regular, None),
            ("../evil", tar::EntryType::Regular, None),
            ("checkpoint/../../evil", tar::EntryType::Regular, None),
            (
                "checkpoint/link",
                tar::EntryType::Symlink,
                Some("/etc/passwd"),
            ),
            ("checkpoint/hard", tar::EntryType::Link, Some("/etc/passwd")),
            ("checkpoint/null", tar::EntryType::Char, None),
            ("checkpoint/fifo", tar::EntryType::Fifo, None),
        ];
        for (name, kind, link) in cases {
            let ar = hostile(name, kind, link);
            let dest = tempfile::tempdir().unwrap();
            let err = extract(ar.path(), dest.path()).unwrap_err();
            assert!(matches!(err, Error::UnsafeArchive(_)), "{name}: {err:?}");
            assert_eq!(
                std::fs::read_dir(dest.path()).unwrap().count(),
                0,
                "{name}: something was written"
            );
        }
    }

    #[test]
    fn extraction_of_a_plain_archive_works() {
        let ar = hostile("checkpoint/inventory.img", tar::EntryType::Regular, None);
        let dest = tempfile::tempdir().unwrap();
        extract(ar.path(), dest.path()).unwrap();
        assert!(dest.path().join("checkpoint/inventory.img").is_file());
    }

    /// An archive with these (name, data) regular files, then one hostile entry.
    fn archive_with(
        files: &[(&str, &[u8])],
        hostile_last: Option<&str>,
    ) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            b.append_data(&mut h, name, *data).unwrap();
        }
        if let Some(name) = hostile_last {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn open_checks_every_member_and_reads_the_metadata() {
        let spec = serde_json::to_vec(&oci_spec::runtime::Spec::default()).unwrap();
        let config = br#"{"id":"x","name":"n","rootfsImageName":"docker.io/library/a:1","rootfsImageRef":"sha256:ab","createdTime":"","checkpointedTime":"","restoredTime":"","restored":false}"#;
        let good: Vec<(&str, &[u8])> = vec![
            ("spec.dump", &spec),
            ("config.dump", config),
            ("checkpoint/inventory.img", b"i"),
        ];
        let c = Checkpoint::open(archive_with(&good, None).path()).unwrap();
        assert_eq!(
            c.base_image(),
            (Some("sha256:ab"), Some("docker.io/library/a:1"))
        );
        assert!(c.bind_mounts.is_empty());
        // A link after the metadata is still seen, before anything is written.
        assert!(matches!(
            Checkpoint::open(archive_with(&good, Some("checkpoint/x")).path()),
            Err(Error::UnsafeArchive(_))
        ));
        for missing in ["spec.dump", "config.dump", "checkpoint/inventory.img"] {
            let some: Vec<_> = good
                .iter()
                .filter(|(n, _)| *n != missing)
                .cloned()
                .collect();
            let err = Checkpoint::open(archive_with(&some, None).path()).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(ref m) if m.contains(missing)),
                "{err}"
            );
        }
        let not_tar = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_tar.path(), vec![7u8; 2000]).unwrap();
        assert!(matches!(
            Checkpoint::open(not_tar.path()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Checkpoint::open(Path::new("/")),
            Err(Error::InvalidArgument(_))
        ));
    }

    use crate::restore::rootfs::tests::{dir, file, file_bytes, special, tar_of, M};

    const CONFIG: &str = r#"{"id":"x","name":"n","rootfsImageName":"docker.io/library/a:1","rootfsImageRef":"sha256:ab","createdTime":"","checkpointedTime":"","restoredTime":"","restored":false}"#;

    /// The members every archive needs.
    fn base() -> Vec<M> {
        let spec = serde_json::to_string(&Spec::default()).unwrap();
        vec![
            file("spec.dump", &spec),
            file("config.dump", CONFIG),
            dir("checkpoint/"),
            file("checkpoint/inventory.img", "i"),
        ]
    }

    fn archive(members: &[M]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), tar_of(members)).unwrap();
        f
    }

    fn with(more: &[M]) -> tempfile::NamedTempFile {
        archive(&[base(), more.to_vec()].concat())
    }

    fn assert_unsafe(r: Result<Checkpoint>, says: &str) {
        let err = r.err().unwrap_or_else(|| panic!("{says}: opened"));
        assert!(matches!(err, Error::UnsafeArchive(_)), "{says}: {err:?}");
        assert!(err.to_string().contains(says), "{says}: {err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn open_checks_the_rootfs_diff_and_the_deletions() {
        let diff = tar_of(&crate::restore::rootfs::tests::clean());
        let good = [file_bytes(DIFF, &diff), file(DELETED, r#"["/bin/vi"]"#)];
        Checkpoint::open(with(&good).path()).unwrap();

        let mut bad = crate::restore::rootfs::tests::clean();
        bad.push(special("dev/x", tar::EntryType::Block));
        let bad = tar_of(&bad);
        let open = |m: &[M]| Checkpoint::open(with(m).path());
        assert_unsafe(
            open(&[file_bytes(DIFF, &bad)]),
            "rootfs-diff.tar: dev/x (a device node",
        );
        // The name the diff is extracted under counts, however it is spelt.
        assert_unsafe(
            open(&[file_bytes("./rootfs-diff.tar", &bad)]),
            "rootfs-diff.tar: dev/x (a device node",
        );
        assert_unsafe(
            open(&[file_bytes(DIFF, &[7u8; 1024])]),
            "rootfs-diff.tar: not a readable tar",
        );
        assert_unsafe(
            open(&[dir("rootfs-diff.tar/")]),
            "rootfs-diff.tar (a directory)",
        );
        assert_unsafe(
            open(&[
                file_bytes(DIFF, &diff),
                file(DELETED, r#"["/ok", "/../etc/shadow"]"#),
            ]),
            "deleted.files: /../etc/shadow (a path that climbs with ..",
        );
        assert_unsafe(
            open(&[file("./deleted.files", "[\"/\"]")]),
            "deleted.files: / (the root itself",
        );
    }

    #[test]
    fn open_refuses_a_name_twice() {
        let spec = serde_json::to_string(&Spec::default()).unwrap();
        for (twice, says) in [
            (
                vec![file("spec.dump", &spec)],
                "spec.dump (a second member of this name",
            ),
            (
                vec![file("./checkpoint/inventory.img", "j")],
                "checkpoint/inventory.img (a second member",
            ),
            (vec![dir("checkpoint")], "checkpoint (a second member"),
            (vec![file("checkpoint", "")], "checkpoint (a second member"),
            (
                vec![file("c.0.age", ""), file("c.00.age", "")],
                "c.00.age (part 0 of c twice)",
            ),
            (
                vec![file(".", "")],
                ". (a file in the place of the archive's root)",
            ),
        ] {
            assert_unsafe(Checkpoint::open(with(&twice).path()), says);
            // Extraction checks again (it leaves sealed parts to decryption).
            let dest = tempfile::tempdir().unwrap();
            let extracted = extract(with(&twice).path(), dest.path());
            match says.contains(".age") {
                true => extracted.unwrap(),
                false => assert!(
                    matches!(extracted, Err(Error::UnsafeArchive(_))),
                    "{says}: {extracted:?}"
                ),
            }
        }
    }

    #[test]
    fn members_past_the_limit_are_too_large() {
        let bytes = tar_of(&[dir("a"), dir("b"), dir("c")]);
        let mut ar = tar::Archive::new(bytes.as_slice());
        let mut names = Members {
            max: 2,
            ..Members::default()
        };
        let results: Vec<_> = ar
            .entries()
            .unwrap()
            .map(|e| names.check(&e.unwrap()))
            .collect();
        assert!(results[..2].iter().all(|r| r.is_ok()), "{results:?}");
        assert!(
            matches!(&results[2], Err(Error::TooLarge(m)) if m.contains("more than 2 members")),
            "{results:?}"
        );
    }

    #[test]
    fn an_outsized_extension_header_is_refused_before_it_is_read() {
        let mut ar = base();
        // GNU long names go through the tar reader whole; 2 MiB is refused.
        let long = format!("{}x", "a/".repeat(1 << 20));
        ar.push(file(&long, "x"));
        let err = Checkpoint::open(archive(&ar).path()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("an extension header of")),
            "{err:?}"
        );
    }

    /// A sealed archive of `base()`'s members, with these sealed too, and the
    /// identity that opens it.
    fn sealed(
        more: &[(&str, Vec<u8>)],
    ) -> (tempfile::NamedTempFile, Arc<Identities>, tempfile::TempDir) {
        use age::secrecy::ExposeSecret;
        use std::os::unix::fs::PermissionsExt;
        let id = age::x25519::Identity::generate();
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("key");
        std::fs::write(&key, format!("{}\n", id.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ids = Arc::new(Identities::load(&[key]).unwrap());
        let to = seal::Recipients::parse(&[id.to_public().to_string()])
            .unwrap()
            .unwrap();
        let sealer = seal::encrypt::Sealer::new(Arc::new(to));
        let spec = serde_json::to_vec(&Spec::default()).unwrap();
        let mut members = vec![
            file("config.dump", CONFIG),
            dir("checkpoint/"),
            file_bytes("spec.dump", &seal::redact_spec(&spec)),
        ];
        let mut list = vec![
            ("spec.dump", spec),
            ("checkpoint/inventory.img", b"i".to_vec()),
        ];
        list.extend(more.iter().cloned());
        let mut sealed_members = Vec::new();
        for (name, plain) in &list {
            let mut ct = Vec::new();
            sealer.seal_part(plain, &mut ct).unwrap();
            members.push(file_bytes(&seal::part_name(name, 0), &ct));
            sealed_members.push(seal::SealedMember {
                name: name.to_string(),
                parts: 1,
                bytes: plain.len() as u64,
            });
        }
        let marker = serde_json::to_vec(&Marker::new(sealed_members)).unwrap();
        members.push(file_bytes(seal::MARKER, &marker));
        (archive(&members), ids, keys)
    }

    #[test]
    fn a_sealed_diff_and_its_deletions_are_checked_at_unseal() {
        let clean = tar_of(&crate::restore::rootfs::tests::clean());
        let (ar, ids, _keys) =
            sealed(&[(DIFF, clean.clone()), (DELETED, b"[\"/bin/vi\"]".to_vec())]);
        let mut c = Checkpoint::open(ar.path()).unwrap();
        c.unseal(ids).unwrap();

        let mut bad = crate::restore::rootfs::tests::clean();
        bad.insert(1, special("dev/x", tar::EntryType::Char));
        let (ar, ids, _keys) = sealed(&[(DIFF, tar_of(&bad))]);
        let mut c = Checkpoint::open(ar.path()).unwrap();
        let err = c.unseal(ids).unwrap_err();
        assert!(
            matches!(&err, Error::UnsafeArchive(m) if m.contains("rootfs-diff.tar: dev/x (a device node")),
            "{err:?}"
        );

        let (ar, ids, _keys) = sealed(&[(DIFF, clean.clone()), (DELETED, b"[\"/..\"]".to_vec())]);
        let err = Checkpoint::open(ar.path())
            .and_then(|mut c| c.unseal(ids))
            .unwrap_err();
        assert!(
            matches!(&err, Error::UnsafeArchive(m) if m.contains("deleted.files: /..")),
            "{err:?}"
        );

        // A member both sealed and plain (only the redacted spec may be).
        let (ar, _, _keys) = sealed(&[(DIFF, clean.clone())]);
        let mut tar = std::fs::read(ar.path()).unwrap();
        tar.truncate(tar.len() - 1024);
        let mut b = tar::Builder::new(tar);
        let mut h = tar::Header::new_gnu();
        h.set_size(clean.len() as u64);
        h.set_mode(0o600);
        b.append_data(&mut h, DIFF, clean.as_slice()).unwrap();
        std::fs::write(ar.path(), b.into_inner().unwrap()).unwrap();
        assert_unsafe(
            Checkpoint::open(ar.path()),
            "rootfs-diff.tar (both sealed and plain)",
        );
    }
}
