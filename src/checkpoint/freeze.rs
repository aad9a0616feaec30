//! Step 2: freeze the container's cgroup ourselves, polling about every millisecond
//! (CRIU's own wait sleeps in 100 ms steps), behind a guard that thaws on every
//! path: error, deadline, cancellation (drop) and panic (unwind).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::mountinfo;

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
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ctx(|| format!("read /proc/{pid}/cgroup"))?;
        let host = mountinfo::read(std::process::id() as i32)?;
        let mut v2 = None;
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (
                parts.next(),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            if controllers.split(',').any(|c| c == "freezer") {
                if let Some(m) = host.iter().find(|m| {
                    m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "freezer")
                }) {
                    return Ok(Freezer::V1(join_cgroup(&m.mount_point, &m.root, path)));
                }
            } else if controllers.is_empty() {
                if let Some(m) = host.iter().find(|m| m.fs_type == "cgroup2") {
                    v2 = Some(Freezer::V2(join_cgroup(&m.mount_point, &m.root, path)));
                }
            }
        }
        v2.ok_or_else(|| Error::Other(format!("no freezer cgroup found for pid {pid}")))
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

    fn request(&self, frozen: bool) -> Result<()> {
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

    /// Where to register the CRIU process (see [`watch_pid`]).
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

/// A pidfd of the CRIU working on this cgroup, set once it is spawned.
pub type CriuWatch = Arc<Mutex<Option<OwnedFd>>>;

/// How long a dropped guard waits for CRIU to exit before its final thaw.
const CRIU_EXIT_WAIT: Duration = Duration::from_secs(60);

impl FreezeGuard {
    /// Where to register the CRIU process (see [`watch_pid`]).
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

/// A note on disk, removed when dropped, for [`recover`] after a crash: that we
/// froze a cgroup ([`record`](Self::record)), or that a staging dir is in use
/// ([`staging`](Self::staging)).
#[derive(Debug)]
pub struct JournalEntry(PathBuf);

impl JournalEntry {
    /// Written before freezing and removed once the cgroup is thawed for good. If
    /// the shim dies in between (SIGKILL skips every guard) and CRIU, aborting,
    /// re-freezes the cgroup it found frozen, the restarted shim thaws it.
    pub fn record(dir: &Path, freezer: &Freezer) -> Result<JournalEntry> {
        let (kind, cg) = match freezer {
            Freezer::V1(p) => ("v1", p),
            Freezer::V2(p) => ("v2", p),
        };
        // One entry per cgroup: checkpoints of one container are serialised.
        Self::write(dir, cg, "frozen", &format!("{kind} {}\n", cg.display()))
    }

    /// Kept from the staging dir's creation until it is removed: a shim that dies
    /// at any point (during the dump, or after the thaw while it builds the
    /// archive) leaves its staging, with images or an unfinished archive inside,
    /// for [`recover`] to remove.
    pub fn staging(dir: &Path, staging: &Path) -> Result<JournalEntry> {
        Self::write(
            dir,
            staging,
            "staging",
            &format!("staging {}\n", staging.display()),
        )
    }

    /// The entry `<hash of key>.<kind>` in `dir`, holding `text`.
    fn write(dir: &Path, key: &Path, kind: &str, text: &str) -> Result<JournalEntry> {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let name = format!("{:016x}.{kind}", fnv1a(key.as_os_str().as_encoded_bytes()));
        let path = dir.join(name);
        std::fs::write(&path, text).ctx(|| format!("write {}", path.display()))?;
        Ok(JournalEntry(path))
    }
}

impl Drop for JournalEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Thaws every cgroup a previous shim left recorded as frozen by it, removes its
/// staging dir, and forgets the entry. Returns the cgroups it thawed.
pub fn recover(dir: &Path) -> Vec<PathBuf> {
    let mut thawed = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            let freezer = match line.split_once(' ') {
                Some(("v1", p)) => Freezer::V1(PathBuf::from(p)),
                Some(("v2", p)) => Freezer::V2(PathBuf::from(p)),
                Some(("staging", p)) => {
                    let p = Path::new(p);
                    if p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".ckpt-shim-staging-"))
                    {
                        let _ = std::fs::remove_dir_all(p);
                    }
                    continue;
                }
                _ => continue,
            };
            // A cgroup that is gone (container removed) needs nothing.
            if freezer.path().exists() && freezer.request(false).is_ok() {
                thawed.push(freezer.path().to_path_buf());
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    thawed
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Registers `pid` (CRIU) in a watch slot, as a pidfd.
pub fn watch_pid(slot: &CriuWatch, pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor owned from here on.
        *slot.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
}

/// Waits (blocking) up to `timeout` for the process behind `pidfd` to exit.
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a pidfd polls readable when the process exits.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
}

/// The processes in `freezer`'s cgroup, or one below it, outside the tree
/// of `root`: (pid, comm). CRIU dumps the tree under the container's init,
/// so these would silently be left out of the checkpoint. In a pod that
/// shares one PID namespace, a process that daemonizes is reparented to the
/// pod's init (its pause), out of that tree, while it stays in the
/// container's cgroup; a process that `exec` started is the runtime's
/// child. Read while frozen, so that nothing forks or exits meanwhile.
pub fn outside_tree(freezer: &Freezer, root: i32) -> Result<Vec<(i32, String)>> {
    let tree = tree_of(root);
    let mut procs = Vec::new();
    cgroup_procs(freezer.path(), &mut procs)?;
    procs.sort_unstable();
    procs.dedup();
    Ok(procs
        .into_iter()
        .filter(|p| !tree.contains(p) && super::locate::process_alive(*p))
        .map(|p| (p, comm(p)))
        .collect())
}

/// `root` and its descendants, through every thread's `children`, as CRIU
/// walks them.
fn tree_of(root: i32) -> std::collections::HashSet<i32> {
    let mut tree = std::collections::HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter();
        for t in tasks.flatten().flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if tree.insert(child) {
                    todo.push(child);
                }
            }
        }
    }
    tree
}

