//! Length-aware batching by token budget: a window of tokenised documents is ordered by length
//! and cut into the batches that cost the model least, bounded by documents and by padded
//! tokens (docs x longest). Pure: no I/O, no clocks (the read stage owns the max-wait).

/// Limits of one model call.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_docs: usize,
    pub max_tokens: usize,
}

impl BatchLimits {
    pub fn from_settings(batch: &crate::settings::BatchSettings) -> Self {
        Self {
            max_docs: batch.max_docs,
            max_tokens: batch.max_tokens,
        }
    }
}

/// What one model call costs beyond its padded tokens, in tokens of work. Measured with
/// `bench-model` on 24-token sentences (2 CPUs, fp32): a call of one document takes ~6 ms where
/// its 24 tokens account for ~3.3 ms inside a batch of 32, i.e. 20-40 tokens of overhead.
const CALL_COST_TOKENS: usize = 32;

/// Groups `lengths` (token counts, one per document) into batches of indices.
/// Every index appears exactly once; equal lengths keep their order; each batch has at most
/// `max_docs` members and `members x longest <= max_tokens` (a single document longer than the
/// budget travels alone).
///
/// The documents are sorted by length and the sorted run is cut where it costs least: the cuts
/// minimise the sum over batches of (padded tokens + CALL_COST_TOKENS), exactly, by dynamic
/// programming over the cut points (O(window x max_docs)). Filling every batch up to `max_docs`
/// instead would pad a whole batch to the longest of a window's long tail: on real sentences
/// (bench/corpus.py "short", windows of 256) that costs ~9% more model time.
pub fn plan(lengths: &[usize], limits: BatchLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]); // stable: equal lengths keep arrival order
    let len = |k: usize| lengths[order[k]].max(1);
    let n = order.len();
    // best[j]: least cost of batching the first j sorted documents; start[j]: where the last
    // batch of that best plan begins.
    let mut best = vec![usize::MAX; n + 1];
    let mut start = vec![0; n + 1];
    best[0] = 0;
    for j in 1..=n {
        // The batch order[i..j] is padded to len(j - 1), its longest (sorted ascending).
        for i in (j.saturating_sub(limits.max_docs.max(1))..j).rev() {
            let padded = (j - i) * len(j - 1);
            if j - i > 1 && padded > limits.max_tokens {
                break; // longer batches ending at j only pad more
            }
            let cost = best[i] + padded + CALL_COST_TOKENS;
            if cost < best[j] {
                best[j] = cost;
                start[j] = i;
            }
        }
    }
    let mut batches = Vec::new();
    let mut j = n;
    while j > 0 {
        batches.push(order[start[j]..j].to_vec());
        j = start[j];
    }
    batches.reverse();
    batches
}

/// Padded tokens of a batch: members x longest.
pub fn padded_tokens(lengths: impl IntoIterator<Item = usize>) -> usize {
    let (n, longest) = lengths
        .into_iter()
        .fold((0, 0), |(n, m), l| (n + 1, m.max(l)));
    n * longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sorts_by_length_and_respects_budgets() {
        let limits = BatchLimits {
            max_docs: 2,
            max_tokens: 100,
        };
        assert_eq!(plan(&[30, 5, 30, 6], limits), vec![vec![1, 3], vec![0, 2]]);
        let tight = BatchLimits {
            max_docs: 10,
            max_tokens: 50,
        };
        assert_eq!(
            plan(&[30, 5, 30, 6], tight),
            vec![vec![1, 3], vec![0], vec![2]]
        );
        assert_eq!(plan(&[300], tight), vec![vec![0]]);
        assert!(plan(&[], tight).is_empty());
    }

    #[test]
    fn a_long_tail_gets_its_own_batch_instead_of_padding_the_rest() {
        let limits = BatchLimits {
            max_docs: 32,
            max_tokens: 8192,
        };
        // 30 sentences of ~20 tokens and two of 120: filling one batch of 32 would pad all to 120.
        let mut lengths = vec![20; 30];
        lengths.extend([120, 120]);
        let batches = plan(&lengths, limits);
        assert_eq!(batches, vec![(0..30).collect::<Vec<_>>(), vec![30, 31]]);
        // Equal lengths are never split for nothing: one call is cheaper than two.
        assert_eq!(plan(&[25; 32], limits).len(), 1);
    }

    /// Brute force over every way to cut the sorted run, for small windows.
    fn cheapest(sorted: &[usize], limits: BatchLimits) -> usize {
        if sorted.is_empty() {
            return 0;
        }
        (1..=sorted.len().min(limits.max_docs))
            .filter(|&k| k == 1 || k * sorted[k - 1] <= limits.max_tokens)
            .map(|k| k * sorted[k - 1] + CALL_COST_TOKENS + cheapest(&sorted[k..], limits))
            .min()
            .unwrap()
    }

    proptest! {
        #[test]
        fn no_loss_no_reordering_never_over_a_limit(
            lengths in proptest::collection::vec(1usize..300, 0..200),
            max_docs in 1usize..64,
            max_tokens in 1usize..5000,
        ) {
            let limits = BatchLimits { max_docs, max_tokens };
            let batches = plan(&lengths, limits);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort();
            prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
            for b in &batches {
                prop_assert!(!b.is_empty() && b.len() <= max_docs);
                let padded = padded_tokens(b.iter().map(|&i| lengths[i]));
                prop_assert!(b.len() == 1 || padded <= max_tokens, "{:?} pads to {}", b, padded);
                // equal lengths keep arrival order
                for w in b.windows(2) {
                    if lengths[w[0]] == lengths[w[1]] { prop_assert!(w[0] < w[1]); }
                }
            }
        }

        #[test]
        fn the_plan_costs_no_more_than_any_other_cut(
            lengths in proptest::collection::vec(1usize..300, 0..12),
            max_docs in 1usize..6,
            max_tokens in 1usize..1000,
        ) {
            let limits = BatchLimits { max_docs, max_tokens };
            let cost: usize = plan(&lengths, limits).iter()
                .map(|b| padded_tokens(b.iter().map(|&i| lengths[i])) + CALL_COST_TOKENS)
                .sum();
            let mut sorted = lengths.clone();
            sorted.sort();
            prop_assert_eq!(cost, cheapest(&sorted, limits));
        }
    }
}
