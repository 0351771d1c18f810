"""The roofline figure of ``notebooks/roofline.ipynb``: measured ceilings, every measured kernel and peer, and the
analytic curves of how arithmetic intensity moves with sequence length and batch.

Left panel: the roofline of each results file's device (from its measured ceilings) with every timed kernel
placed at (intensity, achieved FLOP/s), prefill near the compute roof, decode on the bandwidth slope; plus the
attainable performance along the analytic intensity curves. Right panel: intensity against sequence length
(prefill) and batch (decode), with the ridge point. With no GPU results the figure uses the H100 datasheet
ceilings, labelled as assumed, and says that no measurement is shown: nothing here is ever invented. The left
panel's y axis is TFLOP/s: the roof and the analytic marks are attainable rates, only the points are measured.

``python -m bench.roofline_plot`` regenerates the committed ``notebooks/roofline.png`` (the notebook itself only
shows the figure). The PNG carries :func:`source_digest` of what it plots, so a test can tell when the committed
figure no longer matches the code or the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bench import results as res
from disagg import roofline as rl

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_PNG = ROOT / "notebooks" / "roofline.png"
RESULTS_DIR = ROOT / "bench" / "results"
DIGEST_KEY = "phaseattn-source-digest"
MODEL = rl.LLAMA3_8B
SEQLENS = np.unique(np.round(2 ** np.arange(7, 17.01, 0.25)).astype(int))  # 128 .. 128k
BATCHES = np.unique(np.round(2 ** np.arange(0, 8.01, 0.25)).astype(int))  # 1 .. 256
GROUP_HEADS = ((32, 8), (32, 32))
OURS_COLOR = "tab:red"
PEER_COLORS = {
    "sdpa-flash": "tab:blue",
    "sdpa-cudnn": "tab:green",
    "sdpa-efficient": "tab:purple",
    "flex": "tab:orange",
}
PHASE_MARKERS = {"prefill": "o", "decode": "s"}
ASSUMED_LABEL = "H100 SXM datasheet: 989 TFLOP/s, 3.35 TB/s (assumed, not measured)"
NO_RESULTS_NOTE = (
    "No GPU results committed yet (bench/results/ holds none): analytic curves only, on the H100 SXM datasheet "
    "ceilings (assumed, not measured)."
)


def load_results(where: str | Path | Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Load every results file in a directory (or the given files). Smoke files are left out: their numbers are
    not performance numbers. Returns the loaded results and one note per file left out."""
    if isinstance(where, (str, Path)):
        where = Path(where)
        paths = sorted(where.glob("*.json")) if where.is_dir() else [where] if where.exists() else []
    else:
        paths = [Path(p) for p in where]
    loaded, notes = [], []
    for path in paths:
        data = res.load(path)
        if not data["performance_numbers"]:
            notes.append(f"{path.name}: a smoke run (not performance numbers), left out")
        elif not data["ceilings"]:
            notes.append(f"{path.name}: no measured ceilings (run cut off before they were taken), left out")
        else:
            loaded.append(data)
    return loaded, notes


def _device_label(data: dict[str, Any]) -> str:
    c = res.ceilings_of(data)
    env = data["environment"]
    return (
        f"{env['device_name']}: matmul {c.matmul_flops / 1e12:.0f} TFLOP/s, copy {c.copy_bandwidth / 1e12:.2f} TB/s "
        f"(measured {env['date'][:10]})"
    )


