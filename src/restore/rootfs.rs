//! A bundle's root file system made ready for a restore: the checkpoint's file
//! changes applied, and the mount points the spec needs.
//!
//! The changes come from an archive anyone may have made. [`check_diff`] and
//! [`check_deleted`] hold them to the rules of `docs/security-archive.md`
//! when the archive is opened ([`super::Checkpoint::open`]), and
//! [`apply_rootfs_diff`] holds them to the same rules again, and checks the
//! destination's free space, before it writes anything.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::archive::{normal, Guard, Key, Seen};
use crate::checkpoint::archive::safe_member_name;
use crate::error::{Context, Error, Result};
use crate::safefs;

/// The archive member with the file system's added and changed entries.
pub const DIFF: &str = "rootfs-diff.tar";
/// The archive member listing the file system's deleted paths.
pub const DELETED: &str = "deleted.files";

/// At most this many members in a rootfs diff (and paths in
/// `deleted.files`). Each member becomes an inode in the new container's
/// writable layer and costs the check a few dozen bytes of memory; a diff of a
/// million empty members is how an archive would exhaust a node's inodes.
/// What a container really changes (a package manager's work, a language's
/// dependency tree) stays well under it.
pub const DIFF_MEMBERS_MAX: u64 = 1_000_000;

/// At most this many bytes of file data in a rootfs diff. Data belongs in
/// volumes, and the kubelet evicts pods whose writable layer fills the node;
/// a diff past this would take minutes to write and fill the runtime's disk.
/// The destination's free space is checked as well ([`apply_rootfs_diff`]).
pub const DIFF_BYTES_MAX: u64 = 16 << 30;

/// Names and link targets longer than this are refused: no path the kernel
/// takes is longer, and it bounds what one member costs to check.
const NAME_MAX_BYTES: usize = libc::PATH_MAX as usize;

/// The block a file's data is reckoned in, and what a directory takes.
const BLOCK: u64 = 4096;

/// PAX records with file capabilities: GNU tar's spelling and libarchive's.
const CAPABILITY_KEYS: &[&[u8]] = &[
    b"SCHILY.xattr.security.capability",
    b"LIBARCHIVE.xattr.security.capability",
];

/// What a rootfs diff takes once unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiffSize {
    pub members: u64,
    /// File data.
    pub bytes: u64,
    /// Space: file data in whole blocks, and a block a directory.
    pub need: u64,
    /// Files, directories and symlinks (a hard link takes no inode).
    pub inodes: u64,
}

/// What a diff member is; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    /// A named pipe: no data, no device, nothing a process gains by it.
    Fifo,
}

/// The bundle's root file system a spec names: `root.path`, relative to the
/// bundle unless absolute (`rootfs` when the spec has no root).
pub fn bundle_rootfs(spec: &Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| "rootfs".into());
    bundle.join(root)
}

/// A refused member of the diff: its name and why.
fn refused(name: &Path, why: &str) -> Error {
    Error::UnsafeArchive(format!("{DIFF}: {} ({why})", name.display()))
}

/// A diff that cannot be read as a tar.
pub(crate) fn unreadable(e: std::io::Error) -> Error {
    Error::UnsafeArchive(format!("{DIFF}: not a readable tar ({e})"))
}

/// Checks every member of a rootfs diff, writing nothing; what it takes once
/// unpacked. Refused (UnsafeArchive, naming the member and why):
/// - any type but a regular file, a directory, a symlink, a hard link or a
///   FIFO (device nodes, sparse files, PAX global headers, anything else);
/// - a name that is absolute, climbs (`..`), is past `PATH_MAX`, or puts a
///   non-directory in the root's place;
/// - a name met before (`./a/` and `a` are one name);
/// - a member under a symlink or a file the diff made: nothing is written
///   through a link;
/// - a hard link whose target is not a regular file earlier in the diff;
/// - a setuid or setgid file, a setuid directory;
/// - file capabilities (`security.capability` in PAX records);
/// - data past the diff's end (`len`, when read from a seekable slice).
///
/// Past [`DIFF_MEMBERS_MAX`] members or [`DIFF_BYTES_MAX`] bytes: TooLarge.
pub fn check_diff<R: Read>(entries: tar::Entries<'_, R>, len: Option<u64>) -> Result<DiffSize> {
    let mut check = DiffCheck::new(len);
    for entry in entries {
        check.member(&mut entry.map_err(unreadable)?)?;
    }
    Ok(check.size)
}

/// The diff's members met so far, and what they take.
struct DiffCheck {
    seen: Seen<Kind>,
    size: DiffSize,
    len: Option<u64>,
    /// [`DIFF_MEMBERS_MAX`] (lowered by tests).
    max_members: u64,
}

impl DiffCheck {
    fn new(len: Option<u64>) -> DiffCheck {
        DiffCheck {
            seen: Seen::default(),
            size: DiffSize::default(),
            len,
            max_members: DIFF_MEMBERS_MAX,
        }
    }

