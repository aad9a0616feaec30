//! `ckpt-shim check`: can this node checkpoint? Each check is one row of plain
//! data ([`Check`]); [`run_checks`] produces them and [`table`] prints them.
//! A failed check never stops the others, so one run shows everything to fix.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};
use criu_rpc::Version;
use nix::sys::statvfs::{statvfs, FsFlags};

use crate::cgroup;
use crate::config::{socket_path, Config};
use crate::mountinfo::{self, Mount};

/// Where the kubelet writes checkpoints; the staging dir to check when none is set.
pub const KUBELET_CHECKPOINTS: &str = "/var/lib/kubelet/checkpoints";
/// Debian 12's CRIU 3.17 fails on current kernels (see hack/setup.sh); the shim
/// is built and tested against 4.x.
const MIN_CRIU: Version = Version {
    major: 4,
    minor: 0,
    sublevel: 0,
    gitid: None,
};
/// `criu check` probes the kernel for a while; a hung one is not a pass.
const CRIU_TIMEOUT: Duration = Duration::from_secs(60);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, with a limit worth knowing; not a failure.
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// Every check, in the order they are printed.
pub async fn run_checks(cfg: &Config) -> Vec<Check> {
    let mut checks = criu(&cfg.criu).await;
    checks.push(criu_features(&cfg.criu).await);
    checks.push(criu_kdat_cache(&cfg.criu).await);
    checks.push(tcp_dump(&cfg.criu).await);
    checks.push(kernel());
    checks.push(freezer());
    checks.push(capabilities());
    checks.push(staging_dir(cfg));
    checks.push(dir_check("restore-dir", &cfg.restore_dir, false));
    checks.push(hold_pages(&cfg.hold));
    checks.push(upstream(&cfg.upstream).await);
    checks
}

/// How much the frozen containers' pages may be held in right now (see
/// [`crate::checkpoint::hold::budget`]): nothing is a warning, since every checkpoint's
/// pause then waits for the disk.
fn hold_pages(p: &crate::checkpoint::hold::Policy) -> Check {
    let (budget, why) = p.budget_now();
    let mode = match p.pages {
        crate::checkpoint::hold::HoldPages::Auto => "auto".to_string(),
        crate::checkpoint::hold::HoldPages::Mib(n) => format!("{n} MiB"),
    };
    let detail = format!("{mode}: {} now (set by the {why})", gib(budget));
    let status = if budget > 0 { Status::Ok } else { Status::Warn };
    Check::new("hold-pages", status, detail)
}

/// What the `CheckpointReady` runtime condition stands on: CRIU (found, new
/// enough, `criu check`), the freezer, the capabilities and the staging dir.
pub async fn readiness_checks(cfg: &Config) -> Vec<Check> {
    let mut checks = criu(&cfg.criu).await;
    checks.push(freezer());
    checks.push(capabilities());
    checks.push(staging_dir(cfg));
    checks
}

/// How many checks failed (warnings do not count).
pub fn failures(checks: &[Check]) -> usize {
    checks.iter().filter(|c| c.status == Status::Fail).count()
}

/// The checks as an aligned table, one row each, with a header.
pub fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = format!("{:width$}  {:6}  DETAIL\n", "CHECK", "RESULT");
    for c in checks {
        let result = match c.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out += &format!("{:width$}  {result:6}  {}\n", c.name, c.detail);
    }
    out
}

/// Three rows: the binary, its version, and `criu check`.
async fn criu(binary: &Path) -> Vec<Check> {
    match find_binary(binary) {
        Ok(path) => vec![
            Check::new("criu", Status::Ok, path.display().to_string()),
            criu_version(&path).await,
            criu_check(&path).await,
        ],
        Err(why) => vec![
            Check::new("criu", Status::Fail, why),
            Check::new("criu-version", Status::Fail, "not run: no criu binary"),
            Check::new("criu-check", Status::Fail, "not run: no criu binary"),
        ],
    }
}

