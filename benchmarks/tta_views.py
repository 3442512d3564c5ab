"""Which test-time views pay: trained weights scored under several view sets.

    python benchmarks/tta_views.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --weights runs/fast-bench/seed-0 runs/fast-bench/seed-1 runs/fast-bench/seed-2

Each model's test logits are computed once per elementary view (mirror or
not, times a translation of up to 2 pixels on each axis, borders reflected),
then every view set below is scored by averaging its views' logits with its
weights. Prints, per view set, how many views it costs and the test accuracy
of each model and their mean: the evidence for the recipe's `flip-shift`.

Then, per `--gates` value P, the recipe's views gated as `cifarcnn evaluate
--tta-gate P` gates them: an image whose single view gives its top class at
least P keeps that view alone. Prints the views run per image (the cost, of
six for the ungated set) and the accuracies.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cifarcnn import augment
from cifarcnn.datasets import MEAN, STD, load_cifar10
from cifarcnn.inference import autocast, input_dtype, load

View = tuple[bool, int, int]  # (mirror, rows moved, columns moved)
DIAG = [(1, 1), (-1, -1)]
DIAG4 = [*DIAG, (1, -1), (-1, 1)]
AXES = [(0, 1), (0, -1), (1, 0), (-1, 0)]


def view_set(shifts: list[tuple[int, int]], centre: float = 0.5) -> dict[View, float]:
    """The image and its mirror share `centre`; each shifted view (both mirrors) the rest."""
    views: dict[View, float] = {(f, 0, 0): centre / 2 for f in (False, True)}
    for f in (False, True):
        for dy, dx in shifts:
            views[(f, dy, dx)] = (1 - centre) / 2 / len(shifts)
    return views


VIEW_SETS: dict[str, dict[View, float]] = {
    "none (single view)": {(False, 0, 0): 1.0},
    "flip": view_set([], 1.0),
    "flip-shift (the recipe's: diagonal 1 px)": view_set(DIAG),
    "flip-shift, centre weight 1/3": view_set(DIAG, 1 / 3),
    "flip-shift, centre weight 2/3": view_set(DIAG, 2 / 3),
    "4 diagonal 1 px shifts": view_set(DIAG4),
    "4 axis 1 px shifts": view_set(AXES),
    "all 8 1 px shifts": view_set(DIAG4 + AXES),
    "all 8 1 px shifts, uniform": view_set(DIAG4 + AXES, 1 / 9),
    "diagonal 1 and 2 px": view_set([*DIAG, (2, 2), (-2, -2)]),
}


@torch.inference_mode()
def view_logits(path: str, images: torch.Tensor, views: set[View],
                batch_size: int = 1000) -> dict[View, torch.Tensor]:
    clf = load(path, device="cpu", tta=False)  # the precision it would be served in here
    model, precision = clf.model, clf.precision
    model.eval().to(memory_format=torch.channels_last)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    out: dict[View, torch.Tensor] = {}
    for flip, dy, dx in sorted(views):
        parts = []
        for i in range(0, len(images), batch_size):
            x = augment.normalize(augment.view(images[i:i + batch_size], flip, (dy, dx)),
                                  mean, std, True, input_dtype(precision))
            with autocast("cpu", precision):
                parts.append(model(x).float())
        out[(flip, dy, dx)] = torch.cat(parts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 archive or folder")
    ap.add_argument("--weights", nargs="+", required=True,
                    help="weights files, run directories or shipped model names")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--recipe-only", action="store_true",
                    help="score only the single view, flip and the recipe's six views (their "
                    "six views' logits, not every view set's 20)")
    ap.add_argument("--gates", type=float, nargs="*", default=[0.5, 0.7, 0.9],
                    metavar="P", help="TTA gates to score (default: 0.5 0.7 0.9)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_cifar10(a.data)
    images = torch.as_tensor(data.test_images)
    labels = torch.as_tensor(data.test_labels).long()
    sets = dict(list(VIEW_SETS.items())[:3]) if a.recipe_only else VIEW_SETS
    needed = {v for views in sets.values() for v in views}
    logits = [view_logits(w, images, needed) for w in a.weights]
    print(f"{'view set':<42} {'views':>5} " + " ".join(f"{f'model {i}':>8}"
                                                   for i in range(len(logits))) + "     mean")
    for name, views in sets.items():
        accs = []
        for per_view in logits:
            total = sum(w * per_view[v] for v, w in views.items())
            accs.append((total.argmax(1) == labels).float().mean().item() * 100)
        print(f"{name:<42} {len(views):>5} " + " ".join(f"{x:>7.2f}%" for x in accs)
              + f" {statistics.fmean(accs):>7.2f}%")
    recipe = VIEW_SETS["flip-shift (the recipe's: diagonal 1 px)"]
    print(f"\n{'flip-shift gated at':<36} {'views/image':>11} "
          + " ".join(f"{f'model {i}':>8}" for i in range(len(logits))) + "     mean")
    for gate in a.gates:
        accs, cost = [], []
        for per_view in logits:
            single = per_view[(False, 0, 0)]
            unsure = single.softmax(1).amax(1) < gate
            total = torch.where(unsure[:, None], sum(w * per_view[v] for v, w in recipe.items()),
                                single)
            accs.append((total.argmax(1) == labels).float().mean().item() * 100)
            cost.append(1 + (len(recipe) - 1) * unsure.float().mean().item())
        print(f"{gate:<36g} {statistics.fmean(cost):>11.2f} "
              + " ".join(f"{x:>7.2f}%" for x in accs) + f" {statistics.fmean(accs):>7.2f}%")


if __name__ == "__main__":
    main()
