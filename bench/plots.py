"""Plots of what bench/bench.py measured, as PNGs beside its JSON (the last step of `make bench`).

    throughput.png   docs/s per corpus: the worker beside the model-only ceiling and the Python
                     baseline, one panel per model file (bench.json: each case's median round)
    latency_cdf.png  XADD -> hash written, per document, at each probed load (bench.json:
                     `latency.latencies_ms`; older files without it show their p50/p99 only)
    soak_rss.png     the worker's RSS over the memory soak (soak.json: `samples`)

    .venv/bin/python bench/plots.py            # bench/out/bench.json + soak.json -> bench/out/*.png
    .venv/bin/python bench/plots.py --smoke    # bench/out/smoke.json (what `make test` writes)

A missing input skips its plots with a line saying how to make it; no input at all is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SERIES = [("ceiling", "model only (ceiling)", "#9e9e9e"), ("worker", "embed-worker", "#1f77b4"),
          ("python", "Python baseline", "#ff7f0e")]


def model_label(model_file: str) -> str:
    return {"model.onnx": "fp32 (model.onnx)", "model_int8.onnx": "int8 (model_int8.onnx)"}.get(model_file, model_file)


def throughput(bench: dict, title: str, path: Path) -> None:
    results = bench["results"]
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        cases = [r for r in results if r["model"] == model]
        width = 0.8 / len(SERIES)
        for i, (key, label, color) in enumerate(SERIES):
            xs = [c + (i - (len(SERIES) - 1) / 2) * width for c in range(len(cases))]
            values = [r[key]["docs_per_s"] for r in cases]
            bars = ax.bar(xs, values, width, label=label, color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set_xticks(range(len(cases)), [f"{r['corpus']}\n~{r['tokens'] / r['docs']:.0f} tokens" for r in cases])
        ax.set_ylabel("documents / s")
        ax.set_title(model_label(model))
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Throughput, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf(bench: dict, title: str, path: Path) -> bool:
    probed = [r for r in bench["results"] if r.get("latency")]
    if not probed:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in probed:
        lat = r["latency"]
        label = f"{model_label(r['model'])} {r['corpus']} at {lat['offered_docs_per_s']:.0f} docs/s"
        values = lat.get("latencies_ms")
        if values:
            values = sorted(values)
            n = len(values)
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)
        else:  # a bench.json from before the per-document latencies were kept
            ax.plot([lat["p50_ms"], lat["p99_ms"]], [0.50, 0.99], "o--", label=f"{label} (p50, p99 only)")
    ax.set_xscale("log")
    ax.set_xlabel("XADD -> hash written (ms, log scale)")
    ax.set_ylabel("share of documents")
    ax.set_ylim(0, 1.01)
    ax.axhline(0.99, color="grey", lw=0.6, ls=":")
    ax.axhline(0.50, color="grey", lw=0.6, ls=":")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Latency at 50% of the backlog rate, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def soak_rss(soak: dict, path: Path) -> None:
    t, rss = zip(*soak["samples"])
    minutes = soak["seconds"] >= 180
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([x / 60 for x in t] if minutes else t, rss, lw=1.2)
    ax.set_xlabel("minutes" if minutes else "seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, max(rss) * 1.15)
    ax.grid(alpha=0.3)
    ax.set_title(f"fp32 worker RSS under a steady backlog ({soak['seconds']:.0f} s, {soak['docs']:,} documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="plot bench/out/smoke.json (bench.py --smoke) instead")
    p.add_argument("--out", type=Path, default=OUT, help="where the PNGs go (default bench/out)")
    a = p.parse_args()
    source = OUT / ("smoke.json" if a.smoke else "bench.json")
    soak_file = OUT / "soak.json"
    a.out.mkdir(parents=True, exist_ok=True)
    drawn = []
    if source.is_file():
        bench = json.loads(source.read_text())
        title = (f"smoke run (tiny corpora, 1 round), {bench['threads']} threads" if a.smoke
                 else f"{bench['threads']} ORT threads, {bench['cpus']} CPUs, medians of the rounds")
        throughput(bench, title, a.out / "throughput.png")
        drawn.append("throughput.png")
        if latency_cdf(bench, title, a.out / "latency_cdf.png"):
            drawn.append("latency_cdf.png")
        else:
            print(f"plots: {source.name} has no latency probe; no latency_cdf.png")
    else:
        print(f"plots: {source} missing; run `make bench` (or bench.py{' --smoke' if a.smoke else ''})")
    if soak_file.is_file():
        soak_rss(json.loads(soak_file.read_text()), a.out / "soak_rss.png")
        drawn.append("soak_rss.png")
    else:
        print(f"plots: {soak_file} missing; run bench.py --soak SECONDS for soak_rss.png")
    if not drawn:
        print("plots: nothing to plot", file=sys.stderr)
        return 1
    print(f"plots: {', '.join(drawn)} in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
