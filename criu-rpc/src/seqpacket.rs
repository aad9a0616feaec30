//! A non-blocking `SOCK_SEQPACKET` unix socket on tokio: one message per packet,
//! sized with `MSG_PEEK | MSG_TRUNC`, and at most one fd passed with SCM_RIGHTS.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    recv, recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use tokio::io::unix::AsyncFd;

/// A CLOEXEC socketpair: neither end leaks into children spawned concurrently.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

pub(crate) struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_retain(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: register's contract is that the fd stays open and the same
        // for the AsyncFd's whole life: it owns the OwnedFd, which closes only
        // when the AsyncFd drops it, and nothing here swaps it.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(SeqPacket { fd })
    }

    pub(crate) async fn send(&self, buf: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            // MSG_NOSIGNAL: a closed peer is an EPIPE here, not a SIGPIPE.
            let res = guard.try_io(|fd| Ok(send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL)?));
            match res {
                Ok(Ok(n)) if n == buf.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!(
                        "short seqpacket send: {n} of {}",
                        buf.len()
                    )))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next packet and the fd it carried, or `None` at EOF.
    pub(crate) async fn recv(&self) -> io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_one(fd.as_raw_fd())) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_one(fd: RawFd) -> io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    // A zero-length peek only asks the kernel for the packet's size.
    let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT;
    let size = recv(fd, &mut [], peek)?;
    let mut buf = vec![0u8; size.max(1)];
    // Room for exactly one fd, the most CRIU ever sends.
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let n = msg.bytes;
    let mut passed = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: SCM_RIGHTS installed this fd in our table for this
                // message alone: nothing else owns or closes it.
                passed = Some(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, passed)))
}
