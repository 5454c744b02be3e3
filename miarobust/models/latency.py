"""A measured model of MIA-Former's batch-1 inference time, for latency-aware training and reports.

MACs predict wall time only where arithmetic dominates. At batch 1 on a small model each kernel costs a
fixed 10-50 us on a CPU whatever its size, so a block's time is mostly fixed: dropping tokens or heads
saves little, and dropping any token adds a gather and a scatter, while skipping the block saves all of
it. A controller trained against MACs then saves compute but not time. This module times the model's own
sliced batch-1 forward with forced gate decisions on the device at hand and fits

    seconds(image) = fixed + sum over blocks run of (block + token * n + head * h + head_token * h * n
                                                      + gather * [some token dropped])

with n the block's kept tokens and h its kept heads (q/k/v, the attention and the projection grow with
h * n, the MLP with n), where `fixed` is everything that runs whatever the gates say (patch embedding,
every decision head, final norm, classifier). The same expression on gate tensors is differentiable in them, like `mia_macs`, so
training can hold the predicted time ratio (against the static model timed in the same session) to a
budget: the latency-aware counterpart of the MACs budget (as hardware-aware NAS uses a per-layer latency
table instead of FLOPs). The gather term enters through 1 - prod(token gates): its gradient pushes back a
block's last dropped token only, so avoiding gathers is learned mostly through the REINFORCE reward.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from miarobust.errors import UserError
from miarobust.models.flops import VitDims
from miarobust.results import write_json


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per image at batch 1 on one device: the static model's time and the fitted coefficients."""

    static: float
    fixed: float
    block: float
    token: float
    head: float
    gather: float
    head_token: float = 0.0  # tables written before this term was fitted lack it
    device: str = "cpu"
    threads: int = 1
    residual: float = 0.0  # root-mean-square error of the fit over the timed structures, in seconds
    model: str = ""  # the dimensions it was measured on (`dims_key`); empty in tables written before

    def __post_init__(self) -> None:
        numbers = [getattr(self, f) for f in ("static", "fixed", "block", "token", "head", "gather", "head_token", "residual")]
        if not all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in numbers) or self.static <= 0:
            raise ValueError("every time must be a finite number >= 0, the static model's > 0")
        if type(self.threads) is not int or not isinstance(self.device, str) or not isinstance(self.model, str):
            raise ValueError("threads must be an integer, device and model strings")

    def seconds(self, blocks: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) predicted seconds from gates (differentiable in them). Shapes as `flops.mia_macs`: blocks
        (B, L), heads (B, L, H), tokens (B, L, N) with prefix tokens included."""
        n, h = tokens.sum(-1), heads.sum(-1)
        dropped = 1 - tokens.prod(-1)  # 1 where the block drops any token: it gathers and scatters
        per_block = self.block + self.token * n + self.head * h + self.head_token * h * n + self.gather * dropped
        return self.fixed + (blocks * per_block).sum(-1)

    def ratio(self, blocks: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) predicted time relative to the static model's."""
        return self.seconds(blocks, heads, tokens) / self.static

    def save(self, path: str | Path) -> None:
        write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | Path, fix: str = "pass one, or leave --latency-table out to measure a new one") -> LatencyTable:
        """The table in `path`; a missing or invalid file is a UserError ending in `fix` (what to do)."""
        try:
            fields = json.loads(Path(path).read_text())
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            return cls(**fields)
        except FileNotFoundError:
            raise UserError(f"latency table {path} not found: give an existing file, or leave the option "
                            "out to measure one.") from None
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"latency table {path} is not a latency.json of `miarobust train --cost latency` "
                            f"({e}): {fix}.") from None

    @classmethod
    def measure(cls, mia: nn.Module, static: nn.Module, reps: int = 15, device: str | torch.device = "cpu") -> LatencyTable:
        """Time `static` and the MIA model `mia` (deep-copied: the originals are untouched) at batch 1 on
        random input, the MIA model with forced decisions over a grid of structures (blocks run, heads
        and tokens kept), and fit the coefficients by least squares. Each figure is the median of `reps`
        rounds over all structures (drift cancels); in a round each structure is timed on its second of
        two runs in a row, since interleaving many structures would otherwise time them on cold caches."""
        import copy

        dims = VitDims.of(mia)
        mia = copy.deepcopy(mia).to(device).eval().set_gate_mode("deterministic")
        mia.execution, mia.straight_through = "auto", False  # the sliced inference path, whatever the caller set
        static = copy.deepcopy(static).to(device).eval()
        x = torch.randn(1, mia.patch_embed.proj.in_channels, *mia.patch_embed.img_size, device=device)
        n, h, d = dims.num_patches, dims.num_heads, dims.depth
        grid = [(0, h, n)] + [(k, hk, nk) for k in sorted({d, max(1, d // 2)}) for hk in sorted({1, max(1, h // 2), h})
                              for nk in sorted({1, max(1, n // 2), max(1, n - 1), n})]
        forced = fix_controller(mia)
        times: list[list[float]] = [[] for _ in range(len(grid) + 1)]
        with torch.inference_mode():
            for r in tqdm(range(reps + 1), desc="latency table", unit="round", leave=False):  # a warm-up round
                for i, structure in enumerate([None, *grid]):
                    model = static if structure is None else mia
                    if structure is not None:
                        forced(*structure)
                    model(x)  # each timing on warm caches: a run right after the same one, as in a steady stream
                    t = timed(model, x)
                    if r >= 1:
                        times[i].append(t)
        med = [statistics.median(t) for t in times]
        t_static, t_none, rest = med[0], med[1], med[2:]
        # per block run: block + token * n + head * h + head_token * h * n + gather * [tokens dropped],
        # n the kept tokens (prefix included), h the kept heads
        rows = np.array([[1.0, nk + dims.num_prefix, hk, hk * (nk + dims.num_prefix), float(nk < n)]
                         for _, hk, nk in grid[1:]])
        per_block = np.array([(t - t_none) / k for (k, _, _), t in zip(grid[1:], rest)])
        coef = _nonnegative_lstsq(rows, per_block)
        predicted = t_none + np.array([k for k, _, _ in grid[1:]]) * (rows @ coef)
        residual = float(np.sqrt(np.mean((predicted - np.array(rest)) ** 2)))
        return cls(static=t_static, fixed=t_none, block=float(coef[0]), token=float(coef[1]), head=float(coef[2]),
                   head_token=float(coef[3]), gather=float(coef[4]), device=str(torch.device(device)),
                   threads=torch.get_num_threads(), residual=residual, model=dims_key(dims))


def dims_key(dims: VitDims) -> str:
    """What a latency table depends on of the model: its dimensions, as a short string."""
    return (f"depth={dims.depth} dim={dims.dim} heads={dims.num_heads} mlp={dims.mlp_hidden} "
            f"patches={dims.num_patches} prefix={dims.num_prefix}")


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refit without the most negative term until none is negative
    (an active-set approximation of NNLS, exact when at most one term is pinned at zero)."""
    active = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        coef[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if coef.min() >= 0 or len(active) == 1:
            return np.clip(coef, 0.0, None)
        active.remove(int(np.argmin(coef)))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU), so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one call `model(x)` (CUDA synchronised on both sides)."""
    synchronize(x.device)
    t = time.perf_counter()
    model(x)
    synchronize(x.device)
    return time.perf_counter() - t


def fix_controller(mia: nn.Module):
    """Make every decision head of `mia` return forced decisions, the same for every image, while still
    running (so its cost stays in a timing). Returns `set(blocks, heads, tokens)`: the first `blocks` blocks
    run, each keeping its first `heads` heads and first `tokens` patch tokens."""
    dims = VitDims.of(mia)
    state = {"structure": (dims.depth, dims.num_heads, dims.num_patches)}
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, head in enumerate(mia.controller):
        original = type(head).parts

        def parts(x: torch.Tensor, num_prefix: int, head=head, index=i, original=original) -> tuple[torch.Tensor, torch.Tensor]:
            original(head, x, num_prefix)  # the controller's real cost stays in the timing
            blocks, heads, tokens = state["structure"]
            key = (index, x.shape[0], x.device, blocks, heads, tokens)
            if key not in cache:
                big = 50.0
                cls = torch.full((x.shape[0], 1 + dims.num_heads), -big, device=x.device)
                cls[:, 0] = big if index < blocks else -big
                cls[:, 1 : 1 + heads] = big
                patches = torch.full((x.shape[0], x.shape[1] - num_prefix, 1), -big, device=x.device)
                patches[:, :tokens] = big
                cache[key] = cls, patches
            return cache[key]

        head.parts = parts

    def set_structure(blocks: int, heads: int, tokens: int) -> None:
        state["structure"] = (blocks, heads, tokens)

    return set_structure
