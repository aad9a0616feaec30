//! The part of Linux's userfaultfd interface (linux/userfaultfd.h) that
//! fills a restored process's missing pages: the messages its userfaultfd
//! reports and the two ioctls that put pages in. libc does not define them.
//! The ioctl numbers use Linux's generic `_IOWR` encoding (x86-64, arm64).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

const UFFDIO: u64 = 0xAA;
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<Copy>() as u64);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<Zeropage>() as u64);

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (UFFDIO << 8) | nr
}

/// One `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct Zeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// What a userfaultfd reports. CRIU's restore asks for the fork, mremap,
/// munmap and madvise(DONTNEED) events as well as the faults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// A thread touched a missing page at `address` and waits for it.
    Fault {
        address: u64,
    },
    /// The process forked: `uffd` (now an fd of ours) is the child's.
    Fork {
        uffd: i32,
    },
    /// `len` bytes moved from `from` to `to` (mremap).
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// `[start, end)` was unmapped or dropped (madvise): its pages must not
    /// come back.
    Remove {
        start: u64,
        end: u64,
    },
    Other(u8),
}

impl Event {
    pub fn decode(b: &[u8; MSG_SIZE]) -> Event {
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        match b[0] {
            0x12 => Event::Fault {
                address: u64_at(16),
            },
            0x13 => Event::Fork {
                uffd: i32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")),
            },
            0x14 => Event::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            // UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP
            0x15 | 0x16 => Event::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            other => Event::Other(other),
        }
    }
}

/// Reads the messages waiting on `uffd` (opened non-blocking by CRIU).
pub fn read_events(uffd: BorrowedFd) -> std::io::Result<Vec<Event>> {
    let mut buf = [0u8; MSG_SIZE * 32];
    let n = match nix::unistd::read(uffd, &mut buf) {
        Ok(n) => n,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(buf[..n]
        .chunks_exact(MSG_SIZE)
        .map(|m| Event::decode(m.try_into().expect("one message")))
        .collect())
}

/// Copies `len` bytes from `src` (our memory) into the process at `dst`.
/// `Err((copied, errno))` when it stopped short: `copied` bytes went in.
pub fn copy(uffd: BorrowedFd, dst: u64, src: *const u8, len: u64) -> Result<(), (u64, Errno)> {
    let mut a = Copy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    // SAFETY: no safe wrapper exists for userfaultfd's ioctls. UFFDIO_COPY
    // reads `a` (this #[repr(C)] layout of `struct uffdio_copy`, alive across
    // the call) and writes only its `copy` field; it reads `src..src+len`
    // (which the caller maps) and writes into the other process, not ours.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut a) };
    match r {
        0 => Ok(()),
        _ => Err((a.copy.max(0) as u64, Errno::last())),
    }
}

/// Maps the zero page at `dst` (one page the checkpoint has no data for).
pub fn zeropage(uffd: BorrowedFd, dst: u64, len: u64) -> Result<(), Errno> {
    let mut a = Zeropage {
        start: dst,
        len,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: no safe wrapper exists for userfaultfd's ioctls.
    // UFFDIO_ZEROPAGE reads `a` (this #[repr(C)] layout of `struct
    // uffdio_zeropage`, alive across the call), writes only its `zeropage`
    // field, and maps pages into the other process, not ours.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut a) };
    match r {
        0 => Ok(()),
        _ => Err(Errno::last()),
    }
}

/// A userfaultfd of the test process over `[addr, addr + len)` (missing
/// pages), as CRIU's restore makes one in the restored process, so that a
/// pusher can be tested on this process's own memory.
#[cfg(test)]
pub fn register_for_test(addr: u64, len: u64) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    const UFFDIO_API: u64 = iowr(0x3f, 24);
    const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
    // SAFETY: no safe wrapper exists; userfaultfd takes flags and returns a
    // new fd or -1, reading no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0, "userfaultfd: {}", Errno::last());
    // SAFETY: a new fd, owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [UFFDIO, 0, 0];
    // SAFETY: `struct uffdio_api` is three u64s (api, features, ioctls);
    // the kernel reads and writes only those, in `api`, alive across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) };
    assert_eq!(r, 0, "UFFDIO_API: {}", Errno::last());
    let mut reg = [addr, len, 1, 0]; // range, UFFDIO_REGISTER_MODE_MISSING, ioctls
                                     // SAFETY: `struct uffdio_register` is four u64s (start, len, mode,
                                     // ioctls), read and written only there; the range is the caller's mapping.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) };
    assert_eq!(r, 0, "UFFDIO_REGISTER: {}", Errno::last());
    fd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_messages_are_the_kernels() {
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        let mut m = [0u8; MSG_SIZE];
        m[0] = 0x12;
        m[16..24].copy_from_slice(&0x7f00_0000_1234u64.to_ne_bytes());
        assert_eq!(
            Event::decode(&m),
            Event::Fault {
                address: 0x7f00_0000_1234
            }
        );
        m[0] = 0x16;
        m[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        assert_eq!(
            Event::decode(&m),
            Event::Remove {
                start: 0x1000,
                end: 0x7f00_0000_1234
            }
        );
    }
}
