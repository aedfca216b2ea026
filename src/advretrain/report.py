"""Tables 1-7 in the paper's layout, with the paper's figures beside ours, and the figures, from a run's record.

Everything here reads `results.json` (as `Results`) and `figures/*.safetensors` only, so `advretrain report RUN_DIR`
rebuilds the same files byte for byte. An attack the paper has no table for gets one numbered "—", after the
paper's, with "—" in the paper's columns.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import torch

from . import __version__, paper
from .attacks.registry import slug
from .errors import AdvretrainError
from .report_evaluation import evaluation_figure_files, evaluation_figures, evaluation_sections, evaluation_summary
from .report_format import in_table_order, markdown, pct, pyplot, save_figure
from .report_threats import THREATS_FIGURE, outcome, robust_accuracy, threats_figure, threats_section, verdict_table
from .results import AttackResults, Results
from .runtime.io import read_safetensors, write_text


def paper_cell(name: str, fam: str, n: int, train_size: int) -> str:
    """The paper's figures for this row, with the paper's N where it matched by share of the training set."""
    found = paper.retrain_row(name, fam, n, train_size)
    if found is None:
        return "—"
    paper_n, figures = found
    cell = " / ".join(f"{v:g}%" for v in figures)
    return cell if paper_n in (None, n) else f"{cell} (N={paper_n:,} of {paper.TRAIN_SIZE[fam]:,})"


def table_rows(name: str, attack: AttackResults, fam: str, train_size: int) -> tuple[list[str], list[list[str]]]:
    """One paper table: our numbers, the paper's beside them ("—" where it has none), and the columns an honest
    evaluation adds."""
    paper_fr_is_replay = attack.threat == "universal"  # the paper replays GAP's perturbation, re-attacks the rest
    header = [
        "Adv. images",
        "Acc. original",
        "Acc. adversarial",
        "FR after retraining (paper's convention)",
        "FR adaptive",
        "Acc. under adaptive attack",
        "FR replay",
        "FR adaptive 8-bit",
        "median L2 adaptive (f0: {})".format(fmt_l2(attack.initial.get("l2_median"))),
        "PGD accuracy",
        "paper: acc. orig / acc. adv / FR",
    ]
    rows = []
    for row in attack.retrain:
        adaptive, replay = row.adaptive, row.replay
        convention = replay if paper_fr_is_replay else adaptive
        rows.append(
            [
                str(row.n),
                pct(row.clean_accuracy),
                pct(row.adversarial_accuracy),
                pct(convention["fooling_ratio"]) + (" (replay)" if paper_fr_is_replay else " (adaptive)"),
                pct(adaptive["fooling_ratio"]),
                pct(adaptive["adversarial_accuracy"]),
                pct(replay["fooling_ratio"]),
                pct(adaptive["fooling_ratio_8bit"]),
                fmt_l2(adaptive.get("l2_median")),
                pct(row.pgd_accuracy),
                paper_cell(name, fam, row.n, train_size),
            ]
        )
    return header, rows


def arms_race_rows(attack: AttackResults) -> tuple[list[str], list[list[str]]]:
    header = [
        "Round",
        "FR against the previous model",
        "Acc. original",
        "Acc. adversarial",
        "FR adaptive",
        "FR replay",
        "PGD accuracy",
    ]
    first = max(attack.retrain, key=lambda row: row.n)
    entries = [(1, attack.initial, first)] + [(r.round, r.initial, r.retrain) for r in attack.rounds]
    rows = [
        [
            str(number),
            pct(initial["fooling_ratio"]),
            pct(row.clean_accuracy),
            pct(row.adversarial_accuracy),
            pct(row.adaptive["fooling_ratio"]),
            pct(row.replay["fooling_ratio"]),
            pct(row.pgd_accuracy),
        ]
        for number, initial, row in entries
    ]
    return header, rows


def fmt_l2(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def findings(name: str, attack: AttackResults) -> list[str]:
    """Where our measurement and the paper's claim part ways, said in words (computed, not asserted)."""
    outcomes = [
        paper.Outcome(
            row.n,
            attack.initial["fooling_ratio"],
            row.adaptive["fooling_ratio"],
            row.replay["fooling_ratio"],
            row.adaptive["adversarial_accuracy"],
        )
        for row in attack.retrain
    ]
    return paper.disagreements(name, outcomes)


def csv_cells(table: str, name: str, header: list[str], rows: list[list[str]]) -> list[list[str]]:
    """Long-format CSV rows (table, attack, row, column, value) of one table."""
    return [[table, name, row[0], col, value] for row in rows for col, value in zip(header[1:], row[1:], strict=True)]


# A generator whose outputs are this saturated has a vanished gradient: its perturbation froze (METHOD.md 2.1).
FROZEN = 0.9


