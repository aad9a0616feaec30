//! Step 5, the streamed sink: CRIU's images, streamed (`criu dump --stream`), written
//! straight into the archive, so every page is written once, where it stays.
//!
//! CRIU keeps several images open at once. The first `pages-*` image (the bulk)
//! is spliced into the archive as it arrives; every other image is spooled (in
//! memory, then in an unlinked file once large) and appended when complete. Every
//! pipe is drained on its own thread, so CRIU never waits on us for one image
//! while we wait on it for another.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use criu_rpc::streamer::CaptureSocket;

use super::archive::{self, safe_member_name, ArchiveWriter};
use super::hold::Thawed;
use crate::error::{Context, Error, Result};
use crate::seal::encrypt::{self, CipherSpool, Sealer};
use crate::seal::PART;

/// Spooled images stay in memory up to this size, then move to a file.
const SPOOL_MEM: usize = 4 << 20;
/// The same while pages are held: nothing should reach the disk while the
/// container is frozen, and images other than the first pages image are
/// metadata of bounded size (a second process's pages are the exception).
const SPOOL_MEM_HELD: usize = 64 << 20;

/// How far a capture has got. CRIU moves page *references* into its pipes
/// (the pages it vmspliced from the frozen tasks) and lets the tasks run again
/// after its `post-dump` stage, before it lets the streamer go. So CRIU is held
/// at `post-dump` until every image has been read out of its pipe
/// ([`Progress::drained`]): nothing is read after the tasks have changed it.
#[derive(Default)]
pub struct Progress {
    /// Images whose pipes are still being read.
    active: std::sync::atomic::AtomicUsize,
    /// CRIU asked for its last image, the inventory.
    last: AtomicBool,
    failed: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Progress {
    /// Every image CRIU sent has been read to its end (or the capture failed).
    pub fn drained(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
            || (self.last.load(Ordering::SeqCst) && self.active.load(Ordering::SeqCst) == 0)
    }

    pub async fn wait_drained(&self) -> bool {
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.drained() {
                return !self.failed.load(Ordering::SeqCst);
            }
            n.await;
        }
    }

    fn finished_one(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// What a capture wrote.
#[derive(Debug, Default)]
pub struct Captured {
    pub images: usize,
    pub bytes: u64,
    /// Bytes written to disk while the container was frozen.
    pub frozen_written: u64,
}

/// Serves CRIU's connection on `sock`, writing each image as `checkpoint/<name>`.
/// Blocking: returns once CRIU has closed the connection and every image is in.
/// `criu_gone` is polled while waiting for CRIU to connect. `spool_dir` (private)
/// takes large spooled images. On error every pipe is dropped, so CRIU fails its
/// next write and aborts. With `hold`, nothing is written into the archive
/// until `thawed` opens.
pub fn capture(
    sock: &CaptureSocket,
    w: &mut ArchiveWriter,
    spool_dir: &Path,
    criu_gone: impl Fn() -> bool,
    progress: &Progress,
    (hold, thawed): (Option<super::hold::Hold>, Thawed),
    sealer: Option<&Sealer>,
) -> Result<Captured> {
    let Some(conn) = sock
        .accept(criu_gone)
        .ctx(|| "accept CRIU's image stream".into())?
    else {
        return Err(Error::Other(
            "CRIU ended without streaming its images".into(),
        ));
    };
    let gate = match hold {
        Some(_) => thawed.clone(),
        None => Thawed::already(),
    };
    let shared = Shared {
        w: Mutex::new(w),
        hold: Mutex::new(hold),
        gate,
        thawed,
        frozen_written: AtomicU64::new(0),
        sealer,
        direct: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        total: Mutex::new(Captured::default()),
    };
    let shared = &shared;
    let results = std::thread::scope(|s| receive_all(s, conn, shared, spool_dir, progress));
    // Receivers stopped by another's failure say so; the first other error is the cause.
    let mut errs: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    if !errs.is_empty() {
        let cause = errs
            .iter()
            .position(|e| !archive::is_abandoned(e))
            .unwrap_or(0);
        return Err(errs.swap_remove(cause));
    }
    let mut total = std::mem::take(&mut *shared.total.lock().unwrap_or_else(|p| p.into_inner()));
    total.frozen_written = shared.frozen_written.load(Ordering::SeqCst);
    Ok(total)
}

/// Takes each image CRIU opens and reads it on a thread of its own, until
/// CRIU closes the connection or something fails; returns every outcome.
fn receive_all<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    mut conn: criu_rpc::streamer::Capture,
    shared: &'env Shared<'env>,
    spool_dir: &'env Path,
    progress: &'env Progress,
) -> Vec<Result<()>> {
    let mut threads = Vec::new();
    let mut first_err = None;
    loop {
        match conn.next_image() {
            Ok(Some((name, pipe))) => {
                progress.active.fetch_add(1, Ordering::SeqCst);
                if name == "inventory.img" {
                    progress.last.store(true, Ordering::SeqCst);
                }
                threads.push(s.spawn(move || {
                    // Once the pipe has ended, whatever the image's data does next.
                    let once = std::sync::Once::new();
                    let drained = || once.call_once(|| progress.finished_one());
                    let r = receive(shared, &name, pipe, spool_dir, &drained);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::SeqCst);
                        progress.fail();
                    }
                    drained();
                    r
                }))
            }
            Ok(None) => break,
            Err(e) => {
                first_err = Some(Err(e).ctx(|| "CRIU's image stream".into()));
                shared.failed.store(true, Ordering::SeqCst);
                progress.fail();
                break;
            }
        }
        if shared.failed.load(Ordering::SeqCst) {
            break;
        }
    }
    // Closing the connection now (on failure) makes CRIU's next open fail.
    drop(conn);
    let mut out: Vec<Result<()>> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| Err(Error::Other("image receiver panicked".into())))
        })
        .collect();
    out.extend(first_err);
    out
}

