//! Checkpoint images, the way a checkpoint travels between Kubernetes nodes:
//! built by `ckpt-shim image` or by buildah, through a real registry on
//! loopback or an OCI archive, pulled on another node through its shim, and
//! named as a new container's image by tag, image ID or repo digest. Two
//! private containerds stand for the two nodes.

mod common;

use std::path::Path;
use std::process::Command;

use ckpt_shim::image::build::Blob;
use common::cri::{Client, Env, Images};
use common::out_dir;
use common::registry::Registry;
use common::restore::{checkpointed_counter, create, restore_config, restore_from};
use k8s_cri::v1 as cri;
use tonic::Code;

/// An image's layers, each with its media type.
type Layers<'a> = Vec<(&'a str, Vec<u8>)>;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

/// Runs the built `ckpt-shim` with `args`; its stdout.
fn ckpt_shim(args: &[&str]) -> String {
    common::run_ok(Command::new(env!("CARGO_BIN_EXE_ckpt-shim")).args(args))
}

/// buildah with its own storage in `root` (vfs: nothing mounted).
fn buildah(root: &Path, args: &[&str]) -> String {
    let out = Command::new("buildah")
        .arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "buildah {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn image_status(images: &mut Images, image: &str) -> cri::ImageStatusResponse {
    images
        .image_status(cri::ImageStatusRequest {
            image: spec(image),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn pull(images: &mut Images, image: &str) -> String {
    images
        .pull_image(cri::PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e:?}"))
        .into_inner()
        .image_ref
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_image_travels_through_a_registry_and_restores_by_tag_id_and_digest() {
    common::require(&["docker-registry", "buildah", "skopeo"]);
    let registry = Registry::start();
    let mut a = Env::start();
    let mut b = Env::start();
    registry.trusted_by(&b.dir);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut images = b.images().await;
    let out = out_dir();

    // The base image lives in the registry, as in a cluster; node B does not
    // have it, and pulls it when it restores.
    let base = format!("{}/library/ckpt-counter:latest", registry.addr);
    let counter_oci =
        std::env::var("CKPT_SHIM_IMAGES").unwrap_or("/var/cache/ckpt-shim/images".into());
    common::sh(&format!(
        "skopeo copy -q --dest-tls-verify=false oci-archive:{counter_oci}/counter-oci.tar docker://{base}"
    ));
    images
        .remove_image(cri::RemoveImageRequest {
            image: spec("docker.io/library/ckpt-counter:latest"),
        })
        .await
        .unwrap();
    let (orig, archive, before, after) =
        checkpointed_counter(&mut a, &mut ca, "on-a", out.path()).await;
    let archive = common::archive::rewrite(
        &archive,
        &out.path().join("from-registry.tar"),
        |name, data| {
            (name == "config.dump").then(|| {
                let mut v: serde_json::Value = serde_json::from_slice(data).unwrap();
                v["rootfsImageName"] = base.clone().into();
                serde_json::to_vec(&v).unwrap()
            })
        },
        None,
    );

    // ckpt-shim image, pushed over plain HTTP.
    let tag = format!("{}/ckpt/counter:v1", registry.addr);
    let pushed = ckpt_shim(&[
        "image",
        archive.to_str().unwrap(),
        &tag,
        "--push",
        "--plain-http",
    ]);
    let digest = pushed.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(pushed.split_whitespace().next(), Some(tag.as_str()));

    // The kubelet: ImageStatus (absent), PullImage, then CreateContainer.
    assert!(image_status(&mut images, &tag).await.image.is_none());
    let image_id = pull(&mut images, &tag).await;
    let st = image_status(&mut images, &tag).await;
    let img = st.image.unwrap();
    assert_eq!(img.id, image_id);
    let by_digest = format!("{}/ckpt/counter@{digest}", registry.addr);
    assert!(
        img.repo_digests.contains(&by_digest),
        "{:?}",
        img.repo_digests
    );
    // The checkpoint's annotations show as the image's labels.
    assert!(
        st.info["info"].contains(r#""io.kubernetes.cri-o.annotations.checkpoint.name":"counter""#),
        "{}",
        st.info["info"]
    );
    let counts = (before, after);
    assert_eq!(
        restore_from(&mut b, &mut cb, "by-tag", &tag, counts).await,
        tag
    );
    assert!(
        image_status(&mut images, &base).await.image.is_some(),
        "the base image was not pulled"
    );

    // A static pod with imagePullPolicy Never: ImageStatus, RunPodSandbox,
    // CreateContainer with the reference ImageStatus resolved, StartContainer.
    let resolved = image_status(&mut images, &tag).await.image.unwrap().id;
    restore_from(&mut b, &mut cb, "by-id", &resolved, counts).await;
    restore_from(&mut b, &mut cb, "by-digest", &by_digest, counts).await;
    // Its layer is uncompressed: read where containerd keeps it, not copied.
    let local = "restoring from the layer in the runtime's content store";
    assert_eq!(b.shim_log().matches(local).count(), 3, "{}", b.shim_log());

    // buildah, as the Kubernetes docs build one: the archive's files at / in a
    // scratch image, with only CRI-O's manifest annotation.
    let bh = out.path().join("buildah");
    let ctr = buildah(&bh, &["from", "scratch"]);
    buildah(&bh, &["add", &ctr, archive.to_str().unwrap(), "/"]);
    buildah(
        &bh,
        &[
            "config",
            "--annotation=io.kubernetes.cri-o.annotations.checkpoint.name=counter",
            &ctr,
        ],
    );
    buildah(&bh, &["commit", "-q", &ctr, "localhost/bh-ckpt:1"]);
    // As an OCI archive imported on node B, by tag.
    let oci = out.path().join("bh.oci.tar");
    buildah(
        &bh,
        &[
            "push",
            "localhost/bh-ckpt:1",
            &format!("oci-archive:{}:localhost/bh-ckpt:1", oci.display()),
        ],
    );
    common::sh(&format!(
        "ctr --address {} -n k8s.io images import {}",
        b.containerd_sock.display(),
        oci.display()
    ));
    restore_from(
        &mut b,
        &mut cb,
        "buildah-tag",
        "localhost/bh-ckpt:1",
        counts,
    )
    .await;
    // Through the registry, pulled and restored by repo digest.
    let digestfile = out.path().join("bh.digest");
    let bh_tag = format!("{}/ckpt/bh:1", registry.addr);
    buildah(
        &bh,
        &[
            "push",
            "--tls-verify=false",
            "--digestfile",
            digestfile.to_str().unwrap(),
            "localhost/bh-ckpt:1",
            &format!("docker://{bh_tag}"),
        ],
    );
    let bh_digest = format!(
        "{}/ckpt/bh@{}",
        registry.addr,
        std::fs::read_to_string(&digestfile).unwrap().trim()
    );
    pull(&mut images, &bh_digest).await;
    restore_from(&mut b, &mut cb, "buildah-digest", &bh_digest, counts).await;
    // buildah's layers are gzip: read through the content API and uncompressed.
    assert_eq!(b.shim_log().matches(local).count(), 3, "{}", b.shim_log());

    // Node A's original runs on; B keeps nothing of the images it read.
    a.assert_running(&mut ca, &orig).await;
    let restores = b.restores();
    assert_eq!(restores.len(), 5, "{restores:?}");
}

/// An OCI archive of one image `name`: the given layers (media type, data),
/// annotated as a checkpoint image.
fn crafted_image(file: &Path, name: &str, layers: &[(&str, Vec<u8>)]) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| Blob::of("", d).digest).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_blob = Blob::of("application/vnd.oci.image.config.v1+json", &config);
    let layer_blobs: Vec<Blob> = layers.iter().map(|(t, d)| Blob::of(t, d)).collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_blob.descriptor(),
        "layers": layer_blobs.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": {"io.kubernetes.cri-o.annotations.checkpoint.name": "counter"},
    }))
    .unwrap();
    let manifest_blob = Blob::of("application/vnd.oci.image.manifest.v1+json", &manifest);
    let mut m = manifest_blob.descriptor();
    m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    let index =
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [m]})).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(file).unwrap());
    let mut add = |path: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json".into(), &index);
    add(format!("blobs/sha256/{}", config_blob.hex()), &config);
    add(format!("blobs/sha256/{}", manifest_blob.hex()), &manifest);
    for (b, (_, d)) in layer_blobs.iter().zip(layers) {
        add(format!("blobs/sha256/{}", b.hex()), d);
    }
    tar.finish().unwrap();
}

