//! Served restores through CRI, on real CRIU, runc and containerd: the
//! pages stay in the archive and `ckpt-shim lazy-serve`, the restore's
//! lazy-pages daemon, puts them into the restored process. Lazily, the
//! process runs before its memory is in (its faults served first, the rest
//! pushed while the node's push slot allows); in full (the default),
//! StartContainer is answered once the shim has put every page in. Either
//! way no page is copied into the restore dir, the memory ends up whole (the
//! counter hashes it again), and the page source is gone on every path.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_shim::restore::slots::{Slot, Slots};
use common::cri::{Client, Env};
use common::out_dir;
use common::restore::{assert_continues, checkpoint_to, create, restore_config};
use k8s_cri::v1 as cri;

const MIB: u32 = 64;
/// Enough that CRIU's daemon is still pushing pages when the test acts.
const BIG_MIB: u32 = 384;

/// A counter touching `mib` MiB, checkpointed: (archive, counts before/after).
async fn checkpointed(env: &mut Env, c: &mut Client, dir: &Path, mib: u32) -> (PathBuf, u64, u64) {
    let pod = env.run_pod(c, "orig", false).await;
    let id = env.counter(c, &pod, "counter", mib, true).await;
    let archive = dir.join("checkpoint.tar");
    let (before, after) = checkpoint_to(env, c, &id, &archive).await;
    (archive, before, after)
}

/// CreateContainer + StartContainer of `archive` in a new pod, asking for a
/// lazy restore by annotation: (pod, container id).
async fn restore_lazily(
    env: &mut Env,
    c: &mut Client,
    name: &str,
    archive: &Path,
) -> ((String, cri::PodSandboxConfig), String) {
    restore_in_pod(env, c, name, archive, "true").await
}

/// The same, with `lazy` as the annotation's value.
async fn restore_in_pod(
    env: &mut Env,
    c: &mut Client,
    name: &str,
    archive: &Path,
    lazy: &str,
) -> ((String, cri::PodSandboxConfig), String) {
    let pod = env.run_pod(c, name, false).await;
    let mut cfg = restore_config(env, "restored", &archive.to_string_lossy());
    cfg.annotations
        .insert("io.ckpt-shim.lazy-pages".into(), lazy.into());
    let id = create(c, &pod, cfg).await.unwrap();
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", env.shim_log()));
    (pod, id)
}