struct Shared<'w> {
    w: Mutex<&'w mut ArchiveWriter>,
    /// Memory for the pages image during the pause (see [`super::hold`]).
    hold: Mutex<Option<super::hold::Hold>>,
    /// What writes into the archive wait for: the thaw when pages are held,
    /// nothing otherwise.
    gate: Thawed,
    /// Open once the container runs again.
    thawed: Thawed,
    frozen_written: AtomicU64,
    sealer: Option<&'w Sealer>,
    /// Whether some image is being spliced into the archive right now.
    direct: AtomicBool,
    failed: AtomicBool,
    total: Mutex<Captured>,
}

fn receive(
    shared: &Shared,
    name: &str,
    pipe: OwnedFd,
    spool_dir: &Path,
    drained: &(dyn Fn() + Sync),
) -> Result<()> {
    if name.contains('/') || !safe_member_name(Path::new(name)) {
        return Err(Error::Other(format!(
            "CRIU streamed a bad image name {name:?}"
        )));
    }
    let member = format!("checkpoint/{name}");
    let len = if let Some(sealer) = shared.sealer {
        let ended = || {
            drained();
            shared.gate.wait();
        };
        receive_sealed(shared, sealer, &member, pipe, spool_dir, &ended)?
    } else if name.starts_with("pages-") && !shared.direct.swap(true, Ordering::SeqCst) {
        let mut w = lock(&shared.w);
        let mut hold = lock(&shared.hold);
        let held = (hold.as_mut(), &shared.gate);
        let r = w.add_stream(&member, &pipe, &shared.failed, held, drained);
        shared.direct.store(false, Ordering::SeqCst);
        let (len, spliced) = r?;
        shared.frozen_written.fetch_add(spliced, Ordering::SeqCst);
        len
    } else {
        receive_spooled(shared, name, pipe, spool_dir, drained)?
    };
    let mut t = lock(&shared.total);
    t.images += 1;
    t.bytes += len;
    Ok(())
}

