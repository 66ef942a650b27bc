"""Output: a fixed-width table (stdout and table.txt), a CSV with the device and versions on every row,
and a PNG of TFLOP/s per case, one bar per provider."""
from __future__ import annotations

import csv
import re
from pathlib import Path

COLUMNS = ["device", "driver", "torch", "triton", "cuda", "model", "case", "label", "batch", "heads", "head_dim",
           "n_txt", "n_img",
           "grid", "layers", "dtype", "mask", "coverage", "nnz", "live_keys", "fd_tiles",
           "provider", "status", "ms", "tflops",
           "flops", "peak_mib", "x_fasa", "max_err", "tol", "sdpa_backend", "build_ms", "target", "note"]

TABLE = [  # (header, key, format)
    ("case", "label", "{}"), ("dtype", "dtype", "{}"), ("mask", "mask", "{}"), ("cov", "coverage", "{:.0%}"),
    ("live keys", "live_keys", "{:.1%}"), ("fd tiles", "fd_tiles", "{:.0%}"), ("provider", "provider", "{}"),
    ("status", "status", "{}"),
    ("ms", "ms", "{:.4g}"), ("TFLOP/s", "tflops", "{:.3g}"), ("peak MiB", "peak_mib", "{:.4g}"),
    ("x fasa", "x_fasa", "{:.2f}"), ("max err", "max_err", "{:.1e}"), ("info", "info", "{}"),
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
        return f"{'mask' if r['provider'] == 'fasa' else 'block mask'} {r['build_ms']:.3g} ms"
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


def plot(rows: list, path, title: str = "") -> Path | None:
    """TFLOP/s (attended keys only) per case and coverage, one bar per provider, one panel per dtype.
    Returns None when there is nothing timed or matplotlib is missing."""
    timed = [r for r in rows if r["status"] == "ok" and r.get("tflops")]
    if not timed:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dtypes = list(dict.fromkeys(r["dtype"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    groups = list(dict.fromkeys((r["label"], r["mask"], r["coverage"]) for r in timed))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8, 0.55 * len(groups) * len(providers) / 3), 4.2 * len(dtypes)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, dt in zip(axes[:, 0], dtypes):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                r = next((r for r in timed if r["dtype"] == dt and r["provider"] == prov
                          and (r["label"], r["mask"], r["coverage"]) == g), None)
                if r:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(r["tflops"])
            ax.bar(xs, ys, width, label=prov)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{lab}\n{kind} {cov:.0%}" for lab, kind, cov in groups], fontsize=7, rotation=60,
                           ha="right")
        ax.set_ylabel(f"{dt}: TFLOP/s (attended keys)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(providers))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
