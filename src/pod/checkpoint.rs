//! CheckpointPod's cut: every selected container is set up (archive target,
//! staging, CRIU's options), then all are frozen, then each is dumped (in
//! parallel up to a limit), and only once the last dump has ended are all
//! thawed; their archives are built after, while the pod runs again. On any
//! error, the deadline or cancellation, everything is thawed at once and all
//! that was written goes with the staging dir.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::manifest::{self, ContainerEntry, Manifest};
use super::output::Staging;
use crate::checkpoint::freeze::{FreezeGuard, Freezer, Gate, GateKeeper};
use crate::checkpoint::journal::JournalEntry;
use crate::checkpoint::locate::Container;
use crate::checkpoint::sink::Cancelled;
use crate::checkpoint::watch::CriuWatch;
use crate::checkpoint::{self, Captured, Options, Report, Setup};
use crate::error::{Error, Result};

/// A validated CheckpointPod: what to cut, where, how.
pub struct Plan {
    pub sandbox: manifest::Sandbox,
    /// The selected containers, each with its CRI name, in request order.
    pub containers: Vec<(String, Container)>,
    pub output: PathBuf,
    /// Every container's options; the location is set per container.
    pub base: Options,
    pub journal: Option<PathBuf>,
    /// How many CRIUs dump at once.
    pub parallel: usize,
}

/// What a pod checkpoint did.
#[derive(Debug)]
pub struct PodReport {
    pub dir: PathBuf,
    /// From the first freeze to the last thaw: the longest any container waited.
    pub pause: Duration,
    pub containers: Vec<Report>,
}

pub async fn run(plan: Plan, mut cancelled: Cancelled) -> Result<PodReport> {
    let deadline = plan.base.deadline.expect("a pod checkpoint has a deadline");
    let staging = Staging::new(&plan.output, plan.journal.as_deref())?;
    let mut setups = setup_all(&plan, &staging).await?;
    // Each container's CRIU is registered where its freeze guard looks.
    let watches: Vec<CriuWatch> = setups
        .iter_mut()
        .map(|s| {
            let w = CriuWatch::default();
            s.share_criu(w.clone());
            w
        })
        .collect();
    let targets = Targets {
        containers: &plan.containers,
        watches: &watches,
        journal: plan.journal.as_deref(),
        deadline,
    };
    let (captured, cut) = if plan.parallel >= setups.len() {
        cut_at_pre_dump(setups, &targets, &mut cancelled).await
    } else {
        let cut = Cut::freeze(&targets).await?;
        let captured = dump_all(
            setups,
            Some(cut),
            None,
            plan.parallel,
            &targets,
            &mut cancelled,
        )
        .await;
        (captured.0, captured.1)
    };
    let thawed = cut.map(Cut::thaw).transpose();
    let captured = captured?;
    let (pause, at) = thawed?.ok_or_else(|| Error::Other("the pod was never frozen".into()))?;
    let reports = finish_all(captured, &cancelled).await?;
    check(deadline, &cancelled, "writing the manifest")?;
    let m = manifest_of(&plan, &reports, &at);
    let (output, durable) = (plan.output.clone(), plan.base.durable);
    let dir = tokio::task::spawn_blocking(move || staging.commit(&m, &output, durable))
        .await
        .map_err(|e| Error::Other(format!("commit task: {e}")))??;
    Ok(PodReport {
        dir,
        pause,
        containers: reports,
    })
}

/// What the cut freezes, and under what budget.
struct Targets<'a> {
    containers: &'a [(String, Container)],
    watches: &'a [CriuWatch],
    journal: Option<&'a std::path::Path>,
    deadline: Instant,
}

/// The cut when every CRIU runs at once: each starts and waits at its
/// `pre-dump` stage; once all are there, the pod is frozen and they go on.
/// So the pause holds no CRIU start-up, only the dumps themselves.
async fn cut_at_pre_dump(
    mut setups: Vec<Setup>,
    t: &Targets<'_>,
    cancelled: &mut Cancelled,
) -> (Result<Vec<Captured>>, Option<Cut>) {
    let (gate, keeper) = Gate::new();
    for s in &mut setups {
        s.gate(gate.clone());
    }
    drop(gate);
    let n = setups.len();
    dump_all(setups, None, Some(keeper), n, t, cancelled).await
}

/// Step 1 for each container: its archive `<id>.tar` in the staging dir, and
/// CRIU's own staging beside the pod's, inside `output_path` too.
async fn setup_all(plan: &Plan, staging: &Staging) -> Result<Vec<Setup>> {
    let setups = plan.containers.iter().map(|(_, c)| {
        let mut o = plan.base.clone();
        o.location = staging.path().join(archive_name(c));
        o.staging_dir = Some(plan.output.clone());
        async move { checkpoint::setup(c, &o).await }
    });
    futures_util::future::try_join_all(setups).await
}

fn archive_name(c: &Container) -> String {
    format!("{}.tar", c.id)
}

/// Every selected container frozen, each behind a guard that thaws it on
/// every path.
struct Cut {
    guards: Vec<FreezeGuard>,
    started: Instant,
    /// When the last container was frozen: the instant the checkpoint shows.
    at: String,
}

impl Cut {
    async fn freeze(t: &Targets<'_>) -> Result<Cut> {
        let started = Instant::now();
        let freezes = t
            .containers
            .iter()
            .zip(t.watches)
            .map(|((_, c), w)| async move {
                let f = Freezer::for_pid(c.pid)?;
                let note = match t.journal {
                    Some(j) => Some(JournalEntry::record(j, &f)?),
                    None => None,
                };
                f.freeze(&c.id, t.deadline, note, w.clone()).await
            });
        // One container failing to freeze drops (thaws) the others' guards.
        let guards = futures_util::future::join_all(freezes)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        Ok(Cut {
            guards,
            started,
            at,
        })
    }