    /// One member, held to every rule of [`check_diff`].
    fn member<R: Read>(&mut self, e: &mut tar::Entry<R>) -> Result<Kind> {
        let name = e.path().map_err(unreadable)?.into_owned();
        let bad = |why: String| refused(&name, &why);
        let kind = kind_of(e).map_err(bad)?;
        let parts = placeable(&name).map_err(bad)?;
        if parts.is_empty() && kind != Kind::Dir {
            return Err(bad("a non-directory in the place of the root".into()));
        }
        check_mode(e.header(), kind).map_err(bad)?;
        check_xattrs(e).map_err(bad)?;
        if self
            .len
            .is_some_and(|len| e.raw_file_position().saturating_add(e.size()) > len)
        {
            return Err(bad(format!("its data runs past the end of {DIFF}")));
        }
        let keys = self.seen.keys(&parts);
        self.check_place(&parts, &keys).map_err(bad)?;
        match kind {
            Kind::HardLink => self.check_hard_link(e).map_err(bad)?,
            Kind::Symlink => check_symlink(e).map_err(bad)?,
            Kind::File | Kind::Dir | Kind::Fifo => {}
        }
        self.count(kind, e.size())?;
        self.seen
            .insert(*keys.last().expect("one key at least"), kind);
        Ok(kind)
    }

    /// Not a name met before, nor under a symlink or a file of the diff.
    fn check_place(&self, parts: &[&OsStr], keys: &[Key]) -> Result<(), String> {
        let (name, above) = keys.split_last().expect("one key at least");
        for (i, k) in above.iter().enumerate() {
            let what = match self.seen.get(k) {
                Some(Kind::Symlink) => "the symlink",
                Some(Kind::File | Kind::HardLink | Kind::Fifo) => "the file",
                _ => continue,
            };
            let at: PathBuf = parts[..=i].iter().collect();
            return Err(format!(
                "under {what} {} of the diff; nothing is written through a link",
                at.display()
            ));
        }
        match self.seen.get(name) {
            Some(_) => Err("a second member of this name".into()),
            None => Ok(()),
        }
    }

    fn check_hard_link<R: Read>(&self, e: &tar::Entry<R>) -> Result<(), String> {
        let target = e
            .link_name()
            .map_err(|e| format!("an unreadable link target ({e})"))?
            .ok_or("a hard link without a target")?;
        let earlier_file = placeable(&target).ok().is_some_and(|p| {
            !p.is_empty()
                && matches!(
                    self.seen.get(&self.seen.key(&p)),
                    Some(Kind::File | Kind::HardLink)
                )
        });
        match earlier_file {
            true => Ok(()),
            false => Err(format!(
                "a hard link to {}, which is not a regular file earlier in the diff",
                target.display()
            )),
        }
    }

    /// Counts the member in; TooLarge past the limits.
    fn count(&mut self, kind: Kind, size: u64) -> Result<()> {
        let s = &mut self.size;
        s.members += 1;
        match kind {
            Kind::File => {
                s.bytes = s.bytes.saturating_add(size);
                s.need = s.need.saturating_add(size.div_ceil(BLOCK) * BLOCK);
                s.inodes += 1;
            }
            Kind::Dir => (s.need, s.inodes) = (s.need.saturating_add(BLOCK), s.inodes + 1),
            Kind::Symlink | Kind::Fifo => s.inodes += 1,
            Kind::HardLink => {}
        }
        if s.members > self.max_members {
            return Err(Error::TooLarge(format!(
                "{DIFF} has more than {} members",
                self.max_members
            )));
        }
        if s.bytes > DIFF_BYTES_MAX {
            return Err(Error::TooLarge(format!(
                "{DIFF} unpacks to more than {} GiB",
                DIFF_BYTES_MAX >> 30
            )));
        }
        Ok(())
    }
}

/// A name's normal components, if a restore may write it: relative, without
/// `..`, at most [`NAME_MAX_BYTES`].
fn placeable(name: &Path) -> Result<Vec<&OsStr>, String> {
    if name.as_os_str().len() > NAME_MAX_BYTES {
        return Err(format!("a name past {NAME_MAX_BYTES} bytes"));
    }
    normal(name).ok_or_else(|| "an absolute name, or one that climbs with ..".into())
}

/// What the member is, as the tar crate would unpack it; why not, if it is
/// nothing a restore writes.
fn kind_of<R: Read>(e: &tar::Entry<R>) -> Result<Kind, String> {
    use tar::EntryType as T;
    Ok(match e.header().entry_type() {
        // An old-style header whose name ends in `/` is unpacked as a directory.
        T::Regular | T::Continuous
            if e.header().as_ustar().is_none() && e.path_bytes().ends_with(b"/") =>
        {
            Kind::Dir
        }
        T::Regular | T::Continuous => Kind::File,
        T::Directory => Kind::Dir,
        T::Symlink => Kind::Symlink,
        T::Link => Kind::HardLink,
        T::Char | T::Block => return Err("a device node; device nodes are refused".into()),
        T::Fifo => Kind::Fifo,
        T::GNUSparse => return Err("a sparse file; sparse entries are refused".into()),
        T::XGlobalHeader => return Err("a PAX global header; they are refused".into()),
        t => {
            return Err(format!(
                "entry type {:?}; only files, directories, links and FIFOs are unpacked",
                t.as_byte() as char
            ))
        }
    })
}

