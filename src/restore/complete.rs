//! A lazily restored container's memory, made whole before anything reads
//! it to checkpoint it.
//!
//! Until its page source has put every page in, a lazy restore's memory is
//! partly where CRIU would never look: a page neither pushed nor faulted on
//! is not present, and a dump takes only present pages (`/proc/PID/pagemap`),
//! so an archive of it would hold zeros there. So a checkpoint of a restored
//! container first asks its page source to push the rest at once, past the
//! node's push slots and the restores in flight (a file, [`HURRY`], in the
//! restore's work dir, which the pusher looks for whenever it would wait),
//! and waits, within the checkpoint's deadline, for the page source's mark
//! that every page is in ([`DONE`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::source::Plan;
use super::stage::Staged;
use crate::error::{Error, Result};

/// In a served restore's work dir: push every page now.
pub const HURRY: &str = "push-now";
/// In a served restore's work dir: every page is in.
pub const DONE: &str = "pages-in";

/// How often the checkpoint looks for [`DONE`].
const POLL: Duration = Duration::from_millis(20);

/// Waits until container `id`'s memory is all in place, if it is a lazy
/// restore under `root` whose page source is still at work; an error at
/// `deadline`, or if the page source failed (its container is then killed).
pub fn before_checkpoint(root: &Path, id: &str, deadline: Instant) -> Result<()> {
    let Some(s) = Staged::find(root, id) else {
        return Ok(());
    };
    if Plan::read(&s.dir)?.is_none_or(|p| p.full) || s.work().join(DONE).exists() {
        return Ok(());
    }
    if let Err(e) = crate::safefs::create_new(&s.work().join(HURRY), 0o600) {
        if !s.work().join(HURRY).exists() {
            return Err(e);
        }
    }
    tracing::info!(container = %id, "its lazy restore's pages are not all in: pushing the rest before the checkpoint");
    let log = s.lazy_log();
    while !s.work().join(DONE).exists() {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(failed) = said
            .lines()
            .find(|l| l.starts_with(super::lazy_serve::FAILED))
        {
            return Err(Error::PagesMissing {
                id: id.to_string(),
                why: failed.to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::DeadlineExceeded("putting a lazy restore's pages in"));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served restore of container `id` under `root`, as CreateContainer
    /// stages it (lazy unless `full`), its page source started.
    fn staged(root: &Path, id: &str, full: bool) -> std::path::PathBuf {
        let dir = root.join(id);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::write(dir.join("restore.json"), "{}").unwrap();
        let plan = Plan {
            archive: "/a.tar".into(),
            pages: Default::default(),
            full,
            push_slots: None,
        };
        std::fs::write(
            dir.join(super::super::source::PLAN),
            serde_json::to_vec(&plan).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("work/lazy-serve.log"), "lazy-serve: ready\n").unwrap();
        dir.join("work")
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(100)
    }

    #[test]
    fn only_a_lazy_restore_still_at_work_is_waited_for() {
        let root = tempfile::tempdir().unwrap();
        // Not a restore, a full one, and a lazy one whose pages are in.
        assert!(before_checkpoint(root.path(), "plain", soon()).is_ok());
        staged(root.path(), "full", true);
        assert!(before_checkpoint(root.path(), "full", soon()).is_ok());
        let work = staged(root.path(), "done", false);
        std::fs::write(work.join(DONE), "").unwrap();
        assert!(before_checkpoint(root.path(), "done", soon()).is_ok());
        assert!(
            !work.join(HURRY).exists(),
            "nothing asked of a finished one"
        );
    }

    #[test]
    fn a_lazy_restore_is_hurried_and_waited_for_until_its_pages_are_in() {
        let root = tempfile::tempdir().unwrap();
        let work = staged(root.path(), "lazy", false);
        let page_source = {
            let work = work.clone();
            std::thread::spawn(move || {
                while !work.join(HURRY).exists() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::fs::write(work.join(DONE), "").unwrap();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        before_checkpoint(root.path(), "lazy", deadline).unwrap();
        assert!(work.join(DONE).exists());
        page_source.join().unwrap();
    }

    #[test]
    fn a_page_source_that_failed_or_never_finishes_fails_the_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        staged(root.path(), "slow", false);
        let e = before_checkpoint(root.path(), "slow", soon()).unwrap_err();
        assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
        let work = staged(root.path(), "failed", false);
        std::fs::write(
            work.join("lazy-serve.log"),
            "lazy-serve: failed after 9 ms: the archive is short\n",
        )
        .unwrap();
        let e = before_checkpoint(root.path(), "failed", soon()).unwrap_err();
        assert!(matches!(e, Error::PagesMissing { .. }), "{e}");
        assert!(e.to_string().contains("the archive is short"), "{e}");
    }
}