    /// Thaws every container now; the guards stay armed for the final thaw.
    fn thaw_now(&self) {
        self.guards.iter().for_each(FreezeGuard::thaw_now);
    }

    /// Thaws every container (a failing one does not stop the rest); the
    /// pause, and the time of the cut.
    fn thaw(self) -> Result<(Duration, String)> {
        let mut first_err = None;
        for g in self.guards {
            if let Err(e) = g.thaw() {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((self.started.elapsed(), self.at)),
        }
    }
}

/// Steps 2 and 3 for every container, `parallel` at a time: under `cut`,
/// taken already, or with `keeper`, the cut taken once every dump waits at
/// the gate. Each CRIU finds its container frozen and leaves it so. The first
/// failure thaws the pod and stops the other dumps; so do the deadline and
/// the caller's cancellation. Returns the dumps and the cut, if taken.
async fn dump_all(
    setups: Vec<Setup>,
    cut: Option<Cut>,
    keeper: Option<GateKeeper>,
    parallel: usize,
    t: &Targets<'_>,
    cancelled: &mut Cancelled,
) -> (Result<Vec<Captured>>, Option<Cut>) {
    let n = setups.len();
    let (stop, stopped) = tokio::sync::watch::channel(());
    let dumps: Vec<_> = setups
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut stopped = stopped.clone();
            async move { (i, s.dump(&mut stopped).await) }
        })
        .collect();
    let mut dumps = futures_util::stream::iter(dumps).buffer_unordered(parallel);
    let (mut arrivals, verdict) = keeper.map_or((None, None), |(a, v)| (Some(a), Some(v)));
    let mut p = Progress {
        cut,
        verdict,
        stop: Some(stop),
        failed: None,
        arrived: 0,
    };
    let mut done = Vec::new();
    loop {
        tokio::select! {
            Some(()) = async { arrivals.as_mut()?.recv().await }, if p.failed.is_none() => {
                p.arrived += 1;
                if p.arrived == n {
                    arrivals = None;
                    p.take_cut(t).await;
                }
            }
            next = dumps.next() => match next {
                None => break,
                Some((i, Ok(c))) => done.push((i, c)),
                Some((_, Err(e))) => p.fail(e, true),
            },
            // The dumps under way see the deadline too, and fail with it.
            _ = tokio::time::sleep_until(t.deadline.into()), if p.failed.is_none() => {
                p.fail(Error::DeadlineExceeded("the pod's dumps"), false);
            }
            r = cancelled.changed(), if p.stop.is_some() => if r.is_err() {
                p.fail(Error::Cancelled, true);
            }
        }
    }
    if let Some(e) = p.failed {
        return (Err(e), p.cut);
    }
    done.sort_by_key(|(i, _)| *i);
    (Ok(done.into_iter().map(|(_, c)| c).collect()), p.cut)
}

/// Where the dumps of a cut stand: the cut once taken, the gate's verdict
/// still to give, the stop for the dumps, the first failure.
struct Progress {
    cut: Option<Cut>,
    verdict: Option<tokio::sync::watch::Sender<Option<bool>>>,
    stop: Option<tokio::sync::watch::Sender<()>>,
    failed: Option<Error>,
    arrived: usize,
}

impl Progress {
    /// Every dump waits at the gate: freeze the pod and let them go on.
    async fn take_cut(&mut self, t: &Targets<'_>) {
        match Cut::freeze(t).await {
            Ok(c) => {
                self.cut = Some(c);
                if let Some(v) = self.verdict.take() {
                    v.send_replace(Some(true));
                }
            }
            Err(e) => self.fail(e, true),
        }
    }

    /// Notes the first failure, thaws the pod now, sends the dumps waiting at
    /// the gate away, and (`stop`) stops those under way.
    fn fail(&mut self, e: Error, stop: bool) {
        self.failed.get_or_insert(e);
        if stop {
            self.stop.take();
        }
        self.cut.iter().for_each(Cut::thaw_now);
        if let Some(v) = self.verdict.take() {
            v.send_replace(Some(false));
        }
    }
}

/// Steps 4 and 5 for every container, all at once; then their CRIU stagings
/// are removed before the answer, so nothing but the checkpoint remains.
async fn finish_all(captured: Vec<Captured>, cancelled: &Cancelled) -> Result<Vec<Report>> {
    let results =
        futures_util::future::join_all(captured.into_iter().map(|c| c.finish(cancelled))).await;
    let mut reports = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(mut rep) => {
                let cleanup = std::mem::take(&mut rep.cleanup);
                let _ = tokio::task::spawn_blocking(move || cleanup.wait()).await;
                reports.push(rep);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

fn manifest_of(plan: &Plan, reports: &[Report], at: &str) -> Manifest {
    let containers = plan
        .containers
        .iter()
        .zip(reports)
        .map(|((name, c), r)| ContainerEntry {
            name: name.clone(),
            id: c.id.clone(),
            image: c.image_name.clone().unwrap_or_default(),
            image_ref: c.image_ref.clone().unwrap_or_default(),
            archive: r
                .location
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| archive_name(c)),
        })
        .collect();
    Manifest {
        kind: manifest::KIND.into(),
        version: manifest::VERSION,
        checkpointed_at: at.into(),
        sandbox: plan.sandbox.clone(),
        containers,
        sealed: plan.base.seal.is_some(),
    }
}

fn check(deadline: Instant, cancelled: &Cancelled, phase: &'static str) -> Result<()> {
    if cancelled.has_changed().is_err() {
        return Err(Error::Cancelled);
    }
    if Instant::now() >= deadline {
        return Err(Error::DeadlineExceeded(phase));
    }
    Ok(())
}
