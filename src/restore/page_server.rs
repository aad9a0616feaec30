//! A page server for CRIU's lazy-pages daemon, answering from the archive.
//!
//! The protocol, as CRIU 4.1 speaks it (its page-xfer.c): every message
//! starts with 24 bytes in the host's byte order, `u32 cmd, u32 nr_pages, u64
//! vaddr, u64 dst_id`. The daemon asks `PS_IOV_GET` for `nr_pages` from
//! `vaddr` of process `dst_id` (the pid of its `pagemap-<pid>.img`), several
//! asks possibly in flight; answers go in order, each the same header with cmd
//! `PS_IOV_ADD_F` and the `PE_PRESENT` flag, and `nr_pages` no more than asked
//! (the daemon asks again for the rest), then the pages. CRIU 4.2 widened
//! `nr_pages` to 64 bits; [`check_criu_version`] refuses other versions than
//! those this layout is known for. A page server that has none of the pages
//! asked for closes the connection, as CRIU's own does; the daemon then fails.
//!
//! The session ends when the daemon closes the socket, or (given the socket
//! as `--ps-socket`, as here) sends `PS_IOV_FORCE_CLOSE`, answered by a 0.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::lazy::Source;

const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PE_PRESENT: u32 = 1 << 2;
const HEADER: usize = 24;
/// The most pages one answer carries.
const MAX_PAGES: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("page server socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the daemon asked for pages the checkpoint does not have: pid {pid}, {nr} from {vaddr:#x}"
    )]
    NoPages { pid: u64, vaddr: u64, nr: u64 },
    #[error("unknown page server command {0:#x}")]
    Command(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Iov {
    cmd: u32,
    nr_pages: u32,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    fn decode(b: &[u8; HEADER]) -> Iov {
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Iov {
            cmd: u32_at(0),
            nr_pages: u32_at(4),
            vaddr: u64_at(8),
            dst_id: u64_at(16),
        }
    }

    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[4..8].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[8..16].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }
}

/// What a session served.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Served {
    pub requests: u64,
    pub pages: u64,
}

/// Serves the daemon on `sock` until it ends the session.
pub fn serve(sock: &mut UnixStream, src: &Source) -> Result<Served, ServeError> {
    let mut served = Served::default();
    loop {
        let mut b = [0u8; HEADER];
        if !read_header(sock, &mut b)? {
            return Ok(served);
        }
        let iov = Iov::decode(&b);
        match iov.cmd & ((1 << PS_CMD_BITS) - 1) {
            PS_IOV_GET => {
                served.requests += 1;
                served.pages += answer(sock, src, iov)?;
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                sock.write_all(&0i32.to_ne_bytes())?;
                return Ok(served);
            }
            other => return Err(ServeError::Command(other)),
        }
    }
}

/// Reads one header; `false` at a clean end of the session.
fn read_header(sock: &mut UnixStream, b: &mut [u8; HEADER]) -> Result<bool, ServeError> {
    let mut got = 0;
    while got < HEADER {
        match sock.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn answer(sock: &mut UnixStream, src: &Source, ask: Iov) -> Result<u64, ServeError> {
    let want = u64::from(ask.nr_pages).min(MAX_PAGES);
    let (at, n) = src
        .find(ask.dst_id, ask.vaddr, want)
        .ok_or(ServeError::NoPages {
            pid: ask.dst_id,
            vaddr: ask.vaddr,
            nr: u64::from(ask.nr_pages),
        })?;
    let reply = Iov {
        cmd: PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS),
        nr_pages: n as u32,
        ..ask
    };
    sock.write_all(&reply.encode())?;
    send_file(sock, src.file(), at, n * super::pagemap::PAGE_SIZE)?;
    Ok(n)
}

/// Sends `len` bytes of `file` from `at`, in the kernel.
fn send_file(sock: &UnixStream, file: &std::fs::File, at: u64, len: u64) -> std::io::Result<()> {
    let mut off = at as libc::off64_t;
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: both fds are open for the call; `off` is a valid pointer.
        let n = unsafe { libc::sendfile64(sock.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => left -= n as usize,
        }
    }
    Ok(())
}

/// The header layout above is CRIU 4.0's and 4.1's; CRIU 4.2 changed it.
pub fn check_criu_version(version_output: &str) -> Result<(), String> {
    let v = version_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .ok_or_else(|| format!("cannot tell CRIU's version from {version_output:?}"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(4), Some(0 | 1)) => Ok(()),
        _ => Err(format!(
            "lazy restore speaks CRIU 4.0/4.1's page-server protocol; this CRIU is {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_criu_4_1s_layout() {
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 3,
            vaddr: 0x7f00_0000_1000,
            dst_id: 1,
        };
        let b = iov.encode();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[8..16], &0x7f00_0000_1000u64.to_ne_bytes());
        assert_eq!(Iov::decode(&b), iov);
    }

    #[test]
    fn versions() {
        assert!(check_criu_version("Version: 4.1.1\n").is_ok());
        assert!(check_criu_version("Version: 4.0\nGitID: x").is_ok());
        assert!(check_criu_version("Version: 4.2\n").is_err());
        assert!(check_criu_version("nonsense").is_err());
    }
}