/// Read from `criu --version`, which also works for a CRIU that cannot serve RPC.
/// A version served (lazy) restores are not tested on warns: they copy the
/// pages there instead.
async fn criu_version(criu: &Path) -> Check {
    let fail = |why: String| Check::new("criu-version", Status::Fail, why);
    let out = match run(criu, &["--version"]).await {
        Ok(out) if out.status.success() => out,
        Ok(out) => return fail(output_tail(&out)),
        Err(why) => return fail(why),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_criu_version(&text) {
        Some(v) if new_enough(&v) => {
            match crate::restore::criu_version::check_criu_version(&text) {
                Ok(()) => Check::new("criu-version", Status::Ok, v.to_string()),
                Err(why) => Check::new("criu-version", Status::Warn, format!("{v}: {why}")),
            }
        }
        Some(v) => fail(format!("{v} is older than {MIN_CRIU}")),
        None => fail("no `Version:` in `criu --version`".into()),
    }
}

/// Whether CRIU keeps what it probes of the kernel between calls: it saves
/// that (`criu.kdat`) only on tmpfs, normally `/run`; without it every
/// checkpoint and restore probes again, about 25 ms here. `criu check` has
/// saved it where it could; a second one says whether it loads it.
async fn criu_kdat_cache(criu: &Path) -> Check {
    match run(criu, &["check", "-v4", "--log-file", "/dev/stdout"]).await {
        Ok(out) => judge_kdat_cache(&String::from_utf8_lossy(&out.stdout)),
        Err(why) => Check::new("criu-kdat-cache", Status::Warn, why),
    }
}

/// The cache row from a `criu check -v4` log.
pub fn judge_kdat_cache(log: &str) -> Check {
    let after = |key: &str| {
        log.lines()
            .find_map(|l| l.split_once(key).map(|(_, rest)| rest.trim().to_string()))
    };
    if let Some(file) = after("Loaded kdat cache from") {
        return Check::new("criu-kdat-cache", Status::Ok, format!("kept in {file}"));
    }
    let why = match (after("File "), log.contains("kdat cache on non-tempfs")) {
        (_, true) => "its dir is not on tmpfs".to_string(),
        (Some(f), false) => f,
        (None, false) => "CRIU did not say".to_string(),
    };
    Check::new(
        "criu-kdat-cache",
        Status::Warn,
        format!("not kept ({why}): every CRIU call probes the kernel again (about 25 ms); build CRIU with RUNDIR on a tmpfs"),
    )
}

/// CRIU's own test of the kernel's features.
async fn criu_check(criu: &Path) -> Check {
    match run(criu, &["check"]).await {
        Ok(out) if out.status.success() => {
            let said = String::from_utf8_lossy(&out.stdout);
            let last = said.lines().rfind(|l| !l.trim().is_empty());
            Check::new("criu-check", Status::Ok, last.unwrap_or("passed"))
        }
        Ok(out) => Check::new("criu-check", Status::Fail, output_tail(&out)),
        Err(why) => Check::new("criu-check", Status::Fail, why),
    }
}

/// The kernel features that later ways of checkpointing need, as CRIU finds
/// them: soft-dirty tracking, for a pre-copy that dumps memory while the
/// container runs and freezes it only for what changed since; and userfaultfd,
/// for a lazy restore that runs the process before its memory is in place.
/// Neither is needed today, so a missing one warns.
async fn criu_features(criu: &Path) -> Check {
    let Ok(criu) = find_binary(criu) else {
        return Check::new("criu-features", Status::Fail, "not run: no criu binary");
    };
    let mut missing = false;
    let mut said = Vec::new();
    for (feature, what) in [
        ("mem_dirty_track", "soft-dirty tracking (pre-copy)"),
        ("uffd-noncoop", "userfaultfd (lazy restore)"),
    ] {
        let has = run(&criu, &["check", "--feature", feature])
            .await
            .is_ok_and(|o| o.status.success());
        missing |= !has;
        said.push(format!("{what}: {}", if has { "yes" } else { "no" }));
    }
    let status = if missing { Status::Warn } else { Status::Ok };
    Check::new("criu-features", status, said.join("; "))
}

/// Whether CRIU can dump TCP sockets on this kernel, found by doing it: a
/// throwaway `sleep` holding a listening socket and both ends of an
/// established loopback connection is dumped with `tcp-established`, left
/// running, into a private temporary dir, and then killed. The connection
/// must then still carry bytes (CRIU took it out of repair mode). CRIU 4.1.1
/// failed every such dump on Linux 6.16 and later (see hack/setup.sh); a
/// failure shows the error line of CRIU's log.
///
/// The network lock is skipped: the throwaway shares the host's network
/// namespace, where CRIU's lock would add and remove iptables rules of the
/// host's, and its idle connection has no traffic to hold still.
pub async fn tcp_dump(criu: &Path) -> Check {
    let Ok(criu) = find_binary(criu) else {
        return Check::new("criu-tcp-dump", Status::Fail, "not run: no criu binary");
    };
    match tokio::time::timeout(CRIU_TIMEOUT, tcp_dump_probe(&criu)).await {
        Ok(Ok(detail)) => Check::new("criu-tcp-dump", Status::Ok, detail),
        Ok(Err(why)) => Check::new("criu-tcp-dump", Status::Fail, why),
        Err(_) => Check::new(
            "criu-tcp-dump",
            Status::Fail,
            format!("the dump took over {CRIU_TIMEOUT:?}"),
        ),
    }
}

/// The throwaway of [`tcp_dump`], killed and reaped when dropped.
struct Throwaway(std::process::Child);

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn tcp_dump_probe(criu: &Path) -> Result<String, String> {
    let pair = LoopbackPair::new()?;
    let (mut client, mut server) = (pair.dup(&pair.client)?, pair.dup(&pair.server)?);
    let child = pair.hold_in_sleep()?;
    let dir = tempfile::Builder::new()
        .prefix("ckpt-shim-tcp-probe-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    dump_established(criu, child.0.id() as i32, dir.path()).await?;
    // Left running: the connection must work as before.
    let carried = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        server.set_read_timeout(Some(Duration::from_secs(5)))?;
        client.write_all(b"ok")?;
        let mut b = [0u8; 2];
        server.read_exact(&mut b)?;
        Ok::<_, std::io::Error>(b == *b"ok")
    })
    .await
    .map_err(|e| format!("{e}"))?;
    match carried {
        Ok(true) => {}
        Ok(false) => return Err("after the dump the connection carried other bytes".into()),
        Err(e) => return Err(format!("after the dump the connection is broken: {e}")),
    }
    drop(child);
    Ok(format!(
        "dumped a listening and an established loopback TCP socket (tcp-established, \
         left running: the connection works on) with {}",
        criu.display()
    ))
}

