//! `ckpt-runc`: the runc that containerd's runc runtime runs (its `BinaryName`)
//! on a node where ckpt-shim restores containers through CRI. Every call goes
//! to the real runc unchanged, by `exec`, except two, and only for a container
//! the shim filed a restore for ([`super::stage`]):
//!
//! - `create` becomes `runc restore --detach --no-subreaper` with the
//!   checkpoint's images, after the checkpoint's file changes are applied to
//!   the bundle's root file system. runc restores into the container the
//!   runtime just set up: its cgroup, the new pod's network namespace (as the
//!   external namespace the dump named), and the pod's IPC and UTS namespaces
//!   (joined). It maps the checkpointed stdio pipes to the runtime's new ones
//!   from `descriptors.json`. Without a subreaper of runc's own, the restored
//!   process is the runtime shim's, like any container's init.
//!   The memory of a restore served from the archive ([`super::lazy`]) comes
//!   from a page source started first (`runc restore --lazy-pages`); a full
//!   restore's `create` returns only once that has put every page in.
//! - `start` then has nothing left to do.
//!
//! CRIU restores the checkpoint's hostname into the UTS namespace it joins,
//! which would rename the whole new pod. So before the restore, the UTS image
//! is rewritten to hold the new pod's names. It recreates the checkpoint's
//! SysV objects in the IPC namespace it joins too, where the pod's first
//! restored container already did: those are left out ([`super::ipc`]).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::stage::{self, Staged};
use crate::error::{Context, Error, Result};

/// The real runc: `$CKPT_SHIM_RUNC`, or `runc` from PATH.
fn real_runc() -> OsString {
    std::env::var_os("CKPT_SHIM_RUNC").unwrap_or_else(|| "runc".into())
}

/// Global options of runc that take a value.
const GLOBAL_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu", "--rootless"];
/// `create` options that take a value.
const CREATE_VALUE: &[&str] = &[
    "--bundle",
    "-b",
    "--console-socket",
    "--pid-file",
    "--preserve-fds",
];

/// A runc command line, cut where the wrapper needs it.
#[derive(Debug, PartialEq)]
struct Invocation {
    globals: Vec<OsString>,
    command: String,
    /// The command's options (with their values), without the container ID.
    options: Vec<(String, Option<OsString>)>,
    id: String,
}

impl Invocation {
    fn parse(args: &[OsString]) -> Option<Invocation> {
        let mut i = 0;
        while i < args.len() {
            let a = args[i].to_str()?;
            if !a.starts_with('-') {
                break;
            }
            i += if GLOBAL_VALUE.contains(&a) { 2 } else { 1 };
        }
        let globals = args.get(..i)?.to_vec();
        let command = args.get(i)?.to_str()?.to_string();
        let (id, rest) = args.get(i + 1..)?.split_last()?;
        let mut options = Vec::new();
        let mut it = rest.iter();
        while let Some(a) = it.next() {
            let a = a.to_str()?;
            match a.split_once('=') {
                Some((k, v)) if k.starts_with("--") => {
                    options.push((k.to_string(), Some(v.into())))
                }
                _ if CREATE_VALUE.contains(&a) => {
                    options.push((a.to_string(), Some(it.next()?.clone())))
                }
                _ => options.push((a.to_string(), None)),
            }
        }
        Some(Invocation {
            globals,
            command,
            options,
            id: id.to_str()?.to_string(),
        })
    }

