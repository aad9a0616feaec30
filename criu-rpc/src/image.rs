//! CRIU's image framing, the one place it is read and written: an image is
//! `IMG_COMMON_MAGIC` (or `IMG_SERVICE_MAGIC` for service files such as
//! `stats-dump`) then the image's own magic, each a little-endian u32, then
//! entries, each a little-endian u32 length and that many bytes of protobuf.
//! `inventory.img` alone has no common magic, only its own. Some images carry
//! raw data after their first entry (a ghost file's contents); [`first`] reads
//! only that entry. The SysV IPC images carry each object's contents after its
//! entry; [`ipc_objects`] frames them.
//!
//! Images are read as hostile input: a length past the end, or trailing bytes
//! that are not a whole entry, are refused rather than guessed at.

pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;

/// The image kinds the shim reads or writes, by CRIU's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Inventory,
    Pstree,
    Core,
    Ids,
    Creds,
    Seccomp,
    Mountpoints,
    GhostFile,
    TtyInfo,
    Utsns,
    Pagemap,
    Files,
    Stats,
    IpcShm,
    IpcMsg,
    IpcSem,
    Mm,
}

impl Kind {
    /// (file magic, image magic); the inventory has only the second.
    fn magics(self) -> (Option<u32>, u32) {
        use Kind::*;
        let common = Some(IMG_COMMON_MAGIC);
        match self {
            Inventory => (None, 0x5831_3116),
            Pstree => (common, 0x5027_3030),
            Core => (common, 0x5505_3847),
            Ids => (common, 0x5443_2030),
            Creds => (common, 0x5402_3547),
            Seccomp => (common, 0x6441_3049),
            Mountpoints => (common, 0x5556_3928),
            GhostFile => (common, 0x5258_3605),
            TtyInfo => (common, 0x5945_3036),
            Utsns => (common, 0x5447_3203),
            Pagemap => (common, 0x5608_4025),
            Files => (common, 0x5630_3138),
            Stats => (Some(IMG_SERVICE_MAGIC), 0x5709_3306),
            IpcShm => (common, 0x4628_3044),
            IpcMsg => (common, 0x5545_3737),
            IpcSem => (common, 0x5957_3019),
            Mm => (common, 0x5749_2820),
        }
    }

    fn header_len(self) -> usize {
        match self.magics().0 {
            Some(_) => 8,
            None => 4,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not a CRIU {0:?} image (bad magic)")]
    Magic(Kind),
    #[error("CRIU {kind:?} image: entry {index} claims {len} bytes, {left} left")]
    Truncated {
        kind: Kind,
        index: usize,
        len: u32,
        left: usize,
    },
    #[error("CRIU {0:?} image has no entry")]
    Empty(Kind),
    #[error("CRIU {kind:?} image: entry {index}: {why}")]
    Decode {
        kind: Kind,
        index: usize,
        why: String,
    },
}

fn word(b: &[u8], i: usize) -> Option<u32> {
    b.get(i..i + 4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

fn check_magic(bytes: &[u8], kind: Kind) -> Result<&[u8], ImageError> {
    let (file, image) = kind.magics();
    let ok = match file {
        Some(f) => word(bytes, 0) == Some(f) && word(bytes, 4) == Some(image),
        None => word(bytes, 0) == Some(image),
    };
    match ok {
        true => Ok(&bytes[kind.header_len()..]),
        false => Err(ImageError::Magic(kind)),
    }
}

/// Every entry of an image made of entries only.
pub fn entries(bytes: &[u8], kind: Kind) -> Result<Vec<&[u8]>, ImageError> {
    let mut rest = check_magic(bytes, kind)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (entry, after) = split_entry(rest, kind, out.len())?;
        out.push(entry);
        rest = after;
    }
    Ok(out)
}

/// The first entry of an image (whatever follows it).
pub fn first(bytes: &[u8], kind: Kind) -> Result<&[u8], ImageError> {
    let rest = check_magic(bytes, kind)?;
    if rest.is_empty() {
        return Err(ImageError::Empty(kind));
    }
    Ok(split_entry(rest, kind, 0)?.0)
}

fn split_entry(b: &[u8], kind: Kind, index: usize) -> Result<(&[u8], &[u8]), ImageError> {
    let truncated = |len| ImageError::Truncated {
        kind,
        index,
        len,
        left: b.len().saturating_sub(4),
    };
    let len = word(b, 0).ok_or_else(|| truncated(0))?;
    let end = 4usize
        .checked_add(len as usize)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| truncated(len))?;
    Ok((&b[4..end], &b[end..]))
}

/// An image of these entries.
pub fn encode<E: AsRef<[u8]>>(kind: Kind, entries: &[E]) -> Vec<u8> {
    let (file, image) = kind.magics();
    let size: usize = entries.iter().map(|e| 4 + e.as_ref().len()).sum();
    let mut out = Vec::with_capacity(8 + size);
    if let Some(f) = file {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out.extend_from_slice(&image.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(e.as_ref());
    }
    out
}

/// One SysV IPC object of an `ipcns-shm`, `ipcns-msg` or `ipcns-sem` image.
#[derive(Debug, Clone, PartialEq)]
pub struct IpcObject<'a> {
    pub desc: crate::images::IpcDescEntry,
    /// A segment's size in bytes, a set's semaphores, a queue's messages.
    pub size: u64,
    /// Its bytes in the image: the entry with its length, then its contents.
    pub span: &'a [u8],
}

/// Every object of a SysV IPC image. What follows each entry, as CRIU's
/// criu/ipc_ns.c writes it: a segment's bytes rounded up to 4, unless they
/// are in a `pagemap-shmem` image (`in_pagemaps`, what CRIU 4 writes); a
/// set's u16 values rounded up to 8; each message of a queue as an entry and
/// its bytes rounded up to 8.
pub fn ipc_objects(bytes: &[u8], kind: Kind) -> Result<Vec<IpcObject<'_>>, ImageError> {
    let mut rest = check_magic(bytes, kind)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let index = out.len();
        let (entry, after) = split_entry(rest, kind, index)?;
        let (desc, size, tail) = ipc_entry(kind, entry, index)?;
        let tail = match tail {
            Tail::Bytes(n) => n,
            Tail::Messages(n) => messages_len(after, n, index)?,
        };
        let len = (rest.len() - after.len())
            .checked_add(usize::try_from(tail).unwrap_or(usize::MAX))
            .filter(|&l| l <= rest.len())
            .ok_or(ImageError::Truncated {
                kind,
                index,
                len: u32::try_from(tail).unwrap_or(u32::MAX),
                left: after.len(),
            })?;
        out.push(IpcObject {
            desc,
            size,
            span: &rest[..len],
        });
        rest = &rest[len..];
    }
    Ok(out)
}

