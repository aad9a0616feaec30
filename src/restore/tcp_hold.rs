//! Established TCP connections between containers of one pod, which come
//! back one container at a time.
//!
//! A RestorePod's containers are restored one by one, each by its own
//! StartContainer (ckpt-runc's `create`). CRIU takes every restored socket
//! out of repair mode with `TCP_REPAIR_OFF` (criu/include/sk-inet.h, as of
//! 4.2.1), on which Linux sends the peer a window probe at once. While the
//! peer's container is not restored yet, nothing in the new pod's network
//! namespace has its address and port, so the probe is answered with a reset
//! and the connection that was just restored breaks: the first container of
//! a connected pair died as it came back. CRIU's own network lock does not
//! help: the pod's namespace is external to each restore, and CRIU unlocks
//! at the end of every restore, before the tasks (and the probe) run.
//!
//! So each connection over loopback is held as CRIU's lock holds one on a
//! host (criu/netfilter.c): iptables rules in the container's network
//! namespace drop its packets both ways, except CRIU's own (marked
//! [`SOCCR_MARK`]), from before its restore until both its ends are back.
//! The restore after which both ends are in the namespace removes both
//! ends' rules; TCP then retransmits what was dropped. A peer that never
//! comes back leaves its end held, as a peer host that died would. A
//! connection to anything but loopback is not held: its peer is not
//! restored here.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::sockets::{addr, AF_INET, AF_INET6};
use crate::error::{Context, Error, Result};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// The mark of the packets CRIU's repair code sends itself (soccr/soccr.h),
/// which its own lock lets through.
const SOCCR_MARK: &str = "0xC114";
const TCP_ESTABLISHED: u32 = 1;

/// One end of a connection, as its socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Conn {
    fn peer(self) -> Conn {
        Conn {
            local: self.remote,
            remote: self.local,
        }
    }

    fn is_loopback(&self) -> bool {
        loopback(self.local.ip()) && loopback(self.remote.ip())
    }

    /// The iptables command and the two rules that drop this end's packets
    /// (in and out), as CRIU's `IPTABLES_CONN_CMD` does.
    fn rules(&self) -> (&'static str, [Vec<String>; 2]) {
        let cmd = match self.local {
            SocketAddr::V4(_) => "iptables",
            SocketAddr::V6(_) => "ip6tables",
        };
        let rule = |chain: &str, from: SocketAddr, to: SocketAddr| {
            [
                chain,
                "-p",
                "tcp",
                "-m",
                "mark",
                "!",
                "--mark",
                SOCCR_MARK,
                "-s",
                &from.ip().to_string(),
                "--sport",
                &from.port().to_string(),
                "-d",
                &to.ip().to_string(),
                "--dport",
                &to.port().to_string(),
                "-j",
                "DROP",
            ]
            .map(str::to_string)
            .to_vec()
        };
        let rules = [
            rule("INPUT", self.remote, self.local),
            rule("OUTPUT", self.local, self.remote),
        ];
        (cmd, rules)
    }
}

