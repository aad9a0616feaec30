//! CRIU's `pagemap-<pid>.img`: which virtual addresses of a process have pages
//! in `pages-<id>.img`, and where. The image ([`criu_rpc::image`] frames it)
//! is a head naming the pages image, then runs of pages in address order. Pages of a run with `PE_PRESENT` follow those of the run
//! before it in the pages image, so a run's offset there is the sum of the
//! present runs before it.
//!
//! A run's length is `nr_pages` (field 5, a u64) since CRIU 4.2, which
//! leaves the old u32 field 2 (now `compat_nr_pages`) at 0; images of older
//! CRIUs have only field 2 (criu commit afb2e6c3f). Either is read.
//!
//! A plain dump marks the pages of private anonymous memory (not the stack)
//! `PE_LAZY` as well: a lazy restore leaves those to the lazy-pages daemon
//! and reads only the others from the pages image itself.

use criu_rpc::image::{self, ImageError, Kind};
use prost::Message;

pub const PAGE_SIZE: u64 = 4096;

pub const PE_PARENT: u32 = 1 << 0;
pub const PE_LAZY: u32 = 1 << 1;
pub const PE_PRESENT: u32 = 1 << 2;

/// No process's memory reaches past this (57-bit addresses, 5-level paging);
/// a run that does is forged.
const ADDRESS_LIMIT: u64 = 1 << 57;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PagemapError {
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("pagemap image has no head")]
    Truncated,
    #[error("pagemap run at {0:#x} reaches past the address space")]
    Range(u64),
    #[error("pagemap image: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("pagemap image has pages in a parent checkpoint, which a restore here does not have")]
    Parent,
    #[error("pagemap runs out of address order at {0:#x}")]
    Order(u64),
}

#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// One run of pages: `nr_pages` from `vaddr`, at `offset` in the pages image
/// (when present there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
    pub offset: u64,
}

impl Run {
    pub fn lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
    pub fn present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }
    fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE_SIZE
    }

    /// The run's end, if it stays within the address space (checked once,
    /// at parse, so that [`end`](Self::end) cannot overflow later).
    fn checked_end(&self) -> Option<u64> {
        self.nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| self.vaddr.checked_add(len))
            .filter(|&end| end <= ADDRESS_LIMIT)
    }
}

/// A process's pagemap.
#[derive(Debug, Clone, PartialEq)]
pub struct Pagemap {
    /// The `<id>` of its `pages-<id>.img`.
    pub pages_id: u32,
    pub runs: Vec<Run>,
}

impl Pagemap {
    pub fn parse(bytes: &[u8]) -> Result<Pagemap, PagemapError> {
        let entries = image::entries(bytes, Kind::Pagemap)?;
        let (head, rest) = entries.split_first().ok_or(PagemapError::Truncated)?;
        let head = PagemapHead::decode(*head)?;
        let (mut runs, mut offset, mut last_end) = (Vec::new(), 0, 0);
        for body in rest {
            let e = PagemapEntry::decode(*body)?;
            // Images older than CRIU 3.x had no flags: a run then was present
            // unless in the parent.
            let flags = e.flags.unwrap_or(if e.in_parent == Some(true) {
                PE_PARENT
            } else {
                PE_PRESENT
            });
            if flags & PE_PARENT != 0 || e.in_parent == Some(true) {
                return Err(PagemapError::Parent);
            }
            if e.vaddr < last_end {
                return Err(PagemapError::Order(e.vaddr));
            }
            let run = Run {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages)),
                flags,
                offset,
            };
            last_end = run.checked_end().ok_or(PagemapError::Range(run.vaddr))?;
            if run.present() {
                offset += run.nr_pages * PAGE_SIZE;
            }
            runs.push(run);
        }
        Ok(Pagemap {
            pages_id: head.pages_id,
            runs,
        })
    }

    /// How many bytes the pages image holds: every present page.
    pub fn pages_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.present())
            .map(|r| r.nr_pages * PAGE_SIZE)
            .sum()
    }

    /// Where the pages from `vaddr` on are in the pages image: (offset, how
    /// many pages, at most `max`, follow there contiguously). Adjacent runs
    /// join: their pages are adjacent in the image too. `None` if `vaddr` has
    /// no present page.
    pub fn find(&self, vaddr: u64, max: u64) -> Option<(u64, u64)> {
        let i = self.runs.partition_point(|r| r.end() <= vaddr);
        let first = self
            .runs
            .get(i)
            .filter(|r| r.vaddr <= vaddr && r.present())?;
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let offset = first.offset + (vaddr - first.vaddr);
        let mut n = (first.end() - vaddr) / PAGE_SIZE;
        let mut end = first.end();
        for r in &self.runs[i + 1..] {
            if n >= max || r.vaddr != end || !r.present() {
                break;
            }
            n += r.nr_pages;
            end = r.end();
        }
        Some((offset, n.min(max)))
    }
}

/// A pagemap image of these runs (`(vaddr, nr_pages, flags)`) as CRIU 4.2
/// writes it, for tests.
#[cfg(test)]
pub fn encode(pages_id: u32, runs: &[(u64, u32, u32)]) -> Vec<u8> {
    encode_as(pages_id, runs, false)
}

