//! A page server for CRIU's lazy-pages daemon, answering from the archive.
//!
//! Only CRIU 4.2.x's protocol is spoken (its criu/page-xfer.c); the daemon
//! is refused on any other version ([`check_criu_version`]) rather than fed
//! headers it would misread. Every message starts with a `struct
//! page_server_iov` in the host's byte order and C layout: `u32 cmd, u64
//! nr_pages, u64 vaddr, u64 dst_id`, so 32 bytes on a 64-bit host, with 4
//! bytes of padding after `cmd` (ignored when read, zero when written).
//! CRIU 4.0 and 4.1 had a `u32 nr_pages` there and no padding (24 bytes):
//! 4.2 widened it for mappings over 16 TiB (criu commit 7e0da4d97), and a
//! page server of the other generation reads garbage from the first message
//! on, so the version is checked before the daemon is started.
//!
//! The daemon asks `PS_IOV_GET` for `nr_pages` from `vaddr` of process
//! `dst_id` (the pid of its `pagemap-<pid>.img`), several asks possibly in
//! flight; answers go in order, each the same header with cmd `PS_IOV_ADD_F`
//! and the `PE_PRESENT` flag, and `nr_pages` no more than asked (the daemon
//! asks again for the rest), then the pages. A page server that has none of
//! the pages asked for closes the connection, as CRIU's own does; the daemon
//! then fails.
//!
//! The session ends when the daemon closes the socket, or (given the socket
//! as `--ps-socket`, as here) sends `PS_IOV_FORCE_CLOSE`, answered by a 0.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::sendfile::sendfile64;

use super::source::Source;

const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PE_PRESENT: u32 = 1 << 2;
/// CRIU 4.2's `struct page_server_iov`, laid out by the same C rules as
/// CRIU's build for this target; only its size and offsets are used.
#[repr(C)]
struct WireIov {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}
const HEADER: usize = std::mem::size_of::<WireIov>();
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
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    const CMD: usize = std::mem::offset_of!(WireIov, cmd);
    const NR_PAGES: usize = std::mem::offset_of!(WireIov, nr_pages);
    const VADDR: usize = std::mem::offset_of!(WireIov, vaddr);
    const DST_ID: usize = std::mem::offset_of!(WireIov, dst_id);

    fn decode(b: &[u8; HEADER]) -> Iov {
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Iov {
            cmd: u32_at(Self::CMD),
            nr_pages: u64_at(Self::NR_PAGES),
            vaddr: u64_at(Self::VADDR),
            dst_id: u64_at(Self::DST_ID),
        }
    }

    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[Self::CMD..Self::CMD + 4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[Self::NR_PAGES..Self::NR_PAGES + 8].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[Self::VADDR..Self::VADDR + 8].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[Self::DST_ID..Self::DST_ID + 8].copy_from_slice(&self.dst_id.to_ne_bytes());
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
    let want = ask.nr_pages.min(MAX_PAGES);
    let (at, n) = src
        .find(ask.dst_id, ask.vaddr, want)
        .ok_or(ServeError::NoPages {
            pid: ask.dst_id,
            vaddr: ask.vaddr,
            nr: ask.nr_pages,
        })?;
    let reply = Iov {
        cmd: PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS),
        nr_pages: n,
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
        match sendfile64(sock, file, Some(&mut off), left) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether the `criu` on PATH (what runc and the daemon run) speaks the
/// page-server protocol this module does; asked once.
pub fn criu_supported() -> std::result::Result<(), String> {
    static ANSWER: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let out = std::process::Command::new("criu")
                .arg("--version")
                .output()
                .map_err(|e| format!("run criu --version: {e}"))?;
            check_criu_version(&String::from_utf8_lossy(&out.stdout))
        })
        .clone()
}

