"""Evaluation results -> results.json, metrics.json, report.md and plots; model cards.

``write_eval`` takes the dict ``experiments.run_folds`` returns for one data set (and,
optionally, the rows of ``run_masking_grid``) and writes, into one folder, the raw results,
the machine-readable summary, a markdown report whose sentences are written from the numbers,
and its plots under ``img/``. ``write_card`` writes the ``README.md`` of any model folder from
its ``model.json`` (and an evaluation's ``metrics.json`` when there is one).

Values are fractions in [0, 1] in the JSON files and percentages in the markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# the models of the label-fraction table, and those trained with every label that are also
# scored with one modality only
MODELS = ("crossl", "crossl-probe", "supervised")
FULL_MODELS = ("crossl", "supervised", "supervised+masking")
TITLES = {
    "crossl": "CroSSL fine-tune",
    "crossl-probe": "CroSSL probe",
    "supervised": "supervised",
    "supervised+masking": "supervised + masking",
}
STOPS = ("patience", "max_epochs", "steps")


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def canonical(name: str) -> str:
    """``crossl@1`` -> ``crossl@1.0`` (and keeps ``|modality`` suffixes)."""
    head, _, modality = name.partition("|")
    model, _, fraction = head.partition("@")
    out = f"{model}@{float(fraction)}" if fraction else model
    return f"{out}|{modality}" if modality else out


def split_variant(name: str) -> tuple[str, float | None, str | None]:
    """``crossl@1.0|acc`` -> ("crossl", 1.0, "acc")."""
    head, _, modality = name.partition("|")
    model, _, fraction = head.partition("@")
    return model, (float(fraction) if fraction else None), (modality or None)


def _key(fraction: float) -> str:
    return str(float(fraction))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _pm(v: dict | None) -> str:
    return f"{_pct(v['macro_f1'])} ± {_pct(v['macro_f1_std'])}" if v else "—"


def _labels(fraction: float) -> str:
    """0.1 -> "10%", 0.025 -> "2.5%"."""
    return f"{100 * fraction:g}%"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _points(d: float) -> str:
    return f"{100 * d:+.1f}"


# -- the summary --------------------------------------------------------------------------


def _normalised(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with canonical variant names and every key the report reads (results
    written before the generic protocol said ``subjects`` and ``curves_subject``)."""
    r = dict(results)
    r["variants"] = {canonical(k): v for k, v in results.get("variants", {}).items()}
    r["curves"] = {
        (canonical(k) if "@" in k else k): v for k, v in (results.get("curves") or {}).items()
    }
    r["stops"] = {
        str(g): {canonical(k): s for k, s in v.items()}
        for g, v in (results.get("stops") or {}).items()
    }
    r.setdefault("name", "unnamed data set")
    r.setdefault("by", "subject")
    r.setdefault("pretrain_on", "train")
    r["folds"] = [str(g) for g in (results.get("folds") or results.get("subjects") or [])]
    r.setdefault("curves_fold", results.get("curves_subject"))
    r.setdefault("modalities", [])
    r.setdefault("classes", [])
    return r


def fractions(variants: dict[str, Any]) -> list[float]:
    """The label fractions of the label-fraction table, ascending."""
    found = set()
    for name in variants:
        model, fraction, modality = split_variant(name)
        if model in MODELS and fraction is not None and modality is None:
            found.add(fraction)
    return sorted(found)


def paired_difference(
    variants: dict[str, Any], a: str, b: str, folds: list[str] | None = None
) -> dict[str, Any] | None:
    """``a`` minus ``b`` fold by fold (same held-out group): the mean and std of the
    differences, and on how many folds ``a`` scored higher, lower, the same."""
    if a not in variants or b not in variants:
        return None
    fa = {str(k): v for k, v in variants[a].get("macro_f1_per_fold", {}).items()}
    fb = {str(k): v for k, v in variants[b].get("macro_f1_per_fold", {}).items()}
    order = [g for g in (folds or sorted(fa)) if g in fa and g in fb]
    if not order:
        return None
    diffs = {g: fa[g] - fb[g] for g in order}
    d = np.array(list(diffs.values()))
    return {
        "mean": float(d.mean()),
        "std": float(d.std()),
        "wins": int((d > 1e-12).sum()),
        "losses": int((d < -1e-12).sum()),
        "ties": int((np.abs(d) <= 1e-12).sum()),
        "folds": len(d),
        "per_fold": diffs,
    }