/// Has the counter hash its memory again; what it found ("ok …" or "mismatch …").
fn verify_memory(env: &Env, id: &str) -> String {
    let root = env.rootfs(id);
    std::fs::write(root.join("tmp/verify"), "").unwrap();
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(root.join("tmp/verified")) {
            return s.trim().to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the counter never verified"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Has the counter hash its memory again, and checks it is what it was.
fn assert_memory_whole(env: &Env, id: &str) {
    let verdict = verify_memory(env, id);
    assert!(verdict.starts_with("ok "), "memory differs: {verdict}");
}

/// Processes whose command line mentions `what` (the page source of one restore).
fn processes_with(what: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(what))
        .collect()
}

fn wait_gone(what: &str, limit: Duration) {
    let t = Instant::now();
    while !processes_with(what).is_empty() {
        assert!(
            t.elapsed() < limit,
            "still running: {:?}",
            processes_with(what)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lazy_log(env: &Env, id: &str) -> String {
    std::fs::read_to_string(env.dir.join("restore").join(id).join("work/lazy-serve.log"))
        .unwrap_or_default()
}

/// Removes the restored container `id` (through the shim, which drops its
/// restore with it), then its pod.
async fn remove(c: &mut Client, id: &str, pod: &str) {
    c.stop_container(cri::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await
    .unwrap();
    c.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap();
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_restore_continues_and_gets_all_its_memory_from_the_archive() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let (pod, id) = restore_lazily(&mut env, &mut c, "lazy", &archive).await;
    let staged = env.dir.join("restore").join(&id);
    // Nothing of the pages was extracted: only CRIU's non-lazy pages are on disk.
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "lazy restore");
    assert_memory_whole(&env, &id);
    // Every page pushed, the page source ends by itself; the container runs on.
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    let served = lazy_log(&env, &id);
    assert!(served.contains(ALL_IN), "{served}");
    assert!(pushed_pages(&served) > 0, "{served}");
    env.assert_running(&mut c, &id).await;
    eprintln!("{served}");
    remove(&mut c, &id, &pod.0).await;
    assert!(!env.restores().contains(&id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_restore_removed_before_its_pages_are_in_leaves_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, _, _) = checkpointed(&mut env, &mut c, out.path(), BIG_MIB).await;
    let (pod, id) = restore_lazily(&mut env, &mut c, "gone", &archive).await;
    let staged = env.dir.join("restore").join(&id);
    // Usually still pushing pages here (384 MiB); either way nothing may stay.
    let serving = processes_with(&staged.to_string_lossy()).len();
    eprintln!("page source processes at removal: {serving}");
    remove(&mut c, &id, &pod.0).await;
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
    assert!(!env.restores().contains(&id));
}

/// The same while its page source waits for a push slot (every one held):
/// it ends with its process, nothing of the restore stays, though the slots
/// are never let go.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_restore_removed_while_waiting_for_a_push_slot_leaves_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let slots = hold_push_slots(&env);
    let (pod, id) = restore_lazily(&mut env, &mut c, "gone-waiting", &archive).await;
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "waiting for a slot");
    let staged = env.dir.join("restore").join(&id);
    assert!(!processes_with(&staged.to_string_lossy()).is_empty());
    remove(&mut c, &id, &pod.0).await;
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(30));
    assert!(!env.restores().contains(&id));
    drop(slots);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shim_killed_during_a_lazy_restore_leaves_it_whole() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), BIG_MIB).await;
    let (pod, id) = restore_lazily(&mut env, &mut c, "kill", &archive).await;
    // The page source is not the shim's: SIGKILL the shim at once, start it again.
    env.kill_shim();
    env.spawn_shim();
    let mut c = env.client().await;
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "after a shim restart");
    assert_memory_whole(&env, &id);
    let staged = env.dir.join("restore").join(&id);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    env.assert_running(&mut c, &id).await;
    remove(&mut c, &id, &pod.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_cut_in_its_pages_is_refused_before_anything_runs() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, _, _) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    // Cut inside pages-1.img's data, keeping the members after it out.
    let cut = out.path().join("cut.tar");
    let bytes = std::fs::read(&archive).unwrap();
    let pages_at = find_member(&bytes, "checkpoint/pages-1.img").expect("pages-1.img");
    std::fs::write(&cut, &bytes[..pages_at + ((MIB as usize) << 19)]).unwrap();
    let pod = env.run_pod(&mut c, "cut", false).await;
    let mut cfg = restore_config(&env, "restored", &cut.to_string_lossy());
    cfg.annotations
        .insert("io.ckpt-shim.lazy-pages".into(), "true".into());
    let err = create(&mut c, &pod, cfg).await.unwrap_err();
    assert!(
        err.message().contains("truncated") || err.message().contains("archive"),
        "{err:?}"
    );
    assert!(env.restores().iter().all(|r| r.starts_with('.')) || env.restores().is_empty());
    assert!(processes_with("lazy-serve")
        .iter()
        .all(|p| !p.contains(&env.dir.to_string_lossy().into_owned())));
}

/// Where member `name`'s data starts in a tar.
fn find_member(tar: &[u8], name: &str) -> Option<usize> {
    let mut ar = tar::Archive::new(std::io::Cursor::new(tar));
    for e in ar.entries().ok()? {
        let e = e.ok()?;
        if e.path().ok()?.to_string_lossy() == name {
            return Some(e.raw_file_position() as usize);
        }
    }
    None
}