def fit_lines(attack: AttackResults) -> list[str]:
    """A fitted attack's per-epoch record in one line, and a warning when its generator saturated."""
    if not attack.fit:
        return []
    epochs = ", ".join(
        f"{pct(e.get('holdout_fooling_ratio'))}" + (f" (sat. {e['saturation']:.2f})" if "saturation" in e else "")
        for e in attack.fit
    )
    lines = [f"Fit, per epoch: held-out FR (generator saturation, share of |tanh| > 0.99): {epochs}.\n"]
    last = attack.fit[-1].get("saturation")
    if last is not None and last > FROZEN:
        lines.append(
            f"**Warning:** the generator ended {100 * last:.0f}% saturated: its gradient vanished and the "
            "perturbation froze early; lower attack.gap.lr or use init: pytorch (METHOD.md 2.1).\n"
        )
    return lines


def attack_section(name: str, attack: AttackResults, fam: str, train_size: int) -> tuple[list[str], list[list[str]]]:
    """One attack's Markdown section (its table, findings and any arms race) and its CSV rows."""
    number = paper.table_number(name, fam)
    table = str(number) if number is not None else "—"
    header, rows = table_rows(name, attack, fam, train_size)
    init = attack.initial
    paper_fr = paper.initial_fr(name, fam)
    paper_init = "—" if paper_fr is None else f"{paper_fr:g}%"
    extra = f", targeted success {pct(init['targeted_success'])}" if "targeted_success" in init else ""
    md = [f"## Table {table}: {attack.title}\n"]
    md.append(
        f"Initial FR against f0: {pct(init['fooling_ratio'])} (paper {paper_init}; "
        f"8-bit {pct(init['fooling_ratio_8bit'])}), success on correctly classified "
        f"{pct(init['success_on_correct'])}{extra}, median L2 {fmt_l2(init['l2_median'])}.\n"
    )
    md += fit_lines(attack)
    md.append(markdown(header, rows) + "\n")
    md += [f"- {line}" for line in findings(name, attack)]
    md.append("")
    cells = csv_cells(table, name, header, rows)
    if attack.rounds:
        header, rows = arms_race_rows(attack)
        md.append(
            f"Arms race (not in the paper): each round attacks the previous round's model and retrains on the "
            f"clean set + N={attack.retrain[0].n} adversarial images of every round so far.\n"
        )
        md.append(markdown(header, rows) + "\n")
        cells += csv_cells(f"{table}-rounds", name, header, rows)
    return md, cells


def labels_section(results: Results, fam: str) -> tuple[list[str], list[list[str]]]:
    """Table 7: how the true-label generator labels each attack's adversarials."""
    dims, pca, paper_acc = paper.LABELS[fam]
    header = [
        "Attack",
        "Training-source adversarials: 1-NN label (paper's metric)",
        "... with fooling flags",
        "Exact source retrieved",
        "Test-source adversarials",
        "Clean test 1-NN",
        "Flagged: clean / adversarial / noise",
        f"paper ({dims} → {pca} dims)",
    ]
    rows = []
    for name, attack in in_table_order(results, fam):
        lab = attack.labels
        flags = " / ".join(
            pct(lab.get(k)) for k in ("flag_rate_clean_test", "flag_rate_test_source_adversarial", "flag_rate_fooling")
        )
        rows.append(
            [
                name,
                pct(lab.get("train_source_vote_accuracy")),
                pct(lab.get("train_source_accuracy")),
                pct(lab.get("exact_source_retrieval")),
                pct(lab.get("test_source_accuracy")),
                pct(lab.get("clean_test_accuracy")),
                flags,
                f"{paper_acc:g}% (GAP)",
            ]
        )
    table = str(paper.LABEL_TABLE)
    md = [f"## Table {table}: true labels of adversarial images by PCA + 1-NN\n", markdown(header, rows) + "\n"]
    md.append(
        "Training-source accuracy is what the paper's 98% can mean: 1-NN finds the adversarial image's own "
        "clean source in the reference set. For unseen sources it falls to the clean 1-NN baseline. With fooling "
        "flags on (not in the paper), an adversarial image whose PCA residual exceeds the clean threshold gets the "
        "fooling class instead, which counts as a wrong label here.\n"
    )
    cells = [
        [table, row[0], row[0], col, value] for row in rows for col, value in zip(header[1:], row[1:], strict=True)
    ]
    return md, cells


