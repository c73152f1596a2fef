"""PNG plots from bench/results/*.jsonl: time and peak extra memory vs N per provider, log-log.

One figure per (device, op, dtype, D): left median time (solid fwd+bwd, dashed fwd), right peak extra memory
of forward+backward (forward for assign). By default the latest kernels run of each device is drawn.

    python bench/plot.py                                  # -> bench/results/plots/*.png
    python bench/plot.py $OUT/kernels.jsonl --out-dir /tmp/plots --run all
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import table  # noqa: E402


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in rows if r.get("type") == "case" and r.get("status") == "ok"]
    figs: dict[tuple, list] = defaultdict(list)
    for r in cases:
        dev = (r.get("env") or {}).get("device_name") or r.get("device")
        figs[(dev, r["device"], r["op"], r["dtype"], r["d"], r.get("k"), r["run_id"])].append(r)
    several_runs = len({r["run_id"] for r in cases}) > len({(r.get("env") or {}).get("device_name") for r in cases})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (dev_name, _dev, op, dtype, d, k, run), rs in sorted(figs.items(), key=lambda kv: str(kv[0])):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        providers = sorted({r["provider"] for r in rs}, key=table._porder)
        colors = {p: f"C{i}" for i, p in enumerate(providers)}
        mem_mode = "fwd_bwd" if any(r["mode"] == "fwd_bwd" for r in rs) else "fwd"
        for p in providers:
            for mode, style in (("fwd_bwd", "-"), ("fwd", "--")):
                pts = sorted((r["n"], r["median_ms"]) for r in rs if r["provider"] == p and r["mode"] == mode)
                if pts:
                    ax_t.plot(*zip(*pts), style, marker="o", color=colors[p], label=f"{p} {mode.replace('_', '+')}")
            pts = sorted(
                (r["n"], r["peak_extra_bytes"] / 2**20)
                for r in rs
                if r["provider"] == p and r["mode"] == mem_mode and r.get("peak_extra_bytes")
            )
            if pts:
                ax_m.plot(*zip(*pts), "-", marker="o", color=colors[p], label=p)
        size = f"D={d}" + (f", K={k}" if k else "")
        ax_t.set_title(f"{op} {dtype} {size}: median time")
        ax_t.set_ylabel("ms")
        ax_m.set_title(f"peak extra memory ({mem_mode.replace('_', '+')})")
        ax_m.set_ylabel("MiB")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (rows)" if op == "assign" else "N (rows)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        env = rs[0].get("env") or {}
        fig.suptitle(
            f"{dev_name} | torch {env.get('torch')} | git {str(env.get('git_sha'))[:10]} | {env.get('date')}",
            fontsize=8,
        )
        fig.tight_layout()
        suffix = (f"_k{k}" if k else "") + (f"_{run}" if several_runs else "")
        path = out_dir / f"{_slug(dev_name)}_{op}_{dtype}_d{d}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=[str(table.RESULTS)], help="JSONL files or directories")
    p.add_argument("--out-dir", default=str(table.RESULTS / "plots"))
    p.add_argument("--run", default="latest", help="'latest' (per device), 'all', or a run_id")
    args = p.parse_args(argv)
    rows = [r for r in table.read_jsonl(args.paths) if r.get("bench") == "kernels"]
    if args.run == "latest":
        rows = table.latest_runs(rows)
    elif args.run != "all":
        rows = [r for r in rows if r.get("run_id") == args.run]
    for path in plot(rows, Path(args.out_dir)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
