//! A checkpoint's inet sockets, made fit for the pod they come back in,
//! before CRIU restores them (ckpt-runc's `create`, [`super::runc`]). The
//! rules and why: docs/sockets.md.
//!
//! CRIU restores every socket with the addresses it was dumped with: a TCP
//! connection (criu/sk-tcp.c) is bound to its old local address and port and
//! put back in repair mode, a bound socket (criu/sk-inet.c, `inet_bind`) is
//! bound to its old address. A new pod keeps only loopback and the wildcard
//! address of the old one; its own address went with the old pod, and
//! binding it fails the whole restore (EADDRNOTAVAIL). A connection is also
//! of use only with its peer, which comes back only if it was checkpointed
//! with it. CRIU's `--tcp-close` closes every connection, so it cannot tell
//! them apart; instead `files.img` is rewritten, socket by socket:
//!
//! - a TCP connection with both ends on loopback, whose other end is in the
//!   same checkpoint or, for a container of a pod checkpoint, may come with
//!   another of its containers ([`super::tcp_hold`] holds it until then):
//!   left as it is, restored connected;
//! - any other TCP connection: restored closed, as `--tcp-close` restores one
//!   (`restore_one_tcp`): neither bound nor connected, and shut down both ways
//!   (the state TCP_CLOSE, no ports or addresses, `shutdown` BOTH, which CRIU
//!   applies with shutdown(2) and whose ENOTCONN it expects). The program reads
//!   EOF, and its writes fail with EPIPE, as after a reset;
//! - restored into a network namespace other than the host's, a socket bound
//!   to an address that is neither loopback nor the wildcard (a listener or a
//!   UDP socket on the old pod's address): bound to its family's wildcard
//!   address on the same port, which in a pod's namespace reaches what the
//!   old address did, the pod's (new) address, and loopback as well.
//!
//! Every field this does not change is kept byte for byte ([`Fields`]).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use criu_rpc::image::{self, Kind};
use criu_rpc::images::{FileEntry, InetSkEntry};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use prost::Message;

use super::stage::Staged;
use crate::error::{Context, Error, Result};
use crate::pbwire::Fields;

pub(super) const FILES_IMG: &str = "files.img";
const INVENTORY_IMG: &str = "inventory.img";
pub(super) const AF_INET: u32 = 2;
pub(super) const AF_INET6: u32 = 10;
pub(super) const SOCK_STREAM: u32 = 1;
pub(super) const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u64 = 7;
/// `sk_shutdown` BOTH (images/sk-opts.proto).
const SHUTDOWN_BOTH: u64 = 3;

/// Field numbers: `file_entry.isk`, and `inet_sk_entry`'s.
const ISK: u32 = 4;
const STATE: u32 = 6;
const SRC_PORT: u32 = 7;
const DST_PORT: u32 = 8;
const SRC_ADDR: u32 = 11;
const DST_ADDR: u32 = 12;
const IFNAME: u32 = 17;
const SHUTDOWN: u32 = 19;

/// Where a restore goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target {
    /// A network namespace other than the host's (a pod's own): the
    /// checkpoint's non-loopback addresses are not there.
    pub new_netns: bool,
    /// The archive is a container of a pod checkpoint: RestorePod may bring
    /// the other ends of its loopback connections in other containers.
    pub pod: bool,
}

/// What becomes of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Keep,
    /// Restored closed: neither bound nor connected, shut down both ways.
    Close,
    /// Bound to the wildcard address, on its port.
    Wildcard,
}

/// An inet socket as its image entry describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sock {
    pub tcp: bool,
    pub local: SocketAddr,
    /// The peer of a connected socket.
    pub remote: Option<SocketAddr>,
}

impl fmt::Display for Sock {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let proto = if self.tcp { "TCP" } else { "inet" };
        match self.remote {
            Some(r) => write!(f, "{proto} {} -> {r}", self.local),
            None => write!(f, "{proto} {}", self.local),
        }
    }
}

/// Rewrites the sockets of the restore `s` for the container `spec` runs.
pub fn prepare(s: &Staged, spec: &Spec) -> Result<()> {
    let target = Target {
        new_netns: new_netns(spec),
        pod: s
            .info()
            .is_some_and(|i| of_pod_checkpoint(Path::new(&i.source))),
    };
    for (sk, fate) in rewrite(&s.images(), target)? {
        eprintln!("ckpt-runc: {sk}: restored {fate:?}");
    }
    Ok(())
}

