//! `criu dump` driven through its command line, for what RPC cannot carry: image
//! streaming. CRIU's RPC service has no streaming option and opens the images
//! dir without a streamer ("unclear how to do that with RPC", criu/cr-service.c,
//! still so in 4.2.1); `--stream` given to `criu swrk` made 4.1.1 abort before
//! it answered.
//!
//! The options are the same [`Opts`] a DUMP request takes, turned into flags by
//! [`dump_args`]. What NOTIFY does over RPC, an action script does here: CRIU runs
//! it at each stage and aborts the dump when it fails. Ours does two things:
//! - at `pre-dump` (before CRIU touches a task) and `post-dump` (after every
//!   image is written, before the tasks run again), it asks the caller through a
//!   FIFO and waits for the answer on another ([`Stages`]), so the caller can,
//!   say, freeze the container just then, or finish reading the images, and
//!   refuse to go on;
//! - it fails `post-dump` once the caller has given up ([`Aborter::abort`]), so
//!   CRIU unwinds through its own clean-up and releases the tasks, just as a
//!   refused notification makes it do.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::client::{log_tail, LogFile};
use crate::proto::{CgMode, ExtMountMap, NetworkLockMethod, Opts, ReqType};
use crate::swrk::{describe, Proc};
use crate::{Criu, Error};

/// The action script, written into the work dir. At `pre-dump` and
/// `post-dump` (when asked to hold there) it waits for the caller's "ok"; it
/// refuses `post-dump` once the abort file exists; every other stage passes.
const ACTION_SCRIPT: &str = "#!/bin/sh\n\
# Written by ckpt-shim's criu-rpc: wait for the caller at pre-dump and post-dump,\n\
# fail post-dump once the dump was abandoned.\n\
case \"$CRTOOLS_SCRIPT_ACTION\" in\n\
pre-dump|post-dump)\n\
  [ -z \"$CRIU_RPC_ASK\" ] || { echo \"$CRTOOLS_SCRIPT_ACTION\" > \"$CRIU_RPC_ASK\" && read -r a < \"$CRIU_RPC_ANSWER\" && [ \"$a\" = ok ]; } || exit 1 ;;\n\
esac\n\
[ \"$CRTOOLS_SCRIPT_ACTION\" != post-dump ] || [ ! -e \"$CRIU_RPC_ABORT\" ]\n";
const SCRIPT_NAME: &str = "criu-action.sh";
const ABORT_NAME: &str = "criu-abort";
const ASK_NAME: &str = "criu-ask";
const ANSWER_NAME: &str = "criu-answer";

/// A running `criu dump`.
pub struct CliDump {
    proc: Proc,
    work: PathBuf,
    log: Option<String>,
    stages: Option<Stages>,
}

/// A stage where CRIU waits for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before CRIU touches any task.
    PreDump,
    /// Every image written; the tasks are still stopped.
    PostDump,
}

/// CRIU waiting at a stage for the caller: [`asked`](Self::asked) resolves when
/// it got there, and [`answer`](Self::answer) lets it go on, or not.
pub struct Stages {
    ask: tokio::net::unix::pipe::Receiver,
    answer: tokio::net::unix::pipe::Sender,
}

impl Stages {
    /// Two FIFOs in `work`, both held open read-write, so neither side's open
    /// ever blocks, and the script reads EOF (and fails) if we go away.
    fn new(work: &Path) -> std::io::Result<Stages> {
        let (ask, answer) = (work.join(ASK_NAME), work.join(ANSWER_NAME));
        for p in [&ask, &answer] {
            nix::unistd::mkfifo(
                p,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )?;
        }
        let mut o = tokio::net::unix::pipe::OpenOptions::new();
        o.read_write(true);
        Ok(Stages {
            ask: o.open_receiver(&ask)?,
            answer: o.open_sender(&answer)?,
        })
    }

    /// Resolves once CRIU reaches a stage and asks to go on. The script asks
    /// one stage at a time and waits for its answer, so one read is one ask.
    pub async fn asked(&mut self) -> std::io::Result<Stage> {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 64];
        let n = self.ask.read(&mut b).await?;
        match std::str::from_utf8(&b[..n]).map(str::trim) {
            Ok("pre-dump") => Ok(Stage::PreDump),
            Ok("post-dump") => Ok(Stage::PostDump),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the action script asked about no known stage",
            )),
        }
    }

    /// Lets CRIU go on (`true`) or makes it abort before it touched any task.
    /// Keep this alive until CRIU has exited: the answer waits in the FIFO for
    /// the script to read it, and a FIFO's data goes when its last fd closes.
    pub async fn answer(&mut self, go_on: bool) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.answer
            .write_all(if go_on { b"ok\n" } else { b"no\n" })
            .await
    }
}

