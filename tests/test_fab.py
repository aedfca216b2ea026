"""FAB-T proved on behaviour: its projections are the closed-form smallest steps onto a hyperplane within the box, on a
linear model it crosses the boundary at η times the exact minimal distance, it never counts a perturbation beyond ε,
and inside AutoAttack it is the third member."""

from __future__ import annotations

import pytest
import torch
from test_attacks import tiny_cnn
from torch import nn

from advretrain.attacks import FABT, AttackError, AutoAttack
from advretrain.attacks.fab import projection_l2, projection_linf


def test_projections_inside_the_box_are_the_closed_form_smallest_steps() -> None:
    # far from the box's faces the constraint t + d in [0,1] is slack: the L2 step is −c·w/‖w‖², the L-inf step
    # −c·sign(w)/‖w‖₁, with c = w·t − b
    t = torch.full((4, 50), 0.5)
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    b = (w * t).sum(1) + torch.tensor([0.01, -0.02, 0.005, 0.0])
    c = ((w * t).sum(1) - b)[:, None]
    torch.testing.assert_close(projection_l2(t, w, b), -c * w / (w**2).sum(1, keepdim=True))
    torch.testing.assert_close(projection_linf(t, w, b), -c * w.sign() / w.abs().sum(1, keepdim=True))


@pytest.mark.parametrize("projection", [projection_linf, projection_l2])
def test_projections_reach_the_plane_and_stay_in_the_box(projection: object) -> None:
    generator = torch.Generator().manual_seed(1)
    t, w = torch.rand(32, 100, generator=generator), torch.randn(32, 100, generator=generator)
    b = (w * torch.rand(32, 100, generator=generator)).sum(1)  # a plane that crosses the box: always reachable
    d = projection(t, w, b)  # type: ignore[operator]
    assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
    torch.testing.assert_close((w * (t + d)).sum(1), b, atol=1e-3, rtol=1e-4)


class Linear(nn.Module):
    """Two classes split by a plane: z = W·x + c, so the exact minimal distance to the boundary is known."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        torch.manual_seed(3)
        nn.init.normal_(self.fc.weight, std=0.05)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.flatten(1))
        return out


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_on_a_linear_model_fab_crosses_at_eta_times_the_minimal_distance(norm: str) -> None:
    model = Linear().eval()
    x = 0.4 + 0.2 * torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # far from the box's faces
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        margin = (logits.gather(1, y[:, None]) - logits.gather(1, 1 - y[:, None])).squeeze(1)  # N, > 0
        w = model.fc.weight[1] - model.fc.weight[0]
        exact = margin / (w.abs().sum() if norm == "linf" else w.norm())  # the dual norm of the boundary's normal
    result = FABT(eps=10.0 if norm == "l2" else 1.0, norm=norm, steps=5)(model, x, y)  # type: ignore[arg-type]
    delta = (result.adversarial - x).flatten(1)
    found = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert result.success.all()
    torch.testing.assert_close(found, 1.05 * exact, rtol=1e-3, atol=1e-5)  # η = 1.05 past the plane
    # ε below the minimal distance: no perturbation within it can fool, and none may be counted
    tight = FABT(eps=float(exact.min()) * 0.99, norm=norm, steps=20)(model, x, y)  # type: ignore[arg-type]
    assert not tight.success.any() and torch.equal(tight.adversarial, x)


def test_fab_t_keeps_budget_range_inputs_and_mode_and_counts_only_within_eps() -> None:
    model = tiny_cnn(classes=4).train()
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 4, (12,))
    x_copy = x.clone()
    eps = 0.03
    result = FABT(eps=eps, steps=30, targets=3)(model, x, y)
    assert model.training and torch.equal(x, x_copy)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert ((result.adversarial - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()
    with torch.no_grad():
        model.eval()
        fooled = model(result.adversarial).argmax(1) != y
    assert torch.equal(result.success, fooled)


def test_autoattack_runs_the_standard_four_in_order_and_takes_a_subset() -> None:
    assert [m.name for m in AutoAttack().attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    custom = AutoAttack(members=("apgd-ce", "fab-t"))
    assert custom.members == ("apgd-ce", "fab-t") and isinstance(custom.attacks[1], FABT)
    with pytest.raises(AttackError, match="members must be distinct"):
        AutoAttack(members=("apgd-ce", "apgd-ce"))
