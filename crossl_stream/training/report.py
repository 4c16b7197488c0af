"""Evaluation results -> results.json, metrics.json, report.md and plots; model cards.

``write_eval`` takes the dict ``experiments.run_folds`` returns for one data set (with the
``config`` and ``total_seconds`` the CLI adds) and, optionally, the one ``run_ablation``
returns, and writes into one folder the raw results, the machine-readable summary, a markdown
report whose sentences are written from the numbers, and its plots under ``img/``.
``write_card`` writes the ``README.md`` of any model folder from its ``model.json`` (and an
evaluation's ``metrics.json`` when there is one).

A run key is ``arm@fraction`` (``crossl@0.1``); ``results["runs"][key][seed][group]`` is one
test score. A subject's (group's) score is its mean over the key's seeds; means and stds are
over subjects. Values are fractions in [0, 1] in the JSON files and percentages in the
markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from crossl_stream.training.metrics import wilcoxon_signed_rank

ARMS = ("crossl", "crossl-all", "probe", "supervised", "supervised-aug", "supervised-plain")
TITLES = {
    "crossl": "CroSSL",
    "crossl-all": "CroSSL (all)",
    "probe": "CroSSL probe",
    "supervised": "supervised",
    "supervised-aug": "supervised + augmentation",
    "supervised-plain": "supervised (plain)",
}
# the supervised baselines CroSSL's targets are judged against (the stronger at each fraction)
BASELINES = ("supervised", "supervised-aug")
# the paired comparisons: (arm, baseline) at each label fraction both ran
PAIRS = (
    ("crossl", "supervised"),
    ("crossl-all", "supervised"),
    ("crossl", "supervised-aug"),
    ("crossl-all", "supervised-aug"),
)
STOPS = ("patience", "max_epochs", "steps")
# the issue's targets
GOAL_GAIN = 0.05  # CroSSL over supervised at each of GAIN_FRACTIONS
GAIN_FRACTIONS = (0.1, 0.01)
GOAL_KEPT = 0.9  # share of the all-modality macro-F1 kept with one modality only
DIGITS = 6


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def run_key(arm: str, fraction: float) -> str:
    """("crossl", 0.1) -> ``crossl@0.1``."""
    return f"{arm}@{float(fraction)}"


def split_key(key: str) -> tuple[str, float | None]:
    """``crossl@0.1`` -> ("crossl", 0.1); a key without ``@`` has no fraction."""
    arm, _, fraction = key.partition("@")
    return arm, (float(fraction) if fraction else None)


def _rank(key: str) -> tuple:
    arm, fraction = split_key(key)
    return (-1.0 if fraction is None else fraction, ARMS.index(arm) if arm in ARMS else 99, key)


def run_keys(keys: Any) -> list[str]:
    """Run keys by label fraction, then arm."""
    return sorted(keys, key=_rank)


def fractions(keys: Any) -> list[float]:
    """The label fractions of ``keys``, ascending."""
    return sorted({f for k in keys if (f := split_key(k)[1]) is not None})


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), DIGITS)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _labels(fraction: float) -> str:
    """0.1 -> "10%", 0.025 -> "2.5%"."""
    return f"{100 * fraction:g}%"


def _points(d: float | None) -> str:
    return "—" if d is None else f"{100 * d:+.1f}"


def _p(p: float | None) -> str:
    return "—" if p is None else (f"{p:.2f}" if p >= 0.01 else f"{p:.3f}")


def _minus(a: str, b: str, sign: str = "−") -> str:
    """The title of ``a`` minus ``b`` (arms): "CroSSL − (supervised + augmentation)"."""
    title = TITLES.get(b, b)
    return f"{TITLES.get(a, a)} {sign} " + (f"({title})" if " + " in title else title)


def _seed(s: str) -> int | str:
    return int(s) if s.lstrip("-").isdigit() else s


# -- the numbers ----------------------------------------------------------------------------


def groups_of(results: dict[str, Any]) -> list[str]:
    """The held-out groups: ``folds`` in order, then any other group a run has."""
    out = [str(g) for g in results.get("folds") or []]
    for per_seed in (results.get("runs") or {}).values():
        for per_group in per_seed.values():
            out += sorted(g for g in per_group if g not in out)
    return out


def per_subject(
    runs: dict[str, Any],
    key: str,
    groups: list[str],
    seeds: list[str] | None = None,
    field: str = "macro_f1",
    modality: str | None = None,
) -> dict[str, float]:
    """Each group's ``field`` (or macro-F1 with ``modality`` alone) of run ``key``: the mean
    over ``seeds`` (default: every seed the key ran); groups no seed has are left out."""
    per_seed = runs.get(key) or {}
    seeds = list(per_seed) if seeds is None else [str(s) for s in seeds]
    out = {}
    for g in groups:
        values = []
        for s in seeds:
            entry = (per_seed.get(s) or {}).get(g)
            if entry is None:
                continue
            v = (entry.get("alone") or {}).get(modality) if modality else entry.get(field)
            if v is not None:
                values.append(float(v))
        if values:
            out[g] = float(np.mean(values))
    return out


def run_summary(
    runs: dict[str, Any], key: str, groups: list[str], modalities: list[str]
) -> dict[str, Any]:
    """One run key: the per-subject scores, their mean and std over subjects, the spread over
    seeds (std of the per-seed means over subjects; None with one seed), the accuracy, each
    modality alone with the fraction it keeps, and how the runs stopped."""
    per_seed = runs[key]
    subjects = per_subject(runs, key, groups)
    f1 = np.array(list(subjects.values()))
    seed_means = [
        float(np.mean([e["macro_f1"] for e in per_seed[s].values()]))
        for s in per_seed
        if per_seed[s]
    ]
    acc = per_subject(runs, key, groups, field="accuracy")
    mean = float(f1.mean()) if f1.size else None
    alone = {}
    for m in modalities:
        a = per_subject(runs, key, groups, modality=m)
        if a:
            alone[m] = float(np.mean(list(a.values())))
    kept = {m: v / mean for m, v in alone.items()} if mean else {}
    stops = dict.fromkeys(STOPS, 0)
    best = []
    for per_group in per_seed.values():
        for e in per_group.values():
            stopped = e.get("stopped") or "steps"
            stops[stopped] = stops.get(stopped, 0) + 1
            if e.get("best_epoch") is not None:
                best.append(int(e["best_epoch"]))
    return {
        "seeds": [_seed(s) for s in per_seed],
        "per_subject": subjects,
        "macro_f1": mean,
        "macro_f1_std": float(f1.std()) if f1.size else None,
        "seed_spread": float(np.std(seed_means)) if len(seed_means) > 1 else None,
        "accuracy": float(np.mean(list(acc.values()))) if acc else None,
        "alone": alone,
        "kept": kept,
        "worst": min(kept, key=kept.get) if kept else None,
        "stops": stops,
        "runs": sum(stops.values()),
        "best_epoch": float(np.median(best)) if best else None,
    }


def paired(runs: dict[str, Any], a: str, b: str, groups: list[str]) -> dict[str, Any] | None:
    """``a`` minus ``b`` subject by subject, each the mean over the seeds both ran: the mean
    difference, wins (a higher) and losses out of n subjects, and the exact two-sided
    Wilcoxon signed-rank p-value; None when the two share no seed and subject."""
    if a not in runs or b not in runs:
        return None
    seeds = [s for s in runs[a] if s in runs[b]]
    sa = per_subject(runs, a, groups, seeds)
    sb = per_subject(runs, b, groups, seeds)
    both = [g for g in sa if g in sb]
    if not both:
        return None
    d = np.round(np.array([sa[g] - sb[g] for g in both]), 12)
    return {
        "mean": float(d.mean()),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "n": len(both),
        "p": wilcoxon_signed_rank(d),
        "seeds": [_seed(s) for s in seeds],
        "per_subject": {g: float(x) for g, x in zip(both, d, strict=True)},
    }


def min_wins(n: int, alpha: float = 0.05) -> int | None:
    """The fewest wins out of ``n`` paired subjects that can give a two-sided Wilcoxon
    p < ``alpha`` (the losses being the smallest differences); None: no number can."""
    for k in range(n // 2 + 1, n + 1):  # more wins than losses
        d = np.arange(1.0, n + 1)
        d[: n - k] *= -1
        if wilcoxon_signed_rank(d) < alpha:
            return k
    return None


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values ``ps`` (in their order): the i-th smallest
    times (m - i + 1), made non-decreasing in that order and capped at 1; rejecting where the
    adjusted p < alpha controls the family-wise error rate at alpha."""
    out = [1.0] * len(ps)
    running = 0.0
    for i, j in enumerate(np.argsort(ps, kind="stable")):
        running = max(running, min(1.0, (len(ps) - i) * float(ps[j])))
        out[j] = running
    return out


def stronger_baseline(summaries: dict[str, dict], fraction: float) -> str | None:
    """The run key of the supervised baseline with the higher mean macro-F1 at ``fraction``
    (``supervised`` on a tie), of those that ran; None when neither did."""
    ran = [
        run_key(b, fraction)
        for b in BASELINES
        if (summaries.get(run_key(b, fraction)) or {}).get("macro_f1") is not None
    ]
    return max(ran, key=lambda k: summaries[k]["macro_f1"]) if ran else None


def _target(name: str, value: float, goal: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "value": _round(value),
        "goal": _round(goal),
        "met": bool(value >= goal - 1e-12),
        "margin": _round(value - goal),
        **{k: (_round(v) if isinstance(v, float) else v) for k, v in extra.items()},
    }


