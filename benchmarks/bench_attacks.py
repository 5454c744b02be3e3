"""Speed and robust accuracy of miarobust's attacks against torchattacks called directly, in one run.

On the same model, images, eps and steps:

1. `pgd` (miarobust.attacks.build_attack) vs torchattacks.PGD: the same attack underneath, so the adversarial
   images must be identical and miarobust's overhead small (goal: <= 5% slower).
2. `eot-pgd` with K = 8 (one batched pass of B*K rows through attacks/eot.EOT per step) vs
   torchattacks.EOTPGD(eot_iter=8) (K separate passes per step, gradients summed) on the stochastic
   MIA-Former. The objectives differ slightly (ours: cross-entropy of the mean softmax, -log E[p_y];
   theirs: mean of the per-draw cross-entropies), so robust accuracy should agree within the intervals,
   not exactly.
3. EOT chunk size (rows per forward, attacks/eot.default_chunk): time of one EOT forward+backward (K = 8)
   per chunk size on this machine.

Calls alternate between the two sides and the median of --reps repetitions is reported, so drift of a
shared machine cancels; on a GPU (--device cuda) each timed call ends with a synchronize and one untimed
warm-up call of each side (each chunk size) comes first. Robust accuracy of a stochastic model is the mean over --eval-samples gate draws
per image, as in the evaluator, with a 95% Wilson interval. Prints markdown tables.

    python benchmarks/bench_attacks.py [-n 200] [--batch-size 100] [--steps 10] [--reps 3] [--threads 2] [--mia-checkpoint NAME]
        [--chunks 64,128,256,512,1024] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import miarobust.models  # noqa: F401  (registers the models)
from miarobust.attacks import AttackConfig, Victim, build_attack, get_attack
from miarobust.attacks.eot import EOT, default_chunk
from miarobust.data import Geometry, load_dataset
from miarobust.models import create
from miarobust.models.latency import synchronize
from miarobust.models.normalize import Normalized
from miarobust.models.registry import weights_file
from miarobust.stats import wilson

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load(name: str, device: torch.device, gate_mode: str | None = None,
         checkpoint: str | None = None) -> tuple[Normalized, torch.nn.Module]:
    random = checkpoint is None and weights_file(name) is None  # a timing needs no trained weights
    model = create(name, checkpoint=checkpoint, gate_mode=gate_mode, pretrained=not random)
    if random:
        print(f"note: {name} has no weights here; timing a randomly initialised model")
    net = Normalized(model).eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, model


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size)))


def run(attack: Attack, data: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> tuple[float, torch.Tensor]:
    """Seconds and adversarial images of `attack` over all batches, seeded per batch."""
    out = []
    device = data[0][0].device
    synchronize(device)
    t0 = time.perf_counter()
    for b, (x, y) in enumerate(data):
        torch.manual_seed(seed + b)
        out.append(attack(x, y).detach())
    synchronize(device)
    return time.perf_counter() - t0, torch.cat(out)


@torch.no_grad()
def correct(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-image correctness, the mean over `draws` forwards (gate draws of a stochastic model)."""
    return torch.stack([(net(x).argmax(1) == y).float() for _ in range(draws)]).mean(0)


def compare(label: str, ours: Attack, theirs: Attack, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            size: int, reps: int, draws: int) -> dict:
    """Median seconds of each side over alternating repetitions, robust accuracy of each, equality of x_adv."""
    data = batches(x, y, size)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    advs: dict[str, torch.Tensor] = {}
    if x.device.type == "cuda":  # kernels, cuBLAS handles and the caching allocator warm up outside the timing
        for fn in (ours, theirs):
            run(fn, data[:1], seed=1000)
    for r in range(reps):
        order = [("ours", ours), ("theirs", theirs)] if r % 2 == 0 else [("theirs", theirs), ("ours", ours)]
        for side, fn in order:
            seconds, advs[side] = run(fn, data, seed=1000)
            times[side].append(seconds)
    torch.manual_seed(0)
    clean = correct(net, x, y, draws)
    acc = {side: torch.minimum(clean, correct(net, adv, y, draws)) for side, adv in advs.items()}
    return {"label": label, "ours": statistics.median(times["ours"]), "theirs": statistics.median(times["theirs"]),
            "acc": {s: (float(a.mean()), wilson(float(a.sum()), len(a))) for s, a in acc.items()},
            "identical": bool(torch.equal(advs["ours"], advs["theirs"]))}


