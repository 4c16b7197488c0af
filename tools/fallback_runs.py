"""The fallback models' part of the evaluation protocol, into an evaluation that ran without it.

With ``finetune.fallbacks`` in a spec, ``crossl-stream eval`` trains, in each fold, one
fallback model per sensor (the supervised recipe on the other sensors, every label, the
full-label seeds) and scores it on the fold's test windows without that sensor. This runs
that part alone, fold by fold through the same code (``run_fold`` with no arm), and writes it
into ``EVAL_DIR/results.json`` (an evaluation of the same spec), then renders that
evaluation's report, metrics and plots again:

    python tools/fallback_runs.py configs/train-watch.yaml docs/results/watch --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("eval_dir", type=Path, help="an evaluation of the spec (results.json)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = p.parse_args(argv)

    from crossl_stream.config import TrainConfig, load_config
    from crossl_stream.training.experiments import merged, run_folds, set_device
    from crossl_stream.training.report import write_eval
    from crossl_stream.training.spec import load_data

    found = args.eval_dir / "results.json"
    if not found.is_file():
        p.error(f"{args.eval_dir}: no results.json (run `crossl-stream eval` there first)")
    results = json.loads(found.read_text())
    set_device(args.device)
    cfg = merged(load_config(args.spec, TrainConfig), {"finetune": {"fallbacks": True}})
    if results.get("name") != cfg.data.name:
        p.error(f"{found} evaluates {results.get('name')!r}, the spec {cfg.data.name!r}")
    data = load_data(cfg.data, args.spec.parent, str(args.spec), progress=False)
    if len(data.modalities) < 2:
        p.error(f"{args.spec}: one modality; there is nothing to fall back on")
    ev = cfg.evaluation
    seeds = tuple(ev.seeds[: ev.seeds_at_full])
    # no arm: each fold trains and scores the fallbacks only (validation is skipped here:
    # an empty arm table is refused in a spec)
    only = ev.model_copy(update={"arms": {}, "seeds": seeds, "folds": tuple(results["folds"])})
    start = time.perf_counter()
    out = run_folds(data, cfg.model_copy(update={"evaluation": only}), log=print, jobs=args.jobs)
    results["fallbacks"] = out["fallbacks"]
    results["fallbacks_source"] = (
        f"`tools/fallback_runs.py` ({time.perf_counter() - start:.0f} s with --jobs "
        f"{args.jobs}): the fallback part of each fold, run after this evaluation, which ran "
        "without it"
    )
    metrics = json.loads((args.eval_dir / "metrics.json").read_text())
    report = (args.eval_dir / "report.md").read_text()
    command = next(
        (x.split("`")[1] for x in report.splitlines() if x.startswith("Command: `")), None
    )
    ablation_path = args.eval_dir / "ablation.json"
    ablation = json.loads(ablation_path.read_text()) if ablation_path.is_file() else None
    write_eval(results, args.eval_dir, ablation, metrics.get("machine"), command)
    print(f"wrote the fallback runs into {args.eval_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
