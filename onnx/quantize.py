"""int8 quantisation of the sentence encoder (per-token activations), verified against fp32.

    .venv/bin/python onnx/quantize.py --model-dir onnx/all-MiniLM-L6-v2     # `make model-int8`

Writes `<model-dir>/model_int8.onnx` and fails (exit 1, file removed) if a quality target is missed.

The scheme (W8A8 with per-token activation scales, as ZeroQuant and LLM.int8() use for
transformers), applied to all 36 weight MatMuls:

* weights: int8, symmetric, one scale per output channel, computed here once;
* activations: each token's row of the MatMul input gets its own scale, max|x| / 127, computed at
  run time by the graph (Abs, ReduceMax, Mul, QuantizeLinear to uint8 around a fixed zero point
  of 128), so a vector depends on its own text only: no batch-mate or padding token can change
  another row's scale (the trap of `quantize_dynamic`, whose one scale per tensor moved vectors by
  up to 4e-2), and a token with outliers ([CLS] in the early layers) spends only its own range;
* the product is com.microsoft MatMulIntegerToFloat (u8 x s8 integer GEMM, VNNI where the CPU
  has it, per-channel weight scales applied in the same pass), then one Mul by the row scales;
* SmoothQuant (Xiao et al. 2022) on the inputs that come from a LayerNorm (query/key/value and the
  feed-forward input): a few channels there are 10-20x larger than the rest in every token, which
  per-token scales cannot fix. Each such input is divided per channel by
  s = max|X|^alpha / max|W|^(1-alpha) (one Mul per shared input) and the weight rows multiplied by
  s: the same product in fp32, with the outliers moved into the per-channel weight scales. The
  per-channel maxima come from a deterministic calibration corpus (bench/corpus.py).

Checks (all on texts the calibration never saw), against the fp32 model given as --source:
mean/min cosine, recall@10 of exact KNN (int8 queries over int8 documents vs fp32 over fp32),
and the largest difference between a document embedded alone and inside mixed-length batches;
on the template corpora and on real sentences (bench/corpus.py "short").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import corpus  # noqa: E402

TARGETS = {"mean_cosine": 0.995, "min_cosine": 0.98, "recall_at_10": 0.95, "batch_diff": 1e-3}
# Weight MatMuls left in fp32 (regular expressions searched in node names, --keep-fp32): none by
# default. Inputs that get SmoothQuant (--smooth): those fed by a LayerNorm. The measurements
# behind both defaults are in bench/README.md.
DEFAULT_KEEP: list[str] = []
DEFAULT_SMOOTH = r"attention/self/(query|key|value)/MatMul|intermediate/dense/MatMul"
ZERO_POINT = 128  # activations: uint8 around 128, i.e. symmetric int8 in the range [-127, 127]


def load_tokenizer(model_dir: Path, max_len: int = 256) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def feeds(tok: Tokenizer, texts: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    """One batch padded to its longest member, as the worker does."""
    enc = [tok.encode(t) for t in texts]
    cols = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), cols), np.int64)
    mask = np.zeros_like(ids)
    for r, e in enumerate(enc):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in out.items() if k in input_names}


def embed(sess: ort.InferenceSession, tok: Tokenizer, texts: list[str], batch: int = 32,
          sort: bool = True) -> np.ndarray:
    """Mean-pooled, L2-normalised vectors in input order (batches length-sorted unless told not to)."""
    names = [i.name for i in sess.get_inputs()]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
    out = np.zeros((len(texts), sess.get_outputs()[0].shape[-1]), np.float32)
    for s in range(0, len(order), batch):
        idx = order[s: s + batch]
        f = feeds(tok, [texts[i] for i in idx], names)
        hidden = sess.run(None, f)[0]
        m = f["attention_mask"][..., None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out[idx] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


def calibration_batches(tok: Tokenizer, input_names: list[str], texts: list[str], batch: int = 16):
    """Length-sorted batches of calibration texts, one model run each."""
    texts = sorted(texts, key=len)
    return [feeds(tok, texts[s: s + batch], input_names) for s in range(0, len(texts), batch)]


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def channel_max(model: onnx.ModelProto, tensors: list[str], tok: Tokenizer, texts: list[str]) -> dict:
    """max |x| per last-axis channel of each tensor over the real (unpadded) tokens of `texts`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = {t: None for t in tensors}
    for f in calibration_batches(tok, names, texts):
        keep = f["attention_mask"].astype(bool)
        for t, v in zip(tensors, sess.run(tensors, f)):
            m = np.abs(v[keep]).max(axis=0)
            out[t] = m if out[t] is None else np.maximum(out[t], m)
    return out


