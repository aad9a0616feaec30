//! The whole checkpoint: freeze → dump → collect → archive, with the container
//! thawed as soon as CRIU answers and nothing left behind on failure.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criu_rpc::proto::DumpStatsEntry;
use criu_rpc::{Criu, Notify};

use crate::archive::{self, ArchiveWriter, Target};
use crate::collect::{self, Overlay, RootfsDiff};
use crate::dump::{self, DumpSettings, DumpTarget};
use crate::error::{Context, Error, Result};
use crate::freeze::{self, CriuWatch, Freezer};
use crate::locate::Container;
use crate::mountinfo;
use crate::safefs;
use crate::stream;
use criu_rpc::streamer::CaptureSocket;

#[derive(Debug, Clone)]
pub struct Options {
    pub location: PathBuf,
    /// The request's budget; `None` is unbounded.
    pub deadline: Option<Instant>,
    pub criu: Criu,
    pub settings: DumpSettings,
    /// fdatasync the archive and fsync its directory (on by default).
    pub durable: bool,
    /// Where to note cgroups frozen by us, for [`freeze::recover`] after a crash.
    pub freeze_journal: Option<PathBuf>,
    /// Parent dir for staging; `None` stages beside the archive (same file system,
    /// so the copy into the archive can share extents).
    pub staging_dir: Option<PathBuf>,
    /// Stream CRIU's images straight into the archive (`criu dump --stream` through
    /// its command line) instead of dumping them into staging first. Falls back to
    /// the staged dump where the stream socket cannot be placed.
    pub stream: bool,
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
    let (keep_going, cancelled) = tokio::sync::watch::channel(());
    let (id, work) = (c.id.clone(), run(c.clone(), opts.clone(), cancelled));
    let task = tokio::spawn(async move {
        let r = work.await;
        if let Err(e @ Error::Cancelled) = &r {
            // Nobody waits for this answer any more: say it here.
            tracing::warn!(container = %id, "checkpoint stopped: {e}; the container runs on, nothing was left");
        }
        r
    });
    let res = task
        .await
        .map_err(|e| Error::Other(format!("checkpoint task failed: {e}")))?;
    drop(keep_going);
    res
}

/// Answers CRIU during a dump: refuses post-dump once the request has expired,
/// so CRIU aborts and releases the tasks, and registers CRIU for the freeze guard.
struct DumpHandler {
    expired: Arc<AtomicBool>,
    /// The freeze guard's watch, for its final thaw after CRIU exits.
    criu: CriuWatch,
}

impl criu_rpc::NotifyHandler for DumpHandler {
    fn notify(&mut self, n: Notify) -> criu_rpc::NotifyFuture<'_> {
        let refuse = self.expired.load(Ordering::SeqCst) && n.script == "post-dump";
        Box::pin(async move {
            if refuse {
                Err("request expired".to_string())
            } else {
                Ok(())
            }
        })
    }

    fn spawned(&mut self, pid: u32) {
        freeze::watch_pid(&self.criu, pid);
    }
}