def analytic_curves() -> dict[str, dict[str, np.ndarray]]:
    """Intensity (FLOP/byte) of each phase as its size grows: x is the sequence length (prefill) or the batch
    (decode). Attention intensity does not depend on head_dim (FLOPs and bytes both scale with it)."""
    curves = {}
    for hq, hkv, causal in ((32, 8, True), (32, 8, False), (32, 32, True)):
        ai = [rl.prefill_intensity(int(s), 128, hq, hkv, causal=causal) for s in SEQLENS]
        curves[f"prefill attention, {hq}/{hkv}, {'causal' if causal else 'full'}"] = {"x": SEQLENS, "ai": np.array(ai)}
    curves[f"prefill GEMMs ({MODEL.name}), tokens = S"] = {
        "x": SEQLENS,
        "ai": np.array([MODEL.gemm_intensity(int(s)) for s in SEQLENS]),
    }
    for hq, hkv in GROUP_HEADS:
        for name, kvb in (("bf16", 2), ("fp8", 1)):
            ai = [rl.decode_intensity(int(b), hq, hkv, 4096, 128, kvb) for b in BATCHES]
            curves[f"decode attention, {hq}/{hkv}, {name} KV"] = {"x": BATCHES, "ai": np.array(ai)}
    curves[f"decode GEMMs ({MODEL.name}), tokens = batch"] = {
        "x": BATCHES,
        "ai": np.array([MODEL.gemm_intensity(int(b)) for b in BATCHES]),
    }
    return curves


def _style(name: str) -> dict[str, Any]:
    prefill = name.startswith("prefill")
    if "32/32" in name:
        color = "cornflowerblue" if prefill else "peru"
    else:
        color = "navy" if prefill else "saddlebrown"
    if "GEMM" in name:
        return {"color": color, "linestyle": "--"}
    if "fp8" in name or "full" in name:
        return {"color": color, "linestyle": ":"}
    return {"color": color, "linestyle": "-"}


def _spans(ax, roof: rl.Roofline, curves: dict[str, dict[str, np.ndarray]]) -> None:
    """Where each phase lives on the intensity axis over the benchmark's range (prefill S = 512..16k, decode
    batch 1..256): bars along the bottom of the roofline panel, and the decode attention points on the roof."""
    rows = [
        ("prefill attention, 32/8, causal", "prefill attention 32/8 causal, S=512..16k"),
        (f"prefill GEMMs ({MODEL.name}), tokens = S", f"prefill GEMMs {MODEL.name}, S=512..16k"),
        (f"decode GEMMs ({MODEL.name}), tokens = batch", f"decode GEMMs {MODEL.name}, batch 1..256"),
    ]
    trans = ax.get_xaxis_transform()
    for i, (key, label) in enumerate(rows):
        c = curves[key]
        keep = (c["x"] >= 512) & (c["x"] <= 16384) if key.startswith("prefill") else np.ones_like(c["x"], bool)
        lo, hi = c["ai"][keep].min(), c["ai"][keep].max()
        y = 0.05 + 0.06 * i
        ax.plot(
            [lo, hi],
            [y, y],
            transform=trans,
            lw=5,
            solid_capstyle="butt",
            alpha=0.6,
            color=_style(key)["color"],
            label="analytic: intensity range of a phase (bars)" if i == 0 else None,
        )
        ax.annotate(label, (lo, y), xycoords=trans, textcoords="offset points", xytext=(0, 5), fontsize=7.5)
    first = True
    for name, c in curves.items():
        if name.startswith("decode attention"):
            ai = c["ai"][0]
            label = "analytic: roof at decode attention's intensity" if first else None
            ax.plot([ai], [roof.attainable(ai) / 1e12], "D", mfc="none", ms=7, color="0.4", label=label)
            first = False
            short = name.replace("decode attention, ", "decode attn ").replace(" KV", "")
            ax.annotate(short, (ai, roof.attainable(ai) / 1e12), textcoords="offset points", xytext=(7, -4), fontsize=7)