/// A counter checkpointed and imported into containerd as checkpoint image
/// `localhost/<tag>`; the archive is removed, so the pages can only come from
/// containerd's content store. Returns the counts around the checkpoint.
async fn checkpoint_image(env: &mut Env, c: &mut Client, tag: &str) -> (u64, u64) {
    let out = out_dir();
    let (archive, before, after) = checkpointed(env, c, out.path(), MIB).await;
    let sock = env.containerd_sock.to_string_lossy().into_owned();
    common::run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_ckpt-shim")).args([
            "image",
            archive.to_str().unwrap(),
            tag,
            "--import",
            &sock,
        ]),
    );
    std::fs::remove_file(&archive).unwrap();
    (before, after)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_image_restores_lazily_from_its_layer_in_place() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let (before, after) = checkpoint_image(&mut env, &mut c, "lazy-ckpt:1").await;
    let image = Path::new("localhost/lazy-ckpt:1");
    let (pod, id) = restore_lazily(&mut env, &mut c, "from-image", image).await;
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(
        &env,
        &id,
        &log,
        (before, after),
        "lazy restore from an image",
    );
    assert_memory_whole(&env, &id);
    let staged = env.dir.join("restore").join(&id);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    let served = lazy_log(&env, &id);
    assert!(served.contains(ALL_IN), "{served}");
    assert!(
        env.shim_log().contains("content store"),
        "{}",
        env.shim_log()
    );
    remove(&mut c, &id, &pod.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_cut_before_start_fails_the_start_and_leaves_nothing_running() {
    cut_before_start(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_cut_before_a_full_start_fails_it_and_leaves_nothing_running() {
    cut_before_start(false).await;
}

/// Stages a restore (lazy or full), cuts the archive inside its pages, and
/// starts it: the start fails, nothing runs.
async fn cut_before_start(lazy: bool) {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, _, _) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let pod = env.run_pod(&mut c, "cut-later", false).await;
    let mut cfg = restore_config(&env, "restored", &archive.to_string_lossy());
    cfg.annotations
        .insert("io.ckpt-shim.lazy-pages".into(), lazy.to_string());
    let id = create(&mut c, &pod, cfg).await.unwrap();
    // Staged without the pages: a few KiB on disk for 64 MiB of memory.
    let staged = env.dir.join("restore").join(&id);
    let written = disk_bytes(&staged);
    assert!(written < 1 << 20, "{written} bytes staged");
    eprintln!("staged on disk: {written} bytes");
    // Checked and staged; then the archive loses its pages' second half.
    let bytes = std::fs::read(&archive).unwrap();
    let pages_at = find_member(&bytes, "checkpoint/pages-1.img").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&archive)
        .unwrap()
        .set_len((pages_at + ((MIB as usize) << 19)) as u64)
        .unwrap();
    let err = c
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("pages"), "{err:?}");
    assert_ne!(
        env.state(&mut c, &id).await,
        cri::ContainerState::ContainerRunning
    );
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
}

/// Takes every background push slot of the test node (as another restore's
/// push in flight would hold one): no page source pushes in the background
/// until they are dropped; faults and working sets go on.
fn hold_push_slots(env: &Env) -> Vec<Slot> {
    let slots = Slots::under(&env.dir.join("restore"), Slots::default_count());
    let held: Vec<Slot> = std::iter::from_fn(|| slots.try_take().unwrap()).collect();
    assert_eq!(held.len(), slots.count());
    held
}

/// Waits until `id`'s page source has logged `what`.
fn wait_logged(env: &Env, id: &str, what: &str) -> String {
    let t = Instant::now();
    loop {
        let log = lazy_log(env, id);
        if log.contains(what) {
            return log;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never {what:?}: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_source_that_cannot_serve_takes_the_container_with_it() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, _, _) = checkpointed(&mut env, &mut c, out.path(), BIG_MIB).await;
    let slots = hold_push_slots(&env);
    let (pod, id) = restore_lazily(&mut env, &mut c, "cut-mid-push", &archive).await;
    let staged = env.dir.join("restore").join(&id);
    // Running, its pages not pushed yet (no slot): the archive loses the
    // pages' second half, then the push may go on.
    env.assert_running(&mut c, &id).await;
    let bytes = std::fs::read(&archive).unwrap();
    let pages_at = find_member(&bytes, "checkpoint/pages-1.img").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&archive)
        .unwrap()
        .set_len((pages_at + ((BIG_MIB as usize) << 19)) as u64)
        .unwrap();
    drop(slots);
    // The container does not run on with memory it cannot get: it exits.
    let t = Instant::now();
    while env.state(&mut c, &id).await == cri::ContainerState::ContainerRunning {
        assert!(t.elapsed() < Duration::from_secs(20), "still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
    let log = lazy_log(&env, &id);
    assert!(log.contains("killing the restored process"), "{log}");
    assert!(!log.contains(ALL_IN), "{log}");
    remove(&mut c, &id, &pod.0).await;
}

/// A page source SIGKILLed mid-restore (the OOM killer, say) cannot answer
/// faults any more, and the kernel would fill them with zeros: its guard
/// kills the restored process instead, and the container exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_page_source_takes_the_container_with_it() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, _, _) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let slots = hold_push_slots(&env);
    let (pod, id) = restore_lazily(&mut env, &mut c, "killed", &archive).await;
    let staged = env.dir.join("restore").join(&id);
    env.assert_running(&mut c, &id).await;
    let source: Vec<nix::unistd::Pid> = pids_with(&staged.to_string_lossy())
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmd).contains("--guard")
        })
        .collect();
    assert_eq!(source.len(), 1, "one page source: {source:?}");
    nix::sys::signal::kill(source[0], nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    while env.state(&mut c, &id).await == cri::ContainerState::ContainerRunning {
        assert!(t.elapsed() < Duration::from_secs(20), "still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
    let log = lazy_log(&env, &id);
    assert!(log.contains("guard: the page source ended"), "{log}");
    drop(slots);
    remove(&mut c, &id, &pod.0).await;
}

/// Faults first: with every background push slot of the node taken (another
/// restore's push in flight), two lazy restores run and answer: the counter's
/// next lines, and one of them hashes all its memory through its own faults,
/// while the other's page source has not pushed in the background (it is not
/// done). Then the slots are let go: every page of both arrives, both hashes
/// match.
#[tokio::test(flavor = "multi_thread")]
async fn faults_are_answered_while_another_restores_push_holds_the_node() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), BIG_MIB).await;
    let slots = hold_push_slots(&env);
    let a = restore_lazily(&mut env, &mut c, "first", &archive).await;
    let b = restore_lazily(&mut env, &mut c, "second", &archive).await;
    for (pod, id) in [&a, &b] {
        let log = Path::new(&pod.1.log_directory).join("restored.log");
        assert_continues(&env, id, &log, (before, after), "under another push");
    }
    assert_memory_whole(&env, &b.1);
    // Ordering, not time: the first one's page source is still waiting for
    // a slot, its pages not all in (the second's may be done: its hash
    // faulted every page in).
    let staged = env.dir.join("restore").join(&a.1);
    assert!(!processes_with(&staged.to_string_lossy()).is_empty());
    assert!(
        !lazy_log(&env, &a.1).contains(ALL_IN),
        "{}",
        lazy_log(&env, &a.1)
    );
    drop(slots);
    for (pod, id) in [&a, &b] {
        let staged = env.dir.join("restore").join(id);
        wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
        let served = lazy_log(&env, id);
        assert!(served.contains(ALL_IN), "{served}");
        assert!(pushed(&served, "slot_waits") > 0, "{served}");
        assert_memory_whole(&env, id);
        env.assert_running(&mut c, id).await;
        remove(&mut c, id, &pod.0).await;
    }
}

