"""Benchmark: advretrain's attacks against torchattacks, ART and foolbox on one CIFAR-10 model and 256 test images.

Prints, per library and attack: images/s, fooling ratio (prediction changed versus the clean prediction, over all
images), targeted success (C&W), median L2 over the images it fooled, and median L2 over the images every library
fooled. Needs the optional peers: `pip install foolbox adversarial-robustness-toolbox packaging scipy` and
`pip install --no-deps torchattacks` (it declares torchvision, which it never uses here).

    python benchmarks/attacks_vs_peers.py --checkpoint runs/small/model.safetensors --data cifar10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from advretrain import load_dataset, load_model
from advretrain.attacks import FGSM, PGD, CarliniWagnerL2, DeepFool
from advretrain.models import channels_last

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ours_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return DeepFool(steps=50, candidates=10, overshoot=0.02)(model, x, y).adversarial


def ours_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return CarliniWagnerL2(binary_search_steps=5, steps=100)(model, x, y).adversarial


def ours_cw_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return CarliniWagnerL2(binary_search_steps=5, steps=100, per_image_abort=True)(model, x, y).adversarial


def foolbox_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    import foolbox as fb

    attack = fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02, loss="logits")
    _, adv, _ = attack(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    return adv  # type: ignore[no-any-return]


def foolbox_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    import foolbox as fb

    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=5, steps=100, stepsize=0.01, confidence=0, initial_const=1e-3, abort_early=True
    )
    criterion = fb.criteria.TargetedMisclassification(t)
    _, adv, _ = attack(fb.PyTorchModel(model, bounds=(0, 1)), x, criterion, epsilons=None)
    return adv  # type: ignore[no-any-return]


def torchattacks_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    import torchattacks

    return torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)  # type: ignore[no-any-return]


def torchattacks_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    import torchattacks

    attack = torchattacks.CW(model, c=1, kappa=0, steps=100, lr=0.01)  # no binary search in torchattacks
    attack.set_mode_targeted_by_function(lambda images, labels: t)
    return attack(x, y)  # type: ignore[no-any-return]


def art_classifier(model: nn.Module) -> object:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10, clip_values=(0.0, 1.0)
    )


def art_deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from art.attacks.evasion import DeepFool as ArtDeepFool

    attack = ArtDeepFool(art_classifier(model), max_iter=50, epsilon=0.02, nb_grads=10, batch_size=128, verbose=False)
    return torch.from_numpy(attack.generate(x.numpy()))


def art_cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from art.attacks.evasion import CarliniL2Method

    attack = CarliniL2Method(
        art_classifier(model),
        targeted=True,
        max_iter=100,
        binary_search_steps=5,
        learning_rate=0.01,
        initial_const=1e-3,
        batch_size=128,
        verbose=False,
    )
    targets = torch.nn.functional.one_hot(t, 10).numpy()
    return torch.from_numpy(attack.generate(x.numpy(), y=targets))


RUNNERS: dict[str, dict[str, Runner]] = {
    "deepfool": {
        "advretrain": ours_deepfool,
        "foolbox": foolbox_deepfool,
        "torchattacks": torchattacks_deepfool,
        "art": art_deepfool,
    },
    "cw": {
        "advretrain": ours_cw,
        "advretrain-per-image": ours_cw_per_image,
        "foolbox": foolbox_cw,
        "torchattacks": torchattacks_cw,
        "art": art_cw,
    },
}


def gradient_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> float:
    """Seconds for `passes` forward+backward passes to the input: the floor for FGSM (1) and PGD (steps + 1).

    In the layout the attacks run the model in (channels-last), so that the ratio counts only their own overhead.
    """
    started = time.perf_counter()
    with channels_last(model):
        for _ in range(passes):
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--attacks", default="deepfool,cw")
    parser.add_argument("--libraries", default="advretrain,advretrain-per-image,foolbox,torchattacks,art")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="hand every library the model in channels-last layout (advretrain's attacks switch to it themselves)",
    )
    args = parser.parse_args()
    model = load_model(args.checkpoint).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_dataset(args.data, "test").stratified(args.images // 10 + 1).subset(torch.arange(args.images))
    x, y = test.images.float() / 255, test.labels
    with torch.no_grad():
        logits = model(x)
    clean, least_likely = logits.argmax(1), logits.argmin(1)
    layout = "channels-last" if args.channels_last else "as loaded (contiguous)"
    print(
        f"model accuracy on these {len(y)} images: {(clean == y).float().mean():.3f}; "
        f"threads {torch.get_num_threads()}; peers get the model {layout}"
    )
    for attack in args.attacks.split(","):
        rows, fooled_by = [], {}
        for library in [name for name in args.libraries.split(",") if name in RUNNERS[attack]]:
            started = time.perf_counter()
            try:
                adv = RUNNERS[attack][library](model, x, y, least_likely).detach().float()
            except ImportError as exc:
                print(f"{attack:9s} {library:13s} skipped ({exc})")
                continue
            seconds = time.perf_counter() - started
            with torch.no_grad():
                pred = model(adv).argmax(1)
            l2 = (adv - x).flatten(1).norm(dim=1)
            fooled = pred != clean
            fooled_by[library] = (fooled, l2)
            rows.append(
                (
                    library,
                    len(y) / seconds,
                    fooled.float().mean().item(),
                    (pred == least_likely).float().mean().item(),
                    l2[fooled].median().item(),
                )
            )
        common = torch.stack([f for f, _ in fooled_by.values()]).all(0)
        print(
            f"\n{attack}: library, images/s, fooling ratio, targeted success, median L2 (fooled), "
            f"median L2 on the {int(common.sum())} images all fooled"
        )
        for library, speed, fr, targeted, med in rows:
            common_med = fooled_by[library][1][common].median().item()
            print(f"  {library:13s} {speed:8.1f} {fr:8.3f} {targeted:8.3f} {med:8.4f} {common_med:8.4f}")
    for name, attack_obj, passes in (("fgsm", FGSM(), 2), ("pgd", PGD(), 12)):
        started = time.perf_counter()
        attack_obj(model, x, y)
        seconds = time.perf_counter() - started
        floor = gradient_cost(model, x, y, passes)
        print(
            f"\n{name}: {seconds:.3f} s for {len(y)} images; {passes} forward+backward passes take {floor:.3f} s "
            f"({seconds / floor:.2f}x the floor)"
        )


if __name__ == "__main__":
    main()
