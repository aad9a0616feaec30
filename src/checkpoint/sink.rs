//! Step 5: the two sinks, the ways CRIU's images reach the archive, behind one
//! type: [`Sink::Streamed`] (`criu dump --stream`, every image going straight
//! into the archive as CRIU writes it) or [`Sink::Staged`] (`criu swrk` dumps
//! into staging; the archive is built after). Either way the container is
//! frozen only once CRIU is ready to seize it ([`FreezeAt`]), and CRIU is
//! waited for under the request's deadline and cancellation ([`Wait`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criu_rpc::cli::{CliDump, Stage, Stages};
use criu_rpc::proto::Opts;
use criu_rpc::streamer::CaptureSocket;
use criu_rpc::{Criu, Notify};

use super::archive::{self, ArchiveWriter, Member, Target};
use super::freeze::FreezeAt;
use super::hold::{Hold, OpenOnDrop, Reservation, Thawed};
use super::journal;
use super::stream;
use super::watch::{self, CriuWatch};
use crate::error::{Context, Error, Result};
use crate::seal::encrypt::Sealer;

/// Where CRIU's images go. There is one per checkpoint, so the streamed
/// variant's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Sink {
    /// Into the archive, opened in staging with its leading members written.
    Streamed {
        writer: ArchiveWriter,
        socket: CaptureSocket,
        /// Memory for the pages during the pause (see [`super::hold`]).
        hold: Option<Hold>,
        sealer: Option<Arc<Sealer>>,
    },
    /// Into `<staging>/checkpoint`, as files: in memory while pages are held.
    Staged(Option<HeldDir>),
}

/// Where a staged dump's images go while pages are held: a private dir on
/// /dev/shm (memory), which `<staging>/checkpoint` points to, so CRIU writes
/// nothing to disk while the container is frozen. Removed when dropped; noted
/// in the journal meanwhile, so a crashed shim's is removed on its restart.
pub struct HeldDir {
    _dir: tempfile::TempDir,
    _note: Option<journal::JournalEntry>,
    _memory: Reservation,
}

/// Where held images are staged.
const HELD_STAGING: &str = "/dev/shm";

impl HeldDir {
    /// A held dir for `staging`'s images, if the whole reservation was given
    /// and the memory file system has room for it.
    fn make(
        staging: &Path,
        journal: Option<&Path>,
        memory: Reservation,
    ) -> Result<Option<HeldDir>> {
        if memory.bytes == 0 || memory.short.is_some() {
            return Ok(None);
        }
        let room = nix::sys::statvfs::statvfs(HELD_STAGING)
            .map(|v| v.blocks_available() * v.fragment_size())
            .unwrap_or(0);
        if room < memory.bytes {
            return Ok(None);
        }
        let dir = crate::safefs::private_tempdir(".ckpt-shim-staging-", Path::new(HELD_STAGING))?;
        let note = journal
            .map(|j| journal::JournalEntry::staging(j, dir.path()))
            .transpose()?;
        let images = staging.join("checkpoint");
        std::fs::remove_dir(&images).ctx(|| format!("remove {}", images.display()))?;
        std::os::unix::fs::symlink(dir.path(), &images)
            .ctx(|| format!("link {} to memory", images.display()))?;
        Ok(Some(HeldDir {
            _dir: dir,
            _note: note,
            _memory: memory,
        }))
    }
}

/// A finished dump. Streamed, its capture may still hold pages in memory,
/// to be written once the container runs again ([`Dumped::thawed`]).
pub enum Dumped {
    Streamed(Capturing),
    Staged(Option<HeldDir>),
}

/// A capture that outlives CRIU: what it held waits for the thaw.
pub struct Capturing {
    task: tokio::task::JoinHandle<Result<(ArchiveWriter, stream::Captured)>>,
    /// Opened at the thaw; dropped unopened, the capture is abandoned.
    thawed: OpenOnDrop,
}

/// The dump's data all in place: what the archive still needs.
pub enum Written {
    Streamed(ArchiveWriter, stream::Captured),
    Staged(Option<HeldDir>),
}