/// Restores first: while another restore is in flight on the node (marked as
/// ckpt-runc marks its own), a lazy restore still runs and answers, but its
/// page source copies nothing in the background, though it holds a push
/// slot. Once the other restore is done, every page arrives and the hash
/// matches.
#[tokio::test(flavor = "multi_thread")]
async fn background_pushes_wait_while_another_restore_is_in_flight() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let root = env.dir.join("restore");
    let other = ckpt_shim::restore::slots::restoring(&root).unwrap();
    let (pod, id) = restore_lazily(&mut env, &mut c, "behind-a-restore", &archive).await;
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "beside a restore");
    // Ordering, not time: its page source is there, not done.
    let staged = root.join(&id);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!processes_with(&staged.to_string_lossy()).is_empty());
    assert!(
        !lazy_log(&env, &id).contains(ALL_IN),
        "{}",
        lazy_log(&env, &id)
    );
    drop(other);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    let served = lazy_log(&env, &id);
    assert!(pushed(&served, "restore_waits") > 0, "{served}");
    assert_eq!(pushed(&served, "slot_waits"), 0, "{served}");
    assert_memory_whole(&env, &id);
    remove(&mut c, &id, &pod.0).await;
}

/// A lazily restored container checkpointed before its pages are all in (no
/// push slot: only what it faulted on is in memory) gives an archive with all
/// of its memory: the checkpoint has its page source push the rest first.
/// Restored from that archive, its hash matches (without the push first, it
/// did not: the pages never put in were left out of the dump). The second
/// restore also checks that a checkpoint of a restored container (in the time
/// namespace CRIU gives every restore) restores again.
#[tokio::test(flavor = "multi_thread")]
async fn a_lazy_restore_checkpointed_before_its_pages_are_in_keeps_all_its_memory() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let slots = hold_push_slots(&env);
    let (pod, id) = restore_lazily(&mut env, &mut c, "half-in", &archive).await;
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(
        &env,
        &id,
        &log,
        (before, after),
        "lazily, before a checkpoint",
    );
    assert!(
        !lazy_log(&env, &id).contains(ALL_IN),
        "{}",
        lazy_log(&env, &id)
    );
    let again = out.path().join("again.tar");
    let (before, after) = checkpoint_to(&env, &mut c, &id, &again).await;
    // Every page went in first, though every push slot is still held.
    let served = lazy_log(&env, &id);
    assert!(served.contains("asked to push every page now"), "{served}");
    assert!(served.contains(ALL_IN), "{served}");
    drop(slots);
    let (pod2, id2) = restore_in_pod(&mut env, &mut c, "from-half-in", &again, "false").await;
    let log2 = Path::new(&pod2.1.log_directory).join("restored.log");
    assert_continues(
        &env,
        &id2,
        &log2,
        (before, after),
        "from the second archive",
    );
    assert_memory_whole(&env, &id2);
    remove(&mut c, &id2, &pod2.0).await;
    remove(&mut c, &id, &pod.0).await;
}

