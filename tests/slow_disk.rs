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
    assert!(
        std::fs::read(&f).unwrap() == want,
        "read back through the mount"
    );
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

fn io_errno<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// What the shim's archive writer does (src/archive.rs, src/fcopy.rs), on the
/// slow disk: and the two things FUSE refuses, for which the shim falls back.
#[test]
fn the_slow_disk_does_what_the_archive_writer_does() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
    use std::ptr::null_mut;
    common::require(&[]);
    let out = out_dir();
    let fs = SlowFs::mount(out.path(), 50.0);
    let (tmp, target) = (fs.mnt.join(".a.tmp"), fs.mnt.join("a.tar"));
    let open = |p: &Path, flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags | libc::O_NOFOLLOW)
            .mode(0o600)
            .open(p)
    };
    let f = open(&tmp, libc::O_CREAT | libc::O_EXCL).unwrap();
    assert_eq!(
        io_errno(open(&tmp, libc::O_CREAT | libc::O_EXCL)),
        Some(libc::EEXIST)
    );
    assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    // A pipe spliced in, then a copy_file_range inside the mount.
    let (r, w) = nix::unistd::pipe().unwrap();
    nix::unistd::write(&w, &[7u8; 4096]).unwrap();
    let (mut at, mut at2) = (0i64, 0i64);
    // SAFETY: open fds and local offsets.
    let n = unsafe { libc::splice(r.as_raw_fd(), null_mut(), f.as_raw_fd(), &mut at, 4096, 0) };
    assert_eq!(n, 4096, "splice: {}", std::io::Error::last_os_error());
    let g = open(&fs.mnt.join("copy"), libc::O_CREAT | libc::O_EXCL).unwrap();
    at = 0;
    // SAFETY: as above.
    let n =
        unsafe { libc::copy_file_range(f.as_raw_fd(), &mut at, g.as_raw_fd(), &mut at2, 4096, 0) };
    assert_eq!(
        n,
        4096,
        "copy_file_range: {}",
        std::io::Error::last_os_error()
    );
    f.sync_data().unwrap();
    // Reopened as adoption does, and refused an inserted range: FUSE passes
    // only keep-size, punch-hole and zero-range fallocate modes.
    let again = open(&tmp, 0).unwrap();
    let insert = nix::fcntl::fallocate(
        &again,
        nix::fcntl::FallocateFlags::FALLOC_FL_INSERT_RANGE,
        0,
        4096,
    );
    assert_eq!(insert, Err(nix::errno::Errno::EOPNOTSUPP));
    // Renamed into place, never over an existing file.
    let dir = std::fs::File::open(&fs.mnt).unwrap();
    let noreplace = nix::fcntl::RenameFlags::RENAME_NOREPLACE;
    nix::fcntl::renameat2(&dir, ".a.tmp", &dir, "a.tar", noreplace).unwrap();
    let over = nix::fcntl::renameat2(&dir, "copy", &dir, "a.tar", noreplace);
    assert_eq!(over, Err(nix::errno::Errno::EEXIST));
    nix::unistd::fsync(&dir).unwrap();
    let mut buf = [0u8; 4096];
    g.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        (std::fs::read(&target).unwrap(), buf),
        (vec![7u8; 4096], [7u8; 4096])
    );
    // A unix socket bound and reached in a directory on the mount (CRIU's
    // image streamer connects to the shim's so).
    std::fs::create_dir(fs.mnt.join("staging")).unwrap();
    let sock = fs.mnt.join("staging/s.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::os::unix::net::UnixStream::connect(&sock).unwrap();
    l.accept().unwrap();
    // No O_TMPFILE here (the shim names its temp files instead).
    let t = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(&fs.mnt);
    assert_eq!(io_errno(t), Some(libc::EOPNOTSUPP));
    drop((f, g, again, dir, l));
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
