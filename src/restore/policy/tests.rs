//! The checks over a whole image set: a small one built here as CRIU lays it
//! out, judged against specs, then forged at random (property tests): every
//! forgery is refused or confined, never a panic.

use std::path::Path;

use criu_rpc::image::{encode, Kind};
use criu_rpc::images::*;
use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};

use super::{confine, creds::caps_of};
use crate::error::Error;

const DEFAULT_CAPS: u64 = (1 << 0) | (1 << 5) | (1 << 7) | (1 << 6) | (1 << 10);

fn spec(uid: u32, caps: &[&str], nnp: bool, seccomp: Option<Value>) -> Value {
    let mut s = json!({
        "process": {"user": {"uid": uid, "gid": uid},
                    "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                    "noNewPrivileges": nnp,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024}]},
        "mounts": [{"destination": "/proc", "type": "proc", "options": ["nosuid", "noexec", "nodev"]},
                   {"destination": "/etc/hosts", "type": "bind", "options": ["rbind", "ro"]}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/run/netns/x"}],
                  "maskedPaths": [], "readonlyPaths": []}
    });
    if let Some(sc) = seccomp {
        s["linux"]["seccomp"] = sc;
    }
    s
}

fn default_spec() -> Value {
    spec(
        0,
        &[
            "CAP_CHOWN",
            "CAP_KILL",
            "CAP_SETUID",
            "CAP_SETGID",
            "CAP_NET_BIND_SERVICE",
        ],
        false,
        None,
    )
}

fn words(m: u64) -> Vec<u32> {
    vec![m as u32, (m >> 32) as u32]
}

pub(super) fn creds(uid: u32, caps: u64) -> CredsEntry {
    CredsEntry {
        uid,
        gid: uid,
        euid: uid,
        egid: uid,
        suid: uid,
        sgid: uid,
        fsuid: uid,
        fsgid: uid,
        cap_inh: words(0),
        cap_prm: words(caps),
        cap_eff: words(caps),
        cap_bnd: words(caps),
        cap_amb: words(0),
        ..Default::default()
    }
}

fn mount(id: u32, parent: u32, fstype: u32, at: &str, flags: u32, ext: Option<&str>) -> Vec<u8> {
    MntEntry {
        fstype,
        mnt_id: id,
        root_dev: 1,
        parent_mnt_id: parent,
        flags,
        root: "/".into(),
        mountpoint: at.into(),
        source: "none".into(),
        options: String::new(),
        ext_key: ext.map(String::from),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Namespace ids: these pid, mount and network ones, the rest CRIU's own.
fn ids(pid: u32, mnt: u32, net: u32) -> TaskKobjIdsEntry {
    TaskKobjIdsEntry {
        pid_ns_id: Some(pid),
        mnt_ns_id: Some(mnt),
        net_ns_id: Some(net),
        ipc_ns_id: Some(4),
        uts_ns_id: Some(5),
        user_ns_id: Some(6),
        time_ns_id: Some(7),
        ..Default::default()
    }
}

fn write_ids(dir: &Path, ids: TaskKobjIdsEntry) {
    std::fs::write(
        dir.join("ids-1.img"),
        encode(Kind::Ids, &[ids.encode_to_vec()]),
    )
    .unwrap();
}

/// A one-process image set: init with `c`, in new pid, mnt and net
/// namespaces (ids 11, 12, 13; CRIU's own are 1, 2, 3).
fn write_images(dir: &Path, c: CredsEntry) {
    let w = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes).unwrap();
    let host = ids(1, 2, 3);
    w(
        "inventory.img",
        encode(
            Kind::Inventory,
            &[InventoryEntry {
                img_version: 2,
                root_ids: Some(host),
                lsmtype: Some(0),
                network_lock_method: Some(1),
            }
            .encode_to_vec()],
        ),
    );
    w(
        "pstree.img",
        encode(
            Kind::Pstree,
            &[PstreeEntry {
                pid: 1,
                ppid: 0,
                pgid: 1,
                sid: 1,
                threads: vec![1],
            }
            .encode_to_vec()],
        ),
    );
    write_ids(dir, ids(11, 12, 13));
    let rlimits = TaskRlimitsEntry {
        rlimits: vec![
            RlimitEntry {
                cur: u64::MAX,
                max: u64::MAX
            };
            16
        ],
    };
    let core = CoreEntry {
        mtype: 1,
        tc: Some(TaskCoreEntry {
            comm: Some("app".into()),
            rlimits: Some(rlimits),
            oom_score_adj: Some(-999),
            ..Default::default()
        }),
        ids: None,
        thread_core: Some(ThreadCoreEntry {
            creds: Some(c),
            sched_policy: Some(1),
            sched_prio: Some(50),
            ..Default::default()
        }),
    };
    w("core-1.img", encode(Kind::Core, &[core.encode_to_vec()]));
    w(
        "mountpoints-12.img",
        encode(
            Kind::Mountpoints,
            &[
                mount(1, 0, 0, "/", 0, None),
                mount(2, 1, 1, "/proc", 0xe, None),
                mount(3, 1, 5, "/etc/hosts", 0, Some("/etc/hosts")),
            ],
        ),
    );
}

fn images(c: CredsEntry) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write_images(d.path(), c);
    d
}

fn read_core(dir: &Path) -> CoreEntry {
    let bytes = std::fs::read(dir.join("core-1.img")).unwrap();
    CoreEntry::decode(criu_rpc::image::first(&bytes, Kind::Core).unwrap()).unwrap()
}

#[test]
fn a_like_checkpoint_is_confined_and_written_back() {
    let d = images(creds(0, u64::MAX));
    let c = confine(d.path(), &default_spec()).unwrap();
    assert_eq!((c.threads, c.filtered), (1, false));
    c.write().unwrap();
    let core = read_core(d.path());
    let tc = core.thread_core.unwrap();
    assert_eq!(caps_of(tc.creds.as_ref().unwrap()).eff, DEFAULT_CAPS);
    assert_eq!(
        (tc.sched_policy, tc.sched_prio),
        (Some(0), Some(0)),
        "no CAP_SYS_NICE"
    );
    let task = core.tc.unwrap();
    assert_eq!(
        task.rlimits.unwrap().rlimits[7],
        RlimitEntry {
            cur: 1024,
            max: 1024
        }
    );
    assert!(
        task.oom_score_adj.unwrap() >= 0,
        "never below the runtime's own"
    );
    assert_eq!(
        task.comm.as_deref(),
        Some("app"),
        "the fields not rewritten stay"
    );
    // Confined once, the images pass again unchanged: create and ckpt-runc both run it.
    let again = confine(d.path(), &default_spec()).unwrap();
    assert!(again
        .writes
        .iter()
        .all(|(p, b)| std::fs::read(p).unwrap() == *b || p.ends_with("seccomp.img")));
}

#[test]
fn the_spec_filter_replaces_the_chain_and_no_new_privs_is_set() {
    let d = images(creds(1000, 0));
    let sc = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read", "exit"], "action": "SCMP_ACT_ALLOW"}]});
    let c = confine(d.path(), &spec(1000, &[], true, Some(sc))).unwrap();
    assert!(c.filtered);
    c.write().unwrap();
    let tc = read_core(d.path()).thread_core.unwrap();
    assert_eq!((tc.seccomp_mode, tc.seccomp_filter), (Some(2), Some(0)));
    assert_eq!(tc.creds.unwrap().no_new_privs, Some(1));
    let bytes = std::fs::read(d.path().join("seccomp.img")).unwrap();
    let s = SeccompEntry::decode(criu_rpc::image::first(&bytes, Kind::Seccomp).unwrap()).unwrap();
    assert_eq!(s.seccomp_filters.len(), 1);
    assert_eq!(s.seccomp_filters[0].prev, None);
}

#[test]
fn refusals_name_the_rule() {
    let root_into_user = confine(images(creds(0, 0)).path(), &spec(1000, &[], true, None));
    assert!(
        matches!(root_into_user, Err(Error::Privilege { field: "uid", .. })),
        "{root_into_user:?}"
    );

    let d = images(creds(0, u64::MAX));
    let mut hostpid = default_spec();
    hostpid["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "network"}]);
    assert!(matches!(
        confine(d.path(), &hostpid),
        Err(Error::Unlike {
            field: "namespace",
            ..
        })
    ));

    // The root task in CRIU's own (the host's) pid namespace.
    write_ids(d.path(), ids(1, 12, 13));
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::Privilege {
            field: "namespace",
            ..
        })
    ));

    let d = images(creds(0, u64::MAX));
    std::fs::write(
        d.path().join("mountpoints-12.img"),
        encode(
            Kind::Mountpoints,
            &[
                mount(1, 0, 0, "/", 0, None),
                mount(2, 1, 1, "/proc", 0xe, None),
                mount(4, 1, 3, "/dev", 0, None),
            ],
        ),
    )
    .unwrap();
    let e = confine(d.path(), &default_spec()).unwrap_err();
    assert!(matches!(e, Error::Privilege { field: "mount", .. }), "{e}");
    assert!(e.to_string().contains("/dev"), "{e}");

    let d = images(creds(0, u64::MAX));
    std::fs::write(
        d.path().join("mountpoints-12.img"),
        encode(
            Kind::Mountpoints,
            &[
                mount(1, 0, 0, "/", 0, None),
                mount(2, 1, 1, "/proc", 0x0, None),
            ],
        ),
    )
    .unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::Privilege {
            field: "mount flags",
            ..
        })
    ));

    let d = images(creds(0, u64::MAX));
    let g = GhostFileEntry {
        uid: 0,
        gid: 0,
        mode: 0o104755,
        rdev: None,
    };
    std::fs::write(
        d.path().join("ghost-file-1.img"),
        encode(Kind::GhostFile, &[g.encode_to_vec()]),
    )
    .unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::Privilege {
            field: "ghost file mode",
            ..
        })
    ));
    let g = GhostFileEntry {
        uid: 0,
        gid: 0,
        mode: 0o020600,
        rdev: Some(0x103),
    };
    std::fs::write(
        d.path().join("ghost-file-1.img"),
        encode(Kind::GhostFile, &[g.encode_to_vec()]),
    )
    .unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::Privilege {
            field: "ghost file type",
            ..
        })
    ));
}

