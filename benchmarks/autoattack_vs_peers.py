"""Benchmark: advretrain's APGD-CE, APGD-T and AutoAttack against torchattacks' (3.5.1) and the reference
implementation's (fra31/auto-attack), on one model, the same correctly classified CIFAR-10 test images and ε.

Prints, per library and attack: robust accuracy (the share of the images the attack leaves correctly classified),
seconds and images/s (advretrain's AutoAttack with and without its FAB-T member); then the reference's AutoAttack
member by member (robust accuracy after APGD-CE, APGD-T, FAB-T, Square), which says what FAB-T adds on this model.

Two settings the issue asks for: an undefended model at a small budget (`--eps 2`) and an adversarially trained one
at the field's 8/255 (`--robust --eps 8`). Without --checkpoint the model is the `small` CNN trained on the bundled
sample with the default run's recipe (with --robust: with its FGSM-RS reference defence, ε 8/255 at step ε/2).

Peers (never committed): `pip install --no-deps torchattacks` (plus scipy, tqdm), and the reference from a snapshot
of github.com/fra31/auto-attack: `pip install --no-deps ./auto-attack`.

    python benchmarks/autoattack_vs_peers.py --eps 2 --images 200
    python benchmarks/autoattack_vs_peers.py --robust --eps 8 --images 200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from advretrain import ExperimentConfig, build_config, build_model, load_dataset, load_model, train
from advretrain.attacks import APGD, APGDT, AutoAttack
from advretrain.metrics import predict

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def model_for(checkpoint: str | None, robust: bool) -> nn.Module:
    if checkpoint:
        return load_model(checkpoint)
    cfg = build_config(ExperimentConfig, "default")
    recipe = cfg.train.model_copy(update={"adversarial": cfg.defence.training() if robust else None})
    torch.manual_seed(0)
    data = load_dataset("cifar10-sample", "train").stratified(150)
    return train(build_model("small", 10), data, recipe, torch.device("cpu"), progress=False).model.eval()


def ours(eps: float, steps: int, queries: int) -> dict[str, Runner]:
    def run(attack: object) -> Runner:
        return lambda model, x, y: attack(model, x, y).adversarial  # type: ignore[operator]

    return {
        "apgd-ce": run(APGD(eps=eps, steps=steps)),
        "apgd-t": run(APGDT(eps=eps, steps=steps)),
        "autoattack": run(AutoAttack(eps=eps, steps=steps, queries=queries)),
        "autoattack without fab-t": run(
            AutoAttack(eps=eps, steps=steps, queries=queries, members=("apgd-ce", "apgd-t", "square"))
        ),
    }


def torchattacks_runners(eps: float, steps: int) -> dict[str, Runner]:
    import torchattacks

    return {
        "apgd-ce": lambda m, x, y: torchattacks.APGD(m, eps=eps, steps=steps, loss="ce", seed=0)(x, y),
        "apgd-t": lambda m, x, y: torchattacks.APGDT(m, eps=eps, steps=steps, n_classes=10, seed=0)(x, y),
        "autoattack": lambda m, x, y: torchattacks.AutoAttack(m, eps=eps, version="standard", n_classes=10, seed=0)(
            x, y
        ),
    }


def reference_runners(eps: float, steps: int) -> dict[str, Runner]:
    from autoattack import AutoAttack as ReferenceAutoAttack
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return APGDAttack(model, n_iter=steps, eps=eps, seed=0, device="cpu").perturb(x, y)  # type: ignore[no-any-return]

    def apgd_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack = APGDAttack_targeted(model, n_iter=steps, eps=eps, seed=0, device="cpu")
        return attack.perturb(x, y)  # type: ignore[no-any-return]

    def whole(members: list[str] | None) -> Runner:
        def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            version = "standard" if members is None else "custom"
            adversary = ReferenceAutoAttack(model, eps=eps, version=version, seed=0, device="cpu", verbose=False)
            if members is not None:
                adversary.attacks_to_run = members
            return adversary.run_standard_evaluation(x, y, bs=len(y))  # type: ignore[no-any-return]

        return run

    return {
        "apgd-ce": apgd,
        "apgd-t": apgd_t,
        "autoattack": whole(None),
        "autoattack without fab-t": whole(["apgd-ce", "apgd-t", "square"]),
    }


def member_by_member(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> list[tuple[str, float]]:
    """The reference's standard ensemble run one member at a time on what the previous left: robust accuracy after
    each, so FAB-T's contribution is measured, not assumed."""
    from autoattack import AutoAttack as ReferenceAutoAttack

    adversary = ReferenceAutoAttack(model, eps=eps, version="standard", seed=0, device="cpu", verbose=False)
    members = {
        "apgd-ce": adversary.apgd,
        "apgd-t": adversary.apgd_targeted,
        "fab-t": adversary.fab,
        "square": adversary.square,
    }
    robust = torch.ones(len(y), dtype=torch.bool)
    out = []
    adversary.apgd.loss, adversary.fab.targeted = "ce", True  # as run_standard_evaluation sets them
    for name, attack in members.items():
        todo = robust.nonzero().squeeze(1)
        if todo.numel():
            adversarial = attack.perturb(x[todo], y[todo])
            fooled = predict(model, adversarial).argmax(1) != y[todo]
            robust[todo[fooled]] = False
        out.append((name, float(robust.float().mean())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--robust", action="store_true", help="the FGSM-RS adversarially trained model")
    parser.add_argument("--eps", type=float, default=8, help="L-inf budget in 1/255 units")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--libraries", default="advretrain,torchattacks,reference")
    args = parser.parse_args()
    eps = args.eps / 255
    model = model_for(args.checkpoint, args.robust)
    test = load_dataset("cifar10-sample", "test")
    x, y = test.images.float() / 255, test.labels
    correct = predict(model, x).argmax(1) == y
    x, y = x[correct][: args.images], y[correct][: args.images]
    accuracy = float(correct.float().mean())
    print(f"{len(y)} correctly classified test images (clean accuracy {accuracy:.4f}), eps {args.eps}/255")
    libraries = {
        "advretrain": lambda: ours(eps, args.steps, args.queries),
        "torchattacks": lambda: torchattacks_runners(eps, args.steps),
        "reference": lambda: reference_runners(eps, args.steps),
    }
    for library in args.libraries.split(","):
        for name, runner in libraries[library]().items():
            started = time.perf_counter()
            try:
                adversarial = runner(model, x, y)
            except Exception as exc:  # a peer that crashes (torchattacks' FAB on some models) is reported, not fatal
                print(f"{library:12s} {name:26s} failed: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            seconds = time.perf_counter() - started
            adversarial = adversarial.detach()  # torchattacks' AutoAttack returns a tensor that still requires grad
            linf = float((adversarial - x).abs().amax())
            robust = float((predict(model, adversarial).argmax(1) == y).float().mean())
            print(
                f"{library:12s} {name:26s} robust accuracy {robust:.4f}  {seconds:7.1f} s  {len(y) / seconds:7.2f} "
                f"img/s  max L-inf {linf * 255:.2f}/255"
            )
    if "reference" in args.libraries:
        steps = ", ".join(f"after {name} {robust:.4f}" for name, robust in member_by_member(model, x, y, eps))
        print(f"reference member by member: {steps}")


if __name__ == "__main__":
    main()