async fn run(
    c: Container,
    opts: Options,
    mut cancelled: tokio::sync::watch::Receiver<()>,
) -> Result<Report> {
    let c = &c;
    let mut ph = Phases {
        at: Instant::now(),
        list: Vec::new(),
    };
    let deadline = opts
        .deadline
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86400));
    let target = Target::new(&opts.location)?;

    // Staging on the archive's file system, 0700, fresh for every checkpoint.
    let staging = safefs::private_tempdir(
        ".ckpt-shim-staging-",
        opts.staging_dir.as_ref().unwrap_or(&target.dir_path),
    )?;
    let staging_note = match &opts.freeze_journal {
        Some(dir) => Some(freeze::JournalEntry::staging(dir, staging.path())?),
        None => None,
    };
    let images_path = staging.path().join("checkpoint");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&images_path)
        .ctx(|| "create images dir".into())?;
    let descriptors = collect::descriptors(c.pid);
    let checkpointed = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);

    // Streaming: the archive is opened now and its leading members written, so
    // that CRIU's images can go straight into it.
    let mut streaming = None;
    if opts.stream {
        match stream_socket(&images_path, staging.path()) {
            Ok(sock) => {
                // In staging, like every unfinished archive: a crashed shim's
                // (memory pages and all) goes with the staging dir on recovery.
                let mut w = ArchiveWriter::create_in(&target, staging.path())?;
                write_members(&mut w, &head_members(c, &checkpointed))?;
                w.add_dir("checkpoint")?;
                w.add_bytes("checkpoint/descriptors.json", &descriptors)?;
                streaming = Some((w, sock));
            }
            Err(e) => tracing::info!("dumping to staging instead of streaming: {e}"),
        }
    }
    if streaming.is_none() {
        write_new(&images_path.join("descriptors.json"), &descriptors)?;
    }
    let images: OwnedFd = File::open(&images_path)
        .ctx(|| "open images dir".into())?
        .into();
    let work: OwnedFd = File::open(staging.path())
        .ctx(|| "open staging dir".into())?
        .into();

    let mounts = mountinfo::read(c.pid)?;
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
            freeze_cgroup: freezer.path(),
        },
        &images,
        &work,
        timeout_secs,
        &opts.settings,
    )?;
    ph.mark("prepare");

    let journal = match &opts.freeze_journal {
        Some(dir) => Some(freeze::JournalEntry::record(dir, &freezer)?),
        None => None,
    };
    let guard = freezer.freeze(&c.id, deadline, journal).await?;
    ph.mark("freeze");

    // The rootfs diff is taken while CRIU dumps: the container is frozen throughout,
    // so files match memory, and the walk costs no extra frozen time.
    let overlay = Overlay::of_root(&mounts);
    let diff_task = overlay.map(|ov| {
        let (mounts, spec) = (mounts.clone(), c.spec.clone());
        let out = safefs::create_new(&staging.path().join("rootfs-diff.tar"), 0o600);
        tokio::task::spawn_blocking(move || collect::rootfs_diff(&ov, &mounts, &spec, out?))
    });

    let wait = Wait {
        guard: &guard,
        deadline,
        grace: opts.criu.grace(),
    };
    let (dumped, streamed) = match streaming {
        None => {
            let expired = Arc::new(AtomicBool::new(false));
            let mut handler = DumpHandler {
                expired: expired.clone(),
                criu: guard.criu_watch(),
            };
            let dump = opts.criu.dump(criu_opts, &mut handler);
            let abort = || expired.store(true, Ordering::SeqCst);
            (wait.dump(dump, abort, &mut cancelled).await, None)
        }
        Some((w, sock)) => {
            let dirs = (images_path.as_path(), staging.path());
            match dump_streamed(&opts.criu, &criu_opts, dirs, w, sock, &wait, &mut cancelled).await
            {
                Ok(wc) => (Ok(()), Some(wc)),
                Err(e) => (Err(e), None),
            }
        }
    };
    let was_paused = guard.was_paused();
    let frozen = guard.thaw();
    dumped.map_err(|e| out_of_space(e, staging.path()))?;
    let frozen = frozen?;
    ph.mark("dump");

    let diff: Option<RootfsDiff> = match diff_task {
        Some(t) => Some(
            t.await
                .map_err(|e| Error::Other(format!("rootfs diff task: {e}")))??,
        ),
        None => None,
    };
    ph.mark("rootfs-diff");
    expire_check(deadline, &cancelled, "rootfs diff")?;

    let stats = std::fs::read(staging.path().join("stats-dump"))
        .ok()
        .and_then(|b| criu_rpc::stats::parse_dump_stats(&b).ok());

    let expired = || expire_check(deadline, &cancelled, "archive");
    let is_streamed = streamed.is_some();
    let (archive_bytes, archive_written_bytes) = match streamed {
        Some((mut w, captured)) => {
            tracing::debug!(images = captured.images, bytes = captured.bytes, "streamed");
            let mut tail: Vec<Member> = stats_member(staging.path()).into_iter().collect();
            tail.extend(tail_members(c, staging.path(), diff.as_ref()));
            write_members(&mut w, &tail)?;
            expired()?;
            let written = w.written;
            (w.commit(opts.durable)?, written)
        }
        None => build_archive(
            c,
            &target,
            staging.path(),
            diff.as_ref(),
            &checkpointed,
            &opts,
            expired,
        )?,
    };
    ph.mark("archive");

    // Deleting GiBs of images costs real time: do it off the request path.
    let staged = staging.keep();
    let cleanup = Cleanup(Some(std::thread::spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&staged) {
            tracing::warn!(dir = %staged.display(), "could not remove staging: {e}");
        }
        drop(staging_note);
    })));
    Ok(Report {
        location: target.path.clone(),
        archive_bytes,
        archive_written_bytes,
        streamed: is_streamed,
        phases: ph.list,
        frozen,
        was_paused,
        stats,
        rootfs_entries: diff.as_ref().map(|d| d.entries).unwrap_or(0),
        deleted_files: diff.as_ref().map(|d| d.deleted.len()).unwrap_or(0),
        cleanup,
    })
}

