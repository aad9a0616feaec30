//! Step 6: one uncompressed POSIX tar, root-only from its first byte, atomic.

use std::ffi::CString;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{
    fcntl, openat, renameat2, splice, FallocateFlags, FcntlArg, OFlag, RenameFlags, SpliceFFlags,
};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::error::{Context, Error, Result};

const BLOCK: u64 = 512;
/// Members at least this large get their data 4 KiB-aligned in the archive, so a
/// reflink-capable file system can share extents instead of copying.
const ALIGN_FROM: u64 = 64 * 1024;
const ALIGN: u64 = 4096;
/// The pipe size asked for when receiving a stream: fs.pipe-max-size's default.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// ustar's 11 octal digits hold sizes below 8 GiB; larger ones need a PAX size.
const USTAR_MAX: u64 = 0o77777777777;
// Every member too big for ustar is also big enough to get a PAX header.
const _: () = assert!(ALIGN_FROM <= USTAR_MAX);

/// Where the archive will go: a validated, not-yet-existing name in an open directory.
#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    pub dir_path: PathBuf,
    dir: OwnedFd,
    name: CString,
}

impl Target {
    /// `location` must be absolute, name a missing entry (not even a dangling
    /// symlink) in an existing directory.
    pub fn new(location: &Path) -> Result<Target> {
        let bad =
            |why: &str| Error::InvalidArgument(format!("location {}: {why}", location.display()));
        if location.as_os_str().is_empty() {
            return Err(bad("empty"));
        }
        if !location.is_absolute() {
            return Err(bad("must be an absolute path"));
        }
        let name = location
            .file_name()
            .ok_or_else(|| bad("has no file name"))?;
        if location
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad("must not contain '..'"));
        }
        let dir_path = location
            .parent()
            .ok_or_else(|| bad("has no parent directory"))?
            .to_path_buf();
        let cdir =
            CString::new(dir_path.as_os_str().as_bytes()).map_err(|_| bad("contains NUL"))?;
        let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let dir = nix::fcntl::open(cdir.as_c_str(), flags, Mode::empty()).map_err(|e| {
            let e = std::io::Error::from(e);
            bad(&format!("parent directory unusable: {e}"))
        })?;
        let name = CString::new(name.as_bytes()).map_err(|_| bad("contains NUL"))?;
        let t = Target {
            path: location.to_path_buf(),
            dir_path,
            dir,
            name,
        };
        if t.exists()? {
            return Err(Error::AlreadyExists(t.path.clone()));
        }
        Ok(t)
    }

    /// The same target through a duplicate of its directory fd.
    fn try_clone(&self) -> Result<Target> {
        Ok(Target {
            path: self.path.clone(),
            dir_path: self.dir_path.clone(),
            dir: self.dir.try_clone().ctx(|| "dup archive dir".into())?,
            name: self.name.clone(),
        })
    }

    fn exists(&self) -> Result<bool> {
        match nix::sys::stat::fstatat(
            self.dir.as_fd(),
            self.name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("stat {}", self.path.display())),
        }
    }
}

/// Writes the archive into a hidden temp file beside the target; `commit` renames
/// it into place, dropping without commit removes it.
pub struct ArchiveWriter {
    target: Target,
    /// Where the unfinished archive lives: a temp name beside the target, or an
    /// adopted image in the staging dir.
    tmp_dir: OwnedFd,
    tmp: CString,
    /// Set when adopting: where the adopted data starts, and its length.
    adopted: Option<(u64, u64)>,
    file: File,
    offset: u64,
    committed: bool,
    /// Bytes this writer put into the archive itself (headers, small members,
    /// copies); cloned (reflink) and adopted ranges are not among them.
    pub written: u64,
    /// Bytes of streamed members that were held in memory during the pause.
    pub held: u64,
}

impl ArchiveWriter {
    pub fn create(target: &Target) -> Result<ArchiveWriter> {
        let dir = target.dir.try_clone().ctx(|| "dup archive dir".into())?;
        Self::create_at(target, dir)
    }

