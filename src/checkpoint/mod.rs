//! The whole checkpoint, its steps in order, one module each:
//!
//! 1. [`locate`]: find the container and what the checkpoint needs of it
//!    (done by the caller);
//! 2. [`freeze`]: freeze its cgroup once CRIU is ready to seize it, noted in
//!    the crash [`journal`], with CRIU [`watch`]ed so that nothing stays
//!    frozen, and no process of the cgroup left out of the dumped [`tree`];
//! 3. [`dump`]: CRIU's options, in runc's naming;
//! 4. [`collect`]: what goes beside the images (config, descriptors, the
//!    root file system's changes);
//! 5. the images reach the archive through one of two sinks ([`sink`]):
//!    streamed ([`stream`], every image written once, into the archive) or
//!    staged; [`hold`] keeps the pages in memory during the pause;
//! 6. [`archive`]: one root-only POSIX tar, atomic.
//!
//! This module runs them: the container is thawed as soon as CRIU is done,
//! and nothing is left behind on failure.

pub mod archive;
pub mod collect;
pub mod dump;
pub mod freeze;
pub mod hold;
pub mod journal;
pub mod locate;
pub mod sink;
pub mod stream;
pub mod tree;
pub mod watch;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criu_rpc::proto::DumpStatsEntry;
use criu_rpc::Criu;

use crate::error::{Context, Error, Result};
use crate::mountinfo::{self, Mount};
use crate::safefs;
use crate::seal::encrypt::{CipherSpool, SealWriter, Sealer};
use crate::seal::Recipients;
use archive::{Member, Target};
use collect::{Overlay, RootfsDiff};
use dump::{DumpSettings, DumpTarget};
use freeze::{FreezeAt, Freezer};
use hold::Budget;
use locate::Container;
use sink::{Cancelled, Dumped, Sink, Wait};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone)]
pub struct Options {
    pub location: PathBuf,
    /// The request's budget; `None` is unbounded.
    pub deadline: Option<Instant>,
    pub criu: Criu,
    pub settings: DumpSettings,
    /// fdatasync the archive and fsync its directory (on by default).
    pub durable: bool,
    /// Where to note cgroups frozen by us, for [`journal::recover`] after a crash.
    pub freeze_journal: Option<PathBuf>,
    /// Parent dir for staging; `None` stages beside the archive (same file system,
    /// so the copy into the archive can share extents).
    pub staging_dir: Option<PathBuf>,
    /// Stream CRIU's images straight into the archive (`criu dump --stream` through
    /// its command line) instead of dumping them into staging first. Falls back to
    /// the staged dump where the stream socket cannot be placed.
    pub stream: bool,
    /// The memory every checkpoint in flight may hold pages in during its
    /// pause (see [`hold`]).
    pub hold: Arc<Budget>,
    /// Most this checkpoint may hold, whatever the budget says.
    pub hold_cap: Option<u64>,
    /// Seal the archive to these recipients (see [`crate::seal`]).
    pub seal: Option<Arc<Recipients>>,
    /// The node's restore dir: a container lazily restored there has its
    /// pages all put in before its memory is read
    /// ([`crate::restore::complete`]).
    pub restore_dir: Option<PathBuf>,
}