#[test]
fn unknown_fields_in_credentials_are_refused() {
    let d = images(creds(0, u64::MAX));
    let mut c = creds(0, u64::MAX).encode_to_vec();
    c.extend_from_slice(&[0xa0, 0x01, 0x01]); // field 20, varint 1
    let mut tc = crate::pbwire::Fields::default();
    tc.push(10, &c);
    let mut core = crate::pbwire::Fields::default();
    core.set_varint(1, 1);
    core.push(5, &tc.encode());
    std::fs::write(
        d.path().join("core-1.img"),
        encode(Kind::Core, &[core.encode()]),
    )
    .unwrap();
    let e = confine(d.path(), &default_spec()).unwrap_err();
    assert!(
        matches!(&e, Error::BadImage { why, .. } if why.contains("unknown field 20")),
        "{e}"
    );
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
}

/// Each image of the set, forged one way or another.
fn forge(bytes: &[u8], how: u8, at: usize, value: u8) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let i = at % b.len().max(1);
    match how % 4 {
        0 => b.truncate(i),
        1 if !b.is_empty() => b[i] ^= value.max(1),
        2 => b
            .splice(i..i, [0xff, 0xff, 0xff, 0x7f, value])
            .for_each(drop),
        _ => b.extend_from_slice(&[value; 9]),
    }
    b
}