def build_tables(results: Results) -> tuple[str, list[list[str]]]:
    fam = paper.family(results.dataset, results.classes)
    md = [
        f"# Results: {results.model} on {results.dataset} ({results.train_images} training images, "
        f"{results.test_images} test images attacked)\n",
        f"Baseline clean test accuracy: {pct(results.baseline_accuracy)}. Retraining: "
        f"{results.retrain_mode}, {results.retrain_labels} labels. FR = fooling ratio (prediction changed "
        "vs the clean prediction, over all images). Adaptive: the attack rerun against the retrained model (for "
        "GAP, the generator refitted); replay: the baseline's adversarials (GAP: its perturbation) unchanged.\n",
    ]
    csv_rows = [["table", "attack", "row", "column", "value"]]
    for name, attack in in_table_order(results, fam):
        section, cells = attack_section(name, attack, fam, results.train_images)
        md += section
        csv_rows += cells
    section, cells = labels_section(results, fam)
    threats, threat_cells = threats_section(results, fam)
    beyond, beyond_cells = evaluation_sections(results)
    return "\n".join(md + section + threats + beyond), csv_rows + cells + threat_cells + beyond_cells


FigureData = tuple[dict[str, torch.Tensor], list[str]]


def read_figure_data(name: str, file: Path) -> FigureData:
    """The few images a figure shows and the class names, checked: a damaged file is one line, before any write."""
    t, metadata = read_safetensors(file, f"figure data of {name}", f"rerun `advretrain run --out {file.parent.parent}`")
    try:
        classes = json.loads(metadata["classes"])
        k = t["clean"].shape[0]
        shapes_agree = all(t[key].shape[0] == k for key in ("adversarial", "labels", "clean_pred", "adv_pred"))
        if not shapes_agree or t["clean"].ndim != 4 or t["adversarial"].shape != t["clean"].shape:
            raise ValueError("its tensors disagree in shape")
        if not isinstance(classes, list) or int(
            max(t["clean_pred"].max(), t["adv_pred"].max(), t["labels"].max())
        ) >= len(classes):
            raise ValueError("a prediction names no class")
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise AdvretrainError(f"{file}: damaged figure data ({str(exc)[:80]}); rerun `advretrain run` on it") from exc
    return t, classes


