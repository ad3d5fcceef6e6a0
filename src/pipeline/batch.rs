//! Length-aware batching by token budget: a window of tokenised documents is ordered by length
//! and cut into batches bounded by documents and by padded tokens (docs x longest), so a batch
//! carries little padding. Pure: no I/O, no clocks (the read stage owns the max-wait).

/// Limits of one model call.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_docs: usize,
    pub max_tokens: usize,
}

/// Groups `lengths` (token counts, one per document) into batches of indices.
/// Every index appears exactly once; equal lengths keep their order; each batch has at most
/// `max_docs` members and `members x longest <= max_tokens` (a single document longer than the
/// budget travels alone).
pub fn plan(lengths: &[usize], limits: BatchLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]); // stable: equal lengths keep arrival order
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so the newcomer is the longest in the batch.
        let padded = (current.len() + 1) * lengths[i].max(1);
        if !current.is_empty() && (current.len() == limits.max_docs || padded > limits.max_tokens) {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
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
    }
}