const FILES: [&str; 5] = [
    "inventory.img",
    "pstree.img",
    "ids-1.img",
    "core-1.img",
    "mountpoints-12.img",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn forged_images_are_refused_or_confined_never_a_panic(
        file in 0..FILES.len(), how in any::<u8>(), at in any::<usize>(), value in any::<u8>(),
        uid in prop_oneof![Just(0u32), Just(1000u32)],
    ) {
        let d = images(creds(uid, u64::MAX));
        let path = d.path().join(FILES[file]);
        let forged = forge(&std::fs::read(&path).unwrap(), how, at, value);
        std::fs::write(&path, forged).unwrap();
        match confine(d.path(), &default_spec()) {
            Ok(c) => {
                c.write().unwrap();
                let tc = read_core(d.path()).thread_core.unwrap();
                let caps = caps_of(tc.creds.as_ref().unwrap());
                prop_assert_eq!(caps.eff & !DEFAULT_CAPS, 0, "a confined forgery holds no more");
            }
            Err(e) => prop_assert!(!matches!(e, Error::Other(_)), "{e}"),
        }
    }

    #[test]
    fn image_framing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        for kind in [Kind::Core, Kind::Inventory, Kind::Mountpoints] {
            let _ = criu_rpc::image::entries(&bytes, kind);
            let _ = criu_rpc::image::first(&bytes, kind);
        }
    }
}