/// A listening loopback TCP socket and a connection to it, both ends.
struct LoopbackPair {
    listener: std::net::TcpListener,
    client: std::net::TcpStream,
    server: std::net::TcpStream,
}

impl LoopbackPair {
    fn new() -> Result<LoopbackPair, String> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        let client =
            std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        Ok(LoopbackPair {
            listener,
            client,
            server,
        })
    }

    fn dup(&self, s: &std::net::TcpStream) -> Result<std::net::TcpStream, String> {
        s.try_clone().map_err(|e| format!("dup a socket: {e}"))
    }

    /// A throwaway `sleep` holding the three sockets, in a session of its own
    /// (so CRIU needs no shell-job); ours are closed.
    fn hold_in_sleep(self) -> Result<Throwaway, String> {
        use std::os::fd::AsFd;
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let held = (self.listener, self.client, self.server);
        // SAFETY: between fork and exec only fcntl and setsid run, both
        // async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                for fd in [held.0.as_fd(), held.1.as_fd(), held.2.as_fd()] {
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        Ok(Throwaway(
            cmd.spawn().map_err(|e| format!("start sleep: {e}"))?,
        ))
    }
}

/// `criu dump --tcp-established --leave-running` of `pid` into `dir`, which
/// must then hold the two streams of the connection.
async fn dump_established(criu: &Path, pid: i32, dir: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let dir_fd = std::fs::File::open(dir).map_err(|e| format!("temp dir: {e}"))?;
    let opts = criu_rpc::proto::Opts {
        images_dir_fd: dir_fd.as_raw_fd(),
        pid: Some(pid),
        leave_running: Some(true),
        tcp_established: Some(true),
        shell_job: Some(false),
        network_lock: Some(criu_rpc::proto::NetworkLockMethod::Skip as i32),
        log_level: Some(4),
        log_file: Some("dump.log".into()),
        ..Default::default()
    };
    if let Err(e) = criu_rpc::Criu::new(criu)
        .dump(opts, &mut criu_rpc::ack_all())
        .await
    {
        let log = std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
        return Err(format!(
            "CRIU cannot dump TCP sockets: {}",
            criu_failure(&log, &e)
        ));
    }
    let streams = std::fs::read_dir(dir)
        .map_err(|e| format!("list the images: {e}"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tcp-stream-"))
        .count();
    match streams {
        2 => Ok(()),
        n => Err(format!(
            "CRIU dumped {n} established TCP streams of the 2 (tcp-stream-*.img)"
        )),
    }
}

/// Why a CRIU dump failed, from its whole `log` (else the tail in `e`): see
/// [`dump_cause`]. Without an `Error` line in either, the first error CRIU
/// reported, else our own error's first line.
pub fn criu_failure(log: &str, e: &criu_rpc::Error) -> String {
    let reported = match e {
        criu_rpc::Error::Failed {
            cr_errmsg: Some(m), ..
        } => Some(m.trim()).filter(|m| !m.is_empty()),
        _ => None,
    };
    match dump_cause(log)
        .or_else(|| dump_cause(e.log_tail()))
        .or(reported)
    {
        Some(line) => line.to_string(),
        None => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

/// The `Error` line of a CRIU dump log that says why the dump failed. Not the
/// first one: CRIU logs errors that are not fatal, while it probes the
/// kernel before the dump starts (`Dumping processes`; creating a veth pair
/// without CAP_NET_ADMIN, say) and during it (raising RLIMIT_NOFILE without
/// CAP_SYS_RESOURCE), and CRIU's own answer carries the first. Nor the last:
/// a failed dump unwinds through criu/cr-dump.c, which logs a line at each
/// level (`Dump files (pid: N) failed`, `Dumping FAILED.`). So it is the
/// last line of the dump from elsewhere, else the dump's first error, else
/// (CRIU failed before it started) the log's first.
pub fn dump_cause(log: &str) -> Option<&str> {
    let is_error = |l: &&str| l.contains("Error (");
    let dump: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("Dumping processes"))
        .filter(is_error)
        .collect();
    let cause = dump
        .iter()
        .rev()
        .find(|l| !l.contains("(criu/cr-dump.c:"))
        .or(dump.first())
        .copied()
        .or_else(|| log.lines().find(is_error));
    cause.map(str::trim)
}

/// `binary` itself if it names a path, else the first match in `PATH`; it
/// must be an executable file.
fn find_binary(binary: &Path) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.components().count() > 1 {
        return match executable(binary) {
            true => Ok(binary.to_path_buf()),
            false => Err(format!("{} is not an executable file", binary.display())),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{} not found in PATH", binary.display()))
}

/// Runs `binary args`, killed if it outlives [`CRIU_TIMEOUT`].
async fn run(binary: &Path, args: &[&str]) -> Result<Output, String> {
    let arg = args.join(" ");
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CRIU_TIMEOUT, out).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("cannot run {} {arg}: {e}", binary.display())),
        Err(_) => Err(format!(
            "{} {arg} took over {CRIU_TIMEOUT:?}",
            binary.display()
        )),
    }
}

/// The exit status and the last lines of a failed command's output, on one line.
fn output_tail(out: &Output) -> String {
    let text = [&out.stdout[..], &out.stderr[..]].concat();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    format!("{}: {tail}", out.status)
}

/// `criu --version` prints `Version: 4.2.1`, and for a git build also
/// `GitID: v4.2-12-g…` (whose version then counts as the next minor).
pub fn parse_criu_version(text: &str) -> Option<Version> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().into())
    };
    let mut numbers = field("Version:")?.split('.').map(|n| n.parse::<i32>());
    Some(Version {
        major: numbers.next()?.ok()?,
        minor: numbers.next()?.ok()?,
        sublevel: numbers.next().unwrap_or(Ok(0)).ok()?,
        gitid: field("GitID:").map(str::to_string),
    })
}

