"""The sections and figures of the evaluation beyond the paper (results.Evaluation): fooling images, PCA dimensions,
cross-attack, robustness curves, reference defence. Each reads the record only, so `advretrain report` rebuilds
it byte for byte; each ends with its finding said in words, computed from the numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .attacks import ROBUSTNESS_ATTACK
from .report_format import fr_acc, save_figure
from .report_format import markdown as table
from .results import Curve, Metrics, Results, SweepRow

Section = tuple[list[str], list[list[str]]]  # Markdown lines, long-format CSV rows


def pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def cells(name: str, header: list[str], rows: list[list[str]]) -> list[list[str]]:
    """Long-format CSV rows (table, attack, row, column, value); these tables span attacks, so attack is "-"."""
    return [[name, "-", row[0], col, value] for row in rows for col, value in zip(header[1:], row[1:], strict=True)]


# ---- Fooling images ---------------------------------------------------------------------------------------------


def fooling_section(r: dict[str, Any]) -> Section:
    conf = f"{100 * r['confidence']:g}%"
    rows = [
        ["labeler flag rate: clean test images", pct(r["flag_rate_clean"])],
        ["labeler flag rate: adversarial test images (every attack, against f0)", pct(r["flag_rate_adversarial"])],
        ["labeler flag rate: held-out fooling images (against f0)", pct(r["flag_rate_fooling"])],
        [f"fooling images reaching {conf} in their class, against f0", pct(r["reached_f0"])],
        [f"fresh fooling images reaching {conf} in an original class, against f1", pct(r["fresh_reached"])],
        ["held-out f0 fooling images f1 sends to a fooling class", pct(r["held_out_to_fooling"])],
        ["fresh fooling images (final) f1 sends to a fooling class", pct(r["fresh_to_fooling"])],
        ["clean test accuracy: f0", pct(r["f0_accuracy"])],
        ["clean test accuracy: f1 (with the fooling classes)", pct(r["f1_accuracy"])],
    ]
    header = ["Measure", "Value"]
    md = [
        "## Fooling images: does a new class absorb them? (METHOD.md 2.5; the paper's Figure 1, never run)\n",
        f"{r['generated']} fooling images were generated against f0 ({r['per_class']} per class, gradient ascent from "
        f"noise until {conf} softmax); the labeler flagged {r['flagged_train']} of the {r['generated'] // 2} used for "
        f"retraining and put them in {r['classes']} new class(es); the other half is held out. Fresh fooling images "
        "are then generated against f1, aimed at the original classes only.\n",
        table(header, rows) + "\n",
        fooling_finding(r) + "\n",
    ]
    return md, cells("fooling", header, rows)


def fooling_finding(r: dict[str, Any]) -> str:
    """Holds when fresh fooling images reach the confidence at most a quarter as often as against f0."""
    before, after, conf = r["reached_f0"], r["fresh_reached"], f"{100 * r['confidence']:g}%"
    holds = "holds" if after <= 0.25 * before else "partly holds" if after <= 0.75 * before else "does not hold"
    return (
        f"The fooling class **{holds}**: against f1, {pct(after)} of fresh fooling images still reach {conf} in an "
        f"original class (against f0: {pct(before)}); f1 sends {pct(r['held_out_to_fooling'])} of held-out f0 "
        f"fooling images to a fooling class; clean accuracy {pct(r['f0_accuracy'])} → {pct(r['f1_accuracy'])}."
    )


# ---- PCA dimensions ---------------------------------------------------------------------------------------------


def attack_names(metrics: Metrics) -> list[str]:
    return list(dict.fromkeys(key.split("/")[0] for key in metrics))


def mean_of(metrics: Metrics, suffix: str) -> float:
    values = [v for key, v in metrics.items() if key.endswith(suffix)]
    return sum(values) / len(values) if values else float("nan")


def sweep_section(rows: list[SweepRow]) -> Section:
    names = attack_names(rows[0].metrics) if rows else []
    header = ["PCA dims", "k"]
    header += [f"{n} {part}" for n in names for part in ("train-source", "test-source")]
    header += ["exact source (mean)", "fit s", "label s"]
    body = []
    for row in rows:
        accs = [pct(row.metrics[f"{n}/{part}_accuracy"]) for n in names for part in ("train_source", "test_source")]
        retrieval = pct(mean_of(row.metrics, "/exact_source_retrieval"))
        body.append([str(row.dims), str(row.k), *accs, retrieval, f"{row.fit_seconds:.2f}", f"{row.label_seconds:.2f}"])
    md = [
        "## PCA dimensions: the labeler's trade-off (METHOD.md 3; the paper shows none)\n",
        "The k-NN vote (the paper's label, no fooling flag) on every attack's training-source pool (its clean "
        "sources are in the reference set) and test-source set (they are not), by PCA size ('full': the pixel "
        "space). Fit s: one eigendecomposition, shared by every size (its cost does not depend on the size); label s: "
        "projecting references and queries, one search at the largest k, plus this k's vote.\n",
        table(header, body) + "\n",
    ]
    md.append(sweep_finding(rows) + "\n")
    return md, cells("pca-sweep", header, body)


def sweep_finding(rows: list[SweepRow]) -> str:
    """The smallest size whose mean test-source accuracy (k=1, else the first k) is within a point of the best."""
    k = 1 if any(r.k == 1 for r in rows) else rows[0].k
    points = [(r, mean_of(r.metrics, "/test_source_accuracy")) for r in rows if r.k == k]
    best = max(acc for _, acc in points)
    bend, acc = next((r, a) for r, a in points if a >= best - 0.01)
    full = next((r for r, _ in points if r.dims == "full"), None)
    cost = f"; the pixel space takes {full.fit_seconds + full.label_seconds:.1f} s" if full else ""
    return (
        f"The trade-off bends at **{bend.dims}** dimensions (k={k}): mean test-source accuracy {pct(acc)}, within a "
        f"point of the best ({pct(best)}), in {bend.fit_seconds + bend.label_seconds:.1f} s{cost}."
    )


def sweep_figure(rows: list[SweepRow], plt: Any, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    full_dims = max((int(r.dims) for r in rows if r.dims != "full"), default=1) * 3
    for k in sorted({r.k for r in rows}):
        pts = [r for r in rows if r.k == k]
        xs = [full_dims if r.dims == "full" else int(r.dims) for r in pts]
        for part, style in (("train_source", "o-"), ("test_source", "x--")):
            axes[0].plot(xs, [mean_of(r.metrics, f"/{part}_accuracy") for r in pts], style, label=f"k={k} {part}")
        axes[1].plot(xs, [r.fit_seconds + r.label_seconds for r in pts], "o-", label=f"k={k}")
    for ax, title in zip(axes, ("Label accuracy (mean over attacks)", "Fit + label time (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("PCA dimensions (rightmost: the pixel space)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, out / "figure_pca_sweep.png")


# ---- Cross-attack -----------------------------------------------------------------------------------------------


def cross_columns(cross: dict[str, dict[str, Metrics]]) -> list[str]:
    return list(dict.fromkeys(name for row in cross.values() for name in row))


def cross_section(cross: dict[str, dict[str, Metrics]]) -> Section:
    names = cross_columns(cross)
    header = ["Model", *names]
    body = [[label, *(fr_acc(row.get(n)) for n in names)] for label, row in cross.items()]
    md = [
        "## Cross-attack: does retraining on one attack help against another? (not in the paper)\n",
        "Each cell: fooling ratio / accuracy under attack (%), each attack run against that model (GAP refitted). "
        "The f1 rows are each attack's largest N; the diagonal is the protocol's adaptive column.\n",
        table(header, body) + "\n",
    ]
    md += [f"- {line}" for line in cross_findings(cross)]
    md.append("")
    return md, cells("cross-attack", header, body)


def cross_findings(cross: dict[str, dict[str, Metrics]]) -> list[str]:
    """Per retrained model: the other attacks its accuracy under attack rose against by 10 points or more vs f0."""
    f0 = cross.get("f0", {})
    out = []
    for label, row in cross.items():
        if not label.startswith("f1 "):
            continue
        own = label.split()[1]
        gains = [
            f"{n} ({pct(f0[n]['adversarial_accuracy'])} → {pct(m['adversarial_accuracy'])})"
            for n, m in row.items()
            if n != own and n in f0 and m["adversarial_accuracy"] - f0[n]["adversarial_accuracy"] >= 0.10
        ]
        helped = f"helps against {', '.join(gains)}" if gains else "helps against no other attack by 10 points"
        out.append(f"**{label}**: retraining on {own} {helped} (accuracy under attack, f0 → f1).")
    return out


def cross_figure(cross: dict[str, dict[str, Metrics]], plt: Any, out: Path) -> None:
    names, labels = cross_columns(cross), list(cross)
    grid = [[cross[r][n]["adversarial_accuracy"] if n in cross[r] else float("nan") for n in names] for r in labels]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 0.5 * len(labels) + 1.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if math.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("Accuracy under attack (%): model (row) × attack (column)", fontsize=10)
    fig.colorbar(image, ax=ax)
    save(fig, out / "figure_cross_attack.png")


# ---- Robustness curves ------------------------------------------------------------------------------------------


def curve_accuracy(curve: Curve, eps: float) -> float:
    """Accuracy under every perturbation of L2 norm at most ε: the correct images whose minimal one is larger."""
    above = sum(1 for v in curve["norms"] if v is None or v > eps)
    return float(above / max(1, int(curve["total"])))


def median_norm(curve: Curve) -> float:
    """The median minimal norm over correctly classified images (an unbroken image counts as infinite)."""
    values = sorted(math.inf if v is None else v for v in curve["norms"])
    return values[(len(values) - 1) // 2] if values else float("nan")


def curves_section(curves: dict[str, dict[str, Curve]], eps: list[float]) -> Section:
    header = ["Model", "attack", "clean", *(f"ε={e:g}" for e in eps), "median minimal L2"]
    body = []
    for label, by_attack in curves.items():
        for name, curve in by_attack.items():
            clean = len(curve["norms"]) / max(1, curve["total"])
            points = [pct(curve_accuracy(curve, e)) for e in eps]
            body.append([label, name, pct(clean), *points, f"{median_norm(curve):.3f}"])
    md = [
        "## Robustness curves: did retraining move the boundary? (not in the paper)\n",
        "Accuracy under any L2 perturbation of norm at most ε, from the minimal-norm adversarials (DeepFool, C&W) "
        "crafted against each model: the share of attacked images classified correctly whose minimal perturbation "
        "exceeds ε (an image the attack never fooled counts at every ε). An upper bound on true robustness.\n",
        table(header, body) + "\n",
    ]
    md += [f"- {line}" for line in curves_findings(curves)]
    md.append("")
    rows = [[f"{r[0]} / {r[1]}", *r[2:]] for r in body]
    return md, cells("robustness-curves", ["Model / attack", *header[2:]], rows)


def curves_findings(curves: dict[str, dict[str, Curve]]) -> list[str]:
    f0 = curves.get("f0", {})
    out = []
    for label, by_attack in curves.items():
        if label == "f0":
            continue
        moves = [f"{n} {median_norm(f0[n]):.3f} → {median_norm(c):.3f}" for n, c in by_attack.items() if n in f0]
        out.append(f"**{label}**: median minimal L2 perturbation (f0 → this model): {', '.join(moves)}.")
    return out


def curves_figure(curves: dict[str, dict[str, Curve]], plt: Any, out: Path) -> None:
    names = list(dict.fromkeys(n for row in curves.values() for n in row))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    finite = [v for row in curves.values() for c in row.values() for v in c["norms"] if v is not None]
    top = 1.2 * sorted(finite)[int(0.95 * (len(finite) - 1))] if finite else 1.0
    grid = [top * i / 100 for i in range(101)]
    for ax, name in zip(axes[0], names, strict=True):
        for label, row in curves.items():
            if name in row:
                ax.plot(grid, [curve_accuracy(row[name], e) for e in grid], label=label)
        ax.set_xlabel("L2 budget ε ([0,1] pixels)")
        ax.set_title(f"Accuracy vs ε from {name}'s minimal perturbations", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, out / "figure_robustness_curves.png")


# ---- Reference defence ------------------------------------------------------------------------------------------


def defence_section(results: Results) -> Section:
    """Simple retraining beside adversarial training: clean accuracy, PGD and every attack, the black-box probes."""
    ev, threats = results.evaluation, results.threats
    assert ev.defence is not None and ev.cross is not None
    names = cross_columns(ev.cross)
    probes = [p for p in threats.probes if p.eps is None or p.eps == p.settings.get("eps")] if threats else []
    header = ["Model", "clean", *(f"under {n}" for n in names), *(p.key for p in probes)]
    body = []
    for label, row in ev.cross.items():
        measured = threat_row(results, label)
        clean = next(iter(row.values()))["clean_accuracy"]
        accs = [pct(row[n]["adversarial_accuracy"]) if n in row else "—" for n in names]
        body.append([label, pct(clean), *accs, *(pct_acc(measured.get(p.key)) for p in probes)])
    d = ev.defence
    md = [
        "## Reference defence: simple retraining beside adversarial training (not in the paper)\n",
        f"{d['label']}: the same model and recipe trained on adversarial batches ({d['method']}, L-inf "
        f"{255 * d['eps']:.0f}/255, step {255 * d['step_size']:.1f}/255, {d['steps']} step(s) per batch; clean test "
        f"accuracy {pct(d['test_accuracy'])} on the whole test set). Each cell: accuracy (%) on the attacked test "
        "images; the last columns are the black-box probes at their own budgets.\n",
        table(header, body) + "\n",
        defence_finding(ev.cross, d["label"]) + "\n",
    ]
    return md, cells("reference-defence", header, body)


def pct_acc(metrics: Metrics | None) -> str:
    return "—" if metrics is None else pct(metrics["adversarial_accuracy"])


def threat_row(results: Results, label: str) -> dict[str, Metrics]:
    threats = results.threats
    if threats is None:
        return {}
    if label == "f0":
        return threats.f0
    if label in threats.others:
        return threats.others[label]
    _, name, n = label.split()  # "f1 {attack} N={n}"
    return threats.retrained.get(name, {}).get(int(n.removeprefix("N=")), {})


def defence_finding(cross: dict[str, dict[str, Metrics]], reference: str) -> str:
    pgd = ROBUSTNESS_ATTACK
    ref = cross[reference][pgd]["adversarial_accuracy"]
    retrained = {k: v[pgd]["adversarial_accuracy"] for k, v in cross.items() if k.startswith("f1 ") and pgd in v}
    if not retrained:
        return f"Under PGD the reference keeps {pct(ref)}."
    best = max(retrained, key=lambda k: retrained[k])
    clean = {k: next(iter(v.values()))["clean_accuracy"] for k, v in cross.items()}
    return (
        f"Under PGD the reference defence keeps **{pct(ref)}** accuracy; the best retrained model ({best}) keeps "
        f"{pct(retrained[best])}, f0 {pct(cross['f0'][pgd]['adversarial_accuracy'])}; clean accuracy on these "
        f"images: reference {pct(clean[reference])}, {best} {pct(clean[best])}, f0 {pct(clean['f0'])}."
    )


# ---- all of them ------------------------------------------------------------------------------------------------


def evaluation_sections(results: Results) -> Section:
    ev = results.evaluation
    md: list[str] = []
    rows: list[list[str]] = []
    parts = [
        fooling_section(ev.fooling) if ev.fooling else None,
        sweep_section(ev.sweep) if ev.sweep else None,
        cross_section(ev.cross) if ev.cross else None,
        curves_section(ev.curves, ev.curve_eps) if ev.curves else None,
        defence_section(results) if ev.defence and ev.cross else None,
    ]
    for part in parts:
        if part is not None:
            md += part[0]
            rows += part[1]
    return md, rows


def evaluation_summary(results: Results) -> list[str]:
    """The answer's lines from the evaluation beyond the paper (Markdown)."""
    ev, out = results.evaluation, []
    if ev.fooling:
        out.append("Fooling images: " + fooling_finding(ev.fooling))
    if ev.sweep:
        out.append("Labeler: " + sweep_finding(ev.sweep))
    if ev.defence and ev.cross:
        out.append("Reference defence: " + defence_finding(ev.cross, ev.defence["label"]))
    return out


def evaluation_figure_files(results: Results) -> list[tuple[str, str]]:
    """(file, caption) of each figure `evaluation_figures` draws for this record."""
    ev = results.evaluation
    return [
        *([("figure_pca_sweep.png", "Labeler accuracy and time against PCA dimensions")] if ev.sweep else []),
        *([("figure_cross_attack.png", "Cross-attack: accuracy under each attack, per model")] if ev.cross else []),
        *([("figure_robustness_curves.png", "Robustness curves: accuracy against the L2 budget")] if ev.curves else []),
    ]


def evaluation_figures(results: Results, plt: Any, out: Path) -> None:
    ev = results.evaluation
    if ev.sweep:
        sweep_figure(ev.sweep, plt, out)
    if ev.cross:
        cross_figure(ev.cross, plt, out)
    if ev.curves:
        curves_figure(ev.curves, plt, out)


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()  # axis labels inside the image
    save_figure(fig, path)
