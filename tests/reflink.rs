//! On a reflink-capable file system (XFS, loop-mounted), the archive shares the
//! extents of CRIU's images instead of copying them, and reads back intact; and
//! a restore's extraction shares the archive's extents in turn.

mod common;

use std::io::Read;
use std::path::Path;

use ckpt_shim::checkpoint::archive::{ArchiveWriter, Target};

fn free(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_free() as u64 * s.fragment_size() as u64
}

struct Xfs(tempfile::TempDir);
impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0.path().join("m"), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn large_members_share_extents_on_xfs() {
    common::require(&["mkfs.xfs", "losetup"]);
    let t = Xfs(tempfile::tempdir().unwrap());
    let (img, m) = (t.0.path().join("xfs.img"), t.0.path().join("m"));
    std::fs::create_dir(&m).unwrap();
    common::sh(&format!(
        "truncate -s 1G {0} && mkfs.xfs -q -f -m reflink=1 {0} && mount -o loop {0} {1}",
        img.display(),
        m.display()
    ));

    // A 64 MiB "pages" image, as CRIU leaves it: just written, still dirty.
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(m.join("pages-1.img"), &data).unwrap();
    std::fs::write(m.join("small.img"), b"small").unwrap();
    let before = free(&m);
    let target = Target::new(&m.join("a.tar")).unwrap();
    let mut w = ArchiveWriter::create(&target).unwrap();
    w.add_bytes("config.dump", b"{}").unwrap();
    w.add_dir("checkpoint").unwrap();
    w.add_file(
        "checkpoint/small.img",
        &std::fs::File::open(m.join("small.img")).unwrap(),
    )
    .unwrap();
    w.add_file(
        "checkpoint/pages-1.img",
        &std::fs::File::open(m.join("pages-1.img")).unwrap(),
    )
    .unwrap();
    let written = w.written;
    w.commit(true).unwrap();
    assert!(
        written < (data.len() as u64) / 100,
        "the archive step wrote {written} bytes for {} of pages",
        data.len()
    );
    // And it took no new space for them: the extents are shared.
    let taken = before.saturating_sub(free(&m));
    assert!(
        taken < (data.len() as u64) / 10,
        "the archive took {taken} new bytes for {} of pages",
        data.len()
    );

    // The shared data reads back intact, also once the source is gone.
    std::fs::remove_file(m.join("pages-1.img")).unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(m.join("a.tar")).unwrap());
    let mut found = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("checkpoint/pages-1.img") {
            let mut back = Vec::new();
            e.read_to_end(&mut back).unwrap();
            assert!(back == data, "pages differ after reflink");
            found = true;
        }
    }
    assert!(found);

    // Extracting it for a restore takes no new space for the pages either.
    let before = free(&m);
    let x = m.join("x");
    std::fs::create_dir(&x).unwrap();
    ckpt_shim::restore::extract(&m.join("a.tar"), &x).unwrap();
    let taken = before.saturating_sub(free(&m));
    assert!(
        taken < (data.len() as u64) / 10,
        "extraction took {taken} new bytes for {} of pages",
        data.len()
    );
    assert!(std::fs::read(x.join("checkpoint/pages-1.img")).unwrap() == data);
    assert_eq!(
        std::fs::read(x.join("checkpoint/small.img")).unwrap(),
        b"small"
    );
}
