"""The Python API: evaluate any model under any registered attack, or use an attack as a function.

`evaluate` is `miarobust run` for a model a user holds: a registered name (as on the command line) or any
`nn.Module`. It writes the same results folder (config.json, samples.csv, summary.json), checks every
adversarial image against the threat model, runs the sanity checks and counts MACs per image (MIA-Former's
executed structure, a timm ViT's dimensions, any other module's FlopCounterMode count). `Attack` wraps one
registered attack as a callable on (images, labels), as torchattacks' attacks are.

    import miarobust
    result = miarobust.evaluate(my_model, data="embedded", attack="autoattack", eps="8/255",
                                mean=(0.286,), std=(0.353,), input_size=(1, 28, 28), n=100)
    print(result.summary["robust"]["acc"], result.folder)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from miarobust.attacks import AttackConfig, Victim, build_attack, get_attack
from miarobust.attacks.threat import ThreatModel
from miarobust.errors import UserError
from miarobust.evaluator import Evaluation, RunConfig, RunResult, run
from miarobust.models.normalize import resolve
from miarobust.values import Eps, parse_norm


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, shapes, dtypes and bytes): which weights a result is of."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def evaluate(model: str | nn.Module, *, attack: str | Sequence[str] = "pgd", eps: float | str = 8 / 255,
             data: str | Dataset | tuple[torch.Tensor, torch.Tensor] = "embedded", n: int | None = None,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             input_size: Sequence[int] | None = None, out: str = "runs", progress: bool = False, reuse: str | None = None,
             **options: Any) -> RunResult:
    """Evaluate `model` under `attack` at `eps` on `data`; the results folder is `result.folder`.

    model: a registered name (`miarobust list`), or any nn.Module taking (B, C, H, W) images: normalised by
      `mean`/`std` if given, else by its timm `pretrained_cfg`, else fed [0, 1] pixels; `input_size` (C, H, W)
      where it has no pretrained_cfg. Its folder is named after its class and a SHA-256 of what it sees: its
      state_dict, the mean/std applied and the input size (the same weights normalised otherwise are another run).
    data: a data set's name (`miarobust list datasets`), or, for an nn.Module, images and labels of one's own: a
      pair of tensors (N, C, H, W) in [0, 1] and (N,) class indices, or a torch Dataset of such (image, label)
      pairs (named in the folder by the SHA-256 of the first n images and labels).
    attack: a name, several (each image robust only if it survives all), or the preset "adaptive".
    eps: a float or text such as "8/255". options: any other `miarobust run` setting as a RunConfig field
      (norm, steps, restarts, eot, gate_mode, eval_samples, checkpoint, batch_size, seed, device, checks, ...).
    reuse: "same-code" or "any-code": start from the batches of a finished run of the same request at another n
      in `out` (`--reuse`).
    """
    known = {f.name for f in fields(RunConfig)} - {"model", "attacks", "eps", "eps_text", "data", "n", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"evaluate() got unknown options {', '.join(unknown)}: use RunConfig's fields ({', '.join(sorted(known))}).")
    attacks = tuple(a.strip() for a in attack.split(",")) if isinstance(attack, str) else tuple(attack)
    if isinstance(model, str):
        if not isinstance(data, str):
            raise UserError("evaluate() on a registered model name takes data by name; to evaluate your own images, "
                            "pass the model as an nn.Module (miarobust.models.create(name)).")
        return run(RunConfig.with_eps(eps, model=model, attacks=attacks, data=data, n=n, out=str(Path(out)), **options),
                   progress=progress, reuse=reuse)
    if not isinstance(model, nn.Module):
        raise UserError(f"evaluate() takes a model name or an nn.Module, not {type(model).__name__}.")
    from miarobust.data import Geometry, load_dataset

    geometry = Geometry.of_module(model, input_size)
    dataset, name, top_label = None, data, None
    if not isinstance(data, str):
        dataset, sha_data, top_label = own_data(data, geometry, n)
        name = f"{'tensors' if isinstance(data, tuple) else type(data).__name__}-{sha_data[:10]}"
    sha = state_sha256(model)
    mean, std = resolve(model, mean, std)
    seen = hashlib.sha256(f"{sha};mean={mean};std={std};input={astuple(geometry)}".encode()).hexdigest()
    cfg = RunConfig.with_eps(eps, model=f"{type(model).__name__}-{seen[:10]}", attacks=attacks, data=name, n=n,
                             out=str(Path(out)), **options)
    if dataset is None:
        dataset = load_dataset(cfg.data, geometry, cfg.data_root, cfg.split)
    ev = Evaluation(cfg, model, dataset, geometry, mean, std)
    if top_label is not None and top_label >= ev.num_classes:
        raise UserError(f"data has label {top_label} but the model outputs {ev.num_classes} classes (0 to "
                        f"{ev.num_classes - 1}): pass labels of the model's classes.")
    ev.weights_sha256 = sha
    return run(cfg, progress=progress, ev=ev, reuse=reuse)


def own_data(data: Any, geometry: Any, n: int | None) -> tuple[Dataset, str, int]:
    """A user's (images, labels) tensors or Dataset, read once: checked against the model's input (shape, dtype,
    range, labels), the SHA-256 of its first n (image, label) pairs (which images a result is of), and their largest
    label (checked against the model's classes once the model is wrapped)."""
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise UserError("data=(images, labels) takes two tensors: images (N, C, H, W) in [0, 1], labels (N,).")
        images, labels = data
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise UserError(f"data=(images, labels) has shapes {tuple(images.shape)} and {tuple(labels.shape)}: "
                            "pass images (N, C, H, W) and labels (N,) of the same N.")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or (len(labels) and int(labels.min()) < 0):
            raise UserError("labels must be class indices (integers >= 0).")
        data = TensorDataset(images.detach().float().cpu(), labels.detach().long().cpu())
    if not isinstance(data, Dataset):
        raise UserError(f"data is a {type(data).__name__}: pass a data set's name, (images, labels) tensors or a "
                        "torch Dataset of (image, label) pairs.")
    want = (geometry.channels, geometry.height, geometry.width)
    h, top = hashlib.sha256(), -1
    for i in range(min(len(data), n if n is not None else len(data))):
        x, y = data[i]
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"image {i} of data has shape {got}, the model takes {want}: resize the images or pass "
                            "input_size=(C, H, W).")
        if not x.dtype.is_floating_point:
            raise UserError(f"image {i} of data is {x.dtype}: pass float images in [0, 1] (e.g. uint8 / 255).")
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise UserError(f"image {i} of data has pixels outside [0, 1]: pass unnormalised images and mean/std.")
        label = y.item() if isinstance(y, torch.Tensor) and y.numel() == 1 else y
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise UserError(f"label {i} of data is {y!r}: labels must be class indices (integers >= 0).")
        h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(str(label).encode())
        top = max(top, label)
    return data, h.hexdigest(), top