impl Criu {
    /// Starts `criu dump` with `opts` (see [`dump_args`]); `images` and `work` are
    /// private directories of the caller. With `stream`, CRIU sends its images to
    /// the streamer listening on `images/streamer-capture.sock` instead of writing
    /// them (see [`crate::streamer`]). With `hold`, CRIU waits at `pre-dump` and
    /// `post-dump` for [`CliDump::take_stages`]'s answer.
    pub fn dump_cli(
        &self,
        opts: &Opts,
        images: &Path,
        work: &Path,
        stream: bool,
        hold: bool,
    ) -> Result<CliDump, Error> {
        let script = work.join(SCRIPT_NAME);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&script)
            .and_then(|mut f| f.write_all(ACTION_SCRIPT.as_bytes()))?;
        let mut args = dump_args(opts, images, work)?;
        args.push("--action-script".into());
        args.push(script.into());
        if stream {
            args.push("--stream".into());
        }
        let abort = work.join(ABORT_NAME);
        let (ask, answer) = (work.join(ASK_NAME), work.join(ANSWER_NAME));
        let stages = hold.then(|| Stages::new(work)).transpose()?;
        let mut env = vec![("CRIU_RPC_ABORT", abort.as_os_str())];
        if stages.is_some() {
            env.extend([
                ("CRIU_RPC_ASK", ask.as_os_str()),
                ("CRIU_RPC_ANSWER", answer.as_os_str()),
            ]);
        }
        let proc = Proc::spawn(self.binary(), &args, &env, &[], self.grace())?;
        Ok(CliDump {
            proc,
            work: work.to_path_buf(),
            log: opts.log_file.clone(),
            stages,
        })
    }
}

impl CliDump {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// CRIU's waits at its stages, if [`Criu::dump_cli`] was asked to hold them.
    pub fn take_stages(&mut self) -> Option<Stages> {
        self.stages.take()
    }

    /// What aborts this dump, usable while [`wait`](Self::wait) runs.
    pub fn aborter(&self) -> Aborter {
        Aborter(self.work.join(ABORT_NAME))
    }

    /// Waits for CRIU to exit; success is exit status 0.
    pub async fn wait(&mut self) -> Result<(), Error> {
        let status = self.proc.wait(false).await;
        if status.is_some_and(|s| s.success()) {
            return Ok(());
        }
        let log = self
            .log
            .as_deref()
            .and_then(|name| LogFile::at(&self.work, name));
        Err(Error::Exited {
            req: ReqType::Dump,
            status: describe(status),
            stderr: self.proc.stderr(),
            log_tail: log_tail(&log),
        })
    }
}

/// Aborts a [`CliDump`].
pub struct Aborter(PathBuf);

impl Aborter {
    /// Makes CRIU fail at `post-dump` (if it has not passed it yet), so it releases
    /// the tasks and exits by itself; [`CliDump::wait`] then reports the failure.
    pub fn abort(&self) {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.0);
    }
}

/// The `criu dump` command line for `opts`. Options that only mean something to a
/// restore, or that the command line cannot express, are refused rather than
/// dropped.
pub fn dump_args(opts: &Opts, images: &Path, work: &Path) -> Result<Vec<OsString>, Error> {
    refuse_unsupported(opts)?;
    let pid = opts.pid.ok_or(Error::Unsupported("dump without a pid"))?;
    let mut a: Vec<OsString> = vec![
        "dump".into(),
        "-D".into(),
        images.into(),
        "-W".into(),
        work.into(),
        "-t".into(),
        pid.to_string().into(),
        format!("-v{}", opts.log_level()).into(),
    ];
    for (flag, value) in valued(opts).into_iter().chain(repeated(opts)) {
        a.extend([flag.into(), value]);
    }
    a.extend(manage_cgroups(opts));
    a.extend(switches(opts));
    Ok(a)
}

/// The options that take one value and are set: each flag with its value.
fn valued(opts: &Opts) -> Vec<(&'static str, OsString)> {
    let text = |s: &Option<String>| s.as_ref().map(OsString::from);
    let network_lock = opts.network_lock.map(|_| match opts.network_lock() {
        NetworkLockMethod::Iptables => "iptables",
        NetworkLockMethod::Nftables => "nftables",
        NetworkLockMethod::Skip => "skip",
    });
    [
        ("-o", text(&opts.log_file)),
        ("--root", text(&opts.root)),
        ("--freeze-cgroup", text(&opts.freeze_cgroup)),
        ("--cgroup-yard", text(&opts.cgroup_yard)),
        ("--timeout", opts.timeout.map(|t| t.to_string().into())),
        (
            "--ghost-limit",
            opts.ghost_limit.map(|g| g.to_string().into()),
        ),
        ("--lsm-profile", text(&opts.lsm_profile)),
        ("--network-lock", network_lock.map(OsString::from)),
    ]
    .into_iter()
    .filter_map(|(flag, value)| Some((flag, value?)))
    .collect()
}

