//! CRIU's RPC schema and an async client for `criu swrk`; for what RPC cannot
//! carry (image streaming), a command-line dump built from the same options
//! ([`cli`]) and the capture side of CRIU's image streamer ([`streamer`]).
//!
//! One request runs in one CRIU child: [`Criu::request`] spawns
//! `criu --no-default-config swrk 3` on a `SOCK_SEQPACKET` socketpair, sends the
//! request, answers every NOTIFY through a [`NotifyHandler`] and returns the final
//! response. The outcome is judged by `success` alone: CRIU fills `cr_errmsg` with
//! the first error it logged, which may be a harmless warning even on success.
//!
//! # Cancellation
//! Dropping a request future closes our end of the socket. CRIU then fails its next
//! exchange with us and aborts through its own clean-up, which releases (un-seizes)
//! the tasks. It is never sent SIGKILL while it may hold a frozen or seized task,
//! because killing CRIU with a parasite injected kills the container (SIGTRAP).
//! Instead a reaper thread gives it [`Criu::grace`] to exit by itself, and only then
//! kills and reaps it. Callers that froze a cgroup must thaw it when they are
//! dropped (a drop guard does this synchronously), which happens before the grace
//! period ends, so CRIU is never blocked on a frozen task when it is killed.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod proto {
    //! Messages generated from `proto/rpc.proto`.
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}

/// Entries of CRIU's image files, as far as the shim reads them; framed by [`image`].
pub mod images {
    include!(concat!(env!("OUT_DIR"), "/criu.image.rs"));
}

pub mod cli;
mod client;
mod error;
pub mod image;
mod seqpacket;
pub mod stats;
pub mod streamer;
mod swrk;

pub use cli::CliDump;
pub use client::{ack_all, Criu, Notify, NotifyFuture, NotifyHandler, Version};
pub use error::Error;
