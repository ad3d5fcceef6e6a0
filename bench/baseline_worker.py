"""The Python baseline for `make bench`: the straightforward worker a team would write first.

XREADGROUP COUNT 32 -> tokenise (tokenizers) -> pad to the longest in the batch -> onnxruntime
(same model file, same intra-op thread count) -> mean pool, L2-normalise -> one pipeline of
HSET + XACK. Stops when the group has nothing new (with --drain).
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import redis
from tokenizers import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    a = p.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    tok = Tokenizer.from_file(a.tokenizer)
    tok.enable_truncation(a.max_len)
    tok.enable_padding()  # pad to the longest in the batch
    r = redis.Redis.from_url(a.redis_url)
    try:
        r.xgroup_create(a.stream, a.group, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    while True:
        reply = r.xreadgroup(a.group, "baseline", {a.stream: ">"}, count=a.count, block=200)
        if not reply:
            break
        entries = reply[0][1]
        texts = [f[b"content"].decode() for _, f in entries]
        enc = tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        m = mask[..., None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        pipe = r.pipeline(transaction=False)
        for (eid, f), vec in zip(entries, v.astype(np.float32)):
            fields = {k: val for k, val in f.items() if k != b"id"}
            fields[b"embedding"] = vec.tobytes()
            pipe.hset(a.prefix + f[b"id"].decode(), mapping=fields)
        pipe.xack(a.stream, a.group, *[eid for eid, _ in entries])
        pipe.execute()


if __name__ == "__main__":
    main()
