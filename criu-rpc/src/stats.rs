//! Two of CRIU's images the shim reads or writes ([`crate::image`] frames them):
//! `stats-dump` holds one `StatsEntry`; `utsns-<id>.img` one `UtsnsEntry`.

use prost::Message;

use crate::image::{self, ImageError, Kind};
use crate::proto::{DumpStatsEntry, StatsEntry, UtsnsEntry};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("stats image has no dump entry")]
    NoDump,
    #[error("stats image: {0}")]
    Decode(#[from] prost::DecodeError),
}

pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStatsEntry, StatsError> {
    let body = image::first(bytes, Kind::Stats)?;
    StatsEntry::decode(body)?.dump.ok_or(StatsError::NoDump)
}

/// The names a `utsns-<id>.img` restores.
pub fn parse_utsns(bytes: &[u8]) -> Result<UtsnsEntry, StatsError> {
    Ok(UtsnsEntry::decode(image::first(bytes, Kind::Utsns)?)?)
}

/// A `utsns-<id>.img` that restores these names.
pub fn encode_utsns(e: &UtsnsEntry) -> Vec<u8> {
    image::encode(Kind::Utsns, &[e.encode_to_vec()])
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
            Err(StatsError::Image(ImageError::Truncated { .. }))
        ));
        assert!(matches!(
            parse_dump_stats(REAL),
            Err(StatsError::Image(ImageError::Magic(Kind::Stats)))
        ));
    }
}