    /// Like [`create`](Self::create), but the unfinished archive lives in
    /// `staging` (private, on the archive's file system), so that whatever removes
    /// the staging dir after a crash removes it too. Beside the target where
    /// `staging` is on another file system.
    pub fn create_in(target: &Target, staging: &Path) -> Result<ArchiveWriter> {
        let dir: OwnedFd = File::open(staging)
            .ctx(|| format!("open {}", staging.display()))?
            .into();
        if same_fs(&dir, &target.dir) {
            Self::create_at(target, dir)
        } else {
            Self::create(target)
        }
    }

    fn create_at(target: &Target, tmp_dir: OwnedFd) -> Result<ArchiveWriter> {
        let rand: u64 = rand_u64();
        let tmp = CString::new(format!(
            ".{}.{rand:016x}.ckpt-shim-tmp",
            target.name.to_string_lossy()
        ))
        .expect("no NUL");
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // 0600 from creation.
        let file = File::from(
            openat(
                &tmp_dir,
                tmp.as_c_str(),
                flags,
                Mode::from_bits_truncate(0o600),
            )
            .ctx(|| format!("create archive in {}", target.dir_path.display()))?,
        );
        let w = ArchiveWriter {
            target: target.try_clone()?,
            tmp_dir,
            tmp,
            adopted: None,
            file,
            offset: 0,
            committed: false,
            written: 0,
            held: 0,
        };
        // The umask cannot widen 0600, but make the mode explicit whatever it was.
        nix::sys::stat::fchmod(
            w.file.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .ctx(|| "chmod archive".into())?;
        Ok(w)
    }

    /// Makes a staged file on the archive's file system the archive itself, with no
    /// copy of its data: `FALLOC_FL_INSERT_RANGE` inserts `data_at` bytes (the
    /// members before it and its own headers, block-aligned by the PAX padding) in
    /// front of its extents. Members are then added from offset 0 as usual, the
    /// adopted data is passed with [`add_adopted`](Self::add_adopted), and the rest
    /// is appended. `None` where the file system cannot insert ranges (the caller
    /// copies instead). The file is root's, 0600, in a 0700 dir from creation.
    pub fn adopt(
        target: &Target,
        dir: &Path,
        rel: &str,
        data_at: u64,
    ) -> Result<Option<ArchiveWriter>> {
        let tmp_dir: OwnedFd = File::open(dir)
            .ctx(|| format!("open {}", dir.display()))?
            .into();
        let tmp = CString::new(rel).map_err(|_| Error::Other(format!("bad name {rel}")))?;
        let same_fs = same_fs(&tmp_dir, &target.dir);
        let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let Ok(fd) = openat(&tmp_dir, tmp.as_c_str(), flags, Mode::empty()) else {
            return Ok(None);
        };
        if !same_fs {
            return Ok(None);
        }
        let file = File::from(fd);
        let len = file.metadata().ctx(|| format!("stat {rel}"))?.len();
        nix::sys::stat::fchmod(
            file.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .ctx(|| "chmod archive".into())?;
        // On failure the file is unchanged.
        let insert = FallocateFlags::FALLOC_FL_INSERT_RANGE;
        if let Err(e) = nix::fcntl::fallocate(&file, insert, 0, data_at as i64) {
            tracing::debug!(
                "cannot insert a range here, copying instead: {}",
                std::io::Error::from(e)
            );
            return Ok(None);
        }
        Ok(Some(ArchiveWriter {
            target: target.try_clone()?,
            tmp_dir,
            tmp,
            adopted: Some((data_at, len)),
            file,
            offset: 0,
            committed: false,
            written: 0,
            held: 0,
        }))
    }

    /// The adopted file's member: its headers, then a jump over its data.
    pub fn add_adopted(&mut self, name: &str) -> Result<()> {
        let (at, len) = self
            .adopted
            .ok_or_else(|| Error::Other("no adopted file".into()))?;
        self.file_header(name, len)?;
        if self.offset != at {
            return Err(Error::Other(format!(
                "archive plan is off: {name} data at {} not {at}",
                self.offset
            )));
        }
        self.offset = at + len;
        self.file
            .seek(SeekFrom::Start(self.offset))
            .ctx(|| "seek past adopted data".into())?;
        self.pad()
    }

    pub fn add_dir(&mut self, name: &str) -> Result<()> {
        let h = header(
            &format!("{}/", name.trim_end_matches('/')),
            0,
            0o700,
            tar::EntryType::Directory,
        )?;
        self.write(h.as_bytes())
    }

    pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.file_header(name, data.len() as u64)?;
        self.write(data)?;
        self.pad()
    }

    /// Adds a regular file's content, moved in the kernel with copy_file_range.
    pub fn add_file(&mut self, name: &str, src: &File) -> Result<()> {
        let len = src.metadata().ctx(|| format!("stat {name}"))?.len();
        self.file_header(name, len)?;
        self.copy_from(src, len)
            .ctx(|| format!("copy {name} into {}", self.target.path.display()))?;
        self.pad()
    }

    /// Adds a member of `len` bytes that `fill` writes (returning how many it
    /// wrote, which must be `len`).
    pub fn add_with(
        &mut self,
        name: &str,
        len: u64,
        fill: impl FnOnce(&mut dyn Write) -> Result<u64>,
    ) -> Result<()> {
        self.file_header(name, len)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &self.file);
        let n = fill(&mut out)?;
        out.flush()
            .ctx(|| format!("write {}", self.target.path.display()))?;
        drop(out);
        if n != len {
            return Err(Error::Other(format!(
                "{name}: {n} bytes where {len} were due"
            )));
        }
        self.offset += len;
        self.written += len;
        self.pad()
    }

