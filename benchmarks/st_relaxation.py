"""Does each mechanism's straight-through relaxation make a stronger attack? The same gradient attack with and
without it, paired on the same images and the same random starts.

For every gated model and dynamic-ViT peer (deterministic decisions), at each eps: PGD-10 (random start, step eps/4)
with plain gradients (`pgd`: the hard decisions' gradient, zero through the choice itself) and through the
relaxation (`bpda-pgd`), each with --seeds random starts, and APGD-CE (`apgd-ce` / `apgd-ce-st`, 100 iterations),
on the first --n images of the embedded set. Per model x eps x attack: robust accuracy of each gradient, their
paired difference per image (an image counts as robust under a gradient when it survives every seed), and the
two-sided exact McNemar p. And per model, how the relaxation changes the input gradient of the clean images' cross-entropy
(median over images of the L1 ratio relaxed / plain, cosine, share of equal signs). Each cell's per-image results
are saved under --out (resumable: a saved cell is not rerun).

    python benchmarks/st_relaxation.py [--eps 1/255,2/255,4/255] [--n 100] [--seeds 3] [--out results/relaxation]
        [--rows REGEX] [--only-table]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

#: (row, model, checkpoint or None, model arguments): deterministic decisions for every row.
ROWS = [
    ("MIA-Former b05", "mia_vit_fmnist", "mia_vit_fmnist_b05", {}),
    ("AdaViT b05", "adavit_vit_fmnist", "adavit_vit_fmnist_b05", {}),
    ("A-ViT b05", "avit_vit_fmnist", "avit_vit_fmnist_b05", {}),
    ("DynamicViT b05", "dynamicvit_vit_fmnist", "dynamicvit_vit_fmnist_b05", {}),
    ("ToMe r = 8", "tome_vit_fmnist", None, {"r": 8}),
    ("ToMe b05 (fine-tuned, r = 8)", "tome_vit_fmnist", "tome_vit_fmnist_b05", {}),
    ("EViT b05 (fine-tuned, keep 0.47)", "evit_vit_fmnist", "evit_vit_fmnist_b05", {}),
]
#: (attack, its straight-through twin, random starts): PGD-10 over --seeds starts, APGD-CE once (its own start).
ATTACKS = [("pgd", "bpda-pgd", True), ("apgd-ce", "apgd-ce-st", False)]


def cell_path(out: Path, row: tuple, n: int, eps: str | None = None, attack: str = "", seed: int = 0) -> Path:
    """The file of one saved cell under `out`: an attack's (eps given) or the row's gradient comparison."""
    name = re.sub(r"[^a-z0-9]+", "-", row[0].lower()).strip("-")
    cell = f"{eps.replace('/', '_')}-{attack}-seed{seed}" if eps else "gradient"
    return out / f"{name}-{cell}-n{n}.json"


def model_and_images(row: tuple, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The row's model, deterministic decisions, and the first n embedded images with their labels."""
    from miarobust.data import Geometry, embedded
    from miarobust.models import create

    _, model_name, checkpoint, kwargs = row
    model = create(model_name, checkpoint=checkpoint, **kwargs)
    model.set_gate_mode("deterministic")
    data = embedded(None, "test", Geometry.of(model))
    x = torch.stack([data[i][0] for i in range(n)])
    return model, x, torch.tensor([int(data[i][1]) for i in range(n)])


def gradient_change(row: tuple, n: int) -> dict[str, float]:
    """Medians over the images of the relaxed / plain input gradient of cross-entropy: L1 ratio, cosine, equal signs."""
    import torch.nn.functional as F

    from miarobust.models.normalize import Normalized

    model, x, y = model_and_images(row, n)
    wrapped = Normalized(model).eval()
    grads = []
    for st in (False, True):
        model.straight_through = st
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(wrapped(xr), y, reduction="sum"), xr)[0].flatten(1))
    model.straight_through = False
    plain, relaxed = grads
    return {"l1_ratio": (relaxed.abs().sum(1) / plain.abs().sum(1).clamp_min(1e-30)).median().item(),
            "cosine": F.cosine_similarity(plain, relaxed, 1).median().item(),
            "equal_signs": (plain.sign() == relaxed.sign()).float().mean(1).median().item()}


