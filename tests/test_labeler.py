"""The true-label generator: exact neighbours, votes, PCA against scikit-learn, calibrated fooling flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from torch import nn

import advretrain.labeler as labeler_module
from advretrain.fooling import fooling_images, noise_images
from advretrain.labeler import KNNLabeler, LabelerError, fit_pca, knn, label_report
from advretrain.runtime.io import read_safetensors, save_state


def low_rank_images(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """'Natural' images: class clusters in a 6-dim subspace of 3×8×8 pixels, plus faint pixel noise."""
    gen = torch.Generator().manual_seed(0)  # the same subspace and centres for every sample
    basis = torch.linalg.qr(torch.randn(192, 6, generator=gen)).Q  # 192×6 orthonormal
    centres = torch.randn(classes, 6, generator=gen) * 0.6
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % classes
    z = centres[labels] + 0.1 * torch.randn(n, 6, generator=gen)
    x = 0.5 + z @ basis.T * 0.5 + 0.01 * torch.randn(n, 192, generator=gen)
    return x.clamp(0, 1).view(n, 3, 8, 8), labels


def test_recovers_labels_of_separable_clusters_exactly() -> None:
    x, y = low_rank_images(400)
    labeler = KNNLabeler(pca_dims=6).fit(x, y)
    queries, truth = low_rank_images(200, seed=5)
    assert torch.equal(labeler.predict(queries), truth)
    assert torch.equal(labeler.predict((x * 255).round().to(torch.uint8)), y)  # uint8 input is accepted too


def test_k_greater_than_one_votes_with_a_distance_tie_break() -> None:
    # 1-pixel "images" on a line: position = value; PCA keeps the single dimension.
    refs = torch.tensor([0.10, 0.20, 0.22, 0.24, 0.60, 0.62]).view(6, 1, 1, 1)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    three = KNNLabeler(pca_dims=1, k=3).fit(refs, labels)
    # 0.19: neighbours 0.20 (0), 0.22 (1), 0.24 (1) → class 1 wins the vote although the nearest is class 0
    assert three.predict(torch.tensor([0.19]).view(1, 1, 1, 1)).tolist() == [1]
    two = KNNLabeler(pca_dims=1, k=2).fit(refs, labels)
    # 0.59: neighbours 0.60 (0) and 0.62 (0) → 0; 0.205: 0.20 (0) and 0.22 (1) tie → the nearer, class 0
    assert two.predict(torch.tensor([0.59, 0.205]).view(2, 1, 1, 1)).tolist() == [0, 0]
    # 0.215: 0.22 (1) nearer than 0.20 (0) → class 1
    assert two.predict(torch.tensor([0.215]).view(1, 1, 1, 1)).tolist() == [1]


def test_chunked_search_equals_unchunked_and_scikit_learn() -> None:
    gen = torch.Generator().manual_seed(0)
    refs, queries = torch.randn(500, 20, generator=gen), torch.randn(130, 20, generator=gen)
    d_chunked, i_chunked = knn(queries, refs, k=5, chunk=7)
    d_whole, i_whole = knn(queries, refs, k=5, chunk=10_000)
    assert torch.equal(i_chunked, i_whole) and torch.allclose(d_chunked, d_whole)
    sk_d, sk_i = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(refs.numpy()).kneighbors(queries.numpy())
    assert np.array_equal(i_chunked.numpy(), sk_i)
    assert np.allclose(d_chunked.numpy(), sk_d, atol=1e-4)


def test_pca_matches_scikit_learn() -> None:
    x, _ = low_rank_images(300)
    flat = x.view(300, -1)
    mean, components = fit_pca(flat, 5)
    sk = PCA(n_components=5, svd_solver="covariance_eigh").fit(flat.double().numpy())
    assert np.allclose(mean.numpy(), sk.mean_, atol=1e-6)
    ours = ((flat - mean) @ components).numpy()
    assert np.allclose(ours, sk.transform(flat.double().numpy()), atol=1e-4)


def test_a_uint8_reference_set_is_read_in_float_blocks_with_the_float_sets_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 101,000-image TinyImageNet set is 1.2 GB as uint8 and 5 GB as float32: the labeler keeps it uint8 and makes
    # float blocks of at most CHUNK rows; the fit equals the fit on the float copy, held-out rows included.
    monkeypatch.setattr(labeler_module, "CHUNK", 64)  # several blocks, a partial last one
    x, y = low_rank_images(403)
    pixels = (x * 255).round().to(torch.uint8)
    blocks: list[int] = []
    to_float = labeler_module.to_float
    monkeypatch.setattr(labeler_module, "to_float", lambda part: blocks.append(part.shape[0]) or to_float(part))
    small = KNNLabeler(pca_dims=6, fooling_percentile=99).fit(pixels, y)
    assert blocks and max(blocks) <= 64
    monkeypatch.setattr(labeler_module, "to_float", to_float)
    whole = KNNLabeler(pca_dims=6, fooling_percentile=99).fit(pixels.float() / 255, y)
    assert small.mean is not None and whole.mean is not None and small.components is not None
    assert torch.allclose(small.mean, whole.mean, atol=1e-6)
    assert torch.allclose(small.components.abs(), whole.components.abs(), atol=1e-4)  # signs are a convention
    assert small.threshold == pytest.approx(whole.threshold, rel=1e-4)
    queries, truth = low_rank_images(100, seed=3)
    assert torch.equal(small.predict(queries), whole.predict(queries))
    assert torch.equal(small.predict_parts(queries)[1], truth)  # the vote; a 99th-percentile flag may take one


def test_fooling_threshold_hits_its_percentile_on_held_out_data() -> None:
    x, y = low_rank_images(1000)
    holdout, _ = low_rank_images(2000, seed=7)
    labeler = KNNLabeler(pca_dims=6, fooling_percentile=95).fit(x, y, holdout=holdout)
    flagged_holdout = (labeler.predict(holdout) >= 4).float().mean()
    assert flagged_holdout == pytest.approx(0.05, abs=0.001)
    fresh, _ = low_rank_images(4000, seed=9)
    assert (labeler.predict(fresh) >= 4).float().mean() == pytest.approx(0.05, abs=0.015)
    noise = noise_images(300, (3, 8, 8))
    assert (labeler.predict(noise) == 4).all()  # every noise image flagged, as new class C = 4


def test_calibration_without_holdout_uses_unseen_reference_images() -> None:
    x, y = low_rank_images(1000)
    labeler = KNNLabeler(pca_dims=6, fooling_percentile=99, holdout=200).fit(x, y)
    fresh, _ = low_rank_images(4000, seed=11)
    assert (labeler.predict(fresh) >= 4).float().mean() < 0.03
    assert torch.equal(labeler.predict(x)[:50], y[:50])  # held-out images stay searchable


def test_fooling_clusters_get_consecutive_new_classes() -> None:
    x, y = low_rank_images(600)
    labeler = KNNLabeler(pca_dims=6, fooling_percentile=99, fooling_clusters=3).fit(x, y)
    # three kinds of far-away images: bright, dark and striped
    bright = torch.full((20, 3, 8, 8), 0.95)
    dark = torch.full((20, 3, 8, 8), 0.05)
    stripes = torch.zeros(20, 3, 8, 8)
    stripes[:, :, ::2] = 1
    labels = labeler.predict(torch.cat([bright, dark, stripes]))
    assert set(labels.tolist()) == {4, 5, 6}
    groups = [set(labels[i * 20 : (i + 1) * 20].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_saved_and_reloaded_labeler_gives_identical_labels(tmp_path: Path) -> None:
    x, y = low_rank_images(300)
    labeler = KNNLabeler(pca_dims=6, k=3, fooling_percentile=99).fit(x, y)
    save_state(tmp_path / "labeler.safetensors", labeler)
    loaded = KNNLabeler.from_state_dict(*read_safetensors(tmp_path / "labeler.safetensors", "labeler", "fit it again"))
    queries = torch.cat([low_rank_images(100, seed=3)[0], noise_images(20, (3, 8, 8))])
    assert torch.equal(loaded.predict(queries), labeler.predict(queries))
    assert loaded.threshold == labeler.threshold


def test_label_report_separates_seen_and_unseen_sources() -> None:
    x, y = low_rank_images(400, classes=4)
    labeler = KNNLabeler(pca_dims=6, fooling_percentile=99).fit(x, y)
    perturbed = (x[:100] + 0.002 * torch.sign(torch.randn(1, 3, 8, 8))).clamp(0, 1)  # a faint universal pattern
    unseen, unseen_y = low_rank_images(100, seed=3)
    report = label_report(
        labeler,
        (perturbed, y[:100], torch.arange(100)),
        (unseen, unseen_y),
        (unseen, unseen_y),
        noise_images(50, (3, 8, 8)),
    )
    assert report["exact_source_retrieval"] == 1.0, report
    # every training-source adversarial gets its source's label unless flagged (its residual grew past p99)
    assert report["train_source_accuracy"] + report["flag_rate_train_source_adversarial"] == pytest.approx(1.0)
    assert report["train_source_vote_accuracy"] == 1.0  # the vote alone, the paper's metric, finds every source
    assert report["flag_rate_fooling"] == 1.0 and report["flag_rate_clean_test"] <= 0.05
    assert "test_source_accuracy" in report and "clean_test_accuracy" in report


def test_bad_labeler_input() -> None:
    x, y = low_rank_images(20)
    with pytest.raises(LabelerError, match="pca_dims 300 exceeds"):
        KNNLabeler(pca_dims=300).fit(x, y)
    with pytest.raises(LabelerError, match="not fitted"):
        KNNLabeler().predict(x)
    with pytest.raises(LabelerError, match=r"fooling_percentile must lie in \(0, 100\)"):
        KNNLabeler(fooling_percentile=100)


def test_fooling_images_reach_the_confidence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    with torch.no_grad():
        model[3].weight *= 20  # confident logits, like a trained net's
    images, reached = fooling_images(model, torch.tensor([0, 1, 2, 0]), (3, 8, 8), steps=300, step_size=0.02)
    assert reached.all() and images.min() >= 0 and images.max() <= 1
    confidence = torch.softmax(model(images), 1)[torch.arange(4), torch.tensor([0, 1, 2, 0])]
    assert (confidence >= 0.99).all()


def test_faiss_backend_finds_the_same_neighbours() -> None:
    from advretrain.labeler import knn_faiss

    gen = torch.Generator().manual_seed(1)
    refs, queries = torch.randn(500, 20, generator=gen), torch.randn(130, 20, generator=gen)
    for k in (1, 5):
        d_torch, i_torch = knn(queries, refs, k=k, chunk=7)
        d_faiss, i_faiss = knn_faiss(queries, refs, k=k)
        assert torch.equal(i_faiss, i_torch) and torch.allclose(d_faiss, d_torch, atol=1e-4)
    x, y = low_rank_images(200, classes=4)
    labels = [KNNLabeler(pca_dims=6, k=3, backend=b).fit(x, y).predict(x[:50] * 0.98) for b in ("torch", "faiss")]
    assert torch.equal(labels[0], labels[1])