/// `criu dump --stream` with the shim capturing its images into `w`. Returns the
/// writer, ready for the members after the images, and what was captured.
async fn dump_streamed(
    criu: &Criu,
    criu_opts: &criu_rpc::proto::Opts,
    (images, staging): (&Path, &Path),
    mut w: ArchiveWriter,
    sock: CaptureSocket,
    wait: &Wait<'_>,
    cancelled: &mut tokio::sync::watch::Receiver<()>,
) -> Result<(ArchiveWriter, stream::Captured)> {
    let mut cli = criu.dump_cli(criu_opts, images, staging, true)?;
    freeze::watch_pid(&wait.guard.criu_watch(), cli.pid());
    let criu_gone = Arc::new(AtomicBool::new(false));
    let capture = {
        let (gone, spool) = (criu_gone.clone(), staging.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let r = stream::capture(&sock, &mut w, &spool, || gone.load(Ordering::SeqCst));
            r.map(|captured| (w, captured))
        })
    };
    let aborter = cli.aborter();
    let dumped = wait.dump(cli.wait(), || aborter.abort(), cancelled).await;
    criu_gone.store(true, Ordering::SeqCst);
    // CRIU has exited, so every pipe is closed and the capture ends.
    let captured = capture
        .await
        .map_err(|e| Error::Other(format!("capture task failed: {e}")))
        .and_then(|r| r);
    match (dumped, captured) {
        (Ok(()), Ok(wc)) => Ok(wc),
        (Err(e @ (Error::DeadlineExceeded(_) | Error::Cancelled)), _) => Err(e),
        // A failed capture closes CRIU's pipes, so CRIU fails too: the capture's
        // error (a full disk, say) is the cause.
        (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
    }
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

/// The socket CRIU streams to, where streaming can work: the socket's path must
/// fit a socket address, and CRIU must be able to run the action script that lets
/// us abort it, which lives in the staging dir.
fn stream_socket(images: &Path, staging: &Path) -> std::io::Result<CaptureSocket> {
    let vfs = nix::sys::statvfs::statvfs(staging)?;
    if vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC) {
        return Err(std::io::Error::other(format!(
            "{} is on a noexec file system",
            staging.display()
        )));
    }
    CaptureSocket::bind(images)
}

/// Waiting for CRIU's dump under the request's deadline and cancellation.
struct Wait<'g> {
    guard: &'g freeze::FreezeGuard,
    deadline: Instant,
    grace: Duration,
}

impl Wait<'_> {
    /// On expiry or cancellation, `abort` makes CRIU fail at post-dump, the
    /// container is thawed at once so CRIU never waits on a frozen task, and CRIU
    /// gets its grace to wind down by itself. The guard thaws once more when
    /// dropped: CRIU re-freezes the cgroup it found frozen when it ends.
    async fn dump<T, E: Into<Error>>(
        &self,
        dump: impl std::future::Future<Output = std::result::Result<T, E>>,
        abort: impl FnOnce(),
        cancelled: &mut tokio::sync::watch::Receiver<()>,
    ) -> Result<()> {
        tokio::pin!(dump);
        let why = tokio::select! {
            r = &mut dump => return r.map(drop).map_err(Into::into),
            _ = tokio::time::sleep_until(self.deadline.into()) => Error::DeadlineExceeded("dump"),
            _ = cancelled.changed() => Error::Cancelled,
        };
        abort();
        self.guard.thaw_now();
        let _ = tokio::time::timeout(self.grace, &mut dump).await;
        Err(why)
    }
}

/// Step 5 as a whole for a staged dump: lists the members, plans the layout, and
/// writes the archive, adopting the pages image where that is cheaper than copying
/// it. Returns the archive's size and the bytes the archive step wrote itself.
fn build_archive(
    c: &Container,
    target: &Target,
    staging: &Path,
    diff: Option<&RootfsDiff>,
    checkpointed: &str,
    opts: &Options,
    expired: impl Fn() -> Result<()>,
) -> Result<(u64, u64)> {
    let images_dir = staging.join("checkpoint");
    // The members, in archive order: metadata, small images, the biggest image
    // (the pages), then the rootfs diff and the log.
    let mut members = head_members(c, checkpointed);
    members.extend(stats_member(staging));
    members.push(Member::Dir("checkpoint"));
    let mut images: Vec<(u64, std::ffi::OsString)> = std::fs::read_dir(&images_dir)
        .ctx(|| "list images".into())?
        .filter_map(|e| e.ok())
        .map(|e| (e.metadata().map(|m| m.len()).unwrap_or(0), e.file_name()))
        .collect();
    images.sort();
    let biggest = images
        .last()
        .filter(|(len, _)| *len >= ADOPT_FROM)
        .map(|_| members.len() + images.len() - 1);
    for (_, name) in &images {
        members.push(Member::File(
            format!("checkpoint/{}", name.to_string_lossy()),
            images_dir.join(name),
        ));
    }
    members.extend(tail_members(c, staging, diff));

    // Adopt the pages image when the archive must be durable (its data is then
    // written to disk once, where it lies, never copied) or when a copy would be
    // throttled to disk speed anyway.
    let sizes: Vec<Option<u64>> = members.iter().map(Member::size).collect::<Result<_>>()?;
    let plan = archive::plan(&sizes);
    let adopt = biggest.filter(|&i| opts.durable || sizes[i].is_some_and(copy_would_throttle));
    let adopted = match adopt {
        Some(i) => {
            ArchiveWriter::adopt(target, staging, members[i].name(), plan[i])?.map(|w| (w, i))
        }
        None => None,
    };
    let (mut w, adopted) = match adopted {
        Some((w, i)) => (w, Some(i)),
        None => (ArchiveWriter::create_in(target, staging)?, None),
    };
    for (i, m) in members.iter().enumerate() {
        if Some(i) == adopted {
            w.add_adopted(m.name())?;
        } else {
            write_members(&mut w, std::slice::from_ref(m))?;
        }
        expired()?;
    }
    let written = w.written;
    Ok((w.commit(opts.durable)?, written))
}

