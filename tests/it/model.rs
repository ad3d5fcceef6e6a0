//! The model issue's promises, through the real binary and the real export.

use crate::common::*;

#[test]
fn docs_scenario_distances_match_the_redis_docs_page() {
    let mut texts: Vec<&str> = DOCS.iter().map(|(t, _)| *t).collect();
    texts.push(QUERY);
    let v = embed(&texts);
    assert_eq!(v.len(), 4);
    for (i, expected) in EXPECTED.iter().enumerate() {
        let d = squared_l2(&v[i], &v[3]);
        assert!(
            (d - expected).abs() < 1e-4,
            "doc {i}: distance {d}, docs page says {expected}"
        );
    }
}

/// Pads every shorter text it shares a batch with.
const LONG_SENTENCE: &str = "A considerably longer sentence that forces everyone else in the batch to carry padding tokens along with it, again and again.";

/// `texts` embedded in one batch (with `file`), and for each text the largest element-wise
/// difference between that and the text embedded alone.
fn alone_vs_batch(file: &str, texts: &[&str]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let batch = embed_with(file, texts);
    let diffs = texts
        .iter()
        .zip(&batch)
        .map(|(text, v)| max_abs_diff(&embed_with(file, &[text])[0], v))
        .collect();
    (batch, diffs)
}

#[test]
fn vectors_are_unit_length_and_independent_of_batch_mates() {
    let mixed = [
        "short",
        "That is a happy dog",
        LONG_SENTENCE,
        "Today is a sunny day",
    ];
    let (batch, diffs) = alone_vs_batch("model.onnx", &mixed);
    for (i, text) in mixed.iter().enumerate() {
        let norm: f32 = batch[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text:?} has norm {norm}");
        assert_eq!(batch[i].len(), 384, "dimension comes from the model");
        assert!(
            diffs[i] < 1e-5,
            "{text:?}: alone vs padded batch differ by {}",
            diffs[i]
        );
    }
}

/// `make model-int8`'s file, which `make test` builds (its own quality gate runs there).
#[test]
fn the_int8_model_keeps_the_docs_answer_and_is_independent_of_batch_mates() {
    let file = "model_int8.onnx";
    assert!(
        model_dir().join(file).is_file(),
        "{file} missing: run `make model-int8`"
    );
    let mut texts: Vec<&str> = DOCS.iter().map(|(t, _)| *t).collect();
    texts.push(QUERY);
    let fp32 = embed(&texts);
    let int8 = embed_with(file, &texts);
    let mut last = 0.0;
    for (i, expected) in EXPECTED.iter().enumerate() {
        let d = squared_l2(&int8[i], &int8[3]);
        // Quantisation moves these distances by up to 1.4e-2 (measured), never the ranking.
        assert!(
            (d - expected).abs() < 3e-2,
            "doc {i}: int8 distance {d}, docs page says {expected}"
        );
        assert!(d > last, "doc {i}: int8 changed the docs' ranking");
        last = d;
        let cos: f32 = int8[i].iter().zip(&fp32[i]).map(|(a, b)| a * b).sum();
        assert!(cos > 0.995, "doc {i}: cosine to fp32 {cos}");
    }
    let probe = [LONG_SENTENCE, DOCS[1].0, "short", QUERY];
    let (_, diffs) = alone_vs_batch(file, &probe);
    for (text, diff) in probe.iter().zip(diffs) {
        assert!(
            diff < 1e-3,
            "{text:?}: int8 alone vs in a batch differ by {diff}"
        );
    }
}

#[test]
fn edge_inputs_embed_without_panic() {
    let long = "word ".repeat(20_000);
    let edge = [
        "",
        "   \t  ",
        long.as_str(),
        "😀🎉 emoji 👍🏽",
        "日本語のテキスト 中文文本",
        "שלום עולם مرحبا بالعالم",
        "ctrl \u{1}\u{7}\u{1b}[31m \u{feff}\u{200b}",
    ];
    let v = embed(&edge);
    assert_eq!(v.len(), edge.len());
    for (text, vec) in edge.iter().zip(&v) {
        assert_eq!(vec.len(), 384);
        assert!(
            vec.iter().all(|x| x.is_finite()),
            "{:?} gave a non-finite vector",
            &text[..text.len().min(20)]
        );
    }
    // Truncated, not an error: the 20,000-word text equals its first 254 words' embedding.
    let prefix = "word ".repeat(254);
    let truncated = &embed(&[prefix.as_str()])[0];
    let diff = max_abs_diff(truncated, &v[2]);
    assert!(
        diff < 1e-5,
        "long text is not truncated at 256 tokens: differs by {diff}"
    );
}