def eval_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the summary other tools read; values are fractions in [0, 1]."""
    r = _normalised(results)
    variants = r["variants"]
    missing: dict[str, dict[str, float]] = {}
    for name, v in variants.items():
        model, _, modality = split_variant(name)
        if modality:
            missing.setdefault(model, {})[modality] = round(v["macro_f1"], 6)
    diffs = {}
    for f in fractions(variants):
        d = paired_difference(variants, f"crossl@{_key(f)}", f"supervised@{_key(f)}", r["folds"])
        if d:
            diffs[_key(f)] = round(d["mean"], 6)
    return {
        "dataset": r["name"],
        "protocol": f"leave-one-{r['by']}-out",
        "pretrain_on": r["pretrain_on"],
        "folds": r["folds"],
        "windows": r.get("windows"),
        "macro_f1": {k: round(v["macro_f1"], 6) for k, v in variants.items() if "|" not in k},
        "macro_f1_std": {
            k: round(v["macro_f1_std"], 6) for k, v in variants.items() if "|" not in k
        },
        "missing_modality_macro_f1": missing,
        "crossl_minus_supervised": diffs,
    }


def write_eval(
    results: dict[str, Any],
    out: Path,
    masking: list | None = None,
    machine: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Write ``out/results.json`` (and ``masking.json``), ``metrics.json``, ``report.md`` and
    ``img/*.png``; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", results)
    if masking:
        save_json(out / "masking.json", masking)
    metrics = eval_metrics(results)
    save_json(out / "metrics.json", metrics)
    plots = _plots(_normalised(results), out / "img")
    (out / "report.md").write_text(render_eval(metrics, results, masking, plots, machine, command))
    return metrics


# -- the report ---------------------------------------------------------------------------


def _compare(d: dict[str, Any], other: str, won: str = "winning") -> str:
    """ "3.1 points below supervised, winning 1 of 4 folds" from a paired difference."""
    size = abs(100 * d["mean"])
    if size < 0.05:
        where = f"level with {other} (0.0 points)"
    else:
        where = f"{size:.1f} points {'above' if d['mean'] > 0 else 'below'} {other}"
    tail = f"{won} {d['wins']} of {d['folds']} folds"
    if d["ties"]:
        tail += f" ({d['ties']} tied)"
    return f"{where}, {tail}"


def _spread_note(d: dict[str, Any]) -> str:
    if d["wins"] and d["losses"] and abs(d["mean"]) < d["std"]:
        return (
            f" The per-fold differences spread ± {100 * d['std']:.1f} points, more than their "
            "mean: the sign is not consistent across folds."
        )
    return ""


def _stop_counts(stops: dict[str, dict[str, dict]], variant: str) -> dict[str, Any]:
    counts = dict.fromkeys(STOPS, 0)
    best = []
    for per_fold in stops.values():
        s = per_fold.get(variant)
        if not s:
            continue
        counts[s.get("stopped") or "steps"] = counts.get(s.get("stopped") or "steps", 0) + 1
        if s.get("best_epoch") is not None:
            best.append(int(s["best_epoch"]))
    return {"counts": counts, "runs": sum(counts.values()), "best": best}


def _stops_section(r: dict[str, Any]) -> list[str]:
    stops = r["stops"]
    order = list(TITLES)

    def rank(name: str) -> tuple:
        model, fraction, _ = split_variant(name)
        return (fraction or 0.0, order.index(model) if model in order else len(order), name)

    names = sorted({v for per_fold in stops.values() for v in per_fold}, key=rank)
    if not names:
        return []
    lines = [
        "",
        "## How the runs stopped",
        "",
        "Every classifier trains in epochs and keeps the weights of its best epoch on a "
        f"validation {r['by']} drawn from the training {r['by']}s: `patience` means the "
        "validation macro-F1 stopped improving, `max_epochs` that the epoch cap ended the run "
        "first, `steps` that there was no validation group and a fixed step budget ran.",
        "",
        "| run | patience | max_epochs | steps | best epoch (median, range) |",
        "|---|---|---|---|---|",
    ]
    sentences = []
    for name in names:
        s = _stop_counts(stops, name)
        c = s["counts"]
        best = s["best"]
        shown = f"{int(np.median(best))} ({min(best)}–{max(best)})" if best else "—"
        lines.append(f"| {name} | {c['patience']} | {c['max_epochs']} | {c['steps']} | {shown} |")
    for group, label in (("supervised", "supervised"), ("crossl", "CroSSL")):
        runs = [n for n in names if split_variant(n)[0].startswith(group)]
        total = {k: sum(_stop_counts(stops, n)["counts"][k] for n in runs) for k in STOPS}
        n = sum(total.values())
        if not n:
            continue
        capped = [n_ for n_ in runs if _stop_counts(stops, n_)["counts"]["max_epochs"]]
        if total["max_epochs"]:
            those = "that run" if total["max_epochs"] == 1 else "those runs"
            sentences.append(
                f"- {total['max_epochs']} of {n} {label} runs stopped at max_epochs: the cap "
                f"bound, not the validation score ({', '.join(capped)}); {those} had not met "
                "the early-stopping rule, and a higher cap could change the numbers."
            )
        elif total["patience"] == n:
            sentences.append(
                f"- All {n} {label} runs stopped on patience: none was cut short by the epoch cap."
            )
        if total["steps"]:
            sentences.append(
                f"- {total['steps']} of {n} {label} runs had no validation group and trained a "
                "fixed step budget."
            )
    return lines + [""] + sentences


def render_eval(
    metrics: dict[str, Any],
    results: dict[str, Any],
    masking: list | None = None,
    plots: list[str] | None = None,
    machine: str | None = None,
    command: str | None = None,
) -> str:
    """report.md as text."""
    r = _normalised(results)
    variants = r["variants"]
    folds = r["folds"]
    by = r["by"]
    n = len(folds)
    fracs = fractions(variants)
    lines = [f"# Evaluation: {r['name']}", ""]

    made = []
    if command:
        made.append(f"Produced by `{command}`")
    else:
        made.append("Produced by `crossl-stream eval`")
    if machine:
        made[-1] += f" on {machine}"
    seconds = float(r.get("seconds") or 0.0)
    if masking:
        seconds += sum(float(row.get("seconds") or 0.0) for row in masking)
    if seconds:
        made.append(
            f"{seconds:.0f} s ({seconds / 60:.1f} min) of training and scoring in all"
            + (" (protocol and masking grid)" if masking else "")
        )
    lines += [
        "; ".join(made) + ". Raw results: `results.json`; summary: `metrics.json`. "
        "Numbers are macro-F1 in percent; differences are in points.",
        "",
        "## Protocol",
        "",
    ]
    if r["pretrain_on"] == "all":
        where = (
            "Self-supervised pretraining, and the normalisation statistics of the pretrained "
            f"encoder, also saw the held-out {by}'s windows, without their labels (not strict: "
            "the encoder has seen the test signals, as one adapted on a new user's unlabelled "
            "data would)"
        )
    else:
        where = (
            f"Self-supervised pretraining saw the training {by}s' windows only (strict: "
            f"nothing of the held-out {by})"
        )
    windows = r.get("windows")
    labelled = r.get("labelled_windows")
    counted = f"{windows} windows" if windows is not None else "Windows"
    if labelled is not None:
        counted += f" ({labelled} labelled)"
    window_s = r.get("window_s")
    if window_s:
        counted += f" of {window_s:g} s"
    lines += [
        f"Leave-one-{by}-out: each of the {n} folds holds out one {by} "
        f"({', '.join(folds)}); every classifier is fitted on the other {by}s' labels. "
        f"{counted[0].upper() + counted[1:]}; modalities "
        f"{', '.join(r['modalities']) or '—'}; {len(r['classes'])} classes. {where}. "
        "CroSSL is then fine-tuned (every weight) or probed (a linear head on the frozen "
        "encoder) on a class-stratified fraction of the labelled training windows; the "
        "supervised baseline is the same architecture trained from scratch on the same "
        "labelled windows. Every classifier holds part of those windows out for validation "
        f"(a whole {by} where there are several) and keeps the weights of its best epoch "
        "(early stopping). Each model is "
        f"scored on the held-out {by}'s labelled windows in which every modality is present, "
        "one window at a time. Mean ± std are over folds (one seed), so the spread is "
        f"between {by}s, not between runs.",
        "",
        "## Labels: CroSSL against supervised",
        "",
        "| labels | CroSSL fine-tune | CroSSL probe | supervised |",
        "|---|---|---|---|",
    ]
    for f in fracs:
        k = _key(f)
        cells = [_pm(variants.get(f"{m}@{k}")) for m in MODELS]
        lines.append(f"| {_labels(f)} | " + " | ".join(cells) + " |")

    diffs = {
        f: paired_difference(variants, f"crossl@{_key(f)}", f"supervised@{_key(f)}", folds)
        for f in fracs
    }
    if any(diffs.values()):
        lines += [
            "",
            "### CroSSL minus supervised, fold by fold",
            "",
            "| labels | mean difference | std of the differences | folds CroSSL won |",
            "|---|---|---|---|",
        ]
        for f, d in diffs.items():
            if d:
                lines.append(
                    f"| {_labels(f)} | {_points(d['mean'])} | {100 * d['std']:.1f} | "
                    f"{d['wins']} of {d['folds']} |"
                )
        lines.append("")
        for f, d in diffs.items():
            if d:
                lines.append(
                    f"- CroSSL fine-tuned with {_labels(f)} of labels is "
                    f"{_compare(d, 'supervised with the same labels')}.{_spread_note(d)}"
                )

    for f in fracs:
        k = _key(f)
        present = [m for m in MODELS if f"{m}@{k}" in variants]
        if not present:
            continue
        head = " | ".join(TITLES[m] for m in present)
        lines += [
            "",
            f"### Per fold, {_labels(f)} of labels",
            "",
            f"| {by} | {head} | CroSSL − supervised |",
            "|---" * (len(present) + 2) + "|",
        ]
        for g in folds:
            cells = [
                _pct(variants[f"{m}@{k}"].get("macro_f1_per_fold", {}).get(g)) for m in present
            ]
            d = diffs.get(f)
            diff = _points(d["per_fold"][g]) if d and g in d["per_fold"] else "—"
            lines.append(f"| {g} | " + " | ".join(cells) + f" | {diff} |")

    aug = variants.get("supervised+masking@1.0")
    if aug:
        lines += [
            "",
            "## Ablation: supervised with CroSSL's latent masking",
            "",
            "The supervised baseline trained on every label with the latent masking CroSSL "
            "uses, as augmentation: it has the masking but no pretraining, so it separates what "
            "each brings.",
            "",
            "| all labels | macro-F1 |",
            "|---|---|",
        ]
        for m in FULL_MODELS:
            if f"{m}@1.0" in variants:
                lines.append(f"| {TITLES[m]} | {_pm(variants[f'{m}@1.0'])} |")
        lines.append("")
        d = paired_difference(variants, "supervised+masking@1.0", "supervised@1.0", folds)
        if d:
            lines.append(
                "- Masking alone: supervised + masking is "
                f"{_compare(d, 'supervised', 'better on')}.{_spread_note(d)}"
            )
        d = paired_difference(variants, "crossl@1.0", "supervised+masking@1.0", folds)
        if d:
            lines.append(
                "- Pretraining on top of masking: CroSSL fine-tuned is "
                f"{_compare(d, 'supervised + masking', 'better on')}.{_spread_note(d)}"
            )

    mods = r["modalities"]
    lines += _missing_section(variants, mods)
    lines += _stops_section(r)
    if masking:
        lines += _masking_section(masking)
    lines += ["", READING.format(by=by, n=n).strip()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](img/{p})" for p in plots]
    elif plots is not None:
        lines += [
            "",
            "(No plots: matplotlib is not installed; `pip install crossl-stream[report]`.)",
        ]
    return "\n".join(lines) + "\n"


def _missing_section(variants: dict[str, Any], mods: list[str]) -> list[str]:
    if len(mods) < 2:
        return []
    models = [
        m
        for m in FULL_MODELS
        if f"{m}@1.0" in variants and all(f"{m}@1.0|{x}" in variants for x in mods)
    ]
    if not models:
        return []
    lines = [
        "",
        "## Missing modalities at inference",
        "",
        "Models trained with every label, scored on the same windows with only one modality "
        "given. Kept = worst single-modality macro-F1 / macro-F1 with every modality.",
        "",
        "| model | "
        + " | ".join(["+".join(mods)] + [f"{x} only" for x in mods])
        + " | kept (worst) |",
        "|---" * (len(mods) + 3) + "|",
    ]
    sentences = []
    for m in models:
        full = variants[f"{m}@1.0"]["macro_f1"]
        vals = {x: variants[f"{m}@1.0|{x}"]["macro_f1"] for x in mods}
        worst = min(vals, key=vals.get)
        kept = vals[worst] / full if full > 0 else float("nan")
        lines.append(
            f"| {TITLES[m]} | {_pct(full)} | "
            + " | ".join(_pct(v) for v in vals.values())
            + f" | {kept:.0%} |"
        )
        sentences.append(
            f"- {_capital(TITLES[m])} keeps {kept:.0%} of its macro-F1 with {worst} only, "
            f"its worst single modality ({_pct(vals[worst])} against {_pct(full)})."
        )
    return lines + [""] + sentences


def _masking_section(masking: list) -> list[str]:
    folds = [str(g) for g in masking[0].get("folds", [])]
    lines = [
        "",
        "## Masking strategies and aggregators",
        "",
        "Pretraining with each setting, then a linear probe on every label and fine-tuning on "
        f"10% of them; macro-F1 mean over the held-out groups {', '.join(folds)}. One run "
        "per setting and fold, and no per-fold spread is recorded: read small differences "
        "with care.",
        "",
        "| aggregator / masking@keep | probe, 100% labels | fine-tune, 10% labels | seconds |",
        "|---|---|---|---|",
    ]
    for row in masking:
        lines.append(
            f"| {row['variant']} | {_pct(row.get('probe@1'))} | "
            f"{_pct(row.get('finetune@0.1'))} | {float(row.get('seconds') or 0):.0f} |"
        )
    if len(masking) > 1:
        for key, what in (("probe@1", "probe"), ("finetune@0.1", "fine-tune")):
            rows = [row for row in masking if row.get(key) is not None]
            if len(rows) > 1:
                hi = max(rows, key=lambda x: x[key])
                lo = min(rows, key=lambda x: x[key])
                lines.append(
                    f"\n{what}: highest {hi['variant']} ({_pct(hi[key])}), lowest "
                    f"{lo['variant']} ({_pct(lo[key])}), {100 * (hi[key] - lo[key]):.1f} "
                    "points apart."
                )
    return lines


READING = """
## How to read these numbers