/// The members that open every archive: the container's metadata.
fn head_members(c: &Container, checkpointed: &str) -> Vec<Member> {
    vec![
        Member::Bytes("config.dump".into(), collect::config_dump(c, checkpointed)),
        Member::Bytes("spec.dump".into(), c.spec_raw.clone()),
    ]
}

/// CRIU's statistics, which it writes into its work dir even when streaming.
fn stats_member(staging: &Path) -> Option<Member> {
    let p = staging.join("stats-dump");
    p.exists().then(|| Member::File("stats-dump".into(), p))
}

/// The members after CRIU's images: the rootfs diff, the bind mounts, the log.
fn tail_members(c: &Container, staging: &Path, diff: Option<&RootfsDiff>) -> Vec<Member> {
    let mut members = Vec::new();
    if let Some(d) = diff {
        members.push(Member::File(
            "rootfs-diff.tar".into(),
            staging.join("rootfs-diff.tar"),
        ));
        if !d.deleted.is_empty() {
            members.push(Member::Bytes(
                "deleted.files".into(),
                serde_json::to_vec(&d.deleted).expect("strings serialise"),
            ));
        }
    }
    if let Some(b) = collect::bind_mounts(&c.spec) {
        members.push(Member::Bytes("bind.mounts".into(), b));
    }
    if staging.join("dump.log").exists() {
        members.push(Member::File("dump.log".into(), staging.join("dump.log")));
    }
    members
}

fn write_members(w: &mut ArchiveWriter, members: &[Member]) -> Result<()> {
    for m in members {
        match m {
            Member::Dir(name) => w.add_dir(name)?,
            Member::Bytes(name, data) => w.add_bytes(name, data)?,
            Member::File(name, path) => w.add_file(
                name,
                &File::open(path).ctx(|| format!("open {}", path.display()))?,
            )?,
        }
    }
    Ok(())
}

/// Images at least this big are adopted as the archive rather than copied.
const ADOPT_FROM: u64 = 1 << 20;

/// One archive member, before it is written.
enum Member {
    Dir(&'static str),
    Bytes(String, Vec<u8>),
    File(String, PathBuf),
}

impl Member {
    fn name(&self) -> &str {
        match self {
            Member::Dir(n) => n,
            Member::Bytes(n, _) | Member::File(n, _) => n,
        }
    }

    /// Data size (`None` for a directory), as the archive plan needs it.
    fn size(&self) -> Result<Option<u64>> {
        Ok(match self {
            Member::Dir(_) => None,
            Member::Bytes(_, d) => Some(d.len() as u64),
            Member::File(_, p) => Some(
                std::fs::metadata(p)
                    .ctx(|| format!("stat {}", p.display()))?
                    .len(),
            ),
        })
    }
}

/// Would copying `len` more bytes of fresh page cache, on top of CRIU's `len`,
/// cross the kernel's background dirty threshold? Then the copy is throttled to
/// disk speed, and writing the pages back once in place is the cheaper way.
fn copy_would_throttle(len: u64) -> bool {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let threshold = match read("/proc/sys/vm/dirty_background_bytes") {
        0 => {
            let available_kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines().find_map(|l| {
                        l.strip_prefix("MemAvailable:")?
                            .trim()
                            .strip_suffix("kB")?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                })
                .unwrap_or(0);
            available_kib * 1024 / 100 * read("/proc/sys/vm/dirty_background_ratio")
        }
        bytes => bytes,
    };
    2 * len > threshold
}

/// Fails once the deadline has passed or the caller has gone.
fn expire_check(
    deadline: Instant,
    cancelled: &tokio::sync::watch::Receiver<()>,
    phase: &'static str,
) -> Result<()> {
    if cancelled.has_changed().is_err() {
        return Err(Error::Cancelled);
    }
    if Instant::now() >= deadline {
        return Err(Error::DeadlineExceeded(phase));
    }
    Ok(())
}

fn write_new(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    safefs::create_new(path, 0o600)?
        .write_all(data)
        .ctx(|| format!("write {}", path.display()))
}
