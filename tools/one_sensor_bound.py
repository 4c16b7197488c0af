"""How much macro-F1 one sensor alone can carry: a ceiling for "keep X% with a sensor missing".

For each sensor of a training spec, a supervised model is trained on that sensor only (no
modality dropout, every label, seed 0) and scored with the spec's own hold-out protocol; the
result is compared with the two-sensor evaluation already in ``--against`` (its ``alone``
scores: the two-sensor model with the other sensor silent). A model that keeps more than
``single-sensor model / two-sensor model`` of its macro-F1 with a sensor missing would have to
beat a model trained for that sensor alone.

    python tools/one_sensor_bound.py configs/train-watch.yaml \
        --against docs/results/watch --out docs/results/watch-one-sensor --jobs 2

"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ARM = "supervised@1.0"


def one_sensor_spec(spec: dict, sensor: str) -> dict:
    """``spec`` cut down to ``sensor`` and to one supervised arm on every label."""
    out = json.loads(json.dumps(spec))
    out["data"]["sensors"] = {sensor: spec["data"]["sensors"][sensor]}
    out["finetune"]["modality_dropout"] = 0.0
    out["finetune"]["fallbacks"] = False  # one sensor: nothing to fall back on
    ev = out["evaluation"]
    # no ablation, and no absolute goal: the spec's is for the model of every sensor
    for key in (
        "ablation",
        "ablation_folds",
        "ablation_curve_steps",
        "select",
        "select_margin",
        "supervised_goal",
    ):
        ev.pop(key, None)
    ev.update(arms={"supervised": [1.0]}, seeds=[0], seeds_at_full=1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("--against", type=Path, required=True, help="the spec's eval folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--reuse", action="store_true", help="keep a sensor's finished evaluation")
    args = p.parse_args(argv)

    against = args.against / "metrics.json"
    if not against.is_file():
        p.error(f"--against {args.against}: no metrics.json (run `crossl-stream eval` there first)")
    spec = yaml.safe_load(args.spec.read_text())
    both = json.loads(against.read_text())
    if both.get("dataset") != spec["data"]["name"]:
        p.error(f"{against} evaluates {both.get('dataset')!r}, the spec {spec['data']['name']!r}")
    if "supervised@1.0" not in both["macro_f1"]:
        p.error(f"{against}: no supervised@1.0 run to compare with (evaluation.arms)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sensor in spec["data"]["sensors"]:
        folder = args.out / sensor
        cut = args.out / f"{args.spec.stem}-{sensor}.yaml"
        cut.write_text(yaml.safe_dump(one_sensor_spec(spec, sensor), sort_keys=False))
        if not (args.reuse and (folder / "metrics.json").exists()):
            cmd = [sys.executable, "-m", "crossl_stream.cli", "eval", str(cut), "--out"]
            cmd += [str(folder), "--quiet", "--device", args.device]
            subprocess.run([*cmd, "--jobs", str(args.jobs)], check=True)
        alone = json.loads((folder / "metrics.json").read_text())["macro_f1"][ARM]
        rows.append((sensor, alone))

    full = both["macro_f1"][ARM]
    shown = [a for a in (ARM, "crossl@1.0") if a in both["alone"]]
    lines = [
        f"# One sensor alone: {spec['data']['name']}, {both['protocol']}",
        "",
        f"Supervised on every label (seed 0) trained on one sensor only, beside the two-sensor "
        f"models of `{args.against}` scored with only that sensor (the other silent). Macro-F1 "
        f"in percent; the two-sensor supervised model scores {full * 100:.1f} with both.",
        "",
        "| sensor | trained on it alone | share of two-sensor supervised | "
        + " | ".join(f"two-sensor {a}, only this sensor" for a in shown)
        + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for sensor, alone in rows:
        cells = [f"{both['alone'][a][sensor] * 100:.1f}" for a in shown]
        lines.append(f"| {sensor} | {alone * 100:.1f} | {alone / full:.0%} | {' | '.join(cells)} |")
    lines.append("")
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