def smooth(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], tok: Tokenizer, texts: list[str],
           alpha: float) -> int:
    """SmoothQuant in place: X W = (X / s)(s W), one Mul per distinct input X. Returns how many
    inputs were smoothed."""
    inits = {i.name: i for i in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in matmuls:
        by_input.setdefault(n.input[0], []).append(n)
    x_max = channel_max(model, list(by_input), tok, texts)
    for x, nodes in by_input.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = (np.maximum(x_max[x], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        for n, w in zip(nodes, weights):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
        smoothed, inv_name = f"{x}_smooth", f"{x}_smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv_name))
        for n in nodes:
            n.input[0] = smoothed
        # Right after the producer, so the graph stays topologically sorted.
        producer = next((i for i, p in enumerate(model.graph.node) if x in p.output), -1)
        model.graph.node.insert(producer + 1, helper.make_node("Mul", [x, inv_name], [smoothed], name=f"{x}/SmoothMul"))
    return len(by_input)


def quantize_per_token(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], weight_max: int = 127) -> None:
    """Replaces each MatMul(X, W) in place by
    MatMulIntegerToFloat(quantize_rows(X), int8(W), 1, w_scale, 128) * row_scale(X).
    Inputs shared by several MatMuls (query/key/value) are quantised once. `weight_max` 63 gives
    7-bit weights (--reduce-range)."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {"pt/eps": np.array(1e-8, np.float32), "pt/inv127": np.array(1 / 127, np.float32),
              "pt/one": np.array(1.0, np.float32), "pt/zp": np.array(ZERO_POINT, np.uint8)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    targets = {id(n) for n in matmuls}
    quantised: dict[str, tuple[str, str]] = {}  # input -> (uint8 rows, row scales)
    out: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if id(n) not in targets:
            out.append(n)
            continue
        x, w_name, y = n.input[0], n.input[1], n.output[0]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / weight_max).astype(np.float32)
        inits[w_name].CopyFrom(numpy_helper.from_array(
            np.clip(np.round(w / w_scale), -weight_max, weight_max).astype(np.int8), w_name))
        model.graph.initializer.append(numpy_helper.from_array(w_scale, f"{w_name}_scale"))
        if x not in quantised:
            p = f"{x}/pt"
            out += [
                helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
                helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[-1], keepdims=1, name=f"{p}/ReduceMax"),
                helper.make_node("Max", [f"{p}/amax", "pt/eps"], [f"{p}/amax_eps"], name=f"{p}/Max"),
                helper.make_node("Mul", [f"{p}/amax_eps", "pt/inv127"], [f"{p}/scale"], name=f"{p}/Scale"),
                helper.make_node("Reciprocal", [f"{p}/scale"], [f"{p}/inv_scale"], name=f"{p}/Reciprocal"),
                helper.make_node("Mul", [x, f"{p}/inv_scale"], [f"{p}/scaled"], name=f"{p}/Mul"),
                helper.make_node("QuantizeLinear", [f"{p}/scaled", "pt/one", "pt/zp"], [f"{p}/q"], name=f"{p}/Quantize"),
            ]
            quantised[x] = (f"{p}/q", f"{p}/scale")
        xq, x_scale = quantised[x]
        out += [
            helper.make_node("MatMulIntegerToFloat", [xq, w_name, "pt/one", f"{w_name}_scale", "pt/zp"],
                             [f"{y}/unscaled"], name=f"{n.name}Integer", domain="com.microsoft"),
            helper.make_node("Mul", [f"{y}/unscaled", x_scale], [y], name=f"{n.name}/RowScale"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(out)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def quantize(source: Path, out: Path, tok: Tokenizer, keep: list[str], smooth_pattern: str, n_cal: int,
             alpha: float, reduce_range: bool) -> None:
    model = onnx.load(str(source))
    inits = {i.name for i in model.graph.initializer}
    # Weight MatMuls only (the second input is an initializer), minus the ones kept in fp32.
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and not any(re.search(k, n.name) for k in keep)]
    texts = corpus.texts("uniform", n_cal, seed=101) + corpus.texts("long-uniform", n_cal // 4, seed=101)
    smoothed = smooth(model, [n for n in matmuls if re.search(smooth_pattern, n.name)], tok, texts, alpha) \
        if alpha > 0 and smooth_pattern else 0
    quantize_per_token(model, matmuls, 63 if reduce_range else 127)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    print(f"quantised {len(matmuls)} MatMuls to int8 (per-token activations, per-channel "
          f"{'7-bit ' if reduce_range else ''}weights), "
          f"SmoothQuant alpha {alpha} on {smoothed} inputs from {len(texts)} calibration texts -> {out}")


def quality(ref: ort.InferenceSession, q: ort.InferenceSession, tok: Tokenizer, docs: list[str],
            queries: list[str]) -> dict:
    a, b = embed(ref, tok, docs), embed(q, tok, docs)
    cos = (a * b).sum(1)
    qa, qb = embed(ref, tok, queries), embed(q, tok, queries)
    top_a = np.argsort(-(qa @ a.T), axis=1)[:, :10]
    top_b = np.argsort(-(qb @ b.T), axis=1)[:, :10]
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b)])
    # Batch independence: 64 texts each alone vs inside random-order mixed-length batches.
    probe = docs[:48] + docs[-16:]
    alone = np.stack([embed(q, tok, [t])[0] for t in probe])
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch in (8, 32):
        perm = rng.permutation(len(probe))
        mixed = embed(q, tok, [probe[i] for i in perm], batch=batch, sort=False)
        worst = max(worst, float(np.abs(mixed - alone[perm]).max()))
    return {"docs": len(docs), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "recall_at_10": float(recall), "batch_diff": worst}


def verify(ref: ort.InferenceSession, q: ort.InferenceSession, tok: Tokenizer, n: int) -> dict[str, dict]:
    """Quality on unseen texts: template sentences + paragraphs, and real sentences."""
    real = corpus.texts("short", 2 * n, seed=202)
    return {
        "templates": quality(ref, q, tok, corpus.texts("uniform", n, seed=202) + corpus.texts("long-uniform", n // 8, seed=202),
                             corpus.texts("uniform", 200, seed=303)),
        "real sentences": quality(ref, q, tok, real[200:], real[:200]),
    }


def speed(sess: ort.InferenceSession, tok: Tokenizer, texts: list[str]) -> float:
    embed(sess, tok, texts[:64])
    t = time.perf_counter()
    embed(sess, tok, texts)
    return len(texts) / (time.perf_counter() - t)


def vnni() -> bool:
    """Whether this CPU has VNNI (AVX512_VNNI or AVX_VNNI), i.e. exact u8 x s8 int8 dot products."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: unknown, say nothing
    return bool(re.search(r"\b(avx512_vnni|avx_vnni)\b", flags))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--source", default="model.onnx", help="fp32 file in --model-dir to quantise")
    p.add_argument("--out", default="model_int8.onnx")
    p.add_argument("--keep-fp32", nargs="*", default=DEFAULT_KEEP, metavar="REGEX",
                   help="MatMul node-name patterns to leave in fp32")
    p.add_argument("--smooth", default=DEFAULT_SMOOTH, metavar="REGEX",
                   help="MatMuls whose input gets SmoothQuant ('' = none)")
    p.add_argument("--alpha", type=float, default=0.7, help="SmoothQuant migration strength (0 = off)")
    p.add_argument("--calibration", type=int, default=400,
                   help="template sentences for SmoothQuant's channel maxima (plus a quarter as many paragraphs)")
    p.add_argument("--verify", type=int, default=1000,
                   help="template sentences to verify on (plus an eighth as many paragraphs; and up to 2x real sentences)")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights, for CPUs without VNNI (AVX2/AVX-512F only), whose u8 x s8 kernels "
                        "add pairs of products in saturating 16-bit lanes")
    p.add_argument("--speed", action="store_true", help="also print real-sentence docs/s of fp32 vs int8")
    a = p.parse_args()

    src, out = a.model_dir / a.source, a.model_dir / a.out
    tok = load_tokenizer(a.model_dir)
    tmp = out.with_suffix(".tmp.onnx")
    if not a.reduce_range and not vnni():
        print("quantize.py: this CPU has no VNNI; its u8 x s8 kernels can saturate with 8-bit weights, "
              "consider --reduce-range (the checks below run on this CPU)", file=sys.stderr)
    quantize(src, tmp, tok, a.keep_fp32, a.smooth, a.calibration, a.alpha, a.reduce_range)
    threads = len(os.sched_getaffinity(0))
    ref, q = session(src, threads), session(tmp, threads)
    failed = []
    for name, report in verify(ref, q, tok, a.verify).items():
        print(f"  on {report['docs']} {name}:")
        for k, lim in TARGETS.items():
            missed = report[k] > lim if k == "batch_diff" else report[k] < lim
            failed += [f"{name} {k}"] if missed else []
            print(f"    {k:13s} {report[k]:.5f}  (target {'<=' if k == 'batch_diff' else '>='} {lim})"
                  f"{'  MISSED' if missed else ''}")
    if a.speed:
        texts = corpus.texts("short", 512, seed=404)
        print(f"  speed short: fp32 {speed(ref, tok, texts):.0f} docs/s, int8 {speed(q, tok, texts):.0f} docs/s")
    if failed:
        tmp.unlink()
        print(f"quantize.py: FAILED quality targets {failed}; {out} not written", file=sys.stderr)
        return 1
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
