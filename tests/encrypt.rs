//! Encrypted checkpoints: a marker the workload keeps in memory, in its
//! arguments and environment, and in a file is in every plain archive and in
//! no byte of an encrypted one; the identity restores it and the count goes
//! on; a wrong key, a changed byte, a missing part, a loose identity file and
//! a bad recipient are each refused, leaving nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use age::secrecy::ExposeSecret;
use ckpt_shim::checkpoint::locate;
use ckpt_shim::checkpoint::{checkpoint, Options};
use ckpt_shim::restore::{restore, Checkpoint};
use ckpt_shim::seal::{Identities, Recipients};
use ckpt_shim::Error;
use common::*;

/// A fresh key pair: the identity in a root-only file, and the recipient.
struct Key {
    file: PathBuf,
    recipient: String,
}

fn age_key(dir: &Path, name: &str) -> Key {
    let id = age::x25519::Identity::generate();
    let file = dir.join(name);
    std::fs::write(&file, format!("{}\n", id.to_string().expose_secret())).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Key {
        file,
        recipient: id.to_public().to_string(),
    }
}

fn ssh_key(dir: &Path) -> Key {
    let file = dir.join("id_ed25519");
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -C ckpt-test -f {}",
        file.display()
    ));
    let recipient = std::fs::read_to_string(file.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    Key { file, recipient }
}

fn identities(keys: &[&Key]) -> Arc<Identities> {
    let files: Vec<PathBuf> = keys.iter().map(|k| k.file.clone()).collect();
    Arc::new(Identities::load(&files).unwrap())
}

