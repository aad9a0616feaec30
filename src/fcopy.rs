//! Moving a byte range from one file into another as cheaply as the file
//! system allows: shared extents (FICLONERANGE: XFS, btrfs; both offsets and
//! the length block-aligned), else a copy inside the kernel
//! (`copy_file_range`), else read and write.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::copy_file_range;

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The destination shares the source's extents: no data was written.
    Shared,
    /// The data was copied.
    Copied,
}

/// Copies `len` bytes at `src_off` in `src` to `dst` at `dst_off`, after which
/// `dst`'s file position is `dst_off + len`. Tries sharing extents first when
/// `try_share` (and the range is block-aligned).
pub fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    try_share: bool,
) -> std::io::Result<Moved> {
    const BLOCK: u64 = 4096;
    let aligned = src_off.is_multiple_of(BLOCK) && dst_off.is_multiple_of(BLOCK);
    if try_share && aligned && share(src, src_off, dst, dst_off, len) {
        seek(dst, dst_off + len)?;
        return Ok(Moved::Shared);
    }
    let (mut s, mut d) = (src_off as i64, dst_off as i64);
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let n = match copy_file_range(src, Some(&mut s), dst, Some(&mut d), chunk) {
            Ok(n) => n,
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return by_read(src, s as u64, dst, d as u64, left);
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the source shrank while it was copied",
            ));
        }
        left -= n as u64;
    }
    seek(dst, d as u64)?;
    Ok(Moved::Copied)
}

/// Shares the source's extents (reflink) instead of copying them.
fn share(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> bool {
    #[repr(C)]
    struct FileCloneRange {
        src_fd: i64,
        src_offset: u64,
        src_length: u64,
        dest_offset: u64,
    }
    const FICLONERANGE: libc::c_ulong = 0x4020_940d;
    let arg = FileCloneRange {
        src_fd: src.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: no safe wrapper exists for FICLONERANGE; the kernel reads one
    // `struct file_clone_range` (this #[repr(C)] layout) from `&arg`, which
    // lives across the call, and writes nothing back.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE, &arg) };
    if rc != 0 {
        tracing::debug!(
            "reflink not possible here, copying: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

/// Where the kernel cannot copy between these files.
fn by_read(
    src: &File,
    from: u64,
    mut dst: &File,
    dst_off: u64,
    len: u64,
) -> std::io::Result<Moved> {
    seek(dst, dst_off)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut off, end) = (from, from + len);
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the source shrank while it was copied",
            ));
        }
        dst.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(Moved::Copied)
}

fn seek(mut f: &File, pos: u64) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(pos)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_lands_where_asked_and_the_position_follows() {
        let d = tempfile::tempdir().unwrap();
        let src_path = d.path().join("s");
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("d"))
            .unwrap();
        copy_range(&src, 4096, &dst, 0, 8192, true).unwrap();
        (&dst).write_all(b"tail").unwrap();
        let got = std::fs::read(d.path().join("d")).unwrap();
        assert_eq!(&got[..8192], &data[4096..]);
        assert_eq!(&got[8192..], b"tail");
        // Unaligned ranges are copied.
        assert_eq!(
            copy_range(&src, 7, &dst, 3, 100, true).unwrap(),
            Moved::Copied
        );
        assert_eq!(
            &std::fs::read(d.path().join("d")).unwrap()[3..103],
            &data[7..107]
        );
    }
}
