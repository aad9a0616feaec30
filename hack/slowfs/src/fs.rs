//! The passthrough: every operation is done on the backing directory's files,
//! and every byte written waits for the throttle first. Reads are not
//! throttled. No writeback cache: each write reaches this process as the
//! caller makes it, so a writer is slowed at once, as by a slow device whose
//! page cache is already full.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite,
};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

use crate::inodes::{Handles, Inodes};
use crate::sys::{self, errno};
use crate::throttle::Throttle;

/// How long the kernel may trust names and attributes: short, as the backing
/// directory may change beside the mount (tests look at it directly).
pub(crate) const TTL: Duration = Duration::from_secs(1);

pub struct SlowFs {
    pub(crate) backing: PathBuf,
    pub(crate) inodes: Inodes,
    pub(crate) files: Handles<File>,
    pub(crate) dirs: Handles<Vec<(u64, FileType, std::ffi::OsString)>>,
    pub(crate) throttle: Throttle,
}

impl SlowFs {
    pub fn new(backing: &Path, throttle: Throttle) -> std::io::Result<SlowFs> {
        let root = nix::fcntl::open(
            backing,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = sys::stat(&root).map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
        Ok(SlowFs {
            backing: backing.to_path_buf(),
            inodes: Inodes::new(root, sys::key(&st)),
            files: Handles::new(),
            dirs: Handles::new(),
            throttle,
        })
    }

    /// Looks `name` up in `parent`: counts a lookup, as the kernel will.
    pub(crate) fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let dir = self.inodes.fd(parent)?;
        let fd = sys::open_path(&dir, name)?;
        Ok(self.remember(fd)?.1)
    }

    pub(crate) fn remember(&self, fd: OwnedFd) -> Result<(u64, FileAttr), Errno> {
        let st = sys::stat(&fd)?;
        let ino = self.inodes.remember(fd, sys::key(&st));
        Ok((ino, sys::attr(ino, &st)))
    }

    pub(crate) fn getattr_of(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let st = match fh {
            Some(fh) => sys::stat(&*self.files.get(fh.0)?)?,
            None => sys::stat(&*self.inodes.fd(ino)?)?,
        };
        Ok(sys::attr(ino.0, &st))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn setattr_of(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        times: (Option<fuser::TimeOrNow>, Option<fuser::TimeOrNow>),
    ) -> Result<FileAttr, Errno> {
        let fd = self.inodes.fd(ino)?;
        let open = fh.map(|fh| self.files.get(fh.0)).transpose()?;
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            let perm = std::fs::Permissions::from_mode(mode & 0o7777);
            std::fs::set_permissions(sys::proc_path(&*fd), perm)?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            nix::unistd::fchownat(
                &*fd,
                "",
                owner.0.map(nix::unistd::Uid::from_raw),
                owner.1.map(nix::unistd::Gid::from_raw),
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(size) = size {
            match &open {
                Some(f) => f.set_len(size)?,
                None => sys::reopen(&*fd, libc::O_WRONLY)?.set_len(size)?,
            }
        }
        if times.0.is_some() || times.1.is_some() {
            sys::set_times(&fd, sys::timespec(times.0), sys::timespec(times.1))?;
        }
        self.getattr_of(ino, None)
    }

    pub(crate) fn create_of(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let dir = self.inodes.fd(parent)?;
        let flags = OFlag::from_bits_truncate(
            (flags | libc::O_CREAT | libc::O_CLOEXEC)
                & !(libc::O_APPEND | libc::O_NOCTTY | libc::O_DIRECT),
        );
        let fd = nix::fcntl::openat(&*dir, name, flags, Mode::from_bits_truncate(mode))
            .map_err(errno)?;
        let file = File::from(fd);
        let path = sys::reopen(&file, libc::O_PATH)?;
        let (_, attr) = self.remember(path.into())?;
        Ok((attr, self.files.insert(file)))
    }

    pub(crate) fn read_of(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = self.files.get(fh.0)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(crate) fn write_of(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let file = self.files.get(fh.0)?;
        self.throttle.take(data.len() as u64);
        file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    pub(crate) fn readdir_of(
        &self,
        ino: INodeNo,
    ) -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
        let fd = self.inodes.fd(ino)?;
        let mut out = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for e in std::fs::read_dir(sys::proc_path(&*fd))? {
            let e = e?;
            let kind = e.file_type().map(|t| sys::kind(mode_of(t)))?;
            out.push((std::os::unix::fs::DirEntryExt::ino(&e), kind, e.file_name()));
        }
        Ok(out)
    }

    /// Copies inside the backing file system, at the throttled rate.
    pub(crate) fn copy_of(
        &self,
        from: (FileHandle, u64),
        to: (FileHandle, u64),
        len: u64,
    ) -> Result<u32, Errno> {
        let (src, dst) = (self.files.get(from.0 .0)?, self.files.get(to.0 .0)?);
        let len = len.min(u32::MAX as u64 & !0xfff);
        self.throttle.take(len);
        let (mut off_in, mut off_out) = (from.1 as i64, to.1 as i64);
        // SAFETY: both fds are open; the offsets are locals the kernel advances.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len as usize,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(n as u32)
    }
}

fn mode_of(t: std::fs::FileType) -> u32 {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        libc::S_IFDIR
    } else if t.is_symlink() {
        libc::S_IFLNK
    } else if t.is_fifo() {
        libc::S_IFIFO
    } else if t.is_char_device() {
        libc::S_IFCHR
    } else if t.is_block_device() {
        libc::S_IFBLK
    } else if t.is_socket() {
        libc::S_IFSOCK
    } else {
        libc::S_IFREG
    }
}

pub(crate) fn reply_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

pub(crate) fn reply_empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

pub(crate) fn reply_attr(reply: ReplyAttr, r: Result<FileAttr, Errno>) {
    match r {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

pub(crate) fn reply_written(reply: ReplyWrite, r: Result<u32, Errno>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(e),
    }
}

pub(crate) fn reply_opened(reply: ReplyOpen, r: Result<u64, Errno>) {
    match r {
        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
        Err(e) => reply.error(e),
    }
}