/// Setuid and setgid files, and setuid directories, are refused: unpacked by
/// root they would be root's, and give root's rights to whoever runs them. A
/// setgid directory only hands its group on to what is made in it, and is
/// common (Debian's `/var/mail`, `/var/local`, `/var/log/journal`): it stays.
fn check_mode(h: &tar::Header, kind: Kind) -> Result<(), String> {
    let mode = h.mode().map_err(|e| format!("an unreadable mode ({e})"))?;
    let (setuid, setgid) = (mode & 0o4000 != 0, mode & 0o2000 != 0);
    match kind {
        Kind::File if setuid || setgid => Err(format!(
            "mode {mode:o}: setuid and setgid files are refused"
        )),
        Kind::Dir if setuid => Err(format!("mode {mode:o}: setuid directories are refused")),
        _ => Ok(()),
    }
}

/// File capabilities are refused. No extended attribute from an archive is
/// ever applied ([`unpack_diff`]); a diff that carries capabilities all the
/// same means to give a file rights, and is refused for it.
fn check_xattrs<R: Read>(e: &mut tar::Entry<R>) -> Result<(), String> {
    let Some(records) = e
        .pax_extensions()
        .map_err(|e| format!("unreadable PAX records ({e})"))?
    else {
        return Ok(());
    };
    for r in records {
        let r = r.map_err(|e| format!("a malformed PAX record ({e})"))?;
        if CAPABILITY_KEYS.contains(&r.key_bytes()) {
            return Err("file capabilities (security.capability) are refused".into());
        }
    }
    Ok(())
}

/// A symlink is unpacked as it is, whatever its target: the container
/// resolves it, in its own root. Nothing is written through it (see
/// [`DiffCheck::check_place`]).
fn check_symlink<R: Read>(e: &tar::Entry<R>) -> Result<(), String> {
    let target = e
        .link_name()
        .map_err(|e| format!("an unreadable link target ({e})"))?
        .ok_or("a symlink without a target")?;
    match target.as_os_str().len() {
        0 => Err("a symlink without a target".into()),
        n if n > NAME_MAX_BYTES => Err(format!("a link target past {NAME_MAX_BYTES} bytes")),
        _ => Ok(()),
    }
}

/// Checks `deleted.files`: a JSON list of absolute paths in the container,
/// none climbing (`..`), none the root itself, none past `PATH_MAX`, at most
/// [`DIFF_MEMBERS_MAX`]. The paths, relative to the root.
pub fn check_deleted(data: &[u8]) -> Result<Vec<PathBuf>> {
    let list: Vec<String> = serde_json::from_slice(data)
        .map_err(|e| Error::UnsafeArchive(format!("{DELETED}: not a JSON list of paths ({e})")))?;
    if list.len() as u64 > DIFF_MEMBERS_MAX {
        return Err(Error::TooLarge(format!(
            "{DELETED} lists more than {DIFF_MEMBERS_MAX} paths"
        )));
    }
    list.iter().map(|p| deleted_path(p)).collect()
}

fn deleted_path(p: &str) -> Result<PathBuf> {
    let bad = |why: &str| Error::UnsafeArchive(format!("{DELETED}: {p} ({why})"));
    let Some(rel) = p.strip_prefix('/') else {
        return Err(bad("not an absolute path"));
    };
    if p.contains('\0') {
        return Err(bad("a NUL byte in a path"));
    }
    if p.len() > NAME_MAX_BYTES {
        return Err(bad(&format!("a path past {NAME_MAX_BYTES} bytes")));
    }
    let parts = normal(Path::new(rel))
        .ok_or_else(|| bad("a path that climbs with .., or starts with //"))?;
    if parts.is_empty() {
        return Err(bad("the root itself"));
    }
    Ok(parts.iter().collect())
}

/// Applies `rootfs-diff.tar` and then `deleted.files` onto `rootfs`. Both are
/// checked again first, as at open, and the diff against the free space of
/// the root file system's own (its upper dir's, for an overlay): nothing is
/// written unless all of it passes.
pub fn apply_rootfs_diff(extracted: &Path, rootfs: &Path) -> Result<()> {
    let root = rootfs
        .canonicalize()
        .ctx(|| format!("resolve {}", rootfs.display()))?;
    let diff = extracted.join(DIFF);
    let size = match diff.exists() {
        true => Some(check_diff_file(&diff)?),
        false => None,
    };
    let deleted = extracted.join(DELETED);
    let deleted = match deleted.exists() {
        true => check_deleted(&std::fs::read(&deleted).ctx(|| format!("read {DELETED}"))?)?,
        false => Vec::new(),
    };
    if let Some(size) = size {
        check_space(&size, &root)?;
        unpack_diff(&diff, &root)?;
    }
    remove_deleted(&deleted, &root)
}