    fn option(&self, names: &[&str]) -> Option<&OsStr> {
        self.options
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Runs as runc would; returns the exit status (or does not return: exec).
pub fn main(args: Vec<OsString>) -> i32 {
    let inv = Invocation::parse(&args);
    let staged = inv
        .as_ref()
        .and_then(|inv| Staged::find(&stage::root_from_env(), &inv.id).map(|s| (inv, s)));
    match staged {
        Some((inv, s)) if inv.command == "create" && s.pending() => match restore(inv, &s) {
            Ok(()) => 0,
            Err(e) => {
                report(inv, &e);
                1
            }
        },
        Some((inv, s)) if inv.command == "start" && s.take_restored_mark() => 0,
        _ => {
            let e = Command::new(real_runc()).args(&args).exec();
            eprintln!("ckpt-runc: cannot run {:?}: {e}", real_runc());
            127
        }
    }
}

/// A create turned into a restore, step by step: the page source started
/// (a served restore), the bundle's spec read, the checkpoint made fit for
/// the new container ([`prepare`]), CRIU run by runc ([`run_restore`]), and a
/// full restore's pages waited for.
fn restore(inv: &Invocation, s: &Staged) -> Result<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(s.work()).ctx(|| format!("create {}", s.work().display()))?;
    // A served restore's page source starts first: it comes up while the
    // file changes are applied.
    let plan = super::source::Plan::read(&s.dir)?;
    let lazy = match &plan {
        Some(_) => Some(LazyServer::spawn(s, inv.option(&["--pid-file"]))?),
        None => None,
    };
    let bundle = PathBuf::from(inv.option(&["--bundle", "-b"]).unwrap_or(OsStr::new(".")));
    let spec = Spec::load(bundle.join("config.json"))
        .map_err(|e| Error::Other(format!("{}/config.json: {e}", bundle.display())))?;
    // Background pushes on the node wait until this restore is done.
    let in_flight = super::slots::restoring(s.dir.parent().unwrap_or(Path::new("/")))?;
    prepare(s, &spec, &bundle)?;
    let lazy = match lazy {
        Some(l) => Some(l.ready(s)?),
        None => None,
    };
    let ready_ms = started.elapsed().as_millis();
    let ran = run_restore(inv, s, &spec, &bundle, lazy.is_some());
    drop(in_flight);
    if let Some(l) = &lazy {
        l.note(&format!(
            "ckpt-runc: page source ready after {ready_ms} ms, runc restore done after {} ms",
            started.elapsed().as_millis()
        ));
    }
    if let Err(e) = ran {
        // Its daemon would wait for the restore forever.
        if let Some(l) = lazy {
            l.stop();
        }
        return Err(e);
    }
    match (lazy, plan.is_some_and(|p| p.full)) {
        (Some(l), true) => all_pages_in(inv, s, l, started)?,
        (Some(l), false) => l.detach(),
        (None, _) => {}
    }
    s.mark_restored()
}

/// The checkpoint made fit for the container this create sets up, before
/// CRIU reads it: held to its spec, its sockets as the new pod allows, its
/// file changes in the bundle's root, its UTS names the pod's, and the SysV
/// objects the pod's IPC namespace already holds left out ([`super::ipc`]).
fn prepare(s: &Staged, spec: &Spec, bundle: &Path) -> Result<()> {
    confine(s, spec)?;
    super::sockets::prepare(s, spec)?;
    super::sockets::skip_network_unlock(spec, &s.images())?;
    let rootfs = super::rootfs::bundle_rootfs(spec, bundle);
    super::apply_rootfs_diff(&s.dir, &rootfs)?;
    rename_uts(spec, &s.images())?;
    super::ipc::drop_live_objects(spec, &s.images())
}

/// `runc restore` of the images into the container: loopback connections
/// held around it ([`super::tcp_hold`]); an error if it fails, with the end
/// of CRIU's log.
fn run_restore(inv: &Invocation, s: &Staged, spec: &Spec, bundle: &Path, lazy: bool) -> Result<()> {
    let mut cmd = Command::new(real_runc());
    cmd.args(&inv.globals)
        .args(["restore", "--detach", "--no-subreaper", "--file-locks"])
        .arg("--bundle")
        .arg(bundle)
        .arg("--image-path")
        .arg(s.images())
        .arg("--work-path")
        .arg(s.work());
    if has_established_tcp(&s.images()) {
        cmd.arg("--tcp-established");
    }
    if lazy {
        cmd.arg("--lazy-pages");
    }
    for (k, v) in &inv.options {
        // What create and restore share; the rest means nothing to a restore.
        if ["--pid-file", "--console-socket", "--no-pivot"].contains(&k.as_str()) {
            cmd.arg(k).args(v);
        }
    }
    let held = super::tcp_hold::Hold::before_restore(&s.images(), spec)?;
    let status = cmd.arg(&inv.id).status();
    held.after_restore(status.as_ref().is_ok_and(|s| s.success()));
    let status = status.ctx(|| format!("run {:?}", real_runc()))?;
    if !status.success() {
        return Err(Error::Other(format!(
            "runc restore failed ({status}); CRIU's restore log ends: {}",
            log_tail(&s.work().join("restore.log"))
        )));
    }
    Ok(())
}

/// The images held against the spec this create runs, the last word on
/// what the restored tree may hold ([`super::policy`]); the shim checked
/// them against the same spec at CreateContainer.
fn confine(s: &Staged, spec: &Spec) -> Result<()> {
    let mode = s.info().map(|i| i.policy).unwrap_or_default();
    let json = serde_json::to_value(spec).map_err(|e| Error::Other(format!("config.json: {e}")))?;
    super::policy::enforce(&s.images(), &json, mode).map(drop)
}

/// A full restore served from the archive is done once its page source has
/// pushed every page. If it could not, the page source has killed the
/// restored process; runc's record of it goes too, so that the runtime's
/// create fails as when CRIU fails, with nothing of the container left.
fn all_pages_in(
    inv: &Invocation,
    s: &Staged,
    mut l: LazyServer,
    started: std::time::Instant,
) -> Result<()> {
    let done = l.wait();
    l.note(&format!(
        "ckpt-runc: every page in after {} ms",
        started.elapsed().as_millis()
    ));
    if let Err(e) = done {
        let _ = Command::new(real_runc())
            .args(&inv.globals)
            .args(["delete", "--force", &inv.id])
            .status();
        return Err(Error::Other(format!(
            "the restore's pages were not all served ({e}): {}",
            log_tail(&s.lazy_log())
        )));
    }
    Ok(())
}

/// A served restore's page source ([`super::lazy_serve`]), started before
/// the restore: a process group of its own (it and CRIU's daemon). A lazy
/// restore leaves it running, its parent the runtime's shim once this
/// exits; a full one waits for it.
struct LazyServer {
    pgid: nix::unistd::Pid,
    log: std::fs::File,
    child: std::process::Child,
}

/// A page source started, not yet known to be listening; killed if dropped
/// so (the restore never came): its daemon would wait for it forever.
struct Spawned {
    child: Option<std::process::Child>,
    log: std::fs::File,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl LazyServer {
    fn spawn(s: &Staged, pid_file: Option<&OsStr>) -> Result<Spawned> {
        let exe = std::env::current_exe().ctx(|| "find ckpt-shim's binary".into())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.lazy_log())
            .ctx(|| "create lazy-serve.log".into())?;
        let mut cmd = Command::new(exe);
        cmd.arg("lazy-serve").arg(&s.dir);
        if let Some(p) = pid_file {
            cmd.arg("--pid-file").arg(p);
        }
        // Not the runtime's stdio (it waits for those to close) nor any fd it
        // gave runc (the container's pipes).
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log.try_clone().ctx(|| "lazy-serve.log".into())?)
            .process_group(0);
        // SAFETY: one syscall between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                super::lazy_serve::mark_cloexec_from(3);
                Ok(())
            });
        }
        let child = cmd.spawn().ctx(|| "start lazy-serve".into())?;
        Ok(Spawned {
            child: Some(child),
            log,
        })
    }
}