/// Every pid in `dir`'s `cgroup.procs` and in those of the cgroups below it.
fn cgroup_procs(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    let procs = read_trim(&dir.join("cgroup.procs"))?;
    out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for e in std::fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
        let e = e.ctx(|| format!("list {}", dir.display()))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            cgroup_procs(&e.path(), out)?;
        }
    }
    Ok(())
}

/// Its command name, and its pid in its own PID namespace where that differs.
fn comm(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let inner = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .filter(|p| *p != pid.to_string());
    match inner {
        Some(p) => format!("{comm}, pid {p} in the container"),
        None => comm,
    }
}

/// "pid 4711 (httpd, pid 9 in the container), pid 4712 (nc, …)".
fn describe(procs: &[(i32, String)]) -> String {
    let each: Vec<String> = procs
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect();
    each.join(", ")
}

fn join_cgroup(mount_point: &Path, mount_root: &str, path: &str) -> PathBuf {
    // A cgroup namespace or a bind of a sub-hierarchy shows a mount root other than "/".
    let rel = path
        .strip_prefix(mount_root)
        .filter(|_| mount_root != "/")
        .unwrap_or(path);
    mount_point.join(rel.trim_start_matches('/'))
}

fn read_trim(p: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(p)
        .ctx(|| format!("read {}", p.display()))?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_removes_a_noted_staging_dir_and_the_note() {
        let d = tempfile::tempdir().unwrap();
        let journal = d.path().join("frozen");
        let staging = d.path().join(".ckpt-shim-staging-abc");
        std::fs::create_dir_all(staging.join("checkpoint")).unwrap();
        std::fs::write(staging.join(".x.tar.1.ckpt-shim-tmp"), b"pages").unwrap();
        let other = d.path().join("not-staging");
        std::fs::create_dir(&other).unwrap();
        // A crash: the notes are never dropped.
        std::mem::forget(JournalEntry::staging(&journal, &staging).unwrap());
        std::mem::forget(JournalEntry::staging(&journal, &other).unwrap());
        assert_eq!(recover(&journal), Vec::<PathBuf>::new());
        assert!(!staging.exists(), "staging left");
        assert!(
            other.exists(),
            "only the shim's own staging dirs are removed"
        );
        assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
    }
}
