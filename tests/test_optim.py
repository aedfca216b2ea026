"""Muon's update keeps the gradient's singular vectors with singular values near 1; its SGD groups are torch's SGD."""

from __future__ import annotations

import torch

from advretrain import TrainConfig, build_model
from advretrain.optim import MuonSGD, orthogonalize
from advretrain.train import make_optimizer


def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values() -> None:
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(16, 72), (72, 16)]:  # wide and tall, as filter banks are
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
        k = min(rows, cols)
        s = torch.logspace(-2, 1, k, dtype=torch.float64)  # singular values over three decades
        g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
        out = orthogonalize(g, steps=5)
        core = u.T @ out @ v  # rows×cols; diagonal iff out has g's singular vectors
        diagonal = torch.diagonal(core).clone()
        core.diagonal().zero_()
        assert core.abs().max() < 1e-9
        # The largest singular values land near 1 and the order is kept; NS does not reach 1 for tiny ones in 5 steps.
        assert ((diagonal[s > 0.1] > 0.6) & (diagonal[s > 0.1] < 1.25)).all()
        assert out.shape == g.shape


def test_muon_groups_turn_renormalised_filters_by_an_orthogonal_step_and_the_rest_is_sgd() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="muon", lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3, muon_lr=0.05)
    model = build_model("small", 3)
    twin = build_model("small", 3)
    twin.load_state_dict(model.state_dict())
    muon = make_optimizer(model, cfg)
    assert isinstance(muon, MuonSGD)
    sgd = make_optimizer(twin, cfg.model_copy(update={"optimizer": "sgd"}))
    filters = {id(p) for p in model.parameters() if p.ndim == 4 and p.requires_grad}
    assert {id(p) for g in muon.param_groups if g["muon"] for p in g["params"]} == filters
    for step in range(3):
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, muon), (twin, sgd)):
            opt.zero_grad()
            net(x).square().mean().backward()
        before = {  # each filter bank's weights, gradient and momentum buffer before the step
            id(p): (
                p.detach().clone(),
                p.grad.clone(),
                muon.state[p].get("momentum_buffer", torch.zeros_like(p)).clone(),
            )
            for p in model.parameters()
            if id(p) in filters
        }
        muon.step()
        sgd.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            if id(p) not in filters:  # SGD's groups: the same numbers as torch.optim.SGD
                assert torch.allclose(p, q, atol=1e-6), step
                continue
            w, g, previous = before[id(p)]
            buf = previous * cfg.muon_momentum + g
            update = orthogonalize((g + cfg.muon_momentum * buf).reshape(len(p), -1), muon.ns_steps).view_as(p)
            expected = w * (len(p) ** 0.5 / w.norm()) - cfg.muon_lr * update
            assert torch.allclose(p, expected, atol=1e-6), step
            q.data.copy_(p)  # the twin follows the Muon weights, so later SGD steps see the same network