def targets(
    summaries: dict[str, dict], pairs: dict[str, dict], goal_full: float | None = None
) -> list[dict[str, Any]]:
    """The issue's targets that this evaluation measured: supervised with every label at
    ``goal_full`` (the spec's ``evaluation.supervised_goal``; no target when None); CroSSL
    (and CroSSL trained on all windows) over the stronger supervised baseline (``baseline``:
    ``supervised`` or ``supervised-aug``, whichever has the higher mean) at 10% and 1% of
    labels, with the paired mean and Wilcoxon p against it and ``p_holm``, Holm's adjustment
    over every such paired test; the share of macro-F1 each arm keeps with one modality only,
    at every label."""
    out = []
    full = summaries.get(run_key("supervised", 1.0))
    if goal_full is not None and full and full["macro_f1"] is not None:
        out.append(_target(f"supervised@1.0 >= {goal_full:g}", full["macro_f1"], goal_full))
    gains = []
    for f in GAIN_FRACTIONS:
        base = stronger_baseline(summaries, f)
        if base is None:
            continue
        for arm in ("crossl", "crossl-all"):
            key = run_key(arm, f)
            if summaries.get(key, {}).get("macro_f1") is None:
                continue
            d = pairs.get(f"{key} - {base}") or {}
            gains.append(
                _target(
                    f"{key} >= {base} + {GOAL_GAIN:g}",
                    summaries[key]["macro_f1"],
                    summaries[base]["macro_f1"] + GOAL_GAIN,
                    baseline=base,
                    diff=d.get("mean"),
                    p=d.get("p"),
                    p_holm=None,
                )
            )
    tested = [t for t in gains if t["p"] is not None]
    for t, p in zip(tested, holm([t["p"] for t in tested]), strict=True):
        t["p_holm"] = _round(p)
    out += gains
    for key, s in summaries.items():
        if split_key(key)[1] == 1.0 and s["worst"]:
            out.append(
                _target(
                    f"{key} kept >= {GOAL_KEPT:g} with one modality only",
                    s["kept"][s["worst"]],
                    GOAL_KEPT,
                    modality=s["worst"],
                )
            )
    return out


def ablation_validation(ablation: dict[str, Any]) -> dict[str, list[str]] | None:
    """Each ablation fold's validation groups (the ids its rows were scored on); None when
    no row records them (runs from before ``validation`` was recorded)."""
    rows = list(ablation.get("rows") or [])
    if ablation.get("curve"):
        rows.append(ablation["curve"])
    by_fold: dict[str, set[str]] = {}
    for row in rows:
        if row.get("validation") is not None:
            by_fold.setdefault(str(row.get("group")), set()).update(map(str, row["validation"]))
    return {g: sorted(v) for g, v in by_fold.items()} if by_fold else None


