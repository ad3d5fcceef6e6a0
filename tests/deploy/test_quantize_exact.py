"""onnx/quantize.py's exact-integer reference check, on whatever CPU runs the tests.

`make model-int8` runs the check on the real model every time; these tests show, on one
MatMulIntegerToFloat with weights shaped to be hard for the kernels, that it catches what it is
there to catch: the 8-bit-weight scheme saturates ONNX Runtime's u8 x s8 kernel on x86 CPUs
without VNNI (there, the check must fail), and the exact schemes are exact on every CPU (here, the
check must pass). No model file or network is needed.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper, TensorProto

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("onnx_quantize", ROOT / "onnx" / "quantize.py")
Q = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = Q  # dataclasses look their module up there
_spec.loader.exec_module(Q)

EXACT_SCHEMES = [s for s in Q.SCHEMES if s != "w8"]


def saturating_cpu() -> bool:
    """x86 without VNNI/AMX: ORT's u8 x s8 kernel adds pairs of products in saturating int16."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = Path("/proc/cpuinfo").read_text()
    return not re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags)


def one_matmul(scheme: Q.Scheme, k: int = 384, n: int = 96, seed: int = 0):
    """A [k, n] weight with heavy tails (a few large weights per column, some of them side by
    side at k, k+1), quantised by `scheme` and wrapped as the one MatMul of a model."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[rng.integers(0, k, 4 * n), np.repeat(np.arange(n), 4)] *= 12
    pairs = rng.integers(0, k // 2, n) * 2
    w[pairs, np.arange(n)] = 0.6
    w[pairs + 1, np.arange(n)] = 0.6
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    Q.quantize_per_token(model, [model.graph.node[0]], scheme)
    return model, w


@pytest.mark.parametrize("name", EXACT_SCHEMES)
def test_exact_schemes_are_exact_for_every_input_here(name):
    model, _ = one_matmul(Q.SCHEMES[name])
    worst = Q.check_worst_case(model, Q.SCHEMES[name].codes, threads=2)
    assert worst["units"] < 0.5 and worst["diff"] <= Q.EXACT_LIMIT, worst


def test_the_check_fails_for_8_bit_weights_where_the_kernel_saturates():
    scheme = Q.SCHEMES["w8"]
    model, _ = one_matmul(scheme)
    worst = Q.check_worst_case(model, scheme.codes, threads=2)
    if saturating_cpu():
        # int16 pair sums clipped at 32767: thousands of units off, far above the limit.
        assert worst["units"] > 100 and worst["diff"] > Q.EXACT_LIMIT, worst
    else:
        assert worst["units"] < 0.5, worst


def test_the_check_sees_one_unit_of_error():
    """CPU-independent: a reference one code off in one weight is caught."""
    scheme = Q.SCHEMES["pair"]
    model, _ = one_matmul(scheme)
    (mm,) = Q.integer_matmuls(model)
    xq = Q.worst_case_rows(mm, scheme.codes)
    got = Q.one_node_session(model, mm, threads=2).run(None, {mm.node.input[0]: xq})[0]
    assert Q.deviation(mm, mm.sums(xq), got)[1] < 0.5
    mm.codes[5, 7] += 1
    diff, units = Q.deviation(mm, mm.sums(xq), got)
    assert units >= 0.99 and diff > Q.EXACT_LIMIT


def test_pair_codes_stay_within_their_bounds():
    rng = np.random.default_rng(1)
    w = (rng.standard_t(3, (1536, 384)) * 0.03).astype(np.float32)
    q, scale = Q.quantize_weights(w, Q.SCHEMES["pair"])
    assert np.abs(q).max() <= 127
    assert (np.abs(q[0::2]) + np.abs(q[1::2])).max() <= 128
    # The codes still use the range: the error is at most a code's width, apart from rounding fix-ups.
    err = np.abs(q * scale - w) / scale
    assert np.quantile(err, 0.999) <= 0.5 + 1e-4 and err.max() <= 1.5


def test_numpy_forward_matches_ort_on_one_matmul():
    """The numpy interpreter behind the end-to-end check, on the quantiser + integer product."""
    model, w = one_matmul(Q.SCHEMES["pair"])
    x = np.random.default_rng(2).standard_normal((2, 5, 384)).astype(np.float32)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 384]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 96]))
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    mine, _ = Q.numpy_forward(model, {"x": x})
    assert np.abs(got - mine).max() <= Q.EXACT_LIMIT
    assert np.abs(got - x @ w).max() < 0.05 * np.abs(x @ w).max()