fn loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The established TCP connections over loopback in a checkpoint's
/// `files.img`.
pub fn loopback_connections(images: &Path) -> Result<Vec<Conn>> {
    let mut out = Vec::new();
    for (sk, isk) in super::sockets::inet_socks(images)? {
        let Some(remote) = sk.remote.filter(|_| sk.tcp && isk.state == TCP_ESTABLISHED) else {
            continue;
        };
        let c = Conn {
            local: sk.local,
            remote,
        };
        if c.is_loopback() && !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The connections `/proc/net/tcp` or `tcp6` lists: `sl local rem st …`,
/// addresses as the kernel's words in hex, ports in hex.
pub fn parse_proc_tcp(text: &str) -> Vec<Conn> {
    let end = |s: &str| -> Option<SocketAddr> {
        let (ip, port) = s.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let words: Option<Vec<u32>> = (0..ip.len() / 8)
            .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
            .collect();
        let family = if ip.len() == 8 { AF_INET } else { AF_INET6 };
        addr(family, &words?, u32::from(port))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some(Conn {
                local: end(f.next()?)?,
                remote: end(f.next()?)?,
            })
        })
        .collect()
}

/// Where the held connections of one restore are.
pub struct Hold {
    /// The network namespace's path; `None`: the host's, ours.
    netns: Option<PathBuf>,
    conns: Vec<Conn>,
}

impl Hold {
    /// Holds the loopback connections of the checkpoint in `images`, in the
    /// network namespace `spec` joins, before they are restored there.
    /// Nothing to hold: a checkpoint without any, or a new namespace of the
    /// container's own, where no peer can come.
    pub fn before_restore(images: &Path, spec: &Spec) -> Result<Hold> {
        let net = crate::oci::namespace(spec, LinuxNamespaceType::Network);
        let (netns, conns) = match net {
            Some(n) if n.path().is_none() => (None, Vec::new()),
            n => (
                n.and_then(|n| n.path().clone()),
                loopback_connections(images)?,
            ),
        };
        let hold = Hold { netns, conns };
        if !hold.conns.is_empty() {
            hold.in_netns(|| {
                for c in &hold.conns {
                    iptables_rules(*c, "-I")?;
                }
                Ok(())
            })?;
        }
        Ok(hold)
    }

    /// After the restore: the connections whose both ends are now in the
    /// namespace go, with their peers' rules; the others stay held for
    /// their peer's restore. After a failed restore this end will not come:
    /// its rules go. Problems are logged, not returned: the restore is done.
    pub fn after_restore(self, restored: bool) {
        if self.conns.is_empty() {
            return;
        }
        let done = self.in_netns(|| {
            let present = match restored {
                true => tcp_table()?,
                false => Vec::new(),
            };
            for c in &self.conns {
                let both_back = restored && present.contains(&c.peer());
                if both_back || !restored {
                    iptables_rules(*c, "-D")?;
                }
                if both_back {
                    iptables_rules(c.peer(), "-D")?;
                }
            }
            Ok(())
        });
        if let Err(e) = done {
            eprintln!(
                "ckpt-runc: releasing held TCP connections {:?}: {e}",
                self.conns
            );
        }
    }

    /// Runs `f` on a thread in the namespace (namespaces are per thread for
    /// setns); what it spawns runs there too.
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let Some(path) = &self.netns else {
            return f();
        };
        let ns = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .ctx(|| format!("join {}", path.display()))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Other("network namespace thread panicked".into())))
        })
    }
}