- **{n} folds.** Every mean is over {n} held-out {by}s and every std is the spread between
  them (one seed). A difference smaller than the per-fold spread, or won on about half the
  folds, is not evidence that one model is better.
- **Paired differences.** "CroSSL minus supervised" compares the two models on the same
  held-out {by}, then averages; it is more telling than comparing the two means and stds.
- **Label fractions count windows.** Overlapping windows of one recording share most of
  their samples, so a small fraction of the windows can cover most recordings. CroSSL and the
  baseline always get the same labelled windows.
- **Confusion matrices** pool the windows of every fold; the macro-F1 in the tables is the
  mean of the per-fold macro-F1, so the two need not agree exactly.
"""


# -- plots --------------------------------------------------------------------------------


def _plots(r: dict[str, Any], img: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    img.mkdir(parents=True, exist_ok=True)
    variants = r["variants"]
    made = []
    curve = _learning_curves(plt, r, img)
    if curve:
        made.append(curve)

    fracs = fractions(variants)
    if fracs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in MODELS:
            pts = [
                (f, variants[f"{model}@{_key(f)}"])
                for f in fracs
                if f"{model}@{_key(f)}" in variants
            ]
            if pts:
                ax.errorbar(
                    [f for f, _ in pts],
                    [100 * v["macro_f1"] for _, v in pts],
                    yerr=[100 * v["macro_f1_std"] for _, v in pts],
                    marker="o",
                    capsize=3,
                    label=TITLES[model],
                )
        if len(fracs) > 1 and fracs[-1] / fracs[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(fracs, [_labels(f) for f in fracs])
        ax.set_xlabel("fraction of labelled training windows")
        ax.set_ylabel(f"macro-F1 % (mean ± std over {len(r['folds'])} folds)")
        ax.set_title(f"{r['name']}: leave-one-{r['by']}-out")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / "label_fractions.png", dpi=110)
        plt.close(fig)
        made.append("label_fractions.png")

    for name in ("crossl@1.0", "supervised@1.0"):
        if name in variants and variants[name].get("confusion"):
            cm = np.asarray(variants[name]["confusion"], dtype=float)
            classes = r["classes"] or [str(i) for i in range(len(cm))]
            made.append(_confusion(plt, cm, classes, name, img))

    mods = r["modalities"]
    models = [
        m
        for m in FULL_MODELS
        if f"{m}@1.0" in variants and all(f"{m}@1.0|{x}" in variants for x in mods)
    ]
    if len(mods) >= 2 and models:
        fig, ax = plt.subplots(figsize=(6, 4))
        sets = ["+".join(mods)] + [f"{x} only" for x in mods]
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            vals = [variants[f"{model}@1.0"]["macro_f1"]] + [
                variants[f"{model}@1.0|{x}"]["macro_f1"] for x in mods
            ]
            ax.bar(
                np.arange(len(sets)) + i * width,
                [100 * v for v in vals],
                width,
                label=TITLES[model],
            )
        ax.set_xticks(np.arange(len(sets)) + width * (len(models) - 1) / 2, sets)
        ax.set_ylabel("macro-F1 % (mean over folds)")
        ax.set_title("modalities given at inference (trained with every label)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "missing_modality.png", dpi=110)
        plt.close(fig)
        made.append("missing_modality.png")
    return made


def _smooth(values: list[float], n: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.convolve(v, np.ones(n) / n, mode="valid") if len(v) > n else v


def _learning_curves(plt: Any, r: dict[str, Any], img: Path) -> str | None:
    curves = r["curves"]
    pre = curves.get("pretrain") or []
    runs = {k: v for k, v in curves.items() if k != "pretrain" and v}
    if not pre and not runs:
        return None
    fold = r.get("curves_fold")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if pre:
        for part in ("loss", "invariance", "variance", "covariance"):
            if part in pre[0]:
                axes[0].plot(_smooth([h[part] for h in pre]), label=part)
        axes[0].set_yscale("log")
        axes[0].legend()
    axes[0].set_title(f"VICReg pretraining, {r['by']} {fold} held out")
    axes[0].set_xlabel("step (moving mean of 10)")
    epochs = {k: [h for h in v if "val_f1" in h] for k, v in runs.items()}
    epochs = {k: v for k, v in epochs.items() if v}
    stops = r["stops"].get(str(fold), {})
    if epochs:
        for name, hist in epochs.items():
            style = "-" if name.startswith("supervised") else "--"
            (line,) = axes[1].plot(
                [h.get("epoch", i + 1) for i, h in enumerate(hist)],
                [100 * h["val_f1"] for h in hist],
                style,
                label=name,
            )
            best = stops.get(name, {}).get("best_epoch")
            for h in hist:
                if best is not None and h.get("epoch") == best:
                    axes[1].plot([best], [100 * h["val_f1"]], "o", color=line.get_color())
        axes[1].set_xlabel("epoch (dot: the kept epoch)")
        axes[1].set_ylabel("validation macro-F1 %")
        axes[1].set_title("early stopping: validation macro-F1 per epoch")
    else:
        for name, hist in runs.items():
            if "loss" in hist[0]:
                axes[1].plot(_smooth([h["loss"] for h in hist]), label=name)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("step (moving mean of 10)")
        axes[1].set_title("classifier training loss")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(img / "learning_curves.png", dpi=110)
    plt.close(fig)
    return "learning_curves.png"


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
    ax.set_title(f"{name}, every fold pooled (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    file = f"confusion_{name.replace('@', '_').replace('+', '_')}.png"
    fig.savefig(img / file, dpi=110)
    plt.close(fig)
    return file


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
    model folders written before (``dataset``, ``train_subjects``, ``config.window_s``)."""
    info = meta.get("info") or {}
    cfg = info.get("config") or {}
    data = info.get("data") or {}
    window = data.get("window") or {}
    holdout = info.get("holdout")
    if holdout is None and info.get("holdout_subject") is not None:
        holdout = [info["holdout_subject"]]
    stage = info.get("stage") or ("finetuned" if meta.get("classes") else "pretrained")
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