pub fn new_enough(v: &Version) -> bool {
    v.number() >= MIN_CRIU.number()
}

fn kernel() -> Check {
    let u = nix::sys::utsname::uname();
    match u {
        Ok(u) => Check::new("kernel", Status::Ok, u.release().to_string_lossy()),
        Err(e) => Check::new("kernel", Status::Fail, format!("uname: {e}")),
    }
}

fn freezer() -> Check {
    match mountinfo::read(std::process::id() as i32) {
        Ok(mounts) => judge_freezer(&mounts),
        Err(e) => Check::new("freezer", Status::Fail, e.to_string()),
    }
}

/// Which cgroup freezer [`crate::checkpoint::freeze`] will use: on a hybrid host the v1
/// freezer, as runc does there.
pub fn judge_freezer(mounts: &[Mount]) -> Check {
    let v1 = cgroup::v1_mount(mounts, "freezer");
    let v2 = cgroup::v2_mount(mounts);
    let also_v2 = v2
        .map(|m| format!("; cgroup2 at {} too", m.mount_point.display()))
        .unwrap_or_default();
    if let Some(m) = v1 {
        let detail = format!("v1 at {}{also_v2}", m.mount_point.display());
        return Check::new("freezer", Status::Ok, detail);
    }
    let Some(m) = v2 else {
        return Check::new("freezer", Status::Fail, "no freezer hierarchy, no cgroup2");
    };
    match child_freeze_file(&m.mount_point) {
        Some(f) => Check::new("freezer", Status::Ok, format!("v2 ({})", f.display())),
        None => Check::new(
            "freezer",
            Status::Fail,
            format!(
                "cgroup2 at {} has no cgroup.freeze (Linux < 5.2?)",
                m.mount_point.display()
            ),
        ),
    }
}

