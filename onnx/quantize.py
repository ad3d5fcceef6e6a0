"""int8 quantisation of the sentence encoder (per-token activations), verified against an exact
integer reference and against fp32, on the CPU that runs it.

    .venv/bin/python onnx/quantize.py --model-dir onnx/all-MiniLM-L6-v2     # `make model-int8`
    .venv/bin/python onnx/quantize.py --model-dir onnx/all-MiniLM-L6-v2 --existing --speed 7

Writes `<model-dir>/model_int8.onnx` and fails (exit 1, nothing written) if any check misses.
`--existing` runs every check on a file made elsewhere (e.g. on another CPU kind) and writes nothing.

The scheme (W8A8 with per-token activation scales, as ZeroQuant and LLM.int8() use for
transformers), applied to all 36 weight MatMuls:

* weights: int8, symmetric, one scale per output channel, computed here once. Default scheme
  "pair": the scale also keeps |q[2i, n]| + |q[2i+1, n]| <= 128 for every column n (see SCHEMES),
  so that ONNX Runtime's integer products are exact on every CPU kind, AVX2 without VNNI included;
* activations: each token's row of the MatMul input gets its own scale, max|x| / 127, computed at
  run time by the graph (ReduceMax, ReduceMin, one blocked QuantizeLinear to uint8 around a fixed
  zero point of 128, so codes 1..255), so a vector depends on its own text only: no batch-mate or
  padding token can change another row's scale (the trap of `quantize_dynamic`, whose one scale
  per tensor moved vectors by up to 4e-2), and a token with outliers ([CLS] in the early layers)
  spends only its own range;
* the product is com.microsoft MatMulIntegerToFloat (u8 x s8 integer GEMM, per-channel weight
  scales applied in the same pass), then one Mul by the row scales;
* SmoothQuant (Xiao et al. 2022) on the inputs that come from a LayerNorm (query/key/value and the
  feed-forward input): a few channels there are 10-20x larger than the rest in every token, which
  per-token scales cannot fix. Each such input is divided per channel by
  s = max|X|^alpha / max|W|^(1-alpha) (one Mul per shared input) and the weight rows multiplied by
  s: the same product in fp32, with the outliers moved into the per-channel weight scales. The
  per-channel maxima come from a deterministic calibration corpus (bench/corpus.py).

Checks, all on this CPU, all on texts the calibration never saw:
* exact-integer reference (exact_check): every MatMulIntegerToFloat against numpy's exact integer
  product, on worst-case inputs and inside the graph on real texts, and the whole graph as a
  numpy forward (EXACT_LIMIT 1e-5; see exact_check for what is bounded instead);
* quality against the fp32 model given as --source (TARGETS): mean/min cosine, recall@10 of
  exact KNN (int8 queries over int8 documents vs fp32 over fp32), and the largest difference
  between a document embedded alone and inside mixed-length batches; on the template corpora and
  on real sentences (bench/corpus.py "short").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread: the exact-reference check's numpy matmuls are small, and on a shared 2-core
# machine OpenBLAS's spinning threads made them 10-50x slower. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import corpus  # noqa: E402

TARGETS = {"mean_cosine": 0.995, "min_cosine": 0.98, "recall_at_10": 0.95, "batch_diff": 1e-3}
# Weight MatMuls left in fp32 (regular expressions searched in node names, --keep-fp32): none by
# default. Inputs that get SmoothQuant (--smooth): those fed by a LayerNorm. The measurements
# behind both defaults are in bench/README.md.
DEFAULT_KEEP: list[str] = []
DEFAULT_SMOOTH = r"attention/self/(query|key|value)/MatMul|intermediate/dense/MatMul"


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


@dataclass(frozen=True)
class Scheme:
    """How weights and per-token activations are coded, and why MLAS's integer products are exact
    (or not) for those codes on every CPU kind."""
    name: str
    weights: str          # "s8": int8 codes; "u8": uint8 codes around zero point 128 (ORT's u8 x u8 kernels)
    w_max: int            # largest |weight code|
    pair_max: int | None  # largest |q[2i, n]| + |q[2i+1, n]| (the pairs vpmaddubsw adds in int16), or no limit
    a_zero: int           # activation zero point
    a_max: int            # activations are coded a_zero + round(x / (max|x| / a_max)), so in a_zero +- a_max
    exact: str

    @property
    def codes(self) -> tuple[int, int]:
        return self.a_zero - self.a_max, self.a_zero + self.a_max


# Which ONNX Runtime (MLAS, onnxruntime/core/mlas/lib) kernel multiplies uint8 activations by int8
# weights, and where it can go wrong. The x86 u8 x s8 kernels without VNNI (AVX2, and AVX-512
# without VNNI: QgemmU8X8KernelAvx2.S, QgemmU8X8KernelAvx512Core.S) multiply with vpmaddubsw,
# which adds the two products of adjacent k (B is packed 4 k per column: pairs 2i, 2i+1) into a
# saturating int16 lane: exact only while |a1 w1 + a2 w2| <= 32767 for raw codes a in 0..255.
# Every other kernel is exact for weight codes within +-127 and activation codes 1..255 (or
# 1..127): AVX-VNNI, AVX512-VNNI and AMX (vpdpbusd(s), tdpbusd) accumulate in int32, the x86
# u8 x u8 kernels widen to int16 and use vpmaddwd (AVX-VNNI-INT8: vpdpbuud), SSE widens, aarch64
# udot/sdot/ummla/smmla accumulate in int32, and aarch64's plain-NEON kernel (no dot product)
# adds two s8*s8 products (the activation codes minus 128) in int16: 127*127 + 127*127 fits.
SCHEMES = {
    "w8": Scheme("w8", "s8", 127, None, 128, 127,
                 "NOT exact on x86 without VNNI: 255*127 + 255*127 > 32767 saturates vpmaddubsw's int16 lanes"),
    "w7": Scheme("w7", "s8", 64, None, 128, 127, "7-bit weights: 255*64 + 255*64 = 32640 <= 32767"),
    "a7": Scheme("a7", "s8", 127, None, 64, 63, "7-bit activations (codes 1..127): 127*127 + 127*127 = 32258 <= 32767"),
    "pair": Scheme("pair", "s8", 127, 128, 128, 127,
                   "8-bit weights whose adjacent-k pairs have |q1| + |q2| <= 128: 255*128 = 32640 <= 32767"),
    "u8u8": Scheme("u8u8", "u8", 127, None, 128, 127, "uint8 weights: ORT's u8 x u8 kernels widen to int16 (vpmaddwd), exact"),
}
DEFAULT_SCHEME = "pair"


def quantize_weights(w: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric codes (int16 array, the value before any zero point) and scales
    (float32 [N]) for a [K, N] weight. With `pair_max`, the scale also keeps every pair of
    adjacent-k codes of a column within pair_max in absolute sum (rounding fixed up pair by pair)."""
    a = np.abs(w.astype(np.float32))
    scale = a.max(axis=0) / scheme.w_max
    if scheme.pair_max:
        if len(a) % 2:
            a = np.vstack([a, np.zeros((1, a.shape[1]), np.float32)])
        scale = np.maximum(scale, (a[0::2] + a[1::2]).max(axis=0) / scheme.pair_max)
    scale = np.maximum(scale, 1e-12).astype(np.float32)
    q = np.clip(np.round(w / scale), -scheme.w_max, scheme.w_max).astype(np.int16)
    if scheme.pair_max:
        k = len(q) - len(q) % 2
        qp, wp = q[:k].reshape(k // 2, 2, -1), (w[:k] / scale).reshape(k // 2, 2, -1)  # views of q's pairs
        while True:  # rounding can put a pair one over: step the code that rounded up most back by 1
            over = np.abs(qp).sum(axis=1) > scheme.pair_max  # [K/2, N]
            if not over.any():
                break
            i, n = np.nonzero(over)
            j = np.argmax(np.abs(qp) - np.abs(wp), axis=1)[i, n]
            qp[i, j, n] -= np.sign(qp[i, j, n])
    return q, scale


def quantize_per_token(model: onnx.ModelProto, matmuls: list[onnx.NodeProto], scheme: Scheme) -> None:
    """Replaces each MatMul(X, W) in place by
    MatMulIntegerToFloat(QuantizeLinear(X, s, a_zero), codes(W), 1, w_scale, a_zero[, 128]) * s
    with s = max|X| / a_max per token (row of the last axis), computed in the graph. Inputs shared by
    several MatMuls (query/key/value) are quantised once. Per input, ReduceMax and ReduceMin give
    max|X| in two reads (no Abs tensor), and one blocked QuantizeLinear (opset 21, block_size = the
    row length) divides each row by its own scale: three passes over X where Abs, ReduceMax, Mul
    and QuantizeLinear took six."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {"pt/eps": np.array(1e-8, np.float32), "pt/inv_amax": np.array(1 / scheme.a_max, np.float32),
              "pt/one": np.array(1.0, np.float32), "pt/zp": np.array(scheme.a_zero, np.uint8),
              "pt/last_axis": np.array([-1], np.int64)}
    if scheme.weights == "u8":
        consts["pt/wzp"] = np.array(128, np.uint8)
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
        q, w_scale = quantize_weights(w, scheme)
        codes = (q + 128).astype(np.uint8) if scheme.weights == "u8" else q.astype(np.int8)
        inits[w_name].CopyFrom(numpy_helper.from_array(codes, w_name))
        model.graph.initializer.append(numpy_helper.from_array(w_scale, f"{w_name}_scale"))
        if x not in quantised:
            p = f"{x}/pt"
            out += [
                helper.make_node("ReduceMax", [x, "pt/last_axis"], [f"{p}/max"], keepdims=1, name=f"{p}/ReduceMax"),
                helper.make_node("ReduceMin", [x, "pt/last_axis"], [f"{p}/min"], keepdims=1, name=f"{p}/ReduceMin"),
                helper.make_node("Neg", [f"{p}/min"], [f"{p}/neg_min"], name=f"{p}/Neg"),
                helper.make_node("Max", [f"{p}/max", f"{p}/neg_min", "pt/eps"], [f"{p}/amax"], name=f"{p}/Max"),
                helper.make_node("Mul", [f"{p}/amax", "pt/inv_amax"], [f"{p}/scale"], name=f"{p}/Scale"),
                helper.make_node("Shape", [f"{p}/scale"], [f"{p}/scale_shape"], name=f"{p}/Shape"),
                helper.make_node("Expand", ["pt/zp", f"{p}/scale_shape"], [f"{p}/zp"], name=f"{p}/Expand"),
                helper.make_node("QuantizeLinear", [x, f"{p}/scale", f"{p}/zp"], [f"{p}/q"], axis=-1,
                                 block_size=w.shape[0], name=f"{p}/Quantize"),
            ]
            quantised[x] = (f"{p}/q", f"{p}/scale")
        xq, x_scale = quantised[x]
        ins = [xq, w_name, "pt/one", f"{w_name}_scale", "pt/zp"] + (["pt/wzp"] if scheme.weights == "u8" else [])
        out += [
            helper.make_node("MatMulIntegerToFloat", ins, [f"{y}/unscaled"], name=f"{n.name}Integer", domain="com.microsoft"),
            helper.make_node("Mul", [f"{y}/unscaled", x_scale], [y], name=f"{n.name}/RowScale"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(out)
    # Blocked QuantizeLinear and ReduceMax/ReduceMin with axes as an input need opset 21; the
    # exported graph's other operators mean the same there as in its opset 17.
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, 21)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = max(model.ir_version, 10)
    onnx.helper.set_model_props(model, {"int8_scheme": scheme.name,
                                        "int8_activation_codes": "%d-%d" % scheme.codes})


def quantize(source: Path, out: Path, tok: Tokenizer, keep: list[str], smooth_pattern: str, n_cal: int,
             alpha: float, scheme: Scheme) -> None:
    model = onnx.load(str(source))
    inits = {i.name for i in model.graph.initializer}
    # Weight MatMuls only (the second input is an initializer), minus the ones kept in fp32.
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and not any(re.search(k, n.name) for k in keep)]
    texts = corpus.texts("uniform", n_cal, seed=101) + corpus.texts("long-uniform", n_cal // 4, seed=101)
    smoothed = smooth(model, [n for n in matmuls if re.search(smooth_pattern, n.name)], tok, texts, alpha) \
        if alpha > 0 and smooth_pattern else 0
    quantize_per_token(model, matmuls, scheme)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    print(f"quantised {len(matmuls)} MatMuls, scheme {scheme.name!r}: weights {scheme.weights} per channel "
          f"(|code| <= {scheme.w_max}{f', adjacent pairs <= {scheme.pair_max}' if scheme.pair_max else ''}), "
          f"per-token activations {scheme.codes[0]}..{scheme.codes[1]} around {scheme.a_zero}; "
          f"SmoothQuant alpha {alpha} on {smoothed} inputs from {len(texts)} calibration texts -> {out}")


# ---------------------------------------------------------------------------------------------
# The exact-integer reference: what every MatMulIntegerToFloat must give on every CPU.
# The integer sums are computed with float32 matrix products over blocks of at most 1024 k: every
# product of two codes is at most 127 * 127 in magnitude, so every partial sum of a block stays
# below 1024 * 16129 < 2^24 and is an exactly representable integer whatever the summation order
# (or FMA); the blocks are then added in float64. So numpy gives the true integer dot products,
# with no saturation.
# ---------------------------------------------------------------------------------------------

EXACT_LIMIT = 1e-5
OWN_MIN_COS = 0.998  # measured: 0.9993 for the exact schemes, 0.9936 for "w8" on AVX2 (bench/README.md)
EXACT_BLOCK = 1024


@dataclass
class IntegerMatMul:
    """One MatMulIntegerToFloat of the int8 graph, with its constant operands."""
    node: onnx.NodeProto
    raw: np.ndarray         # [K, N] weight codes as stored (int8 or uint8)
    codes: np.ndarray       # [K, N] the same minus their zero point (float32, integer-valued)
    multiplier: np.ndarray  # float32 [N]: a_scale * b_scale, as ORT applies it to the int32 sums
    a_zero: int

    def sums(self, xq: np.ndarray) -> np.ndarray:
        """The exact integer sums (float64) for uint8 rows xq [..., K]."""
        x = xq.reshape(-1, xq.shape[-1]).astype(np.float32) - np.float32(self.a_zero)
        acc = np.zeros((len(x), self.codes.shape[1]), np.float64)
        for k in range(0, len(self.codes), EXACT_BLOCK):
            acc += x[:, k: k + EXACT_BLOCK] @ self.codes[k: k + EXACT_BLOCK]
        return acc.reshape(*xq.shape[:-1], -1)

    def output(self, acc: np.ndarray) -> np.ndarray:
        """The float32 output ORT's kernel makes of exact sums: float(sum) * multiplier."""
        return acc.astype(np.float32) * self.multiplier


def integer_matmuls(model: onnx.ModelProto) -> list[IntegerMatMul]:
    inits = {i.name: i for i in model.graph.initializer}
    value = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    found = []
    for n in model.graph.node:
        if n.op_type != "MatMulIntegerToFloat":
            continue
        _, w, a_scale, b_scale, a_zp, b_zp, bias = list(n.input) + [""] * (7 - len(n.input))
        assert not bias, f"{n.name}: a bias input is not expected"
        raw = value(w)
        codes = raw.astype(np.float32) - (value(b_zp).astype(np.float32) if b_zp else np.float32(0))
        assert np.abs(codes).max() <= 127, f"{n.name}: weight codes beyond +-127"
        mult = (value(a_scale).astype(np.float32) * value(b_scale).astype(np.float32)).astype(np.float32)
        found.append(IntegerMatMul(n, raw, codes, np.broadcast_to(mult, codes.shape[1:]).copy(),
                                   int(value(a_zp)) if a_zp else 0))
    return found


def deviation(mm: IntegerMatMul, acc: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |ORT - exact reference| in the output's units, the same in integer units of the sums)."""
    diff = float(np.abs(got.astype(np.float64) - mm.output(acc)).max())
    units = float(np.abs(got.astype(np.float64) / mm.multiplier - acc).max())
    return diff, units


def worst_case_rows(mm: IntegerMatMul, codes: tuple[int, int]) -> np.ndarray:
    """Two activation rows per weight column n, within the scheme's code range: the code hi
    where the stored weight is positive and lo elsewhere, and the reverse. Row n makes every
    partial sum of column n, whichever products a kernel pairs (u8 x s8 on x86 without VNNI: k and
    k+1; plain NEON: the codes minus 128 times the weights, k and k+8), as large as any input can,
    row N+n as small. If any int16 (or other) intermediate of column n overflows for some input,
    it does so for one of these two rows, in the same direction for every pair, and the sum
    comes out wrong."""
    lo, hi = codes
    pos = mm.raw.T.astype(np.int16) > 0  # [N, K]
    return np.concatenate([np.where(pos, hi, lo), np.where(pos, lo, hi)]).astype(np.uint8)


def one_node_session(model: onnx.ModelProto, mm: IntegerMatMul, threads: int) -> ort.InferenceSession:
    names = set(mm.node.input[1:])
    k, n = mm.codes.shape
    g = helper.make_graph([mm.node], "one", [helper.make_tensor_value_info(mm.node.input[0], onnx.TensorProto.UINT8, [None, k])],
                          [helper.make_tensor_value_info(mm.node.output[0], onnx.TensorProto.FLOAT, [None, n])],
                          [i for i in model.graph.initializer if i.name in names])
    m = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_worst_case(model: onnx.ModelProto, codes: tuple[int, int], threads: int) -> dict:
    """Every MatMulIntegerToFloat alone on its worst-case rows (worst_case_rows), column n judged
    on rows n and N+n: exact there means exact for every input in the code range, on this CPU."""
    worst = {"diff": 0.0, "units": 0.0, "node": ""}
    for mm in integer_matmuls(model):
        xq = worst_case_rows(mm, codes)
        got = one_node_session(model, mm, threads).run(None, {mm.node.input[0]: xq})[0]
        n = mm.codes.shape[1]
        cols = np.arange(n)
        x = xq.astype(np.float64) - mm.a_zero
        acc = np.stack([(x[:n] * mm.codes.T).sum(1), (x[n:] * mm.codes.T).sum(1)])  # [2, N], exact in float64
        diff, units = deviation(mm, acc, np.stack([got[cols, cols], got[n + cols, cols]]))
        if units >= worst["units"]:
            worst = {"diff": diff, "units": units, "node": mm.node.name}
    return worst


def probe_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[IntegerMatMul]]:
    """The int8 graph with every MatMulIntegerToFloat's uint8 input and float output added as
    graph outputs, so a run shows what ORT's own quantisation produced and what the kernel made of it."""
    mms = integer_matmuls(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    seen = {o.name for o in probe.graph.output}
    for mm in mms:
        for name, t in ((mm.node.input[0], onnx.TensorProto.UINT8), (mm.node.output[0], onnx.TensorProto.FLOAT)):
            if name not in seen:
                probe.graph.output.append(helper.make_tensor_value_info(name, t, None))
                seen.add(name)
    return probe, mms


def erf(x: np.ndarray) -> np.ndarray:
    """erf to within 4e-7 (Numerical Recipes' erfc Chebyshev fit evaluated in float32), vectorised."""
    z = np.abs(x).astype(np.float32)
    t = np.float32(1) / (np.float32(1) + np.float32(0.5) * z)
    p = np.float32(0.17087277)
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
              1.00002368, -1.26551223):
        p = p * t + np.float32(c)
    r = np.float32(1) - t * np.exp(p - z * z)
    return np.where(x >= 0, r, -r)


def numpy_forward(model: onnx.ModelProto, feed: dict[str, np.ndarray], ort_run: dict[str, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, dict]:
    """A numpy interpreter of the int8 graph as written: float32 arithmetic, and every
    MatMulIntegerToFloat as an exact integer product. With `ort_run` (a probe run's outputs), each
    quantiser's codes are compared with ORT's and then replaced by them, and each
    MatMulIntegerToFloat's exact result is compared with ORT's for the same codes. Returns the
    graph's output and {"codes", "flipped", "matmuls", "matmul_units"}."""
    env: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    env.update(feed)
    mms = {mm.node.name: mm for mm in integer_matmuls(model)}
    stats = {"codes": 0, "flipped": 0, "matmuls": 0.0, "matmul_units": 0.0}
    f32 = np.float32
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum}
    for n in model.graph.node:
        x = [env[i] if i else None for i in n.input]
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        op = n.op_type
        if op in binary:
            y = x[0]
            for other in x[1:]:
                y = binary[op](y, other)
        elif op == "Gather":
            y = np.take(x[0], x[1], axis=at.get("axis", 0))
        elif op == "Shape":
            y = np.array(x[0].shape, np.int64)
        elif op == "Slice":
            sl = [slice(None)] * x[0].ndim
            for s, e, a, st in zip(x[1], x[2], x[3], x[4]):
                sl[int(a)] = slice(int(s), int(e), int(st))
            y = x[0][tuple(sl)]
        elif op == "Unsqueeze":
            y = np.expand_dims(x[0], tuple(int(a) for a in x[1]))
        elif op == "Cast":
            y = x[0].astype(helper.tensor_dtype_to_np_dtype(at["to"]))
        elif op == "LayerNormalization":
            h = x[0].astype(np.float64)
            mu = h.mean(-1, keepdims=True)
            var = ((h - mu) ** 2).mean(-1, keepdims=True)
            y = (h - mu) / np.sqrt(var + at.get("epsilon", 1e-5)) * x[1] + x[2]
        elif op == "MatMul":  # contiguous: numpy's batched matmul of transposed views does not use BLAS
            y = np.matmul(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]))
        elif op == "Reshape":
            y = x[0].reshape([d if s == 0 else s for s, d in zip(x[1], list(x[0].shape) + [0] * len(x[1]))])
        elif op == "Transpose":
            y = np.transpose(x[0], at["perm"])
        elif op == "Softmax":
            e = np.exp(x[0] - x[0].max(axis=at.get("axis", -1), keepdims=True))
            y = e / e.sum(axis=at.get("axis", -1), keepdims=True)
        elif op == "Erf":
            y = erf(x[0])
        elif op == "Identity":
            y = x[0]
        elif op == "Abs":
            y = np.abs(x[0])
        elif op in ("ReduceMax", "ReduceMin"):
            axes = tuple(int(a) for a in (x[1] if len(x) > 1 else at["axes"]))
            y = (np.max if op == "ReduceMax" else np.min)(x[0], axis=axes, keepdims=bool(at.get("keepdims", 1)))
        elif op == "Neg":
            y = -x[0]
        elif op == "Expand":
            y = x[0] * np.ones(x[1], x[0].dtype)
        elif op == "Reciprocal":
            y = f32(1) / x[0]
        elif op == "QuantizeLinear":  # round half to even, saturate
            y = np.clip(np.rint(x[0] / x[1]) + x[2].astype(f32), 0, 255).astype(np.uint8)
            if ort_run is not None and n.output[0] in ort_run:
                theirs = ort_run[n.output[0]]
                stats["codes"] += theirs.size
                stats["flipped"] += int((theirs != y).sum())
                y = theirs
        elif op == "MatMulIntegerToFloat":
            mm = mms[n.name]
            acc = mm.sums(x[0])
            y = mm.output(acc)
            if ort_run is not None and n.output[0] in ort_run:
                diff, units = deviation(mm, acc, ort_run[n.output[0]])
                stats["matmuls"], stats["matmul_units"] = max(stats["matmuls"], diff), max(stats["matmul_units"], units)
        else:
            raise ValueError(f"numpy_forward: no implementation of {op} ({n.name})")
        if isinstance(y, np.ndarray) and y.dtype == np.float64:
            y = y.astype(f32)
        env[n.output[0]] = y
    return env[model.graph.output[0].name], stats


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    v = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def exact_texts() -> list[str]:
    """The texts of the exact-reference check: real sentences and passages the calibration never
    saw (passages reach the 256-token limit), plus templates."""
    return (corpus.texts("short", 32, seed=505) + corpus.texts("long", 4, seed=505)
            + corpus.texts("uniform", 4, seed=505))