/// The same, as CRIU before 4.2 wrote it when `pre_4_2`.
#[cfg(test)]
fn encode_as(pages_id: u32, runs: &[(u64, u32, u32)], pre_4_2: bool) -> Vec<u8> {
    let mut entries = vec![PagemapHead { pages_id }.encode_to_vec()];
    for &(vaddr, nr_pages, flags) in runs {
        entries.push(
            PagemapEntry {
                vaddr,
                compat_nr_pages: if pre_4_2 { nr_pages } else { 0 },
                in_parent: None,
                flags: Some(flags),
                nr_pages: (!pre_4_2).then_some(u64::from(nr_pages)),
            }
            .encode_to_vec(),
        );
    }
    image::encode(Kind::Pagemap, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LP: u32 = PE_LAZY | PE_PRESENT;

    fn sample() -> Pagemap {
        // 0x1000: 2 present; 0x3000: 3 lazy, then 0x6000: 1 lazy (adjacent);
        // a hole; 0x10000: 4 lazy; 0x20000: a zero run (not present).
        Pagemap::parse(&encode(
            7,
            &[
                (0x1000, 2, PE_PRESENT),
                (0x3000, 3, LP),
                (0x6000, 1, LP),
                (0x10000, 4, LP),
                (0x20000, 2, 0),
            ],
        ))
        .unwrap()
    }

    #[test]
    fn runs_get_their_offsets_in_the_pages_image() {
        let pm = sample();
        assert_eq!(pm.pages_id, 7);
        let offs: Vec<u64> = pm.runs.iter().map(|r| r.offset / PAGE_SIZE).collect();
        assert_eq!(offs, [0, 2, 5, 6, 10]);
        assert_eq!(pm.pages_bytes(), 10 * PAGE_SIZE);
        assert_eq!(pm.runs.iter().filter(|r| !r.lazy()).count(), 2);
    }

    #[test]
    fn run_lengths_are_read_from_criu_4_2s_field_and_older_criu_s() {
        let runs = [(0x1000, 2, PE_PRESENT), (0x3000, 3, LP)];
        let new = Pagemap::parse(&encode(7, &runs)).unwrap();
        let old = Pagemap::parse(&encode_as(7, &runs, true)).unwrap();
        assert_eq!(new, old);
        let lens: Vec<u64> = new.runs.iter().map(|r| r.nr_pages).collect();
        assert_eq!(lens, [2, 3]);
        // A length past u32, which only 4.2's field can say.
        let mut big = PagemapEntry {
            vaddr: 0x1000,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(PE_PRESENT),
            nr_pages: Some(1 << 33),
        }
        .encode_to_vec();
        let mut img = encode(7, &[]);
        img.extend_from_slice(&(big.len() as u32).to_le_bytes());
        img.append(&mut big);
        let pm = Pagemap::parse(&img).unwrap();
        assert_eq!(pm.pages_bytes(), (1 << 33) * PAGE_SIZE);
    }

    #[test]
    fn an_address_maps_to_its_offset_and_what_follows_contiguously() {
        let pm = sample();
        let p = PAGE_SIZE;
        // Inside a run, joined with the adjacent one, capped by the request.
        assert_eq!(pm.find(0x4000, 100), Some((3 * p, 3)));
        assert_eq!(pm.find(0x4000, 2), Some((3 * p, 2)));
        // A run ends at a hole.
        assert_eq!(pm.find(0x11000, 100), Some((7 * p, 3)));
        assert_eq!(pm.find(0x1000, 1), Some((0, 1)));
        // Not there: a hole, past the end, a run without pages, unaligned.
        assert_eq!(pm.find(0x8000, 1), None);
        assert_eq!(pm.find(0x30000, 1), None);
        assert_eq!(pm.find(0x20000, 1), None);
        assert_eq!(pm.find(0x4001, 1), None);
        assert_eq!(pm.find(0, 1), None);
    }

    #[test]
    fn broken_images_are_refused() {
        assert!(matches!(
            Pagemap::parse(b"nope").unwrap_err(),
            PagemapError::Image(ImageError::Magic(Kind::Pagemap))
        ));
        let good = encode(1, &[(0x1000, 1, LP)]);
        assert!(matches!(
            Pagemap::parse(&good[..good.len() - 1]).unwrap_err(),
            PagemapError::Image(ImageError::Truncated { .. })
        ));
        assert_eq!(
            Pagemap::parse(&encode(1, &[])[..8]).unwrap_err(),
            PagemapError::Truncated
        );
        let parent = encode(1, &[(0x1000, 1, PE_PARENT)]);
        assert_eq!(Pagemap::parse(&parent).unwrap_err(), PagemapError::Parent);
        let order = encode(1, &[(0x3000, 2, LP), (0x4000, 1, LP)]);
        assert_eq!(
            Pagemap::parse(&order).unwrap_err(),
            PagemapError::Order(0x4000)
        );
        let past = encode(1, &[(u64::MAX - 0xfff, u32::MAX, LP)]);
        assert_eq!(
            Pagemap::parse(&past).unwrap_err(),
            PagemapError::Range(u64::MAX - 0xfff)
        );
    }

    proptest::proptest! {
        /// Forged runs (any address, any length, any flags) parse or are
        /// refused; none overflows.
        #[test]
        fn forged_runs_never_overflow(
            runs in proptest::collection::vec((proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>(), 0u32..8), 0..6),
            at in proptest::prelude::any::<u64>(),
        ) {
            if let Ok(pm) = Pagemap::parse(&encode(1, &runs)) {
                let _ = pm.pages_bytes();
                let _ = pm.find(at & !0xfff, 64);
            }
        }
    }
}
