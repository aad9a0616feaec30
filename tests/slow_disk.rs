//! A checkpoint onto a deliberately slow disk (issue 21, item 4): hack/slowfs,
//! a FUSE passthrough whose writes are throttled, with the archive, and the
//! staging the shim keeps beside it, on its mount, streamed and staged. First
//! the slow disk itself: what is written comes back, writes are held to the
//! rate, and it unmounts.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cri::Env;
use common::restore::{checkpoint_to, restore_from};
use common::slowfs::{mounted, SlowFs};
use common::{entries, out_dir};

const MIB: usize = 1 << 20;

/// Incompressible bytes, different in every MiB.
fn data(mib: usize) -> Vec<u8> {
    let mut v = vec![0u8; mib * MIB];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

#[test]
fn the_slow_disk_gives_back_what_was_written_and_holds_writes_to_its_rate() {
    common::require(&[]);
    let out = out_dir();
    let fs = SlowFs::mount(out.path(), 50.0);
    let want = data(64);
    let t = Instant::now();
    let f = fs.mnt.join("f");
    std::fs::write(&f, &want).unwrap();
    let took = t.elapsed();
    // The throttle's function, not a benchmark: 64 MiB at 50 MB/s cannot pass
    // in less than 67.1e6 / 50e6 = 1.34 s less the 1 MiB burst, however fast
    // or loaded the machine. Half that, to assert only that it throttles.
    let floor = (want.len() - MIB) as f64 / 50e6 / 2.0;
    assert!(
        took.as_secs_f64() >= floor,
        "64 MiB written in {took:?} through a 50 MB/s throttle"
    );
    assert!(std::fs::read(&f).unwrap() == want, "read back through the mount");
    assert!(
        std::fs::read(fs.backing.join("f")).unwrap() == want,
        "the backing file"
    );
    fs.stop();
}

#[test]
fn a_mount_left_by_a_killed_slowfs_is_detached_by_the_next_one() {
    common::require(&[]);
    let out = out_dir();
    let mut fs = SlowFs::mount(out.path(), 50.0);
    std::fs::write(fs.mnt.join("kept"), b"still here").unwrap();
    fs.crash();
    // The dead server's mount is still there, and answers ENOTCONN.
    assert!(mounted(&fs.mnt));
    let err = std::fs::metadata(&fs.mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    fs.start(50.0);
    assert_eq!(std::fs::read(fs.mnt.join("kept")).unwrap(), b"still here");
    fs.stop();
}

/// The archive's page data, in bytes.
fn page_bytes(archive: &Path) -> u64 {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let p = e.path().unwrap().to_string_lossy().into_owned();
            p.starts_with("checkpoint/pages-") && p.ends_with(".img")
        })
        .map(|e| e.header().size().unwrap())
        .sum()
}

/// Waits (60 s at most) for `dir` to hold only `names`: the shim removes its
/// staging after answering.
fn wait_only(dir: &Path, names: &[&str]) {
    let t = Instant::now();
    while entries(dir) != names {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "left in {}: {:?}",
            dir.display(),
            entries(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CRI checkpoint of a 128 MiB counter, through a shim with `toml` as its
/// settings, onto a slow disk at 50 MB/s: the archive is complete, only it is
/// left on the disk, the counter runs on, and the archive restores from there.
/// Returns the shim's log.
async fn checkpoint_on_a_slow_disk_restores(toml: &str) -> String {
    let out = out_dir();
    let slow = SlowFs::mount(out.path(), 50.0);
    let mut env = Env::start_configured(toml);
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "slow", false).await;
    let id = env.counter(&mut c, &pod, "counter", 128, true).await;
    let archive = slow.mnt.join("checkpoint-slow.tar");
    let counts = checkpoint_to(&env, &mut c, &id, &archive).await;

    let pages = page_bytes(&archive);
    assert!(pages >= 128 * MIB as u64, "{pages} bytes of pages");
    wait_only(&slow.backing, &["checkpoint-slow.tar"]);
    env.assert_running(&mut c, &id).await;

    let image = archive.to_string_lossy().into_owned();
    let from = restore_from(&mut env, &mut c, "slow-restored", &image, counts).await;
    assert_eq!(from, image);
    let log = env.shim_log();
    drop(c);
    drop(env);
    wait_only(&slow.backing, &["checkpoint-slow.tar"]);
    slow.stop();
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_streamed_to_the_slow_disk_is_complete_and_restores() {
    let log = checkpoint_on_a_slow_disk_restores("").await;
    // Streamed as on any disk: CRIU's capture socket could be bound in the
    // staging dir on the mount (a FUSE mknod), so no fallback to staging.
    assert!(log.contains("streamed=true"), "{log}");
}

/// Staged, the archive is built from files in staging on the same FUSE mount
/// (copy_file_range inside it; no FALLOC_FL_INSERT_RANGE through FUSE, so no
/// adoption).
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_staged_on_the_slow_disk_is_complete_and_restores() {
    let log = checkpoint_on_a_slow_disk_restores("stream = false\n").await;
    assert!(log.contains("streamed=false"), "{log}");
}
