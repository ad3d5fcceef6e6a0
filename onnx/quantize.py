"""Static int8 quantisation of the sentence encoder, verified against fp32.

    .venv/bin/python onnx/quantize.py --model-dir onnx/all-MiniLM-L6-v2     # `make model-int8`

Writes `<model-dir>/model_int8.onnx` and fails (exit 1, file removed) if a quality target is missed.

Why static QDQ and not `quantize_dynamic`: dynamic quantisation picks each activation's scale from
the batch being run, so a document's vector depends on its batch-mates (up to 4e-2 measured), and
per-tensor weights lost too much (mean cosine 0.96). Here:

* weights: int8, symmetric, per output channel;
* activations: uint8 with scales fixed at calibration time (a deterministic corpus of sentences
  and paragraphs from bench/corpus.py, run one length-sorted batch at a time), so a vector depends
  on its own text only;
* SmoothQuant (Xiao et al. 2022): BERT's LayerNorm and GELU outputs carry a few outlier channels
  that leave a per-tensor uint8 scale no resolution for the rest (mean cosine 0.92 without it).
  Each weight MatMul's input is divided per channel by s = max|X|^alpha / max|W|^(1-alpha) (one
  Mul node per shared input) and the weight rows multiplied by s: the same product in fp32, with
  the outliers moved into the per-channel weight scales;
* only the weight MatMuls are quantised (ORT turns DQ->MatMul into MatMulIntegerToFloat); the
  embeddings, LayerNorms, Softmax, GELU and the attention score MatMuls stay fp32, as do the nodes
  listed in --keep-fp32 (the measurements that chose the default are in bench/README.md).

Checks (all on texts the calibration never saw), against the fp32 model given as --source:
mean/min cosine, recall@10 of exact KNN (int8 queries over int8 documents vs fp32 over fp32),
and the largest difference between a document embedded alone and inside mixed-length batches.
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
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import corpus  # noqa: E402

TARGETS = {"mean_cosine": 0.995, "min_cosine": 0.98, "recall_at_10": 0.95, "batch_diff": 1e-3}
# Sensitive MatMuls kept in fp32 by default: the FFN output projections. Their input (the GELU
# output) has outliers per token (the [CLS] token in layers 0-3, commas in 4-5), which neither
# SmoothQuant nor splitting off outlier channels tamed: quantising them too gave mean cosine
# 0.978-0.983 and recall@10 0.92. Regular expressions searched in node names (--keep-fp32).
DEFAULT_KEEP = [r"layer\.\d+/output/dense/MatMul"]
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


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


class Calibration(CalibrationDataReader):
    """Length-sorted batches of real-looking texts, one model run each."""

    def __init__(self, tok: Tokenizer, input_names: list[str], texts: list[str], batch: int = 16):
        texts = sorted(texts, key=len)
        self.batches = iter([feeds(tok, texts[s: s + batch], input_names) for s in range(0, len(texts), batch)])

    def get_next(self):
        return next(self.batches, None)


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
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = {t: None for t in tensors}
    for f in Calibration(tok, names, texts).batches:
        keep = f["attention_mask"].astype(bool)
        for t, v in zip(tensors, sess.run(tensors, f)):
            m = np.abs(v[keep]).max(axis=0)
            out[t] = m if out[t] is None else np.maximum(out[t], m)
    return out


def smooth(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], tok: Tokenizer, texts: list[str],
           alpha: float, outlier_factor: float) -> int:
    """SmoothQuant in place: X W = (X / s)(s W), one Mul per distinct input X. Channels whose
    calibration max exceeds `outlier_factor` x the median channel's (the [CLS] token's few huge
    GELU outputs in layers 0-3 reach 25 where the rest stay under 6) leave the int8 path
    altogether (their 1/s is 0) and go through a small fp32 MatMul added back to the result,
    as LLM.int8() does. Returns how many outlier channels were split off."""
    inits = {i.name: i for i in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in matmuls:
        by_input.setdefault(n.input[0], []).append(n)
    x_max = channel_max(model, list(by_input), tok, texts)
    split = 0
    for x, nodes in by_input.items():
        weights = [onnx.numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        xm = np.maximum(x_max[x], 1e-5)
        s = (xm ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        outliers = np.flatnonzero(xm > outlier_factor * np.median(xm)) if outlier_factor > 0 else []
        inv = (1.0 / s).astype(np.float32)
        inv[outliers] = 0.0
        for n, w in zip(nodes, weights):
            scaled = (w * s[:, None]).astype(np.float32)
            scaled[outliers] = 0.0
            inits[n.input[1]].CopyFrom(onnx.numpy_helper.from_array(scaled, n.input[1]))
        smoothed, inv_name = f"{x}_smooth", f"{x}_smooth_inv"
        model.graph.initializer.append(onnx.numpy_helper.from_array(inv, inv_name))
        for n in nodes:
            n.input[0] = smoothed
        # Insert right after the producer so the graph stays topologically sorted.
        producer = next((i for i, p in enumerate(model.graph.node) if x in p.output), -1)
        new_nodes = [onnx.helper.make_node("Mul", [x, inv_name], [smoothed], name=f"{x}/SmoothMul")]
        if len(outliers):
            split += len(outliers)
            idx, picked = f"{x}_outlier_idx", f"{x}_outliers"
            model.graph.initializer.append(onnx.numpy_helper.from_array(outliers.astype(np.int64), idx))
            new_nodes.append(onnx.helper.make_node("Gather", [x, idx], [picked], axis=-1, name=f"{x}/OutlierGather"))
        for i, node in enumerate(new_nodes):
            model.graph.node.insert(producer + 1 + i, node)
        for n, w in zip(nodes if len(outliers) else [], weights):
            w_name, part, total = f"{n.input[1]}_outliers", f"{n.output[0]}_outlier_part", n.output[0]
            model.graph.initializer.append(onnx.numpy_helper.from_array(w[outliers].astype(np.float32), w_name))
            n.output[0] = f"{total}_int8_part"
            at = list(model.graph.node).index(n)
            model.graph.node.insert(at + 1, onnx.helper.make_node(
                "MatMul", [f"{x}_outliers", w_name], [part], name=f"{n.name}_outliers"))
            model.graph.node.insert(at + 2, onnx.helper.make_node(
                "Add", [n.output[0], part], [total], name=f"{n.name}_outliers_add"))
    return split


def quantize(source: Path, out: Path, tok: Tokenizer, method: str, keep: list[str], n_cal: int,
             alpha: float, outlier_factor: float) -> None:
    model = onnx.load(str(source))
    names = [i.name for i in model.graph.input]
    inits = {i.name for i in model.graph.initializer}
    # Weight MatMuls only (the second input is an initializer), minus the ones kept in fp32.
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    targets = [n.name for n in matmuls]
    excluded = [n for n in targets if any(re.search(k, n) for k in keep)]
    texts = corpus.texts("short", n_cal, seed=101) + corpus.texts("long", n_cal // 4, seed=101)
    split = smooth(model, [n for n in matmuls if n.name not in excluded], tok, texts, alpha, outlier_factor)
    smoothed = out.with_suffix(".smooth.onnx")
    onnx.save(model, str(smoothed))
    try:
        quantize_static(
            str(smoothed), str(out), Calibration(tok, names, texts),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            nodes_to_quantize=[n for n in targets if n not in excluded],
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=METHODS[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "DedicatedQDQPair": True,
                           "CalibPercentile": 99.999, "CalibMovingAverage": False},
        )
    finally:
        smoothed.unlink()
    print(f"quantised {len(targets) - len(excluded)} MatMuls ({len(excluded)} kept fp32, "
          f"{split} outlier input channels split off to fp32), "
          f"calibration {method} on {len(texts)} texts -> {out}")


def verify(ref: ort.InferenceSession, q: ort.InferenceSession, tok: Tokenizer, n: int) -> dict:
    docs = corpus.texts("short", n, seed=202) + corpus.texts("long", n // 8, seed=202)
    queries = corpus.texts("short", 200, seed=303)
    a, b = embed(ref, tok, docs), embed(q, tok, docs)
    cos = (a * b).sum(1)
    qa, qb = embed(ref, tok, queries), embed(q, tok, queries)
    top_a = np.argsort(-(qa @ a.T), axis=1)[:, :10]
    top_b = np.argsort(-(qb @ b.T), axis=1)[:, :10]
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b)])
    # Batch independence: each of 64 texts alone vs inside random-order mixed-length batches.
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


def speed(sess: ort.InferenceSession, tok: Tokenizer, texts: list[str]) -> float:
    embed(sess, tok, texts[:64])
    t = time.perf_counter()
    embed(sess, tok, texts)
    return len(texts) / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--source", default="model.onnx", help="fp32 file in --model-dir to quantise (model.onnx or model_fused.onnx)")
    p.add_argument("--out", default="model_int8.onnx")
    p.add_argument("--method", choices=sorted(METHODS), default="minmax")
    p.add_argument("--keep-fp32", nargs="*", default=DEFAULT_KEEP, metavar="REGEX",
                   help="MatMul node-name patterns to leave in fp32")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (0 = off)")
    p.add_argument("--outlier-factor", type=float, default=3.0,
                   help="input channels with max > this x the median channel's stay fp32 (0 = none)")
    p.add_argument("--calibration", type=int, default=400, help="short texts for calibration (plus a quarter as many long ones)")
    p.add_argument("--verify", type=int, default=2000, help="short texts to verify on (plus an eighth as many long ones)")
    p.add_argument("--speed", action="store_true", help="also print short-sentence docs/s of fp32 vs int8")
    a = p.parse_args()

    src, out = a.model_dir / a.source, a.model_dir / a.out
    tok = load_tokenizer(a.model_dir)
    tmp = out.with_suffix(".tmp.onnx")
    quantize(src, tmp, tok, a.method, a.keep_fp32, a.calibration, a.alpha, a.outlier_factor)
    threads = len(os.sched_getaffinity(0))
    ref, q = session(src, threads), session(tmp, threads)
    report = verify(ref, q, tok, a.verify)
    failed = [k for k, lim in TARGETS.items()
              if (report[k] > lim if k == "batch_diff" else report[k] < lim)]
    for k, lim in TARGETS.items():
        print(f"  {k:13s} {report[k]:.5f}  (target {'<=' if k == 'batch_diff' else '>='} {lim})"
              f"{'  MISSED' if k in failed else ''}")
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
