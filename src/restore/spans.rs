//! The memory a page pusher still has to fill in one process: address
//! ranges, each with where its pages start in the archive, kept sorted and
//! apart. Ranges shrink as pages go in, split when the process drops memory
//! in their middle, and move when it mremaps them.

use super::pagemap::PAGE_SIZE;

/// `[start, end)` of the process, whose pages are at `at` in the archive on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
    pub at: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spans(Vec<Span>);

impl Spans {
    /// From runs of (address, bytes, offset in the archive).
    pub fn new(runs: &[(u64, u64, u64)]) -> Spans {
        let mut v: Vec<Span> = runs
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(start, len, at)| Span {
                start,
                end: start + len,
                at,
            })
            .collect();
        v.sort_by_key(|s| s.start);
        Spans(v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn first(&self) -> Option<Span> {
        self.0.first().copied()
    }

    /// The span holding `addr`, if its page is still to fill.
    pub fn find(&self, addr: u64) -> Option<Span> {
        let i = self.0.partition_point(|s| s.end <= addr);
        self.0.get(i).filter(|s| s.start <= addr).copied()
    }

    /// The first span ending after `addr` (holding it, or the next one).
    pub fn next(&self, addr: u64) -> Option<Span> {
        let i = self.0.partition_point(|s| s.end <= addr);
        self.0.get(i).copied()
    }

    /// The parts of these spans within `ranges` (address, bytes): each
    /// page-aligned outward, out of order or overlapping as they may be.
    pub fn within(&self, ranges: &[(u64, u64)]) -> Spans {
        let mut out = Vec::new();
        for &(addr, len) in ranges {
            let from = addr & !(PAGE_SIZE - 1);
            let to = addr.saturating_add(len).next_multiple_of(PAGE_SIZE);
            let first = self.0.partition_point(|s| s.end <= from);
            for s in self.0[first..].iter().take_while(|s| s.start < to) {
                let (a, b) = (s.start.max(from), s.end.min(to));
                out.push(Span {
                    start: a,
                    end: b,
                    at: s.at + (a - s.start),
                });
            }
        }
        out.sort_by_key(|s| s.start);
        out.dedup_by(|next, prev| {
            // Overlapping pieces of one span: join them.
            let join = next.start < prev.end;
            if join {
                prev.end = prev.end.max(next.end);
            }
            join
        });
        Spans(out)
    }

    /// Takes `[start, end)` out: filled, or gone from the process.
    pub fn cut(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for s in self.0.drain(..) {
            if s.end <= start || s.start >= end {
                out.push(s);
                continue;
            }
            if s.start < start {
                out.push(Span { end: start, ..s });
            }
            if s.end > end {
                out.push(Span {
                    start: end,
                    end: s.end,
                    at: s.at + (end - s.start),
                });
            }
        }
        self.0 = out;
    }

    /// `[from, from + len)` moved to `to` (mremap).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let end = from + len;
        let moved: Vec<Span> = self
            .0
            .iter()
            .filter(|s| s.end > from && s.start < end)
            .map(|s| {
                let (a, b) = (s.start.max(from), s.end.min(end));
                Span {
                    start: a - from + to,
                    end: b - from + to,
                    at: s.at + (a - s.start),
                }
            })
            .collect();
        self.cut(from, end);
        self.0.extend(moved);
        self.0.sort_by_key(|s| s.start);
    }

    /// Pages left, over all spans.
    pub fn pages(&self) -> u64 {
        self.0.iter().map(|s| (s.end - s.start) / PAGE_SIZE).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn spans_shrink_split_and_move_with_the_process() {
        let mut s = Spans::new(&[(10 * P, 4 * P, 0), (2 * P, 2 * P, 100 * P)]);
        assert_eq!(s.first().unwrap().start, 2 * P);
        assert_eq!(s.pages(), 6);
        assert_eq!(s.find(11 * P).unwrap().at, 0);
        assert_eq!(s.find(5 * P), None);
        // Dropped in the middle: split, the right part's pages further on.
        s.cut(11 * P, 12 * P);
        assert_eq!(
            s.find(12 * P).unwrap(),
            Span {
                start: 12 * P,
                end: 14 * P,
                at: 2 * P
            }
        );
        assert_eq!(s.find(11 * P), None);
        // Moved: the pages go with the addresses.
        s.remap(12 * P, 40 * P, 2 * P);
        assert_eq!(
            s.find(41 * P).unwrap(),
            Span {
                start: 40 * P,
                end: 42 * P,
                at: 2 * P
            }
        );
        assert_eq!(s.find(12 * P), None);
        assert_eq!(s.pages(), 5);
        s.cut(0, 100 * P);
        assert!(s.is_empty());
    }
}