    /// Adds `len` bytes of `src` from `at` as a member, moved in the kernel.
    pub fn add_file_range(&mut self, name: &str, src: &File, at: u64, len: u64) -> Result<()> {
        self.file_header(name, len)?;
        self.copy_range_from(src, at, len)
            .ctx(|| format!("copy {name} into {}", self.target.path.display()))?;
        self.pad()
    }

    /// The headers of a regular member of `len` bytes, by the rules [`plan`]
    /// follows: large members first get a PAX header that carries sizes past ustar's
    /// limit and 4 KiB-aligns their data.
    fn file_header(&mut self, name: &str, len: u64) -> Result<()> {
        let pax = (len >= ALIGN_FROM).then(|| pax_body_len(self.offset, len));
        let h = member_headers(name, len, pax)?;
        self.write(&h)
    }

    /// Adds a member whose size is known only at its end: CRIU's image arriving
    /// through a pipe. Its headers are reserved for any size (a PAX header that
    /// 4 KiB-aligns the data), the data is read from the pipe into `hold` (see
    /// [`super::hold`]) and what does not fit spliced into place, `drained` is
    /// called once the pipe has ended; then, once `thawed` opens, the held data
    /// and the headers are written. Stops early with an error once `stop` is
    /// set, which drops the pipe and makes CRIU abort. Returns the member's
    /// size and the bytes spliced in (written while CRIU held the tasks).
    pub fn add_stream(
        &mut self,
        name: &str,
        pipe: &OwnedFd,
        stop: &std::sync::atomic::AtomicBool,
        (mut hold, thawed): (Option<&mut super::hold::Hold>, &super::hold::Thawed),
        drained: &dyn Fn(),
    ) -> Result<(u64, u64)> {
        let start = self.offset;
        let pax = pax_body_len(start, u64::MAX);
        let data_at = start + 2 * BLOCK + pax;
        let path = self.target.path.clone();
        let ctx = || format!("stream {name} into {}", path.display());
        // Bigger pipes mean fewer wake-ups; the size is capped without CAP_SYS_RESOURCE.
        // Failure leaves the size as it was.
        let _ = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        let (held, ended) = match hold {
            Some(ref mut h) => h.fill_from(pipe).ctx(ctx)?,
            None => (0, false),
        };
        let rest = if ended {
            0
        } else {
            self.splice_in(pipe, data_at + held as u64, stop).ctx(ctx)?
        };
        drained();
        if !thawed.wait() || stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(abandoned()).ctx(ctx);
        }
        let len = held as u64 + rest;
        if let Some(h) = hold.filter(|_| held > 0) {
            h.write_into(&self.file, data_at, held).ctx(ctx)?;
            self.written += held as u64;
            self.held += held as u64;
        }
        let h = member_headers(name, len, Some(pax))?;
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(&h, start)
            .ctx(|| format!("write {}", self.target.path.display()))?;
        self.written += h.len() as u64;
        self.offset = data_at + len;
        self.file
            .seek(SeekFrom::Start(self.offset))
            .ctx(|| "seek past streamed data".into())?;
        self.pad()?;
        Ok((len, rest))
    }

    /// Moves everything `pipe` carries into the archive at `at`, in the kernel.
    fn splice_in(
        &mut self,
        pipe: &OwnedFd,
        at: u64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> std::io::Result<u64> {
        let mut off = at as i64;
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(abandoned());
            }
            let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_MORE;
            match splice(
                pipe,
                None,
                &self.file,
                Some(&mut off),
                PIPE_SIZE as usize,
                flags,
            ) {
                Ok(0) => return Ok(off as u64 - at),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn copy_from(&mut self, src: &File, len: u64) -> std::io::Result<()> {
        self.copy_range_from(src, 0, len)
    }

    fn copy_range_from(&mut self, src: &File, at: u64, len: u64) -> std::io::Result<()> {
        let share =
            self.offset.is_multiple_of(ALIGN) && at.is_multiple_of(ALIGN) && len >= ALIGN_FROM;
        let moved = crate::fcopy::copy_range(src, at, &self.file, self.offset, len, share)?;
        self.offset += len;
        if moved == crate::fcopy::Moved::Copied {
            self.written += len;
        }
        Ok(())
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.file
            .write_all(b)
            .ctx(|| format!("write {}", self.target.path.display()))?;
        self.offset += b.len() as u64;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let rem = (BLOCK - self.offset % BLOCK) % BLOCK;
        self.write(&vec![0u8; rem as usize])
    }

    /// Ends the tar, makes it durable once (unless `durable` is off), and renames
    /// it into place without ever replacing an existing file. Returns its size.
    pub fn commit(mut self, durable: bool) -> Result<u64> {
        self.write(&[0u8; 2 * BLOCK as usize])?;
        if durable {
            self.file
                .sync_data()
                .ctx(|| format!("fdatasync {}", self.target.path.display()))?;
        }
        match renameat2(
            &self.tmp_dir,
            self.tmp.as_c_str(),
            &self.target.dir,
            self.target.name.as_c_str(),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(Error::AlreadyExists(self.target.path.clone())),
            Err(e) => {
                return Err(e).ctx(|| format!("rename archive to {}", self.target.path.display()))
            }
        }
        self.committed = true;
        if durable {
            nix::unistd::fsync(self.target.dir.as_fd())
                .ctx(|| format!("fsync {}", self.target.dir_path.display()))?;
        }
        Ok(self.offset)
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = unlinkat(
                &self.tmp_dir,
                self.tmp.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// The error of a stream receiver stopped because another one failed; see
/// [`is_abandoned`].
pub(crate) fn abandoned() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "capture abandoned")
}

/// Whether `e` only says the receiver was stopped ([`abandoned`]), not why.
pub(crate) fn is_abandoned(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted)
}

/// Whether two open directories are on one file system (so a rename between them works).
fn same_fs(a: &OwnedFd, b: &OwnedFd) -> bool {
    let dev = |fd: &OwnedFd| nix::sys::stat::fstat(fd.as_fd()).ok().map(|s| s.st_dev);
    dev(a).is_some() && dev(a) == dev(b)
}

fn header(name: &str, size: u64, mode: u32, kind: tar::EntryType) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::Other(format!("archive member name {name:?}: {e}")))?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    h.set_entry_type(kind);
    h.set_cksum();
    Ok(h)
}

