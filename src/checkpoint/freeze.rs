//! Step 2: freeze the container's cgroup ourselves, polling about every millisecond
//! (CRIU's own wait sleeps in 100 ms steps), behind a guard that thaws on every
//! path: error, deadline, cancellation (drop) and panic (unwind).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::journal::JournalEntry;
use super::tree::{describe, outside_tree};
use super::watch::{wait_exit, CriuWatch};
use crate::cgroup;
use crate::error::{Context, Error, Result};

const POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v1 freezer directory (`freezer.state`).
    V1(PathBuf),
    /// cgroup v2 directory (`cgroup.freeze`, `cgroup.events`).
    V2(PathBuf),
}

impl Freezer {
    /// The freezer of `pid`'s cgroup. On a hybrid host the v1 freezer wins, as runc
    /// uses it there; CRIU is later given this same path.
    pub fn for_pid(pid: i32) -> Result<Freezer> {
        match cgroup::of(pid, "freezer")? {
            Some(cgroup::Dir::V1(p)) => Ok(Freezer::V1(p)),
            Some(cgroup::Dir::V2(p)) => Ok(Freezer::V2(p)),
            None => Err(Error::Other(format!(
                "no freezer cgroup found for pid {pid}"
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Freezer::V1(p) | Freezer::V2(p) => p,
        }
    }

    /// Frozen by its own request (a paused container), not just through a parent.
    pub fn self_frozen(&self) -> Result<bool> {
        match self {
            Freezer::V1(p) => Ok(read_trim(&p.join("freezer.self_freezing"))? == "1"),
            Freezer::V2(p) => Ok(read_trim(&p.join("cgroup.freeze"))? == "1"),
        }
    }

    fn fully_frozen(&self) -> Result<bool> {
        match self {
            Freezer::V1(p) => Ok(read_trim(&p.join("freezer.state"))? == "FROZEN"),
            Freezer::V2(p) => Ok(read_trim(&p.join("cgroup.events"))?
                .lines()
                .any(|l| l == "frozen 1")),
        }
    }

    pub fn state(&self) -> String {
        let file = match self {
            Freezer::V1(p) => p.join("freezer.state"),
            Freezer::V2(p) => p.join("cgroup.events"),
        };
        read_trim(&file)
            .unwrap_or_else(|e| e.to_string())
            .replace('\n', " ")
    }

    pub(super) fn request(&self, frozen: bool) -> Result<()> {
        let (file, value) = match self {
            Freezer::V1(p) => (
                p.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Freezer::V2(p) => (p.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
        };
        std::fs::write(&file, value).ctx(|| format!("write {value} to {}", file.display()))
    }

    /// Freezes and waits until every task is frozen, or thaws again and fails at
    /// `deadline`. An already-paused container is left as it is and stays paused.
    /// `journal` notes the freeze on disk until the cgroup is thawed for good.
    /// `criu` is where the CRIU working on this cgroup is, or will be, registered.
    pub async fn freeze(
        &self,
        id: &str,
        deadline: Instant,
        journal: Option<JournalEntry>,
        criu: CriuWatch,
    ) -> Result<FreezeGuard> {
        if self.self_frozen()? {
            return Ok(FreezeGuard {
                freezer: self.clone(),
                thaw: false,
                frozen_at: Instant::now(),
                criu,
                journal: None,
            });
        }
        let guard = FreezeGuard {
            freezer: self.clone(),
            thaw: true,
            frozen_at: Instant::now(),
            criu,
            journal,
        };
        self.request(true)?;
        let mut polls = 0u32;
        while !self.fully_frozen()? {
            if Instant::now() >= deadline {
                let state = self.state();
                drop(guard);
                return Err(Error::FreezeTimeout {
                    id: id.to_string(),
                    state,
                });
            }
            polls += 1;
            // v1 can stall in FREEZING while tasks fork; asking again moves it on.
            if polls.is_multiple_of(50) {
                self.request(true)?;
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(guard)
    }
}

/// A freeze taken when CRIU is ready to seize the container (at its `pre-dump`
/// stage) rather than before CRIU starts, so that CRIU's start-up is not part
/// of the container's pause. Until then it holds what the freeze needs; after,
/// the [`FreezeGuard`].
pub struct FreezeAt {
    freezer: Freezer,
    id: String,
    /// The container's init: the root of the tree CRIU dumps.
    root: i32,
    deadline: Instant,
    journal_dir: Option<PathBuf>,
    criu: CriuWatch,
    guard: Mutex<Option<FreezeGuard>>,
    finished: Mutex<Option<(Duration, bool)>>,
    /// Called once the container is frozen (e.g. to start the rootfs diff).
    on_frozen: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// A pod's cut: wait there for the whole pod to be frozen.
    gate: Option<Gate>,
    /// Why the freeze refused the dump, for the caller: CRIU only learns
    /// that its `pre-dump` failed.
    refused: Mutex<Option<Error>>,
}

impl FreezeAt {
    /// The freeze of `freezer` for a dump of the tree under `root`.
    pub fn new(
        freezer: Freezer,
        (id, root): (&str, i32),
        deadline: Instant,
        journal_dir: Option<PathBuf>,
    ) -> FreezeAt {
        FreezeAt {
            freezer,
            id: id.to_string(),
            root,
            deadline,
            journal_dir,
            criu: Default::default(),
            guard: Mutex::new(None),
            finished: Mutex::new(None),
            on_frozen: Mutex::new(None),
            gate: None,
            refused: Mutex::new(None),
        }
    }

    /// Instead of freezing the cgroup itself, waits at `gate` until whoever
    /// holds it has frozen every container of the pod.
    pub fn with_gate(mut self, gate: Gate) -> FreezeAt {
        self.gate = Some(gate);
        self
    }

    pub fn path(&self) -> &Path {
        self.freezer.path()
    }

    /// CRIU is registered in `watch` (shared with whoever froze the cgroup
    /// before us) instead of a slot of its own.
    pub fn with_criu(mut self, watch: CriuWatch) -> FreezeAt {
        self.criu = watch;
        self
    }

    /// Where to register the CRIU process (see [`super::watch::watch_pid`]).
    pub fn criu_watch(&self) -> CriuWatch {
        self.criu.clone()
    }

    pub fn on_frozen(&self, f: impl FnOnce() + Send + 'static) {
        *lock(&self.on_frozen) = Some(Box::new(f));
    }

    /// Freezes now (once), noting it in the journal first.
    pub async fn freeze(&self) -> Result<()> {
        if lock(&self.guard).is_some() {
            return Ok(());
        }
        if let Some(g) = &self.gate {
            g.pass().await?;
        }
        // A cgroup frozen already (a paused container, or a pod's cut) has
        // its note from whoever froze it: one note per cgroup.
        let journal = match &self.journal_dir {
            Some(dir) if !self.freezer.self_frozen()? => {
                Some(JournalEntry::record(dir, &self.freezer)?)
            }
            _ => None,
        };
        let guard = self
            .freezer
            .freeze(&self.id, self.deadline, journal, self.criu.clone())
            .await?;
        // Frozen, no process forks or exits: the tree holds still.
        let outside = outside_tree(&self.freezer, self.root)?;
        if !outside.is_empty() {
            // Thawed by the guard; CRIU, its pre-dump refused, lets go.
            drop(guard);
            let left_out = || Error::LeftOut {
                id: self.id.clone(),
                processes: describe(&outside),
            };
            *lock(&self.refused) = Some(left_out());
            return Err(left_out());
        }
        *lock(&self.guard) = Some(guard);
        if let Some(f) = lock(&self.on_frozen).take() {
            f();
        }
        Ok(())
    }

    /// Why [`freeze`](Self::freeze) refused the dump, if it did (once).
    pub fn refusal(&self) -> Option<Error> {
        lock(&self.refused).take()
    }

    pub fn is_frozen(&self) -> bool {
        lock(&self.guard).is_some()
    }

    /// Thaws now, staying armed (see [`FreezeGuard::thaw_now`]).
    pub fn thaw_now(&self) {
        if let Some(g) = lock(&self.guard).as_ref() {
            g.thaw_now();
        }
    }

    /// Thaws for good, the first time; returns how long the container was
    /// frozen by us, and whether it was paused already (then it stays paused).
    /// Called as soon as CRIU is done, and again by whoever reports it.
    pub fn finish(&self) -> Result<(Duration, bool)> {
        let mut done = lock(&self.finished);
        if let Some(d) = *done {
            return Ok(d);
        }
        let d = match lock(&self.guard).take() {
            Some(g) => {
                let paused = g.was_paused();
                (g.thaw()?, paused)
            }
            None => (Duration::ZERO, false),
        };
        *done = Some(d);
        Ok(d)
    }
}

/// Where the dumps of a pod's cut meet: each CRIU, once started and ready to
/// seize its container (its `pre-dump` stage), says so and waits; whoever
/// holds the other end freezes the whole pod when all are there, then opens
/// the gate (or calls the cut off). So no CRIU's start-up is in the pause.
#[derive(Clone)]
pub struct Gate {
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
    open: tokio::sync::watch::Receiver<Option<bool>>,
}

/// The other end of a [`Gate`]: arrivals, and the verdict to send
/// (`Some(true)`: frozen, go on; `Some(false)`: called off).
pub type GateKeeper = (
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::watch::Sender<Option<bool>>,
);

impl Gate {
    pub fn new() -> (Gate, GateKeeper) {
        let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
        let (verdict, open) = tokio::sync::watch::channel(None);
        (Gate { arrived, open }, (arrivals, verdict))
    }

    async fn pass(&self) -> Result<()> {
        let _ = self.arrived.send(());
        let mut open = self.open.clone();
        match open.wait_for(Option::is_some).await.map(|v| *v) {
            Ok(Some(true)) => Ok(()),
            _ => Err(Error::Other("the pod's cut was called off".into())),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Thaws on drop unless the container was paused before we came.
///
/// CRIU, given a pre-frozen cgroup, writes FROZEN back when it finishes, also when
/// it aborts. So if the guard is dropped while CRIU still runs, it thaws at once
/// (CRIU must never wait on a frozen task) and thaws again once CRIU has exited.
#[derive(Debug)]
pub struct FreezeGuard {
    freezer: Freezer,
    thaw: bool,
    frozen_at: Instant,
    criu: CriuWatch,
    /// Removed only once the cgroup is thawed for good.
    journal: Option<JournalEntry>,
}

/// How long a dropped guard waits for CRIU to exit before its final thaw.
const CRIU_EXIT_WAIT: Duration = Duration::from_secs(60);

impl FreezeGuard {
    /// Where to register the CRIU process (see [`super::watch::watch_pid`]).
    pub fn criu_watch(&self) -> CriuWatch {
        self.criu.clone()
    }

    /// Thaws now but stays armed: dropping it thaws again.
    pub fn thaw_now(&self) {
        if self.thaw {
            if let Err(e) = self.freezer.request(false) {
                tracing::error!(cgroup = %self.freezer.path().display(), "failed to thaw: {e}");
            }
        }
    }

    /// Was the container paused already (and so stays paused)?
    pub fn was_paused(&self) -> bool {
        !self.thaw
    }

    /// Thaws now; returns how long the container was frozen by us.
    pub fn thaw(mut self) -> Result<Duration> {
        let held = self.frozen_at.elapsed();
        if std::mem::take(&mut self.thaw) {
            self.freezer.request(false)?;
        }
        Ok(held)
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        self.thaw_now();
        if !self.thaw {
            // Not ours to thaw: CRIU stays registered for whoever froze it.
            return;
        }
        let criu = self.criu.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pidfd) = criu {
            // CRIU may still re-freeze the cgroup as it ends: thaw again after
            // it exits, and only then forget the journal entry.
            let freezer = self.freezer.clone();
            let journal = self.journal.take();
            std::thread::spawn(move || {
                wait_exit(&pidfd, CRIU_EXIT_WAIT);
                if let Err(e) = freezer.request(false) {
                    tracing::error!(cgroup = %freezer.path().display(), "failed to thaw after CRIU exited: {e}");
                }
                drop(journal);
            });
        }
    }
}

fn read_trim(p: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(p)
        .ctx(|| format!("read {}", p.display()))?
        .trim()
        .to_string())
}
