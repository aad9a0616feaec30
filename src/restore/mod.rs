//! Restores: an archive back into a running process tree.
//!
//! - [`archive`]: an archive checked member by member, its metadata, extraction;
//! - [`create`]: CreateContainer of a checkpoint, rewritten for the runtime;
//! - [`ipc`]: the SysV objects a joined IPC namespace already holds, left out;
//! - [`lazy`], [`pagemap`], [`lazy_serve`]: a lazy restore, its memory
//!   served from the archive as the process touches it;
//! - [`criu_version`]: the CRIU versions a served restore relies on;
//! - [`push`], [`spans`], [`uffd`]: a served restore's memory put in from the
//!   archive by the shim itself, one copy per page, faults first;
//! - [`slots`], [`working_set`]: the node's bound on background pushes, and
//!   the pages a lazy restore puts in before the rest;
//! - [`policy`]: the images held against the new container's spec: a restore
//!   never gives a process more than a fresh container of that spec;
//! - [`rootfs`]: the checkpoint's file changes applied to a new root file system;
//! - [`runc`]: `ckpt-runc`, the runtime's runc, which turns a create into a restore;
//! - [`sockets`]: each inet socket of the checkpoint kept, closed or rebound,
//!   as the new pod allows;
//! - [`source`]: where a served restore's pages are in the archive;
//! - [`stage`]: a CRI restore's checkpoint, kept by container ID until it starts;
//! - [`tcp_hold`]: loopback TCP connections held until both their ends are back;
//! - [`standalone`]: `ckpt-shim restore`, CRIU driven directly into a bundle.

pub mod archive;
pub mod complete;
pub mod create;
pub mod criu_version;
pub mod ipc;
pub mod lazy;
pub mod lazy_serve;
pub mod pagemap;
pub mod policy;
pub mod push;
pub mod rootfs;
pub mod runc;
pub mod slots;
pub mod sockets;
pub mod source;
pub mod spans;
pub mod stage;
pub mod standalone;
pub mod tcp_hold;
pub mod uffd;
pub mod working_set;

pub use archive::{extract, Checkpoint};
pub use rootfs::{apply_rootfs_diff, create_mount_points};
pub use standalone::{restore, RestoreOptions};