/// A tar of one small file: a valid layer, not a checkpoint.
fn plain_tar() -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    t.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
    t.into_inner().unwrap()
}

/// Every bad checkpoint image is refused with its code, and leaves no
/// container and no staging; an image without the annotations is an ordinary
/// image, created untouched.
#[tokio::test(flavor = "multi_thread")]
async fn bad_checkpoint_images_are_refused_and_leave_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (_, archive, _, _) = checkpointed_counter(&mut env, &mut c, "src", out.path()).await;
    let pod = env.run_pod(&mut c, "dst", false).await;
    let import = |file: &Path| {
        common::sh(&format!(
            "ctr --address {} -n k8s.io images import --no-unpack {}",
            env.containerd_sock.display(),
            file.display()
        ));
    };
    let layer = "application/vnd.oci.image.layer.v1.tar";
    let cases: [(&str, Layers); 3] = [
        ("localhost/bad:not-a-checkpoint", vec![(layer, plain_tar())]),
        (
            "localhost/bad:zstd",
            vec![(
                "application/vnd.oci.image.layer.v1.tar+zstd",
                vec![0x28, 0xb5, 0x2f, 0xfd],
            )],
        ),
        (
            "localhost/bad:two-layers",
            vec![(layer, plain_tar()), (layer, plain_tar())],
        ),
    ];
    for (name, layers) in &cases {
        let file = out
            .path()
            .join(format!("{}.oci.tar", name.rsplit(':').next().unwrap()));
        crafted_image(&file, name, layers);
        import(&file);
    }
    // A real checkpoint whose base image this node has not, and cannot pull.
    let missing_base = common::archive::rewrite(
        &archive,
        &out.path().join("missing-base.tar"),
        |name, data| {
            (name == "config.dump").then(|| {
                let mut v: serde_json::Value = serde_json::from_slice(data).unwrap();
                v["rootfsImageName"] = "docker.io/library/not-on-this-node:1".into();
                v["rootfsImageRef"] = format!("sha256:{}", "0".repeat(64)).into();
                serde_json::to_vec(&v).unwrap()
            })
        },
        None,
    );
    let sock = env.containerd_sock.to_string_lossy().into_owned();
    ckpt_shim(&[
        "image",
        missing_base.to_str().unwrap(),
        "bad:missing-base",
        "--import",
        &sock,
    ]);

    let containers = |c: &Client| {
        let mut c = c.clone();
        async move {
            let req = cri::ListContainersRequest { filter: None };
            c.list_containers(req)
                .await
                .unwrap()
                .into_inner()
                .containers
                .len()
        }
    };
    let before = containers(&c).await;
    for (image, code, says) in [
        (
            "localhost/bad:not-a-checkpoint",
            Code::InvalidArgument,
            "not a checkpoint archive",
        ),
        ("localhost/bad:zstd", Code::InvalidArgument, "zstd"),
        (
            "localhost/bad:two-layers",
            Code::InvalidArgument,
            "has 2 layers",
        ),
        (
            "localhost/bad:missing-base",
            Code::NotFound,
            "docker.io/library/not-on-this-node:1",
        ),
    ] {
        let err = create(&mut c, &pod, restore_config(&env, "bad", image))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{image}: {err:?}");
        assert!(err.message().contains(says), "{image}: {}", err.message());
        assert_eq!(
            containers(&c).await,
            before,
            "{image}: a container was left"
        );
        assert!(
            env.restores().is_empty(),
            "{image}: staging left: {:?}",
            env.restores()
        );
    }

    // The counter image is no checkpoint: its CreateContainer is the runtime's.
    let id = env.counter(&mut c, &pod, "plain", 1, true).await;
    env.assert_running(&mut c, &id).await;
    assert!(env.restores().is_empty());
}