def render_card(meta: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """The model card (``README.md`` of a model folder) from its model.json and, when given,
    the metrics.json of an evaluation of the same recipe."""
    v = _info_views(meta)
    info, cfg = v["info"], v["cfg"]
    arch = meta.get("model") or {}
    classes = list(meta.get("classes") or [])
    name = v["name"] or "unnamed data"
    modalities = meta.get("modalities") or []
    pretrained_only = not classes

    if pretrained_only:
        title = f"# CroSSL encoder pretrained on {name} (no class head)"
    else:
        title = f"# CroSSL classifier: {name}, {len(classes)} classes"
    lines = [
        title,
        "",
        "CroSSL (cross-modal self-supervised learning): one encoder per modality and a "
        "latent aggregator across modalities, pretrained with VICReg on unlabelled windows "
        "while parts of the latent representation (whole modalities, or time steps) are "
        "masked, which trains it to do without a missing sensor. "
        + (
            "This folder holds the pretrained encoder only."
            if pretrained_only
            else "This folder holds the encoder fine-tuned with a class head."
        ),
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

    lines += ["", "## Training", ""] + _training_lines(info, cfg, pretrained_only)
    lines += ["", "## Data", ""] + _data_lines(v, name)
    text = attribution(name)
    if text:
        lines += ["", "### Attribution and licence", "", text]

    if metrics and metrics.get("macro_f1"):
        lines += ["", *_metrics_lines(metrics, name)]

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


def _training_lines(info: dict[str, Any], cfg: dict[str, Any], pretrained_only: bool) -> list[str]:
    pre = cfg.get("pretrain") or {}
    mask = cfg.get("masking") or {}
    loss = cfg.get("loss") or {}
    ft = cfg.get("finetune") or {}
    out = []
    parts = []
    if pre.get("steps") is not None:
        parts.append(f"{pre['steps']} steps")
    if pre.get("batch_size") is not None:
        parts.append(f"batch {pre['batch_size']}")
    if pre.get("lr") is not None:
        parts.append(f"lr {pre['lr']:g}")
    if loss:
        parts.append("VICReg weights " + " / ".join(f"{k} {w:g}" for k, w in loss.items()))
    masking = f"`{mask.get('strategy')}` latent masking, keep {mask.get('keep')}" if mask else None
    line = "- Self-supervised pretraining (VICReg)"
    if parts:
        line += ": " + ", ".join(parts)
    if masking:
        line += f"; {masking}"
    seconds = info.get("pretrain_seconds")
    if seconds is not None:
        line += f"; {seconds:g} s"
    out.append(line + ".")
    if not pretrained_only:
        fraction = info.get("labels_fraction")
        line = "- Fine-tuning of every weight with a class head"
        if fraction is not None:
            line += f" on {_labels(float(fraction))} of the labelled training windows"
        if masking:
            line += ", with the same masking"
        ft_parts = []
        if ft.get("batch_size") is not None:
            ft_parts.append(f"batch {ft['batch_size']}")
        if ft.get("lr") is not None:
            ft_parts.append(f"lr {ft['lr']:g}")
        if ft_parts:
            line += f" ({', '.join(ft_parts)})"
        seconds = info.get("finetune_seconds")
        if seconds is not None:
            line += f"; {seconds:g} s"
        out.append(line + ".")
        stopped = info.get("stopped")
        best, epochs = info.get("best_epoch"), info.get("epochs")
        if stopped == "patience":
            out.append(
                f"- Fine-tuning stopped on patience after {epochs} epochs: the validation "
                f"macro-F1 had not improved for {ft.get('patience', 'the configured')} epochs; "
                f"the weights are those of epoch {best}."
            )
        elif stopped == "max_epochs":
            out.append(
                f"- Fine-tuning stopped at the epoch cap ({ft.get('max_epochs', epochs)} "
                f"epochs), not on the validation score: the cap bound, and more epochs might "
                f"have helped; the weights are those of epoch {best}."
            )
        elif stopped == "steps":
            out.append(
                "- Fine-tuning ran a fixed step budget: there was no validation group to stop on."
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
        if v["info"].get("pretrain_on") == "all":
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


def _metrics_lines(metrics: dict[str, Any], name: str) -> list[str]:
    f1 = metrics.get("macro_f1", {})
    folds = metrics.get("folds") or metrics.get("subjects") or []
    protocol = metrics.get("protocol", "held-out evaluation")
    by = protocol.removeprefix("leave-one-").removesuffix("-out") if folds else ""
    held = f"each of {len(folds)} {by}s held out in turn" if folds else "groups held out in turn"
    diffs = metrics.get("crossl_minus_supervised", {})
    fracs = sorted({f for k in f1 for _, f, _ in [split_variant(k)] if f is not None})
    lines = [
        f"## How well it does ({protocol}, macro-F1 %)",
        "",
        f"The same recipe, retrained with {held} "
        f"on {metrics.get('dataset', name)} (the evaluation's `report.md` has every table): "
        "not a score of these exact weights.",
        "",
        "| labels | CroSSL | supervised, same architecture | CroSSL − supervised (paired) |",
        "|---|---|---|---|",
    ]
    for f in fracs:
        k = _key(f)
        d = diffs.get(k)
        lines.append(
            f"| {_labels(f)} | {_pct(f1.get(f'crossl@{k}'))} | "
            f"{_pct(f1.get(f'supervised@{k}'))} | {'—' if d is None else _points(d)} |"
        )
    if metrics.get("dataset") and metrics["dataset"] != name:
        lines += ["", f"(The evaluation ran on {metrics['dataset']}, not on {name}.)"]
    missing = metrics.get("missing_modality_macro_f1") or {}
    if missing:
        lines += ["", "With one modality only at inference (models trained with every label):", ""]
        for model, vals in missing.items():
            shown = ", ".join(f"{m} only {_pct(x)}" for m, x in vals.items())
            lines.append(f"- {TITLES.get(model, model)}: {shown}")
    return lines


def write_card(model_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model_dir/README.md`` from its model.json (and ``metrics``, else the folder's
    metrics.json when there is one); returns the path."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    if metrics is None:
        metrics = _load(model_dir / "metrics.json")
    path = model_dir / "README.md"
    path.write_text(render_card(meta, metrics))
    return path