/// What follows an IPC object's entry.
enum Tail {
    Bytes(u64),
    Messages(u32),
}

fn ipc_entry(
    kind: Kind,
    entry: &[u8],
    index: usize,
) -> Result<(crate::images::IpcDescEntry, u64, Tail), ImageError> {
    use crate::images::{IpcMsgEntry, IpcSemEntry, IpcShmEntry};
    use prost::Message;
    let bad = |why: String| ImageError::Decode { kind, index, why };
    let round = |n: u64, to: u64| n.div_ceil(to).saturating_mul(to);
    match kind {
        Kind::IpcShm => {
            let e = IpcShmEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
            let inline = if e.in_pagemaps == Some(true) {
                0
            } else {
                round(e.size, 4)
            };
            Ok((e.desc, e.size, Tail::Bytes(inline)))
        }
        Kind::IpcSem => {
            let e = IpcSemEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
            let values = round(2 * u64::from(e.nsems), 8);
            Ok((e.desc, e.nsems.into(), Tail::Bytes(values)))
        }
        Kind::IpcMsg => {
            let e = IpcMsgEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
            Ok((e.desc, e.qnum.into(), Tail::Messages(e.qnum)))
        }
        _ => Err(bad(format!("{kind:?} is not a SysV IPC image"))),
    }
}

/// The bytes `n` messages of a queue take at the start of `b`.
fn messages_len(b: &[u8], n: u32, index: usize) -> Result<u64, ImageError> {
    use prost::Message;
    let kind = Kind::IpcMsg;
    let mut rest = b;
    for _ in 0..n {
        let (entry, after) = split_entry(rest, kind, index)?;
        let m = crate::images::IpcMsg::decode(entry).map_err(|e| ImageError::Decode {
            kind,
            index,
            why: format!("message: {e}"),
        })?;
        let body = usize::try_from(u64::from(m.msize).div_ceil(8) * 8).unwrap_or(usize::MAX);
        rest = after.get(body..).ok_or(ImageError::Truncated {
            kind,
            index,
            len: m.msize,
            left: after.len(),
        })?;
    }
    Ok((b.len() - rest.len()) as u64)
}

/// An entry with its length, then `then` as it is (an IPC object's contents).
pub fn framed(entry: &[u8], then: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entry.len() + then.len());
    out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    out.extend_from_slice(entry);
    out.extend_from_slice(then);
    out
}

