"""Output: a fixed-width table (stdout and table.txt), a CSV with the device and versions on every row,
and a PNG: one small panel per model shape, speedup over ``sdpa_bias`` against mask coverage, one line per
provider."""
from __future__ import annotations

import csv
import re
from pathlib import Path

COLUMNS = ["device", "driver", "torch", "triton", "cuda", "model", "case", "label", "batch", "heads", "head_dim",
           "n_txt", "n_img",
           "grid", "layers", "dtype", "mask", "coverage", "nnz", "live_keys", "fd_tiles",
           "provider", "status", "ms", "tflops",
           "flops", "peak_mib", "x_fasa", "vs_bias", "max_err", "tol", "sdpa_backend", "build_ms", "target", "note"]

TABLE = [  # (header, key, format)
    ("case", "label", "{}"), ("dtype", "dtype", "{}"), ("mask", "mask", "{}"), ("cov", "coverage", "{:.0%}"),
    ("live keys", "live_keys", "{:.1%}"), ("fd tiles", "fd_tiles", "{:.0%}"), ("provider", "provider", "{}"),
    ("status", "status", "{}"),
    ("ms", "ms", "{:.4g}"), ("TFLOP/s", "tflops", "{:.3g}"), ("peak MiB", "peak_mib", "{:.4g}"),
    ("x fasa", "x_fasa", "{:.2f}"), ("vs bias", "vs_bias", "{:.2f}"), ("max err", "max_err", "{:.1e}"), ("info", "info", "{}"),
    ("target", "target", "{}"),
]


def device_slug(name: str) -> str:
    """A folder name for a device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; CPUs -> "cpu"."""
    if name.lower().startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _info(r: dict) -> str:
    if r.get("sdpa_backend"):
        return r["sdpa_backend"]
    if r.get("build_ms") is not None:
        return f"{'mask' if r['provider'].startswith('fasa') else 'block mask'} {r['build_ms']:.3g} ms"
    if (r.get("note") or "").startswith("Triton interpreter"):
        return "interpreter, not timed"
    if r["provider"] == "reference" and "chunked" in (r.get("note") or ""):
        return "query-chunked"
    return ""


def _cell(fmt: str, value) -> str:
    if value is None or value == "":
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: list) -> str:
    """Rows as an aligned text table; a blank line between (case, dtype) groups."""
    cells = [[h for h, _, _ in TABLE]]
    prev = None
    breaks = set()
    for r in rows:
        group = (r["case"], r["dtype"])
        if prev is not None and group != prev:
            breaks.add(len(cells))
        prev = group
        r = {**r, "info": _info(r)}
        cells.append([_cell(fmt, r.get(key)) for _, key, fmt in TABLE])
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    lines = []
    for i, c in enumerate(cells):
        if i in breaks:
            lines.append("")
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: list, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return path


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


MASK_STYLE = {"hair": "-", "band": "--"}  # the full mask is the x = 100% point of both


def plot(rows: list, path, title: str = "") -> Path | None:
    """One small panel per (dtype, model shape): x = mask coverage, y = speedup over ``sdpa_bias`` (its time /
    the provider's; > 1 is faster), one line per provider, solid for hair masks, dashed for bands. Returns
    None when nothing has a ratio to plot or matplotlib is missing."""
    timed = [r for r in rows if r["status"] == "ok" and r.get("vs_bias")]
    if not timed:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((r["dtype"], r["label"]) for r in timed))
    providers = [p for p in dict.fromkeys(r["provider"] for r in timed) if p != "sdpa_bias"]
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.3 * n_cols, 2.6 * n_rows + 0.6), squeeze=False)
    for ax, (dtype, label) in zip(axes.flat, panels):
        mine = [r for r in timed if (r["dtype"], r["label"]) == (dtype, label)]
        ax.axhline(1.0, color="grey", lw=0.8)
        for prov in providers:
            for kind, style in MASK_STYLE.items():
                if not any(r["provider"] == prov and r["mask"] == kind for r in mine) and kind != "hair":
                    continue  # no band rows: the full-mask point is on the hair line already
                pts = sorted((float(r["coverage"]), float(r["vs_bias"])) for r in mine
                             if r["provider"] == prov and r["mask"] in (kind, "full"))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[prov], lw=1.2)
        ax.set_yscale("log", base=2)  # ratios: 2x faster and 2x slower are equally far from 1
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{label} ({dtype})", fontsize=8)
        ax.set_xlim(0, 1.05)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("x sdpa_bias (higher = faster)", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("mask coverage", fontsize=7)
    handles = [matplotlib.lines.Line2D([], [], color=colors[p], label=p) for p in providers]
    kinds = {r["mask"] for r in timed}
    handles += [matplotlib.lines.Line2D([], [], color="k", ls=st, label=f"{k} mask (full mask at 100%)")
                for k, st in MASK_STYLE.items() if k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