/// The root cgroup has no `cgroup.freeze` (it cannot be frozen), so look in its
/// children.
fn child_freeze_file(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path().join("cgroup.freeze"))
        .find(|f| f.exists())
}

fn capabilities() -> Check {
    match caps::read(None, CapSet::Effective) {
        Ok(eff) => judge_caps(&eff),
        Err(e) => Check::new("capabilities", Status::Fail, format!("cannot read: {e}")),
    }
}

/// CRIU needs CAP_SYS_ADMIN, or since Linux 5.9 CAP_CHECKPOINT_RESTORE with
/// CAP_SYS_PTRACE. Two more matter for some containers only, so their absence
/// is a warning.
pub fn judge_caps(eff: &CapsHashSet) -> Check {
    use Capability::*;
    let base = if eff.contains(&CAP_SYS_ADMIN) {
        "CAP_SYS_ADMIN"
    } else if eff.contains(&CAP_CHECKPOINT_RESTORE) && eff.contains(&CAP_SYS_PTRACE) {
        "CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE"
    } else {
        let detail = "needs CAP_SYS_ADMIN, or CAP_CHECKPOINT_RESTORE with CAP_SYS_PTRACE";
        return Check::new("capabilities", Status::Fail, detail);
    };
    let mut notes = vec![base.to_string()];
    let useful = [
        (CAP_NET_ADMIN, "no TCP repair for tcp_established"),
        (
            CAP_SYS_RESOURCE,
            "CRIU cannot raise rlimits or pipe sizes past the system's limits",
        ),
    ];
    let mut status = Status::Ok;
    for (cap, without) in useful {
        if eff.contains(&cap) {
            notes.push(cap.to_string());
        } else {
            status = Status::Warn;
            notes.push(format!("no {cap} ({without})"));
        }
    }
    Check::new("capabilities", status, notes.join("; "))
}

/// The configured staging dir, else the kubelet's checkpoint dir (where
/// staging then happens, beside each archive) if there is one.
fn staging_dir(cfg: &Config) -> Check {
    match &cfg.staging_dir {
        Some(d) => dir_check("staging-dir", d, true),
        None if Path::new(KUBELET_CHECKPOINTS).is_dir() => {
            dir_check("staging-dir", Path::new(KUBELET_CHECKPOINTS), true)
        }
        None => Check::new(
            "staging-dir",
            Status::Ok,
            format!("unset, and no {KUBELET_CHECKPOINTS}: stages beside each archive"),
        ),
    }
}

