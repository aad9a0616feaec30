//! The capture side of CRIU's image streaming (`criu dump --stream`).
//!
//! CRIU connects to `streamer-capture.sock` in its images dir. For every image it
//! would have written it sends the file name (a 4-byte little-endian length and an
//! `ImgStreamerRequestEntry`), then one byte carrying the read end of a fresh pipe,
//! writes the image into that pipe and closes it. Several pipes are open at once
//! (`pagemap-N.img` beside `pages-N.img`), so each must be drained on its own; a
//! streamer that stops reading one can stall CRIU. Closing a pipe or the socket
//! early makes CRIU's writes fail, and it aborts the dump through its clean-up.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use prost::Message;

use crate::proto::ImgStreamerRequestEntry;

pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
/// The longest path a unix socket address holds (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;
/// How long `accept` waits between looks at its `give_up`.
const POLL_MS: u16 = 20;
/// Image names are short; anything longer is not CRIU talking.
const NAME_MAX: u32 = 4096;

/// The listening socket, bound before CRIU starts.
pub struct CaptureSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl CaptureSocket {
    /// Listens on `images/streamer-capture.sock`. `images` must be private to the
    /// caller: whoever can connect there can feed the archive. Fails with
    /// `InvalidInput` when the path is too long for a socket address.
    pub fn bind(images: &Path) -> io::Result<CaptureSocket> {
        let path = images.join(CAPTURE_SOCKET);
        if path.as_os_str().len() > SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is too long for a socket address", path.display()),
            ));
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(CaptureSocket { listener, path })
    }

    /// Waits for CRIU to connect, polling `give_up` between short waits so a CRIU
    /// that failed before connecting does not leave the caller blocked.
    pub fn accept(&self, give_up: impl Fn() -> bool) -> io::Result<Option<Capture>> {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    sock.set_nonblocking(false)?;
                    return Ok(Some(Capture { sock }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if give_up() {
                        return Ok(None);
                    }
                    let mut pfd = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    // A wait of 20 ms at most; an error (EINTR) only shortens it.
                    let _ = poll(&mut pfd, PollTimeout::from(POLL_MS));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for CaptureSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One CRIU connection: a sequence of (image name, pipe) pairs.
pub struct Capture {
    sock: UnixStream,
}

impl Capture {
    /// The next image CRIU sends: its name and the read end of the pipe carrying
    /// its bytes. `None` once CRIU has closed the connection.
    pub fn next_image(&mut self) -> io::Result<Option<(String, OwnedFd)>> {
        let mut len = [0u8; 4];
        match self.sock.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len);
        if len > NAME_MAX {
            return Err(bad(format!("request of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.sock.read_exact(&mut buf)?;
        let req = ImgStreamerRequestEntry::decode(buf.as_slice())
            .map_err(|e| bad(format!("undecodable request: {e}")))?;
        let pipe = self.recv_fd()?;
        Ok(Some((req.filename, pipe)))
    }

    /// Receives the one dummy byte that carries a descriptor.
    fn recv_fd(&self) -> io::Result<OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            self.sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: SCM_RIGHTS installed these fds in our table for this
                // message alone: nothing else owns or closes them.
                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.bytes == 0 {
            return Err(bad("connection closed before the pipe".into()));
        }
        if fds.len() != 1 {
            return Err(bad(format!(
                "{} descriptors instead of one pipe",
                fds.len()
            )));
        }
        Ok(fds.pop().expect("one fd"))
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("image streamer: {what}"),
    )
}