/// The list options: a flag for each entry.
fn repeated(opts: &Opts) -> impl Iterator<Item = (&'static str, OsString)> + '_ {
    let mnt = |m: &ExtMountMap| format!("mnt[{}]:{}", m.key, m.val);
    let ext_mnt = opts
        .ext_mnt
        .iter()
        .map(move |m| ("--external", mnt(m).into()));
    let external = opts.external.iter().map(|e| ("--external", e.into()));
    let skip_mnt = opts.skip_mnt.iter().map(|m| ("--skip-mnt", m.into()));
    let enable_fs = opts.enable_fs.iter().map(|f| ("--enable-fs", f.into()));
    ext_mnt.chain(external).chain(skip_mnt).chain(enable_fs)
}

/// `--manage-cgroups`, with its mode unless that is the default, if asked for.
fn manage_cgroups(opts: &Opts) -> Option<OsString> {
    if opts.manage_cgroups != Some(true) {
        return None;
    }
    let mode = match opts.manage_cgroups_mode.map(|_| opts.manage_cgroups_mode()) {
        None | Some(CgMode::Default) => None,
        Some(CgMode::Ignore) => Some("ignore"),
        Some(CgMode::CgNone) => Some("none"),
        Some(CgMode::Props) => Some("props"),
        Some(CgMode::Soft) => Some("soft"),
        Some(CgMode::Full) => Some("full"),
        Some(CgMode::Strict) => Some("strict"),
    };
    Some(match mode {
        Some(m) => format!("--manage-cgroups={m}").into(),
        None => "--manage-cgroups".into(),
    })
}

/// The options the command line cannot carry, refused rather than dropped.
fn refuse_unsupported(opts: &Opts) -> Result<(), Error> {
    let unsupported = |what: &'static str| Err(Error::Unsupported(what));
    if !opts.cg_root.is_empty() {
        return unsupported("cg_root");
    }
    if !opts.inherit_fd.is_empty() || !opts.join_ns.is_empty() {
        return unsupported("inherit_fd/join_ns");
    }
    if opts.config_file.is_some() {
        return unsupported("config_file");
    }
    if opts.orphan_pts_master == Some(true) {
        return unsupported("orphan_pts_master (RPC only, and for restores)");
    }
    if opts.auto_ext_mnt == Some(true) || opts.empty_ns.is_some() {
        return unsupported("auto_ext_mnt/empty_ns");
    }
    Ok(())
}

/// The flags without a value, for the boolean options that are on.
fn switches(opts: &Opts) -> Vec<OsString> {
    let flags = [
        (opts.leave_running, "--leave-running"),
        (opts.ext_unix_sk, "--ext-unix-sk"),
        (opts.tcp_established, "--tcp-established"),
        (opts.evasive_devices, "--evasive-devices"),
        (opts.shell_job, "--shell-job"),
        (opts.file_locks, "--file-locks"),
        (opts.link_remap, "--link-remap"),
        (opts.ext_sharing, "--enable-external-sharing"),
        (opts.ext_masters, "--enable-external-masters"),
        (opts.tcp_skip_in_flight, "--skip-in-flight"),
        (opts.tcp_close, "--tcp-close"),
    ];
    flags
        .into_iter()
        .filter(|(on, _)| *on == Some(true))
        .map(|(_, f)| f.into())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ExtMountMap;

    fn joined(o: &Opts) -> String {
        dump_args(o, Path::new("/s/img"), Path::new("/s"))
            .unwrap()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn dump_opts_become_flags() {
        let o = Opts {
            pid: Some(42),
            root: Some("/r".into()),
            leave_running: Some(true),
            freeze_cgroup: Some("/sys/fs/cgroup/freezer/c".into()),
            timeout: Some(7),
            manage_cgroups: Some(true),
            manage_cgroups_mode: Some(CgMode::Soft as i32),
            file_locks: Some(true),
            tcp_established: Some(false),
            log_level: Some(4),
            log_file: Some("dump.log".into()),
            ext_mnt: vec![ExtMountMap {
                key: "/etc/hosts".into(),
                val: "/etc/hosts".into(),
            }],
            external: vec!["net[4026531840]:extRootNetNS".into()],
            ..Default::default()
        };
        assert_eq!(
            joined(&o),
            "dump -D /s/img -W /s -t 42 -v4 -o dump.log --root /r \
             --freeze-cgroup /sys/fs/cgroup/freezer/c --timeout 7 \
             --external mnt[/etc/hosts]:/etc/hosts --external net[4026531840]:extRootNetNS \
             --manage-cgroups=soft --leave-running --file-locks"
        );
    }

    #[test]
    fn restore_only_opts_are_refused() {
        let o = Opts {
            pid: Some(1),
            cg_root: vec![Default::default()],
            ..Default::default()
        };
        assert!(matches!(
            dump_args(&o, Path::new("/i"), Path::new("/w")),
            Err(Error::Unsupported("cg_root"))
        ));
        assert!(matches!(
            dump_args(&Opts::default(), Path::new("/i"), Path::new("/w")),
            Err(Error::Unsupported(_))
        ));
    }
}