/// `dir`, or its nearest existing parent when it does not exist yet: free
/// space, and whether it is safe and usable for checkpoints.
pub fn dir_check(name: &'static str, dir: &Path, needs_exec: bool) -> Check {
    let at = nearest_existing(dir);
    let (meta, vfs) = match (at.metadata(), statvfs(at)) {
        (Ok(m), Ok(v)) => (m, v),
        (Err(e), _) => return Check::new(name, Status::Fail, format!("{}: {e}", at.display())),
        (_, Err(e)) => return Check::new(name, Status::Fail, format!("{}: {e}", at.display())),
    };
    let shown = match at == dir {
        true => dir.display().to_string(),
        false => format!("{} (missing; parent {})", dir.display(), at.display()),
    };
    let free = vfs.blocks_available() * vfs.fragment_size();
    let (status, notes) = judge_dir(&meta, vfs.flags(), needs_exec);
    let detail = format!("{shown}: {} free, {}", gib(free), notes.join(", "));
    Check::new(name, status, detail)
}

/// Checkpoints hold a container's memory: the dir must be root's alone. A
/// noexec staging dir works, but streaming needs to run its action script
/// there and falls back to staging (see `sink`).
pub fn judge_dir(
    meta: &std::fs::Metadata,
    flags: FsFlags,
    needs_exec: bool,
) -> (Status, Vec<String>) {
    let mode = meta.permissions().mode() & 0o7777;
    let mut notes = vec![format!("mode {mode:04o}")];
    let mut status = Status::Ok;
    if meta.uid() == 0 {
        notes.push("owner root".into());
    } else {
        status = Status::Fail;
        notes.push(format!("owned by uid {}, not root", meta.uid()));
    }
    if mode & 0o022 != 0 {
        status = Status::Fail;
        notes.push("writable by group or others".into());
    }
    if flags.contains(FsFlags::ST_RDONLY) {
        status = Status::Fail;
        notes.push("read-only".into());
    }
    if needs_exec && flags.contains(FsFlags::ST_NOEXEC) {
        if status == Status::Ok {
            status = Status::Warn;
        }
        notes.push("noexec: streaming falls back to staging".into());
    }
    (status, notes)
}

fn nearest_existing(dir: &Path) -> &Path {
    dir.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The upstream runtime answers CRI Version.
async fn upstream(endpoint: &str) -> Check {
    let path = match socket_path(endpoint) {
        Ok(p) => p,
        Err(e) => return Check::new("upstream", Status::Fail, e.to_string()),
    };
    let mut runtime = crate::cri::runtime_service_client::RuntimeServiceClient::new(
        crate::cri::unix_channel(&path),
    );
    let req = crate::cri::VersionRequest {
        version: "v1".into(),
    };
    let fail = |why: String| Check::new("upstream", Status::Fail, format!("{endpoint}: {why}"));
    match tokio::time::timeout(UPSTREAM_TIMEOUT, runtime.version(req)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            let detail = format!(
                "{} {} (CRI {}) at {endpoint}",
                r.runtime_name, r.runtime_version, r.runtime_api_version
            );
            Check::new("upstream", Status::Ok, detail)
        }
        Ok(Err(status)) => fail(status_chain(&status)),
        Err(_) => fail(format!("no answer within {UPSTREAM_TIMEOUT:?}")),
    }
}

