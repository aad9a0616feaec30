use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use prost::Message;

use crate::proto::{Features, Opts, Req, ReqType, Resp};
use crate::swrk::Session;
use crate::Error;

/// A NOTIFY message from CRIU: the script name (`pre-dump`, `post-dump`,
/// `setup-namespaces`, …), the pid it concerns, and the fd it carried (only
/// `orphan-pts-master` sends one).
#[derive(Debug)]
pub struct Notify {
    pub script: String,
    pub pid: Option<i32>,
    pub fd: Option<OwnedFd>,
}

pub type NotifyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Answers CRIU's notifications. `Err` makes CRIU abort the request.
pub trait NotifyHandler: Send {
    fn notify(&mut self, n: Notify) -> NotifyFuture<'_>;

    /// Called with CRIU's pid once it is spawned, e.g. to watch for its exit.
    fn spawned(&mut self, _pid: u32) {}
}

impl<F, Fut> NotifyHandler for F
where
    F: FnMut(Notify) -> Fut + Send,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    fn notify(&mut self, n: Notify) -> NotifyFuture<'_> {
        Box::pin(self(n))
    }
}

/// A handler that acknowledges every notification.
pub fn ack_all() -> impl NotifyHandler {
    |_n: Notify| async { Ok(()) }
}

/// CRIU's version as the VERSION request reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: i32,
    pub minor: i32,
    pub sublevel: i32,
    pub gitid: Option<String>,
}

impl Version {
    /// The number the container stack compares (major·10000 + minor·100 + sublevel);
    /// a git build counts as the next minor, as go-criu does.
    pub fn number(&self) -> i32 {
        let minor = if self.gitid.as_deref().is_some_and(|g| !g.is_empty()) {
            self.minor + 1
        } else {
            self.minor
        };
        self.major * 10000
            + minor * 100
            + if self.gitid.is_some() {
                0
            } else {
                self.sublevel
            }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// A CRIU binary driven over RPC; cheap to clone.
#[derive(Debug, Clone)]
pub struct Criu {
    binary: PathBuf,
    grace: Duration,
}

impl Default for Criu {
    fn default() -> Self {
        Criu::new("criu")
    }
}

impl Criu {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Criu {
            binary: binary.into(),
            grace: Duration::from_secs(10),
        }
    }

    /// How long a CRIU whose request was dropped may take to exit by itself before
    /// it is killed (see the crate docs).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub async fn version(&self) -> Result<Version, Error> {
        let resp = self
            .request(simple(ReqType::Version), &mut ack_all(), Vec::new())
            .await?;
        let v = resp.version.ok_or(Error::Protocol {
            sent: ReqType::Version,
            got: ReqType::Empty,
        })?;
        Ok(Version {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
            gitid: v.gitid.filter(|g| !g.is_empty()),
        })
    }

    /// CRIU's own kernel check (`criu check` over RPC). CRIU needs a directory for
    /// its log, or it fails without saying why: a private temporary one is used,
    /// and its log tail is in the error.
    pub async fn check(&self) -> Result<(), Error> {
        let dir = tempfile::Builder::new().prefix("criu-check-").tempdir()?;
        let fd = std::fs::File::open(dir.path())?;
        let mut req = simple(ReqType::Check);
        req.opts = Some(Opts {
            images_dir_fd: fd.as_raw_fd(),
            log_file: Some("check.log".into()),
            log_level: Some(4),
            ..Default::default()
        });
        self.request(req, &mut ack_all(), Vec::new())
            .await
            .map(drop)
    }

    /// Asks which of `wanted`'s features the kernel and CRIU support.
    pub async fn feature_check(&self, wanted: Features) -> Result<Features, Error> {
        let mut req = simple(ReqType::FeatureCheck);
        req.features = Some(wanted);
        let resp = self.request(req, &mut ack_all(), Vec::new()).await?;
        Ok(resp.features.unwrap_or_default())
    }

    pub async fn dump(&self, opts: Opts, handler: &mut dyn NotifyHandler) -> Result<Resp, Error> {
        let mut req = simple(ReqType::Dump);
        req.opts = Some(opts);
        self.request(req, handler, Vec::new()).await
    }

    /// Restores; `inherit[i]` appears in CRIU as fd `4 + i` for `opts.inherit_fd`.
    /// Returns the pid of the restored root task.
    pub async fn restore(
        &self,
        opts: Opts,
        handler: &mut dyn NotifyHandler,
        inherit: Vec<OwnedFd>,
    ) -> Result<i32, Error> {
        let mut req = simple(ReqType::Restore);
        req.opts = Some(opts);
        let resp = self.request(req, handler, inherit).await?;
        resp.restore.map(|r| r.pid).ok_or(Error::Protocol {
            sent: ReqType::Restore,
            got: ReqType::Empty,
        })
    }