impl Spawned {
    /// Waits for its `ready`: CRIU's daemon listens for the restore.
    fn ready(mut self, s: &Staged) -> Result<LazyServer> {
        use std::io::BufRead;
        let child = self.child.as_mut().expect("not taken yet");
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let mut line = String::new();
        let out = child.stdout.take().expect("piped");
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        if line.trim() != "ready" {
            return Err(Error::Other(format!(
                "the lazy restore's page source did not start: {}",
                log_tail(&s.lazy_log())
            )));
        }
        let log = self.log.try_clone().ctx(|| "lazy-serve.log".into())?;
        let child = self.child.take().expect("not taken yet");
        Ok(LazyServer { pgid, log, child })
    }
}

impl LazyServer {
    /// A line in the page source's log (timings, for the benchmark's breakdown).
    fn note(&self, line: &str) {
        let _ = writeln!(&self.log, "{line}");
    }

    /// Stops it (a failed restore): the daemon would wait for it forever.
    fn stop(mut self) {
        let _ = nix::sys::signal::killpg(self.pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Lets it run on its own (a lazy restore); the runtime's shim reaps it.
    fn detach(self) {}

    /// Waits for its end: `Ok` once the daemon has every page in.
    fn wait(&mut self) -> Result<()> {
        let st = self.child.wait().ctx(|| "wait for lazy-serve".into())?;
        match st.success() {
            true => Ok(()),
            false => Err(Error::Other(format!("lazy-serve {st}"))),
        }
    }
}

/// CRIU restores an established TCP connection only when told again that it
/// may (`--tcp-established`), as at the dump; a dump that took one wrote its
/// stream into a `tcp-stream-<inode>.img`.
fn has_established_tcp(images: &Path) -> bool {
    std::fs::read_dir(images)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("tcp-stream-"))
}

/// Rewrites the checkpoint's UTS images with the names of the UTS namespace the
/// container joins (the new pod's), if it joins one.
fn rename_uts(spec: &Spec, images: &Path) -> Result<()> {
    let Some(ns) = crate::oci::joined(spec, LinuxNamespaceType::Uts) else {
        return Ok(());
    };
    let names = uts_names(&ns)?;
    for e in std::fs::read_dir(images).ctx(|| format!("list {}", images.display()))? {
        let e = e.ctx(|| format!("list {}", images.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("utsns-") && name.ends_with(".img") {
            let bytes = criu_rpc::stats::encode_utsns(&names);
            std::fs::write(e.path(), bytes).ctx(|| format!("write {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The host and domain names of the UTS namespace at `path`, read from a thread
/// that joins it (namespaces are per thread for setns).
fn uts_names(path: &Path) -> Result<criu_rpc::proto::UtsnsEntry> {
    let f = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWUTS)
                .ctx(|| format!("join {}", path.display()))?;
            let u = nix::sys::utsname::uname().ctx(|| "uname".into())?;
            Ok(criu_rpc::proto::UtsnsEntry {
                nodename: u.nodename().to_string_lossy().into_owned(),
                domainname: u.domainname().to_string_lossy().into_owned(),
            })
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Other("UTS name thread panicked".into())))
    })
}

/// The last lines of CRIU's log, where it says what failed. CRIU logs an
/// error it then gets past when it may not raise RLIMIT_NOFILE (no
/// CAP_SYS_RESOURCE); that line says nothing about the failure.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error") && !l.contains("Can't setup RLIMIT_NOFILE"))
        .collect();
    let pick = if errors.is_empty() {
        &lines[lines.len().saturating_sub(8)..]
    } else {
        &errors[errors.len().saturating_sub(8)..]
    };
    if pick.is_empty() {
        format!("(no log at {})", path.display())
    } else {
        pick.join(" | ")
    }
}

/// Tells the runtime what failed: on stderr, and as the last error in runc's
/// JSON log, which is the message containerd's shim reports.
fn report(inv: &Invocation, e: &Error) {
    let msg = format!("ckpt-runc: restoring {}: {e}", inv.id);
    eprintln!("{msg}");
    let log = inv
        .globals
        .iter()
        .position(|g| g == "--log")
        .and_then(|i| inv.globals.get(i + 1));
    if let Some(log) = log {
        let line = serde_json::json!({
            "level": "error",
            "msg": msg,
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn containerds_command_lines_are_understood() {
        let inv = Invocation::parse(&args(
            "--root /run/r --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid --no-pivot abc",
        ))
        .unwrap();
        assert_eq!(
            inv.globals,
            args("--root /run/r --log /b/log.json --log-format json")
        );
        assert_eq!((inv.command.as_str(), inv.id.as_str()), ("create", "abc"));
        assert_eq!(inv.option(&["--bundle", "-b"]), Some(OsStr::new("/b")));
        assert_eq!(inv.option(&["--pid-file"]), Some(OsStr::new("/b/init.pid")));
        assert!(inv.options.contains(&("--no-pivot".into(), None)));
        let start = Invocation::parse(&args("--root /run/r start abc")).unwrap();
        assert_eq!(
            (start.command.as_str(), start.id.as_str()),
            ("start", "abc")
        );
        let eq = Invocation::parse(&args("--root=/r create -b /b --pid-file=/p x")).unwrap();
        assert_eq!(
            (eq.option(&["-b"]), eq.option(&["--pid-file"])),
            (Some(OsStr::new("/b")), Some(OsStr::new("/p")))
        );
        assert_eq!(Invocation::parse(&args("--version")), None);
    }
}