/// The header layout above is CRIU 4.2's; 4.0 and 4.1 had another, and a
/// later CRIU may change it again, so any version but 4.2.x is refused.
pub fn check_criu_version(version_output: &str) -> Result<(), String> {
    let v = version_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .ok_or_else(|| format!("cannot tell CRIU's version from {version_output:?}"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(Some(4)), Some(Some(2))) => Ok(()),
        _ => Err(format!(
            "lazy restore speaks CRIU 4.2.x's page-server protocol only; this CRIU is {v}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_criu_4_2s_32_byte_layout_with_padding_after_cmd() {
        assert_eq!(HEADER, 32);
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 0x1_0000_0003,
            vaddr: 0x7f00_0000_1000,
            dst_id: 1,
        };
        let b = iov.encode();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..8], &[0; 4], "padding");
        assert_eq!(&b[8..16], &0x1_0000_0003u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_ne_bytes());
        assert_eq!(&b[24..32], &1u64.to_ne_bytes());
        assert_eq!(Iov::decode(&b), iov);
        // Whatever the sender left in the padding is not read.
        let mut dirty = b;
        dirty[4..8].copy_from_slice(&[0xaa; 4]);
        assert_eq!(Iov::decode(&dirty), iov);
    }

    #[test]
    fn only_criu_4_2_is_accepted() {
        assert!(check_criu_version("Version: 4.2.1\n").is_ok());
        assert!(check_criu_version("Version: 4.2\nGitID: v4.2-3-gabc").is_ok());
        let old = check_criu_version("Version: 4.1.1\n").unwrap_err();
        assert!(old.contains("4.2.x") && old.contains("4.1.1"), "{old}");
        assert!(check_criu_version("Version: 4.0\n").is_err());
        assert!(check_criu_version("Version: 4.3\n").is_err());
        assert!(check_criu_version("Version: 5.2\n").is_err());
        assert!(check_criu_version("nonsense").is_err());
    }

    /// A daemon's side of one session over a socket pair: two asks in flight,
    /// one for more than [`MAX_PAGES`], answered in order in 4.2's layout.
    #[test]
    fn a_session_answers_asks_in_order_and_ends_on_force_close() {
        use super::super::pagemap::{encode, PAGE_SIZE, PE_LAZY, PE_PRESENT};
        let dir = tempfile::tempdir().unwrap();
        let n = MAX_PAGES + 6;
        let src = Source::for_test(
            dir.path(),
            7,
            &encode(
                1,
                &[
                    (0x10000, 2, PE_PRESENT),
                    (0x40000, n as u32, PE_LAZY | PE_PRESENT),
                ],
            ),
        );
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(&mut ours, &src));
        let ask = |nr_pages, vaddr| Iov {
            cmd: PS_IOV_GET,
            nr_pages,
            vaddr,
            dst_id: 7,
        };
        theirs.write_all(&ask(n, 0x40000).encode()).unwrap();
        theirs.write_all(&ask(1, 0x11000).encode()).unwrap();
        let mut reply = |want_vaddr: u64, want_nr: u64, first_page: u64| {
            let mut b = [0u8; HEADER];
            theirs.read_exact(&mut b).unwrap();
            let got = Iov::decode(&b);
            assert_eq!(got.cmd, PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS));
            assert_eq!(
                (got.vaddr, got.nr_pages, got.dst_id),
                (want_vaddr, want_nr, 7)
            );
            let mut pages = vec![0u8; (want_nr * PAGE_SIZE) as usize];
            theirs.read_exact(&mut pages).unwrap();
            for (i, p) in pages.chunks(PAGE_SIZE as usize).enumerate() {
                assert!(p
                    .iter()
                    .all(|&x| x == Source::test_byte(first_page + i as u64)));
            }
        };
        // Capped at MAX_PAGES; the second run's pages follow the first's 2.
        reply(0x40000, MAX_PAGES, 2);
        reply(0x11000, 1, 1);
        let close = Iov {
            cmd: PS_IOV_FORCE_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        };
        theirs.write_all(&close.encode()).unwrap();
        let mut status = [0xffu8; 4];
        theirs.read_exact(&mut status).unwrap();
        assert_eq!(i32::from_ne_bytes(status), 0);
        let served = server.join().unwrap().unwrap();
        assert_eq!(
            served,
            Served {
                requests: 2,
                pages: MAX_PAGES + 1
            }
        );
    }
}
