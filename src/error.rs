use std::path::PathBuf;

/// Everything a checkpoint or restore can fail with. The CRI server maps these to
/// gRPC codes in one place (`Error::grpc_code`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("container {0:?} not found")]
    NotFound(String),

    #[error("pod sandbox {0:?} not found")]
    PodNotFound(String),

    /// A pod restore's container config that the checkpoint contradicts.
    #[error("container {container:?}: {field} {wanted} does not match the checkpoint's {found}")]
    Mismatch {
        container: String,
        field: &'static str,
        wanted: String,
        found: String,
    },

    #[error("container ID prefix {prefix:?} is ambiguous: matches {}", .matches.join(", "))]
    Ambiguous {
        prefix: String,
        matches: Vec<String>,
    },

    #[error("image {image:?} not found: {why}")]
    ImageNotFound { image: String, why: String },

    #[error("container {id} is not running ({state})")]
    NotRunning { id: String, state: String },

    /// A lazy restore's page source failed before every page was in: its
    /// memory cannot be checkpointed whole.
    #[error("container {id}'s lazy restore could not put its pages in: {why}")]
    PagesMissing { id: String, why: String },

    #[error("{0} already exists")]
    AlreadyExists(PathBuf),

    #[error("no space left writing {0}")]
    NoSpace(PathBuf),

    /// Past a limit, or more than the destination has room for.
    #[error("too large: {0}")]
    TooLarge(String),

    #[error("deadline exceeded during {0}")]
    DeadlineExceeded(&'static str),

    #[error("cancelled by the caller")]
    Cancelled,

    /// The server is stopping (SIGTERM): try again once it is back.
    #[error("ckpt-shim is shutting down")]
    ShuttingDown,

    #[error("cgroup of container {id} did not freeze within the deadline (state {state})")]
    FreezeTimeout { id: String, state: String },

    /// Processes in the container's cgroup outside its init's process tree,
    /// which CRIU, dumping that tree, would leave out of the checkpoint.
    #[error("container {id}: {processes} in its cgroup would be left out of the checkpoint: outside the process tree of its init (daemonized into the pod's shared PID namespace, or started by exec)")]
    LeftOut { id: String, processes: String },

    /// A restore that would give a process more than the new container's
    /// spec allows ([`crate::restore::policy`]).
    #[error("restore refused: {process}: {field} is {found} in the checkpoint; the new container allows {allowed}")]
    Privilege {
        process: String,
        field: &'static str,
        found: String,
        allowed: String,
    },

    /// A restore whose process would differ from a fresh container of the
    /// new spec, without holding more (fewer capabilities, say).
    #[error("restore refused: {process}: {field} is {found} in the checkpoint; a fresh container of this config has {fresh}")]
    Unlike {
        process: String,
        field: &'static str,
        found: String,
        fresh: String,
    },

    /// A restore into a joined IPC namespace that holds a SysV object with
    /// the id or key of one in the checkpoint, but not that object
    /// ([`crate::restore::ipc`]).
    #[error("restore refused: the IPC namespace it joins holds SysV {class} {live}, where the checkpoint has {image}")]
    IpcTaken {
        class: &'static str,
        live: String,
        image: String,
    },

    /// A restore whose processes attach a SysV segment that the IPC
    /// namespace it joins already holds: CRIU attaches a restored process
    /// only to a segment it creates ([`crate::restore::ipc`]).
    #[error("restore refused: its processes attach SysV shm id {id}, which the IPC namespace it joins already holds (another container's restore there made it); CRIU can attach them only to a segment it creates: start this container before the others that share the segment")]
    IpcAttached { id: u32 },

    /// A CRIU image that is not what CRIU writes: forged or damaged.
    #[error("malformed checkpoint image {image}: {why}")]
    BadImage { image: String, why: String },

    #[error("unsafe archive member {0:?}")]
    UnsafeArchive(String),

    #[error("{0}")]
    Criu(#[from] criu_rpc::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    /// The upstream runtime answered with an error: passed back unchanged.
    #[error("upstream runtime: {}", .0.message())]
    Upstream(#[from] tonic::Status),

    /// `ckpt-shim check` found the node unable to checkpoint.
    #[error("{failed} of {total} checks failed")]
    ChecksFailed { failed: usize, total: usize },

    /// An encrypted checkpoint that the identities at hand cannot open.
    #[error("encrypted checkpoint: {0}")]
    Sealed(String),

    /// An encrypted member failed authentication: changed, cut or reordered.
    #[error("encrypted checkpoint failed authentication (modified or damaged): {0}")]
    Tampered(String),

    #[error("{0}")]
    Other(String),
}

/// The one place engine errors become gRPC statuses.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            Error::Upstream(s) => return s.clone(),
            Error::InvalidArgument(_)
            | Error::Ambiguous { .. }
            | Error::UnsafeArchive(_)
            | Error::BadImage { .. }
            | Error::Mismatch { .. } => Code::InvalidArgument,
            Error::NotFound(_) | Error::PodNotFound(_) | Error::ImageNotFound { .. } => {
                Code::NotFound
            }
            Error::NotRunning { .. }
            | Error::PagesMissing { .. }
            | Error::ChecksFailed { .. }
            | Error::Unlike { .. }
            | Error::IpcTaken { .. }
            | Error::IpcAttached { .. }
            | Error::LeftOut { .. } => Code::FailedPrecondition,
            Error::Privilege { .. } => Code::PermissionDenied,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::NoSpace(_) | Error::TooLarge(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) | Error::FreezeTimeout { .. } => Code::DeadlineExceeded,
            Error::Cancelled => Code::Cancelled,
            Error::ShuttingDown => Code::Unavailable,
            Error::Sealed(_) => Code::FailedPrecondition,
            Error::Tampered(_) => Code::DataLoss,
            Error::Criu(_) | Error::Io { .. } | Error::Other(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an I/O error, and recognises a full disk.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| {
            let context = what();
            if source.raw_os_error() == Some(libc::ENOSPC)
                || source.raw_os_error() == Some(libc::EDQUOT)
            {
                Error::NoSpace(PathBuf::from(context))
            } else {
                Error::Io { context, source }
            }
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(std::io::Error::from).ctx(what)
    }
}