#[test]
fn stdin_gives_one_line_per_input_line_in_order() {
    use std::io::Write;
    let mut child = bin()
        .arg("embed")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"That is a happy dog\nToday is a sunny day\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let args = embed(&["That is a happy dog", "Today is a sunny day"]);
    assert_eq!(lines.len(), 2);
    for (a, b) in lines.iter().zip(&args) {
        assert!(squared_l2(a, b) < 1e-10);
    }
}

/// Runs `embed` expecting failure; returns the stderr, asserted to be one line.
fn embed_error(cmd: &mut std::process::Command) -> String {
    let out = cmd.arg("embed").arg("x").output().unwrap();
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{err}");
    lines[0].to_string()
}

#[test]
fn a_wrong_model_path_names_the_file_and_the_fix() {
    let err = embed_error(bin().env("EMBED_WORKER__MODEL__FILE", "nope.onnx"));
    assert!(
        err.contains("nope.onnx") && err.contains("make model"),
        "{err}"
    );
}

#[test]
fn a_missing_ort_library_names_the_file_and_the_fix() {
    let err = embed_error(bin().env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so"));
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("make setup"),
        "{err}"
    );
    let not_a_library = tempfile::NamedTempFile::new().unwrap();
    let err = embed_error(bin().env("ORT_DYLIB_PATH", not_a_library.path()));
    assert!(err.contains(&path_str(not_a_library.path())), "{err}");
}

#[test]
fn a_model_without_token_level_output_is_refused() {
    // A graph whose output is already pooled ([batch, 384]): not what the embedder expects.
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "embedding.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("pooled.onnx");
    python_ok(
        r#"
import sys, onnx
from onnx import helper, TensorProto as T
ids = helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "sequence"])
mask = helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "sequence"])
out = helper.make_tensor_value_info("sentence_embedding", T.FLOAT, ["batch", 384])
w = helper.make_tensor("w", T.FLOAT, [1, 384], [0.0] * 384)
nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
         helper.make_node("ReduceSum", ["m"], ["s"], keepdims=1),
         helper.make_node("MatMul", ["s", "w"], ["sentence_embedding"])]
g = helper.make_graph(nodes, "pooled", [ids, mask], [out], [w])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
"#,
        &[&path_str(&path)],
    );
    let err = embed_error(
        bin()
            .env("EMBED_WORKER__MODEL__DIR", dir.path())
            .env("EMBED_WORKER__MODEL__FILE", "pooled.onnx"),
    );
    assert!(
        err.contains("pooled.onnx") && err.contains("[batch, sequence, dim]"),
        "{err}"
    );
}

/// The truncating tokenisation reads only a prefix of a long text: it must give exactly the
/// tokens of tokenising the whole text and truncating.
#[test]
fn truncation_from_a_prefix_equals_truncating_the_whole_text() {
    use embed_worker::model::TextTokenizer;
    let t = TextTokenizer::load(&model_dir(), 256).unwrap();
    let pages = python_ok(
        "import json, pydoc_data.topics as t; print(json.dumps(sorted(t.topics.values(), key=len)[-40:]))",
        &[],
    );
    let pages: Vec<String> = serde_json::from_str(pages.trim()).unwrap();
    let mut texts: Vec<String> = pages.iter().map(|p| p.repeat(8)).collect();
    texts.push("x".repeat(200_000)); // no whitespace at all
    texts.push("word ".repeat(50_000));
    texts.push("汉字和標點。".repeat(20_000)); // CJK: each character its own word
    texts.push(format!(
        "{}{}",
        " ".repeat(40_000),
        "late words start here ".repeat(100)
    ));
    texts.push("a\u{301}é ".repeat(30_000)); // accents the normaliser strips
    for text in &texts {
        let fast = t.encode_one(text).unwrap();
        let full = t.encode_one_in_full(text).unwrap();
        assert_eq!(
            fast,
            full,
            "text starting {:?}",
            &text.chars().take(40).collect::<String>()
        );
    }
}