/// Where each member's data will start, for members of the given sizes (`None`
/// for a directory) written in order from offset 0: the same rules as the writer.
pub fn plan(sizes: &[Option<u64>]) -> Vec<u64> {
    let mut o = 0u64;
    sizes
        .iter()
        .map(|s| match s {
            None => {
                o += BLOCK;
                o
            }
            Some(len) => {
                if *len >= ALIGN_FROM {
                    o += BLOCK + pax_body(o, *len).len() as u64;
                }
                o += BLOCK;
                let at = o;
                o += len.div_ceil(BLOCK) * BLOCK;
                at
            }
        })
        .collect()
}

/// The PAX body for a member whose headers start at `offset`: a `size` record when
/// ustar cannot hold `len`, and a `comment` record sized so that the member's data
/// (after this header, the body and the member header) starts on a 4 KiB boundary.
fn pax_body(offset: u64, len: u64) -> String {
    pax_body_filled(len, pax_body_len(offset, len))
}

/// The length of [`pax_body`]: room for the size record and at least a minimal
/// comment, rounded so that the data lands on a 4 KiB boundary. With `u64::MAX`
/// it is room enough for any size.
fn pax_body_len(offset: u64, len: u64) -> u64 {
    let size_len = size_record(len).len() as u64;
    let mut r = (ALIGN - (offset + 2 * BLOCK) % ALIGN) % ALIGN;
    while r < size_len + 32 {
        r += ALIGN;
    }
    r
}