fn check_diff_file(diff: &Path) -> Result<DiffSize> {
    let f = File::open(diff).ctx(|| format!("open {DIFF}"))?;
    let len = f.metadata().ctx(|| format!("stat {DIFF}"))?.len();
    let mut ar = tar::Archive::new(Guard::new(f));
    check_diff(ar.entries_with_seek().map_err(unreadable)?, Some(len))
}

/// TooLarge if the diff would not fit in what `root`'s file system has free
/// (space or inodes, as an unprivileged writer sees them: the blocks kept
/// for root stay the node's).
fn check_space(size: &DiffSize, root: &Path) -> Result<()> {
    let free = safefs::free_space(root)?;
    if size.need > free.bytes {
        return Err(Error::TooLarge(format!(
            "{DIFF} needs {} MiB and {} has {} MiB free",
            size.need.div_ceil(1 << 20),
            root.display(),
            free.bytes >> 20
        )));
    }
    match free.inodes {
        Some(inodes) if size.inodes > inodes => Err(Error::TooLarge(format!(
            "{DIFF} needs {} inodes and {} has {inodes} free",
            size.inodes,
            root.display()
        ))),
        _ => Ok(()),
    }
}

/// Unpacks a checked diff into `root`, every member checked again as it
/// comes. Modes are kept, but setuid and setgid are masked off every file (and
/// setuid off directories) whatever passed; no extended attribute is applied,
/// and ownership is not kept (what is unpacked is root's, as before). A
/// member whose parent resolves out of the root, through a link the image
/// has, is refused.
fn unpack_diff(diff: &Path, root: &Path) -> Result<()> {
    let f = File::open(diff).ctx(|| format!("open {DIFF}"))?;
    let mut ar = tar::Archive::new(Guard::new(f));
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_ownerships(false);
    let mut check = DiffCheck::new(None);
    for entry in ar.entries().map_err(unreadable)? {
        let mut e = entry.map_err(unreadable)?;
        let kind = check.member(&mut e)?;
        e.set_mask(if kind == Kind::Dir { 0o4000 } else { 0o6000 });
        let name = e.path().map_err(unreadable)?.into_owned();
        if !parent_inside(root, &name) {
            return Err(refused(
                &name,
                "it would be written through a link out of the root",
            ));
        }
        if kind == Kind::Fifo {
            let mode = e.header().mode().map_err(unreadable)? & 0o1777;
            make_fifo(&root.join(&name), mode)
                .ctx(|| format!("apply {DIFF}: {}", name.display()))?;
        } else if !e
            .unpack_in(root)
            .ctx(|| format!("apply {DIFF}: {}", name.display()))?
        {
            return Err(refused(&name, "the tar reader would not unpack it"));
        }
    }
    Ok(())
}

/// A FIFO at `path` (its parent checked inside the root), replacing what
/// is there but a directory. The tar crate would unpack one as an empty
/// regular file.
fn make_fifo(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(path)?,
        _ => {}
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode))?;
    // The umask took some bits off; the member's own mode it is.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether the nearest existing directory above `root/name` resolves inside
/// `root` (a canonical path), whatever links lead there.
fn parent_inside(root: &Path, name: &Path) -> bool {
    let target = root.join(name);
    let Some(mut dir) = target.parent() else {
        return false;
    };
    while std::fs::symlink_metadata(dir).is_err() {
        match dir.parent() {
            Some(up) => dir = up,
            None => return false,
        }
    }
    dir.canonicalize().is_ok_and(|d| d.starts_with(root))
}