impl Sink {
    /// Streams when asked and where it can work, writing `head` (and the
    /// checkpoint dir with `descriptors`) into the archive now, with the memory
    /// `hold` reserved for the pages; otherwise stages, with `descriptors.json`
    /// among the images. A sealed checkpoint only streams: staged images would
    /// be plaintext on disk.
    pub fn open(
        target: &Target,
        staging: &Path,
        head: &[Member],
        descriptors: &[u8],
        (stream, hold): (bool, Reservation),
        sealer: Option<Arc<Sealer>>,
        journal: Option<&Path>,
    ) -> Result<Sink> {
        let images = staging.join("checkpoint");
        if stream || sealer.is_some() {
            match stream_socket(&images, staging) {
                Ok(socket) => {
                    // In staging, like every unfinished archive: a crashed shim's
                    // (memory pages and all) goes with the staging dir on recovery.
                    let mut writer = ArchiveWriter::create_in(target, staging)?;
                    write_members(&mut writer, head, sealer.as_deref())?;
                    writer.add_dir("checkpoint")?;
                    let descriptors =
                        Member::Secret("checkpoint/descriptors.json".into(), descriptors.to_vec());
                    write_members(&mut writer, &[descriptors], sealer.as_deref())?;
                    // Sealing works on buffers; a plain stream splices into a memory file.
                    let hold = Hold::reserved(hold, sealer.is_some())
                        .map_err(|e| {
                            tracing::info!("writing pages through instead of holding them: {e}")
                        })
                        .ok()
                        .flatten();
                    return Ok(Sink::Streamed {
                        writer,
                        socket,
                        hold,
                        sealer,
                    });
                }
                Err(e) if sealer.is_some() => {
                    return Err(Error::Other(format!(
                        "an encrypted checkpoint streams CRIU's images, and cannot here: {e}"
                    )))
                }
                Err(e) => tracing::info!("dumping to staging instead of streaming: {e}"),
            }
        }
        let held = HeldDir::make(staging, journal, hold)?;
        use std::io::Write;
        let path = images.join("descriptors.json");
        crate::safefs::create_new(&path, 0o600)?
            .write_all(descriptors)
            .ctx(|| format!("write {}", path.display()))?;
        Ok(Sink::Staged(held))
    }

    /// Whether the frozen container's data goes to memory first.
    pub fn holds(&self) -> bool {
        matches!(
            self,
            Sink::Streamed { hold: Some(_), .. } | Sink::Staged(Some(_))
        )
    }

    /// Runs CRIU with `opts`: the container is frozen when CRIU reaches
    /// `pre-dump`, and CRIU is waited for under `wait`.
    pub async fn dump(
        self,
        criu: &Criu,
        opts: Opts,
        staging: &Path,
        wait: &Wait<'_>,
        cancelled: &mut Cancelled,
    ) -> Result<Dumped> {
        match self {
            Sink::Staged(held) => {
                let expired = Arc::new(AtomicBool::new(false));
                let mut handler = DumpHandler {
                    expired: expired.clone(),
                    criu: wait.freeze.criu_watch(),
                    freeze: wait.freeze,
                };
                let dump = criu.dump(opts, &mut handler);
                wait.dump(dump, || expired.store(true, Ordering::SeqCst), cancelled)
                    .await?;
                Ok(Dumped::Staged(held))
            }
            Sink::Streamed {
                writer,
                socket,
                hold,
                sealer,
            } => {
                let sink = (writer, socket, hold, sealer);
                dump_streamed(criu, &opts, staging, sink, wait, cancelled).await
            }
        }
    }
}

pub type Cancelled = tokio::sync::watch::Receiver<()>;

/// Answers CRIU over RPC: freezes at `pre-dump`, refuses `post-dump` once the
/// request has expired (so CRIU aborts and releases the tasks), and registers
/// CRIU for the freeze guard's final thaw.
struct DumpHandler<'f> {
    expired: Arc<AtomicBool>,
    criu: CriuWatch,
    freeze: &'f FreezeAt,
}

impl criu_rpc::NotifyHandler for DumpHandler<'_> {
    fn notify(&mut self, n: Notify) -> criu_rpc::NotifyFuture<'_> {
        let refuse = self.expired.load(Ordering::SeqCst) && n.script == "post-dump";
        Box::pin(async move {
            if n.script == "pre-dump" {
                return self.freeze.freeze().await.map_err(|e| e.to_string());
            }
            if refuse {
                Err("request expired".to_string())
            } else {
                Ok(())
            }
        })
    }

    fn spawned(&mut self, pid: u32) {
        watch::watch_pid(&self.criu, pid);
    }
}