/// A status from a call that never reached the runtime says "transport
/// error" and repeats its cause at every level: the innermost cause says why.
fn status_chain(status: &tonic::Status) -> String {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(next) = cause.and_then(|e| e.source()) {
        cause = Some(next);
    }
    match cause {
        Some(e) => format!("unreachable: {e}"),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kdat_cache_row_says_where_it_is_kept_or_why_not() {
        let kept =
            "(00.000066) Version: 4.2.1\n(00.000107) Loaded kdat cache from /run/criu.kdat\n";
        let c = judge_kdat_cache(kept);
        assert_eq!(
            (c.status, c.detail.as_str()),
            (Status::Ok, "kept in /run/criu.kdat")
        );
        let missing = "(00.000066) File /run/criu.kdat does not exist\n(00.027) Looks good.\n";
        let c = judge_kdat_cache(missing);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.detail.contains("/run/criu.kdat does not exist"),
            "{}",
            c.detail
        );
        let ext4 = "File /run/criu.kdat does not exist\nWarn (criu/kerndat.c:1282): Can't keep kdat cache on non-tempfs\n";
        let c = judge_kdat_cache(ext4);
        assert!(c.detail.contains("not on tmpfs"), "{}", c.detail);
        assert_eq!(judge_kdat_cache("").status, Status::Warn);
    }

    #[test]
    fn criu_version_is_parsed_and_compared_with_4_0() {
        let v = parse_criu_version("Version: 4.2.1\n").unwrap();
        assert_eq!((v.major, v.minor, v.sublevel), (4, 2, 1));
        assert!(new_enough(&v));
        assert!(new_enough(&parse_criu_version("Version: 4.0\n").unwrap()));
        assert!(!new_enough(
            &parse_criu_version("Version: 3.17.1\n").unwrap()
        ));
        // A git build after 3.19 counts as 3.20, still too old.
        let git = parse_criu_version("Version: 3.19\nGitID: v3.19-40-gdeadbee\n").unwrap();
        assert_eq!(git.gitid.as_deref(), Some("v3.19-40-gdeadbee"));
        assert!(!new_enough(&git));
        assert!(parse_criu_version("criu: unknown option\n").is_none());
        assert!(parse_criu_version("Version: x.1\n").is_none());
    }

    /// Lines as CRIU 4.2.1 logged them dumping a TCP connection without
    /// CAP_NET_ADMIN: kernel probes' errors, a harmless one, the cause, the
    /// unwinding.
    const NO_NET_ADMIN: &str = "\
(00.009228) Error (criu/libnetlink.c:54): -1 reported by netlink: Operation not permitted
(00.009238) Error (criu/net.c:4151): net: Unable to create a veth pair: -1
(00.057777) Dumping processes (pid: 13106 comm: sleep)
(00.057791) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.065383) tcp: \tTurning repair on for socket 11527
(00.065391) Error (soccr/soccr.c:94): Can't turn TCP repair mode ON: Operation not permitted
(00.065395) ----------------------------------------
(00.065407) Error (criu/cr-dump.c:1545): Dump files (pid: 13106) failed with -1
(00.065693) net: Unlock network
(00.065706) Error (criu/cr-dump.c:1975): Dumping FAILED.
";

    #[test]
    fn a_dump_s_cause_is_its_last_error_before_the_unwinding() {
        assert_eq!(
            dump_cause(NO_NET_ADMIN),
            Some("(00.065391) Error (soccr/soccr.c:94): Can't turn TCP repair mode ON: Operation not permitted")
        );
        // Only cr-dump.c's own lines: the dump's first error.
        let own = "(1) Error (criu/net.c:1): probe\n(2) Dumping processes (pid: 1)\n\
                   (3) Error (criu/cr-dump.c:7): Task 1 is in rseq\n\
                   (4) Error (criu/cr-dump.c:9): Dumping FAILED.\n";
        assert_eq!(
            dump_cause(own),
            Some("(3) Error (criu/cr-dump.c:7): Task 1 is in rseq")
        );
        // Failed before dumping: the log's first error.
        let early =
            "(1) Error (criu/crtools.c:5): Can't open images dir\n(2) Error (x.c:1): more\n";
        assert_eq!(
            dump_cause(early),
            Some("(1) Error (criu/crtools.c:5): Can't open images dir")
        );
        assert_eq!(dump_cause("(1) Dumping processes\n(2) fine\n"), None);
    }

    #[test]
    fn a_failure_is_said_from_the_log_else_criu_s_answer_else_ours() {
        use criu_rpc::proto::ReqType;
        let failed = |msg: Option<&str>, tail: &str| criu_rpc::Error::Failed {
            req: ReqType::Dump,
            cr_errno: None,
            cr_errmsg: msg.map(str::to_string),
            log_tail: tail.into(),
        };
        let first = Some("Error (criu/libnetlink.c:54): -1 reported by netlink\n");
        assert!(criu_failure(NO_NET_ADMIN, &failed(first, ""))
            .ends_with("Can't turn TCP repair mode ON: Operation not permitted"));
        // No log of its own: the tail the error carries.
        assert!(criu_failure("", &failed(first, NO_NET_ADMIN))
            .ends_with("Can't turn TCP repair mode ON: Operation not permitted"));
        assert_eq!(
            criu_failure("", &failed(first, "")),
            "Error (criu/libnetlink.c:54): -1 reported by netlink"
        );
        let crashed = criu_rpc::Error::Crashed {
            req: ReqType::Dump,
            status: "signal 9".into(),
            stderr: String::new(),
            log_tail: String::new(),
        };
        assert_eq!(
            criu_failure("", &crashed),
            "CRIU exited without answering the Dump request (signal 9)"
        );
    }

    #[test]
    fn a_dir_writable_by_others_fails_and_a_private_one_passes() {
        let d = tempfile::tempdir().unwrap();
        let set = |mode| {
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            judge_dir(&d.path().metadata().unwrap(), FsFlags::empty(), true)
        };
        assert_eq!(set(0o700).0, Status::Ok);
        let (status, notes) = set(0o777);
        assert_eq!(status, Status::Fail);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("writable by group or others")),
            "{notes:?}"
        );
        assert_eq!(set(0o750).0, Status::Ok);
        assert_eq!(set(0o770).0, Status::Fail);
        set(0o700);
        let meta = d.path().metadata().unwrap();
        assert_eq!(judge_dir(&meta, FsFlags::ST_NOEXEC, true).0, Status::Warn);
        assert_eq!(judge_dir(&meta, FsFlags::ST_NOEXEC, false).0, Status::Ok);
        assert_eq!(judge_dir(&meta, FsFlags::ST_RDONLY, false).0, Status::Fail);
    }

    #[test]
    fn a_missing_dir_is_judged_by_its_nearest_parent() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let c = dir_check("restore-dir", &d.path().join("a/b"), false);
        assert_ne!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.detail
                .contains(&format!("(missing; parent {})", d.path().display())),
            "{c:?}"
        );
    }

    #[test]
    fn capabilities_need_sys_admin_or_checkpoint_restore_with_ptrace() {
        use Capability::*;
        let set = |caps: &[Capability]| judge_caps(&caps.iter().copied().collect());
        assert_eq!(
            set(&[CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_RESOURCE]).status,
            Status::Ok
        );
        let c = set(&[CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE, CAP_NET_ADMIN]);
        assert_eq!(c.status, Status::Warn, "no CAP_SYS_RESOURCE warns: {c:?}");
        assert!(c.detail.contains("no CAP_SYS_RESOURCE"), "{c:?}");
        assert_eq!(set(&[CAP_CHECKPOINT_RESTORE]).status, Status::Fail);
        assert_eq!(set(&[CAP_SYS_PTRACE, CAP_NET_ADMIN]).status, Status::Fail);
    }

    #[test]
    fn the_freezer_is_v1_on_a_hybrid_host_and_v2_needs_cgroup_freeze() {
        let hybrid = mountinfo::parse(
            "37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        );
        let c = judge_freezer(&hybrid);
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.starts_with("v1 at /sys/fs/cgroup/freezer"),
            "{c:?}"
        );

        let root = tempfile::tempdir().unwrap();
        let v2 = mountinfo::parse(&format!(
            "30 1 0:26 / {} rw - cgroup2 cgroup2 rw\n",
            root.path().display()
        ));
        assert_eq!(judge_freezer(&v2).status, Status::Fail);
        std::fs::create_dir(root.path().join("init.scope")).unwrap();
        std::fs::write(root.path().join("init.scope/cgroup.freeze"), "0\n").unwrap();
        let c = judge_freezer(&v2);
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.starts_with("v2 ("), "{c:?}");
    }
}