/// `ckpt-shim image` into containerd and as an OCI archive (imported with
/// ctr), both restored by tag; as an OCI layout, read back by skopeo with the
/// annotations CRI-O, podman and checkpointctl look for, root-only.
#[tokio::test(flavor = "multi_thread")]
async fn ckpt_shim_image_imports_and_writes_oci_layouts() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (_, archive, before, after) =
        checkpointed_counter(&mut env, &mut c, "src", out.path()).await;
    let archive = archive.to_str().unwrap();
    let sock = env.containerd_sock.to_string_lossy().into_owned();
    let imported = ckpt_shim(&["image", archive, "counter-ckpt:imported", "--import", &sock]);
    assert!(
        imported.starts_with("localhost/counter-ckpt:imported sha256:"),
        "{imported}"
    );
    let oci = out.path().join("ckpt.oci.tar");
    ckpt_shim(&[
        "image",
        archive,
        "counter-ckpt:archived",
        "--oci-archive",
        oci.to_str().unwrap(),
    ]);
    common::sh(&format!(
        "ctr --address {sock} -n k8s.io images import {}",
        oci.display()
    ));
    for tag in [
        "localhost/counter-ckpt:imported",
        "localhost/counter-ckpt:archived",
    ] {
        let from = restore_from(
            &mut env,
            &mut c,
            tag.rsplit(':').next().unwrap(),
            tag,
            (before, after),
        )
        .await;
        assert_eq!(from, tag);
    }

    let layout = out.path().join("layout");
    ckpt_shim(&[
        "image",
        archive,
        "counter-ckpt:1",
        "--oci-layout",
        layout.to_str().unwrap(),
    ]);
    let raw = common::sh(&format!("skopeo inspect --raw oci:{}", layout.display()));
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let ann = &manifest["annotations"];
    for (key, want) in [
        ("io.kubernetes.cri-o.annotations.checkpoint.name", "counter"),
        ("org.criu.checkpoint.container.name", "counter"),
        (
            "org.criu.checkpoint.rootfsImageName",
            "docker.io/library/ckpt-counter:latest",
        ),
        ("org.criu.checkpoint.criu.version", "4.2.1"),
        ("org.criu.checkpoint.runtime.name", "io.containerd.runc.v2"),
        ("org.criu.checkpoint.engine.name", "containerd"),
    ] {
        assert_eq!(ann[key], want, "{key} in {ann}");
    }
    assert!(ann["org.criu.checkpoint.rootfsImageID"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let blob = layout.join("blobs/sha256").join(layer);
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        std::fs::read(archive).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    for p in [&layout, &blob] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
    // An existing destination is refused, and left as it was.
    let again = Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
        .args([
            "image",
            archive,
            "x",
            "--oci-layout",
            layout.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );
    assert_eq!(
        common::entries(out.path())
            .iter()
            .filter(|e| e.starts_with(".ckpt-image"))
            .count(),
        0
    );
}
