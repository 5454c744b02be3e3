"""Keep the best adversarial candidate per image against a stochastic model, scored on fresh gate draws.

An attack against a randomised model decides success from the outputs it is given: pyautoattack keeps an
image's adversarial example only where the (EOT-averaged) prediction is wrong and returns the *clean* image
everywhere else (`run_standard_evaluation`, and APGD's own `perturb`), so a candidate that fools 9 of 10
gate draws but not their average is thrown away; torchattacks' PGD returns its last iterate, not its best.
Upstream knows (pyautoattack pull request #105, unmerged: re-evaluate candidates, keep the worst).

`CandidateTap` wraps the model an attack queries. On every forward it matches each queried row to the clean
image whose threat-model ball holds it (any point of that ball is a valid adversarial example for that
image, whatever the attack meant it for) and keeps, per image, the `keep` candidates whose queried
probability of the true class was lowest. `select` then scores those candidates and the attack's own output
on `draws` fresh gate draws (not the draws the attack optimised on, whose luck the selection would keep)
and returns, per image, the one with the lowest expected correctness (ties: lowest mean probability of the
true class). The evaluator then scores the chosen image on its own, independent draws, so the reported
figure is an unbiased estimate for the chosen candidate.
"""

from __future__ import annotations

import torch
from torch import nn

from miarobust.attacks.threat import LINF_SLACK, TOLERANCE, ThreatModel


class CandidateTap:
    """Per-image store of the lowest-scoring queried inputs of one attack call (see the module docstring)."""

    def __init__(self, threat: ThreatModel, keep: int = 3):
        self.threat, self.keep = threat, keep
        self.x: torch.Tensor | None = None

    def start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Begin a call on clean images x (B, C, H, W) in [0, 1] with labels y (B,)."""
        self.x, self.y = x.detach(), y
        self.flat = self.x.flatten(1)
        self.cands = x.detach().unsqueeze(1).repeat(1, self.keep, *([1] * (x.dim() - 1)))  # (B, keep, C, H, W)
        self.score = torch.full((len(x), self.keep), float("inf"), device=x.device)

    def stop(self) -> None:
        self.x = None

    def wrap(self, model: nn.Module) -> nn.Module:
        return Tapped(model, self)

    @torch.no_grad()
    def observe(self, xq: torch.Tensor, out: torch.Tensor) -> None:
        """Record the rows xq (R, C, H, W) queried with outputs `out` (R, classes; logits or log-probabilities)."""
        if self.x is None or xq.shape[1:] != self.x.shape[1:] or len(xq) == 0:
            return
        q = xq.detach().flatten(1).to(self.flat.dtype)
        img = torch.cdist(q, self.flat).argmin(1)  # nearest clean image (R,)
        d = (q - self.flat[img])
        dist = d.abs().amax(1) if self.threat.norm == "Linf" else d.norm(dim=1)
        slack = LINF_SLACK if self.threat.norm == "Linf" else TOLERANCE
        inside = (dist <= self.threat.eps * (1 + TOLERANCE) + slack) & (q.amin(1) >= 0) & (q.amax(1) <= 1)
        inside &= torch.isfinite(out.detach()).all(1)
        if not bool(inside.any()):
            return
        logp = out.detach().float().log_softmax(-1)
        s = logp.gather(1, self.y[img][:, None]).squeeze(1)
        s = torch.where(inside, s, torch.full_like(s, float("inf")))
        # the best new row per image in this call
        best = torch.full((len(self.x),), float("inf"), device=s.device).scatter_reduce(0, img, s, "amin")
        hit = torch.isfinite(best)
        rows = torch.full((len(self.x),), -1, dtype=torch.long, device=s.device)
        is_best = inside & (s == best[img])
        rows[img[is_best]] = torch.arange(len(q), device=s.device)[is_best]
        imgs = hit.nonzero().squeeze(1)
        new, new_s = xq.detach()[rows[imgs]].to(self.cands.dtype), best[imgs]
        worst_slot = self.score[imgs].argmax(1)
        same = (self.cands[imgs] == new[:, None]).flatten(2).all(2)  # (m, keep): seen before
        better = new_s < self.score[imgs, worst_slot]
        # a repeat keeps its lowest score; a new candidate replaces the image's worst slot if it beats it
        rep = same.any(1)
        if bool(rep.any()):
            slot = same.float().argmax(1)
            i = imgs[rep]
            self.score[i, slot[rep]] = torch.minimum(self.score[i, slot[rep]], new_s[rep])
        put = better & ~rep
        if bool(put.any()):
            i = imgs[put]
            self.cands[i, worst_slot[put]] = new[put]
            self.score[i, worst_slot[put]] = new_s[put]

    @torch.no_grad()
    def select(self, model: nn.Module, x_adv: torch.Tensor, draws: int, chunk: int) -> torch.Tensor:
        """Per image, the candidate (kept ones and the attack's output `x_adv`) with the lowest expected
        correctness over `draws` fresh forwards of the stochastic `model`; (B, C, H, W)."""
        assert self.x is not None
        b = len(self.x)
        cands = torch.cat([x_adv.detach().unsqueeze(1), self.cands], 1)  # (B, 1 + keep, C, H, W)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x_adv.device), torch.isfinite(self.score)], 1)
        m = cands.shape[1]
        flat = cands.flatten(0, 1)  # image i, candidate j at row i * m + j
        labels = self.y.repeat_interleave(m)
        correct = torch.zeros(b * m, device=x_adv.device)
        prob = torch.zeros(b * m, device=x_adv.device)
        for _ in range(draws):
            for lo in range(0, len(flat), max(chunk, 1)):
                out = model(flat[lo:lo + chunk]).float()
                yy = labels[lo:lo + chunk]
                correct[lo:lo + chunk] += (out.argmax(1) == yy).float()
                prob[lo:lo + chunk] += out.softmax(-1).gather(1, yy[:, None]).squeeze(1)
        key = (correct / draws + prob / draws * (0.5 / draws)).view(b, m)  # correctness first, probability breaks ties
        key = torch.where(valid, key, torch.full_like(key, float("inf")))
        pick = key.argmin(1)
        return cands[torch.arange(b, device=x_adv.device), pick]


class Tapped(nn.Module):
    """`model` whose every forward is shown to a CandidateTap; outputs unchanged."""

    def __init__(self, model: nn.Module, tap: CandidateTap):
        super().__init__()
        self.model = model
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.tap.observe(x, out)
        return out
