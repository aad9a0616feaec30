//! A checkpoint archive is hostile input (docs/security-archive.md). Archives
//! forged from a real checkpoint of the counter (its `rootfs-diff.tar` with
//! a device node, a setuid file, a hard link out of the diff, a file written
//! through a symlink; a member twice; a deletion that climbs) are refused by
//! the real `crictl create` through the shim: INVALID_ARGUMENT naming the
//! member, before anything is created, so no container exists afterwards
//! and the shim has nothing staged. The same archive forged the same way
//! with nothing hostile is restored, and counts on.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::cri::Env;
use common::security::{self as sec, Crictl, Sec};
use tar::EntryType as T;

/// A member as a hostile archive has it: a header written raw, and its data.
struct Raw(tar::Header, Vec<u8>);

fn raw(name: &str, kind: T, mode: u32, link: &str, data: &[u8]) -> Raw {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_cksum();
    Raw(h, data.to_vec())
}

/// The checkpoint's own diff, member by member, with `extra` after it.
fn diff_plus(real: &[u8], extra: &[Raw]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(real);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.append(&h, data.as_slice()).unwrap();
    }
    for Raw(h, data) in extra {
        out.append(h, data.as_slice()).unwrap();
    }
    out.into_inner().unwrap()
}

/// `src` copied member by member into `dst`, with `rootfs-diff.tar` made
/// `diff`, and `extra` members (name, data) added at the end.
fn forge(src: &Path, dst: &Path, diff: &[u8], extra: &[(&str, &[u8])]) -> PathBuf {
    let mut input = tar::Archive::new(std::fs::File::open(src).unwrap());
    let mut out = tar::Builder::new(std::fs::File::create(dst).unwrap());
    for e in input.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let data = if name == "rootfs-diff.tar" {
            diff
        } else {
            &data
        };
        h.set_size(data.len() as u64);
        out.append_data(&mut h, &name, data).unwrap();
    }
    for (name, data) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        out.append_data(&mut h, name, *data).unwrap();
    }
    out.finish().unwrap();
    dst.to_path_buf()
}

/// What is forged, the archive, and what the refusal must say.
fn forgeries(
    archive: &Path,
    real: &[u8],
    dir: &Path,
) -> Vec<(&'static str, PathBuf, &'static str)> {
    let spec = common::member_bytes(archive, "spec.dump");
    let at = |n: &str| dir.join(format!("{n}.tar"));
    let diff = |extra: &[Raw]| diff_plus(real, extra);
    vec![
        (
            "a device node",
            forge(
                archive,
                &at("device"),
                &diff(&[raw("dev/evil", T::Char, 0o666, "", b"")]),
                &[],
            ),
            "rootfs-diff.tar: dev/evil (a device node",
        ),
        (
            "a setuid file",
            forge(
                archive,
                &at("setuid"),
                &diff(&[raw("bin/rootsh", T::Regular, 0o4755, "", b"#!")]),
                &[],
            ),
            "rootfs-diff.tar: bin/rootsh (mode 4755: setuid and setgid files",
        ),
        (
            "a hard link out of the diff",
            forge(
                archive,
                &at("hardlink"),
                &diff(&[raw("tmp/shadow", T::Link, 0o644, "/etc/shadow", b"")]),
                &[],
            ),
            "rootfs-diff.tar: tmp/shadow (a hard link to /etc/shadow",
        ),
        (
            "a write through a symlink",
            forge(
                archive,
                &at("through"),
                &diff(&[
                    raw("etc2", T::Symlink, 0o777, "/etc", b""),
                    raw(
                        "etc2/cron.d/evil",
                        T::Regular,
                        0o644,
                        "",
                        b"* * * * * root sh",
                    ),
                ]),
                &[],
            ),
            "rootfs-diff.tar: etc2/cron.d/evil (under the symlink etc2",
        ),
        (
            "a member twice",
            forge(archive, &at("twice"), real, &[("./spec.dump", &spec)]),
            "spec.dump (a second member of this name",
        ),
        (
            "a deletion that climbs",
            forge(
                archive,
                &at("deleted"),
                real,
                &[("deleted.files", br#"["/tmp/x", "/../../etc/passwd"]"#)],
            ),
            "deleted.files: /../../etc/passwd (a path that climbs with ..",
        ),
    ]
}

#[test]
fn a_forged_archive_is_refused_at_create_and_leaves_nothing() {
    let mut env = Env::start();
    let crictl = Crictl::new(&env);
    let counter = sec::counter_command();
    let src = sec::run_pod(&mut env, &crictl, "src", false);
    let id = sec::run_container(&env, &crictl, &src, "counter", &counter, Sec::Default);
    common::wait_count(&env.rootfs(&id), |v| v >= 3);
    let out = common::out_dir();
    let archive = out.path().join("real.tar");
    crictl.run(&[
        "checkpoint",
        &format!("--export={}", archive.display()),
        &id,
    ]);
    let real = common::member_bytes(&archive, "rootfs-diff.tar");
    assert!(
        !real.is_empty(),
        "the checkpoint has no rootfs diff to forge"
    );

    let dst = sec::run_pod(&mut env, &crictl, "dst", false);
    let before = crictl.all_containers();
    for (what, forged, says) in forgeries(&archive, &real, out.path()) {
        let image = forged.to_str().unwrap();
        let err = sec::create(
            &env,
            &crictl,
            &dst,
            "restored",
            image,
            &counter,
            Sec::Default,
        )
        .err()
        .unwrap_or_else(|| panic!("{what}: created"));
        assert_eq!(
            sec::grpc_code(&err).as_deref(),
            Some("InvalidArgument"),
            "{what}: {err}"
        );
        assert!(err.contains(says), "{what}: {err}");
        eprintln!("{what}: {err}");
        assert_eq!(
            crictl.all_containers(),
            before,
            "{what}: a container was left"
        );
        assert!(
            env.restores().is_empty(),
            "{what}: staged: {:?}",
            env.restores()
        );
    }

    // Forged the same way with nothing hostile, it restores and counts on.
    let clean = forge(
        &archive,
        &out.path().join("clean.tar"),
        &diff_plus(&real, &[]),
        &[],
    );
    let image = clean.to_str().unwrap();
    let restored = sec::create(
        &env,
        &crictl,
        &dst,
        "restored",
        image,
        &counter,
        Sec::Default,
    )
    .unwrap_or_else(|e| panic!("the clean forgery: {e}"));
    crictl.run(&["start", &restored]);
    let at = common::read_count(&env.rootfs(&restored)).expect("a count in the restored rootfs");
    common::wait_count(&env.rootfs(&restored), |v| v > at + 2);
}
