"""`advretrain run` end to end on a tiny protocol: every table and figure, a byte-identical `report`, and a run
killed (SIGKILL) inside a retraining stage that resumes without redoing finished work."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import TINY, advretrain, finish, untimed


def test_run_writes_every_table_and_figure(finished_run: Path) -> None:
    tables = (finished_run / "tables.md").read_text()
    for number in (1, 3, 4, 5, 7):  # CIFAR-10 family: GAP → 1, DeepFool → 3, C&W → 4, FGSM → 5, labels → 7
        assert f"## Table {number}:" in tables
    assert "| 20 |" in tables and "| 10 |" in tables and "92.25% / 91.09% / 13%" not in tables  # N=20 is not N=50k
    for name in ("gap", "deepfool", "cw", "fgsm", "gap_perturbation", "vs_n", "pca_sweep", "cross_attack", "threats"):
        png = finished_run / f"figure_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((finished_run / "results.json").read_text())
    assert set(results["attacks"]) == {"gap", "deepfool", "cw", "fgsm"}
    gap = results["attacks"]["gap"]
    assert [row["n"] for row in gap["retrain"]] == [20, 10]
    for row in gap["retrain"]:
        assert {"clean_accuracy", "adversarial_accuracy", "replay", "adaptive", "pgd_accuracy"} <= set(row)
        assert 0 <= row["adaptive"]["fooling_ratio"] <= 1
    assert gap["labels"]["exact_source_retrieval"] == 1.0  # pool sources are in the reference set
    assert [set(epoch) for epoch in gap["fit"]] == [{"epoch", "holdout_fooling_ratio", "saturation"}]
    assert "Fit, per epoch: held-out FR (generator saturation" in tables.split("## Table 1:")[1].split("## Table")[0]
    for name in ("config.yaml", "environment.json", "run.log", "tables.csv", "timings.json"):
        assert (finished_run / name).exists()
    import re

    steps = re.findall(r"stage (\d+)/(\d+): (.+) \((\d+:\d\d:\d\d) elapsed\)", (finished_run / "run.log").read_text())
    assert [int(k) for k, *_ in steps] == list(range(1, len(steps) + 1))  # every stage, counted in order
    assert {int(total) for _, total, *_ in steps} == {len(steps)}  # the count known from the start was right
    assert steps[0][2] == "baseline" and steps[-1][2] == "robustness curve of reference fgsm-rs"


def test_report_rebuilds_the_tables_byte_for_byte(finished_run: Path) -> None:
    names = ("tables.md", "tables.csv", "figure_vs_n.png", "report.html")
    names += ("figure_pca_sweep.png", "figure_cross_attack.png", "figure_robustness_curves.png", "figure_threats.png")
    before = {name: (finished_run / name).read_bytes() for name in names}
    for name in before:
        (finished_run / name).unlink()
    finish(advretrain("report", str(finished_run)))
    assert {name: (finished_run / name).read_bytes() for name in before} == before


def test_killed_run_resumes_without_redoing_finished_stages(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    # the baseline trains 3 epochs: the 4th epoch checkpoint is the first retraining's first epoch
    proc = advretrain("run", "--out", str(run_dir), *TINY, kill_at="train-epoch:4")
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    killed_in = next((run_dir / "stages").glob("retrain-*/train_state.pt")).parent
    assert not (killed_in / "done.json").exists()
    finished_before = sorted(p.parent.name for p in (run_dir / "stages").glob("*/done.json"))
    finish(advretrain("run", "--out", str(run_dir), *TINY))
    log = (run_dir / "run.log").read_text().split("run default:")[-1]  # the second run's part
    for stage in finished_before:
        assert stage in log and "reused" in log
    assert "baseline: reused" in log and "resuming training from the checkpoint of epoch 1/3" in log
    assert untimed(run_dir) == untimed(finished_run)  # but for the PCA sweep's measured seconds


def test_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = advretrain("run", "--out", str(run_dir), *TINY)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "is in use by another advretrain run" in err


def test_retraining_size_larger_than_the_pool_is_refused(tmp_path: Path) -> None:
    proc = advretrain("run", "--out", str(tmp_path / "r"), *TINY, "retrain.sizes.gap=[999999]")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "retrain.sizes.gap=[999999]: N must lie in 1..200" in err


def test_arms_race_attacks_each_rounds_model_and_accumulates_adversarials(tmp_path: Path) -> None:
    run_dir = tmp_path / "race"
    finish(
        advretrain("run", "--out", str(run_dir), *TINY, "attacks=[fgsm]", "retrain.rounds=3", "tracking=tensorboard")
    )
    results = json.loads((run_dir / "results.json").read_text())
    rounds = results["attacks"]["fgsm"]["rounds"]
    assert [r["round"] for r in rounds] == [2, 3]
    for r in rounds:
        assert 0 <= r["initial"]["fooling_ratio"] <= 1 and r["retrain"]["n"] == 20
    # one pool per round, each crafted against a different model (the stage key holds the attacked model's key)
    assert len(list((run_dir / "stages").glob("attack-fgsm-*"))) == 3
    log = (run_dir / "run.log").read_text()
    assert "attack fgsm: against the round-2 model" in log
    assert "retrain fgsm-round3 N=20: scratch on 200 clean + 60 adversarial images" in log
    assert "Arms race (not in the paper)" in (run_dir / "tables.md").read_text()
    tracked = {p.name for p in (run_dir / "tensorboard").iterdir()}  # one TensorBoard run per stage
    assert {
        "baseline",
        "surrogate",
        "retrain-fgsm-N=20",
        "retrain-fgsm-round3-N=20",
        "attack-fgsm",
        "results",
    } <= tracked


def test_report_reads_a_record_written_before_the_schema_had_a_version(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    record = json.loads((old / "results.json").read_text())
    del record["schema_version"]
    for attack in record["attacks"].values():  # what 2be4d84 wrote: no title, threat or rounds list
        del attack["title"], attack["threat"], attack["rounds"]
    (old / "results.json").write_text(json.dumps(record))
    (old / "tables.md").unlink()
    finish(advretrain("report", str(old)))
    assert (old / "tables.md").read_bytes() == (finished_run / "tables.md").read_bytes()


def test_a_damaged_record_is_one_line(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    (damaged / "results.json").write_text('{"schema_version": 1, "attacks": {}}')
    proc = advretrain("report", str(damaged))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "results.json is damaged (KeyError: 'dataset')" in err


def test_threat_model_table_has_every_model_and_probe(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    threats = results["threats"]
    keys = [p["key"] for p in threats["probes"]]
    assert keys == [
        "autoattack@8/255",  # the field's standard, at its own budget only
        "square@8/255",
        "square@0.07",
        "transfer pgd@8/255",
        "transfer pgd@0.07",
        "transfer fgsm@0.07",
    ]
    pgd_at_07 = threats["probes"][4]["settings"]
    assert pgd_at_07["eps"] == 0.07 and abs(pgd_at_07["step_size"] - 0.07 / 4) < 1e-12  # the step keeps its ratio
    assert threats["surrogate"]["seed"] == 1 and 0 <= threats["surrogate"]["test_accuracy"] <= 1
    assert set(threats["retrained"]) == {"gap", "deepfool", "cw", "fgsm"}
    assert set(threats["retrained"]["gap"]) == {"20", "10"}
    for measured in [threats["f0"], *(m for rows in threats["retrained"].values() for m in rows.values())]:
        assert set(measured) == set(keys)
        assert measured["square@8/255"]["linf_median"] <= 8 / 255 + 1e-6  # NaN (nothing fooled) fails too
        assert 1 <= measured["square@8/255"]["queries_median"] <= 100  # queries counted, within the budget
        autoattack = measured["autoattack@8/255"]
        broken = sum(autoattack[f"broken_by_{m}"] for m in ("apgd-ce", "apgd-t", "fab-t", "square"))
        # every image is robust, broken by one member, or misclassified before the attack
        assert broken == pytest.approx(autoattack["clean_accuracy"] - autoattack["adversarial_accuracy"], abs=1e-6)
        assert autoattack["linf_median"] <= 8 / 255 + 1e-6
    tables = (finished_run / "tables.md").read_text()
    section = tables.split("## Threat models")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(("| f", "| reference"))]
    assert [r.split(" | ")[0] for r in rows] == [
        "| f0",
        "| f1 gap N=20",
        "| f1 gap N=10",
        "| f1 deepfool N=20",
        "| f1 cw N=20",
        "| f1 fgsm N=20",
        "| f1 fgsm N=10",
        "| reference fgsm-rs",  # the reference defence under the same probes
    ]
    assert set(threats["others"]["reference fgsm-rs"]) == set(keys)
    for name in ("gap", "deepfool", "cw", "fgsm"):  # one computed sentence per attack
        assert f"- **{name}**, retrained on N=20: " in section
    assert "GAP refitted (" in section.split("- **gap**")[1].split("\n")[0]  # a universal attack's adaptive row


def test_transfer_sets_are_crafted_on_the_surrogate_and_only_evaluated_on_f0_and_every_f1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import advretrain
    from advretrain.advset import load_adversarial_set, model_fingerprint
    from advretrain.attacks import FGSM
    from advretrain.data import to_float
    from advretrain.metrics import attack_metrics
    from advretrain.pipeline import load_split, resolve_config
    from advretrain.pipeline.protocol import evaluation_subset

    attacked: list[str] = []
    original = FGSM.__call__

    def spy(self: FGSM, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Any:
        attacked.append(model_fingerprint(model))
        return original(self, model, images, labels)

    monkeypatch.setattr(FGSM, "__call__", spy)
    overrides = [*TINY, "attacks=[deepfool]", "retrain.sizes={deepfool: [20, 10]}", "threats.query=[]"]
    results = advretrain.run("default", tmp_path / "r", [*overrides, "threats.transfer=[fgsm]", "pgd_eval=false"])
    stages = tmp_path / "r" / "stages"
    surrogate = advretrain.load_model(next(stages.glob("surrogate-*")))
    f0 = advretrain.load_model(next(stages.glob("baseline-*")))
    assert model_fingerprint(surrogate) != model_fingerprint(f0)
    assert attacked and set(attacked) == {model_fingerprint(surrogate)}  # crafted against nothing else
    assert results.threats is not None
    assert set(results.threats.retrained["deepfool"]) == {20, 10}
    crafted = load_adversarial_set(next(stages.glob("transfer-transfer_fgsm_0_07-*")) / "test.advset")
    assert crafted.meta["model_fingerprint"] == model_fingerprint(surrogate)
    cfg = resolve_config("default", overrides)
    subset = evaluation_subset(cfg, load_split(cfg.data, "test"))
    expected = attack_metrics(f0, to_float(subset.images), crafted.adversarial, subset.labels)
    measured = results.threats.f0["transfer fgsm@0.07"]
    assert measured["fooling_ratio"] == expected["fooling_ratio"]
    assert measured["adversarial_accuracy"] == expected["adversarial_accuracy"]


def test_a_query_attack_listed_as_transfer_and_a_surrogate_that_is_f0_are_refused(tmp_path: Path) -> None:
    for override, message in (
        ("threats.query=[fgsm]", "threats.query.0: fgsm is not a query-only attack"),
        ("threats.surrogate_seed=0", "threats.surrogate_seed equals train.seed: the surrogate would be f0 itself"),
    ):
        proc = advretrain("run", "--out", str(tmp_path / "r"), *TINY, override)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in err, err


def test_report_html_is_one_self_contained_page_with_every_table_figure_and_answer(finished_run: Path) -> None:
    import base64
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.links: list[tuple[str, str]] = []  # (tag, src or href)
            self.images: list[str] = []
            self.tables = 0
            self.answer = ""
            self._in_answer = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found = dict(attrs)
            self.links += [(tag, str(found[k])) for k in ("src", "href") if found.get(k)]
            self.images += [str(found["src"])] if tag == "img" else []
            self.tables += tag == "table"
            self._in_answer = self._in_answer or found.get("class") == "answer"

        def handle_endtag(self, tag: str) -> None:
            self._in_answer = self._in_answer and tag != "section"

        def handle_data(self, data: str) -> None:
            self.answer += data if self._in_answer else ""

    text = (finished_run / "report.html").read_text()
    page = Page()
    page.feed(text)
    assert not [link for link in page.links if "http://" in link[1] or "https://" in link[1]]
    assert "<script" not in text and "@import" not in text and "url(" not in text  # nothing fetched, nothing run
    tables_md = (finished_run / "tables.md").read_text().splitlines()
    headers = [tables_md[i - 1] for i, line in enumerate(tables_md) if line.startswith("|---")]
    assert page.tables == len(headers) + 1 >= 7  # Tables 1, 3, 4, 5, 7, the threat models and the answer's verdicts
    for header in headers:
        first_cell = header.strip("| ").split(" | ")[0]
        assert f"<th>{first_cell}</th>" in text, first_cell
    pngs = sorted(finished_run.glob("figure_*.png"))
    assert len(page.images) == len(pngs) >= 6
    for png in pngs:
        assert "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() in page.images, png.name
    results = json.loads((finished_run / "results.json").read_text())
    for attack in results["attacks"].values():  # one computed sentence per attack
        assert attack["title"] + ": retrained on N=20" in page.answer, attack["title"]
    assert "Threat / retrained on (largest N)" in page.answer and "autoattack@8/255 robust accuracy" in page.answer
    verdicts = text.split('class="verdicts"')[1].split("</table>")[0]
    for model in ("gap N=20", "deepfool N=20", "cw N=20", "fgsm N=20", "reference fgsm-rs"):  # a column per model
        assert f"<th>{model}</th>" in verdicts, model
    for threat in ("the attack rerun", "autoattack@8/255", "square@8/255"):  # a row per threat
        assert f"<td>{threat}</td>" in verdicts, threat