def exact_check(path: Path, tok: Tokenizer, texts: list[str], codes: tuple[int, int], threads: int) -> dict:
    """The int8 file on this CPU against the exact-integer reference:

    * worst_case: every MatMulIntegerToFloat alone on its worst-case rows over the scheme's
      whole activation code range (max |ORT - reference|, and in integer units of the sums);
    * matmuls: every MatMulIntegerToFloat inside the full graph (ORT_ENABLE_ALL, as the worker
      runs it) on real texts, given the uint8 rows ORT's own quantisation produced;
    * replay: mean-pooled, normalised vectors of the numpy forward that takes ORT's codes at each
      quantiser, vs the file's vectors as the worker's session computes them;
    * own: the same numpy forward with its own quantisation. float32 rounding differences (fp32
      matmuls, LayerNorm, erf) flip an occasional code by one (`flipped` of `codes`), so this
      one is reported and bounded, not held to EXACT_LIMIT.
    """
    model = onnx.load(str(path))
    rep = {"worst_case": check_worst_case(model, codes, threads)}
    probe, mms = probe_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    prod = session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    rep.update({"probe_vs_file": 0.0, "replay": 0.0, "own": 0.0, "own_min_cos": 1.0, "codes": 0, "flipped": 0,
                "matmuls": 0.0, "matmul_units": 0.0})
    for f in calibration_batches(tok, names, texts, batch=16):
        outs = dict(zip(out_names, sess.run(None, f)))
        hidden = prod.run(None, f)[0]
        mask = f["attention_mask"]
        vec = pooled(hidden, mask)
        replayed, stats = numpy_forward(model, f, outs)
        own, _ = numpy_forward(model, f)
        rep["probe_vs_file"] = max(rep["probe_vs_file"], float(np.abs(outs[out_names[0]] - hidden).max()))
        rep["replay"] = max(rep["replay"], float(np.abs(pooled(replayed, mask) - vec).max()))
        rep["own"] = max(rep["own"], float(np.abs(pooled(own, mask) - vec).max()))
        rep["own_min_cos"] = min(rep["own_min_cos"], float((pooled(own, mask) * vec).sum(1).min()))
        for k in ("codes", "flipped"):
            rep[k] += stats[k]
        for k in ("matmuls", "matmul_units"):
            rep[k] = max(rep[k], stats[k])
    return rep