/// `inventory_entry.network_lock_method` (images/inventory.proto) and its
/// value `skip` (`NETWORK_LOCK_SKIP`).
const NETWORK_LOCK_METHOD: u32 = 11;
const NETWORK_LOCK_SKIP: u64 = 3;

/// A restore into a network namespace CRIU joins (the pod's, by path) set
/// not to unlock it. CRIU locks only a namespace it creates itself, yet
/// unlocks any it restores into, with the method the dump used, which it takes
/// from `inventory.img` over any option (criu/image.c): with iptables, up to
/// seven `iptables-restore` and `sh` runs in the pod's namespace to remove a
/// chain that is not there, about half of CRIU's restore time here
/// (criu/net.c, `network_unlock`). Nothing is locked either way; loopback
/// connections are held around the restore by [`super::tcp_hold`].
pub fn skip_network_unlock(spec: &Spec, images: &Path) -> Result<()> {
    if crate::oci::joined(spec, LinuxNamespaceType::Network).is_none() {
        return Ok(());
    }
    let path = images.join(INVENTORY_IMG);
    let bytes = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
    let bad = |why: String| Error::BadImage {
        image: INVENTORY_IMG.into(),
        why,
    };
    let entry = image::first(&bytes, Kind::Inventory).map_err(|e| bad(e.to_string()))?;
    let mut inv = Fields::parse(entry).map_err(|e| bad(e.to_string()))?;
    inv.set_varint(NETWORK_LOCK_METHOD, NETWORK_LOCK_SKIP);
    replace(&path, &image::encode(Kind::Inventory, &[inv.encode()]))
}

/// Whether the container gets a network namespace other than the host's
/// (ours): one of its own, or the pod's. A pod on the node's network has its
/// containers join the pause's namespace by path too, which is the host's.
fn new_netns(spec: &Spec) -> bool {
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
    match crate::oci::namespace(spec, LinuxNamespaceType::Network) {
        None => false,
        Some(n) => match n.path() {
            None => true,
            Some(p) => ino(p) != ino(Path::new("/proc/self/ns/net")),
        },
    }
}

/// Whether `archive` is one of a pod checkpoint's archives (a manifest that
/// names it beside it), as RestorePod creates its containers from them.
fn of_pod_checkpoint(archive: &Path) -> bool {
    let (Some(dir), Some(name)) = (archive.parent(), archive.file_name()) else {
        return false;
    };
    crate::pod::manifest::Manifest::read(dir)
        .is_ok_and(|m| m.containers.iter().any(|c| name == c.archive.as_str()))
}

/// `images/files.img`, if the checkpoint has one.
fn files_img(images: &Path) -> Result<Option<Vec<u8>>> {
    let path = images.join(FILES_IMG);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("read {}", path.display())),
    }
}

