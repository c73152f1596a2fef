"""Small, uneven-size smoke of every op and dtype of a backend against the float64 reference (bench/gpu_check.sh).

Meant to run under `compute-sanitizer` (memcheck, racecheck, synccheck): tiny sizes that are not multiples of
any tile (N = 77, D = 33 / 130, K = 13), every op (assign, contrastive in each fn_mode, siamese), forward and
backward, each dtype. Each case is one JSON line in --out (parity errors, finite flags, seconds); the exit code
is 1 when a case errs or misses its tolerance. A kernel's out-of-bounds access is the sanitizer's to report.

`--compiled` compares torch.compile(spcl_loss) with eager on the triton backend at N = 4096 (autotuned launches
under Dynamo: an autotuner rebuilt without `reset_to_zero` would double-count the siamese atomics).

    python bench/gpu_smoke.py --backend cuda --out smoke.jsonl
    compute-sanitizer --tool memcheck --error-exitcode 3 python bench/gpu_smoke.py --backend cuda
    python bench/gpu_smoke.py --backend triton --compiled
    python bench/gpu_smoke.py --backend cpu --device cpu      # the dry run of gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protoclr import ops  # noqa: E402
from protoclr.ops.checks import FN_MODES  # noqa: E402
from tests.helpers import make_batch, rel_err  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative error allowed against the float64 reference on the same (unrounded) inputs. float32 tolerates
# TF32-class products on a GPU; 16-bit inputs are rounded before the kernel sees them.
TOL = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}


def _compare(got, want) -> tuple[float, bool]:
    err = max(rel_err(g.detach().double().cpu(), w.detach().double().cpu()) for g, w in zip(got, want))
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    return err, finite


def cases(backend: str, device: torch.device, dtypes: list[str]):
    """(name, dtype name, fn() -> (got tensors, want tensors)) for every op and dtype."""
    for dt in dtypes:
        dtype = DTYPES[dt]
        for d in (33, 130):

            def assign_case(dtype=dtype, d=d):
                x = torch.randn(77, d, dtype=torch.float64)
                c = torch.randn(13, d, dtype=torch.float64)
                bias = -0.5 * c.pow(2).sum(1)
                xl, cl = x.to(dtype), c.to(dtype)  # the reference sees the rounded inputs: indices must agree
                idx, score = ops.assign(xl.to(device), cl.to(device), bias.to(device), backend=backend)
                ridx, rscore = ops.assign(xl.double(), cl.double(), bias, backend="reference")
                agree = torch.equal(idx.cpu(), ridx) if dtype == torch.float64 else None
                return (score,), (rscore,), agree

            yield f"assign M=77 K=13 D={d}", dt, assign_case

        for fn_mode, d in [(m, 33) for m in FN_MODES] + [("mask", 130)]:  # D > 128: the non-MMA CUDA path

            def contrastive_case(dtype=dtype, fn_mode=fn_mode, d=d):
                b = make_batch(26, 3, dz=d, k=4)  # N = 78 rows, three views per image
                z = b["z"].to(dtype)
                want_z = z.double().requires_grad_()
                want = ops.contrastive_loss(
                    want_z, b["inst"], b["proto"], tau=0.3, fn_mode=fn_mode, backend="reference"
                )
                (want_g,) = torch.autograd.grad(want, want_z)
                got_z = z.to(device).requires_grad_()
                got = ops.contrastive_loss(
                    got_z, b["inst"].to(device), b["proto"].to(device), tau=0.3, fn_mode=fn_mode, backend=backend
                )
                (got_g,) = torch.autograd.grad(got, got_z)
                return (got, got_g), (want, want_g), None

            yield f"contrastive {fn_mode} N=78 V=3 D={d}", dt, contrastive_case

        def siamese_case(dtype=dtype):
            b = make_batch(37, 2, dh=45, k=4)  # N = 74 rows, Dh = 45
            h = b["h"].to(dtype)
            wdt = torch.float64 if dtype == torch.float64 else torch.float32
            w, bias = b["weight"].to(wdt), b["bias"].to(wdt)
            leaves_r = [h.double().requires_grad_(), w.double().requires_grad_(), bias.double().requires_grad_()]
            want = ops.siamese_loss(leaves_r[0], b["inst"], b["proto"], leaves_r[1], leaves_r[2], backend="reference")
            want_g = torch.autograd.grad(want, leaves_r)
            leaves = [t.to(device).requires_grad_() for t in (h, w, bias)]
            got = ops.siamese_loss(
                leaves[0], b["inst"].to(device), b["proto"].to(device), leaves[1], leaves[2], backend=backend
            )
            got_g = torch.autograd.grad(got, leaves)
            return (got, *got_g), (want, *want_g), None

        yield "siamese N=74 Dh=45", dt, siamese_case


def compiled_vs_eager(device: torch.device) -> list[dict]:
    """torch.compile(spcl_loss, backend triton) against eager at N = 4096, float32 and bfloat16."""
    rows = []
    for dt in ("float32", "bfloat16"):
        b = make_batch(2048, 2, dz=128, dh=512, k=64, dtype=torch.float32, device=device)
        z, h = b["z"].to(DTYPES[dt]), b["h"].to(DTYPES[dt])
        w, bias = b["weight"], b["bias"]

        def loss_fn(z, h, w, bias, b=b):
            loss, _ = ops.spcl_loss(
                z, h, b["inst"], b["proto"], head_weight=w, head_bias=bias, fn_mode="mask", backend="triton"
            )
            return loss

        outs = {}
        t0 = time.time()
        for name, f in (("eager", loss_fn), ("compiled", torch.compile(loss_fn))):
            leaves = [t.detach().clone().requires_grad_() for t in (z, h, w, bias)]
            loss = f(*leaves)
            outs[name] = (loss, *torch.autograd.grad(loss, leaves))
        err, finite = _compare(outs["compiled"], outs["eager"])
        tol = 1e-4 if dt == "float32" else 2e-2  # summation order only; a double count is an O(1) error
        rows.append(
            {
                "case": "torch.compile vs eager spcl_loss N=4096",
                "backend": "triton",
                "dtype": dt,
                "rel_err": err,
                "finite": finite,
                "ok": finite and err <= tol,
                "tol": tol,
                "seconds": round(time.time() - t0, 2),
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", choices=sorted(set(ops.BACKENDS) - {"reference"}))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cpu for the cpu backend, else cuda)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list among {','.join(DTYPES)}")
    p.add_argument("--compiled", action="store_true", help="only the torch.compile vs eager check (triton)")
    p.add_argument("--out", default=None, help="append one JSON line per case to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.backend == "cpu" else "cuda"))
    torch.manual_seed(0)
    rows = []
    if args.compiled:
        rows = compiled_vs_eager(device)
    else:
        for name, dt, fn in cases(args.backend, device, [d for d in args.dtypes.split(",") if d]):
            row = {"case": name, "backend": args.backend, "dtype": dt}
            t0 = time.time()
            try:
                got, want, agree = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                err, finite = _compare(got, want)
                ok = finite and err <= TOL[dt] and agree is not False
                row.update(rel_err=err, finite=finite, ok=ok, tol=TOL[dt])
                if agree is not None:
                    row["indices_equal"] = agree
            except Exception as e:  # noqa: BLE001  (recorded: the smoke goes on to the next case)
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
            row["seconds"] = round(time.time() - t0, 3)
            rows.append(row)
    for row in rows:
        status = "ok  " if row["ok"] else "FAIL"
        detail = row.get("error") or f"rel err {row['rel_err']:.2e} (tol {row['tol']:.0e}) finite {row['finite']}"
        print(f"{status} {row['backend']:<7} {row['dtype']:<9} {row['case']:<40} {detail}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    failed = sum(not r["ok"] for r in rows)
    print(f"gpu_smoke: {len(rows) - failed}/{len(rows)} cases ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
