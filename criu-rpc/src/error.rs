use crate::proto::ReqType;

/// Everything a CRIU request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start CRIU ({binary}): {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },

    #[error("CRIU RPC socket: {0}")]
    Io(#[from] std::io::Error),

    #[error("CRIU sent an undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),

    #[error("CRIU answered {got:?} to a {sent:?} request")]
    Protocol { sent: ReqType, got: ReqType },

    /// EOF before the final response: CRIU crashed or was killed.
    #[error("CRIU exited without answering the {req:?} request ({status}){}", tail(.log_tail, .stderr))]
    Crashed {
        req: ReqType,
        status: String,
        stderr: String,
        log_tail: String,
    },

    /// A command-line CRIU (see [`crate::cli`]) exited unsuccessfully.
    #[error("CRIU {req:?} failed ({status}){}", tail(.log_tail, .stderr))]
    Exited {
        req: ReqType,
        status: String,
        stderr: String,
        log_tail: String,
    },

    /// An option the command line cannot express for this request.
    #[error("CRIU option not supported here: {0}")]
    Unsupported(&'static str),

    /// A NOTIFY handler refused: CRIU aborted the request.
    #[error("CRIU {req:?} aborted: notify handler for '{script}' failed: {reason}{}", tail(.log_tail, ""))]
    NotifyAborted {
        req: ReqType,
        script: String,
        reason: String,
        log_tail: String,
    },

    /// CRIU answered with `success = false`.
    #[error("CRIU {req:?} failed{}{}{}", errno(.cr_errno), msg(.cr_errmsg), tail(.log_tail, ""))]
    Failed {
        req: ReqType,
        cr_errno: Option<i32>,
        /// The first error CRIU logged; a hint only, it need not be the cause.
        cr_errmsg: Option<String>,
        log_tail: String,
    },
}

impl Error {
    /// The tail of CRIU's log file (or its stderr), where there is one.
    pub fn log_tail(&self) -> &str {
        match self {
            Error::Crashed {
                log_tail, stderr, ..
            }
            | Error::Exited {
                log_tail, stderr, ..
            } if log_tail.is_empty() => stderr,
            Error::Crashed { log_tail, .. }
            | Error::Exited { log_tail, .. }
            | Error::NotifyAborted { log_tail, .. }
            | Error::Failed { log_tail, .. } => log_tail,
            _ => "",
        }
    }
}

fn errno(e: &Option<i32>) -> String {
    match e {
        Some(n) if *n != 0 => format!(": errno {n} ({})", std::io::Error::from_raw_os_error(*n)),
        _ => String::new(),
    }
}

fn msg(m: &Option<String>) -> String {
    m.as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| format!(" (first logged error: {s})"))
        .unwrap_or_default()
}

fn tail(log: &str, stderr: &str) -> String {
    let t = if log.is_empty() { stderr } else { log };
    if t.is_empty() {
        String::new()
    } else {
        format!("\n--- CRIU log tail ---\n{t}")
    }
}
