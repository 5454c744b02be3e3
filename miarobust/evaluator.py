"""The evaluator: model x attacks x data -> per-sample records, resumable batch by batch.

Batches are fixed by (n, batch_size) and batch b is seeded from (seed, b) alone, so a batch's records do
not depend on which batches ran before it in this process: a resumed run, or a run split over ranks
(distributed.py), writes the same samples.csv as one uninterrupted run.

For a stochastic adaptive model (MIA-Former's random gates), clean and adversarial correctness are the mean over `eval_samples` gate
draws (a probability per image), GMACs are the mean over draws, and an attack without EOT is labelled
non-adaptive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset

from miarobust.attacks import PRESETS, AttackInfo, Victim, attack_salt, build_attack, expand, get_attack
from miarobust.config import Resolved, RunConfig, RunRecord, resolve_device
from miarobust.data import FIXED_LABELS
from miarobust.errors import UserError
from miarobust.models.registry import file_sha256, parse_model_kwargs
from miarobust.models.vit import recorded_checkpoint
from miarobust.results import (
    CONFIG,
    CSV_FLOAT,
    PARTIAL,
    SAMPLES,
    SUMMARY,
    csv_text,
    json_bytes,
    missing_folders,
    write_csv,
    write_files,
    write_json,
)
from miarobust.results.reuse import copy_batches, find_donor, reused_record
from miarobust.results.store import (
    CheckBatches,
    FolderLock,
    batch_range,
    batch_seed,
    batches_done,
    batches_todo,
    check_same_weights,
    is_complete,
    merge_partials,
    num_batches,
    partial_name,
    read_config,
    remove_if_nothing_finished,
    warnings_name,
)
from miarobust.results.summary import environment, summarize
from miarobust.values import REUSE_MODES

log = logging.getLogger(__name__)

#: the columns of a run's per-image records: the clean ones, then these per attack (`<attack>_pred`, ...), then
#: `robust` (the worst case over the attacks)
CLEAN_COLUMNS = ("index", "label", "clean_pred", "clean_correct", "clean_gmacs")
ATTACK_COLUMNS = ("pred", "adv_correct", "correct", "gmacs", "linf", "l2", "dist")


class Evaluation:
    """One run: a model, a data set, attacks and a threat model, evaluated batch by batch.

    Made from parts (`Evaluation(cfg, model, dataset, geometry)`: any nn.Module, any data set of (image, label)
    pairs in [0, 1], and the attacks, threat model and options of `cfg`) or from a config by
    `Evaluation.from_config`, which builds the model and the data `cfg` names. The model takes (B, C, H, W) images
    as `geometry` says (default: its timm pretrained_cfg); it is normalised by `mean` / `std`, else by its
    pretrained_cfg, else not at all, and put in eval mode on the device. `own`: the model was built here, so its
    parameters need no gradients (a user's module keeps its flags).
    """

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Evaluation:
        """The model, weights and data that `cfg` names."""
        from miarobust.data import Geometry, load_dataset
        from miarobust.models import create

        for a in cfg.attacks:  # unknown names fail before a model is loaded
            if a not in PRESETS:
                get_attack(a, cfg.attack_config())
        torch.manual_seed(cfg.seed)  # weights a checkpoint lacks (a controller, a model without shipped weights)
        backbone = create(cfg.model, checkpoint=cfg.checkpoint, num_classes=cfg.num_classes, img_size=cfg.img_size,
                          **parse_model_kwargs(cfg.model_kwargs))
        geometry = Geometry.of(backbone)
        return cls(cfg, backbone, load_dataset(cfg.data, geometry, cfg.data_root, cfg.split), geometry, own=True)

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, dataset: Dataset, geometry: Any = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, *, own: bool = False):
        from miarobust.data import Geometry
        from miarobust.models.adaptive import adaptive_core, check_gate_mode
        from miarobust.models.flops import module_macs
        from miarobust.models.normalize import Normalized

        self.device = resolve_device(cfg.device)
        self.cfg = cfg
        acfg = cfg.attack_config()
        for a in cfg.attacks:
            if a not in PRESETS:
                get_attack(a, acfg)
        self.geometry = geometry = geometry if geometry is not None else Geometry.of_module(model)
        self.adaptive = adaptive_core(model)  # MIA-Former or a dynamic-ViT peer; None for a static model
        if cfg.gate_mode is not None:
            if self.adaptive is None:
                raise UserError(f"--gate-mode applies to input-adaptive models only; {cfg.model} is static.")
            try:
                self.adaptive.set_gate_mode(check_gate_mode(self.adaptive, cfg.gate_mode, cfg.model))
            except ValueError as e:
                raise UserError(f"--gate-mode: {e}.") from None
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.model = Normalized(model, mean, std, autocast=dtype).to(self.device).eval()
        if own:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.victim = Victim(self.model, self.adaptive, self.device)
        c, h, w = geometry.channels, geometry.height, geometry.width
        self.static_macs = module_macs(model, (c, h, w))
        diameter = 1.0 if cfg.norm == "Linf" else (c * h * w) ** 0.5  # of the [0, 1] box: a ball that wide covers it
        if cfg.eps >= diameter:
            why = ("1: an Linf ball that large covers every image in [0, 1]; use e.g. 8/255" if cfg.norm == "Linf" else
                   f"{diameter:.4g}, the L2 diameter of {cfg.model}'s {c}x{h}x{w} images in [0, 1]: use e.g. 0.5")
            raise UserError(f"--eps {cfg.eps_text} is >= {why}.")
        self.dataset = dataset
        classes = getattr(dataset, "num_classes", None)
        out_dim = getattr(model, "num_classes", None)
        if not isinstance(out_dim, int):  # a module of the user's: its outputs say
            with torch.no_grad():
                out_dim = int(self.model(torch.zeros(1, c, h, w, device=self.device)).shape[-1])
        self.num_classes = out_dim
        if classes is not None and classes != out_dim and cfg.data in FIXED_LABELS:
            raise UserError(f"{cfg.model} outputs {out_dim} classes but {cfg.data} has {classes}: its weights were trained "
                            f"for other labels, so every answer would be scored against the wrong ones. Evaluate it on "
                            f"its own data, or load weights trained on {cfg.data}.")
        if classes is not None and classes > out_dim:
            raise UserError(f"{cfg.data} has {classes} classes but {cfg.model} outputs {out_dim}: pass --num-classes {classes}.")
        self.n = len(dataset) if cfg.n is None else cfg.n
        if self.n > len(dataset):
            log.warning("--n %d is larger than %s (%d images): evaluating all %d", self.n, cfg.data, len(dataset), len(dataset))
            self.n = len(dataset)
        self.draws = cfg.eval_samples if self.victim.stochastic else 1
        self.threat = cfg.threat
        self.attacks: list[AttackInfo] = [get_attack(a, acfg) for a in expand(cfg.attacks, gated=self.adaptive is not None)]
        self.acfg = acfg
        if self.victim.stochastic and cfg.eot is None and "adaptive" in cfg.attacks:
            self.acfg = replace(acfg, eot=self.preset_eot())
        self.attack_fns = [build_attack(info, self.victim, self.acfg) for info in self.attacks]
        self.num_batches = num_batches(self.n, cfg.batch_size)
        # per batch, the warnings of AutoAttack's own checks by attack (kept in partial/ beside the batch's
        # records, so a resumed or distributed run judges every batch, not just this process's)
        self.warnings: dict[int, dict[str, list[str]]] = {}
        self.progress = False  # show the checks' progress and results (set by `run` on the process that reports)
        self.check_batches: CheckBatches | None = None  # the checks' finished rerun batches (set by finish)
        self.weights_sha256: str | None = None  # of a module's state_dict (api.evaluate); else of the checkpoint file

    # -- the adaptive preset's EOT ------------------------------------------------------------------------
    def preset_eot(self, start: int = 4, most: int = 64, images: int = 100, level: float = 0.05) -> int:
        """K of the adaptive preset on stochastic gates: the smallest K in 4, 8, 16, ... (at most `most`) at which
        BPDA-PGD through EOT 2K is not significantly stronger than through EOT K on the first `images` images
        (one-sided paired test on each image's expected correctness, level `level`). Recorded in the run's
        config.json and read back from there, so a resumed run does not probe again."""
        from miarobust.checks import rerun
        from miarobust.stats import paired_mean_diff

        recorded = read_config(Path(self.cfg.out) / self.cfg.folder_name()).get("resolved_eot")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
            return recorded
        m = min(self.n, images)
        probe = replace(self.cfg.attack_config(), restarts=1)
        k, at_k = start, None
        while True:
            log.info("adaptive preset: probing EOT %d against %d on %d images", k, 2 * k, m)
            at_k = at_k if at_k is not None else rerun(self, "bpda-pgd", replace(probe, eot=k), m, salt=60_011)
            at_2k = rerun(self, "bpda-pgd", replace(probe, eot=2 * k), m, salt=60_013)
            diff, _, _, p = paired_mean_diff(at_k.tolist(), at_2k.tolist())
            if diff <= 0 or p / 2 >= level or 2 * k > most:
                return k
            k, at_k = 2 * k, at_2k

    # -- one batch --------------------------------------------------------------------------------------
    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, labels and data-set indices of batch b."""
        lo, hi = batch_range(b, self.cfg.batch_size, self.n)
        items = [self.dataset[i] for i in range(lo, hi)]
        x = torch.stack([it[0] for it in items]).float()  # a user's data set may hold float64 or half images
        y = torch.tensor([it[1] for it in items], dtype=torch.long)
        if x.dim() != 4:
            raise UserError(f"images of {self.cfg.data} have shape {tuple(x.shape[1:])}, expected (C, H, W).")
        return x, y, torch.arange(lo, hi)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prediction (majority over draws), correctness (mean over draws) and GMACs (mean) per image."""
        votes = torch.zeros(len(x), self.num_classes, device=x.device)
        correct = torch.zeros(len(x), device=x.device)
        macs = torch.zeros(len(x), device=x.device)
        for _ in range(self.draws):
            pred = self.model(x).argmax(1)
            votes[torch.arange(len(x)), pred] += 1
            correct += (pred == y).float()
            macs += self.macs(len(x))
        return {"pred": votes.argmax(1), "correct": correct / self.draws, "gmacs": macs / self.draws / 1e9}

    def macs(self, b: int) -> torch.Tensor:
        """MACs per image of the latest forward: the executed structure for an adaptive model, fixed for static."""
        if self.adaptive is not None:
            return self.adaptive.last.macs.detach().to(self.device)
        return torch.full((b,), float(self.static_macs), device=self.device)

    def sample_columns(self) -> list[str]:
        """The columns of run_batch's records, in order."""
        attacked = [c for i in self.attacks if i.name != "none" for c in attack_columns(i.name)]
        return [*CLEAN_COLUMNS, *attacked, "robust"]

    def run_batch(self, b: int) -> pd.DataFrame:
        """Per-sample records of batch b (the threat model is checked before anything counts)."""
        torch.manual_seed(batch_seed(self.cfg.seed, b))
        x, y, idx = self.batch(b)
        x, y = x.to(self.device), y.to(self.device)
        clean = self.predict(x, y)
        rec: dict[str, Any] = _columns(CLEAN_COLUMNS, (idx, y, clean["pred"], clean["correct"], clean["gmacs"]))
        worst = clean["correct"].clone()
        warned: dict[str, list[str]] = {}
        for info, fn in zip(self.attacks, self.attack_fns):
            if info.name == "none":
                continue
            torch.manual_seed(batch_seed(self.cfg.seed, b) + 1 + attack_salt(info.name))
            before = len(getattr(fn, "warnings", ()))
            x_adv = fn(x, y).detach()
            if hasattr(fn, "warnings"):  # an AutoAttack attack: what its checks said on this batch
                warned[info.name] = fn.warnings[before:]
            dist = self.threat.check(x, x_adv, info.name)
            adv = self.predict(x_adv, y)
            delta = (x_adv - x).flatten(1)
            values = (adv["pred"], adv["correct"], torch.minimum(adv["correct"], clean["correct"]), adv["gmacs"],
                      delta.abs().amax(1), delta.norm(dim=1), dist)
            rec.update(_columns(attack_columns(info.name), values))
            worst = torch.minimum(worst, adv["correct"])
        rec["robust"] = worst.cpu().numpy()
        self.warnings[b] = warned
        return pd.DataFrame(rec)


def attack_columns(attack: str) -> list[str]:
    """The record columns of one attack: `<attack>_pred`, `<attack>_adv_correct`, ..."""
    return [f"{attack}_{c}" for c in ATTACK_COLUMNS]


def _columns(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Records' columns: each name with its tensor as a numpy array."""
    return {name: t.cpu().numpy() for name, t in zip(names, tensors, strict=True)}


@dataclass
class RunResult:
    folder: Path
    summary: dict[str, Any]


def run(cfg: RunConfig, progress: bool = True, rank: int = 0, world: int = 1, ev: Evaluation | None = None,
        reuse: str | None = None) -> RunResult:
    """Evaluate and write the run folder cfg.out/<name>/ (resuming finished batches); returns the summary.

    reuse: same-code or any-code: a new run starts from the batches of a finished run of the same request at
    another n in cfg.out (results/reuse.py), copied instead of recomputed.

    Bad input writes nothing: the model, data and attacks are built before the folder is made, and a run
    that fails before it has finished a batch removes the folders it created. With world > 1 (see
    distributed.py) rank 0 holds the folder lock and writes config.json before any rank starts; each rank
    evaluates its batches into partial/, and rank 0 merges after a barrier.
    """
    from tqdm.auto import tqdm

    ev = ev if ev is not None else Evaluation.from_config(cfg)
    folder = Path(cfg.out) / cfg.folder_name()
    started = time.time()
    created = missing_folders(folder)  # ours to remove on failure
    with contextlib.ExitStack() as stack:
        state, message, failure, copied = "go", "", None, 0
        if rank == 0:
            try:
                stack.enter_context(FolderLock(folder))
                checkpoint = getattr(ev.model.model, "checkpoint", None)
                weights = ev.weights_sha256 or (file_sha256(checkpoint) if checkpoint else None)
                check_same_weights(folder, weights)
                if is_complete(folder):
                    state = "done"
                else:
                    resolved = Resolved(gate_mode=ev.adaptive.gate_mode.value if ev.adaptive else None,
                                        checkpoint=recorded_checkpoint(checkpoint) if checkpoint else None,
                                        weights_sha256=weights,
                                        attacks=tuple(i.name for i in ev.attacks), eot=ev.acfg.eot,
                                        gate_grad={i.name: i.gate_grad for i in ev.attacks})
                    env = environment()
                    write_json(folder / CONFIG, RunRecord(cfg, resolved).to_json(env))
                    copied = start_from_donor(folder, cfg, ev, resolved, reuse, env, progress) if reuse else 0
            except Exception as e:  # noqa: BLE001  (raised below, once the other ranks are told)
                state, message, failure = "failed", str(e), e
            except BaseException:  # interrupted while setting up: what it created goes
                remove_if_nothing_finished(folder, created)
                raise
        if world > 1:
            state, message = _broadcast((state, message))
        if failure is not None:
            remove_if_nothing_finished(folder, created)
            raise failure
        if state == "failed":
            raise UserError(message)
        shown = progress and rank == 0
        ev.progress = shown
        if state == "done":
            log.info("%s is complete already: nothing to do", folder)
            if shown:
                tqdm.write(f"already complete: {folder} (delete it, or pass another --out, to run again)", file=sys.stderr)
            return RunResult(folder, json.loads((folder / SUMMARY).read_text()) if rank == 0 else {})
        todo = list(batches_todo(folder, ev.num_batches, rank, world))
        done = batches_done(folder)
        if shown and done and not copied:  # batches copied by --reuse: said so already
            tqdm.write(f"resuming {folder}: {done} of {ev.num_batches} batches done", file=sys.stderr)
        bar = tqdm(todo, desc=f"{cfg.model} x {'+'.join(cfg.attacks)}", unit="batch", disable=not shown)
        error: Exception | None = None
        sums = {"clean": 0.0, "robust": 0.0, "n": 0}  # running accuracy over this process's batches
        try:
            for b in bar:
                frame = ev.run_batch(b)
                # one step (the records' file marks the batch done): a full disk leaves the batch wholly unsaved
                warned = {folder / PARTIAL / warnings_name(b): json_bytes(ev.warnings[b])} if ev.warnings[b] else {}
                write_files({**warned, folder / PARTIAL / partial_name(b): csv_text(frame).encode()})
                sums = {"clean": sums["clean"] + frame["clean_correct"].sum(), "robust": sums["robust"] + frame["robust"].sum(),
                        "n": sums["n"] + len(frame)}
                bar.set_postfix(clean=f"{sums['clean'] / sums['n']:.3f}", robust=f"{sums['robust'] / sums['n']:.3f}")
        except Exception as e:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = e
        except BaseException:  # interrupted: no collective, the other ranks are interrupted too
            if rank == 0:
                remove_if_nothing_finished(folder, created)
            raise
        finally:
            bar.close()
        failed = _gather_failures(error, world)
        if failed:
            if rank == 0:
                remove_if_nothing_finished(folder, created)
            if error is not None:
                raise error
            raise UserError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        if rank != 0:
            return RunResult(folder, {})
        return RunResult(folder, finish(cfg, ev, folder, time.time() - started))


def start_from_donor(folder: Path, cfg: RunConfig, ev: Evaluation, resolved: Resolved, mode: str,
                     env: dict[str, Any], progress: bool) -> int:
    """--reuse MODE: copy into a run that has no batch yet the batches a finished run of the same request holds
    (env: this process's environment, as config.json records it); returns how many images they hold."""
    from tqdm.auto import tqdm

    if mode not in REUSE_MODES:
        raise UserError(f"--reuse {mode}: use {' or '.join(REUSE_MODES)}.")
    if batches_done(folder) or reused_record(folder) is not None:
        return 0  # resumed: what it reused (if anything) is in partial/ already
    autoattack = any(hasattr(fn, "warnings") for fn in ev.attack_fns)
    donor, left = find_donor(folder, cfg, resolved, ev.n, autoattack, mode, env)
    images = 0
    if donor is not None:
        images = copy_batches(folder, donor, cfg.batch_size, ev.n, ev.sample_columns(),
                              lambda b: ev.batch(b)[1].tolist())
    skipped = f"; left out: {', '.join(left)}" if left else ""
    if donor is None or not images:
        said = f"--reuse: no finished run in {cfg.out} gives a batch of this one{skipped}; computing them all"
    else:
        changed = f", by other code: {'; '.join(donor.code_changes[:3])}" if donor.code_changes else ", by this code"
        said = (f"--reuse: {len(donor.batches)} of {ev.num_batches} batches ({images} images) copied from "
                f"{donor.folder.name} (made at revision {(donor.git_revision or 'unknown')[:12]}{changed}){skipped}")
    log.info(said)
    if progress:
        tqdm.write(said, file=sys.stderr)
    return images


def _broadcast(obj: Any) -> Any:
    """`obj` of rank 0, on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_failures(error: Exception | None, world: int) -> list[tuple[int, str]]:
    """(rank, message) of every rank whose batches failed; also the barrier before rank 0 merges."""
    mine = [] if error is None else [(0, str(error))]
    if world == 1:
        return mine
    import torch.distributed as dist

    every: list[Any] = [None] * world
    dist.all_gather_object(every, None if error is None else str(error))
    return [(r, m) for r, m in enumerate(every) if m is not None]


def finish(cfg: RunConfig, ev: Evaluation, folder: Path, seconds: float) -> dict[str, Any]:
    """Merge partial/ into samples.csv, run the checks, write summary.json, remove partial/."""
    samples, saved = merge_partials(folder, ev.num_batches)
    ev.warnings.update(saved)  # every batch's AutoAttack warnings, whichever process ran it
    write_csv(folder / SAMPLES, samples)
    samples = pd.read_csv(folder / SAMPLES)  # summarise what is on disk, so summary == f(samples.csv)
    extra: dict[str, Any] = {"gate_mode": ev.adaptive.gate_mode.value if ev.adaptive else None, "wall_seconds": seconds,
                             "folder": folder.name, "precision": cfg.precision}
    summary = summarize(cfg, samples, ev.attacks, ev.draws, extra, ev.acfg)
    # what the backbone costs with every gate open, rounded as samples.csv stores per-image GMACs (so that
    # full gates give a share of exactly 1)
    static = float(CSV_FLOAT % (ev.static_macs / 1e9))
    summary["gmacs"]["static"] = static
    summary["gmacs"]["clean_share_of_static"] = summary["gmacs"]["clean_mean"] / static
    summary["gmacs"]["adv_share_of_static"] = {a: v / static for a, v in summary["gmacs"]["adv_mean"].items()}
    from miarobust.checks import run_checks

    started = time.time()
    ev.check_batches = CheckBatches(folder)  # a run killed during its checks resumes them
    summary["checks"] = run_checks(cfg, ev, samples, summary)
    summary["checks_seconds"] = time.time() - started  # wall_seconds is the evaluation's
    if ev.check_batches.resumed:  # checks_seconds is then this process's share
        summary["checks_batches_resumed"] = ev.check_batches.resumed
    ev.check_batches = None
    # each batch's AutoAttack warnings, so that a larger run can reuse the batches (results/reuse.py)
    summary["batch_warnings"] = {str(b): w for b, w in sorted(ev.warnings.items()) if w}
    reused = reused_record(folder)
    if reused is not None:
        summary["reused"] = reused
    write_json(folder / SUMMARY, summary)
    shutil.rmtree(folder / PARTIAL)  # with any temporary file a killed run left mid-write
    return summary