class Attack:
    """A registered attack as a function of (images (B, C, H, W) in [0, 1], labels (B,)) -> adversarial images.

    model: any nn.Module (normalised by `mean`/`std`, else its timm pretrained_cfg); an adaptive ViT (directly or
    as `.model` of a wrapper) is attacked through its gates as its `gate_mode` says. Every output is checked
    against the threat model (a violation raises, never returns). Options: AttackConfig's fields (steps,
    restarts, eot, queries, ...).

        atk = miarobust.Attack("apgd-ce", model, eps="8/255")
        x_adv = atk(images, labels)
    """

    def __init__(self, name: str, model: nn.Module, eps: float | str = 8 / 255, norm: str = "Linf",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **options: Any):
        from miarobust.models.adaptive import adaptive_core
        from miarobust.models.normalize import Normalized

        self.cfg = AttackConfig(norm=parse_norm(norm), eps=Eps.parse(eps).value, **options)
        self.info = get_attack(name, self.cfg)
        wrapped = Normalized(model, mean, std)
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        self.victim = Victim(wrapped.to(device).eval(), adaptive_core(model), device)
        self.fn = build_attack(self.info, self.victim, self.cfg)
        self.threat = ThreatModel(norm, self.cfg.eps)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = self.fn(images, labels).detach()
        self.threat.check(images, x_adv, self.info.name)
        return x_adv

    def __repr__(self) -> str:
        return f"Attack({self.info.name!r}, {self.cfg.norm}, eps={self.cfg.eps:.6g})"