/// A `tmpfs-dev-<id>.tar.gz.img` of these (path, type, major, minor, mode).
fn tmpfs_image(members: &[(&str, tar::EntryType, u32, u32, u32)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (path, kind, major, minor, mode) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_device_major(*major).unwrap();
        h.set_device_minor(*minor).unwrap();
        h.set_mode(*mode);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn device_nodes_and_set_id_files_in_a_tmpfs_are_refused_unless_the_spec_has_them() {
    use tar::EntryType::{Block, Char, Regular};
    let d = images(creds(0, u64::MAX));
    let dev = d.path().join("tmpfs-dev-42.tar.gz.img");
    std::fs::write(
        &dev,
        tmpfs_image(&[
            ("./null", Char, 1, 3, 0o666),
            ("./tmp", Regular, 0, 0, 0o644),
        ]),
    )
    .unwrap();
    assert!(confine(d.path(), &default_spec()).is_ok());
    std::fs::write(
        &dev,
        tmpfs_image(&[("./null", Char, 1, 3, 0o666), ("./sda", Block, 8, 0, 0o660)]),
    )
    .unwrap();
    let e = confine(d.path(), &default_spec()).unwrap_err();
    assert!(
        matches!(&e, Error::Privilege { field: "device node", found, .. } if found.contains("sda (8:0)")),
        "{e}"
    );
    let mut with_sda = default_spec();
    with_sda["linux"]["devices"] =
        json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
    assert!(
        confine(d.path(), &with_sda).is_ok(),
        "a device the spec lists"
    );
    std::fs::write(&dev, tmpfs_image(&[("./kmem", Char, 1, 2, 0o640)])).unwrap();
    assert!(confine(d.path(), &with_sda).is_err());
    std::fs::write(&dev, tmpfs_image(&[("./su", Regular, 0, 0, 0o4755)])).unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::Privilege {
            field: "file mode",
            ..
        })
    ));
    std::fs::write(&dev, b"not gzip").unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::BadImage { .. })
    ));
}

#[test]
fn a_pagemap_must_match_its_pages_image() {
    use crate::restore::pagemap::{encode, PE_PRESENT};
    let d = images(creds(0, u64::MAX));
    std::fs::write(
        d.path().join("pagemap-1.img"),
        encode(3, &[(0x1000, 2, PE_PRESENT)]),
    )
    .unwrap();
    std::fs::write(d.path().join("pages-3.img"), vec![0u8; 8192]).unwrap();
    assert!(confine(d.path(), &default_spec()).is_ok());
    std::fs::write(d.path().join("pages-3.img"), vec![0u8; 4096]).unwrap();
    let e = confine(d.path(), &default_spec()).unwrap_err();
    assert!(
        matches!(&e, Error::BadImage { image, .. } if image == "pagemap-1.img"),
        "{e}"
    );
    std::fs::write(
        d.path().join("pagemap-1.img"),
        encode(3, &[(u64::MAX - 0xfff, 9, PE_PRESENT)]),
    )
    .unwrap();
    assert!(matches!(
        confine(d.path(), &default_spec()),
        Err(Error::BadImage { .. })
    ));
}