/// A working set in the archive (`working-set.json`) survives the archive's
/// import as a checkpoint image and a lazy restore from it: its pages go in
/// first, with no push slot (every one is held), before anything else is
/// pushed; then every page arrives and the hash matches.
#[tokio::test(flavor = "multi_thread")]
async fn the_working_set_goes_in_first_after_an_image_round_trip() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let ws = add_working_set(&archive);
    let sock = env.containerd_sock.to_string_lossy().into_owned();
    common::run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_ckpt-shim")).args([
            "image",
            archive.to_str().unwrap(),
            "lazy-ws:1",
            "--import",
            &sock,
        ]),
    );
    std::fs::remove_file(&archive).unwrap();
    let slots = hold_push_slots(&env);
    let image = Path::new("localhost/lazy-ws:1");
    let (pod, id) = restore_lazily(&mut env, &mut c, "ws", image).await;
    let log = wait_logged(&env, &id, "working set in");
    assert!(!log.contains(ALL_IN), "{log}");
    drop(slots);
    let restored = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &restored, (before, after), "working set first");
    assert_memory_whole(&env, &id);
    let staged = env.dir.join("restore").join(&id);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    let served = lazy_log(&env, &id);
    assert_eq!(pushed(&served, "working_set_pages"), ws, "{served}");
    remove(&mut c, &id, &pod.0).await;
}

/// REAP's record: the pages the first lazy restore of an archive faulted on
/// before its push (here, with every push slot held, what the counter
/// touches to count on) are kept on the node, and the next lazy restore of
/// the same archive puts them in first, before any background copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_lazy_restore_puts_in_first_what_the_first_faulted_on() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let slots = hold_push_slots(&env);
    let first = restore_lazily(&mut env, &mut c, "first", &archive).await;
    let restored = Path::new(&first.0 .1.log_directory).join("restored.log");
    assert_continues(&env, &first.1, &restored, (before, after), "first restore");
    drop(slots);
    let log = wait_logged(&env, &first.1, "recorded a working set of");
    assert!(log.contains(ALL_IN), "{log}");
    assert_memory_whole(&env, &first.1);
    let slots = hold_push_slots(&env);
    let second = restore_lazily(&mut env, &mut c, "second", &archive).await;
    let log = wait_logged(&env, &second.1, "working set in (");
    assert!(!log.contains(ALL_IN), "{log}");
    drop(slots);
    let restored = Path::new(&second.0 .1.log_directory).join("restored.log");
    assert_continues(
        &env,
        &second.1,
        &restored,
        (before, after),
        "second restore",
    );
    assert_memory_whole(&env, &second.1);
    let staged = env.dir.join("restore").join(&second.1);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    let served = lazy_log(&env, &second.1);
    assert!(pushed(&served, "working_set_pages") > 0, "{served}");
    assert!(!served.contains("recorded a working set"), "{served}");
    for (pod, id) in [&first, &second] {
        remove(&mut c, id, &pod.0).await;
    }
}

/// The config's `lazy_push_slots` reaches the page sources: with the first of
/// two slots held, a lazy restore still gets every page in (through the
/// second), as it could not with one slot.
#[tokio::test(flavor = "multi_thread")]
async fn the_configured_push_slots_are_the_page_sources() {
    let mut env = Env::start_configured("lazy_push_slots = 2\n");
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), MIB).await;
    let one = Slots::under(&env.dir.join("restore"), 1);
    let first = one.try_take().unwrap().expect("slot 0");
    let (pod, id) = restore_lazily(&mut env, &mut c, "two-slots", &archive).await;
    let staged = env.dir.join("restore").join(&id);
    let plan = std::fs::read_to_string(staged.join("lazy.json")).unwrap();
    assert!(plan.contains("\"push_slots\": 2"), "{plan}");
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    assert!(
        lazy_log(&env, &id).contains(ALL_IN),
        "{}",
        lazy_log(&env, &id)
    );
    drop(first);
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "two slots");
    assert_memory_whole(&env, &id);
    remove(&mut c, &id, &pod.0).await;
}

