//! The system calls on the backing files, as slowfs uses them: everything
//! relative to an `O_PATH` descriptor, reopened through `/proc/self/fd` where
//! a real open file is needed.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};

use crate::inodes::Key;

pub fn errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

/// The magic link that reopens `fd` as a real file.
pub fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The file `fd` stands for, never following a symlink.
pub fn stat(fd: &impl AsFd) -> Result<FileStat, Errno> {
    nix::sys::stat::fstatat(
        fd,
        "",
        AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
}

pub fn key(st: &FileStat) -> Key {
    (st.st_dev, st.st_ino)
}

/// An `O_PATH` descriptor of `name` in `dir` (the name itself, if a symlink).
pub fn open_path(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)
}

/// Opens the file behind an `O_PATH` descriptor (or an open file) anew.
pub fn reopen(fd: &impl AsRawFd, flags: i32) -> Result<File, Errno> {
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(proc_path(fd).as_str(), flags, Mode::empty()).map_err(errno)?;
    Ok(File::from(fd))
}

/// What a reopen through `/proc/self/fd` keeps of a client's open flags:
/// creation and truncation were done already; the kernel gives every write
/// its offset (no O_APPEND) and does O_DIRECT on its side (our buffers are
/// not aligned for it); O_NOFOLLOW would refuse the magic link itself.
pub fn open_flags(flags: i32) -> i32 {
    flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_TRUNC
            | libc::O_APPEND
            | libc::O_DIRECT
            | libc::O_NOFOLLOW)
}

pub fn attr(ino: u64, st: &FileStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let ns = Duration::from_nanos(nsecs as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + ns
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + ns
    }
}

pub fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// A `TimeOrNow` as `utimensat` takes it.
pub fn timespec(t: Option<fuser::TimeOrNow>) -> libc::timespec {
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    match t {
        None => omit,
        Some(fuser::TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(fuser::TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

/// Sets the times of the file behind `fd` (following the magic link to it).
pub fn set_times(fd: &OwnedFd, atime: libc::timespec, mtime: libc::timespec) -> Result<(), Errno> {
    let path = std::ffi::CString::new(proc_path(fd)).expect("no NUL");
    let times = [atime, mtime];
    // SAFETY: a NUL-terminated path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().into())
    }
}