/// An image other than the first pages image: read whole (into memory, or a
/// private file once large), then appended once the gate opens.
fn receive_spooled(
    shared: &Shared,
    name: &str,
    pipe: OwnedFd,
    spool_dir: &Path,
    drained: &(dyn Fn() + Sync),
) -> Result<u64> {
    let in_memory = if shared.gate.is_open() {
        SPOOL_MEM
    } else {
        SPOOL_MEM_HELD
    };
    let spool = Spool::fill(File::from(pipe), spool_dir, &shared.failed, in_memory)
        .ctx(|| format!("receive {name} from CRIU"))?;
    if let Spool::File(f) = &spool {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        shared.frozen_written.fetch_add(len, Ordering::SeqCst);
    }
    drained();
    if !shared.gate.wait() {
        return Err(archive::abandoned()).ctx(|| format!("receive {name}"));
    }
    let mut w = lock(&shared.w);
    let len = spool.append(&mut w, &format!("checkpoint/{name}"))?;
    if !shared.thawed.is_open() {
        shared.frozen_written.fetch_add(len, Ordering::SeqCst);
    }
    Ok(len)
}

/// [`receive`] for a sealed checkpoint: the first pages image is sealed
/// straight into the archive, read into the held memory if there is some
/// (see [`crate::seal::encrypt`]); every other image is sealed into a spool of
/// ciphertext and appended once complete.
fn receive_sealed(
    shared: &Shared,
    sealer: &Sealer,
    member: &str,
    pipe: OwnedFd,
    spool_dir: &Path,
    drained: &(dyn Fn() + Sync),
) -> Result<u64> {
    let mut pipe = File::from(pipe);
    let direct =
        member.starts_with("checkpoint/pages-") && !shared.direct.swap(true, Ordering::SeqCst);
    if !direct {
        // Most images are small: read whole, CRIU goes on, sealed on this
        // thread. Only one of more than a part goes through the workers.
        let mut head = Vec::new();
        (&mut pipe)
            .take(PART as u64 + 1)
            .read_to_end(&mut head)
            .ctx(|| format!("receive {member} from CRIU"))?;
        let mut spool = CipherSpool::new(spool_dir);
        let len = if head.len() <= PART {
            drained();
            sealer.add_bytes(&mut spool, member, &head)?;
            head.len() as u64
        } else {
            let mut own = encrypt::owned_slots(sealer.min_slots());
            let slots = own.iter_mut().map(Vec::as_mut_slice).collect();
            let mut source = std::io::Cursor::new(head).chain(pipe);
            let failed = &shared.failed;
            sealer.add_stream(&mut spool, member, &mut source, slots, drained, failed)?
        };
        spool.append(&mut lock(&shared.w))?;
        return Ok(len);
    }
    let mut w = lock(&shared.w);
    let mut hold = lock(&shared.hold);
    let mut slots: Vec<&mut [u8]> = match hold.as_mut() {
        Some(h) => h.as_mut_slice().chunks_exact_mut(PART).collect(),
        None => Vec::new(),
    };
    let mut own = encrypt::owned_slots(sealer.min_slots().saturating_sub(slots.len()));
    slots.extend(own.iter_mut().map(Vec::as_mut_slice));
    let len = sealer.add_stream(&mut **w, member, &mut pipe, slots, drained, &shared.failed);
    shared.direct.store(false, Ordering::SeqCst);
    len
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An image received in full before it goes into the archive.
enum Spool {
    Mem(Vec<u8>),
    File(File),
}

impl Spool {
    fn fill(
        mut pipe: File,
        dir: &Path,
        stop: &AtomicBool,
        in_memory: usize,
    ) -> std::io::Result<Spool> {
        let mut mem = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut file: Option<File> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(archive::abandoned());
            }
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            match &mut file {
                Some(f) => f.write_all(&buf[..n])?,
                None if mem.len() + n > in_memory => {
                    // Unnamed and private: nothing to clean up, nothing to open.
                    let mut f = tempfile::tempfile_in(dir)?;
                    f.write_all(&mem)?;
                    f.write_all(&buf[..n])?;
                    mem = Vec::new();
                    file = Some(f);
                }
                None => mem.extend_from_slice(&buf[..n]),
            }
        }
        Ok(match file {
            Some(f) => Spool::File(f),
            None => Spool::Mem(mem),
        })
    }

    fn append(self, w: &mut ArchiveWriter, member: &str) -> Result<u64> {
        match self {
            Spool::Mem(m) => {
                w.add_bytes(member, &m)?;
                Ok(m.len() as u64)
            }
            Spool::File(f) => {
                w.add_file(member, &f)?;
                f.metadata()
                    .map(|m| m.len())
                    .ctx(|| format!("stat {member}"))
            }
        }
    }
}