/// An image of these spans, each already framed ([`IpcObject::span`], [`framed`]).
pub fn encode_spans<S: AsRef<[u8]>>(kind: Kind, spans: &[S]) -> Vec<u8> {
    let mut out = encode::<&[u8]>(kind, &[]);
    for s in spans {
        out.extend_from_slice(s.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_the_inventory_has_one_magic() {
        for kind in [Kind::Core, Kind::Inventory, Kind::Stats] {
            let img = encode(kind, &[b"ab".as_slice(), b"", b"cde"]);
            assert_eq!(img.len(), kind.header_len() + 4 + 2 + 4 + 4 + 3);
            assert_eq!(entries(&img, kind).unwrap(), vec![&b"ab"[..], b"", b"cde"]);
            assert_eq!(first(&img, kind).unwrap(), b"ab");
        }
    }

    #[test]
    fn lengths_past_the_end_and_wrong_magics_are_refused() {
        let mut img = encode(Kind::Core, &[b"abcd"]);
        assert_eq!(
            entries(&img, Kind::Pstree),
            Err(ImageError::Magic(Kind::Pstree))
        );
        img.truncate(img.len() - 1);
        assert!(matches!(
            entries(&img, Kind::Core),
            Err(ImageError::Truncated { len: 4, .. })
        ));
        let mut img = encode(Kind::Core, &[b"x"]);
        img.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            entries(&img, Kind::Core),
            Err(ImageError::Truncated {
                index: 1,
                len: u32::MAX,
                ..
            })
        ));
        img.truncate(img.len() - 2);
        assert!(entries(&img, Kind::Core).is_err());
        assert_eq!(
            first(&encode::<&[u8]>(Kind::Core, &[]), Kind::Core),
            Err(ImageError::Empty(Kind::Core))
        );
    }

    fn desc(id: u32) -> crate::images::IpcDescEntry {
        crate::images::IpcDescEntry {
            key: 0x52e2c1 + id,
            uid: 0,
            gid: 0,
            cuid: 0,
            cgid: 0,
            mode: 0o600,
            id,
        }
    }

    #[test]
    fn ipc_objects_span_their_contents() {
        use crate::images::{IpcMsg, IpcMsgEntry, IpcSemEntry, IpcShmEntry};
        use prost::Message;
        let shm = |id, size, in_pagemaps| IpcShmEntry {
            desc: desc(id),
            size,
            in_pagemaps,
            hugetlb_flag: None,
        };
        // In pagemaps: nothing follows; inline: 5 bytes rounded up to 8.
        let a = framed(&shm(1, 4096, Some(true)).encode_to_vec(), b"");
        let b = framed(&shm(2, 5, None).encode_to_vec(), b"12345\0\0\0");
        let img = encode_spans(Kind::IpcShm, &[&a, &b]);
        let got = ipc_objects(&img, Kind::IpcShm).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].desc.id, got[0].size, got[0].span),
            (1, 4096, &a[..])
        );
        assert_eq!((got[1].desc.id, got[1].size, got[1].span), (2, 5, &b[..]));
        // Three semaphores: 6 bytes of values, rounded up to 8.
        let sem = IpcSemEntry {
            desc: desc(3),
            nsems: 3,
        }
        .encode_to_vec();
        let s = framed(&sem, &[7; 8]);
        let img = encode_spans(Kind::IpcSem, &[&s, &s]);
        let got = ipc_objects(&img, Kind::IpcSem).unwrap();
        assert_eq!((got.len(), got[1].size, got[1].span), (2, 3, &s[..]));
        // A queue of two messages, each an entry and its bytes.
        let msg = |msize| IpcMsg { mtype: 1, msize }.encode_to_vec();
        let q = IpcMsgEntry {
            desc: desc(4),
            qbytes: 16384,
            qnum: 2,
        }
        .encode_to_vec();
        let body = [framed(&msg(3), &[1; 8]), framed(&msg(9), &[2; 16])].concat();
        let m = framed(&q, &body);
        let img = encode_spans(Kind::IpcMsg, &[&m]);
        let got = ipc_objects(&img, Kind::IpcMsg).unwrap();
        assert_eq!((got[0].desc.id, got[0].size, got[0].span), (4, 2, &m[..]));
        // A cut anywhere in the contents is refused.
        for cut in [1, 9, 20] {
            let short = &img[..img.len() - cut];
            assert!(ipc_objects(short, Kind::IpcMsg).is_err(), "cut {cut}");
        }
        let short = encode_spans(Kind::IpcShm, &[&b[..b.len() - 1]]);
        assert!(matches!(
            ipc_objects(&short, Kind::IpcShm),
            Err(ImageError::Truncated { index: 0, .. })
        ));
    }
}
