"""Draws vision.py's results: FastViTHD latency against resolution, ours and the peer, one line per dtype (batch 1).

python benchmarks/plot.py results/vision.json              # writes results/vision.png
python benchmarks/plot.py results/vision.json --output latency.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

SIDES = {"ours": ("fastvlm_hf FastViTHDModel", "-", "o"), "peer": ("transformers TimmWrapperModel", "--", "s")}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the JSON vision.py --output wrote")
    parser.add_argument("--output", type=Path, help="PNG to write (default: the results' path with .png)")
    parser.add_argument("--linear", action="store_true", help="linear latency axis (default: logarithmic)")
    return parser.parse_args(argv)


def series(
    rows: list[dict[str, Any]], dtype: str, side: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Resolutions, median, min and max latency in ms of one side at batch 1, by resolution."""
    chosen = sorted((row for row in rows if row["dtype"] == dtype and row["batch"] == 1), key=lambda r: r["resolution"])
    samples = [[seconds * 1e3 for seconds in row[f"{side}_s"]] for row in chosen]
    medians = [row[f"{side}_median_s"] * 1e3 for row in chosen]
    return [row["resolution"] for row in chosen], medians, [min(s) for s in samples], [max(s) for s in samples]


def draw(results: dict[str, Any], log_scale: bool):
    figure, axes = plt.subplots(figsize=(7, 4.5))
    dtypes = list(dict.fromkeys(row["dtype"] for row in results["rows"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, dtype in zip(colours, dtypes):
        for side, (label, line_style, marker) in SIDES.items():
            sides, medians, lows, highs = series(results["rows"], dtype, side)
            errors = [[m - low for m, low in zip(medians, lows)], [high - m for m, high in zip(medians, highs)]]
            axes.errorbar(
                sides,
                medians,
                yerr=errors,
                color=colour,
                linestyle=line_style,
                marker=marker,
                capsize=3,
                label=f"{label}, {dtype}",
            )
    if log_scale:
        axes.set_yscale("log")
    resolutions = sorted({row["resolution"] for row in results["rows"] if row["batch"] == 1})
    axes.set_xticks(resolutions)
    axes.set_xlabel("image side (px), batch 1")
    axes.set_ylabel("latency (ms), median with min–max")
    machine = results["machine"]
    hardware = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    compiled = ", torch.compile" if results["settings"].get("compile") else ""
    axes.set_title(f"FastViTHD forward latency{compiled}\n{hardware}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    if results.get("benchmark") != "vision":
        raise SystemExit(f"{args.results} is not vision.py's output")
    output = args.output or args.results.with_suffix(".png")
    draw(results, log_scale=not args.linear).savefig(output, dpi=150)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