def _evaluation(results: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluation`` block of the spec the results were made with."""
    return (results.get("config") or {}).get("evaluation") or {}


def selection_applied(ablation: dict[str, Any] | None, results: dict[str, Any]) -> bool:
    """Whether the folds ran an ablation variant other than the spec as written: selection
    (``evaluation.select``) was on and chose something other than ``base``."""
    select = _evaluation(results).get("select")
    chosen = (ablation or {}).get("chosen")
    return bool(select) and chosen is not None and chosen != "base"


def _ablation_summary(ablation: dict[str, Any] | None, applied: bool) -> dict[str, Any] | None:
    if not ablation:
        return None
    by_fold = ablation_validation(ablation)
    return {
        "folds": ablation.get("folds"),
        "variants": ablation.get("variants"),
        "scores": {
            name: {k: _round(v) for k, v in s.items()}
            for name, s in (ablation.get("scores") or {}).items()
        },
        "chosen": ablation.get("chosen"),
        "applied": applied,
        "validation": sorted({v for vs in by_fold.values() for v in vs}) if by_fold else None,
        "validation_by_fold": by_fold,
    }


def _summary(metrics: dict[str, Any]) -> list[str]:
    """Short lines for a terminal: each label fraction, the targets, any capped run."""
    f1 = metrics["macro_f1"]
    lines = []
    for f in fractions(f1):
        cells = [
            f"{TITLES.get(arm, arm)} {_pct(f1[run_key(arm, f)])}"
            for arm in ARMS
            if run_key(arm, f) in f1
        ]
        diffs = []
        for arm, base in PAIRS:
            d = metrics["paired"].get(f"{run_key(arm, f)} - {run_key(base, f)}")
            if d:
                diffs.append(f"{_minus(arm, base, '-')} {_points(d['mean'])}, p={_p(d['p'])}")
        line = f"labels {_labels(f)}: " + ", ".join(cells)
        lines.append(line + (f" ({'; '.join(diffs)})" if diffs else ""))
    for t in metrics["targets"]:
        lines.append(
            f"target {t['name']}: {'met' if t['met'] else 'missed'} ({_points(t['margin'])} points)"
        )
    capped = {k: s["max_epochs"] for k, s in metrics["stops"].items() if s.get("max_epochs")}
    if capped:
        lines.append(
            "runs stopped at max_epochs (the cap bound): "
            + ", ".join(f"{k} {n}" for k, n in capped.items())
        )
    return lines


def fallback_summary(
    results: dict[str, Any], summaries: dict[str, dict], groups: list[str]
) -> dict[str, Any] | None:
    """The fallback models (``finetune.fallbacks``): per modality they do without, the
    per-subject and mean macro-F1 of the windows without it, and the share of each full-label
    arm's macro-F1 that serving those windows with the fallback keeps (None: no fallbacks)."""
    table = results.get("fallbacks") or {}
    if not table:
        return None
    per: dict[str, dict[str, list[float]]] = {}
    for by_group in table.values():
        for g, entry in by_group.items():
            for m, v in (entry.get("without") or {}).items():
                per.setdefault(m, {}).setdefault(str(g), []).append(float(v))
    per_subject = {m: {g: float(np.mean(v[g])) for g in groups if g in v} for m, v in per.items()}
    without = {m: float(np.mean(list(v.values()))) for m, v in per_subject.items() if v}
    kept = {}
    for key, s in summaries.items():  # the recipes a model folder can hold (not the probe)
        if split_key(key)[1] == 1.0 and split_key(key)[0] != "probe" and s["macro_f1"]:
            arm = s["per_subject"]
            kept[key] = {m: v / s["macro_f1"] for m, v in without.items()}
            kept[key + " per subject"] = {
                m: sum(1 for g, x in per_subject[m].items() if g in arm and x >= GOAL_KEPT * arm[g])
                for m in without
            }
    return {
        "without": without,
        "per_subject": per_subject,
        "kept": kept,
    }


def _pairs(runs: dict[str, Any], keys: list[str], groups: list[str]) -> dict[str, dict]:
    """Every comparison of ``PAIRS`` at each label fraction, over ``groups``."""
    pairs = {}
    for f in fractions(keys):
        for arm, base in PAIRS:
            a, b = run_key(arm, f), run_key(base, f)
            d = paired(runs, a, b, groups)
            if d:
                pairs[f"{a} - {b}"] = d
    return pairs


def _pairs_json(pairs: dict[str, dict]) -> dict[str, dict]:
    return {
        name: {
            **{k: (_round(v) if k in ("mean", "p") else v) for k, v in d.items()},
            "per_subject": {g: _round(x) for g, x in d["per_subject"].items()},
        }
        for name, d in pairs.items()
    }


def eval_metrics(
    results: dict[str, Any],
    ablation: dict[str, Any] | None = None,
    machine: str | None = None,
) -> dict[str, Any]:
    """metrics.json: the summary other tools read; values are fractions in [0, 1]."""
    runs = results.get("runs") or {}
    groups = groups_of(results)
    keys = run_keys(runs)
    modalities = list(results.get("modalities") or [])
    summaries = {k: run_summary(runs, k, groups, modalities) for k in keys}
    pairs = _pairs(runs, keys, groups)
    applied = selection_applied(ablation, results)
    ablation_summary = _ablation_summary(ablation, applied)
    # the choice was made on the validation groups' labels, and they are test groups too:
    # the comparisons again without them (None: no choice applied, or none recorded)
    held = (ablation_summary or {}).get("validation")
    tuned = [str(g) for g in _evaluation(results).get("tuned_on") or []]
    left_out = sorted(set(held or [] if applied else []) | set(tuned))
    without = None
    if left_out:
        without = _pairs(runs, keys, [g for g in groups if g not in left_out])

    def each(field: str) -> dict[str, float | None]:
        return {k: _round(s[field]) for k, s in summaries.items()}

    metrics = {
        "dataset": results.get("name", "unnamed data set"),
        "protocol": f"leave-one-{results.get('by', 'subject')}-out",
        "folds": groups,
        "seeds": list(results.get("seeds") or []),
        "windows": results.get("windows"),
        "macro_f1": each("macro_f1"),
        "macro_f1_std": each("macro_f1_std"),
        "seed_spread": each("seed_spread"),
        "accuracy": each("accuracy"),
        "per_subject": {
            k: {g: _round(v) for g, v in s["per_subject"].items()} for k, s in summaries.items()
        },
        "alone": {
            k: {m: _round(v) for m, v in s["alone"].items()}
            for k, s in summaries.items()
            if s["alone"]
        },
        "kept": {
            k: {m: _round(v) for m, v in s["kept"].items()}
            for k, s in summaries.items()
            if s["kept"]
        },
        "paired": _pairs_json(pairs),
        "targets": targets(summaries, pairs, _evaluation(results).get("supervised_goal")),
        "stops": {k: s["stops"] for k, s in summaries.items()},
        "best_epoch": each("best_epoch"),
        "ablation": ablation_summary,
        "paired_without_validation": None if without is None else _pairs_json(without),
        "tuned_on": tuned,
        "left_out_of_paired": left_out or None,
        "machine": machine,
        "seconds": _round(results.get("total_seconds", results.get("seconds"))),
    }
    fb = fallback_summary(results, summaries, groups)
    metrics["fallbacks"] = None if fb is None else _fallbacks_json(fb)
    if fb:
        for key, shares in fb["kept"].items():
            if key.endswith(" per subject") or not shares:
                continue
            worst = min(shares, key=shares.get)
            metrics["targets"].append(
                _target(
                    f"{key} with fallbacks kept >= {GOAL_KEPT:g} with one modality missing",
                    shares[worst],
                    GOAL_KEPT,
                    without=worst,
                )
            )
    metrics["summary"] = _summary(metrics)
    return metrics


def _fallbacks_json(fb: dict[str, Any]) -> dict[str, Any]:
    return {
        "without": {m: _round(v) for m, v in fb["without"].items()},
        "per_subject": {
            m: {g: _round(x) for g, x in v.items()} for m, v in fb["per_subject"].items()
        },
        "kept": {
            k: {m: (x if k.endswith(" per subject") else _round(x)) for m, x in v.items()}
            for k, v in fb["kept"].items()
        },
    }


def write_eval(
    results: dict[str, Any],
    out: Path,
    ablation: dict[str, Any] | None = None,
    machine: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``out/results.json`` (and ``ablation.json``), ``metrics.json``, ``report.md``
    and ``img/*.png``; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", results)
    if ablation:
        save_json(out / "ablation.json", ablation)
    metrics = eval_metrics(results, ablation, machine)
    save_json(out / "metrics.json", metrics)
    plots = _plots(metrics, results, ablation, out / "img")
    (out / "report.md").write_text(render_eval(metrics, results, ablation, plots, machine, command))
    return metrics


# -- the report -----------------------------------------------------------------------------


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _overrides(o: Any, prefix: str = "") -> str:
    """``{pretrain: {expander: []}}`` -> "pretrain.expander: []"."""
    if isinstance(o, dict):
        if not o:
            return "(the spec as written)" if not prefix else f"{prefix}: {{}}"
        return "; ".join(_overrides(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in o.items())
    return f"{prefix}: {json.dumps(o)}"


def _header(
    metrics: dict[str, Any],
    results: dict[str, Any],
    ablation: dict[str, Any] | None,
    machine: str | None,
    command: str | None,
) -> list[str]:
    by = results.get("by", "subject")
    groups = metrics["folds"]
    seeds = metrics["seeds"]
    lines = [f"# Evaluation: {metrics['dataset']}", ""]
    facts = [
        f"Leave-one-{by}-out over {len(groups)} {by}s ({', '.join(groups)})",
        f"seeds {', '.join(map(str, seeds)) or '—'}",
    ]
    windows = results.get("windows")
    if windows is not None:
        text = f"{windows} windows"
        if results.get("labelled_windows") is not None:
            text += f" ({results['labelled_windows']} labelled)"
        if results.get("window_s"):
            text += f" of {results['window_s']:g} s"
        facts.append(text)
    mods = results.get("modalities") or []
    facts.append(
        f"modalities {', '.join(mods) or '—'}; {len(results.get('classes') or [])} classes"
    )
    lines.append("; ".join(facts) + ".")
    at_full: list[str] = []
    for k, per_seed in (results.get("runs") or {}).items():
        if split_key(k)[1] == 1.0:
            at_full += [s for s in per_seed if s not in at_full]
    if at_full and len(at_full) < len(seeds):
        lines[-1] += (
            f" Runs with every label (100%) use seed{'s' if len(at_full) > 1 else ''} "
            f"{', '.join(at_full)} only."
        )
    timing = []
    total = metrics.get("seconds")
    if total:
        timing.append(f"took {_seconds(total)} in all")
    if results.get("fold_seconds"):
        timing.append(
            f"{_seconds(results['fold_seconds'])} of fold work over {results.get('jobs', 1)} "
            f"job{'s' if results.get('jobs', 1) != 1 else ''}"
        )
    if ablation and ablation.get("seconds"):
        timing.append(f"{_seconds(ablation['seconds'])} of ablation")
    made = f"Run on {machine}" if machine else "Run"
    if timing:
        made += ": " + ", ".join(timing)
    lines += ["", made + "."]
    lines += ["", f"Command: `{command or 'crossl-stream eval'}`", ""]
    lines.append(
        "Raw results: `results.json`"
        + (" and `ablation.json`" if ablation else "")
        + "; summary: `metrics.json`. Numbers are macro-F1 in percent; differences are in "
        "points."
    )
    return lines


def _validation_group(by: str, results: dict[str, Any]) -> str:
    """Where early stopping's validation windows come from, as ``validation_split`` draws
    them: another training group or, when a fold trains on one group (two labelled groups
    in all), part of that group's own windows."""
    if results.get("groups") == 2:
        return (
            f"windows of the one training {by} held out of its training windows (whole "
            "recordings of it or, with one recording, its last 15%)"
        )
    return f"a validation {by} drawn from the training {by}s"


def _protocol(results: dict[str, Any]) -> list[str]:
    by = results.get("by", "subject")
    cfg = results.get("config") or {}
    pre = cfg.get("pretrain") or {}
    ft = cfg.get("finetune") or {}
    mask = cfg.get("masking") or {}
    arms = [a for a in ARMS if a in (results.get("arms") or {})] or [
        a for a in ARMS if any(split_key(k)[0] == a for k in results.get("runs") or {})
    ]
    what = {
        "supervised": "the same architecture trained from scratch, with modality dropout "
        "(and augmentation when configured)",
        "supervised-aug": "the same architecture trained from scratch with the same modality "
        "dropout and, always, the signal augmentations pretraining uses (`pretrain.augment`: "
        "scale, jitter, rotation, time warp)",
        "supervised-plain": "from scratch with neither modality dropout nor augmentation",
        "crossl": f"pretrained on the training {by}s' windows only, then fine-tuned",
        "crossl-all": f"pretrained on every window, the held-out {by}'s too but without its "
        f"labels, then fine-tuned on the training {by}s' labels",
        "probe": "a linear head on the frozen CroSSL encoder",
    }
    lines = ["", "## Protocol", ""]
    lines.append(
        f"Each fold holds out one {by}; every arm learns from the other {by}s' labels only, "
        "on a class-stratified fraction of the labelled windows (the same windows for every "
        f"arm), stops early on {_validation_group(by, results)}, and is scored on the "
        f"held-out {by}'s labelled windows in which every modality is present, with every "
        "modality and with each alone."
    )
    lines.append("")
    for arm in arms:
        lines.append(f"- **{TITLES[arm]}** (`{arm}`): {what[arm]}.")
    bits = []
    if pre.get("steps") is not None:
        bits.append(f"pretraining {pre['steps']} steps")
    if "expander" in pre:
        bits.append(f"expander {pre['expander'] or 'none'}")
    if mask:
        bits.append(f"`{mask.get('strategy')}` latent masking keep {mask.get('keep')}")
    if pre.get("augment"):
        shown = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in pre["augment"].items()
            if v is not None  # unset (e.g. rotation's vectors: found from the sensors)
        )
        bits.append(f"augmentation ({shown})")
    if ft.get("modality_dropout") is not None:
        bits.append(f"modality dropout {ft['modality_dropout']:g}")
    if "augment" in ft:
        bits.append(f"classifier augmentation {'on' if ft['augment'] else 'off'}")
    if ft.get("max_epochs") is not None:
        bits.append(
            f"at most {ft['max_epochs']} epochs"
            + (f", patience {ft['patience']}" if ft.get("patience") is not None else "")
        )
    if ft.get("validate_alone"):
        bits.append(
            "early stopping on the mean validation macro-F1 with every modality and each alone"
        )
    if ft.get("fallbacks"):
        bits.append("fallback models for one modality missing")
    precisions = {k: c.get("precision") for k, c in (("pretraining", pre), ("classifiers", ft))}
    bf16 = [k for k, v in precisions.items() if v == "bf16"]
    if bf16:
        bits.append(f"{' and '.join(bf16)} in bf16 autocast")
    if bits:
        lines += ["", "Settings: " + "; ".join(bits) + "."]
    return lines


def _main_table(metrics: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    f1, std = metrics["macro_f1"], metrics["macro_f1_std"]
    arms = [a for a in ARMS if any(split_key(k)[0] == a for k in f1)]
    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    head = [TITLES[a] for a in arms] + [
        f"{_minus(a, b)} (paired: mean, wins, Wilcoxon p)" for a, b in pairs
    ]
    lines = [
        "",
        "## Macro-F1 by label fraction",
        "",
        f"Mean ± std over the held-out {metrics['protocol'].split('-')[2]}s of each subject's "
        "mean over seeds.",
        "",
        "| labels | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for f in fractions(f1):
        cells = []
        for a in arms:
            k = run_key(a, f)
            cells.append(f"{_pct(f1[k])} ± {_pct(std[k])}" if k in f1 else "—")
        for a, b in pairs:
            d = metrics["paired"].get(f"{run_key(a, f)} - {run_key(b, f)}")
            cells.append(
                f"{_points(d['mean'])}, {d['wins']}/{d['n']}, p={_p(d['p'])}" if d else "—"
            )
        lines.append(f"| {_labels(f)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | seeds | macro-F1 | accuracy | spread over seeds |",
        "|---|---|---|---|---|",
    ]
    for k in f1:
        seeds = list(runs.get(k, {}))
        spread = metrics["seed_spread"].get(k)
        lines.append(
            f"| {k} | {', '.join(seeds)} | {_pct(f1[k])} ± {_pct(std[k])} | "
            f"{_pct(metrics['accuracy'].get(k))} | "
            f"{'— (one seed)' if spread is None else '± ' + _pct(spread)} |"
        )
    return lines


def _targets_section(metrics: dict[str, Any]) -> list[str]:
    if not metrics["targets"]:  # no goal applies (e.g. supervised alone, no absolute goal)
        return []
    lines = [
        "",
        "## Targets",
        "",
        "| target | value | goal | result | margin (points) | notes | Holm-adjusted p |",
        "|---|---|---|---|---|---|---|",
    ]
    f1 = metrics["macro_f1"]
    for t in metrics["targets"]:
        notes = ""
        if "p" in t:
            base = t.get("baseline")
            notes = f"paired mean {_points(t.get('diff'))}, Wilcoxon p={_p(t.get('p'))}"
            if base:  # the name says which; say why when there was a choice
                arm, f = split_key(base)
                others = [run_key(b, f) for b in BASELINES if run_key(b, f) in f1]
                others = [o for o in others if o != base]
                if others:
                    vs = ", ".join(f"{_pct(f1[o])} for {TITLES[split_key(o)[0]]}" for o in others)
                    notes = (
                        f"against {TITLES.get(arm, arm)}, the stronger baseline "
                        f"({_pct(f1.get(base))} vs {vs}); {notes}"
                    )
        elif "without" in t:
            notes = f"worst: without {t['without']}"
        elif "modality" in t:
            notes = f"worst: {t['modality']} only"
        lines.append(
            f"| {t['name']} | {_pct(t['value'])} | {_pct(t['goal'])} | "
            f"{'met' if t['met'] else '**missed**'} | {_points(t['margin'])} | {notes} | "
            f"{_p(t['p_holm']) if t.get('p_holm') is not None else '—'} |"
        )
    names = {t["name"] for t in metrics["targets"]}
    absent = [
        run_key(a, f)
        for f in GAIN_FRACTIONS
        for a in ("crossl", "crossl-all")
        if not any(n.startswith(run_key(a, f) + " ") for n in names)
    ]
    if absent:
        lines += ["", f"Not measured (no such run): {', '.join(absent)}."]
    if any("supervised-aug@" in t.get("baseline", "") for t in metrics["targets"]) or any(
        k.startswith("supervised-aug@") for k in metrics["macro_f1"]
    ):
        lines += [
            "",
            "CroSSL's targets are judged against the stronger supervised baseline at each "
            "label fraction: whichever of supervised and supervised + augmentation has the "
            "higher mean macro-F1 (of those that ran); the paired mean and Wilcoxon p are "
            "against that baseline.",
        ]
    if any("modality" in t for t in metrics["targets"]):
        lines += [
            "",
            f"The modality target ({GOAL_KEPT:.0%} of macro-F1 kept) is shown for every arm "
            "trained with every label; which arm is shipped is decided elsewhere.",
        ]
    return lines


def _missing_section(metrics: dict[str, Any], modalities: list[str]) -> list[str]:
    alone, kept, f1 = metrics["alone"], metrics["kept"], metrics["macro_f1"]
    keys = [k for k in f1 if k in alone]
    if len(modalities) < 2 or not keys:
        return []
    lines = [
        "",
        "## One modality missing",
        "",
        "Each model scored on the same windows with one modality only (the others missing); "
        "kept = that macro-F1 / the macro-F1 with every modality (from the means over "
        "subjects).",
        "",
        "| run | all modalities | "
        + " | ".join(f"{m} only (kept)" for m in modalities)
        + " | worst kept |",
        "|---" * (len(modalities) + 3) + "|",
    ]
    for k in keys:
        cells = [
            f"{_pct(alone[k].get(m))} ({kept[k][m]:.0%})" if m in kept.get(k, {}) else "—"
            for m in modalities
        ]
        worst = min(kept[k].values()) if kept.get(k) else None
        lines.append(
            f"| {k} | {_pct(f1[k])} | "
            + " | ".join(cells)
            + f" | {'—' if worst is None else f'{worst:.0%}'} |"
        )
    if len(modalities) > 2:
        lines += [
            "",
            f"With {len(modalities)} modalities, one alone is harder than one missing: these "
            "are lower bounds.",
        ]
    return lines


def _fallbacks_section(metrics: dict[str, Any]) -> list[str]:
    fb = metrics.get("fallbacks")
    if not fb or not fb.get("without"):
        return []
    missing = list(fb["without"])
    n = len(metrics["folds"])
    lines = [
        "",
        "## One modality missing, with fallback models",
        "",
        "With `finetune.fallbacks`, a window that misses one modality is served by a "
        "supervised model trained without it (every label, the fold's training groups, "
        "the seeds of the full-label runs), not by the full model with that modality "
        "masked. Its macro-F1 on the test windows without that modality, and the share "
        "of each full-label run's macro-F1 it keeps (in brackets: the groups where it "
        f"keeps at least {GOAL_KEPT:.0%} of that run's macro-F1 on the same group, of {n}).",
        "",
        "| run | all modalities | "
        + " | ".join(f"without {m}: fallback (kept)" for m in missing)
        + " |",
        "|---" * (len(missing) + 2) + "|",
    ]
    for key, shares in fb["kept"].items():
        if key.endswith(" per subject"):
            continue
        counts = fb["kept"].get(key + " per subject", {})
        cells = [
            f"{_pct(fb['without'][m])} ({shares[m]:.0%}; {counts.get(m, '—')}/{n})" for m in missing
        ]
        full = _pct(metrics["macro_f1"].get(key))
        lines.append(f"| {key} | {full} | " + " | ".join(cells) + " |")
    return lines


def _per_subject_section(metrics: dict[str, Any], by: str) -> list[str]:
    ps, lines = metrics["per_subject"], []
    for f in fractions(metrics["macro_f1"]):
        pairs = [
            (a, b, metrics["paired"][f"{run_key(a, f)} - {run_key(b, f)}"])
            for a, b in PAIRS
            if f"{run_key(a, f)} - {run_key(b, f)}" in metrics["paired"]
        ]
        if not pairs:
            continue
        shown = [run_key(b, f) for b in BASELINES if any(b == pb for _, pb, _ in pairs)]
        shown += list(dict.fromkeys(run_key(a, f) for a, _, _ in pairs))
        lines += [
            "",
            f"### Per {by}, {_labels(f)} of labels",
            "",
            f"| {by} | "
            + " | ".join(TITLES[split_key(k)[0]] for k in shown)
            + " | "
            + " | ".join(_minus(a, b) for a, b, _ in pairs)
            + " |",
            "|---" * (1 + len(shown) + len(pairs)) + "|",
        ]
        for g in metrics["folds"]:
            cells = [_pct(ps.get(k, {}).get(g)) for k in shown]
            cells += [_points(d["per_subject"].get(g)) for _, _, d in pairs]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        cells = [_pct(metrics["macro_f1"][k]) for k in shown]
        cells += [f"{_points(d['mean'])} ({d['wins']}/{d['n']} wins)" for _, _, d in pairs]
        lines.append("| mean | " + " | ".join(cells) + " |")
    if lines:
        lines = [
            "",
            f"## Per {by}",
            "",
            f"Each {by}'s macro-F1, the mean over the run's seeds; the differences are over "
            "the seeds both runs share.",
        ] + lines
    return lines


def _ablation_section(
    ablation: dict[str, Any], results: dict[str, Any], metrics: dict[str, Any]
) -> list[str]:
    by = results.get("by", "subject")
    scores = ablation.get("scores") or {}
    chosen = ablation.get("chosen")
    select = _evaluation(results).get("select")
    folds = ", ".join(map(str, ablation.get("folds") or []))
    lines = [
        "",
        "## Ablation (validation only)",
        "",
        f"Each variant is pretrained on the training {by}s of fold(s) {folds or '—'} less one "
        f"validation {by} drawn from them, and scored on that validation {by} only: a linear "
        f"probe on every label and fine-tuning on 1% of them; score = the mean of the two. "
        f"A validation {by} is never the test {by} of the same fold, but it is a test {by} "
        "of the main folds (below).",
        "",
        "| variant | overrides | probe F1 | fine-tune@1% F1 | score |",
        "|---|---|---|---|---|",
    ]
    for name, overrides in (ablation.get("variants") or {}).items():
        s = scores.get(name, {})
        mark = f"**{name}** (chosen)" if name == chosen else name
        lines.append(
            f"| {mark} | `{_overrides(overrides)}` | {_pct(s.get('probe_f1'))} | "
            f"{_pct(s.get('finetune_f1'))} | {_pct(s.get('score'))} |"
        )
    if chosen:
        if select and chosen != "base":
            ran = f"the folds ran `{chosen}`"
        elif select:
            ran = "the folds ran the spec as written"
        else:
            ran = "selection was off (`evaluation.select`), so the folds ran the spec as written"
        best = ablation.get("best", chosen)
        if best != chosen:
            lines += [
                "",
                f"Best on validation: `{best}`, but it gained {_pct(ablation.get('gain'))} "
                f"of the {_pct(ablation.get('select_margin'))} points a variant must gain "
                f"over the spec (`evaluation.select_margin`); {ran}.",
            ]
        else:
            lines += ["", f"Best on validation: `{chosen}`; {ran}."]
    lines += _ablation_disclosure(ablation, metrics, by)
    curve = ablation.get("curve") or {}
    points = curve.get("curve") or []
    if points:
        lines += [
            "",
            f"### Pretraining curve: `{curve.get('variant', 'base')}`, validation {by} of "
            f"fold {curve.get('group')}",
            "",
            "Linear-probe macro-F1 on the validation group as pretraining runs; flat at the end "
            "means more steps would not help.",
            "",
            "| step | probe F1 (validation) |",
            "|---|---|",
        ]
        lines += [f"| {p['step']} | {_pct(p['probe_f1'])} |" for p in points]
    return lines


def _ablation_disclosure(ablation: dict[str, Any], metrics: dict[str, Any], by: str) -> list[str]:
    """Which validation groups the ablation used, that they are test groups of the main folds,
    and what that means: nothing when the folds ran the spec as written; else the choice was
    made on their labels, and the paired comparisons are shown again without them."""
    summary = metrics.get("ablation") or {}
    by_fold = summary.get("validation_by_fold")
    if by_fold is None:
        by_fold = ablation_validation(ablation)
    applied = summary.get("applied", False)
    chosen = ablation.get("chosen")
    lines = [""]
    if by_fold:
        held = sorted({v for vs in by_fold.values() for v in vs})
        used = "; ".join(f"{', '.join(vs)} (fold {g})" for g, vs in by_fold.items())
        tested = [v for v in held if v in metrics["folds"]]
        line = f"**Validation {by}s used:** {used}. "
        if len(tested) == len(held):
            line += (
                f"{'They are' if len(held) > 1 else 'It is'} also "
                f"{f'test {by}s' if len(held) > 1 else f'a test {by}'} in the main folds "
                f"(every {by} is one in leave-one-{by}-out)"
            )
        elif tested:
            line += (
                f"{', '.join(tested)} {'are' if len(tested) > 1 else 'is'} also test {by}s in "
                f"the main folds; {', '.join(v for v in held if v not in tested)} not (not among "
                "the folds evaluated)"
            )
        else:
            line += f"None of them is a test {by} of the folds evaluated here"
    else:
        held = None
        line = (
            f"**Validation {by}s used:** not recorded (the ablation predates that record); "
            f"each was drawn from the training {by}s of fold(s) "
            f"{', '.join(map(str, ablation.get('folds') or [])) or '—'}, so it is a test "
            f"{by} of its own fold in leave-one-{by}-out"
        )
    tuned = metrics.get("tuned_on") or []
    if not applied:
        if chosen == "base":
            line += "; the folds ran the spec as written: selection changed nothing"
        else:
            line += (
                "; the folds ran the spec as written (selection off): the choice changed nothing"
            )
        if tuned:
            line += (
                ", but the spec's settings were themselves chosen by hand on the labels of "
                f"{by}s {', '.join(map(str, tuned))} (`evaluation.tuned_on`): see below."
            )
        else:
            line += ", so no test fold influenced the settings."
        return lines + [line]
    line += (
        f". The choice of `{chosen}` was made on those {by}s' labels, and only CroSSL's "
        "settings were tuned on them (by CroSSL's validation scores; the supervised baselines "
        f"had no say), so the comparisons could favour CroSSL on those {by}s."
    )
    lines.append(line)
    if held is None and not tuned:
        return lines + [
            "",
            f"Without a record of the validation {by}s, the comparisons cannot be repeated "
            "without them.",
        ]
    return lines


def _tuned_section(metrics: dict[str, Any], by: str) -> list[str]:
    """The paired comparisons again without the groups whose labels chose settings (the
    ablation's validation groups when its choice was applied; ``evaluation.tuned_on``)."""
    without = metrics.get("paired_without_validation")
    left_out = metrics.get("left_out_of_paired")
    if not without or not left_out:
        return []
    tuned = metrics.get("tuned_on") or []
    ways = []
    if (metrics.get("ablation") or {}).get("applied"):
        ways.append("the ablation's choice, on its validation groups")
    if tuned:
        ways.append(f"by hand on {', '.join(map(str, tuned))}: `evaluation.tuned_on`")
    how = "; ".join(ways)
    lines = [
        "",
        f"## Without the {by}s the settings were chosen on",
        "",
        f"{by.capitalize()}s {', '.join(left_out)} are test {by}s of the main folds, and "
        f"their labels chose settings ({how}), so the comparisons could favour CroSSL on "
        "them. The paired comparisons again without them:",
    ]
    rows = [
        (f, a, b, d, without.get(name))
        for f in fractions(metrics["macro_f1"])
        for a, b in PAIRS
        if (d := metrics["paired"].get(name := f"{run_key(a, f)} - {run_key(b, f)}"))
    ]
    if not rows:
        return []
    lines += [
        "",
        f"| labels | comparison | every {by} (mean, wins, Wilcoxon p) | without "
        f"{', '.join(left_out)} (mean, wins, Wilcoxon p) |",
        "|---|---|---|---|",
    ]
    for f, a, b, d, w in rows:
        cells = [
            f"{_points(x['mean'])}, {x['wins']}/{x['n']}, p={_p(x['p'])}" if x else "—"
            for x in (d, w)
        ]
        lines.append(f"| {_labels(f)} | {_minus(a, b)} | {cells[0]} | {cells[1]} |")
    return lines


def _stops_section(metrics: dict[str, Any]) -> list[str]:
    stops = metrics["stops"]
    if not stops:
        return []
    lines = [
        "",
        "## How the runs stopped",
        "",
        "Every classifier trains in epochs and keeps its best epoch on the validation group: "
        "`patience` means the validation macro-F1 stopped improving; `max_epochs` that the "
        "epoch cap ended the run first (a defect: the cap bound, not the validation score); "
        "`steps` that there was no validation group and a fixed step budget ran.",
        "",
        "| run | runs | patience | max_epochs | steps | best epoch (median) |",
        "|---|---|---|---|---|---|",
    ]
    capped = []
    for k, s in stops.items():
        n = sum(s.values())
        cap = s.get("max_epochs", 0)
        if cap:
            capped.append(f"{k} ({cap} of {n})")
        best = metrics.get("best_epoch", {}).get(k)
        lines.append(
            f"| {k} | {n} | {s.get('patience', 0)} | "
            f"{f'**{cap}** (capped)' if cap else 0} | {s.get('steps', 0)} | "
            f"{'—' if best is None else f'{best:g}'} |"
        )
    lines.append("")
    if capped:
        lines.append(
            f"- **Stopped at max_epochs:** {', '.join(capped)}. Those runs had not met the "
            "early-stopping rule; raise `finetune.max_epochs` and the numbers may change."
        )
    else:
        lines.append("- No run stopped at max_epochs: none was cut short by the epoch cap.")
    steps = [k for k, s in stops.items() if s.get("steps")]
    if steps:
        lines.append(f"- Fixed step budget, no validation group: {', '.join(steps)}.")
    return lines


def _reading(metrics: dict[str, Any], by: str, results: dict[str, Any]) -> list[str]:
    n = len(metrics["folds"])
    k = min_wins(n)
    wilcoxon = (
        f"with {n} {by}s it cannot reach p < 0.05 with fewer than {k} wins of {n}, however "
        "large the differences (and needs more wins when the losses are not the smallest)"
        if k is not None
        else f"with {n} {by}s it cannot reach p < 0.05 at all"
    )
    family = [t for t in metrics["targets"] if t.get("p_holm") is not None]
    holm_line = (
        f" The targets table's Holm-adjusted p covers the {len(family)} paired test"
        f"{'s' if len(family) != 1 else ''} of CroSSL's targets (CroSSL and CroSSL (all) "
        "against the stronger supervised baseline at each label fraction measured): Holm's "
        "step-down adjustment controls the family-wise error over those tests."
        if family
        else ""
    )
    ablation = metrics.get("ablation")
    validation = (
        f"- **Validation.** Early stopping uses {_validation_group(by, results)} in each "
        f"fold; no test {by}'s labels are used to train or stop a model (CroSSL (all) sees "
        f"the test {by}'s windows, unlabelled, in pretraining)."
    )
    if ablation:
        validation += (
            f" The ablation's validation {by}s are never the test {by} of the same fold, but "
            f"they are test {by}s of the main folds: the Ablation section says whether their "
            "labels influenced the settings the folds ran."
        )
    return [
        "",
        "## How to read these numbers",
        "",
        f"- **Per-{by} scores.** A {by}'s score is its macro-F1 averaged over the seeds of "
        f"that run; means ± std are over the {n} held-out {by}s, so the std is the spread "
        f"between {by}s, not between runs. The spread over seeds (std of the per-seed "
        "means) is in the per-run table.",
        f"- **Paired comparisons.** CroSSL − a supervised baseline compares the two on the "
        f"same held-out {by}, over the seeds both ran; wins count the {by}s where CroSSL scored "
        f"higher. The p-value is the exact two-sided Wilcoxon signed-rank test over {by}s: "
        f"{wilcoxon}. A target met on the means with a large p is not yet evidence." + holm_line,
        validation,
        "- **Label fractions count windows.** Overlapping windows share most of their "
        "samples, so a small fraction of windows can cover most recordings; every arm gets "
        "the same labelled windows.",
        "- **Confusion matrices** pool every fold and seed; the tables' macro-F1 is the mean "
        f"of per-{by} scores, so the two need not agree.",
    ]


def render_eval(
    metrics: dict[str, Any],
    results: dict[str, Any],
    ablation: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    machine: str | None = None,
    command: str | None = None,
) -> str:
    """report.md as text."""
    by = results.get("by", "subject")
    machine = machine or metrics.get("machine")
    lines = _header(metrics, results, ablation, machine, command)
    lines += _protocol(results)
    lines += _main_table(metrics, results.get("runs") or {})
    lines += _targets_section(metrics)
    lines += _missing_section(metrics, list(results.get("modalities") or []))
    lines += _fallbacks_section(metrics)
    lines += _per_subject_section(metrics, by)
    if ablation:
        lines += _ablation_section(ablation, results, metrics)
    lines += _tuned_section(metrics, by)
    lines += _stops_section(metrics)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](img/{p})" for p in plots]
    elif plots is not None:
        lines += [
            "",
            "(No plots: matplotlib is not installed; `pip install crossl-stream[report]`.)",
        ]
    lines += _reading(metrics, by, results)
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------


def _plots(
    metrics: dict[str, Any],
    results: dict[str, Any],
    ablation: dict[str, Any] | None,
    img: Path,
) -> list[str]:
    """The report's plots under ``img``; their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    img.mkdir(parents=True, exist_ok=True)
    made = [
        _learning_curves(plt, results, img),
        _label_fractions(plt, metrics, results, img),
        _missing_modality(plt, metrics, list(results.get("modalities") or []), img),
    ]
    confusion = results.get("confusion") or {}
    classes = list(results.get("classes") or [])
    for key in _confusion_keys(metrics, confusion):
        cm = np.asarray(confusion[key], dtype=float)
        made.append(_confusion(plt, cm, classes or [str(i) for i in range(len(cm))], key, img))
    if ablation:
        made.append(_ablation_curve(plt, ablation, results.get("by", "subject"), img))
    return [m for m in made if m]


def _confusion_keys(metrics: dict[str, Any], confusion: dict[str, Any]) -> list[str]:
    """supervised@1.0 and the best CroSSL run at the largest fraction CroSSL ran."""
    f1 = metrics["macro_f1"]
    keys = [run_key("supervised", 1.0)] if run_key("supervised", 1.0) in confusion else []
    crossl = [k for k in f1 if split_key(k)[0] in ("crossl", "crossl-all") and k in confusion]
    if crossl:
        top = max(split_key(k)[1] or 0.0 for k in crossl)
        at_top = [k for k in crossl if split_key(k)[1] == top]
        keys.append(max(at_top, key=lambda k: f1[k] or 0.0))
    return keys


def _smooth(values: list[float], n: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.convolve(v, np.ones(n) / n, mode="valid") if len(v) > n else v


def _learning_curves(plt: Any, results: dict[str, Any], img: Path) -> str | None:
    curves = results.get("curves") or {}
    pre = curves.get("pretrain") or []
    histories = {k: v for k, v in curves.items() if k != "pretrain" and v}
    if not pre and not histories:
        return None
    fold = results.get("curves_fold")
    by = results.get("by", "subject")
    first_seed = str((results.get("seeds") or [0])[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if pre:
        for part in ("loss", "invariance", "variance", "covariance"):
            if part in pre[0]:
                axes[0].plot(_smooth([h[part] for h in pre]), label=part)
        axes[0].set_yscale("log")
        axes[0].legend()
    axes[0].set_title(f"VICReg pretraining, {by} {fold} held out")
    axes[0].set_xlabel("step (moving mean of 10)")
    epochs = {k: [h for h in v if "val_f1" in h] for k, v in _by_key(histories).items()}
    epochs = {k: v for k, v in epochs.items() if v}
    runs = results.get("runs") or {}
    if epochs:
        for key, hist in epochs.items():
            style = "-" if key.startswith("supervised") else "--"
            (line,) = axes[1].plot(
                [h.get("epoch", i + 1) for i, h in enumerate(hist)],
                [100 * h["val_f1"] for h in hist],
                style,
                label=key,
            )
            best = ((runs.get(key) or {}).get(first_seed) or {}).get(str(fold), {})
            best = best.get("best_epoch")
            for h in hist:
                if best is not None and h.get("epoch") == best:
                    axes[1].plot([best], [100 * h["val_f1"]], "o", color=line.get_color())
        axes[1].xaxis.get_major_locator().set_params(integer=True)
        axes[1].set_xlabel("epoch (dot: the kept epoch)")
        axes[1].set_ylabel("validation macro-F1 %")
        axes[1].set_title(f"early stopping, {by} {fold} held out")
    else:
        for key, hist in histories.items():
            if "loss" in hist[0]:
                axes[1].plot(_smooth([h["loss"] for h in hist]), label=key)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("step (moving mean of 10)")
        axes[1].set_title("classifier training loss")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "learning_curves.png", dpi=110)
    plt.close(fig)
    return "learning_curves.png"


def _by_key(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` ordered by run key."""
    return {k: d[k] for k in run_keys(d)}


def _label_fractions(
    plt: Any, metrics: dict[str, Any], results: dict[str, Any], img: Path
) -> str | None:
    f1, std = metrics["macro_f1"], metrics["macro_f1_std"]
    fracs = fractions(f1)
    if not fracs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        keys = [(f, run_key(arm, f)) for f in fracs if run_key(arm, f) in f1]
        if keys:
            ax.errorbar(
                [f for f, _ in keys],
                [100 * (f1[k] or 0.0) for _, k in keys],
                yerr=[100 * (std[k] or 0.0) for _, k in keys],
                marker="o",
                capsize=3,
                label=TITLES[arm],
            )
    if len(fracs) > 1 and fracs[-1] / fracs[0] >= 10:
        ax.set_xscale("log")
    ax.set_xticks(fracs, [_labels(f) for f in fracs])
    ax.set_xlabel("fraction of labelled training windows")
    by = results.get("by", "subject")
    ax.set_ylabel(f"macro-F1 % (mean ± std over {len(metrics['folds'])} {by}s)")
    ax.set_title(f"{metrics['dataset']}: leave-one-{by}-out")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "label_fractions.png", dpi=110)
    plt.close(fig)
    return "label_fractions.png"


def _missing_modality(
    plt: Any, metrics: dict[str, Any], modalities: list[str], img: Path
) -> str | None:
    """Runs with every label (else the largest fraction that has any): every modality, and
    each alone."""
    alone, f1 = metrics["alone"], metrics["macro_f1"]
    keys = [k for k in f1 if k in alone]
    if len(modalities) < 2 or not keys:
        return None
    top = max(split_key(k)[1] or 0.0 for k in keys)
    keys = [k for k in keys if split_key(k)[1] == top]
    fig, ax = plt.subplots(figsize=(6, 4))
    sets = ["all"] + [f"{m} only" for m in modalities]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [f1[k]] + [alone[k].get(m) for m in modalities]
        ax.bar(
            np.arange(len(sets)) + i * width,
            [100 * (v or 0.0) for v in vals],
            width,
            label=k,
        )
    ax.set_xticks(np.arange(len(sets)) + width * (len(keys) - 1) / 2, sets)
    ax.set_ylabel("macro-F1 % (mean over held-out groups)")
    ax.set_title(f"modalities given at inference ({_labels(top)} labels)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "missing_modality.png", dpi=110)
    plt.close(fig)
    return "missing_modality.png"


def _confusion(plt: Any, cm: np.ndarray, classes: list[str], name: str, img: Path) -> str:
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.88))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    if len(classes) <= 15:
        for (i, j), v in np.ndenumerate(rates):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}, every fold and seed pooled (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    file = f"confusion_{name.replace('@', '_').replace('+', '_')}.png"
    fig.savefig(img / file, dpi=110)
    plt.close(fig)
    return file


def _ablation_curve(plt: Any, ablation: dict[str, Any], by: str, img: Path) -> str | None:
    curve = ablation.get("curve") or {}
    points = curve.get("curve") or []
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [p["step"] for p in points],
        [100 * p["probe_f1"] for p in points],
        "o-",
        label="probe macro-F1 (validation)",
    )
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(f"linear-probe macro-F1 % on the validation {by}")
    ax.set_title(f"pretraining curve: {curve.get('variant', 'base')}, fold {curve.get('group')}")
    loss = curve.get("loss") or []
    if loss:
        twin = ax.twinx()
        smooth = _smooth(loss)
        twin.plot(np.arange(len(smooth)) + (len(loss) - len(smooth)) + 1, smooth, color="grey")
        twin.set_ylabel("VICReg loss (grey, moving mean of 10)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "ablation_curve.png", dpi=110)
    plt.close(fig)
    return "ablation_curve.png"


# -- model cards --------------------------------------------------------------------------

SEGLEARN = (
    "D. M. Burns, N. Leung, M. Hardisty, C. M. Whyne, P. Henry, S. McLachlin, *Shoulder "
    "physiotherapy exercise recognition: machine learning the inertial signals from a "
    "smartwatch*, Physiological Measurement 39(7), 2018. Distributed in the seglearn "
    "package under the BSD 3-Clause licence (Copyright (c) 2018, David M. Burns). "
    "Smartwatch accelerometer and gyroscope at 50 Hz, 10 subjects, 140 recordings."
)
BASICMOTIONS = (
    "BasicMotions, from the UEA multivariate time series classification archive: "
    "accelerometer and gyroscope at 10 Hz, 4 activities, a fixed 40/40 train/test split. "
    "Distributed in the aeon package under the BSD 3-Clause licence."
)
EMG_GESTURES = (
    "Surface EMG of hand gestures, distributed in the geomstats package (MIT licence, "
    "Copyright (c) 2018 Nina Miolane) as `geomstats/datasets/data/emg/emg.csv` "
    "(`geomstats.datasets.utils.load_emg`): 8 electrodes with a time stamp and the hand sign "
    "(rock, paper, scissors, ok, rest) of each sample, in four recordings (`mg_s1`, `mg_s2`, "
    "`rr_s1`, `rr_s2`). The package names no other source or licence for the recordings."
)


def attribution(name: str | None) -> str | None:
    """The attribution and licence of one of the project's data sets, by its spec name."""
    if not name:
        return None
    flat = name.lower().replace("-", "").replace("_", "")
    if flat.startswith("watch") or flat.startswith("seglearn"):
        return SEGLEARN
    if flat.startswith("basicmotions"):
        return BASICMOTIONS
    if flat.startswith("emg") and "gesture" in flat:
        return EMG_GESTURES
    return None


def _info_views(meta: dict[str, Any]) -> dict[str, Any]:
    """The card's facts from model.json, from either the current ``info`` or the one of
    model folders written before (``dataset``, ``train_subjects``, ``config.window_s``).

    ``stage`` is ``pretrained``, ``finetuned`` (CroSSL) or ``supervised`` (from scratch);
    ``arm`` is the evaluation arm of the model's recipe (``crossl`` or ``supervised``)."""
    info = meta.get("info") or {}
    cfg = info.get("config") or {}
    data = info.get("data") or {}
    window = data.get("window") or {}
    holdout = info.get("holdout")
    if holdout is None and info.get("holdout_subject") is not None:
        holdout = [info["holdout_subject"]]
    stage = info.get("stage") or ("finetuned" if meta.get("classes") else "pretrained")
    selection = info.get("selection") if isinstance(info.get("selection"), dict) else None
    if stage == "supervised":
        arm = "supervised"
    elif selection and selection.get("recipe") in ("crossl", "supervised"):
        arm = selection["recipe"]
    else:
        arm = "crossl"
    length_s = window.get("length_s") or cfg.get("window_s")
    first = (meta.get("modalities") or [{}])[0]
    if not length_s and first.get("samples") and first.get("rate_hz"):
        length_s = first["samples"] / first["rate_hz"]
    return {
        "info": info,
        "cfg": cfg,
        "data": data,
        "name": data.get("name") or info.get("dataset") or cfg.get("dataset"),
        "sensors": data.get("sensors") or {},
        "length_s": length_s,
        "hop_s": window.get("hop_s") or cfg.get("hop_s"),
        "subjects": data.get("subjects") or info.get("train_subjects"),
        "windows": data.get("windows") or info.get("train_windows"),
        "holdout": holdout or [],
        "seed": info.get("seed", cfg.get("seed")),
        "stage": stage,
        "selection": selection,
        "arm": arm,
    }


def _label_rules(labels: dict[str, Any] | None) -> str | None:
    if not labels:
        return None
    if labels.get("markers"):
        m = labels["markers"]
        where = f"marker stream `{m['stream']}`" if m.get("stream") else "the marker streams"
        prefix = f", markers starting with `{m['prefix']}`" if m.get("prefix") else ""
        hold = m.get("hold", "next")
        held = (
            "each label held until the next marker"
            if hold == "next"
            else f"each label held for {float(hold):g} s"
        )
        return f"from {where}{prefix}, {held}"
    if labels.get("intervals"):
        return f"from interval files `{labels['intervals'].get('path')}`"
    return None


RECIPES = {
    "crossl": "CroSSL (VICReg pretraining, then fine-tuning)",
    "supervised": "supervised (the same architecture trained from scratch on the labels)",
}


def _dropout_of(ft: dict[str, Any]) -> float | None:
    """``finetune.modality_dropout``; None for a model trained before the setting existed
    (its fine-tuning used the pretraining's latent masker instead)."""
    p = ft.get("modality_dropout")
    return None if p is None else float(p)


def _dropout_sentence(p: float) -> str:
    return f"each modality of a training window hidden with probability {p:g}, never all of them"


def _augment_text(augment: dict[str, Any] | None) -> str | None:
    """The active signal augmentations of ``pretrain.augment``; None when all are off."""
    a = augment or {}
    parts = []
    if a.get("scale"):
        parts.append(f"gain std {a['scale']:g}")
    if a.get("jitter"):
        parts.append(f"noise std {a['jitter']:g} × each channel's std")
    if a.get("rotate_deg"):
        parts.append(f"3-D rotation up to {a['rotate_deg']:g}°")
    if a.get("time_warp"):
        parts.append(f"time warp up to {_labels(float(a['time_warp']))} of the window")
    return ", ".join(parts) if parts else None


def render_card(
    meta: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    fallbacks: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The model card (``README.md`` of a model folder) from its model.json and, when given,
    the metrics.json of an evaluation of the same recipe and the model.json of each
    fallback model (by the modality it does without)."""
    v = _info_views(meta)
    info, cfg = v["info"], v["cfg"]
    arch = meta.get("model") or {}
    classes = list(meta.get("classes") or [])
    name = v["name"] or "unnamed data"
    modalities = meta.get("modalities") or []
    pretrained_only = not classes
    supervised_only = v["stage"] in ("supervised", "fallback")
    dropout = _dropout_of(cfg.get("finetune") or {})

    if pretrained_only:
        title = f"# CroSSL encoder pretrained on {name} (no class head)"
    elif supervised_only:
        title = f"# Supervised classifier (CroSSL architecture): {name}, {len(classes)} classes"
    else:
        title = f"# CroSSL classifier: {name}, {len(classes)} classes"
    if supervised_only:
        intro = (
            "The CroSSL architecture (one encoder per modality and a latent aggregator across "
            "modalities) trained from scratch on labelled windows, with a class head: no "
            "self-supervised pretraining. "
            + (
                f"Modality dropout ({_dropout_sentence(dropout)}) trains it to work with a "
                "sensor missing."
                if dropout
                else "Its training had no modality dropout: nothing in it taught the model "
                "to work with a sensor missing."
            )
        )
        if v["selection"]:
            intro += " It was kept over the pretrained CroSSL recipe on validation (below)."
    else:
        intro = (
            "CroSSL (cross-modal self-supervised learning): one encoder per modality and a "
            "latent aggregator across modalities, pretrained with VICReg on unlabelled windows "
            "while parts of the latent representation (whole modalities, or time steps) are "
            "masked, which trains it to do without a missing sensor. "
        )
        if pretrained_only:
            intro += "This folder holds the pretrained encoder only."
        elif dropout:
            intro += (
                "This folder holds the encoder fine-tuned with a class head, with modality "
                f"dropout ({_dropout_sentence(dropout)}) so that it keeps working with a "
                "sensor missing."
            )
        else:
            intro += "This folder holds the encoder fine-tuned with a class head."
    lines = [
        title,
        "",
        intro,
        "",
        f"- Architecture: `{arch.get('aggregator', '?')}` aggregator, latent size "
        f"{arch.get('code_size', '?')}, embedding {arch.get('embed_dim', '?')}"
        + (f", kernels {arch['kernels']}" if arch.get("kernels") else "")
        + (f", dropout {arch['dropout']:g}" if arch.get("dropout") is not None else "")
        + ".",
        "",
        "## Inputs",
        "",
        "| modality | stream | channels | rate | samples per window |",
        "|---|---|---|---|---|",
    ]
    for m in modalities:
        sensor = v["sensors"].get(m.get("name"), {})
        stream = f"`{sensor['stream']}`" if sensor.get("stream") else "—"
        if sensor.get("type"):
            stream += f" (type `{sensor['type']}`)"
        rate = m.get("rate_hz")
        lines.append(
            f"| `{m.get('name')}` | {stream} | {m.get('channels')} | "
            f"{'—' if rate is None else f'{rate:g} Hz'} | {m.get('samples')} |"
        )
    window = []
    if v["length_s"]:
        window.append(f"windows of {v['length_s']:g} s")
    if v["hop_s"]:
        window.append(f"one every {v['hop_s']:g} s")
    lines += [
        "",
        (", ".join(window).capitalize() + "; " if window else "")
        + "raw units: normalisation is inside the model. Other rates are resampled onto the "
        "rates above by the streaming pipeline.",
        "",
        "## Classes",
        "",
    ]
    if pretrained_only:
        lines.append(
            "None: pretrained only; fine-tune it with `crossl-stream finetune SPEC --from DIR` "
            "(DIR: this folder)."
        )
    else:
        lines.append(", ".join(f"`{c}`" for c in classes) + ".")
        rules = _label_rules(v["data"].get("labels"))
        if rules:
            lines.append(f"Labels came {rules}.")

    lines += ["", "## Training", ""] + _training_lines(info, cfg, v["stage"])
    if fallbacks and not pretrained_only:
        lines += ["", "## A sensor missing", "", *_fallback_lines(fallbacks)]
    if v["selection"] and not pretrained_only:
        lines += ["", *_selection_lines(v["selection"], metrics)]
    lines += ["", "## Data", ""] + _data_lines(v, name)
    text = attribution(name)
    if text:
        lines += ["", "### Attribution and licence", "", text]

    if metrics and metrics.get("macro_f1"):
        lines += ["", *_metrics_lines(metrics, name, v["arm"], bool(fallbacks))]

    lines += [
        "",
        "## Run it",
        "",
        "```sh",
        "crossl-stream replay RECORDING.xdf --model DIR   # DIR: this folder",
        "```",
        "",
        "The recording needs a stream for each modality above"
        + (
            "; a pretrained-only model has no classes to predict, so fine-tune it first."
            if pretrained_only
            else "."
        ),
        "",
        "## Files",
        "",
        "- `model.safetensors`: weights and normalisation statistics; `model.json`: "
        "architecture, modalities, classes and how it was trained (the source of this card).",
        "- `stream.onnx` and `model.onnx` (when exported): a live hop (every encoder step "
        "on a window's new samples, and the head) and the whole model, as graphs for "
        "onnxruntime. Each is stamped with the SHA-256 of the weights it was exported from; "
        "`crossl-stream export DIR` rewrites them.",
    ]
    return "\n".join(lines) + "\n"


def _pretrain_line(info: dict[str, Any], cfg: dict[str, Any]) -> str:
    pre = cfg.get("pretrain") or {}
    mask = cfg.get("masking") or {}
    loss = cfg.get("loss") or {}
    parts = []
    if pre.get("steps") is not None:
        parts.append(f"{pre['steps']} steps")
    if pre.get("batch_size") is not None:
        parts.append(f"batch {pre['batch_size']}")
    if pre.get("lr") is not None:
        parts.append(f"lr {pre['lr']:g}")
    if loss:
        parts.append("VICReg weights " + " / ".join(f"{k} {w:g}" for k, w in loss.items()))
    line = "- Self-supervised pretraining (VICReg)"
    if parts:
        line += ": " + ", ".join(parts)
    if mask:
        line += f"; `{mask.get('strategy')}` latent masking, keep {mask.get('keep')}"
    if "expander" in pre:
        widths = list(pre["expander"] or [])
        line += (
            f"; expander of widths {', '.join(map(str, widths))} (dropped after pretraining)"
            if widths
            else "; no expander (the loss acts on the embedding)"
        )
    if "augment" in pre:
        augment = _augment_text(pre["augment"])
        line += f"; augmentations: {augment}" if augment else "; no signal augmentation"
    if pre.get("precision") == "bf16":
        line += "; in bfloat16 autocast"
    seconds = info.get("pretrain_seconds")
    if seconds is not None:
        line += f"; {seconds:g} s"
    return line + "."


def _training_lines(info: dict[str, Any], cfg: dict[str, Any], stage: str) -> list[str]:
    """The settings and stops of each training stage: pretraining (not for ``supervised``),
    then fine-tuning (``finetuned``) or supervised training from scratch (``supervised``)."""
    pre = cfg.get("pretrain") or {}
    ft = cfg.get("finetune") or {}
    out = [] if stage == "supervised" else [_pretrain_line(info, cfg)]
    if stage in ("finetuned", "supervised"):
        fraction = info.get("labels_fraction")
        dropout = _dropout_of(ft)
        stopped = info.get("stopped")
        if stage == "supervised":
            what = "Training"
            line = "- Supervised training of every weight from scratch with a class head"
        else:
            what = "Fine-tuning"
            line = "- Fine-tuning of every weight with a class head"
        if fraction is not None:
            line += f" on {_labels(float(fraction))} of the labelled training windows"
        ft_parts = []
        if ft.get("batch_size") is not None:
            ft_parts.append(f"batch {ft['batch_size']}")
        if ft.get("lr") is not None:
            ft_parts.append(f"lr {ft['lr']:g}")
        if dropout is None:  # trained before modality dropout: the pretraining masker
            if cfg.get("masking") and stage != "supervised":
                line += ", with the same masking"
        else:
            line += (
                f", with modality dropout {dropout:g} ({_dropout_sentence(dropout)})"
                if dropout
                else ", without modality dropout"
            )
            augment = _augment_text(pre.get("augment")) if ft.get("augment") else None
            if augment:
                line += f" and signal augmentations ({augment})"
            if stopped != "steps":
                if ft.get("patience") is not None:
                    ft_parts.append(f"early stopping with patience {ft['patience']} epochs")
                if ft.get("max_epochs") is not None:
                    ft_parts.append(f"at most {ft['max_epochs']} epochs")
        if ft.get("precision") == "bf16":
            ft_parts.append("in bfloat16 autocast")
        if ft_parts:
            line += f" ({', '.join(ft_parts)})"
        seconds = info.get("finetune_seconds")
        if seconds is not None:
            line += f"; {seconds:g} s"
        out.append(line + ".")
        best, epochs = info.get("best_epoch"), info.get("epochs")
        if stopped == "patience":
            out.append(
                f"- {what} stopped on patience after {epochs} epochs: the validation "
                f"macro-F1 had not improved for {ft.get('patience', 'the configured')} epochs; "
                f"the weights are those of epoch {best}."
            )
        elif stopped == "max_epochs":
            out.append(
                f"- {what} stopped at the epoch cap ({ft.get('max_epochs', epochs)} "
                f"epochs), not on the validation score: the cap bound, and more epochs might "
                f"have helped; the weights are those of epoch {best}."
            )
        elif stopped == "steps":
            out.append(
                f"- {what} ran a fixed step budget: there was no validation group to stop on."
            )
        elif "train_seconds" in info:
            out.append(f"- Trained in {info['train_seconds']:g} s in all.")
    seed = info.get("seed", cfg.get("seed"))
    if seed is not None or info.get("code_version"):
        bits = []
        if seed is not None:
            bits.append(f"seed {seed}")
        if info.get("code_version"):
            bits.append(f"code {info['code_version']}")
        out.append(f"- {', '.join(bits).capitalize()}.")
    return out


LEVEL = 0.005  # macro-F1 means closer than half a point are called level


def _selection_lines(selection: dict[str, Any], metrics: dict[str, Any] | None) -> list[str]:
    """The "Why this recipe" section: the validation scores ``recipe: best`` chose on and,
    when an evaluation's metrics.json is given, what its test folds say about the choice."""
    kept = selection.get("recipe") if selection.get("recipe") in RECIPES else "crossl"
    other = "supervised" if kept == "crossl" else "crossl"
    scores = selection.get("validation_macro_f1") or {}
    c, s = scores.get("crossl"), scores.get("supervised")
    lines = [
        "## Why this recipe",
        "",
        "`recipe: best` trained both recipes on the same labelled windows and kept the one "
        f"with the better validation macro-F1 (CroSSL on a tie): this folder holds "
        f"**{RECIPES[kept]}**.",
        "",
        f"- Validation macro-F1 (%): CroSSL {_pct(c)}, supervised {_pct(s)}; kept: {TITLES[kept]}.",
    ]
    if selection.get("score"):
        lines.append(f"- The validation score is {selection['score']} (as early stopping uses).")
    if c is not None and s is not None:
        gap = abs(round(float(c), 3) - round(float(s), 3))  # as the scores are shown
        if kept == "supervised":
            lines.append(
                f"- Pretraining did not win: training from scratch scored {100 * gap:.1f} "
                "points higher on validation, so the pretrained CroSSL model was not kept."
            )
        elif c == s:
            lines.append(
                "- Pretraining did not win outright: the two tied on validation, and ties "
                "go to CroSSL."
            )
        else:
            lines.append(f"- Pretraining won on validation by {100 * gap:.1f} points.")
    rule = selection.get("validation")
    lines.append(
        "- Both were scored on the same validation group, drawn from the training data; no "
        "test fold of the evaluation took part in the choice."
        + (f" model.json records it as {rule}." if rule else "")
    )
    f1 = (metrics or {}).get("macro_f1") or {}
    full = {a: f1.get(run_key(a, 1.0)) for a in ("crossl", "supervised")}
    paired = (metrics or {}).get("paired") or {}
    diffs = []
    for f in (0.01, 0.1):
        d = paired.get(f"{run_key('crossl', f)} - {run_key('supervised', f)}")
        if d and d.get("mean") is not None:
            diffs.append(
                f"{_points(d['mean'])} points at {_labels(f)} of labels "
                f"(CroSSL higher for {d.get('wins')} of {d.get('n')} subjects, "
                f"p={_p(d.get('p'))})"
            )
    if None not in full.values() or diffs:
        protocol = (metrics or {}).get("protocol", "held-out evaluation")
        evidence = f"- Supporting evidence from the evaluation ({protocol}, test folds):"
        if None not in full.values():
            evidence += (
                f" mean macro-F1 with 100% of labels CroSSL {_pct(full['crossl'])}, "
                f"supervised {_pct(full['supervised'])}"
            )
            gap = full[kept] - full[other]
            if abs(gap) < LEVEL:
                evidence += ", level (within half a point): the evaluation does not tell them apart"
            elif gap > 0:
                evidence += ", which agrees with the choice"
            else:
                evidence += f", which favours {TITLES[other]}: validation and evaluation disagree"
            evidence += ";" if diffs else "."
        if diffs:
            evidence += " CroSSL − supervised, paired by subject: " + "; ".join(diffs) + "."
        lines.append(evidence)
    elif not metrics:
        lines.append("- No evaluation metrics.json came with this folder to back the choice.")
    return lines


def _data_lines(v: dict[str, Any], name: str) -> list[str]:
    data = v["data"]
    out = []
    subjects = v["subjects"]
    line = f"- Data set: {name}"
    if subjects:
        line += f"; trained on {len(subjects)} subjects ({', '.join(map(str, subjects))})"
    if data.get("sessions") is not None:
        line += f", {data['sessions']} sessions in the spec"
    out.append(line + ".")
    if v["windows"] is not None:
        line = f"- {v['windows']} training windows"
        if data.get("labelled_windows") is not None:
            line += f", {data['labelled_windows']} of them labelled"
        out.append(line + ".")
    if v["holdout"]:
        held = ", ".join(map(str, v["holdout"]))
        if v["info"].get("pretrain_on") == "all" and v["stage"] != "supervised":
            out.append(
                f"- Held out: {held}; their labels were never used (their windows were, "
                "unlabelled, in pretraining)."
            )
        else:
            out.append(f"- Held out (never trained on): {held}.")
    pretrained = v["info"].get("pretrained")
    if isinstance(pretrained, dict) and pretrained.get("name"):
        if pretrained.get("name") != name or pretrained.get("windows") != v["windows"]:
            extra = f", {pretrained['windows']} windows" if pretrained.get("windows") else ""
            out.append(f"- The encoder was pretrained on {pretrained['name']}{extra}.")
    elif isinstance(pretrained, str):
        out.append(f"- The encoder was pretrained in `{pretrained}`.")
    return out


def _metrics_lines(
    metrics: dict[str, Any], name: str, arm: str = "crossl", served: bool = False
) -> list[str]:
    """The card's section from an evaluation's metrics.json (also the older one, which had
    ``crossl_minus_supervised`` and ``missing_modality_macro_f1``); ``arm`` is this model's
    recipe (``crossl`` or ``supervised``), whose kept share with one modality is checked
    against the goal."""
    f1 = metrics.get("macro_f1") or {}
    folds = metrics.get("folds") or metrics.get("subjects") or []
    protocol = metrics.get("protocol", "held-out evaluation")
    by = protocol.removeprefix("leave-one-").removesuffix("-out") if folds else ""
    held = f"each of {len(folds)} {by}s held out in turn" if folds else "groups held out in turn"
    seeds = metrics.get("seeds") or []
    if len(seeds) > 1:
        held += f" ({len(seeds)} seeds)"
    paired = metrics.get("paired") or {}
    old_diffs = metrics.get("crossl_minus_supervised") or {}
    shown = [
        a for a in ("crossl", "crossl-all", "supervised") if any(split_key(k)[0] == a for k in f1)
    ]
    pairs = [a for a in ("crossl", "crossl-all") if a in shown]
    head = [TITLES[a] + (" (this recipe)" if a == arm else "") for a in shown]
    head += [f"{TITLES[a]} − supervised (paired)" for a in pairs]
    lines = [
        f"## How well it does ({protocol}, macro-F1 %)",
        "",
        f"The recipes, retrained with {held} "
        f"on {metrics.get('dataset', name)} (the evaluation's `report.md` has every table): "
        f"not a score of these exact weights. This model's recipe is {TITLES[arm]}.",
        "",
        "| labels | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for f in fractions(k for k in f1 if split_key(k)[0] in shown):
        cells = [_pct(f1.get(run_key(a, f))) for a in shown]
        for a in pairs:
            d = paired.get(f"{run_key(a, f)} - {run_key('supervised', f)}")
            if d:
                cells.append(f"{_points(d['mean'])} ({d['wins']}/{d['n']} wins, p={_p(d['p'])})")
            elif a == "crossl" and str(float(f)) in old_diffs:
                cells.append(_points(old_diffs[str(float(f))]))
            else:
                cells.append("—")
        lines.append(f"| {_labels(f)} | " + " | ".join(cells) + " |")
    if metrics.get("dataset") and metrics["dataset"] != name:
        lines += ["", f"(The evaluation ran on {metrics['dataset']}, not on {name}.)"]
    alone = metrics.get("alone") or {}
    kept = metrics.get("kept") or {}
    full = [k for k in run_keys(alone) if split_key(k)[1] == 1.0]
    old_missing = metrics.get("missing_modality_macro_f1") or {}
    if full or old_missing:
        lines += ["", "With one modality only at inference (models trained with every label):", ""]
    for k in full:
        shown_alone = ", ".join(
            f"{m} only {_pct(x)}" + (f" (kept {kept[k][m]:.0%})" if m in kept.get(k, {}) else "")
            for m, x in alone[k].items()
        )
        lines.append(f"- {TITLES.get(split_key(k)[0], k)}: {shown_alone}")
    if not full:
        for model, vals in old_missing.items():
            shown_alone = ", ".join(f"{m} only {_pct(x)}" for m, x in vals.items())
            lines.append(f"- {TITLES.get(model, model)}: {shown_alone}")
    ours = {m: x for m, x in (kept.get(run_key(arm, 1.0)) or {}).items() if x is not None}
    if ours:
        worst = min(ours, key=ours.get)
        met = ours[worst] >= GOAL_KEPT - 1e-12
        lines += [
            "",
            ("Served without its fallbacks (the modality's latent masked), t" if served else "T")
            + f"his model's recipe ({TITLES[arm]}, 100% of labels) keeps {ours[worst]:.0%} of "
            f"its macro-F1 with its weakest modality alone ({worst} only): it "
            + ("meets" if met else "misses")
            + f" the goal of keeping {GOAL_KEPT:.0%} with one modality missing.",
        ]
    fb = metrics.get("fallbacks") or {}
    shares = ((fb.get("kept") or {}).get(run_key(arm, 1.0)) or {}) if served else {}
    if shares:
        worst = min(shares, key=shares.get)
        met = shares[worst] >= GOAL_KEPT - 1e-12
        lines += [
            "",
            "With its fallback models (above), a window missing one modality keeps "
            + ", ".join(f"{shares[m]:.0%} without {m}" for m in shares)
            + f" of this recipe's macro-F1: it {'meets' if met else 'misses'} the goal of "
            f"{GOAL_KEPT:.0%}.",
        ]
    goals = metrics.get("targets") or []
    if goals:
        lines += ["", "Targets:", ""]
        for t in goals:
            lines.append(
                f"- {t['name']}: {'met' if t['met'] else 'missed'} "
                f"({_points(t.get('margin'))} points)"
            )
    return lines


def _fallback_lines(fallbacks: dict[str, dict[str, Any]]) -> list[str]:
    """What serves a window that misses one modality, from each fallback's model.json."""
    lines = [
        "A window that misses exactly one modality is not run through this model with that "
        "modality's latent masked: a fallback model trained without it serves it (its "
        "records name it in `model`). Each is the supervised recipe on the same labelled "
        "windows and validation group, on the other modalities only.",
        "",
        "| missing | served by | trained on | validation macro-F1 | best epoch |",
        "|---|---|---|---|---|",
    ]
    for missing, meta in sorted(fallbacks.items()):
        info = meta.get("info") or {}
        names = ", ".join(f"`{m.get('name')}`" for m in meta.get("modalities") or [])
        f1 = info.get("best_val_f1")
        lines.append(
            f"| `{missing}` | `fallback/without-{missing}` | {names} | "
            f"{'—' if f1 is None else f'{100 * f1:.1f}'} | {info.get('best_epoch', '—')} |"
        )
    return lines


def write_card(model_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model_dir/README.md`` from its model.json and its fallbacks' (and
    ``metrics``, else the folder's metrics.json when there is one); returns the path."""
    from crossl_stream.model.checkpoint import fallback_dirs

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    if metrics is None:
        metrics = _load(model_dir / "metrics.json")
    fallbacks = {
        k: json.loads((d / "model.json").read_text()) for k, d in fallback_dirs(model_dir).items()
    }
    path = model_dir / "README.md"
    path.write_text(render_card(meta, metrics, fallbacks))
    return path