/// Appends a `working-set.json` to `archive`: two runs of its counter's
/// largest lazy run, the later one first. Returns its pages.
fn add_working_set(archive: &Path) -> u64 {
    use ckpt_shim::restore::pagemap::Pagemap;
    use std::io::{Read, Seek};
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(archive)
        .unwrap();
    let (mut end, mut pagemap, mut pid) = (0, Vec::new(), String::new());
    for e in tar::Archive::new(&f).entries_with_seek().unwrap() {
        let mut e = e.unwrap();
        end = (e.raw_file_position() + e.size()).next_multiple_of(512);
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if let Some(p) = name.strip_prefix("checkpoint/pagemap-") {
            pid = p.trim_end_matches(".img").to_string();
            pagemap.clear();
            e.read_to_end(&mut pagemap).unwrap();
        }
    }
    let pm = Pagemap::parse(&pagemap).unwrap();
    let run = pm
        .runs
        .iter()
        .filter(|r| r.lazy())
        .max_by_key(|r| r.nr_pages)
        .unwrap();
    assert!(run.nr_pages > 200, "{run:?}");
    let (p, at) = (4096, run.vaddr);
    let json = format!(
        r#"{{"version":1,"processes":{{"{pid}":[[{},50],[{at},10]]}}}}"#,
        at + 100 * p
    );
    f.seek(std::io::SeekFrom::Start(end)).unwrap();
    let mut b = tar::Builder::new(f);
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, "working-set.json", json.as_bytes())
        .unwrap();
    b.into_inner().unwrap();
    60
}

/// The bytes `dir`'s files take on disk (allocated blocks, so holes are free).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            disk_bytes(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

/// How many pods restore one checkpoint image at once (scale-out).
const SCALE: usize = 4;

#[tokio::test(flavor = "multi_thread")]
async fn one_checkpoint_image_restores_lazily_into_several_pods_at_once() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let (before, after) = checkpoint_image(&mut env, &mut c, "lazy-scale:1").await;
    let mut pods = Vec::new();
    for i in 0..SCALE {
        pods.push(env.run_pod(&mut c, &format!("scale-{i}"), false).await);
    }
    // Every pod's CreateContainer + StartContainer at once, as a scale-out does.
    let mut calls = Vec::new();
    for pod in &pods {
        let mut cfg = restore_config(&env, "restored", "localhost/lazy-scale:1");
        cfg.annotations
            .insert("io.ckpt-shim.lazy-pages".into(), "true".into());
        let (mut c, pod) = (c.clone(), pod.clone());
        calls.push(tokio::spawn(async move {
            let id = create(&mut c, &pod, cfg).await?;
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            Ok::<_, tonic::Status>(id)
        }));
    }
    let mut ids = Vec::new();
    for call in calls {
        let id = call.await.unwrap();
        ids.push(id.unwrap_or_else(|e| panic!("{e:?}\n{}", env.shim_log())));
    }
    for (pod, id) in pods.iter().zip(&ids) {
        let log = Path::new(&pod.1.log_directory).join("restored.log");
        assert_continues(
            &env,
            id,
            &log,
            (before, after),
            "one of several lazy restores",
        );
        let verdict = verify_memory(&env, id);
        assert!(verdict.starts_with("ok "), "{id}: {verdict}");
    }
    // Each served from the one layer blob in containerd's content store.
    let in_place = env
        .shim_log()
        .matches("restoring from the layer in the runtime's content store")
        .count();
    assert!(in_place >= SCALE, "{}", env.shim_log());
    for (pod, id) in pods.iter().zip(&ids) {
        let staged = env.dir.join("restore").join(id);
        wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
        let served = lazy_log(&env, id);
        assert!(served.contains(ALL_IN), "{served}");
        env.assert_running(&mut c, id).await;
        remove(&mut c, id, &pod.0).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_restore_copies_no_page_and_has_all_its_memory_when_started() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (archive, before, after) = checkpointed(&mut env, &mut c, out.path(), BIG_MIB).await;
    let pod = env.run_pod(&mut c, "full", false).await;
    // No annotation: a full restore, the default.
    let cfg = restore_config(&env, "restored", &archive.to_string_lossy());
    let id = create(&mut c, &pod, cfg).await.unwrap();
    // The pages image is a hole as long as the pages: none of them copied.
    let staged = env.dir.join("restore").join(&id);
    let written = disk_bytes(&staged);
    assert!(
        written < 1 << 20,
        "{written} bytes staged for {BIG_MIB} MiB"
    );
    eprintln!("staged on disk for {BIG_MIB} MiB: {written} bytes");
    let pages = std::fs::metadata(staged.join("checkpoint/pages-1.img")).unwrap();
    assert!(pages.len() >= u64::from(BIG_MIB) << 20, "{pages:?}");
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", env.shim_log()));
    // Answered once every page was in: the page source has ended already.
    assert!(processes_with(&staged.to_string_lossy()).is_empty());
    let served = lazy_log(&env, &id);
    assert!(served.contains("every page in after"), "{served}");
    assert!(pushed_pages(&served) >= u64::from(BIG_MIB) << 8, "{served}");
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "full restore");
    assert_memory_whole(&env, &id);
    remove(&mut c, &id, &pod.0).await;
    assert!(!env.restores().contains(&id));
}