def grid_figure(name: str, title: str, data: FigureData, out: Path) -> None:
    """Original / adversarial / amplified perturbation for the few test images of `data`."""
    t, classes = data
    k = t["clean"].shape[0]
    delta = t["adversarial"] - t["clean"]
    scale = delta.abs().amax().clamp_min(1e-12)
    panels = [
        ("original", t["clean"], t["clean_pred"]),
        ("adversarial", t["adversarial"], t["adv_pred"]),
        (f"perturbation ×{0.5 / float(scale):.0f}", 0.5 + 0.5 * delta / scale, None),
    ]
    fig, axes = pyplot().subplots(3, k, figsize=(1.4 * k, 4.6), squeeze=False)
    for r, (label, images, preds) in enumerate(panels):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if preds is not None:
                ok = "" if int(preds[c]) == int(t["labels"][c]) else "*"
                ax.set_title(f"{classes[int(preds[c])][:10]}{ok}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"{title}: original vs adversarial (baseline's predictions, * = wrong)", fontsize=9)
    save_figure(fig, out / f"figure_{slug(name)}.png")
    if "perturbation" in t:
        perturbation_figure(name, t["perturbation"][0], out)


def perturbation_figure(name: str, u: torch.Tensor, out: Path) -> None:
    """A universal attack's one perturbation (C×H×W), amplified to the full range."""
    fig, ax = pyplot().subplots(figsize=(3, 3.2))
    ax.imshow((0.5 + 0.5 * u / u.abs().amax()).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{name} universal perturbation\n(L-inf {float(u.abs().amax()) * 255:.1f}/255, amplified)", fontsize=8)
    save_figure(fig, out / f"figure_{slug(name)}_perturbation.png")


def curves_figure(results: Results, out: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for name, attack in results.attacks.items():
        ns = [row.n for row in attack.retrain]
        axes[0].plot(ns, [row.adaptive["fooling_ratio"] for row in attack.retrain], "o-", label=f"{name} adaptive")
        axes[0].plot(ns, [row.replay["fooling_ratio"] for row in attack.retrain], "x--", label=f"{name} replay")
        axes[1].plot(ns, [row.clean_accuracy for row in attack.retrain], "o-", label=f"{name} clean")
        axes[1].plot(ns, [row.adversarial_accuracy for row in attack.retrain], "x--", label=f"{name} adversarial")
    for ax, title in zip(axes, ("Fooling ratio after retraining", "Accuracy after retraining"), strict=True):
        ax.set_xlabel("adversarial images added (N)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, out / "figure_vs_n.png")


def verdict(before: float, after: float) -> str:
    """`outcome` as the verb of a summary sentence."""
    return {"stopped": "stops", "weakened": "weakens", "did not stop": "does not stop"}[outcome(before, after)]


def summary(results: Results) -> list[str]:
    """The answer in plain words (Markdown), one sentence per attack from its largest N, then the threat models."""
    fam = paper.family(results.dataset, results.classes)
    out = []
    for _, attack in in_table_order(results, fam):
        row = max(attack.retrain, key=lambda r: r.n)
        first, replay, adaptive = (m["fooling_ratio"] for m in (attack.initial, row.replay, row.adaptive))
        rerun = "refitted" if attack.threat == "universal" else "rerun"
        pgd = "" if row.pgd_accuracy is None else f"; under PGD it keeps {pct(row.pgd_accuracy)} accuracy"
        out.append(
            f"**{attack.title}**: retrained on N={row.n} of its adversarial images, the model {verdict(first, replay)} "
            f"the baseline's own adversarial images (fooling ratio {pct(first)} → {pct(replay)}) and "
            f"{verdict(first, adaptive)} the attack {rerun} against it ({pct(adaptive)}); clean accuracy "
            f"{pct(results.baseline_accuracy)} → {pct(row.clean_accuracy)}{pgd}."
        )
    return out + robust_accuracy(results) + evaluation_summary(results)


def markdown_html(text: str) -> str:
    """Our Markdown as HTML; any HTML in it (an attack's title, say) is shown as text, never run."""
    import markdown as md  # here, not at the top: only the HTML report needs it

    return md.markdown(html.escape(text, quote=False), extensions=["tables"], output_format="html")


def inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def figure_list(results: Results, run_dir: Path) -> list[dict[str, str]]:
    """Every figure the report wrote, inlined, with a caption."""
    figures = []
    for name, attack in results.attacks.items():
        figures.append({"file": f"figure_{slug(name)}.png", "caption": f"{attack.title}: original vs adversarial"})
        if (run_dir / f"figure_{slug(name)}_perturbation.png").exists():
            figures.append(
                {"file": f"figure_{slug(name)}_perturbation.png", "caption": f"{attack.title}: the one perturbation"}
            )
    figures.append({"file": "figure_vs_n.png", "caption": "Fooling ratio and accuracy against N"})
    if results.threats is not None:
        figures.append({"file": THREATS_FIGURE, "caption": "Threat models: what retraining stopped, per model"})
    figures += [{"file": file, "caption": caption} for file, caption in evaluation_figure_files(results)]
    return [{**f, "uri": inline_png(run_dir / f["file"])} for f in figures]


def optional_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "(not recorded)"


def html_report(results: Results, tables_md: str, run_dir: Path) -> str:
    """One self-contained page: the answer, the tables, the figures (inlined), config, environment and timings."""
    import jinja2  # here, not at the top: only the HTML report needs it

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("advretrain", "templates"), autoescape=True, keep_trailing_newline=True
    )
    return env.get_template("report.html.j2").render(
        title=f"{results.model} on {results.dataset}",
        results=results,
        baseline=pct(results.baseline_accuracy),
        verdicts=markdown_html(verdict_table(results, paper.family(results.dataset, results.classes))),
        summary=[markdown_html(s).removeprefix("<p>").removesuffix("</p>") for s in summary(results)],
        tables=markdown_html(tables_md),
        figures=figure_list(results, run_dir),
        config=optional_text(run_dir / "config.yaml"),
        environment=optional_text(run_dir / "environment.json"),
        timings=optional_text(run_dir / "timings.json"),
        version=__version__,
    )


def read_results(run_dir: Path) -> Results:
    path = run_dir / "results.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdvretrainError(f"{path} is unreadable ({exc}); rerun `advretrain run --out {run_dir}`") from exc
    return Results.from_dict(record)


def write_report(run_dir: Path) -> None:
    """Tables and figures from the record; everything is read and checked before the first file is written."""
    results = read_results(run_dir)
    try:
        md, rows = build_tables(results)
    except (KeyError, TypeError, ValueError) as exc:  # a metric the record should hold is missing or not a number
        raise AdvretrainError(
            f"{run_dir / 'results.json'} is damaged ({type(exc).__name__}: {str(exc)[:60]}); rerun `advretrain run`"
        ) from exc
    figures = {
        name: read_figure_data(name, run_dir / "figures" / f"{slug(name)}.safetensors") for name in results.attacks
    }
    write_text(run_dir / "tables.md", md)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text(run_dir / "tables.csv", buffer.getvalue())
    for name, attack in results.attacks.items():
        grid_figure(name, attack.title, figures[name], run_dir)
    curves_figure(results, run_dir)
    threats_figure(results, pyplot(), run_dir)
    evaluation_figures(results, pyplot(), run_dir)
    write_text(run_dir / "report.html", html_report(results, md, run_dir))
