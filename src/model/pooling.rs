//! Pooling token vectors into one sentence vector, and L2 normalisation.

use super::config::Pooling;

/// Pools one sequence: `hidden` is `[seq, dim]` row-major, `mask` is `[seq]` (1 = real token).
pub fn pool(hidden: &[f32], mask: &[i64], dim: usize, mode: Pooling) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    match mode {
        Pooling::Cls => out.copy_from_slice(&hidden[..dim]),
        Pooling::Mean => {
            let mut count = 0f32;
            for (row, &m) in hidden.chunks_exact(dim).zip(mask) {
                if m != 0 {
                    count += 1.0;
                    out.iter_mut().zip(row).for_each(|(o, h)| *o += h);
                }
            }
            // sentence-transformers clamps the count at 1e-9 so an all-masked row stays finite.
            let denom = count.max(1e-9);
            out.iter_mut().for_each(|o| *o /= denom);
        }
        Pooling::Max => {
            out.fill(f32::NEG_INFINITY);
            for (row, &m) in hidden.chunks_exact(dim).zip(mask) {
                if m != 0 {
                    out.iter_mut().zip(row).for_each(|(o, h)| *o = o.max(*h));
                }
            }
            out.iter_mut()
                .filter(|o| o.is_infinite())
                .for_each(|o| *o = 0.0);
        }
    }
    out
}

/// Scales `v` to unit L2 norm (as torch.nn.functional.normalize, eps 1e-12).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_ignores_padding() {
        let hidden = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(pool(&hidden, &[1, 1, 0], 2, Pooling::Mean), vec![2.0, 3.0]);
        assert_eq!(pool(&hidden, &[1, 1, 0], 2, Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(pool(&hidden, &[1, 1, 0], 2, Pooling::Max), vec![3.0, 4.0]);
    }

    #[test]
    fn normalize_gives_unit_norm() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut zero = vec![0.0, 0.0];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }
}