/// A PAX body of exactly `total` bytes for a member of `len` bytes.
fn pax_body_filled(len: u64, total: u64) -> String {
    let size_rec = size_record(len);
    pax_padding(total as usize - size_rec.len()) + &size_rec
}

fn size_record(len: u64) -> String {
    if len > USTAR_MAX {
        pax_record("size", &len.to_string())
    } else {
        String::new()
    }
}

/// A regular member's headers: with `pax` (the PAX body's length), a PAX header
/// and body first, then the ustar header (its size zero past ustar's limit).
fn member_headers(name: &str, len: u64, pax: Option<u64>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(total) = pax {
        let body = pax_body_filled(len, total);
        let h = header("PaxHeader", total, 0o600, tar::EntryType::XHeader)?;
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(body.as_bytes());
    }
    let size_field = if len > USTAR_MAX { 0 } else { len };
    let h = header(name, size_field, 0o600, tar::EntryType::Regular)?;
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// One PAX record: "<len> <key>=<value>\n", where len counts itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while (len.to_string().len() + body.len()) != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

/// A `comment` record of exactly `total` bytes, used only as padding.
fn pax_padding(total: usize) -> String {
    let fixed = " comment=\n".len();
    let digits = total.to_string().len();
    format!("{total} comment={}\n", "0".repeat(total - digits - fixed))
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: no safe wrapper (std's is unstable, nix has none): getrandom
    // writes at most `b.len()` bytes into `b`, a live local buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
    }
    u64::from_ne_bytes(b)
}

/// Checks a member name read back from an archive: relative, no `..`, no NUL.
pub fn safe_member_name(name: &Path) -> bool {
    !name.as_os_str().is_empty()
        && name.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// One archive member, before it is written. Secret ones carry the
/// container's data, and are sealed when the checkpoint is.
pub enum Member {
    Dir(&'static str),
    Bytes(String, Vec<u8>),
    File(String, std::path::PathBuf),
    Secret(String, Vec<u8>),
    SecretFile(String, std::path::PathBuf),
    /// An open file (in memory) with the data.
    Open(String, std::fs::File),
    /// Parts sealed already (the rootfs diff, sealed as it was walked).
    Sealed(std::cell::RefCell<Option<crate::seal::encrypt::CipherSpool>>),
}

impl Member {
    pub(super) fn name(&self) -> &str {
        match self {
            Member::Dir(n) => n,
            Member::Bytes(n, _)
            | Member::File(n, _)
            | Member::Open(n, _)
            | Member::Secret(n, _)
            | Member::SecretFile(n, _) => n,
            Member::Sealed(_) => "(sealed parts)",
        }
    }

    /// Data size (`None` for a directory), as the archive plan needs it.
    pub(super) fn size(&self) -> Result<Option<u64>> {
        let stat =
            |p: &std::path::Path| std::fs::metadata(p).ctx(|| format!("stat {}", p.display()));
        Ok(match self {
            Member::Dir(_) => None,
            Member::Bytes(_, d) | Member::Secret(_, d) => Some(d.len() as u64),
            Member::File(_, p) | Member::SecretFile(_, p) => Some(stat(p)?.len()),
            Member::Open(n, f) => Some(f.metadata().ctx(|| format!("stat {n}"))?.len()),
            Member::Sealed(_) => return Err(Error::Other("sealed parts are only streamed".into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn pax_records_count_their_own_length() {
        for (k, v) in [
            ("size", "8589934592"),
            ("comment", "x"),
            ("size", &"9".repeat(95)),
        ] {
            let r = pax_record(k, v);
            let (len, rest) = r.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{r:?}");
            assert_eq!(rest, format!("{k}={v}\n"));
        }
        assert_eq!(pax_padding(600).len(), 600);
    }

    #[test]
    fn pax_body_aligns_data_and_carries_big_sizes() {
        for offset in (0..20).map(|i| i * BLOCK) {
            for len in [ALIGN_FROM, USTAR_MAX + 1, 20 << 30] {
                let body = pax_body(offset, len);
                assert_eq!(body.len() as u64 % BLOCK, 0);
                assert_eq!(
                    (offset + 2 * BLOCK + body.len() as u64) % ALIGN,
                    0,
                    "offset {offset}"
                );
                assert_eq!(body.contains(&format!(" size={len}\n")), len > USTAR_MAX);
            }
        }
    }

    #[test]
    fn target_refuses_bad_locations() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.path().join("l")).unwrap();
        assert!(matches!(
            Target::new(Path::new("rel.tar")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Target::new(&d.path().join("no/such.tar")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Target::new(&d.path().join("f/x.tar")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Target::new(&d.path().join("../x.tar")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Target::new(&d.path().join("f")),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            Target::new(&d.path().join("l")),
            Err(Error::AlreadyExists(_))
        ));
        assert!(Target::new(&d.path().join("new.tar")).is_ok());
    }

    #[test]
    fn archive_round_trips_with_aligned_large_members() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(d.path().join("big"), &big).unwrap();
        let t = Target::new(&d.path().join("a.tar")).unwrap();
        let mut w = ArchiveWriter::create(&t).unwrap();
        w.add_bytes("config.dump", b"{}").unwrap();
        w.add_dir("checkpoint").unwrap();
        w.add_file(
            "checkpoint/pages-1.img",
            &File::open(d.path().join("big")).unwrap(),
        )
        .unwrap();
        w.add_bytes("spec.dump", b"{\"a\":1}").unwrap();
        assert!(w.written >= big.len() as u64);
        let size = w.commit(true).unwrap();
        let meta = std::fs::metadata(d.path().join("a.tar")).unwrap();
        assert_eq!((meta.len(), meta.mode() & 0o777), (size, 0o600));
        // Only the archive is left: the temp name was renamed.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);

        let mut ar = tar::Archive::new(File::open(d.path().join("a.tar")).unwrap());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if name == "checkpoint/pages-1.img" {
                assert_eq!(data, big);
                assert_eq!(
                    e.raw_file_position() % ALIGN,
                    0,
                    "page data not 4 KiB-aligned"
                );
            }
            seen.push((name, e.header().entry_type()));
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.dump",
                "checkpoint/",
                "checkpoint/pages-1.img",
                "spec.dump"
            ]
        );
        assert!(seen[1].1.is_dir());
    }

    fn data_offsets(path: &Path) -> Vec<(String, u64, Vec<u8>)> {
        let mut ar = tar::Archive::new(File::open(path).unwrap());
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut d = Vec::new();
                e.read_to_end(&mut d).unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.raw_file_position(),
                    d,
                )
            })
            .collect()
    }

    #[test]
    fn plan_matches_where_the_writer_puts_data() {
        let d = tempfile::tempdir().unwrap();
        let sizes = [70_000usize, 10, 200_000, 4096 * 300];
        for (i, n) in sizes.iter().enumerate() {
            std::fs::write(d.path().join(format!("f{i}")), vec![i as u8 + 1; *n]).unwrap();
        }
        let t = Target::new(&d.path().join("a.tar")).unwrap();
        let mut w = ArchiveWriter::create(&t).unwrap();
        w.add_bytes("big.dump", &vec![7u8; 100_000]).unwrap();
        w.add_dir("checkpoint").unwrap();
        for i in 0..sizes.len() {
            w.add_file(
                &format!("checkpoint/f{i}"),
                &File::open(d.path().join(format!("f{i}"))).unwrap(),
            )
            .unwrap();
        }
        w.commit(false).unwrap();
        let mut want = vec![Some(100_000u64), None];
        want.extend(sizes.iter().map(|n| Some(*n as u64)));
        let planned = plan(&want);
        let got = data_offsets(&d.path().join("a.tar"));
        let files: Vec<(u64, u64)> = got
            .iter()
            .zip(&planned)
            .zip(&want)
            .filter(|(_, s)| s.is_some())
            .map(|((g, p), _)| (g.1, *p))
            .collect();
        for (g, p) in files {
            assert_eq!(g, p);
        }
    }

    #[test]
    fn adopting_a_staged_file_makes_it_the_archive() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("staging")).unwrap();
        let pages: Vec<u8> = (0..(3u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
            .collect();
        std::fs::write(d.path().join("staging/pages-1.img"), &pages).unwrap();
        std::fs::write(d.path().join("staging/small.img"), b"small").unwrap();
        let ino = std::fs::metadata(d.path().join("staging/pages-1.img"))
            .unwrap()
            .ino();
        let t = Target::new(&d.path().join("a.tar")).unwrap();
        let at = plan(&[Some(2), None, Some(5), Some(pages.len() as u64)])[3];
        let Some(mut w) =
            ArchiveWriter::adopt(&t, &d.path().join("staging"), "pages-1.img", at).unwrap()
        else {
            panic!("this file system cannot insert ranges");
        };
        w.add_bytes("config.dump", b"{}").unwrap();
        w.add_dir("checkpoint").unwrap();
        w.add_file(
            "checkpoint/small.img",
            &File::open(d.path().join("staging/small.img")).unwrap(),
        )
        .unwrap();
        w.add_adopted("checkpoint/pages-1.img").unwrap();
        w.add_bytes("dump.log", b"log").unwrap();
        w.commit(true).unwrap();
        let meta = std::fs::metadata(d.path().join("a.tar")).unwrap();
        assert_eq!(
            (meta.ino(), meta.mode() & 0o777),
            (ino, 0o600),
            "the staged file itself became the archive"
        );
        assert!(!d.path().join("staging/pages-1.img").exists());
        let got = data_offsets(&d.path().join("a.tar"));
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.dump",
                "checkpoint/",
                "checkpoint/small.img",
                "checkpoint/pages-1.img",
                "dump.log"
            ]
        );
        assert!(got[3].2 == pages, "adopted data changed");
        assert_eq!(got[3].1, at);
        assert_eq!(
            (got[2].2.as_slice(), got[4].2.as_slice()),
            (&b"small"[..], &b"log"[..])
        );
    }

    #[test]
    fn held_data_waits_for_the_thaw_and_what_does_not_fit_is_spliced() {
        held_then_spliced(false);
        held_then_spliced(true);
    }

    /// The test above with a buffer, or with a memory file (`in_file`).
    fn held_then_spliced(in_file: bool) {
        use std::sync::atomic::AtomicBool;
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3u32 << 20) + 4096).map(|i| (i % 251) as u8).collect();
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || File::from(tx).write_all(&sent).unwrap());
        let t = Target::new(&d.path().join("h.tar")).unwrap();
        let mut w = ArchiveWriter::create(&t).unwrap();
        let thawed = crate::checkpoint::hold::Thawed::default();
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        let streaming = {
            let thawed = thawed.clone();
            std::thread::spawn(move || {
                let mut hold = match in_file {
                    true => crate::checkpoint::hold::Hold::in_file(2 << 20).unwrap(),
                    false => crate::checkpoint::hold::Hold::new(2 << 20).unwrap(),
                };
                let stop = AtomicBool::new(false);
                let drained = move || drained_tx.send(()).unwrap();
                let r = w.add_stream(
                    "pages-1.img",
                    &rx,
                    &stop,
                    (Some(&mut hold), &thawed),
                    &drained,
                );
                (w, r.unwrap())
            })
        };
        drained_rx.recv().unwrap();
        writer.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let on_disk = std::fs::read(w_path(&d)).unwrap();
        let tail = data.len() - (2 << 20);
        let (before, spliced) = on_disk.split_at(on_disk.len() - tail);
        assert_eq!(
            spliced,
            &data[2 << 20..],
            "what did not fit is spliced at once"
        );
        assert!(
            before.iter().all(|b| *b == 0),
            "nothing held is written before the thaw"
        );
        thawed.open(true);
        let (w, (len, spliced)) = streaming.join().unwrap();
        assert_eq!(
            (len, spliced),
            (data.len() as u64, data.len() as u64 - (2 << 20))
        );
        w.commit(false).unwrap();
        let got = data_offsets(&d.path().join("h.tar"));
        assert_eq!(got[0].0, "pages-1.img");
        assert!(got[0].2 == data, "the member holds every byte, in order");
    }

    /// The unfinished archive of the test above, in its staging name.
    fn w_path(d: &tempfile::TempDir) -> PathBuf {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy() != "h.tar")
            .unwrap()
    }

    #[test]
    fn streamed_member_gets_its_headers_once_its_size_is_known() {
        use std::sync::atomic::AtomicBool;
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(5u32 << 20) + 123)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || File::from(tx).write_all(&sent).unwrap());
        let t = Target::new(&d.path().join("s.tar")).unwrap();
        let mut w = ArchiveWriter::create(&t).unwrap();
        w.add_bytes("config.dump", b"{}").unwrap();
        w.add_dir("checkpoint").unwrap();
        let (len, spliced) = w
            .add_stream(
                "checkpoint/pages-1.img",
                &rx,
                &AtomicBool::new(false),
                (None, &crate::checkpoint::hold::Thawed::already()),
                &|| {},
            )
            .unwrap();
        writer.join().unwrap();
        assert_eq!((len, spliced), (data.len() as u64, data.len() as u64));
        w.add_bytes("dump.log", b"log").unwrap();
        w.commit(false).unwrap();
        let got = data_offsets(&d.path().join("s.tar"));
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.dump",
                "checkpoint/",
                "checkpoint/pages-1.img",
                "dump.log"
            ]
        );
        assert!(got[2].2 == data, "streamed data changed");
        assert_eq!(got[2].1 % ALIGN, 0, "streamed data not 4 KiB-aligned");
        assert_eq!(got[3].2, b"log");
    }

    #[test]
    fn stream_reservation_fits_any_size() {
        for offset in (0..10).map(|i| i * BLOCK) {
            let reserved = pax_body_len(offset, u64::MAX);
            for len in [0, 1, USTAR_MAX, USTAR_MAX + 1, 1 << 40, u64::MAX] {
                let body = pax_body_filled(len, reserved);
                assert_eq!(body.len() as u64, reserved);
                assert_eq!((offset + 2 * BLOCK + reserved) % ALIGN, 0);
                assert_eq!(body.contains(&format!(" size={len}\n")), len > USTAR_MAX);
            }
        }
    }

    #[test]
    fn uncommitted_archive_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let t = Target::new(&d.path().join("a.tar")).unwrap();
        let mut w = ArchiveWriter::create(&t).unwrap();
        w.add_bytes("x", b"y").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