fn opts(location: &Path, seal: Option<Arc<Recipients>>) -> Options {
    Options {
        durable: false,
        stream: true,
        seal,
        ..checkpoint_opts(location)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A counter holding `marker` in its arguments, its environment and its
/// memory (both are on its stack), and in a file it wrote, with /bin/vi gone.
fn marked_counter(id: &str, marker: &str, mib: u32) -> Runc {
    let c = Runc::start_with(
        id,
        Spec {
            mib,
            extra_args: vec![marker.to_string()],
            env: vec![format!("API_TOKEN={marker}")],
            ..Default::default()
        },
    );
    c.exec(&format!("echo {marker} > /root/secret && rm /bin/vi"));
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_checkpoint_keeps_no_plaintext_and_the_identity_restores_it() {
    require(&["runc", "criu", "ssh-keygen", "age"]);
    let keys = out_dir();
    let (age, ssh) = (age_key(keys.path(), "age.key"), ssh_key(keys.path()));
    let recipients = Recipients::parse(&[age.recipient.clone(), ssh.recipient.clone()])
        .unwrap()
        .map(Arc::new);
    let marker = format!("CKPT-MARKER-{:016x}", common::rand_u64());
    // 40 MiB: the pages span several parts, sealed by both cores.
    let c = marked_counter("enc-marker", &marker, 40);
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let out = out_dir();

    // Plain, the marker is there (so the search below can find it).
    let plain = out.path().join("plain.tar");
    checkpoint(&found, &opts(&plain, None))
        .await
        .unwrap()
        .cleanup
        .wait();
    assert!(contains(&std::fs::read(&plain).unwrap(), marker.as_bytes()));

    let sealed = out.path().join("sealed.tar");
    let before = c.count().unwrap();
    let report = checkpoint(&found, &opts(&sealed, recipients))
        .await
        .unwrap();
    let after = c.count().unwrap();
    report.cleanup.wait();
    c.assert_running();
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(
        !contains(&bytes, marker.as_bytes()),
        "the marker is in the encrypted archive"
    );
    assert_eq!(
        entries(out.path()),
        ["plain.tar", "sealed.tar"],
        "staging left"
    );
    assert_eq!(
        std::fs::metadata(&sealed).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // What checkpointctl reads stays readable; everything else is age files.
    let m = members(&sealed);
    assert!(m.iter().any(|(n, t)| n == "checkpoint/" && t.is_dir()));
    let cfg: serde_json::Value =
        serde_json::from_slice(&member_bytes(&sealed, "config.dump")).unwrap();
    assert_eq!(cfg["id"], c.id.as_str());
    let spec: serde_json::Value =
        serde_json::from_slice(&member_bytes(&sealed, "spec.dump")).unwrap();
    assert_eq!(spec["process"]["args"], serde_json::json!(["/bin/counter"]));
    assert!(spec["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "API_TOKEN="));
    assert!(criu_rpc::stats::parse_dump_stats(&member_bytes(&sealed, "stats-dump")).is_ok());
    let readable = ["config.dump", "spec.dump", "stats-dump", "encryption.json"];
    for (name, t) in m.iter().filter(|(_, t)| !t.is_dir()) {
        if readable.contains(&name.as_str()) {
            continue;
        }
        assert!(name.ends_with(".age"), "{name} ({t:?}) is not sealed");
        assert!(
            member_bytes(&sealed, name).starts_with(b"age-encryption.org/v1\n"),
            "{name}"
        );
    }
    let pages_parts = m
        .iter()
        .filter(|(n, _)| n.starts_with("checkpoint/pages-1.img."))
        .count();
    assert!(pages_parts >= 3, "{pages_parts} parts of the pages");

    // inspect: who and what without a key; with one, every part opened.
    let shown = ckpt_shim::inspect::inspect(&sealed).unwrap();
    assert_eq!(shown.config.as_ref().unwrap().id, c.id);
    assert!(shown.pages_bytes >= 40 << 20, "{}", shown.pages_bytes);
    assert!(shown.sealed.as_ref().unwrap().opened_with.is_none());
    let full = ckpt_shim::inspect::inspect_with(&sealed, &identities(&[&ssh])).unwrap();
    assert_eq!(full.deleted_files, ["/bin/vi"]);
    assert!(full.sealed.unwrap().opened_with.is_some());

    // ckpt-shim decrypt gives the plain archive back.
    let decrypted = out.path().join("decrypted.tar");
    let mut ck = Checkpoint::open(&sealed).unwrap();
    ck.unseal(identities(&[&age])).unwrap();
    ck.write_plain(&decrypted).unwrap();
    assert_eq!(
        member_bytes(&decrypted, "spec.dump"),
        std::fs::read(c.bundle.join("config.json")).unwrap()
    );
    assert!(contains(
        &member_bytes(&decrypted, "rootfs-diff.tar"),
        marker.as_bytes()
    ));
    assert!(Checkpoint::open(&decrypted).unwrap().sealed.is_none());
    // Any part is an age file the reference tool opens: the second part of
    // the pages is their second 16 MiB.
    let part = out.path().join("part.age");
    std::fs::write(&part, member_bytes(&sealed, "checkpoint/pages-1.img.1.age")).unwrap();
    let by_age = std::process::Command::new("age")
        .args([
            "-d",
            "-i",
            ssh.file.to_str().unwrap(),
            part.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(by_age.status.success(), "{by_age:?}");
    let pages = member_bytes(&decrypted, "checkpoint/pages-1.img");
    assert_eq!(by_age.stdout, pages[16 << 20..(32 << 20).min(pages.len())]);
    std::fs::remove_file(&part).unwrap();

    // Restored with the identity, the count goes on, and the file is back.
    c.kill();
    let target = tempfile::tempdir().unwrap();
    let ov = Overlay::new(target.path());
    std::fs::copy(
        c.bundle.join("config.json"),
        target.path().join("config.json"),
    )
    .unwrap();
    let ids = identities(&[&age]);
    let pid = restore(&restore_opts(
        &sealed,
        target.path(),
        "enc-marker-restored",
        ids,
    ))
    .await
    .unwrap();
    let cgroup = format!(
        "{}/enc-marker-restored",
        Path::new(&c.cgroup).parent().unwrap().display()
    );
    let _guard = Restored { pid, cgroup };
    assert_resumed(&ov.rootfs, before, after);
    assert_eq!(
        std::fs::read_to_string(ov.rootfs.join("root/secret"))
            .unwrap()
            .trim(),
        marker
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_keys_changed_bytes_and_loose_identities_are_refused() {
    require(&["runc", "criu"]);
    let keys = out_dir();
    let (right, wrong) = (
        age_key(keys.path(), "right.key"),
        age_key(keys.path(), "wrong.key"),
    );
    let recipients = Recipients::parse(std::slice::from_ref(&right.recipient))
        .unwrap()
        .map(Arc::new);
    let c = marked_counter("enc-bad", "CKPT-MARKER-BAD", 20);
    let found = locate::from_runtime_root(&c.root, &c.id).unwrap();
    let out = out_dir();
    let sealed = out.path().join("sealed.tar");
    checkpoint(&found, &opts(&sealed, recipients))
        .await
        .unwrap()
        .cleanup
        .wait();

    let try_restore = |archive: PathBuf, ids: Arc<Identities>| async move {
        let bundle = tempfile::tempdir().unwrap();
        let r = restore(&restore_opts(
            &archive,
            bundle.path(),
            "enc-bad-restored",
            ids,
        ))
        .await;
        // Nothing extracted, nothing restored.
        assert_eq!(entries(bundle.path()), Vec::<String>::new());
        r.unwrap_err()
    };
    // A wrong key, and no key: refused before anything is written.
    let err = try_restore(sealed.clone(), identities(&[&wrong])).await;
    assert!(
        matches!(err, Error::Sealed(ref m) if m.contains("other recipients")),
        "{err}"
    );
    let err = try_restore(sealed.clone(), Arc::new(Identities::default())).await;
    assert!(matches!(err, Error::Sealed(_)), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );

    // One changed byte in the middle of a pages part: authentication fails.
    let (at, len) = member_span(&sealed, "checkpoint/pages-1.img.0.age");
    let changed = out.path().join("changed.tar");
    std::fs::copy(&sealed, &changed).unwrap();
    flip_byte(&changed, at + len / 2);
    let err = try_restore(changed.clone(), identities(&[&right])).await;
    assert!(
        matches!(err, Error::Tampered(ref m) if m.contains("pages-1.img")),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::DataLoss);
    let mut ck = Checkpoint::open(&changed).unwrap();
    ck.unseal(identities(&[&right])).unwrap();
    let plain = out.path().join("plain.tar");
    assert!(matches!(ck.write_plain(&plain), Err(Error::Tampered(_))));
    assert!(!plain.exists());

    // A part taken out: refused on opening.
    let cut = common::archive::rewrite_without(
        &sealed,
        &out.path().join("cut.tar"),
        "checkpoint/pages-1.img.1.age",
    );
    let err = Checkpoint::open(&cut).unwrap_err();
    assert!(
        matches!(err, Error::Tampered(ref m) if m.contains("pages-1.img")),
        "{err}"
    );

    // An identity file others can read is refused.
    std::fs::set_permissions(&right.file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Identities::load(std::slice::from_ref(&right.file)).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    // Nothing of any of this is left beside the archives.
    let mut left = entries(out.path());
    left.sort();
    assert_eq!(left, ["changed.tar", "cut.tar", "sealed.tar"]);
    c.assert_running();
}

/// A bad recipient stops `serve` before it listens, and the CLI checkpoint
/// before it touches the container.
#[test]
fn bad_recipients_stop_serve_and_checkpoint() {
    require(&["runc", "criu"]);
    let dir = out_dir();
    let sock = dir.path().join("shim.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "encrypt_to = [\"age1qqqqbad\"]\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
        .args([
            "serve",
            "--listen",
            sock.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("encrypt_to[0]") && err.contains("not an age recipient"),
        "{err}"
    );
    assert!(!sock.exists());

    let c = Runc::start("enc-cli-bad");
    let archive = dir.path().join("a.tar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
        .args([
            "checkpoint",
            "--runtime-root",
            c.root.to_str().unwrap(),
            &c.id,
        ])
        .args([
            "--output",
            archive.to_str().unwrap(),
            "--encrypt-to",
            "ssh-ed25519 nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an age recipient"));
    assert!(!archive.exists());
    c.assert_running();
}

/// Where a member's data lies in an archive.
fn member_span(archive: &Path, name: &str) -> (u64, u64) {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in ar.entries_with_seek().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == name {
            return (e.raw_file_position(), e.size());
        }
    }
    panic!("{name} not in {}", archive.display());
}

fn flip_byte(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

/// Through CRI: a node with `encrypt_to` seals every checkpoint, and one with
/// the identity restores it, from the archive or a checkpoint image of it; a
/// node without the identity refuses, and keeps nothing.
#[tokio::test(flavor = "multi_thread")]
async fn through_cri_checkpoints_are_sealed_and_the_nodes_identity_restores_them() {
    use common::restore::{checkpointed_counter, create, restore_config, restore_from};
    let keys = out_dir();
    let key = age_key(keys.path(), "node.key");
    let seal_only = format!("encrypt_to = [\"{}\"]\n", key.recipient);
    let both = format!("{seal_only}identities = [\"{}\"]\n", key.file.display());
    let mut env = common::cri::Env::start_configured(&both);
    let mut c = env.client().await;
    let out = out_dir();
    let (_, archive, before, after) =
        checkpointed_counter(&mut env, &mut c, "sealed-src", out.path()).await;
    let ck = Checkpoint::open(&archive).unwrap();
    assert!(ck.sealed.is_some(), "not sealed");

    let from = restore_from(
        &mut env,
        &mut c,
        "from-archive",
        archive.to_str().unwrap(),
        (before, after),
    )
    .await;
    assert_eq!(Path::new(&from), archive);
    let sock = env.containerd_sock.to_string_lossy().into_owned();
    let out_img = std::process::Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
        .args([
            "image",
            archive.to_str().unwrap(),
            "sealed-ckpt:1",
            "--import",
            &sock,
        ])
        .output()
        .unwrap();
    assert!(out_img.status.success(), "{out_img:?}");
    restore_from(
        &mut env,
        &mut c,
        "from-image",
        "localhost/sealed-ckpt:1",
        (before, after),
    )
    .await;

    // The same node without its identity.
    env.kill_shim();
    std::fs::write(&env.config, &seal_only).unwrap();
    env.spawn_shim();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "no-key", false).await;
    let restores = env.restores().len();
    let err = create(
        &mut c,
        &pod,
        restore_config(&env, "no-key", archive.to_str().unwrap()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("encrypted"), "{}", err.message());
    assert_eq!(env.restores().len(), restores, "a restore was left");
}
