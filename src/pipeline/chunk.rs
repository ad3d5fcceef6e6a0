//! Cutting a long text into chunks the model can take whole. Pure: token ids and offsets in,
//! chunk plans out.
//!
//! A chunk is at most `size` tokens counting the model's special tokens ([CLS] and [SEP]). Each
//! cut prefers, from best to worst: a sentence end (., ! or ? then whitespace, or a blank line)
//! in the second half of the window; a word boundary in its last quarter; the window's end.
//! The next chunk starts `overlap` tokens before the cut, moved forward to the first sentence
//! start, else word start, inside that overlap, so it never begins inside a word.

use std::ops::Range;

use crate::model::{Encoded, Tokens};

/// How to cut.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRule {
    /// A text of at most this many tokens (counting the special tokens) is one chunk: the
    /// model's longest input, so whatever fits the model is embedded whole, as without chunking.
    pub whole: usize,
    /// Tokens per chunk of a longer text, counting the special tokens.
    pub size: usize,
    /// Tokens consecutive chunks share (at most half of the text tokens per chunk).
    pub overlap: usize,
}

/// Where one chunk lies in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Byte range of the chunk's text in the document's text.
    pub bytes: Range<usize>,
    /// The same range in characters (Unicode scalar values), as stored in the chunk.
    pub chars: Range<usize>,
}

/// One chunk: what the model is given, and where it came from.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub encoded: Encoded,
    pub span: Span,
}

/// The chunks of `text`, tokenised as `tokens` (its ids with the special tokens around them and
/// each text token's byte offsets). A text that fits the model (`rule.whole`) is one chunk
/// spanning the whole text, encoded exactly as a plain encoding of it.
pub fn cut(text: &str, tokens: &Tokens, rule: ChunkRule) -> Vec<Chunk> {
    let n = tokens.offsets.len();
    let specials = tokens.prefix.len() + tokens.suffix.len();
    let width = rule.size.saturating_sub(specials).max(1);
    let overlap = rule.overlap.min(width / 2);
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    if n + specials <= rule.whole {
        ranges.push(0..n);
    }
    while ranges.is_empty() || ranges[ranges.len() - 1].end < n {
        if n - start <= width {
            ranges.push(start..n);
            break;
        }
        let end = cut_point(text, tokens, start, width);
        ranges.push(start..end);
        start = next_start(text, tokens, end, overlap);
    }
    let whole = ranges.len() == 1;
    let byte_ranges: Vec<Range<usize>> = ranges
        .iter()
        .map(|r| {
            if whole || r.is_empty() {
                0..text.len()
            } else {
                tokens.offsets[r.start].0..tokens.offsets[r.end - 1].1
            }
        })
        .collect();
    let chars = char_positions(
        text,
        byte_ranges.iter().flat_map(|r| [r.start, r.end]).collect(),
    );
    ranges
        .into_iter()
        .zip(byte_ranges)
        .map(|(r, bytes)| {
            let mut ids = Vec::with_capacity(r.len() + specials);
            ids.extend_from_slice(&tokens.prefix);
            ids.extend_from_slice(&tokens.ids[r]);
            ids.extend_from_slice(&tokens.suffix);
            let span_chars = chars(bytes.start)..chars(bytes.end);
            Chunk {
                encoded: Encoded { ids },
                span: Span {
                    bytes,
                    chars: span_chars,
                },
            }
        })
        .collect()
}

/// The text between token `i - 1` and token `i` (what a cut before token `i` falls on).
fn gap<'a>(text: &'a str, tokens: &Tokens, i: usize) -> &'a str {
    let from = tokens.offsets[i - 1].1;
    let to = tokens.offsets[i].0.max(from);
    text.get(from..to).unwrap_or("")
}

/// Whether a cut before token `i` ends a sentence: a blank line in the gap (a paragraph end),
/// or whitespace after a token ending in sentence punctuation. A single line break is only
/// whitespace: much text is wrapped at a fixed width.
fn sentence_end(text: &str, tokens: &Tokens, i: usize) -> bool {
    let g = gap(text, tokens, i);
    if g.matches('\n').count() >= 2 {
        return true;
    }
    if g.is_empty() {
        return false;
    }
    let (s, e) = tokens.offsets[i - 1];
    text.get(s..e)
        .and_then(|t| t.chars().last())
        .is_some_and(|c| matches!(c, '.' | '!' | '?' | '。' | '！' | '？'))
}