/// Every inet socket of `images/files.img`, with its entry.
pub fn inet_socks(images: &Path) -> Result<Vec<(Sock, InetSkEntry)>> {
    let Some(bytes) = files_img(images)? else {
        return Ok(Vec::new());
    };
    let entries = image::entries(&bytes, Kind::Files).map_err(|e| bad(e.to_string()))?;
    let socks = entries.iter().map(|e| inet_sock(e));
    Ok(socks
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// Rewrites `images/files.img` for `target`; the sockets changed, and how.
pub fn rewrite(images: &Path, target: Target) -> Result<Vec<(Sock, Fate)>> {
    let Some(bytes) = files_img(images)? else {
        return Ok(Vec::new());
    };
    let path = images.join(FILES_IMG);
    let entries = image::entries(&bytes, Kind::Files).map_err(|e| bad(e.to_string()))?;
    let decoded = entries
        .iter()
        .map(|e| inet_sock(e))
        .collect::<Result<Vec<_>>>()?;
    let conns: HashSet<(SocketAddr, SocketAddr)> = decoded
        .iter()
        .flatten()
        .filter_map(|(s, _)| Some((s.local, s.remote?)).filter(|_| s.tcp))
        .collect();
    let mut changed = Vec::new();
    let mut out = Vec::with_capacity(entries.len());
    for (raw, d) in entries.iter().zip(&decoded) {
        let Some((sk, isk)) = d else {
            out.push(raw.to_vec());
            continue;
        };
        match fate(sk, &conns, target) {
            Fate::Keep => out.push(raw.to_vec()),
            f => {
                out.push(rewritten(raw, isk, f)?);
                changed.push((*sk, f));
            }
        }
    }
    if !changed.is_empty() {
        replace(&path, &image::encode(Kind::Files, &out))?;
    }
    Ok(changed)
}

/// The rule for one socket (the module's doc says why).
pub fn fate(sk: &Sock, conns: &HashSet<(SocketAddr, SocketAddr)>, t: Target) -> Fate {
    if let Some(remote) = sk.remote.filter(|_| sk.tcp) {
        let on_loopback = sk.local.ip().is_loopback() && remote.ip().is_loopback();
        let peer_comes = conns.contains(&(remote, sk.local)) || t.pod;
        return match on_loopback && peer_comes {
            true => Fate::Keep,
            false => Fate::Close,
        };
    }
    let ip = sk.local.ip();
    let elsewhere = sk.local.port() != 0 && !ip.is_loopback() && !ip.is_unspecified();
    match t.new_netns && elsewhere {
        true => Fate::Wildcard,
        false => Fate::Keep,
    }
}

/// The inet socket an entry of `files.img` holds, if any, and its entry.
fn inet_sock(raw: &[u8]) -> Result<Option<(Sock, InetSkEntry)>> {
    let e = FileEntry::decode(raw).map_err(|e| bad(e.to_string()))?;
    let Some(isk) = e.isk else { return Ok(None) };
    let end = |words: &[u32], port: u32| addr(isk.family, words, port);
    let local = end(&isk.src_addr, isk.src_port)
        .ok_or_else(|| bad(format!("an inet socket with no address: {isk:?}")))?;
    let remote = match isk.dst_port {
        0 => None,
        p => Some(end(&isk.dst_addr, p).ok_or_else(|| bad(format!("no peer address: {isk:?}")))?),
    };
    let sk = Sock {
        tcp: isk.r#type == SOCK_STREAM && isk.proto == IPPROTO_TCP,
        local,
        remote,
    };
    Ok(Some((sk, isk)))
}

/// The entry `raw` with its socket made `fate`; every other field as it was.
fn rewritten(raw: &[u8], isk: &InetSkEntry, fate: Fate) -> Result<Vec<u8>> {
    let wire = |e: crate::pbwire::WireError| bad(e.to_string());
    let mut file = Fields::parse(raw).map_err(wire)?;
    let mut sk = Fields::parse(file.get(ISK).unwrap_or_default()).map_err(wire)?;
    // A wildcard address as long as the old one: CRIU checks the length.
    let mut tail = Vec::new();
    sk.remove(SRC_ADDR);
    sk.remove(IFNAME);
    prost::encoding::uint32::encode_repeated(SRC_ADDR, &vec![0; isk.src_addr.len()], &mut tail);
    if fate == Fate::Close {
        sk.set_varint(STATE, TCP_CLOSE);
        sk.set_varint(SRC_PORT, 0);
        sk.set_varint(DST_PORT, 0);
        sk.set_varint(SHUTDOWN, SHUTDOWN_BOTH);
        sk.remove(DST_ADDR);
        let zeros = vec![0; isk.dst_addr.len()];
        prost::encoding::uint32::encode_repeated(DST_ADDR, &zeros, &mut tail);
    }
    let mut body = sk.encode();
    body.extend_from_slice(&tail);
    file.set(ISK, &[&body]);
    Ok(file.encode())
}

/// An address from CRIU's words (network-order bytes, as the host stores
/// them), as the IPv4 one where it is IPv4-mapped.
pub(super) fn addr(family: u32, words: &[u32], port: u32) -> Option<SocketAddr> {
    let port = u16::try_from(port).ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?)),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(..16)?).ok()?);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Replaces `path` whole: a new private file renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("img.rewrite");
    let _ = std::fs::remove_file(&tmp);
    crate::safefs::create_new(&tmp, 0o600)?
        .write_all(bytes)
        .ctx(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("replace {}", path.display()))
}

