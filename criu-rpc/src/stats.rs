//! CRIU's `stats-dump` file: two magics, then one length-prefixed `StatsEntry`.

use prost::Message;

use crate::proto::{DumpStatsEntry, StatsEntry};

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("not a CRIU stats image (bad magic)")]
    Magic,
    #[error("stats image truncated")]
    Truncated,
    #[error("stats image has no dump entry")]
    NoDump,
    #[error("stats image: {0}")]
    Decode(#[from] prost::DecodeError),
}

pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStatsEntry, StatsError> {
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if word(0) != Some(IMG_SERVICE_MAGIC) || word(4) != Some(STATS_MAGIC) {
        return Err(StatsError::Magic);
    }
    let len = word(8).ok_or(StatsError::Truncated)? as usize;
    let body = bytes.get(12..12 + len).ok_or(StatsError::Truncated)?;
    StatsEntry::decode(body)?.dump.ok_or(StatsError::NoDump)
}