/// Whether a cut before token `i` falls between words (whitespace in between).
fn word_boundary(text: &str, tokens: &Tokens, i: usize) -> bool {
    !gap(text, tokens, i).is_empty()
}

/// Where the chunk starting at token `start` ends (exclusive), at most `width` tokens on.
fn cut_point(text: &str, tokens: &Tokens, start: usize, width: usize) -> usize {
    let end = start + width;
    let half = start + width / 2;
    let quarter = start + width - width / 4;
    (half + 1..=end)
        .rev()
        .find(|&i| sentence_end(text, tokens, i))
        .or_else(|| {
            (quarter + 1..=end)
                .rev()
                .find(|&i| word_boundary(text, tokens, i))
        })
        .unwrap_or(end)
}

/// Where the chunk after a cut at `end` starts: up to `overlap` tokens back, at a sentence start
/// if the overlap holds one, else a word start, else at the cut.
fn next_start(text: &str, tokens: &Tokens, end: usize, overlap: usize) -> usize {
    if overlap == 0 {
        return end;
    }
    let from = end - overlap;
    (from.max(1)..end)
        .find(|&i| sentence_end(text, tokens, i))
        .or_else(|| (from.max(1)..end).find(|&i| word_boundary(text, tokens, i)))
        .unwrap_or(end)
}