def cpu_flags() -> str:
    """The CPU features that decide which MLAS integer kernel runs (for the log)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    model = re.search(r"^(model name|CPU part)\s*:\s*(.*)$", text, re.M)
    flags = set(re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M).group(2).split()) \
        if re.search(r"^(flags|Features)\s*:", text, re.M) else set()
    wanted = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8",
              "asimd", "asimddp", "i8mm", "sve"]
    have = [f for f in wanted if f in flags]
    return f"{model.group(2).strip() if model else '?'}; {' '.join(have) or 'none of ' + ' '.join(wanted)}"


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


def speed(src: Path, int8: Path, tok: Tokenizer, rounds: int, threads: int) -> str:
    """Model-only docs/s of the fp32 and int8 files in interleaved rounds (ORT sessions as the
    worker opens them: ORT_ENABLE_ALL, `threads` intra-op threads, no spinning), on 1,024 real
    sentences cut into length-sorted batches of 32. Medians, and the median of the per-round
    ratios with its range: on a shared machine single timings swing by half. With one thread ORT
    runs in the calling thread, and its CPU time is reported too: the model's own work, which
    other processes on the same cores disturb less than the wall clock."""
    sessions = []
    for path in (src, int8):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    names = [i.name for i in sessions[0].get_inputs()]
    texts = sorted(corpus.texts("short", 1024, seed=404), key=len)
    batches = [feeds(tok, texts[s: s + 32], names) for s in range(0, len(texts), 32)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for s in sessions:
        s.run(None, batches[-1])
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for _ in range(rounds):
        for s, w, c in zip(sessions, wall, cpu):
            t, ct = time.perf_counter(), time.thread_time()
            for b in batches:
                s.run(None, b)
            w.append(len(texts) / (time.perf_counter() - t))
            c.append(len(texts) / (time.thread_time() - ct))

    def summary(rates: list[list[float]], what: str) -> str:
        ratios = [b / a for a, b in zip(*rates)]
        return (f"{what}: fp32 {np.median(rates[0]):.0f} docs/s, int8 {np.median(rates[1]):.0f} docs/s, int8/fp32 "
                f"median {np.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")

    head = (f"model-only, {len(texts)} real sentences ({tokens} tokens), {threads} thread{'s' * (threads > 1)}, "
            f"{rounds} interleaved rounds; ")
    return head + summary(wall, "wall clock") + ("; " + summary(cpu, "CPU time") if threads == 1 else "")


def gate_exact(rep: dict) -> list[str]:
    """Prints the exact-reference check; returns what missed."""
    w = rep["worst_case"]
    rows = [  # name, value, limit, True if the value must be at least the limit, what it is
        ("worst_case", w["diff"], EXACT_LIMIT, False,
         f"every integer MatMul alone on its worst-case rows; {w['units']:.2g} integer units ({w['node']})"),
        ("matmuls", rep["matmuls"], EXACT_LIMIT, False,
         f"every integer MatMul in the graph on ORT's own codes for real texts; {rep['matmul_units']:.2g} units"),
        ("replay", rep["replay"], EXACT_LIMIT, False, "vectors of the numpy forward given ORT's codes"),
        ("probe_vs_file", rep["probe_vs_file"], 0.0, False, "the probe graph computes what the file computes"),
        ("own_min_cos", rep["own_min_cos"], OWN_MIN_COS, True,
         f"numpy forward with its own codes: {rep['flipped']} of {rep['codes']} codes differ by one, "
         f"max vector difference {rep['own']:.2g}"),
    ]
    failed = []
    for k, v, lim, at_least, what in rows:
        missed = v < lim if at_least else v > lim
        failed += [f"exact {k}"] if missed else []
        print(f"    {k:13s} {v:.5g}  ({'>=' if at_least else '<='} {lim:g}: {what}){'  MISSED' if missed else ''}")
    return failed


def file_scheme(path: Path) -> Scheme:
    """The scheme an int8 file was made with (quantize_per_token writes it into the metadata)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if props.get("int8_scheme") not in SCHEMES:
        raise SystemExit(f"quantize.py: {path} names no known int8 scheme ({props.get('int8_scheme')!r}); "
                         f"it was not made by this script")
    return SCHEMES[props["int8_scheme"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--source", default="model.onnx", help="fp32 file in --model-dir to quantise")
    p.add_argument("--out", default="model_int8.onnx")
    p.add_argument("--scheme", choices=sorted(SCHEMES), default=DEFAULT_SCHEME,
                   help="integer codes: " + "; ".join(f"{k}: {s.exact}" for k, s in SCHEMES.items()))
    p.add_argument("--keep-fp32", nargs="*", default=DEFAULT_KEEP, metavar="REGEX",
                   help="MatMul node-name patterns to leave in fp32")
    p.add_argument("--smooth", default=DEFAULT_SMOOTH, metavar="REGEX",
                   help="MatMuls whose input gets SmoothQuant ('' = none)")
    p.add_argument("--alpha", type=float, default=0.7, help="SmoothQuant migration strength (0 = off)")
    p.add_argument("--calibration", type=int, default=400,
                   help="template sentences for SmoothQuant's channel maxima (plus a quarter as many paragraphs)")
    p.add_argument("--verify", type=int, default=1000,
                   help="template sentences to verify on (plus an eighth as many paragraphs; and up to 2x real sentences)")
    p.add_argument("--existing", action="store_true",
                   help="check the --out file already there (made on any machine) on this CPU instead of "
                        "making one; nothing is written")
    p.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                   help="also time fp32 vs int8 model-only in this many interleaved rounds")
    p.add_argument("--speed-threads", type=int, default=0, metavar="N",
                   help="ORT threads for --speed (default: the CPUs this process may use; 1 adds CPU time)")
    a = p.parse_args()

    src, out = a.model_dir / a.source, a.model_dir / a.out
    tok = load_tokenizer(a.model_dir)
    threads = len(os.sched_getaffinity(0))
    print(f"quantize.py: checks run on this CPU: {cpu_flags()}")
    if a.existing:
        tmp = out
    else:
        tmp = out.with_suffix(".tmp.onnx")
        quantize(src, tmp, tok, a.keep_fp32, a.smooth, a.calibration, a.alpha, SCHEMES[a.scheme])
    scheme = file_scheme(tmp)
    print(f"  exact-integer reference, scheme {scheme.name!r} ({scheme.exact}):")
    failed = gate_exact(exact_check(tmp, tok, exact_texts(), scheme.codes, threads))
    ref, q = session(src, threads), session(tmp, threads)
    for name, report in verify(ref, q, tok, a.verify).items():
        print(f"  quality on {report['docs']} {name}:")
        for k, lim in TARGETS.items():
            missed = report[k] > lim if k == "batch_diff" else report[k] < lim
            failed += [f"{name} {k}"] if missed else []
            print(f"    {k:13s} {report[k]:.5f}  (target {'<=' if k == 'batch_diff' else '>='} {lim})"
                  f"{'  MISSED' if missed else ''}")
    if a.speed:
        print("  " + speed(src, tmp, tok, a.speed, a.speed_threads or threads))
    if failed:
        if not a.existing:
            tmp.unlink()
        print(f"quantize.py: FAILED {failed} on this CPU ({cpu_flags()}); "
              f"{out} {'fails here' if a.existing else 'not written'}", file=sys.stderr)
        return 1
    if a.existing:
        print(f"{out} passes every check on this CPU")
        return 0
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