fn bad(why: String) -> Error {
    Error::BadImage {
        image: FILES_IMG.into(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: [u8; 4] = [10, 88, 0, 7];
    const LO: [u8; 4] = [127, 0, 0, 1];

    fn w(ip: [u8; 4]) -> Vec<u32> {
        vec![u32::from_ne_bytes(ip)]
    }

    fn mapped(ip: [u8; 4]) -> Vec<u32> {
        vec![
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes(ip),
        ]
    }

    /// A socket's entry as CRIU writes it, with a field this module does not
    /// declare (13, `fown`) that must survive a rewrite.
    fn entry(
        family: u32,
        ty: u32,
        state: u32,
        src: (Vec<u32>, u32),
        dst: (Vec<u32>, u32),
    ) -> Vec<u8> {
        let isk = InetSkEntry {
            id: 7,
            ino: 99,
            family,
            r#type: ty,
            proto: if ty == SOCK_STREAM { IPPROTO_TCP } else { 17 },
            state,
            src_port: src.1,
            dst_port: dst.1,
            src_addr: src.0,
            dst_addr: dst.0,
            ifname: Some("eth0".into()),
            shutdown: None,
        };
        let mut body = isk.encode_to_vec();
        body.extend_from_slice(&[0x6a, 0x02, 0x08, 0x05]); // fown { uid: 5 }
        let mut f = Fields::default();
        f.set_varint(1, 3);
        f.set_varint(2, 7);
        f.push(ISK, &body);
        f.encode()
    }

    fn tcp(state: u32, src: (Vec<u32>, u32), dst: (Vec<u32>, u32)) -> Vec<u8> {
        entry(AF_INET, SOCK_STREAM, state, src, dst)
    }

    fn image(entries: &[Vec<u8>]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(FILES_IMG),
            image::encode(Kind::Files, entries),
        )
        .unwrap();
        d
    }

    fn read_back(dir: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(dir.join(FILES_IMG)).unwrap();
        let e = image::entries(&bytes, Kind::Files).unwrap();
        e.into_iter().map(<[u8]>::to_vec).collect()
    }

    fn isk(raw: &[u8]) -> InetSkEntry {
        FileEntry::decode(raw).unwrap().isk.unwrap()
    }

    fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    const NEW_POD: Target = Target {
        new_netns: true,
        pod: false,
    };

    /// One socket of each case, in a new pod's restore: the entries and the
    /// dir of their `files.img`, rewritten.
    fn each_case() -> (Vec<Vec<u8>>, tempfile::TempDir, Vec<(SocketAddr, Fate)>) {
        let v6 = |src, dst| entry(AF_INET6, SOCK_STREAM, 1, src, dst);
        let entries = vec![
            Fields::default().encode(),                 // 0 a file that is no socket
            tcp(10, (w([0; 4]), 8080), (w([0; 4]), 0)), // 1 listening on the wildcard
            tcp(10, (w(POD), 8443), (w([0; 4]), 0)),    // 2 listening on the pod's address
            tcp(1, (w(LO), 7000), (w(LO), 40000)),      // 3, 4: a loopback pair
            tcp(1, (w(LO), 40000), (w(LO), 7000)),
            tcp(1, (w(LO), 40001), (w(LO), 9000)), // 5 to a loopback peer not here
            tcp(1, (w(POD), 40002), (w([10, 96, 0, 1]), 443)), // 6 out of the pod
            entry(AF_INET, 2, 1, (w(POD), 53), (w([10, 96, 0, 10]), 53)), // 7 UDP
            v6((mapped(LO), 7001), (mapped(LO), 7002)), // 8, 9 a mapped loopback pair
            v6((mapped(LO), 7002), (mapped(LO), 7001)),
            tcp(8, (w(POD), 40003), (w([192, 0, 2, 9]), 80)), // 10 CLOSE_WAIT, out
        ];
        let d = image(&entries);
        let got = rewrite(d.path(), NEW_POD).unwrap();
        let fates = got.iter().map(|(s, f)| (s.local, *f)).collect();
        (entries, d, fates)
    }

    #[test]
    fn each_socket_gets_its_rule() {
        let (entries, d, fates) = each_case();
        assert_eq!(
            fates,
            [
                (sa(POD, 8443), Fate::Wildcard),
                (sa(LO, 40001), Fate::Close),
                (sa(POD, 40002), Fate::Close),
                (sa(POD, 53), Fate::Wildcard),
                (sa(POD, 40003), Fate::Close),
            ]
        );
        let back = read_back(d.path());
        for i in [0, 1, 3, 4, 8, 9] {
            assert_eq!(back[i], entries[i], "entry {i} changed");
        }
        // What the hold of loopback connections then sees: the pairs, kept.
        let held = super::super::tcp_hold::loopback_connections(d.path()).unwrap();
        assert_eq!(held.len(), 4, "{held:?}");
    }

    #[test]
    fn a_rewritten_socket_keeps_every_field_it_does_not_change() {
        let (_, d, _) = each_case();
        let back = read_back(d.path());
        let closed = isk(&back[6]);
        let c = &closed;
        assert_eq!(
            (c.state, c.src_port, c.dst_port, c.shutdown),
            (7, 0, 0, Some(3))
        );
        assert_eq!((&c.src_addr, &c.dst_addr), (&vec![0], &vec![0]));
        assert_eq!(closed.ifname, None);
        let udp = isk(&back[7]);
        assert_eq!((udp.src_addr, udp.src_port), (vec![0], 53));
        assert_eq!(
            (udp.dst_addr, udp.dst_port, udp.state),
            (w([10, 96, 0, 10]), 53, 1)
        );
        for i in [2, 5, 6, 7, 10] {
            assert!(
                back[i].windows(4).any(|x| x == [0x6a, 0x02, 0x08, 0x05]),
                "entry {i} lost a field it does not declare"
            );
            assert_eq!(FileEntry::decode(back[i].as_slice()).unwrap().id, 7);
        }
    }

    #[test]
    fn a_pod_keeps_loopback_peers_and_the_host_keeps_its_addresses() {
        let entries = vec![
            tcp(10, (w(POD), 8443), (w([0; 4]), 0)),
            tcp(1, (w(LO), 40001), (w(LO), 9000)),
            tcp(1, (w(POD), 40002), (w([10, 96, 0, 1]), 443)),
        ];
        let d = image(&entries);
        let got = rewrite(
            d.path(),
            Target {
                new_netns: false,
                pod: true,
            },
        )
        .unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.local, got[0].1), (sa(POD, 40002), Fate::Close));
        let back = read_back(d.path());
        assert_eq!((&back[0], &back[1]), (&entries[0], &entries[1]));
    }

    #[test]
    fn nothing_to_change_leaves_the_image_alone_and_a_bad_one_is_refused() {
        let d = image(&[tcp(10, (w([0; 4]), 80), (w([0; 4]), 0))]);
        let before = std::fs::metadata(d.path().join(FILES_IMG)).unwrap();
        assert!(rewrite(d.path(), NEW_POD).unwrap().is_empty());
        let after = std::fs::metadata(d.path().join(FILES_IMG)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(before.ino(), after.ino(), "rewritten for nothing");
        let none = tempfile::tempdir().unwrap();
        assert!(rewrite(none.path(), Target::default()).unwrap().is_empty());
        std::fs::write(none.path().join(FILES_IMG), b"nope").unwrap();
        assert!(matches!(
            rewrite(none.path(), Target::default()),
            Err(Error::BadImage { .. })
        ));
        // An inet socket without an address is no socket CRIU wrote.
        let d = image(&[entry(AF_INET, SOCK_STREAM, 1, (vec![], 1), (vec![], 2))]);
        assert!(rewrite(d.path(), Target::default()).is_err());
    }

    fn netns_spec(path: Option<&str>) -> Spec {
        let ns = match path {
            Some(p) => serde_json::json!({"type": "network", "path": p}),
            None => serde_json::json!({"type": "network"}),
        };
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [ns]}
        }))
        .unwrap()
    }

    /// An inventory as CRIU 4.2.1 writes it, in part: img_version,
    /// network_lock_method iptables, and the dump's run id (field 13,
    /// undeclared here), which must survive.
    fn inventory(dir: &Path) -> Vec<u8> {
        let mut f = Fields::default();
        f.set_varint(1, 2);
        f.set_varint(NETWORK_LOCK_METHOD, 1);
        f.push(13, b"241a349d");
        let bytes = image::encode(Kind::Inventory, &[f.encode()]);
        std::fs::write(dir.join(INVENTORY_IMG), &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_restore_into_a_joined_netns_skips_the_unlock_and_keeps_every_other_field() {
        let d = tempfile::tempdir().unwrap();
        let before = inventory(d.path());
        skip_network_unlock(&netns_spec(Some("/var/run/netns/p")), d.path()).unwrap();
        let after = std::fs::read(d.path().join(INVENTORY_IMG)).unwrap();
        let entry = image::first(&after, Kind::Inventory).unwrap();
        let inv = criu_rpc::images::InventoryEntry::decode(entry).unwrap();
        assert_eq!(inv.network_lock_method, Some(NETWORK_LOCK_SKIP as u32));
        assert_eq!(inv.img_version, 2);
        let f = Fields::parse(entry).unwrap();
        assert_eq!(f.get(13), Some(&b"241a349d"[..]));
        assert_ne!(before, after);
        // A namespace CRIU creates was locked by it, and is unlocked as dumped.
        let own = tempfile::tempdir().unwrap();
        let before = inventory(own.path());
        skip_network_unlock(&netns_spec(None), own.path()).unwrap();
        assert_eq!(
            std::fs::read(own.path().join(INVENTORY_IMG)).unwrap(),
            before
        );
        // A forged inventory is refused, not passed on.
        std::fs::write(d.path().join(INVENTORY_IMG), b"junk").unwrap();
        assert!(skip_network_unlock(&netns_spec(Some("/p")), d.path()).is_err());
    }
}