/// Maps byte positions of `text` (each on a character boundary) to character positions, in one
/// pass over the text.
fn char_positions(text: &str, mut bytes: Vec<usize>) -> impl Fn(usize) -> usize {
    bytes.sort_unstable();
    bytes.dedup();
    let mut chars = Vec::with_capacity(bytes.len());
    let mut counted = 0;
    let mut at = 0;
    for &b in &bytes {
        let b = b.min(text.len());
        counted += text.get(at..b).map_or(0, |s| s.chars().count());
        at = b.max(at);
        chars.push(counted);
    }
    move |b| match bytes.binary_search(&b) {
        Ok(i) => chars[i],
        Err(_) => unreachable!("every position asked for was mapped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of `size` tokens for any text longer than that.
    fn rule(size: usize, overlap: usize) -> ChunkRule {
        ChunkRule {
            whole: size,
            size,
            overlap,
        }
    }

    /// One token per whitespace-separated word, with byte offsets; [CLS]=101, [SEP]=102.
    fn words(text: &str) -> Tokens {
        let mut offsets = Vec::new();
        let mut at = 0;
        for w in text.split_whitespace() {
            let s = at + text[at..].find(w).unwrap();
            offsets.push((s, s + w.len()));
            at = s + w.len();
        }
        Tokens {
            ids: (0..offsets.len() as u32).map(|i| 1000 + i).collect(),
            offsets,
            prefix: vec![101],
            suffix: vec![102],
        }
    }

    fn texts<'a>(text: &'a str, chunks: &[Chunk]) -> Vec<&'a str> {
        chunks.iter().map(|c| &text[c.span.bytes.clone()]).collect()
    }

    #[test]
    fn a_text_that_fits_the_model_is_one_chunk_whatever_the_chunk_size() {
        let text = "a b c d e f g h i j";
        let t = words(text);
        let rule = ChunkRule {
            whole: 12,
            size: 6,
            overlap: 0,
        };
        assert_eq!(
            cut(text, &t, rule).len(),
            1,
            "10 tokens + 2 fit the model's 12"
        );
        let rule = ChunkRule {
            whole: 11,
            size: 6,
            overlap: 0,
        };
        assert_eq!(
            texts(text, &cut(text, &t, rule)),
            ["a b c d", "e f g h", "i j"]
        );
    }

    #[test]
    fn a_text_that_fits_is_one_chunk_spanning_all_of_it() {
        let text = "  That is a very happy person ";
        let t = words(text);
        let chunks = cut(text, &t, rule(8, 0));
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].span.bytes, 0..text.len());
        assert_eq!(chunks[0].span.chars, 0..text.chars().count());
        assert_eq!(
            chunks[0].encoded.ids,
            [101, 1000, 1001, 1002, 1003, 1004, 1005, 102]
        );
    }

    #[test]
    fn cuts_prefer_sentence_ends_and_every_chunk_fits() {
        // A sentence end in the window's first half would make a short chunk: not taken.
        let text = "One. Two three four five six. Seven eight nine ten eleven. Twelve.";
        let t = words(text);
        let chunks = cut(text, &t, rule(10, 0));
        assert_eq!(
            texts(text, &chunks),
            [
                "One. Two three four five six.",
                "Seven eight nine ten eleven. Twelve."
            ]
        );
        for c in &chunks {
            assert!(c.encoded.ids.len() <= 10);
            assert_eq!(c.encoded.ids[0], 101);
            assert_eq!(*c.encoded.ids.last().unwrap(), 102);
        }
    }

    #[test]
    fn a_wrapped_line_is_not_a_sentence_end_but_a_blank_line_is() {
        let text = "one two three\nfour five six seven\neight nine ten eleven twelve";
        let chunks = cut(text, &words(text), rule(8, 0));
        assert_eq!(
            texts(text, &chunks)[0],
            "one two three\nfour five six",
            "filled, not cut at a line"
        );
        let text = "one two three four\n\nfive six seven eight nine ten";
        let chunks = cut(text, &words(text), rule(8, 0));
        assert_eq!(texts(text, &chunks)[0], "one two three four");
    }

    #[test]
    fn without_sentence_ends_the_window_is_filled() {
        let text = (0..20)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let t = words(&text);
        let chunks = cut(&text, &t, rule(7, 0));
        let sizes: Vec<usize> = chunks.iter().map(|c| c.encoded.ids.len() - 2).collect();
        assert_eq!(sizes, [5, 5, 5, 5]);
    }

    #[test]
    fn overlap_repeats_the_tail_from_a_sentence_start() {
        let text = "a b c d e f g h. i j k l m n o p q r s t";
        let t = words(text);
        let chunks = cut(text, &t, rule(12, 4));
        assert_eq!(
            texts(text, &chunks),
            [
                "a b c d e f g h.",
                "e f g h. i j k l m n",
                "k l m n o p q r s t"
            ]
        );
        // A sentence start inside the overlap is where the next chunk begins.
        let text = "a b c d e f. g h. i j k l m n";
        let chunks = cut(text, &words(text), rule(10, 4));
        assert_eq!(
            texts(text, &chunks),
            ["a b c d e f. g h.", "g h. i j k l m n"]
        );
    }

    #[test]
    fn character_spans_count_characters_not_bytes() {
        let text = "Ünïcödé wörds hëre. Mörë wörds föllöw hëre.";
        let t = words(text);
        let chunks = cut(text, &t, rule(5, 0));
        for c in &chunks {
            let by_chars: String = text
                .chars()
                .skip(c.span.chars.start)
                .take(c.span.chars.len())
                .collect();
            assert_eq!(by_chars, &text[c.span.bytes.clone()]);
        }
        assert_eq!(
            texts(text, &chunks),
            ["Ünïcödé wörds hëre.", "Mörë wörds föllöw", "hëre."]
        );
    }

    proptest::proptest! {
        /// Every token lands in some chunk, chunks advance, and none exceeds the size.
        #[test]
        fn chunks_cover_every_token_in_order(
            words_in in proptest::collection::vec("[a-z]{1,6}[.]?", 0..300),
            size in 8usize..40,
            overlap_share in 0usize..3,
        ) {
            let text = words_in.join(" ");
            let t = words(&text);
            let overlap = (size - 2) / 2 * overlap_share / 2;
            let chunks = cut(&text, &t, ChunkRule { whole: size, size, overlap });
            proptest::prop_assert!(!chunks.is_empty());
            let mut covered = 0;
            let mut last_start = None;
            for c in &chunks {
                proptest::prop_assert!(c.encoded.ids.len() <= size);
                if let Some(s) = last_start { proptest::prop_assert!(c.span.bytes.start > s); }
                last_start = Some(c.span.bytes.start);
                let inner = &c.encoded.ids[1..c.encoded.ids.len() - 1];
                if let Some(&first) = inner.first() {
                    let first = (first - 1000) as usize;
                    proptest::prop_assert!(first <= covered, "gap before token {}", first);
                    covered = covered.max(first + inner.len());
                }
            }
            proptest::prop_assert_eq!(covered, t.ids.len());
        }
    }
}
