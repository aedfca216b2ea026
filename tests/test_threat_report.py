"""The threat models in the report: one rule gives the table's sentences, the answer's verdict table, AutoAttack's
robust-accuracy sentence and the heatmap's marks, on a record whose verdicts are known by construction."""

from __future__ import annotations

from pathlib import Path

from advretrain.report_format import pyplot
from advretrain.report_threats import grid, robust_accuracy, threats_figure, verdict_table, verdicts
from advretrain.results import AttackResults, Probe, Results, RetrainRow, ThreatModels


def cell(fr: float, acc: float) -> dict[str, float]:
    return {"fooling_ratio": fr, "adversarial_accuracy": acc, "fooling_ratio_8bit": fr, "success_on_correct": fr}


def record() -> Results:
    """f0 fooled 80% by each probe; the f1 of FGSM: 10% (stopped), 50% (weakened), 70% (not stopped)."""
    probes = [
        Probe("autoattack@8/255", "white-box", "autoattack", {"eps": 8 / 255}, 8 / 255),
        Probe("square@8/255", "query", "square", {"eps": 8 / 255}, 8 / 255),
        Probe("transfer pgd@8/255", "transfer", "pgd", {"eps": 8 / 255}, 8 / 255),
    ]
    row = RetrainRow(100, 0.6, 0.5, cell(0.15, 0.5), cell(0.9, 0.05), None)
    attack = AttackResults("FGSM", "white-box", {}, cell(0.8, 0.1), {}, [row])
    threats = ThreatModels(
        {},
        probes,
        {p.key: cell(0.8, 0.1) for p in probes},
        {"fgsm": {100: {p.key: cell(fr, 0.3) for p, fr in zip(probes, (0.1, 0.5, 0.7), strict=True)}}},
        {"reference fgsm-rs": {p.key: cell(fr, 0.4) for p, fr in zip(probes, (0.3, 0.9, 0.1), strict=True)}},
    )
    return Results("cifar10-sample", 10, "small", 100, 10, 0.6, "scratch", "oracle", {"fgsm": attack}, threats)


def test_every_view_of_the_threat_models_gives_the_same_verdicts(tmp_path: Path) -> None:
    results = record()
    assert results.threats is not None
    table = verdict_table(results, "cifar").splitlines()
    assert table[0].endswith("| fgsm N=100 | reference fgsm-rs |")  # a column per model, a row per threat
    assert table[2:] == [
        "| f0's adversarials replayed | stopped | — |",
        "| the attack rerun | not stopped | — |",
        "| autoattack@8/255 | stopped | weakened |",
        "| square@8/255 | weakened | not stopped |",
        "| transfer pgd@8/255 | not stopped | stopped |",
    ]
    sentence = verdicts(results, results.threats, "fgsm", results.attacks["fgsm"], "cifar")
    assert (
        "stopped replayed f0-adversarials (80.0% → 15.0%), autoattack@8/255 (80.0% → 10.0% of the correctly" in sentence
    )
    assert "weakened square@8/255 (80.0% → 50.0%)" in sentence
    assert "did not stop the attack rerun against it (80.0% → 90.0%), transfer pgd@8/255 (80.0% → 70.0%)" in sentence
    assert robust_accuracy(results) == [
        "**autoattack@8/255** robust accuracy (every member failed): f0 10.00%, f1 fgsm N=100 30.00%, "
        "reference fgsm-rs 40.00%."
    ]
    columns, rows = grid(results, results.threats, "cifar")
    assert [r.label for r in rows] == ["f0", "f1 fgsm N=100", "reference fgsm-rs"] and len(columns) == 5
    threats_figure(results, pyplot(), tmp_path)
    assert (tmp_path / "figure_threats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_white_box_verdict_compares_the_correctly_classified_images_broken() -> None:
    # AutoAttack leaves misclassified images as they are: a model at 26% clean accuracy with every correct image
    # broken has a fooling ratio of 26% against f0's 35% (a "weakened" by fooling ratio) and 0% robust accuracy.
    results = record()
    assert results.threats is not None
    key = "autoattack@8/255"
    results.threats.f0[key] = {**cell(0.35, 0.0), "success_on_correct": 1.0}
    results.threats.others["reference fgsm-rs"][key] = {**cell(0.26, 0.003), "success_on_correct": 0.988}
    results.threats.retrained["fgsm"][100][key] = {**cell(0.38, 0.0), "success_on_correct": 1.0}
    table = verdict_table(results, "cifar").splitlines()
    assert table[4] == "| autoattack@8/255 | not stopped | not stopped |"
    sentence = verdicts(results, results.threats, "fgsm", results.attacks["fgsm"], "cifar")
    assert "autoattack@8/255 (100.0% → 100.0% of the correctly classified broken)" in sentence
    square = grid(results, results.threats, "cifar")[1][1].keys[3]
    assert square == "fooling_ratio"  # query and transfer attacks still compare fooling ratios