/// What a checkpoint did and how long each phase took.
#[derive(Debug, Default)]
pub struct Report {
    pub location: PathBuf,
    pub archive_bytes: u64,
    /// Bytes the archive step wrote itself: headers, small members and copies.
    /// Adopted, cloned (reflink) and streamed page data is not copied, so not
    /// counted.
    pub archive_written_bytes: u64,
    /// Whether CRIU streamed its images into the archive.
    pub streamed: bool,
    /// Bytes of pages held in memory during the pause (see [`hold`]).
    pub pages_held: u64,
    /// Bytes written to disk while the container was frozen.
    pub frozen_written: u64,
    pub phases: Vec<(&'static str, Duration)>,
    /// How long the container was frozen by us (zero if it was paused already).
    pub frozen: Duration,
    pub was_paused: bool,
    pub stats: Option<DumpStatsEntry>,
    pub rootfs_entries: u64,
    pub deleted_files: usize,
    /// The staging removal, running in the background.
    pub cleanup: Cleanup,
}

/// Removal of the staging dir, off the request path. A long-lived server drops it;
/// a one-shot command waits so nothing is left when it exits.
#[derive(Debug, Default)]
pub struct Cleanup(Option<std::thread::JoinHandle<()>>);

impl Cleanup {
    pub fn wait(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

struct Phases {
    at: Instant,
    list: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.list.push((name, now - self.at));
        self.at = now;
    }
}

/// Checkpoints `c` into `opts.location`.
///
/// The work runs in its own task: if this future is dropped (a cancelled gRPC
/// call), the task sees it, thaws the container, lets CRIU wind down, removes what
/// it wrote, and ends; nothing is abandoned halfway.
pub async fn checkpoint(c: &Container, opts: &Options) -> Result<Report> {
    let never = CancellationToken::new();
    checkpoint_tracked(c, opts, &TaskTracker::new(), &never).await
}

/// As [`checkpoint`], for a server: the work's task is in `tasks`, so a server
/// that shuts down can wait for it, and `stop` cancels it as a dropped call
/// would. The answer is still the work's own: a checkpoint that was already
/// committed when `stop` came is reported, not denied.
pub async fn checkpoint_tracked(
    c: &Container,
    opts: &Options,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Report> {
    let (keep_going, cancelled) = tokio::sync::watch::channel(());
    let (id, work) = (c.id.clone(), run(c.clone(), opts.clone(), cancelled));
    let mut task = tasks.spawn(async move {
        let r = work.await;
        if let Err(e @ Error::Cancelled) = &r {
            // Nobody waits for this answer any more: say it here.
            tracing::warn!(container = %id, "checkpoint stopped: {e}; the container runs on, nothing was left");
        }
        r
    });
    let joined = tokio::select! {
        r = &mut task => r,
        _ = stop.cancelled() => {
            drop(keep_going);
            task.await
        }
    };
    joined.map_err(|e| Error::Other(format!("checkpoint task failed: {e}")))?
}

/// The checkpoint's private dir on the archive's file system: CRIU's work dir,
/// its images (when staged), the unfinished archive, noted in the journal for
/// as long as it exists.
struct Stage {
    dir: tempfile::TempDir,
    note: Option<journal::JournalEntry>,
    /// CRIU's log in memory while pages are held: CRIU writes it line by line
    /// while the container is frozen, and on a slow disk each line waits.
    log: Option<File>,
}

impl Stage {
    fn new(target: &Target, opts: &Options) -> Result<Stage> {
        let dir = safefs::private_tempdir(
            ".ckpt-shim-staging-",
            opts.staging_dir.as_ref().unwrap_or(&target.dir_path),
        )?;
        let note = match &opts.freeze_journal {
            Some(j) => Some(journal::JournalEntry::staging(j, dir.path())?),
            None => None,
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("checkpoint"))
            .ctx(|| "create images dir".into())?;
        Ok(Stage {
            dir,
            note,
            log: None,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where CRIU's log goes (in memory once [`Stage::log_in_memory`]), as
    /// CRIU opens it and as we read it.
    fn log(&self) -> (PathBuf, PathBuf) {
        use std::os::fd::AsRawFd;
        match &self.log {
            Some(f) => (
                format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()).into(),
                format!("/proc/self/fd/{}", f.as_raw_fd()).into(),
            ),
            None => (DUMP_LOG.into(), self.path().join(DUMP_LOG)),
        }
    }

    fn log_in_memory(&mut self) -> Result<()> {
        self.log = Some(crate::safefs::memfd(c"ckpt-shim-criu-log")?);
        Ok(())
    }

    /// Deleting GiBs of images costs real time: done off the request path.
    fn remove_in_background(self) -> Cleanup {
        let Stage { dir, note, .. } = self;
        let staged = dir.keep();
        Cleanup(Some(std::thread::spawn(move || {
            if let Err(e) = std::fs::remove_dir_all(&staged) {
                tracing::warn!(dir = %staged.display(), "could not remove staging: {e}");
            }
            drop(note);
        })))
    }
}

/// A container with a terminal (`tty: true`): the runtime made a pty inside
/// it, gave the master to its shim outside, and bound the slave on
/// `/dev/console`. CRIU refuses to dump a pty slave whose master is not in
/// the tree (`Unable to find a master for /0`, `Found slave peer index 0
/// without correspond master peer`) unless told its master is held outside
/// (`orphan_pts_master`), as runc tells it. That option exists only over RPC,
/// so such a container is dumped over RPC, not streamed. On restore, runc
/// sets it too: CRIU makes a new pty and hands its master to runc, which
/// passes it on through the runtime's console socket.
///
/// An encrypted checkpoint only streams, so it cannot hold a terminal.
fn has_terminal(c: &Container, opts: &Options) -> Result<bool> {
    let terminal = c.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
    if terminal && opts.seal.is_some() {
        return Err(Error::Sealed(format!(
            "container {} has a terminal: CRIU dumps one only over RPC, which cannot \
             stream, and an encrypted checkpoint only streams",
            c.id
        )));
    }
    Ok(terminal)
}

/// What CRIU is told, and what the rootfs diff needs.
struct Prepared {
    criu_opts: criu_rpc::proto::Opts,
    mounts: Vec<Mount>,
    freezer: Freezer,
    /// Kept open while CRIU runs: it finds its dirs through our fds.
    _dirs: (OwnedFd, OwnedFd),
}

fn prepare(
    c: &Container,
    stage: &Stage,
    deadline: Instant,
    settings: &DumpSettings,
) -> Result<Prepared> {
    let open = |p: &Path| -> Result<OwnedFd> {
        Ok(File::open(p)
            .ctx(|| format!("open {}", p.display()))?
            .into())
    };
    let images = open(&stage.path().join("checkpoint"))?;
    let work = open(stage.path())?;
    let mounts = mountinfo::read(c.pid)?;
    let host_mounts = mountinfo::read(std::process::id() as i32)?;
    let freezer = Freezer::for_pid(c.pid)?;
    let timeout_secs = deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .clamp(1, u32::MAX as u64) as u32;
    let criu_opts = dump::criu_opts(
        &DumpTarget {
            pid: c.pid,
            spec: &c.spec,
            rootfs: &c.rootfs,
            mounts: &mounts,
            host_mounts: &host_mounts,
            freeze_cgroup: freezer.path(),
        },
        &images,
        &work,
        timeout_secs,
        settings,
    )?;
    Ok(Prepared {
        criu_opts,
        mounts,
        freezer,
        _dirs: (images, work),
    })
}

/// The rootfs diff, and its parts when sealed as it was written.
struct Diffed {
    diff: RootfsDiff,
    sealed: Option<CipherSpool>,
    /// The diff's tar in memory, when pages are held.
    held: Option<File>,
}

type DiffTask = tokio::task::JoinHandle<Result<Diffed>>;

/// Step 4's file half, started the moment the container is frozen: the rootfs
/// diff is taken while CRIU dumps, so files match memory and the walk adds no
/// frozen time. Sealed, it is encrypted as it is walked, into staging; while
/// pages are held (`in_memory`), it goes to memory, as they do.
fn diff_when_frozen(
    freeze: &FreezeAt,
    c: &Container,
    mounts: &[Mount],
    (staging, in_memory): (&Path, bool),
    sealer: Option<Arc<Sealer>>,
) -> Arc<Mutex<Option<DiffTask>>> {
    let slot: Arc<Mutex<Option<DiffTask>>> = Arc::default();
    if let Some(ov) = Overlay::of_root(mounts) {
        let (mounts, spec, staging) = (mounts.to_vec(), c.spec.clone(), staging.to_path_buf());
        let s = slot.clone();
        freeze.on_frozen(move || {
            let task = tokio::task::spawn_blocking(move || match sealer {
                Some(sealer) => {
                    let w = SealWriter::new(sealer, ROOTFS_DIFF, &staging);
                    let (diff, w) = collect::rootfs_diff(&ov, &mounts, &spec, w)?;
                    let sealed = Some(w.finish()?);
                    Ok(Diffed {
                        diff,
                        sealed,
                        held: None,
                    })
                }
                None if in_memory => {
                    let (diff, out) = collect::rootfs_diff(
                        &ov,
                        &mounts,
                        &spec,
                        crate::safefs::memfd(c"ckpt-shim-rootfs-diff")?,
                    )?;
                    Ok(Diffed {
                        diff,
                        sealed: None,
                        held: Some(out),
                    })
                }
                None => {
                    let out = safefs::create_new(&staging.join(ROOTFS_DIFF), 0o600)?;
                    let (diff, _) = collect::rootfs_diff(&ov, &mounts, &spec, out)?;
                    Ok(Diffed {
                        diff,
                        sealed: None,
                        held: None,
                    })
                }
            });
            *s.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        });
    }
    slot
}

async fn run(c: Container, opts: Options, mut cancelled: Cancelled) -> Result<Report> {
    let set = setup(&c, &opts).await?;
    set.dump(&mut cancelled).await?.finish(&cancelled).await
}

/// What a checkpoint carries from its first step to its last: the container,
/// the options, where the archive goes, its staging and first members.
struct Work {
    c: Container,
    opts: Options,
    deadline: Instant,
    ph: Phases,
    target: Target,
    stage: Stage,
    sealer: Option<Arc<Sealer>>,
    head: Vec<Member>,
    streamed: bool,
}

/// Step 1 done: the archive's target and first members, and what CRIU is
/// told. Nothing is frozen yet.
pub struct Setup {
    w: Work,
    sink: Sink,
    p: Prepared,
    criu: Option<watch::CriuWatch>,
    gate: Option<freeze::Gate>,
}

/// Memory to hold `c`'s pages in during the pause, from the shared budget.
fn reserve_hold(c: &Container, opts: &Options) -> hold::Reservation {
    let want = hold::estimate(c.pid).unwrap_or(0);
    let r = opts
        .hold
        .reserve(want.min(opts.hold_cap.unwrap_or(u64::MAX)));
    if let Some(why) = &r.short {
        tracing::info!(container = %c.id, "pages beyond the budget are written while frozen: {why}");
    }
    r
}

/// Step 1: where the archive goes, its first members, and what CRIU is told.
/// Off the async workers: a sealed checkpoint faults in the buffer that holds
/// its pages here, about 0.5 s per GiB on this project's VM.
pub async fn setup(c: &Container, opts: &Options) -> Result<Setup> {
    let (c, opts) = (c.clone(), opts.clone());
    tokio::task::spawn_blocking(move || setup_blocking(&c, &opts))
        .await
        .map_err(|e| Error::Other(format!("checkpoint set-up task: {e}")))?
}

fn setup_blocking(c: &Container, opts: &Options) -> Result<Setup> {
    let at = Instant::now();
    let deadline = opts
        .deadline
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86400));
    if let Some(root) = &opts.restore_dir {
        crate::restore::complete::before_checkpoint(root, &c.id, deadline)?;
    }
    let terminal = has_terminal(c, opts)?;
    let target = Target::new(&opts.location)?;
    let stage = Stage::new(&target, opts)?;
    let checkpointed = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let sealer = opts.seal.clone().map(|r| Arc::new(Sealer::new(r)));
    let head = head_members(c, &checkpointed, sealer.is_some());
    let hold = reserve_hold(c, opts);
    let descriptors = collect::descriptors(c.pid);
    let sink = Sink::open(
        &target,
        stage.path(),
        &head,
        &descriptors,
        (opts.stream && !terminal, hold),
        sealer.clone(),
        opts.freeze_journal.as_deref(),
    )?;
    let streamed = matches!(sink, Sink::Streamed { .. });
    let mut stage = stage;
    // Over RPC (staged), CRIU refuses a log path with a '/' in it.
    if sink.holds() && streamed {
        stage.log_in_memory()?;
    }
    let mut p = prepare(c, &stage, deadline, &opts.settings)?;
    p.criu_opts.log_file = Some(stage.log().0.to_string_lossy().into_owned());
    p.criu_opts.orphan_pts_master = Some(terminal);
    let mut ph = Phases {
        at,
        list: Vec::new(),
    };
    ph.mark("prepare");
    let w = Work {
        c: c.clone(),
        opts: opts.clone(),
        deadline,
        ph,
        target,
        stage,
        sealer,
        head,
        streamed,
    };
    Ok(Setup {
        w,
        sink,
        p,
        criu: None,
        gate: None,
    })
}

impl Setup {
    /// Registers the CRIU this dump runs in `watch` too: a caller that froze
    /// the container itself (a pod's cut) thaws it again once CRIU exits,
    /// since CRIU re-freezes a cgroup it found frozen.
    pub fn share_criu(&mut self, watch: watch::CriuWatch) {
        self.criu = Some(watch);
    }

    /// At CRIU's `pre-dump`, waits at `gate` for the pod's cut instead of
    /// freezing the container itself.
    pub fn gate(&mut self, gate: freeze::Gate) {
        self.gate = Some(gate);
    }

    /// Steps 2 and 3: frozen (unless frozen already), dumped, thawed (unless
    /// frozen by someone else, who thaws it).
    pub async fn dump(self, cancelled: &mut Cancelled) -> Result<Captured> {
        let Setup {
            mut w,
            sink,
            p,
            criu,
            gate,
        } = self;
        expire_check(w.deadline, cancelled, "dump")?;
        let journal = w.opts.freeze_journal.clone();
        let root = (w.c.id.as_str(), w.c.pid);
        let mut freeze = FreezeAt::new(p.freezer.clone(), root, w.deadline, journal);
        if let Some(watch) = criu {
            freeze = freeze.with_criu(watch);
        }
        if let Some(g) = gate {
            freeze = freeze.with_gate(g);
        }
        let at = (w.stage.path(), w.deadline);
        let sealer = w.sealer.clone();
        let d = dump_frozen(&w.c, &w.opts, sink, p, freeze, at, sealer, cancelled).await?;
        w.ph.mark("dump");
        Ok(Captured { w, d })
    }
}

/// Steps 2 and 3 done: the container runs again (or is left to whoever froze
/// it); its archive is still to be built.
pub struct Captured {
    w: Work,
    d: Frozen,
}

impl Captured {
    /// Steps 4 and 5: the rest of what the archive holds, then the archive.
    pub async fn finish(self, cancelled: &Cancelled) -> Result<Report> {
        let Captured { w, d } = self;
        let Work {
            c,
            opts,
            deadline,
            mut ph,
            target,
            stage,
            sealer,
            head,
            streamed,
        } = w;
        // Step 5 comes after the thaw (a pod's too, which its cut does
        // first): what was held is written while the diff ends.
        d.dumped.thaw();
        let (tail, diff_counts, stats) = collect_rest(&c, d.diff_task, &stage).await?;
        ph.mark("rootfs-diff");
        expire_check(deadline, cancelled, "rootfs diff")?;

        let written = d.dumped.thawed().await?;
        let (pages_held, frozen_written) = written.frozen_io(stage.path());
        let expired = || expire_check(deadline, cancelled, "archive");
        let (archive_bytes, archive_written_bytes) = written.archive(
            &target,
            stage.path(),
            (head, tail),
            sealer.as_deref(),
            opts.durable,
            expired,
        )?;
        ph.mark("archive");
        Ok(Report {
            location: target.path.clone(),
            archive_bytes,
            archive_written_bytes,
            streamed,
            pages_held,
            frozen_written,
            phases: ph.list,
            frozen: d.frozen,
            was_paused: d.was_paused,
            stats,
            rootfs_entries: diff_counts.0,
            deleted_files: diff_counts.1,
            cleanup: stage.remove_in_background(),
        })
    }
}

/// What steps 2 and 3 leave: CRIU's images (or where they went), how long the
/// container was frozen, and the rootfs diff under way.
struct Frozen {
    dumped: Dumped,
    frozen: Duration,
    was_paused: bool,
    diff_task: Option<DiffTask>,
}

/// Steps 2 and 3: CRIU starts, the container is frozen when CRIU reaches
/// pre-dump (the rootfs diff starting then), and thawed once CRIU is done.
#[allow(clippy::too_many_arguments)]
async fn dump_frozen(
    c: &Container,
    opts: &Options,
    sink: Sink,
    p: Prepared,
    freeze: FreezeAt,
    (staging, deadline): (&Path, Instant),
    sealer: Option<Arc<Sealer>>,
    cancelled: &mut Cancelled,
) -> Result<Frozen> {
    let in_memory = sink.holds();
    let diff_task = diff_when_frozen(&freeze, c, &p.mounts, (staging, in_memory), sealer);
    let wait = Wait {
        freeze: &freeze,
        deadline,
        grace: opts.criu.grace(),
    };
    let dumped = sink
        .dump(&opts.criu, p.criu_opts, staging, &wait, cancelled)
        .await;
    let thawed = freeze.finish();
    if let Some(e) = freeze.refusal() {
        // What CRIU reports is only that its pre-dump was refused.
        return Err(e);
    }
    let dumped = dumped.map_err(|e| out_of_space(e, staging))?;
    let (frozen, was_paused) = thawed?;
    let diff_task = diff_task.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(Frozen {
        dumped,
        frozen,
        was_paused,
        diff_task,
    })
}

/// Step 4: the members after CRIU's images, once the rootfs diff is done;
/// with the diff's (entries, deleted paths) and CRIU's statistics.
async fn collect_rest(
    c: &Container,
    diff_task: Option<DiffTask>,
    stage: &Stage,
) -> Result<(Vec<Member>, (u64, usize), Option<DumpStatsEntry>)> {
    let staging = stage.path();
    let diff = match diff_task {
        Some(t) => Some(
            t.await
                .map_err(|e| Error::Other(format!("rootfs diff task: {e}")))??,
        ),
        None => None,
    };
    let stats = std::fs::read(staging.join("stats-dump"))
        .ok()
        .and_then(|b| criu_rpc::stats::parse_dump_stats(&b).ok());
    let counts = diff
        .as_ref()
        .map_or((0, 0), |d| (d.diff.entries, d.diff.deleted.len()));
    Ok((
        tail_members(c, (staging, &stage.log().1), diff),
        counts,
        stats,
    ))
}

/// CRIU reports a full disk only in its log, which cannot be written then either:
/// a CRIU failure with (almost) no space left where it wrote is a full disk.
fn out_of_space(e: Error, dir: &Path) -> Error {
    const NEARLY_FULL: u64 = 2 << 20;
    let Error::Criu(criu) = &e else { return e };
    match nix::sys::statvfs::statvfs(dir) {
        Ok(v) if v.blocks_free().saturating_mul(v.fragment_size()) < NEARLY_FULL => {
            tracing::warn!("CRIU failed on a full file system: {criu}");
            Error::NoSpace(dir.to_path_buf())
        }
        _ => e,
    }
}

/// The members that open every archive: the container's metadata. A sealed
/// archive's readable `spec.dump` has its secrets taken out, and the full one
/// is sealed.
fn head_members(c: &Container, checkpointed: &str, sealed: bool) -> Vec<Member> {
    let config = Member::Bytes("config.dump".into(), collect::config_dump(c, checkpointed));
    if !sealed {
        return vec![
            config,
            Member::Bytes("spec.dump".into(), c.spec_raw.clone()),
        ];
    }
    vec![
        config,
        Member::Bytes("spec.dump".into(), crate::seal::redact_spec(&c.spec_raw)),
        Member::Secret("spec.dump".into(), c.spec_raw.clone()),
    ]
}

/// The members after CRIU's images: CRIU's statistics (written to its work
/// dir even when streaming), the rootfs diff, the bind mounts, the log.
fn tail_members(
    c: &Container,
    (staging, log): (&Path, &Path),
    diff: Option<Diffed>,
) -> Vec<Member> {
    let mut members = Vec::new();
    let stats = staging.join("stats-dump");
    if stats.exists() {
        members.push(Member::File("stats-dump".into(), stats));
    }
    if let Some(d) = diff {
        members.push(match d.sealed {
            Some(parts) => Member::Sealed(Some(parts).into()),
            None => match d.held {
                Some(f) => Member::Open(ROOTFS_DIFF.into(), f),
                None => Member::File(ROOTFS_DIFF.into(), staging.join(ROOTFS_DIFF)),
            },
        });
        if !d.diff.deleted.is_empty() {
            members.push(Member::Secret(
                "deleted.files".into(),
                serde_json::to_vec(&d.diff.deleted).expect("strings serialise"),
            ));
        }
    }
    if let Some(b) = collect::bind_mounts(&c.spec) {
        members.push(Member::Bytes("bind.mounts".into(), b));
    }
    if log.exists() {
        members.push(Member::SecretFile(DUMP_LOG.into(), log.to_path_buf()));
    }
    members
}

const ROOTFS_DIFF: &str = "rootfs-diff.tar";
const DUMP_LOG: &str = "dump.log";

/// Fails once the deadline has passed or the caller has gone.
fn expire_check(deadline: Instant, cancelled: &Cancelled, phase: &'static str) -> Result<()> {
    if cancelled.has_changed().is_err() {
        return Err(Error::Cancelled);
    }
    if Instant::now() >= deadline {
        return Err(Error::DeadlineExceeded(phase));
    }
    Ok(())
}
