"""Sparse MoE against a dense model with the same active parameters, same wall-clock time.

The dense model is the MoE preset with one expert (top-1) whose intermediate size is
k times the MoE's, so every token passes through the same number of weights. Both train
for --minutes on the same data, with the same schedule and settings; the script prints
and saves their validation and test bits per byte.

    python scripts/compare_dense.py --data pretrain_data --minutes 5 --out runs/moe-vs-dense
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mixtral_mlx.config import load_preset
from mixtral_mlx.info import count_parameters
from mixtral_mlx.pretrain import pretrain, resolve_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="pretrain_data")
    p.add_argument("--preset", default="small")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each model")
    p.add_argument("--iters", type=int, default=None, help="schedule length (default: the preset's)")
    p.add_argument("--out", default="runs/moe-vs-dense")
    args = p.parse_args()

    moe = load_preset(args.preset)
    k = moe.num_experts_per_tok
    variants = {
        "moe": {},
        "dense": {"num_local_experts": 1, "num_experts_per_tok": 1, "intermediate_size": k * moe.intermediate_size},
    }
    results = {}
    for name, model_overrides in variants.items():
        flags = {"preset": args.preset, "data": args.data, "out": str(Path(args.out) / name),
                 "max_time": args.minutes, "iters": args.iters, "model": model_overrides}
        cfg = resolve_config(flags)
        start = time.time()
        final = pretrain(cfg, overwrite=True)
        summary = json.loads((final.parent / "results.json").read_text())
        margs = mixtral_mlx.ModelArgs.from_file(final / "config.json")
        counts = count_parameters(margs)
        steps = json.loads((final / "trainer_state.json").read_text())["step"]
        results[name] = {"total_params": counts.total, "active_params": counts.active, "steps": steps,
                         "minutes": (time.time() - start) / 60, **summary}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}",
              "device": str(mx.default_device()), "mlx": mx.__version__, "blas": mixtral_mlx.blas.status,
              "preset": args.preset, "data": args.data, "minutes_each": args.minutes, "results": results}
    Path(args.out, "compare_dense.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'model':<8}{'params':>12}{'active':>12}{'steps':>8}{'val bpb':>10}{'test bpb':>10}")
    for name, r in results.items():
        test = r.get("test", {}).get("bpb", float("nan"))
        print(f"{name:<8}{r['total_params']:>12,}{r['active_params']:>12,}{r['steps']:>8}"
              f"{r['val']['bpb']:>10.4f}{test:>10.4f}")


if __name__ == "__main__":
    main()