def run_cell(row: tuple, eps: str, attack: str, seed: int, n: int) -> list[bool]:
    """Per image: still correct after `attack` at `eps` with random seed `seed`."""
    import miarobust

    model, x, y = model_and_images(row, n)
    options = {"steps": 10} if attack in ("pgd", "bpda-pgd") else {}
    torch.manual_seed(seed)
    atk = miarobust.Attack(attack, model, eps=eps, **options)
    correct = []
    for i in range(0, n, 50):
        adv = atk(x[i : i + 50], y[i : i + 50])
        with torch.no_grad():
            correct += (atk.victim.model(adv).argmax(1) == y[i : i + 50]).tolist()
    return correct


def main() -> int:
    from tqdm import tqdm

    from miarobust.results import write_json
    from miarobust.stats import mcnemar_p

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", default="1/255,2/255,4/255")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="results/relaxation")
    ap.add_argument("--rows", default=".", help="regex on the row names")
    ap.add_argument("--only-table", action="store_true", help="print the table from saved cells, run nothing")
    args = ap.parse_args()
    if args.n < 1 or args.seeds < 1:
        sys.exit("--n and --seeds must be >= 1")
    out = Path(args.out)
    rows = [r for r in ROWS if re.search(args.rows, r[0])]
    eps_list = [e.strip() for e in args.eps.split(",") if e.strip()]
    cells = [(row, eps, atk, seed) for row in rows for eps in eps_list for pair in ATTACKS for atk in pair[:2]
             for seed in range(args.seeds if pair[2] else 1)]
    for row in rows if not args.only_table else ():
        path = cell_path(out, row, args.n)
        if not path.exists():  # written whole or not at all, as every cell
            write_json(path, {"row": row[0], "n": args.n, **gradient_change(row, args.n)})
    todo = [(row, eps, atk, seed) for row, eps, atk, seed in cells
            if not cell_path(out, row, args.n, eps, atk, seed).exists()]
    for row, eps, atk, seed in tqdm(todo, desc="relaxation cells", unit="cell") if todo and not args.only_table else ():
        write_json(cell_path(out, row, args.n, eps, atk, seed),
                   {"row": row[0], "eps": eps, "attack": atk, "seed": seed, "n": args.n,
                    "correct": run_cell(row, eps, atk, seed, args.n)})
    print(f"Robust % on the first {args.n} embedded images, deterministic decisions; PGD-10 over {args.seeds} random "
          "starts (robust: under every start; in brackets each start's), APGD-CE once; plain gradient against the "
          "relaxation's, paired per image (two-sided exact McNemar):\n")
    print("| model | eps | attack | plain gradient | through the relaxation | images only the relaxation breaks / "
          "only plain breaks | p |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for eps in eps_list:
            for plain, st, seeded in ATTACKS:
                runs = {}
                for atk in (plain, st):
                    found = [cell_path(out, row, args.n, eps, atk, s) for s in range(args.seeds if seeded else 1)]
                    if not all(f.exists() for f in found):
                        break
                    runs[atk] = [json.loads(f.read_text())["correct"] for f in found]
                if len(runs) < 2:
                    print(f"| {row[0]} | {eps} | {plain} | - | - | - | - |")
                    continue
                a, b = ([all(c) for c in zip(*runs[k])] for k in (plain, st))
                only_st = sum(x and not y for x, y in zip(a, b))
                only_plain = sum(y and not x for x, y in zip(a, b))
                detail = {k: f" [{', '.join(f'{100 * sum(r) / len(r):.0f}' for r in v)}]" if len(v) > 1 else ""
                          for k, v in runs.items()}
                print(f"| {row[0]} | {eps} | {plain} / {st} | {100 * sum(a) / len(a):.1f}{detail[plain]} | "
                      f"{100 * sum(b) / len(b):.1f}{detail[st]} | {only_st} / {only_plain} | "
                      f"{mcnemar_p(only_plain, only_st):.3g} |")
    print(f"\nThe relaxation's input gradient against the plain one, medians over the first {args.n} images' "
          "cross-entropy:\n")
    print("| model | L1 norm, relaxed / plain | cosine | signs equal |")
    print("|---|---|---|---|")
    for row in rows:
        path = cell_path(out, row, args.n)
        g = json.loads(path.read_text()) if path.exists() else None
        print(f"| {row[0]} | " + (f"{g['l1_ratio']:.2f} | {g['cosine']:.2f} | {100 * g['equal_signs']:.0f}% |" if g
                                  else "- | - | - |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