def chunk_sweep(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, chunks: list[int], reps: int) -> dict:
    """Median seconds of one EOT forward+backward (k draws) per chunk size."""
    def once(c: int) -> float:
        xa = x.clone().requires_grad_(True)
        synchronize(x.device)
        t0 = time.perf_counter()
        torch.autograd.grad(torch.nn.functional.nll_loss(EOT(net, k, c)(xa), y), xa)
        synchronize(x.device)
        return time.perf_counter() - t0

    if x.device.type == "cuda":  # as in compare: one untimed round warms the GPU up
        for c in chunks:
            once(c)
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for r in range(reps):
        for c in chunks if r % 2 == 0 else chunks[::-1]:
            times[c].append(once(c))
    return {c: statistics.median(t) for c, t in times.items()}


def fmt_acc(a: tuple[float, tuple[float, float]]) -> str:
    return f"{a[0]:.3f} [{a[1][0]:.3f}, {a[1][1]:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_fmnist", help="model for pgd vs torchattacks.PGD")
    ap.add_argument("--mia-model", default="mia_vit_fmnist", help="stochastic model for eot-pgd vs EOTPGD")
    ap.add_argument("--mia-checkpoint", default=None, help="its weights, a file or shipped name (default: its default)")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eot", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=10, help="gate draws per image for accuracy")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", default="64,128,256,512,1024", help="EOT rows per forward to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import torchattacks

    net, model = load(a.model, device)
    data = load_dataset("embedded", Geometry.of(model))
    x = torch.stack([data[i][0] for i in range(a.n)]).to(device)
    y = torch.tensor([data[i][1] for i in range(a.n)]).to(device)

    cfg = AttackConfig(eps=a.eps, steps=a.steps)
    ours = build_attack(get_attack("pgd", cfg), Victim(net), cfg)
    theirs = torchattacks.PGD(net, eps=a.eps, alpha=cfg.step_size, steps=a.steps, random_start=True)
    rows = [compare("pgd vs torchattacks.PGD", ours, theirs, net, x, y, a.batch_size, a.reps, 1)]

    mia_net, mia = load(a.mia_model, device, gate_mode="stochastic", checkpoint=a.mia_checkpoint)
    chunk = default_chunk(device)
    ecfg = AttackConfig(eps=a.eps, steps=a.steps, eot=a.eot, eot_chunk=chunk)
    ours = build_attack(get_attack("eot-pgd", ecfg), Victim(mia_net, mia), ecfg)
    theirs = torchattacks.EOTPGD(mia_net, eps=a.eps, alpha=ecfg.step_size, steps=a.steps, eot_iter=a.eot,
                                 random_start=True)
    rows.append(compare(f"eot-pgd K={a.eot} (chunk {chunk}) vs torchattacks.EOTPGD(eot_iter={a.eot})", ours, theirs,
                        mia_net, x, y, a.batch_size, a.reps, a.eval_samples))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {a.threads} threads"
    print(f"\n{a.n} images of embedded Fashion-MNIST, Linf eps {a.eps:.4f}, {a.steps} steps, batch {a.batch_size}, "
          f"{where}, median of {a.reps}\n")
    print("| attack | miarobust s | torchattacks s | ratio | robust acc miarobust | robust acc torchattacks | same x_adv |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['ours']:.2f} | {r['theirs']:.2f} | {r['ours'] / r['theirs']:.3f} | "
              f"{fmt_acc(r['acc']['ours'])} | {fmt_acc(r['acc']['theirs'])} | {'yes' if r['identical'] else 'no'} |")

    chunks = [int(c) for c in a.chunks.split(",")]
    xs, ys = x[:a.batch_size], y[:a.batch_size]
    sweep = chunk_sweep(mia_net, xs, ys, a.eot, chunks, a.reps)
    best = min(sweep, key=sweep.get)
    print(f"\nEOT forward+backward, K={a.eot}, batch {len(xs)} ({len(xs) * a.eot} rows), {a.mia_model} stochastic\n")
    print("| chunk (rows per forward) | ms | vs fastest |")
    print("| --- | --- | --- |")
    for c, s in sweep.items():
        print(f"| {c} | {s * 1000:.1f} | {s / sweep[best]:.2f} |")
    print(f"\nfastest chunk on this machine: {best} (attacks/eot.default_chunk for {device.type}: {chunk})")


if __name__ == "__main__":
    main()
