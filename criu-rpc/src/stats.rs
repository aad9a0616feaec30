//! CRIU's image files that the shim reads or writes: two magics (the file
//! kind's, then the image's), then length-prefixed protobuf entries.
//! `stats-dump` holds one `StatsEntry`; `utsns-<id>.img` one `UtsnsEntry`.

use prost::Message;

use crate::proto::{DumpStatsEntry, StatsEntry, UtsnsEntry};

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const STATS_MAGIC: u32 = 0x5709_3306;
const UTSNS_MAGIC: u32 = 0x5447_3203;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("not the CRIU image expected (bad magic)")]
    Magic,
    #[error("CRIU image truncated")]
    Truncated,
    #[error("stats image has no dump entry")]
    NoDump,
    #[error("stats image: {0}")]
    Decode(#[from] prost::DecodeError),
}

pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStatsEntry, StatsError> {
    let body = entry(bytes, IMG_SERVICE_MAGIC, STATS_MAGIC)?;
    StatsEntry::decode(body)?.dump.ok_or(StatsError::NoDump)
}

/// The names a `utsns-<id>.img` restores.
pub fn parse_utsns(bytes: &[u8]) -> Result<UtsnsEntry, StatsError> {
    Ok(UtsnsEntry::decode(entry(
        bytes,
        IMG_COMMON_MAGIC,
        UTSNS_MAGIC,
    )?)?)
}

/// A `utsns-<id>.img` that restores these names.
pub fn encode_utsns(e: &UtsnsEntry) -> Vec<u8> {
    let body = e.encode_to_vec();
    let mut out = Vec::with_capacity(12 + body.len());
    for w in [IMG_COMMON_MAGIC, UTSNS_MAGIC, body.len() as u32] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&body);
    out
}

/// The first entry of an image with these magics.
fn entry(bytes: &[u8], kind: u32, magic: u32) -> Result<&[u8], StatsError> {
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if word(0) != Some(kind) || word(4) != Some(magic) {
        return Err(StatsError::Magic);
    }
    let len = word(8).ok_or(StatsError::Truncated)? as usize;
    bytes.get(12..12 + len).ok_or(StatsError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `utsns-12.img` as CRIU 4.1.1 wrote it for a pod named "expa".
    const REAL: &[u8] = &[
        0x19, 0x43, 0x56, 0x54, 0x03, 0x32, 0x47, 0x54, 0x0e, 0x00, 0x00, 0x00, 0x0a, 0x04, 0x65,
        0x78, 0x70, 0x61, 0x12, 0x06, 0x28, 0x6e, 0x6f, 0x6e, 0x65, 0x29,
    ];

    #[test]
    fn utsns_images_read_and_write() {
        let e = parse_utsns(REAL).unwrap();
        assert_eq!(
            (e.nodename.as_str(), e.domainname.as_str()),
            ("expa", "(none)")
        );
        assert_eq!(encode_utsns(&e), REAL);
        let new = UtsnsEntry {
            nodename: "pod-b".into(),
            domainname: "(none)".into(),
        };
        assert_eq!(parse_utsns(&encode_utsns(&new)).unwrap(), new);
        assert!(matches!(
            parse_utsns(&REAL[..20]),
            Err(StatsError::Truncated)
        ));
        assert!(matches!(parse_dump_stats(REAL), Err(StatsError::Magic)));
    }
}