def figure(results: list[dict[str, Any]], notes: Iterable[str] = ()) -> Figure:
    """The two-panel roofline figure for ``results`` (possibly empty: analytic curves on assumed ceilings)."""
    fig = Figure(figsize=(15, 6.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1.25, 1))
    ai_axis = np.logspace(-1, 4.3, 400)

    roofs = [(res.ceilings_of(d).roofline(), _device_label(d), "-") for d in results]
    if not roofs:
        roofs = [(rl.H100_SXM_DATASHEET, ASSUMED_LABEL, "--")]
    for i, (roof, label, ls) in enumerate(roofs):
        ax.plot(ai_axis, [roof.attainable(a) / 1e12 for a in ai_axis], ls, color="black", lw=2.2 - 0.5 * i, label=label)
    primary = roofs[0][0]
    ax.axvline(primary.ridge, color="black", lw=0.8, ls=":")
    ax.annotate(
        f"ridge {primary.ridge:.0f} FLOP/B",
        (primary.ridge, primary.flops / 1e12 / 30),
        rotation=90,
        ha="right",
        va="bottom",
        fontsize=8,
    )

    curves = analytic_curves()
    _spans(ax, primary, curves)
    for name, c in curves.items():
        ax2.plot(c["x"], c["ai"], lw=1.6, label=name, **_style(name))

    points = [p for d in results for p in res.roofline_points(d)]
    seen = set()
    for p in points:
        ours = p["kind"] == "ours"
        base = p["contender"].split("+")[0]
        color = OURS_COLOR if ours else PEER_COLORS.get(base, "tab:gray")
        gather = "+gather" in p["contender"]
        label_key = (p["contender"], p["phase"])
        ax.scatter(
            p["intensity"],
            p["flops_per_s"] / 1e12,
            marker="*" if ours else PHASE_MARKERS[p["phase"]],
            s=120 if ours else 36,
            facecolors="none" if gather else color,
            edgecolors=color,
            linewidths=1.0,
            zorder=3 if ours else 2,
            label=None if label_key in seen else f"{p['phase']}: {p['contender']}" + (" (ours)" if ours else ""),
        )
        seen.add(label_key)

    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOP / byte)",
        ylabel="TFLOP/s: attainable (roof, analytic marks), measured (points)" if results else "attainable TFLOP/s",
        title="Roofline: prefill is compute-bound, decode sits on the bandwidth slope",
    )
    ax.set_ylim(primary.flops / 1e12 * 2e-4, primary.flops / 1e12 * 2.5)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")

    ax2.axhline(primary.ridge, color="black", lw=1, ls=":")
    ax2.annotate(f"ridge {primary.ridge:.0f} FLOP/B", (1.2, primary.ridge * 1.15), fontsize=8)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length S (prefill)  /  batch size (decode)",
        ylabel="arithmetic intensity (FLOP / byte); bf16 unless fp8, decode context 4k",
        title="Intensity vs sequence length (prefill) and batch (decode)",
    )
    ax2.grid(True, which="major", alpha=0.3)
    ax2.legend(fontsize=7.5, loc="upper left")

    lines = [f"{len(points)} measured points from {len(results)} results file(s)."] if results else [NO_RESULTS_NOTE]
    lines += list(notes)
    fig.suptitle(
        "phaseattn roofline - " + " ".join(lines), fontsize=9, color="black" if results else "darkred", wrap=True
    )
    return fig


def source_digest(results: list[dict[str, Any]], notes: Iterable[str] = ()) -> str:
    """sha256 of everything the figure plots: the analytic curves, the roofs, the measured points and the notes."""
    curves = {name: [c["x"].tolist(), np.round(c["ai"], 9).tolist()] for name, c in analytic_curves().items()}
    roofs = [[r.flops, r.bandwidth] for r in (res.ceilings_of(d).roofline() for d in results)]
    if not roofs:
        roofs = [[rl.H100_SXM_DATASHEET.flops, rl.H100_SXM_DATASHEET.bandwidth]]
    points = [p for d in results for p in res.roofline_points(d)]
    doc = {"curves": curves, "roofs": roofs, "points": points, "notes": list(notes)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def save(fig: Figure, path: str | Path, digest: str) -> None:
    """Write the figure as PNG with ``digest`` in its metadata."""
    fig.savefig(path, dpi=120, metadata={DIGEST_KEY: digest})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.roofline_plot",
        description="Regenerate the roofline figure from the results files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of results files")
    parser.add_argument("--out", type=Path, default=COMMITTED_PNG, help="PNG to write")
    args = parser.parse_args(argv)
    results, notes = load_results(args.results)
    save(figure(results, notes), args.out, source_digest(results, notes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
