//! How much the reader asks for: reads sized in tokens, not in entries.
//!
//! The model's cost follows tokens, so a fixed entry count is the wrong unit both ways: 256
//! sentences are ~6k tokens, too few to sort into well-filled batches, while 256 paragraphs are
//! ~50k, work that sits pending for many seconds. Each read asks for `stream.read_tokens` worth of
//! entries, estimated from the mean length of the documents tokenised so far (at most
//! `stream.read_count` entries), and the reader reads again only once what it holds is below that:
//! about two reads' worth of tokens in flight, one being embedded and one prefetched, whatever
//! the documents' length. Until the first read is tokenised the mean is the model's longest input,
//! so the first read is small, and nothing is prefetched; the first tokenised read replaces that
//! guess outright.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A tokenised read of `docs` documents moves the mean this share of the way to its own mean:
/// `docs / (docs + MEAN_INERTIA_DOCS)`. One long document arriving alone barely changes the size of
/// the next read; a read of a hundred different documents moves it most of the way.
const MEAN_INERTIA_DOCS: f64 = 64.0;

pub struct ReadAhead {
    tokens: usize,
    max_count: usize,
    /// Mean tokens per document, as f64 bits (written by the tokenising stage, read by the reader).
    mean: AtomicU64,
    /// False while `mean` is still the initial guess.
    observed: AtomicBool,
}

impl ReadAhead {
    /// `tokens` per read, at most `max_count` entries, starting from a mean of `initial_mean`.
    pub fn new(tokens: usize, max_count: usize, initial_mean: usize) -> Self {
        Self {
            tokens,
            max_count: max_count.max(1),
            mean: AtomicU64::new((initial_mean.max(1) as f64).to_bits()),
            observed: AtomicBool::new(false),
        }
    }

    fn mean(&self) -> f64 {
        f64::from_bits(self.mean.load(Ordering::Relaxed))
    }

    /// Entries to ask for in the next read.
    pub fn count(&self) -> usize {
        ((self.tokens as f64 / self.mean()).round() as usize).clamp(1, self.max_count)
    }

    /// Whether a worker holding `in_flight` entries may read again: at most one read's worth
    /// beyond the read being embedded, and no prefetch before the first read is tokenised (its
    /// size would be the first read's guess).
    pub fn may_read(&self, in_flight: usize) -> bool {
        in_flight == 0 || (self.observed.load(Ordering::Relaxed) && in_flight <= self.count())
    }

    /// Records a tokenised read: `docs` documents of `tokens` tokens in all.
    pub fn observe(&self, docs: usize, tokens: usize) {
        if docs == 0 {
            return;
        }
        let seen = tokens as f64 / docs as f64;
        let weight = if self.observed.swap(true, Ordering::Relaxed) {
            docs as f64 / (docs as f64 + MEAN_INERTIA_DOCS)
        } else {
            1.0
        };
        // Only this stage writes; a lost race with itself cannot happen, so load-then-store is enough.
        let mean = self.mean();
        let next = (mean + (seen - mean) * weight).max(1.0);
        self.mean.store(next.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 24,576 tokens per read, after many reads of 24-token sentences.
    fn after_sentences(read_count: usize) -> ReadAhead {
        let r = ReadAhead::new(24_576, read_count, 256);
        for _ in 0..20 {
            r.observe(1000, 24_000);
        }
        r
    }

    #[test]
    fn the_first_read_assumes_the_longest_documents() {
        let r = ReadAhead::new(24_576, 1024, 256);
        assert_eq!(r.count(), 96);
    }

    #[test]
    fn reads_grow_for_short_documents_up_to_read_count() {
        assert_eq!(after_sentences(1024).count(), 1024, "capped by read_count");
        let r = after_sentences(4096);
        assert_eq!(r.count(), 1024, "24,576 tokens of 24-token documents");
    }

    #[test]
    fn reads_shrink_again_when_documents_get_long() {
        let r = after_sentences(1024);
        r.observe(1024, 1024 * 200);
        assert!(
            r.count() <= 130,
            "one full read of paragraphs moves most of the way: {}",
            r.count()
        );
        for _ in 0..10 {
            r.observe(120, 120 * 200);
        }
        assert_eq!(r.count(), 123, "24,576 / 200");
    }

    #[test]
    fn one_odd_document_barely_moves_the_size() {
        let r = after_sentences(4096);
        let before = r.count();
        r.observe(1, 256); // a 256-token document, ten times the mean, moves it 1/65 of the way
        assert!(r.count() * 100 >= before * 85, "{before} -> {}", r.count());
    }

    #[test]
    fn the_first_tokenised_read_replaces_the_guess() {
        let r = ReadAhead::new(24_576, 4096, 256);
        r.observe(96, 96 * 24);
        assert_eq!(r.count(), 1024);
    }

    #[test]
    fn the_worker_reads_again_only_below_one_read_in_flight() {
        let r = ReadAhead::new(1000, 1024, 10); // 100 entries per read
        assert!(r.may_read(0));
        assert!(!r.may_read(1), "no prefetch sized by the guess");
        r.observe(100, 1000);
        assert!(r.may_read(100));
        assert!(!r.may_read(101));
        for _ in 0..50 {
            r.observe(1000, 0); // the mean never drops below one token
        }
        assert_eq!(r.count(), 1000);
    }
}