/// What a page source logs once every page is in.
const ALL_IN: &str = "lazy-serve: every page in after";

/// A count the page source logged with every page in (`pages`, `faults`, …).
fn pushed(log: &str, what: &str) -> u64 {
    log.split(ALL_IN)
        .nth(1)
        .and_then(|s| s.split(&format!(" {what}: ")).nth(1))
        .and_then(|s| s.split([',', ' ']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// How many pages the page source put in, from its log.
fn pushed_pages(log: &str) -> u64 {
    pushed(log, "pages")
}

/// A full restore of a fresh checkpoint into a new pod, its StartContainer
/// under way.
struct Starting {
    pod: (String, cri::PodSandboxConfig),
    id: String,
    start: tokio::task::JoinHandle<
        Result<tonic::Response<cri::StartContainerResponse>, tonic::Status>,
    >,
    /// The counter's count before and after its checkpoint.
    counts: (u64, u64),
}

async fn full_restore_starting(env: &mut Env, c: &mut Client, out: &Path, name: &str) -> Starting {
    let (archive, before, after) = checkpointed(env, c, out, BIG_MIB).await;
    let pod = env.run_pod(c, name, false).await;
    let cfg = restore_config(env, "restored", &archive.to_string_lossy());
    let id = create(c, &pod, cfg).await.unwrap();
    let mut c2 = c.clone();
    let start = tokio::spawn({
        let id = id.clone();
        async move {
            c2.start_container(cri::StartContainerRequest { container_id: id })
                .await
        }
    });
    Starting {
        pod,
        id,
        start,
        counts: (before, after),
    }
}

/// [`full_restore_starting`], returned once CRIU's restore is done and the
/// pages go in.
async fn full_restore_mid_push(env: &mut Env, c: &mut Client, out: &Path, name: &str) -> Starting {
    let s = full_restore_starting(env, c, out, name).await;
    let t = Instant::now();
    while !lazy_log(env, &s.id).contains("runc restore done") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}",
            lazy_log(env, &s.id)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_restore_whose_page_source_dies_fails_its_start_and_leaves_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    // Once the process is restored, while its pages go in: the page source dies.
    let Starting { id, start, .. } =
        full_restore_mid_push(&mut env, &mut c, out.path(), "full-dies").await;
    let staged = env.dir.join("restore").join(&id);
    let init = env.rootfs(&id).with_file_name("init.pid");
    let restored: i32 = std::fs::read_to_string(&init)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for p in pids_with(&staged.to_string_lossy()) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    }
    let answer = start.await.unwrap();
    if lazy_log(&env, &id).contains(ALL_IN) {
        eprintln!("every page was in before the page source could be killed; nothing to test");
        return;
    }
    let err = answer.unwrap_err();
    assert!(err.message().contains("pages"), "{err:?}");
    assert_ne!(
        env.state(&mut c, &id).await,
        cri::ContainerState::ContainerRunning
    );
    // Not left running on with holes in its memory.
    let t = Instant::now();
    while std::fs::read_to_string(format!("/proc/{restored}/stat"))
        .is_ok_and(|st| !st.contains(") Z "))
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the restored counter runs on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shim_killed_during_a_full_restore_leaves_it_whole() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let Starting {
        pod,
        id,
        start,
        counts: (before, after),
    } = full_restore_starting(&mut env, &mut c, out.path(), "full-kill").await;
    let staged = env.dir.join("restore").join(&id);
    // The page source runs: SIGKILL the shim, start it again.
    let t = Instant::now();
    while processes_with(&staged.to_string_lossy()).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "no page source");
        std::thread::sleep(Duration::from_millis(2));
    }
    env.kill_shim();
    let _ = start.await.unwrap();
    env.spawn_shim();
    let mut c = env.client().await;
    // containerd ends the start it was asked for: running, whole, or
    // exited, and then nothing of it is left.
    let t = Instant::now();
    let state = loop {
        let st = env.state(&mut c, &id).await;
        if st != cri::ContainerState::ContainerCreated {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never started nor failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "after the shim's restart: {state:?}\n{}",
        lazy_log(&env, &id)
    );
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    if state != cri::ContainerState::ContainerRunning {
        remove(&mut c, &id, &pod.0).await;
        assert!(!env.restores().contains(&id));
        return;
    }
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "after a shim restart");
    assert_memory_whole(&env, &id);
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(60));
    remove(&mut c, &id, &pod.0).await;
    assert!(!env.restores().contains(&id));
}