/// Inserts (`-I`) or deletes (`-D`) the rules that hold `c`. Deleting one
/// that is not there (the other end deleted it) is no error.
fn iptables_rules(c: Conn, op: &str) -> Result<()> {
    let (cmd, rules) = c.rules();
    for rule in rules {
        let out = Command::new(cmd)
            .args(["-w", "-t", "filter", op])
            .args(&rule)
            .output()
            .ctx(|| format!("run {cmd}"))?;
        let missing = op == "-D" && out.status.code() == Some(1);
        if !out.status.success() && !missing {
            return Err(Error::Other(format!(
                "{cmd} {op} {}: {}: {}",
                rule.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// The TCP sockets of the calling thread's network namespace.
fn tcp_table() -> Result<Vec<Conn>> {
    let mut conns = Vec::new();
    for f in ["tcp", "tcp6"] {
        let path = format!("/proc/thread-self/net/{f}");
        match std::fs::read_to_string(&path) {
            Ok(text) => conns.extend(parse_proc_tcp(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(|| format!("read {path}")),
        }
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::sockets::{FILES_IMG, IPPROTO_TCP, SOCK_STREAM};
    use criu_rpc::image::{encode, Kind};
    use criu_rpc::images::{FileEntry, InetSkEntry};
    use prost::Message;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
    }

    /// An inet socket's file entry as CRIU writes it (type 3: INETSK).
    fn isk(family: u32, state: u32, src: &[u32], sport: u32, dst: &[u32], dport: u32) -> Vec<u8> {
        FileEntry {
            r#type: 3,
            id: 1,
            isk: Some(InetSkEntry {
                family,
                r#type: SOCK_STREAM,
                proto: IPPROTO_TCP,
                state,
                src_port: sport,
                dst_port: dport,
                src_addr: src.to_vec(),
                dst_addr: dst.to_vec(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn established_loopback_connections_are_read_from_files_img() {
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        let pod_ip = u32::from_ne_bytes([10, 88, 0, 7]);
        let lo6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        let mapped = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), lo];
        let reg = FileEntry {
            r#type: 1,
            id: 2,
            isk: None,
        }
        .encode_to_vec();
        let img = encode(
            Kind::Files,
            &[
                reg,
                isk(AF_INET, 10, &[lo], 7000, &[0], 0), // listening
                isk(AF_INET, 1, &[lo], 7000, &[lo], 45422),
                isk(AF_INET, 1, &[lo], 45422, &[lo], 7000),
                isk(AF_INET, 1, &[pod_ip], 80, &[pod_ip], 5000), // not loopback
                isk(AF_INET6, 1, &lo6, 9000, &lo6, 9001),
                isk(AF_INET6, 1, &mapped, 7001, &mapped, 7002),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILES_IMG), img).unwrap();
        let got = loopback_connections(dir.path()).unwrap();
        let lo6 = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        let c = |local, remote| Conn { local, remote };
        assert_eq!(
            got,
            [
                c(v4([127, 0, 0, 1], 7000), v4([127, 0, 0, 1], 45422)),
                c(v4([127, 0, 0, 1], 45422), v4([127, 0, 0, 1], 7000)),
                c(lo6(9000), lo6(9001)),
                c(v4([127, 0, 0, 1], 7001), v4([127, 0, 0, 1], 7002)),
            ]
        );
        assert_eq!(got[0].peer(), got[1]);
        // No files.img: nothing; a broken one: refused.
        let empty = tempfile::tempdir().unwrap();
        assert!(loopback_connections(empty.path()).unwrap().is_empty());
        std::fs::write(empty.path().join(FILES_IMG), b"nope").unwrap();
        assert!(loopback_connections(empty.path()).is_err());
    }

    #[test]
    fn proc_net_tcp_lines_are_read_as_the_kernel_writes_them() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 22926 1 0 100 0 0 10 0\n\
   1: 0100007F:1B58 0100007F:B16E 01 00000000:00000000 00:00000000 00000000     0        0 22927 1 0 20 4 30 10 -1\n";
        let got = parse_proc_tcp(tcp);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Conn {
                local: v4([127, 0, 0, 1], 7000),
                remote: v4([127, 0, 0, 1], 45422)
            }
        );
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:2328 00000000000000000000000001000000:2329 01 0\n\
   1: 0000000000000000FFFF00000100007F:1B59 0000000000000000FFFF00000100007F:1B5A 01 0\n";
        let got = parse_proc_tcp(tcp6);
        let lo6 = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        assert_eq!(got[0].local, lo6(9000));
        assert_eq!(got[0].remote, lo6(9001));
        assert_eq!(got[1].local, v4([127, 0, 0, 1], 7001));
    }

    #[test]
    fn the_rules_drop_both_directions_but_criu_s_own_packets() {
        let c = Conn {
            local: v4([127, 0, 0, 1], 7000),
            remote: v4([127, 0, 0, 1], 45422),
        };
        let (cmd, [input, output]) = c.rules();
        assert_eq!(cmd, "iptables");
        assert_eq!(
            input.join(" "),
            "INPUT -p tcp -m mark ! --mark 0xC114 -s 127.0.0.1 --sport 45422 -d 127.0.0.1 --dport 7000 -j DROP"
        );
        assert_eq!(
            output.join(" "),
            "OUTPUT -p tcp -m mark ! --mark 0xC114 -s 127.0.0.1 --sport 7000 -d 127.0.0.1 --dport 45422 -j DROP"
        );
        let six = Conn {
            local: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1),
            remote: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 2),
        };
        assert_eq!(six.rules().0, "ip6tables");
    }
}
