//! The kernel's requests, each answered from the passthrough in `fs.rs`.
//! What is not here (xattrs, locks, ioctl, O_TMPFILE) the kernel hears as
//! ENOSYS or EOPNOTSUPP and the caller as "not supported".

use std::ffi::OsStr;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use nix::fcntl::AtFlags;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::fs::{reply_attr, reply_empty, reply_entry, reply_opened, reply_written, SlowFs, TTL};
use crate::sys::{self, errno};

impl Filesystem for SlowFs {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.entry(parent, name));
    }

    fn forget(&self, _: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.getattr_of(ino, fh));
    }

    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.setattr_of(ino, fh, mode, (uid, gid), size, (atime, mtime));
        reply_attr(reply, r);
    }

    fn readlink(&self, _: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .inodes
            .fd(ino)
            .and_then(|fd| nix::fcntl::readlinkat(&*fd, "").map_err(errno));
        match r {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.inodes.fd(parent).and_then(|dir| {
            let mode = Mode::from_bits_truncate(mode & !umask);
            nix::sys::stat::mkdirat(&*dir, name, mode).map_err(errno)?;
            self.entry(parent, name)
        });
        reply_entry(reply, r);
    }

    /// Also how a unix socket is bound here (the shim's capture socket for
    /// CRIU's image streamer lives in its staging dir).
    fn mknod(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.inodes.fd(parent).and_then(|dir| {
            let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT);
            let perm = Mode::from_bits_truncate(mode & 0o7777 & !umask);
            nix::sys::stat::mknodat(&*dir, name, kind, perm, rdev.into()).map_err(errno)?;
            self.entry(parent, name)
        });
        reply_entry(reply, r);
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, UnlinkatFlags::NoRemoveDir));
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, UnlinkatFlags::RemoveDir));
    }

    fn symlink(
        &self,
        _: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.inodes.fd(parent).and_then(|dir| {
            nix::unistd::symlinkat(target, &*dir, link_name).map_err(errno)?;
            self.entry(parent, link_name)
        });
        reply_entry(reply, r);
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.inodes.fd(parent).and_then(|from| {
            let to = self.inodes.fd(newparent)?;
            let flags = nix::fcntl::RenameFlags::from_bits_truncate(flags.bits());
            nix::fcntl::renameat2(&*from, name, &*to, newname, flags).map_err(errno)
        });
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.inodes.fd(ino).and_then(|fd| {
            let dir = self.inodes.fd(newparent)?;
            nix::unistd::linkat(&*fd, "", &*dir, newname, AtFlags::AT_EMPTY_PATH).map_err(errno)?;
            self.entry(newparent, newname)
        });
        reply_entry(reply, r);
    }

    fn open(&self, _: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.inodes.fd(ino).and_then(|fd| {
            let file = sys::reopen(&*fd, sys::open_flags(flags.0))?;
            Ok(self.files.insert(file))
        });
        reply_opened(reply, r);
    }

    fn create(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_of(parent, name, mode & !umask, flags) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_of(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply_written(reply, self.write_of(fh, offset, data));
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        _: OpenFlags,
        _: Option<LockOwner>,
        _: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh.0);
        reply.ok();
    }

    fn fsync(&self, _: &Request, _: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = self.files.get(fh.0).and_then(|f| {
            if datasync {
                f.sync_data()?;
            } else {
                f.sync_all()?;
            }
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        let r = self
            .readdir_of(ino)
            .map(|entries| self.dirs.insert(entries));
        reply_opened(reply, r);
    }

    fn readdir(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dirs.get(fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, reply: ReplyEmpty) {
        self.dirs.remove(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let r = self.inodes.fd(ino).and_then(|fd| {
            sys::reopen(&*fd, libc::O_RDONLY | libc::O_DIRECTORY)?.sync_all()?;
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(self.backing.as_path()) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, _: &Request, _: INodeNo, _: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode itself.
        reply.ok();
    }

    fn fallocate(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.files.get(fh.0).and_then(|f| {
            nix::fcntl::fallocate(
                &*f,
                nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                offset as i64,
                length as i64,
            )
            .map_err(errno)
        });
        reply_empty(reply, r);
    }

    fn lseek(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self.files.get(fh.0).and_then(|f| {
            // SAFETY: lseek on our own open fd (SEEK_DATA/SEEK_HOLE; the
            // kernel keeps the position of the caller's file itself).
            let at = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&*f), offset, whence) };
            if at < 0 {
                Err(std::io::Error::last_os_error().into())
            } else {
                Ok(at)
            }
        });
        match r {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _: &Request,
        _: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply_written(
            reply,
            self.copy_of((fh_in, offset_in), (fh_out, offset_out), len),
        );
    }
}

impl SlowFs {
    fn remove(&self, parent: INodeNo, name: &OsStr, how: UnlinkatFlags) -> Result<(), Errno> {
        let dir = self.inodes.fd(parent)?;
        nix::unistd::unlinkat(&*dir, name, how).map_err(errno)
    }
}
