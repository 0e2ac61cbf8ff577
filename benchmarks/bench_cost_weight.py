"""Does weighing saliency by cost help?  lightning_oto prune at equal FLOPs budgets with several ``cost_weight``.

Uses ``bench_quality.py``'s tasks, data, training loop and budget API unchanged (same initial weights, batches,
optimizer and epochs per seed); only ``cost_weight`` (candidates ranked by ``saliency / saving**cost_weight``)
varies.  One JSON line per run: task, seed, budget, cost_weight, test accuracy, FLOPs and params kept, dense
accuracy.

    python benchmarks/bench_cost_weight.py [--tasks resnet vgg mobilenet] [--weights 0 0.25 0.5]
                                           [--budgets 0.3 0.5] [--seeds 2] [--out docs/results/cost_weight.jsonl]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench_quality as bq  # noqa: E402
from lightning_oto import OTO  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["resnet", "vgg", "mobilenet"], choices=list(bq.TASKS))
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("lightning_oto").setLevel(logging.ERROR)
    for name in args.tasks:
        task = bq.TASKS[name]
        data = task.load_data(None)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = task.make_model()
            init = copy.deepcopy(model.state_dict())
            dense, _ = bq.run_dense(model, task, data, seed)
            oto = OTO(copy.deepcopy(model), data[0][:2], mode="prune")
            for keep in args.budgets:
                for w in args.weights:
                    bq.selection = lambda k, w=w: {"budget": {"flops": k}, "cost_weight": w}
                    r = bq.run_oto(oto, init, task, data, seed, keep, dense)
                    row = dict(task=name, seed=seed, keep=keep, cost_weight=w, acc=round(r["acc"], 4),
                               flops=round(r["flops_kept"], 3), params=round(r["params_kept"], 3),
                               dense=round(dense["acc"], 4))
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