#[test]
fn a_zombie_child_passes_without_credentials_but_a_live_thread_never_does() {
    let d = images(creds(0, u64::MAX));
    let tree = |entries: &[(u32, u32)]| {
        let e: Vec<Vec<u8>> = entries
            .iter()
            .map(|&(pid, ppid)| {
                PstreeEntry {
                    pid,
                    ppid,
                    pgid: 1,
                    sid: 1,
                    threads: vec![pid],
                }
                .encode_to_vec()
            })
            .collect();
        std::fs::write(d.path().join("pstree.img"), encode(Kind::Pstree, &e)).unwrap();
    };
    let dead = |state: Option<u32>| CoreEntry {
        mtype: 1,
        tc: Some(TaskCoreEntry {
            task_state: state,
            comm: Some("defunct".into()),
            ..Default::default()
        }),
        ids: None,
        thread_core: None,
    };
    tree(&[(1, 0), (2, 1)]);
    let core2 = |state| {
        let core = encode(Kind::Core, &[dead(Some(state)).encode_to_vec()]);
        std::fs::write(d.path().join("core-2.img"), core).unwrap();
        confine(d.path(), &default_spec())
    };
    let c = core2(2).unwrap();
    assert_eq!(c.threads, 1, "the zombie's image is left as it is");
    assert!(
        matches!(core2(1), Err(Error::BadImage { .. })),
        "alive, without credentials"
    );
    tree(&[(2, 0)]);
    assert!(
        matches!(core2(2), Err(Error::BadImage { .. })),
        "a dead root"
    );
}

#[test]
fn an_external_mount_is_only_the_spec_source_at_its_own_destination() {
    let d = images(creds(0, u64::MAX));
    let with = |m: Vec<u8>| {
        let all = [
            mount(1, 0, 0, "/", 0, None),
            mount(2, 1, 1, "/proc", 0xe, None),
            m,
        ];
        std::fs::write(
            d.path().join("mountpoints-12.img"),
            encode(Kind::Mountpoints, &all),
        )
        .unwrap();
        confine(d.path(), &default_spec())
    };
    assert!(with(mount(3, 1, 5, "/etc/hosts", 0, Some("/etc/hosts"))).is_ok());
    let moved = with(mount(3, 1, 5, "/etc/shadow", 0, Some("/etc/hosts")));
    assert!(
        matches!(moved, Err(Error::Privilege { field: "mount", .. })),
        "{moved:?}"
    );
    let other_key = with(mount(3, 1, 5, "/etc/hosts", 0, Some("/var/lib/kubelet")));
    assert!(
        matches!(other_key, Err(Error::Privilege { field: "mount", .. })),
        "{other_key:?}"
    );
    let old_style = MntEntry {
        ext_mount: Some(true),
        ..MntEntry::decode(mount(3, 1, 5, "/etc/hosts", 0, None).as_slice()).unwrap()
    };
    assert!(
        with(old_style.encode_to_vec()).is_err(),
        "an external mount without a key"
    );
}

/// A checkpoint of a restored container: CRIU put the first restore in a
/// time namespace of its own, as it does every restore, and the dump has it.
#[test]
fn a_time_namespace_of_its_own_is_what_every_restore_gets() {
    let d = images(creds(0, u64::MAX));
    let mut own = ids(11, 12, 13);
    own.time_ns_id = Some(17);
    write_ids(d.path(), own);
    assert!(confine(d.path(), &default_spec()).is_ok());
    // The other namespaces are still compared.
    own.uts_ns_id = Some(15);
    write_ids(d.path(), own);
    assert!(confine(d.path(), &default_spec()).is_err());
}

#[test]
fn a_namespace_the_spec_joins_by_path_may_be_the_hosts_in_the_images() {
    let d = images(creds(0, u64::MAX));
    // A hostNetwork checkpoint: the root task in CRIU's own network namespace.
    write_ids(d.path(), ids(11, 12, 3));
    assert!(
        confine(d.path(), &default_spec()).is_ok(),
        "joined by path: runc has CRIU join it"
    );
    let mut created = default_spec();
    created["linux"]["namespaces"][2] = json!({"type": "network"});
    let e = confine(d.path(), &created).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Privilege {
                field: "namespace",
                ..
            }
        ),
        "{e}"
    );
}