/// `criu dump --stream` with the shim capturing its images into `w`, and
/// freezing when CRIU's action script reaches `pre-dump`. Returns once CRIU
/// has exited; held pages are still to be written then.
async fn dump_streamed(
    criu: &Criu,
    opts: &Opts,
    staging: &Path,
    (w, sock, hold, sealer): (
        ArchiveWriter,
        CaptureSocket,
        Option<Hold>,
        Option<Arc<Sealer>>,
    ),
    wait: &Wait<'_>,
    cancelled: &mut Cancelled,
) -> Result<Dumped> {
    let mut cli = criu.dump_cli(opts, &staging.join("checkpoint"), staging, true, true)?;
    watch::watch_pid(&wait.freeze.criu_watch(), cli.pid());
    let criu_gone = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(stream::Progress::default());
    let thawed = Thawed::default();
    let task = spawn_capture(
        (sock, w, staging.to_path_buf()),
        (criu_gone.clone(), progress.clone()),
        (hold, thawed.clone()),
        sealer,
    );
    let capturing = Capturing {
        task,
        thawed: OpenOnDrop(thawed),
    };
    let aborter = cli.aborter();
    let stages = cli.take_stages().expect("asked to hold CRIU at its stages");
    let criu_run = run_held(&mut cli, stages, wait, &progress);
    let dumped = wait.dump(criu_run, || aborter.abort(), cancelled).await;
    criu_gone.store(true, Ordering::SeqCst);
    match dumped {
        Ok(()) => Ok(Dumped::Streamed(capturing)),
        Err(e) => Err(abandon(e, capturing, wait).await),
    }
}

/// Waits for CRIU to exit, answering it at the stages it is held at.
async fn run_held(
    cli: &mut CliDump,
    mut stages: Stages,
    wait: &Wait<'_>,
    progress: &stream::Progress,
) -> std::result::Result<(), criu_rpc::Error> {
    let done = cli.wait();
    tokio::pin!(done);
    loop {
        tokio::select! {
            r = &mut done => return r,
            asked = stages.asked() => {
                let go_on = match asked {
                    // The pause starts now, not before CRIU's start-up.
                    Ok(Stage::PreDump) => wait.freeze.freeze().await.is_ok(),
                    // The tasks run again after this: every image read first.
                    Ok(Stage::PostDump) => progress.wait_drained().await,
                    Err(_) => false,
                };
                let _ = stages.answer(go_on).await;
            }
        }
    }
}

/// After CRIU failed, or was stopped with `e`: ends the freeze, abandons the
/// capture (CRIU has exited, so every pipe is closed; what was held is
/// dropped), and says why the dump failed.
async fn abandon(e: Error, capturing: Capturing, wait: &Wait<'_>) -> Error {
    let _ = wait.freeze.finish();
    match (e, capturing.abandon().await) {
        (e @ (Error::DeadlineExceeded(_) | Error::Cancelled), _) => e,
        // A failed capture closes CRIU's pipes, so CRIU fails too: the
        // capture's error (a full disk, say) is the cause.
        (_, Err(e)) | (e, Ok(())) => e,
    }
}

/// The capture of CRIU's stream into `w`, on a thread of its own.
fn spawn_capture(
    (sock, mut w, spool): (CaptureSocket, ArchiveWriter, PathBuf),
    (gone, progress): (Arc<AtomicBool>, Arc<stream::Progress>),
    held: (Option<Hold>, Thawed),
    sealer: Option<Arc<Sealer>>,
) -> tokio::task::JoinHandle<Result<(ArchiveWriter, stream::Captured)>> {
    tokio::task::spawn_blocking(move || {
        let gone = || gone.load(Ordering::SeqCst);
        stream::capture(
            &sock,
            &mut w,
            &spool,
            gone,
            &progress,
            held,
            sealer.as_deref(),
        )
        .map(|c| (w, c))
    })
}

impl Capturing {
    /// The container runs again: what was held may be written now.
    pub fn thaw(&self) {
        self.thawed.0.open(true);
    }

    async fn join(self) -> Result<(ArchiveWriter, stream::Captured)> {
        let Capturing { task, thawed } = self;
        let r = task.await;
        drop(thawed);
        r.map_err(|e| Error::Other(format!("capture task failed: {e}")))?
    }

