"""The threat models in the report (not in the paper): which threats retraining stops, as a table of cells, one
sentence per attack, a compact verdict table for the answer, AutoAttack's robust accuracy per model, and a heatmap.

Every verdict comes from one rule (`outcome`) applied to one grid of cells (`grid`): the table, the sentences, the
verdict table and the picture cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paper
from .report_format import fr_acc, in_table_order, markdown, pct, save_figure
from .results import AttackResults, Metrics, Results, ThreatModels

# A threat is "stopped" when retraining leaves at most a quarter of the fooling ratio it had against f0, and
# "weakened" when at most three quarters: coarse on purpose, so that a sentence never hangs on noise.
STOPPED, WEAKENED = 0.25, 0.75
REPLAYED, ADAPTIVE = "replayed f0-adversarials", "adaptive white-box (GAP: refitted)"
# What a cell's verdict compares. A white-box evaluation (AutoAttack) leaves misclassified images as they are, so its
# fooling ratio is capped by clean accuracy and a less accurate model would look "weakened" while every image it
# classified correctly was broken: there the share of correctly classified images broken is compared instead.
FOOLED, BROKEN = "fooling_ratio", "success_on_correct"


def outcome(before: float, after: float) -> str:
    """What retraining did to a threat, from its fooling ratio against f0 and against the retrained model."""
    return "stopped" if after <= STOPPED * before else "weakened" if after <= WEAKENED * before else "did not stop"


@dataclass
class GridRow:
    """One model of the threat-model table: its label, the attack it was retrained on (None: f0 or a reference
    model), and its cell per column; `before` holds what each column measured against f0 (the verdict's baseline)."""

    label: str
    attack: str | None
    cells: list[Metrics | None]
    before: list[Metrics | None]
    keys: list[str]  # per column, the metric the verdict compares (FOOLED or BROKEN)


def grid(results: Results, threats: ThreatModels, fam: str) -> tuple[list[str], list[GridRow]]:
    """Columns (replayed, adaptive, every probe) and rows (f0, every f1, the other models such as the reference)."""
    columns = [REPLAYED, ADAPTIVE, *(p.key for p in threats.probes)]
    keys = [FOOLED, FOOLED, *(BROKEN if p.kind == "white-box" else FOOLED for p in threats.probes)]
    f0_probes: list[Metrics | None] = [threats.f0.get(p.key) for p in threats.probes]
    rows = [GridRow("f0", None, [None, None, *f0_probes], [None] * len(columns), keys)]
    for name, attack in in_table_order(results, fam):
        for row in attack.retrain:
            measured = threats.retrained.get(name, {}).get(row.n, {})
            cells = [row.replay, row.adaptive, *(measured.get(p.key) for p in threats.probes)]
            before = [attack.initial, attack.initial, *f0_probes]
            rows.append(GridRow(f"f1 {name} N={row.n}", name, cells, before, keys))
    for label, measured in threats.others.items():  # the reference defence: nothing replayed or adapted
        cells = [None, None, *(measured.get(p.key) for p in threats.probes)]
        rows.append(GridRow(label, None, cells, [None, None, *f0_probes], keys))
    return columns, rows


def cell_outcome(before: Metrics | None, after: Metrics | None, key: str = FOOLED) -> str | None:
    """The verdict of one cell on metric `key`, None where there is nothing to compare (f0 itself, or f0 never
    fooled)."""
    if before is None or after is None or before[key] == 0:
        return None
    return outcome(before[key], after[key])


def threat_rows(results: Results, threats: ThreatModels, fam: str) -> tuple[list[str], list[list[str]]]:
    columns, rows = grid(results, threats, fam)
    return ["Model", *columns], [[row.label, *map(fr_acc, row.cells)] for row in rows]


def verdicts(results: Results, threats: ThreatModels, name: str, attack: AttackResults, fam: str) -> str:
    """One sentence: which threats retraining on this attack (its largest N) stopped, weakened or left standing."""
    columns, rows = grid(results, threats, fam)
    n = max(r.n for r in attack.retrain)
    row = next(r for r in rows if r.label == f"f1 {name} N={n}")
    named = [
        "replayed f0-adversarials",
        "the attack rerun against it" if attack.threat != "universal" else "GAP refitted",
    ]
    groups: dict[str, list[str]] = {"stopped": [], "weakened": [], "did not stop": []}
    for what, before, after, key in zip([*named, *columns[2:]], row.before, row.cells, row.keys, strict=True):
        verdict = cell_outcome(before, after, key)
        if verdict is not None and before is not None and after is not None:
            share = " of the correctly classified broken" if key == BROKEN else ""
            groups[verdict].append(f"{what} ({100 * before[key]:.1f}% → {100 * after[key]:.1f}%{share})")
    said = "; ".join(f"{verdict} {', '.join(items)}" for verdict, items in groups.items() if items)
    return f"**{name}**, retrained on N={n}: {said or 'nothing fooled f0 to begin with'}."


def threats_section(results: Results, fam: str) -> tuple[list[str], list[list[str]]]:
    """The threat-model table (not in the paper): every model under white-box, query and transfer attackers."""
    threats = results.threats
    if threats is None:
        return [], []
    header, rows = threat_rows(results, threats, fam)
    surrogate = threats.surrogate
    md = ["## Threat models: what retraining stops (not in the paper)\n"]
    md.append(
        "Each cell: fooling ratio / accuracy under attack (%), on the attacked test images. Replayed and adaptive: "
        "the attack the model was retrained on. White-box evaluations (AutoAttack, the field's standard) attack each "
        "model with its own gradients; query attacks see only the model's outputs; transfer sets are "
        "crafted once against a surrogate the attacker trained"
        + (
            f" ({surrogate['model']}, seed {surrogate['seed']}, clean test accuracy {pct(surrogate['test_accuracy'])})"
            if surrogate
            else ""
        )
        + " and submitted unchanged. Budgets are in [0,1] pixels, L-inf where a column names no other norm.\n"
    )
    md.append(markdown(header, rows) + "\n")
    md.append(
        f"A threat counts as stopped when the retrained model's fooling ratio is at most {STOPPED:g}× f0's, "
        f"weakened at most {WEAKENED:g}×; for white-box evaluations, which leave misclassified images as they are, "
        "the share of correctly classified images broken is compared instead.\n"
    )
    md += [f"- {verdicts(results, threats, name, attack, fam)}" for name, attack in in_table_order(results, fam)]
    md.append("")
    cells = [
        ["threats", "threats", row[0], col, value]
        for row in rows
        for col, value in zip(header[1:], row[1:], strict=True)
    ]
    return md, cells


SHORT = {"stopped": "stopped", "weakened": "weakened", "did not stop": "not stopped"}


def verdict_table(results: Results, fam: str) -> str:
    """The answer's opening: per threat (a row) the verdict for each retrained model (each attack's largest N) and
    the reference (a column), as a word (Markdown); "" without threat models. Threats run down the page: a run may
    have a dozen, and a row per threat keeps the table as wide as the few models."""
    threats = results.threats
    if threats is None:
        return ""
    columns, rows = grid(results, threats, fam)
    largest = {name: f"f1 {name} N={max(r.n for r in a.retrain)}" for name, a in results.attacks.items()}
    shown = [r for r in rows if r.label in largest.values() or (r.attack is None and r.label != "f0")]
    threat_names = ["f0's adversarials replayed", "the attack rerun", *columns[2:]]
    header = ["Threat / retrained on (largest N)", *(row.label.removeprefix("f1 ") for row in shown)]
    body = [
        [
            name,
            *(SHORT.get(cell_outcome(row.before[j], row.cells[j], row.keys[j]) or "", "—") for row in shown),
        ]
        for j, name in enumerate(threat_names)
    ]
    return markdown(header, body)


def robust_accuracy(results: Results) -> list[str]:
    """One sentence per white-box evaluation (AutoAttack): each model's robust accuracy (Markdown)."""
    threats = results.threats
    if threats is None:
        return []
    fam_rows = grid(results, threats, paper.family(results.dataset, results.classes))[1]
    out = []
    for index, probe in enumerate(threats.probes):
        if probe.kind != "white-box":
            continue
        column = 2 + index
        values = [
            f"{row.label} {pct(cell['adversarial_accuracy'])}"
            for row in fam_rows
            if (cell := row.cells[column]) is not None
        ]
        out.append(f"**{probe.key}** robust accuracy (every member failed): " + ", ".join(values) + ".")
    return out


MARKS = {"stopped": "S", "weakened": "W", "did not stop": "✗"}


def threats_figure(results: Results, plt: Any, out: Path) -> None:
    """The threat-model table as a picture: models × threats, colour = the verdict's metric (fooling ratio; for
    white-box evaluations the share of correctly classified images broken), each cell marked S (stopped), W
    (weakened) or ✗ (not stopped) by the verdict rule; grey where nothing was measured."""
    threats = results.threats
    if threats is None:
        return
    columns, rows = grid(results, threats, paper.family(results.dataset, results.classes))
    values = [[math.nan if c is None else c[k] for c, k in zip(row.cells, row.keys, strict=True)] for row in rows]
    fig, ax = plt.subplots(figsize=(1.15 * len(columns) + 2.6, 0.42 * len(rows) + 1.8))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="#e4e6ea")  # grey: not measured
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(rows):
        for j, (before, after, key) in enumerate(zip(row.before, row.cells, row.keys, strict=True)):
            if after is None:
                continue
            mark = MARKS.get(cell_outcome(before, after, key) or "", "")
            ax.text(j, i, f"{100 * after[key]:.0f}%\n{mark}".strip(), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), [c.replace(" (GAP: refitted)", "").replace(" ", "\n", 1) for c in columns])
    ax.set_yticks(range(len(rows)), [row.label for row in rows])
    ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, fraction=0.025, label="fooling ratio (white-box: share of correct broken)")
    ax.set_title("Threat models: fooling ratio per model; S stopped, W weakened, ✗ not stopped (vs f0)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / THREATS_FIGURE)


THREATS_FIGURE = "figure_threats.png"
