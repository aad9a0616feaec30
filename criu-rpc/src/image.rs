//! CRIU's image framing, the one place it is read and written: an image is
//! `IMG_COMMON_MAGIC` (or `IMG_SERVICE_MAGIC` for service files such as
//! `stats-dump`) then the image's own magic, each a little-endian u32, then
//! entries, each a little-endian u32 length and that many bytes of protobuf.
//! `inventory.img` alone has no common magic, only its own. Some images carry
//! raw data after their first entry (a ghost file's contents); [`first`] reads
//! only that entry.
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
}