    /// Ends a capture whose dump failed: nothing held is written.
    async fn abandon(self) -> Result<()> {
        self.thawed.0.open(false);
        match self.join().await {
            Err(e) if !archive::is_abandoned(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// The socket CRIU streams to, where streaming can work: the socket's path must
/// fit a socket address, and CRIU must be able to run the action script that
/// talks to us, which lives in the staging dir.
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
pub struct Wait<'f> {
    pub freeze: &'f FreezeAt,
    pub deadline: Instant,
    pub grace: Duration,
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
        cancelled: &mut Cancelled,
    ) -> Result<()> {
        tokio::pin!(dump);
        let why = tokio::select! {
            r = &mut dump => return r.map(drop).map_err(Into::into),
            _ = tokio::time::sleep_until(self.deadline.into()) => Error::DeadlineExceeded("dump"),
            _ = cancelled.changed() => Error::Cancelled,
        };
        abort();
        self.freeze.thaw_now();
        let _ = tokio::time::timeout(self.grace, &mut dump).await;
        Err(why)
    }
}

impl Dumped {
    /// Once the container runs again (or if it was paused before and stays
    /// so), every image written into the archive or staged.
    pub async fn thawed(self) -> Result<Written> {
        match self {
            Dumped::Streamed(c) => {
                c.thaw();
                let (w, captured) = c.join().await?;
                Ok(Written::Streamed(w, captured))
            }
            Dumped::Staged(held) => Ok(Written::Staged(held)),
        }
    }

    /// The container runs again (or was paused before the checkpoint and
    /// stays so): what was held may be written now.
    pub fn thaw(&self) {
        if let Dumped::Streamed(c) = self {
            c.thaw()
        }
    }
}

impl Written {
    /// Bytes of pages that were held in memory during the pause, and bytes
    /// written to disk then.
    pub fn frozen_io(&self, staging: &Path) -> (u64, u64) {
        match self {
            Written::Streamed(w, c) => (w.held, c.frozen_written),
            // CRIU wrote every image while the tasks were frozen: into memory,
            // or to disk.
            Written::Staged(Some(_)) => (dir_bytes(&staging.join("checkpoint")), 0),
            Written::Staged(None) => (0, dir_bytes(&staging.join("checkpoint"))),
        }
    }

    /// Step 5: the rest of the archive (`tail` after CRIU's images, then the
    /// seal's marker), committed. Returns the archive's size and the bytes the
    /// archive step wrote itself.
    pub fn archive(
        self,
        target: &Target,
        staging: &Path,
        (head, tail): (Vec<Member>, Vec<Member>),
        sealer: Option<&Sealer>,
        durable: bool,
        expired: impl Fn() -> Result<()>,
    ) -> Result<(u64, u64)> {
        match self {
            Written::Streamed(mut w, _) => {
                write_members(&mut w, &tail, sealer)?;
                if let Some(s) = sealer {
                    w.add_bytes(crate::seal::MARKER, &s.marker())?;
                }
                expired()?;
                let written = w.written;
                Ok((w.commit(durable)?, written))
            }
            Written::Staged(_held) => build_archive(target, staging, head, tail, durable, expired),
        }
    }
}

/// Bytes of the regular files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A staged dump's archive: lists the members, plans the layout, and writes
/// it, adopting the pages image where that is cheaper than copying it.
fn build_archive(
    target: &Target,
    staging: &Path,
    head: Vec<Member>,
    tail: Vec<Member>,
    durable: bool,
    expired: impl Fn() -> Result<()>,
) -> Result<(u64, u64)> {
    let images_dir = staging.join("checkpoint");
    // The members, in archive order: metadata, small images, the biggest image
    // (the pages), then the rest.
    let mut members = head;
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
    members.extend(tail);

    // Adopt the pages image when the archive must be durable (its data is then
    // written to disk once, where it lies, never copied) or when a copy would be
    // throttled to disk speed anyway.
    let sizes: Vec<Option<u64>> = members.iter().map(Member::size).collect::<Result<_>>()?;
    let plan = archive::plan(&sizes);
    let adopt = biggest.filter(|&i| durable || sizes[i].is_some_and(copy_would_throttle));
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
            write_members(&mut w, std::slice::from_ref(m), None)?;
        }
        expired()?;
    }
    let written = w.written;
    Ok((w.commit(durable)?, written))
}

/// Writes `members`; with a sealer, secret ones are sealed (see [`crate::seal`]).
pub fn write_members(
    w: &mut ArchiveWriter,
    members: &[Member],
    sealer: Option<&Sealer>,
) -> Result<()> {
    let open = |path: &Path| File::open(path).ctx(|| format!("open {}", path.display()));
    for m in members {
        match (m, sealer) {
            (Member::Dir(name), _) => w.add_dir(name)?,
            (Member::Bytes(name, data), _) | (Member::Secret(name, data), None) => {
                w.add_bytes(name, data)?
            }
            (Member::File(name, path), _) | (Member::SecretFile(name, path), None) => {
                w.add_file(name, &open(path)?)?
            }
            (Member::Open(name, f), _) => w.add_file(name, f)?,
            (Member::Secret(name, data), Some(s)) => s.add_bytes(w, name, data)?,
            (Member::SecretFile(name, path), Some(s)) => {
                let data = std::fs::read(path).ctx(|| format!("read {}", path.display()))?;
                s.add_bytes(w, name, &data)?
            }
            (Member::Sealed(spool), _) => spool
                .borrow_mut()
                .take()
                .map_or(Ok(()), |sp| sp.append(w))?,
        }
    }
    Ok(())
}

/// Images at least this big are adopted as the archive rather than copied.
const ADOPT_FROM: u64 = 1 << 20;

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
            let available = crate::meminfo::available().unwrap_or(0);
            available / 100 * read("/proc/sys/vm/dirty_background_ratio")
        }
        bytes => bytes,
    };
    2 * len > threshold
}