/// Pids of the processes whose command line mentions `what`.
fn pids_with(what: &str) -> Vec<nix::unistd::Pid> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .contains(what)
                .then_some(nix::unistd::Pid::from_raw(pid))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_restore_of_two_processes_puts_in_both_memories() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    // Two counters in one container: a shell's child, and the shell exec'd.
    let pod = env.run_pod(&mut c, "two", false).await;
    let mut cfg = common::cri::counter_config("counter", false);
    cfg.command = vec!["/bin/sh".into()];
    cfg.args = vec![
        "-c".into(),
        "/bin/counter /tmp/count2 32 50 & exec /bin/counter /tmp/count 64 50".into(),
    ];
    let orig = common::cri::create(&mut c, &pod, cfg).await;
    common::cri::start_container(&mut c, &orig).await;
    let root = env.rootfs(&orig);
    common::wait_count(&root, |v| v >= 3);
    let second = |root: &Path| {
        std::fs::read_to_string(root.join("tmp/count2"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let t = Instant::now();
    while second(&root).unwrap_or(0) < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the second counter never counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let archive = out.path().join("checkpoint.tar");
    let second_before = second(&root).unwrap();
    let (before, after) = checkpoint_to(&env, &mut c, &orig, &archive).await;
    let pod = env.run_pod(&mut c, "two-restored", false).await;
    let cfg = restore_config(&env, "restored", &archive.to_string_lossy());
    let id = create(&mut c, &pod, cfg).await.unwrap();
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", env.shim_log()));
    // Both processes' userfaultfds came, both memories went in.
    let served = lazy_log(&env, &id);
    assert!(served.contains("processes: 2,"), "{served}");
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(&env, &id, &log, (before, after), "the exec'd counter");
    // The child's count lives in its memory: it goes on from where it was,
    // never from 0.
    let root = env.rootfs(&id);
    let t = Instant::now();
    loop {
        let v = second(&root).unwrap_or(second_before);
        assert!(
            v >= second_before,
            "the child counter restarted: {v} < {second_before}"
        );
        if v > second_before + 5 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the child counter stopped at {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..2 {
        let verdict = verify_memory(&env, &id);
        assert!(verdict.starts_with("ok "), "{verdict}");
        let _ = std::fs::remove_file(root.join("tmp/verified"));
    }
    remove(&mut c, &id, &pod.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_restore_removed_while_its_pages_go_in_leaves_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let Starting { pod, id, start, .. } =
        full_restore_mid_push(&mut env, &mut c, out.path(), "full-gone").await;
    let staged = env.dir.join("restore").join(&id);
    // Removal while the pages go in: refused (the start is under way) or
    // done; either way, once the start has answered, nothing may stay.
    let removed = c
        .remove_container(cri::RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await;
    eprintln!("RemoveContainer mid-push: {removed:?}");
    let started = start.await.unwrap();
    eprintln!("StartContainer: {started:?}\n{}", lazy_log(&env, &id));
    if removed.is_err() {
        // Refused: the restore went on undisturbed, its restore dir kept.
        assert!(started.is_ok(), "{started:?}");
        assert!(lazy_log(&env, &id).contains("every page in after"));
        assert!(verify_memory(&env, &id).starts_with("ok "));
    }
    remove(&mut c, &id, &pod.0).await;
    wait_gone(&staged.to_string_lossy(), Duration::from_secs(20));
    assert!(!env.restores().contains(&id), "{:?}", env.restores());
}