    /// Sends one request, serves notifications, returns the final successful response.
    pub async fn request(
        &self,
        req: Req,
        handler: &mut dyn NotifyHandler,
        inherit: Vec<OwnedFd>,
    ) -> Result<Resp, Error> {
        let sent = req.r#type();
        let log = req.opts.as_ref().and_then(LogFile::of);
        let mut session = Session::spawn(&self.binary, &inherit, self.grace)?;
        drop(inherit);
        handler.spawned(session.proc.pid());
        session.sock.send(&req.encode_to_vec()).await?;
        let mut refused: Option<(String, String)> = None;
        loop {
            let Some((buf, fd)) = session.sock.recv().await? else {
                return Err(crashed(sent, &mut session, &log).await);
            };
            let resp = Resp::decode(buf.as_slice())?;
            if resp.r#type() != ReqType::Notify {
                // The final response. CRIU exits by itself now; `session`'s drop
                // reaps it off this path so the caller can thaw the container
                // without waiting.
                return outcome(sent, resp, refused, &log);
            }
            if let Some(refusal) = answer(&session, handler, resp, fd).await? {
                refused = Some(refusal);
            }
        }
    }
}

/// Answers one NOTIFY through `handler` and acknowledges it (success or
/// not, as the handler said); the script and the handler's reason if it
/// refused.
async fn answer(
    session: &Session,
    handler: &mut dyn NotifyHandler,
    resp: Resp,
    fd: Option<OwnedFd>,
) -> Result<Option<(String, String)>, Error> {
    let n = resp.notify.unwrap_or_default();
    let script = n.script.unwrap_or_default();
    tracing::debug!(%script, pid = ?n.pid, "CRIU notify");
    let result = handler
        .notify(Notify {
            script: script.clone(),
            pid: n.pid,
            fd,
        })
        .await;
    let ack = Req {
        r#type: ReqType::Notify as i32,
        notify_success: Some(result.is_ok()),
        ..Default::default()
    };
    session.sock.send(&ack.encode_to_vec()).await?;
    Ok(result.err().map(|reason| (script, reason)))
}

/// CRIU closed the socket before its final response: how it ended, and what
/// it said.
async fn crashed(sent: ReqType, session: &mut Session, log: &Option<LogFile>) -> Error {
    let status = session.proc.exit_status().await;
    Error::Crashed {
        req: sent,
        status,
        stderr: session.proc.stderr(),
        log_tail: log_tail(log),
    }
}

/// The request's outcome from CRIU's final response: a refused notification
/// first, then CRIU's own failure, then a response of the wrong type.
fn outcome(
    sent: ReqType,
    resp: Resp,
    refused: Option<(String, String)>,
    log: &Option<LogFile>,
) -> Result<Resp, Error> {
    if let Some((script, reason)) = refused {
        return Err(Error::NotifyAborted {
            req: sent,
            script,
            reason,
            log_tail: log_tail(log),
        });
    }
    if !resp.success {
        return Err(Error::Failed {
            req: sent,
            cr_errno: resp.cr_errno.filter(|e| *e != 0),
            cr_errmsg: resp.cr_errmsg,
            log_tail: log_tail(log),
        });
    }
    if resp.r#type() != sent {
        return Err(Error::Protocol {
            sent,
            got: resp.r#type(),
        });
    }
    Ok(resp)
}

fn simple(t: ReqType) -> Req {
    Req {
        r#type: t as i32,
        ..Default::default()
    }
}

/// Where CRIU writes its log: `log_file` in the work dir, which defaults to the images dir.
/// Both are fds of this process, so the log is reachable through a duplicate of the fd.
pub(crate) struct LogFile {
    dir: OwnedFd,
    name: std::ffi::CString,
}

impl LogFile {
    pub(crate) fn at(dir: &Path, name: &str) -> Option<LogFile> {
        Some(LogFile {
            dir: std::fs::File::open(dir).ok()?.into(),
            name: std::ffi::CString::new(name).ok()?,
        })
    }

    fn of(opts: &Opts) -> Option<LogFile> {
        let name = opts.log_file.as_deref()?;
        let dir_fd: RawFd = opts.work_dir_fd.unwrap_or(opts.images_dir_fd);
        if dir_fd < 0 {
            return None;
        }
        // SAFETY: `opts` names fds of this process that its caller keeps
        // open until the request has returned, and this borrow ends with this
        // line, once the duplicate is made.
        let dir = unsafe { BorrowedFd::borrow_raw(dir_fd) }
            .try_clone_to_owned()
            .ok()?;
        Some(LogFile {
            dir,
            name: std::ffi::CString::new(name).ok()?,
        })
    }
}

/// The last lines of CRIU's log, for error reports.
pub(crate) fn log_tail(log: &Option<LogFile>) -> String {
    const TAIL: u64 = 3000;
    let Some(log) = log else { return String::new() };
    // A log in our own memory file is named by its /proc fd link, which
    // O_NOFOLLOW would refuse; anything else must not be a link.
    let nofollow = match log.name.to_bytes().starts_with(b"/proc/") {
        true => OFlag::empty(),
        false => OFlag::O_NOFOLLOW,
    };
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | nofollow;
    let Ok(fd) = openat(&log.dir, log.name.as_c_str(), flags, Mode::empty()) else {
        return String::new();
    };
    let mut f = std::fs::File::from(fd);
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let s = if len > TAIL {
        s.split_once('\n').map(|(_, rest)| rest).unwrap_or(&s)
    } else {
        &s
    };
    s.trim_end().to_string()
}