/// Removes each listed path (relative to `root`, checked) unless its parent
/// resolves out of the root; one already gone is no error.
fn remove_deleted(list: &[PathBuf], root: &Path) -> Result<()> {
    for rel in list {
        let target = root.join(rel);
        // The parent must resolve inside the rootfs, whatever links the image has.
        let parent_ok = target
            .parent()
            .and_then(|d| d.canonicalize().ok())
            .is_some_and(|d| d.starts_with(root));
        if !parent_ok {
            continue;
        }
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(&target).ctx(|| format!("remove {}", target.display()))?
            }
            Ok(_) => {
                std::fs::remove_file(&target).ctx(|| format!("remove {}", target.display()))?
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// Creates the spec's missing mount targets in the rootfs, as a runtime does when
/// it starts a container: a file where a file is bound, a directory otherwise.
/// CRIU needs them to exist before it can mount the restored tree.
pub fn create_mount_points(spec: &Spec, rootfs: &Path) -> Result<()> {
    let root = rootfs
        .canonicalize()
        .ctx(|| format!("resolve {}", rootfs.display()))?;
    for m in spec.mounts().as_ref().into_iter().flatten() {
        let Ok(rel) = m.destination().strip_prefix("/") else {
            continue;
        };
        if !safe_member_name(rel) {
            continue;
        }
        let target = root.join(rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let parent = target.parent().unwrap_or(&root);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .ctx(|| format!("create {}", parent.display()))?;
        // Never create through a link that leads out of the rootfs.
        if !parent.canonicalize().is_ok_and(|p| p.starts_with(&root)) {
            continue;
        }
        let is_file = m
            .source()
            .as_ref()
            .and_then(|s| std::fs::metadata(s).ok())
            .is_some_and(|md| !md.is_dir());
        if is_file {
            safefs::create_new(&target, 0o644)?;
        } else {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .ctx(|| format!("create {}", target.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use tar::EntryType as T;

    /// A tar member as a hostile archive may have it, written raw (the tar
    /// crate's builder would refuse some of these).
    #[derive(Clone)]
    pub(crate) struct M {
        name: String,
        kind: T,
        mode: u32,
        link: String,
        data: Vec<u8>,
        size: Option<u64>,
        pax: Vec<(String, Vec<u8>)>,
    }

    fn member(name: &str, kind: T, mode: u32) -> M {
        M {
            name: name.into(),
            kind,
            mode,
            link: String::new(),
            data: Vec::new(),
            size: None,
            pax: Vec::new(),
        }
    }

    pub(crate) fn file(name: &str, data: &str) -> M {
        M {
            data: data.as_bytes().to_vec(),
            ..member(name, T::Regular, 0o644)
        }
    }

    pub(crate) fn file_bytes(name: &str, data: &[u8]) -> M {
        M {
            data: data.to_vec(),
            ..member(name, T::Regular, 0o600)
        }
    }

    pub(crate) fn dir(name: &str) -> M {
        member(name, T::Directory, 0o755)
    }

    pub(crate) fn symlink(name: &str, target: &str) -> M {
        M {
            link: target.into(),
            ..member(name, T::Symlink, 0o777)
        }
    }

    pub(crate) fn hardlink(name: &str, target: &str) -> M {
        M {
            link: target.into(),
            ..member(name, T::Link, 0o644)
        }
    }

    pub(crate) fn special(name: &str, kind: T) -> M {
        member(name, kind, 0o644)
    }

    impl M {
        pub(crate) fn mode(self, mode: u32) -> M {
            M { mode, ..self }
        }

        pub(crate) fn pax(mut self, key: &str, value: &[u8]) -> M {
            self.pax.push((key.into(), value.to_vec()));
            self
        }

        /// A size in the header other than the data's.
        fn size(self, size: u64) -> M {
            M {
                size: Some(size),
                ..self
            }
        }
    }

    /// PAX records: `<length> <key>=<value>\n`, the length counting itself.
    fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while (body + len.to_string().len()) != len {
                len = body + len.to_string().len();
            }
            out.extend_from_slice(format!("{len} {k}=").as_bytes());
            out.extend_from_slice(v);
            out.push(b'\n');
        }
        out
    }

    fn raw_header(name: &str, kind: T, mode: u32, link: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name.as_bytes()[..n]);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_cksum();
        h
    }

    /// A tar of these members; names past 100 bytes go in a PAX `path`.
    pub(crate) fn tar_of(members: &[M]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for m in members {
            let mut pax = m.pax.clone();
            if m.name.len() > 100 {
                pax.push(("path".into(), m.name.as_bytes().to_vec()));
            }
            if !pax.is_empty() {
                let records = pax_records(&pax);
                let h = raw_header("PaxHeader", T::XHeader, 0o644, "", records.len() as u64);
                b.append(&h, records.as_slice()).unwrap();
            }
            let size = m.size.unwrap_or(m.data.len() as u64);
            let h = raw_header(&m.name, m.kind, m.mode, &m.link, size);
            b.append(&h, m.data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// [`check_diff`] as at open on a plain archive: seeking over the data.
    fn check(bytes: &[u8]) -> Result<DiffSize> {
        let mut ar = tar::Archive::new(Guard::new(Cursor::new(bytes)));
        check_diff(
            ar.entries_with_seek().map_err(unreadable)?,
            Some(bytes.len() as u64),
        )
    }

    /// [`check_diff`] as at unseal: a stream, read through.
    fn check_stream(bytes: &[u8]) -> Result<DiffSize> {
        let mut ar = tar::Archive::new(Guard::new(bytes));
        check_diff(ar.entries().map_err(unreadable)?, None)
    }

    /// A diff as a container's changes make it: directories, files, links of
    /// both kinds, a setgid directory, names with `./`, attributes that are
    /// not capabilities.
    pub(crate) fn clean() -> Vec<M> {
        vec![
            dir("etc"),
            file("etc/app.conf", "on"),
            symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
            dir("./var/mail/").mode(0o2775),
            file("root/newfile", "written").mode(0o600),
            hardlink("root/again", "./root/newfile"),
            symlink("lib64", "usr/lib64"),
            dir("usr"),
            file("usr/big", &"x".repeat(5000)),
            file("tmp/x", "")
                .pax("SCHILY.xattr.user.note", b"hi")
                .pax("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ]
    }

    #[test]
    fn a_clean_diff_passes_and_is_measured() {
        let bytes = tar_of(&clean());
        let size = DiffSize {
            members: 10,
            bytes: 2 + 7 + 5000,
            need: 4096 + 4096 + 8192 + 3 * 4096,
            inodes: 9,
        };
        assert_eq!(check(&bytes).unwrap(), size);
        assert_eq!(check_stream(&bytes).unwrap(), size);
    }

    /// Each diff is refused, seeking over its data (at open) and streamed
    /// (at unseal), naming its member and why.
    fn assert_refused(cases: Vec<(Vec<M>, &str)>) {
        for (members, says) in cases {
            let bytes = tar_of(&members);
            for (how, r) in [("seek", check(&bytes)), ("stream", check_stream(&bytes))] {
                let err = r.err().unwrap_or_else(|| panic!("{says} ({how}): passed"));
                assert!(
                    matches!(err, Error::UnsafeArchive(_)),
                    "{says} ({how}): {err:?}"
                );
                let msg = err.to_string();
                assert!(
                    msg.contains(DIFF) && msg.contains(says),
                    "{says} ({how}): {msg}"
                );
            }
        }
    }

    #[test]
    fn only_files_directories_links_and_fifos_are_unpacked() {
        assert_refused(vec![
            (
                vec![dir("dev"), special("dev/null2", T::Char)],
                "dev/null2 (a device node",
            ),
            (vec![special("sda", T::Block)], "sda (a device node"),
            (vec![special("s", T::new(b'Z'))], "s (entry type 'Z'"),
            (
                vec![special("g", T::XGlobalHeader)],
                "g (a PAX global header",
            ),
            (vec![special("sp", T::GNUSparse)], "a GNU sparse member"),
            (vec![symlink("s", "")], "s (a symlink without a target"),
        ]);
    }

    #[test]
    fn setuid_setgid_and_capabilities_are_refused() {
        let cap = b"\x01\x00\x00\x02\x00\x20\x00\x00";
        let (caps, caps_la) = (
            "SCHILY.xattr.security.capability",
            "LIBARCHIVE.xattr.security.capability",
        );
        assert_refused(vec![
            (
                vec![file("bin/x", "x").mode(0o4755)],
                "bin/x (mode 4755: setuid and setgid files",
            ),
            (
                vec![file("bin/y", "y").mode(0o2711)],
                "bin/y (mode 2711: setuid and setgid files",
            ),
            (
                vec![dir("d").mode(0o4755)],
                "d (mode 4755: setuid directories",
            ),
            (
                vec![file("bin/ping", "p").pax(caps, cap)],
                "bin/ping (file capabilities",
            ),
            (
                vec![file("bin/p2", "p").pax(caps_la, cap)],
                "bin/p2 (file capabilities",
            ),
        ]);
    }

    #[test]
    fn names_stay_below_the_root_and_come_once() {
        let long = format!("{}x", "a/".repeat(2100));
        let climbs = "(an absolute name, or one that climbs";
        assert_refused(vec![
            (vec![file("../escape", "x")], &format!("../escape {climbs}")),
            (vec![file("a/../../b", "x")], &format!("a/../../b {climbs}")),
            (
                vec![file("/etc/passwd", "x")],
                &format!("/etc/passwd {climbs}"),
            ),
            (
                vec![file(".", "x")],
                ". (a non-directory in the place of the root",
            ),
            (vec![file(&long, "x")], "(a name past 4096 bytes"),
            (
                vec![file("a", "1"), file("./a", "2")],
                "./a (a second member of this name",
            ),
            (vec![dir("d/"), dir("d")], "d (a second member of this name"),
            (
                vec![file("x", ""), dir("x/")],
                "x/ (a second member of this name",
            ),
        ]);
    }

    #[test]
    fn nothing_is_written_through_a_link_and_hard_links_stay_in_the_diff() {
        let not_earlier = "which is not a regular file earlier in the diff";
        assert_refused(vec![
            (
                vec![symlink("etc2", "/etc"), file("etc2/passwd", "x")],
                "etc2/passwd (under the symlink etc2 of the diff",
            ),
            (
                vec![symlink("l", "../../.."), dir("l/x/")],
                "l/x/ (under the symlink l",
            ),
            (
                vec![file("f", "x"), file("./f/g", "y")],
                "./f/g (under the file f of the diff",
            ),
            (
                vec![hardlink("h", "/etc/shadow")],
                &format!("h (a hard link to /etc/shadow, {not_earlier}"),
            ),
            (
                vec![file("a", "x"), hardlink("h", "../a")],
                &format!("to ../a, {not_earlier}"),
            ),
            (
                vec![hardlink("h", "a"), file("a", "x")],
                &format!("to a, {not_earlier}"),
            ),
            (
                vec![dir("d"), hardlink("h", "d")],
                &format!("to d, {not_earlier}"),
            ),
            (
                vec![symlink("s", "a"), hardlink("h", "s")],
                &format!("to s, {not_earlier}"),
            ),
            (
                vec![hardlink("h", "etc/passwd")],
                &format!("to etc/passwd, {not_earlier}"),
            ),
        ]);
    }

    #[test]
    fn a_cut_diff_and_an_outsized_extension_header_are_refused() {
        let mut bytes = tar_of(&[file("a", &"x".repeat(3000)), file("b", "y")]);
        bytes.truncate(512 + 1000);
        let err = check(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("a (its data runs past the end of rootfs-diff.tar"),
            "{err}"
        );
        let err = check_stream(&bytes).unwrap_err().to_string();
        assert!(err.contains("not a readable tar"), "{err}");

        // A PAX header that says it is 2 MiB: refused before it is read whole.
        let mut b = tar::Builder::new(Vec::new());
        let big = vec![b'x'; 2 << 20];
        b.append(
            &raw_header("PaxHeader", T::XHeader, 0o644, "", big.len() as u64),
            big.as_slice(),
        )
        .unwrap();
        b.append(&raw_header("f", T::Regular, 0o644, "", 0), std::io::empty())
            .unwrap();
        let bytes = b.into_inner().unwrap();
        for r in [check(&bytes), check_stream(&bytes)] {
            let err = r.unwrap_err().to_string();
            assert!(
                err.contains("an extension header of 2097152 bytes"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_limits_are_too_large_not_unsafe() {
        // Past the bytes limit: a header's size is enough, no data needed.
        let bytes = tar_of(&[file("huge", "").size(DIFF_BYTES_MAX + 1)]);
        let err = check_stream(&bytes).unwrap_err();
        assert!(
            matches!(&err, Error::TooLarge(m) if m.contains("unpacks to more than 16 GiB")),
            "{err:?}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );

        // Past the member limit (here lowered, as a million would take a while).
        let bytes = tar_of(&[file("a", ""), file("b", ""), file("c", ""), file("d", "")]);
        let mut ar = tar::Archive::new(bytes.as_slice());
        let mut check = DiffCheck::new(None);
        check.max_members = 3;
        let mut last = Ok(Kind::File);
        for e in ar.entries().unwrap() {
            last = check.member(&mut e.unwrap());
        }
        assert!(
            matches!(&last, Err(Error::TooLarge(m)) if m.contains("more than 3 members")),
            "{last:?}"
        );

        let many = format!("[{}\"/a\"]", "\"/a\",".repeat(DIFF_MEMBERS_MAX as usize));
        assert!(matches!(
            check_deleted(many.as_bytes()),
            Err(Error::TooLarge(m)) if m.contains("more than 1000000 paths")
        ));
    }

    #[test]
    fn deleted_files_are_checked_path_by_path() {
        assert_eq!(
            check_deleted(br#"["/gone", "/a/./b/", "/bin/vi"]"#).unwrap(),
            ["gone", "a/b", "bin/vi"].map(PathBuf::from)
        );
        let long = format!("/{}", "a/".repeat(2100));
        for (list, says) in [
            (r#"{"a": 1}"#.to_string(), "not a JSON list of paths"),
            (r#"["relative"]"#.into(), "relative (not an absolute path"),
            (
                r#"["/../etc/passwd"]"#.into(),
                "/../etc/passwd (a path that climbs with ..",
            ),
            (r#"["/a/../../b"]"#.into(), "/a/../../b (a path that climbs"),
            (
                r#"["//etc"]"#.into(),
                "//etc (a path that climbs with .., or starts with //",
            ),
            (r#"["/"]"#.into(), "/ (the root itself"),
            (r#"["/."]"#.into(), "/. (the root itself"),
            (r#"["/a\u0000b"]"#.into(), "a NUL byte"),
            (format!("[\"{long}\"]"), "a path past 4096 bytes"),
        ] {
            let err = check_deleted(list.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::UnsafeArchive(_)), "{list}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(DELETED) && msg.contains(says), "{list}: {msg}");
        }
    }

    /// An extracted archive's diff and deletions, as a restore stages them.
    fn staged(members: &[M], deleted: &str) -> tempfile::TempDir {
        let x = tempfile::tempdir().unwrap();
        std::fs::write(x.path().join(DIFF), tar_of(members)).unwrap();
        std::fs::write(x.path().join(DELETED), deleted).unwrap();
        x
    }

    #[test]
    fn a_clean_diff_is_applied_with_nothing_privileged() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bin")).unwrap();
        std::fs::write(root.path().join("bin/vi"), "vi").unwrap();
        let x = staged(&clean(), r#"["/bin/vi"]"#);
        apply_rootfs_diff(x.path(), root.path()).unwrap();
        let r = root.path();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/app.conf")).unwrap(),
            "on"
        );
        assert_eq!(
            std::fs::read_link(r.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        let mail = std::fs::metadata(r.join("var/mail")).unwrap();
        assert_eq!(mail.permissions().mode() & 0o7777, 0o2775);
        let (a, b) = (
            std::fs::metadata(r.join("root/newfile")).unwrap(),
            std::fs::metadata(r.join("root/again")).unwrap(),
        );
        assert_eq!((a.ino(), a.permissions().mode() & 0o7777), (b.ino(), 0o600));
        assert_eq!(std::fs::read(r.join("usr/big")).unwrap().len(), 5000);
        assert!(!r.join("bin/vi").exists());
        // The file system takes both attributes: none came from the archive.
        let control = r.join("control");
        std::fs::write(&control, "").unwrap();
        for name in [c"user.note", c"trusted.overlay.opaque"] {
            assert!(set_xattr(&control, name), "{name:?} cannot be set here");
            assert!(!has_xattr(&r.join("tmp/x"), name), "{name:?} was applied");
        }
    }

    fn c_path(path: &Path) -> std::ffi::CString {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    /// Whether `path` has extended attribute `name` (neither std nor nix
    /// reads them).
    fn has_xattr(path: &Path, name: &std::ffi::CStr) -> bool {
        let p = c_path(path);
        // SAFETY: NUL-terminated strings the kernel only reads; a null buffer
        // of size 0 asks the size only, so nothing is written.
        let n = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        n >= 0
    }

    fn set_xattr(path: &Path, name: &std::ffi::CStr) -> bool {
        let p = c_path(path);
        // SAFETY: NUL-terminated strings and a 1-byte value, all only read
        // by the kernel and alive across the call.
        let n = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        n == 0 && has_xattr(path, name)
    }

    #[test]
    fn a_pax_size_is_followed_as_the_tar_reader_follows_it() {
        // The header says 0 bytes, the PAX record 5: the tar crate reads 5.
        let bytes = tar_of(&[file("a", "hello").size(0).pax("size", b"5"), file("b", "x")]);
        for r in [check(&bytes), check_stream(&bytes)] {
            let size = r.unwrap();
            assert_eq!((size.members, size.bytes), (2, 6));
        }
    }

    #[test]
    fn a_fifo_is_unpacked_as_a_fifo_without_set_id_bits_and_nothing_goes_under_it() {
        use std::os::unix::fs::FileTypeExt;
        let root = tempfile::tempdir().unwrap();
        let members = [dir("run"), special("run/pipe", T::Fifo).mode(0o6640)];
        apply_rootfs_diff(staged(&members, "[]").path(), root.path()).unwrap();
        let meta = std::fs::symlink_metadata(root.path().join("run/pipe")).unwrap();
        assert!(meta.file_type().is_fifo(), "{:?}", meta.file_type());
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_refused(vec![(
            vec![special("p", T::Fifo), file("p/x", "y")],
            "p/x (under the file p",
        )]);
    }

    #[test]
    fn nothing_is_written_unless_all_of_it_passes() {
        let root = tempfile::tempdir().unwrap();
        let mut bad = clean();
        bad.push(special("dev/x", T::Char));
        let err = apply_rootfs_diff(staged(&bad, "[]").path(), root.path()).unwrap_err();
        assert!(err.to_string().contains("dev/x (a device node"), "{err}");
        let err =
            apply_rootfs_diff(staged(&clean(), r#"["/../x"]"#).path(), root.path()).unwrap_err();
        assert!(
            err.to_string().contains("/../x (a path that climbs"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_link_of_the_image_leading_out_is_not_written_through() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc")).unwrap();
        let x = staged(&[file("etc/passwd", "x"), file("etc/new/deep", "y")], "[]");
        let err = apply_rootfs_diff(x.path(), root.path()).unwrap_err();
        assert!(
            matches!(&err, Error::UnsafeArchive(m) if m.contains("etc/passwd (it would be written through a link out of the root")),
            "{err:?}"
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_diff_past_the_free_space_is_too_large() {
        let root = tempfile::tempdir().unwrap();
        let free = safefs::free_space(root.path()).unwrap();
        let fits = DiffSize {
            need: 4096,
            inodes: 1,
            ..Default::default()
        };
        check_space(&fits, root.path()).unwrap();
        let err = check_space(
            &DiffSize {
                need: free.bytes + (1 << 30),
                ..fits
            },
            root.path(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::TooLarge(m) if m.contains("MiB free")),
            "{err:?}"
        );
        if let Some(inodes) = free.inodes {
            let err = check_space(
                &DiffSize {
                    inodes: inodes + 1,
                    ..fits
                },
                root.path(),
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::TooLarge(m) if m.contains("inodes")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn deleted_files_cannot_escape_the_rootfs() {
        let x = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::fs::write(root.path().join("gone"), "x").unwrap();
        std::fs::write(
            x.path().join("deleted.files"),
            r#"["/gone", "/escape/victim"]"#,
        )
        .unwrap();
        apply_rootfs_diff(x.path(), root.path()).unwrap();
        assert!(!root.path().join("gone").exists());
        assert!(
            outside.path().join("victim").exists(),
            "followed a link out of the rootfs"
        );
        std::fs::write(x.path().join("deleted.files"), r#"["/../etc/passwd"]"#).unwrap();
        assert!(matches!(
            apply_rootfs_diff(x.path(), root.path()),
            Err(Error::UnsafeArchive(_))
        ));
    }
}
