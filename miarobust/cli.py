"""The `miarobust` command line: thin click commands over library functions.

Heavy imports (torch, timm) happen inside the commands so `--help` is instant. User errors (UserError)
print one line and exit 2; nothing half-written is left (every file is written atomically).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from miarobust.errors import UserError
from miarobust.values import NORMS, PRECISIONS, REUSE_MODES

MODELS = ("mia_vit_fmnist", "vit_fmnist", "deit_t", "deit_s", "deit_b", "mia_deit_t", "mia_deit_s", "mia_deit_b")


class EpsType(click.ParamType):
    """A perturbation budget: '8/255', '0.031' or '1e-2'; finite and > 0 (values.Eps)."""

    name = "eps"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from miarobust.values import Eps

        if isinstance(value, Eps):
            return value
        try:
            return Eps.parse(str(value))
        except UserError as e:
            self.fail(str(e), param, ctx)


class Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (FloatRange lets nan through every bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="miarobust")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool) -> None:
    """Accuracy, FLOPs and adversarial robustness of MIA-Former, its dynamic-ViT peers and static ViTs."""
    setup_logging(verbose)


def model_option(default: str | None) -> Any:
    return click.option("--model", default=default, show_default=True,
                        help=f"Model name ({', '.join(MODELS)}); `miarobust list` shows all.")


@cli.command("run")
@model_option("mia_vit_fmnist")
@click.option("--checkpoint", default=None, help="Weights file (.safetensors or timm .pth) or a shipped name (e.g. mia_vit_fmnist_b05); default: the model's shipped weights.")
@click.option("--gate-mode", default=None, help="Decisions of an adaptive model: full (mechanism off), deterministic (default) or stochastic (MIA-Former).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size (default: the model's).")
@click.option("--img-size", type=click.IntRange(min=8), default=None, help="Input size (default: the model's).")
@click.option("--model-kwargs", default="", help="More timm model arguments, e.g. in_chans=1,patch_size=4,img_size=28 "
              "(a checkpoint's own shapes set these where it says).")
@click.option("--data", default="embedded", show_default=True, help="embedded, fashion-mnist, cifar10, imagenet, folder, synthetic.")
@click.option("--data-root", default=None, help="Folder of the data set (fashion-mnist defaults to Debian's files).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--attack", default="pgd", show_default=True, help="Attack name, or several comma-separated (worst case "
              "per image); NAME-st is a gradient attack through straight-through gates; 'adaptive' is the preset "
              "of the strongest adaptive attacks (`miarobust list attacks`).")
@click.option("--gate-grad", type=click.Choice(["none", "straight-through"]), default="none", show_default=True,
              help="Gradient of the gradient attacks through hard gates: none (zero), or straight-through (BPDA: "
              "the gates' probabilities), which runs each gradient attack NAME as NAME-st.")
@click.option("--norm", type=click.Choice(NORMS), default="Linf", show_default=True)
@click.option("--eps", type=EpsType(), default="8/255", show_default=True, help="Radius in [0, 1] pixels: 8/255 or 0.031.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--alpha", type=EpsType(), default=None, help="Step size (default 2.5 * eps / steps).")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=5000, show_default=True, help="Square's query budget, alone and in AutoAttack.")
@click.option("--eot", type=click.IntRange(min=1), default=None,
              help="Gate draws averaged per gradient (EOT) on a stochastic model; default 8 for eot-pgd, 1 otherwise.")
@click.option("--eot-chunk", type=click.IntRange(min=1), default=None, help="Rows per forward pass for EOT (default: by device).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=10, show_default=True,
              help="Gate draws averaged for accuracy of a stochastic model.")
@click.option("--surrogate", default=None, help="Surrogate model for --attack transfer (default vit_fmnist).")
@click.option("--keep-prediction", is_flag=True, help="slowdown: keep the clean label while raising MACs.")
@click.option("-n", "--n", type=click.IntRange(min=1), default=None,
              help="Evaluate the first N images (default: all). Under torchrun write -n: it takes --n for its own --nnodes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="The model's forward, and so the attacks' gradients: fp32, or under autocast in bf16 or fp16 "
              "(recorded in summary.json and the folder name).")
@click.option("--checks", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Sanity checks of the evaluation (auto: all on small runs, a cheap subset otherwise).")
@click.option("--out", default="runs", show_default=True, help="Folder that receives the run folder (runs/ is git-ignored; results/ holds the repository's committed runs).")
@click.option("--reuse", type=click.Choice(REUSE_MODES), default=None, help="Start from the batches of the same images in a finished run of the same request at another --n in --out, made by this code (same-code) or by any (copied, not recomputed; summary.json names it).")
def run_cmd(**kw: Any) -> None:
    """Evaluate a model under attack; writes config.json, samples.csv, summary.json."""
    from miarobust.distributed import RankStopped, distributed_context, stop_on_sigterm
    from miarobust.results.store import PARTIAL, batches_done, check_batches_done

    reuse = kw.pop("reuse")
    cfg = make_run_config(kw)
    with distributed_context(cfg) as (rank, world), stop_on_sigterm() as sigterm:  # kill (SIGTERM) is an interrupt
        from miarobust.evaluator import run

        try:
            res = run(cfg, progress=sys.stderr.isatty() or world == 1, rank=rank, world=world, reuse=reuse)
        except KeyboardInterrupt as e:
            sigterm.stopping = True  # first: a later SIGTERM must not cut the message short
            folder = Path(cfg.out) / cfg.folder_name()
            done, checked = batches_done(folder), check_batches_done(folder)
            also = f" and {checked} batches of its sanity checks" if checked else ""
            if rank == 0:
                click.echo(f"{'stopped' if isinstance(e, RankStopped) else 'interrupted'}: {done} finished batches"
                           f"{also} are kept in {folder / PARTIAL}; run the same command again to resume." if done else
                           "interrupted before any batch finished: nothing was written.", err=True)
            sys.exit(143 if isinstance(e, RankStopped) else 130)
        if rank == 0:
            click.echo(format_summary(res.folder, res.summary))


def make_run_config(kw: dict[str, Any]) -> Any:
    from miarobust.evaluator import RunConfig

    eps = kw.pop("eps")
    alpha = kw.pop("alpha")
    attacks = tuple(a.strip() for a in kw.pop("attack").split(",") if a.strip())
    if not attacks:
        raise UserError("--attack is empty: name an attack (see `miarobust list`).")
    if kw.pop("gate_grad") == "straight-through":
        from miarobust.attacks import straight_through_name

        attacks = tuple(straight_through_name(a) for a in attacks)
    twice = sorted({a for a in attacks if attacks.count(a) > 1})
    if twice:
        raise UserError(f"--attack names {', '.join(twice)} twice: name each attack once.")
    from miarobust.models.registry import canonical_model_kwargs

    kw["model_kwargs"] = canonical_model_kwargs(kw["model_kwargs"])  # one spelling, one folder
    return RunConfig(eps=eps.value, eps_text=eps.text, alpha=alpha.value if alpha else None, attacks=attacks, **kw)


def format_summary(folder: Any, s: dict[str, Any]) -> str:
    """A few human-readable lines about a finished run."""
    c = s["clean"]
    precision = f", {s['precision']}" if s.get("precision", "fp32") != "fp32" else ""
    lines = [f"{s['model']} ({s.get('gate_mode') or 'static'}{precision}) on {s['data']}, n={s['n']}: results in {folder}",
             f"  clean accuracy   {c['acc']:.4f}  [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]   "
             f"GMACs/image {s['gmacs']['clean_mean']:.4f}"]
    for a, v in s["attacks"].items():
        lines.append(f"  {a:<16} {v['acc']:.4f}  [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]   GMACs/image {v['gmacs_mean']:.4f}"
                     f"   {v['label']}" + (f", EOT {v['eot']}" if v['eot'] > 1 else ""))
    if len(s["attacks"]) > 1:
        r = s["robust"]
        lines.append(f"  worst case       {r['acc']:.4f}  [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")
    flags = [k for k, v in s.get("checks", {}).items() if v["status"] == "flag"]
    if flags:
        lines.append(f"  sanity checks flagged: {', '.join(flags)} (see summary.json)")
    return "\n".join(lines)


@cli.command("list")
@click.argument("what", type=click.Choice(["all", "models", "checkpoints", "attacks", "datasets"]), default="all")
def list_cmd(what: str) -> None:
    """List models, shipped checkpoints, attacks and data sets."""
    from miarobust.models import model_names

    if what in ("all", "models"):
        from miarobust.models.registry import FAMILIES

        click.echo("models:")
        names = set(model_names())
        for family, members in FAMILIES.items():
            click.echo(f"  {family}: " + ", ".join(m for m in members if m in names))
    if what in ("all", "checkpoints"):
        from miarobust.models.registry import weights_file
        from miarobust.models.vit import shipped_names

        defaults = {Path(weights_file(m)).stem for m in ("vit_fmnist", "mia_vit_fmnist", "dynamicvit_vit_fmnist", "avit_vit_fmnist",
                                                               "adavit_vit_fmnist")}
        click.echo("checkpoints (--checkpoint NAME):")
        for name in shipped_names():
            model = max((m for m in model_names() if name.startswith(m)), key=len, default="?")
            click.echo(f"  {name:<26} {model}" + (" (its default weights)" if name in defaults else ""))
    if what in ("all", "attacks"):
        from miarobust.attacks import ATTACKS, PRESETS, ST_SUFFIX

        click.echo("attacks:")
        for a in ATTACKS.values():
            click.echo(f"  {a.name:<16} {a.summary}")
        click.echo(f"  (NAME{ST_SUFFIX}: a gradient attack through straight-through gates, e.g. autoattack{ST_SUFFIX})")
        click.echo("presets:")
        for name, summary in PRESETS.items():
            click.echo(f"  {name:<16} {summary}")
    if what in ("all", "datasets"):
        from miarobust.data import DATASETS

        click.echo("datasets:")
        for name, fn in DATASETS.items():
            click.echo(f"  {name:<14} {(fn.__doc__ or '').strip().splitlines()[0]}")


@cli.command("flops")
@model_option("deit_s")
@click.option("--img-size", type=click.IntRange(min=8), default=None)
@click.option("--num-classes", type=click.IntRange(min=1), default=None)
def flops_cmd(model: str, img_size: int | None, num_classes: int | None) -> None:
    """Print the static model's GMACs per image (DeiT convention), and a fixed-compute peer's own."""
    from miarobust.models import create
    from miarobust.models.flops import VitDims, controller_macs, static_macs

    m = create(model, pretrained=False, img_size=img_size, num_classes=num_classes)
    dims = VitDims.of(m)
    gmacs = static_macs(dims) / 1e9
    shown = f"{gmacs:.2f}" if gmacs >= 1 else f"{gmacs:.3g}"  # 4.60 for DeiT-S, 0.0118 for vit_fmnist
    click.echo(f"{model}: {shown} GMACs per image at {dims.num_patches} patches "
               f"({sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters)")
    if model.startswith("mia_"):
        click.echo(f"  controller: {dims.depth * controller_macs(dims) / 1e9:.5f} GMACs when every block runs its decision heads")
    fixed = getattr(m, "macs_per_image", None)  # a fixed-compute peer: the same MACs on every image
    if fixed is not None:
        click.echo(f"  with its mechanism: {fixed() / 1e9:.4g} GMACs per image, {fixed() / static_macs(dims):.3f} of the "
                   "static model's")


@cli.command("train")
@model_option("vit_fmnist")
@click.option("--data", default="fashion-mnist", show_default=True)
@click.option("--data-root", default=None)
@click.option("--out", default=None, help="Run folder (default runs/<model>[-b<budget>]); rerun to resume.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default 12 (static) / 4 (MIA).")
@click.option("--augment/--no-augment", default=False, show_default=True, help="Random shifts (2 px) and flips.")
@click.option("--timm-augment", is_flag=True, help="DeiT's training augmentation from timm (RandAugment, random "
              "resized crops, flips, random erasing) on --data folder or imagenet; off for fine-tuning a controller.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=Finite(min=0, min_open=True), default=None, help="Default 1e-3 (static) / 5e-4 backbone, 10x for the controller (MIA).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--accum-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches of --batch-size per optimizer step (gradient accumulation): the batch the optimizer "
              "sees is batch size x accum steps x ranks.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loading worker processes (0: in the training process).")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="Mixed precision of the training steps (default: bf16 on CUDA, off on the CPU; fp16 needs CUDA).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier outputs (default: the model's own; a folder with more classes needs it).")
@click.option("--init", default=None, help="Checkpoint to start from. Adaptive models and peers: a static one "
              "(default: the shipped weights of the backbone, e.g. vit_fmnist) or one of the same model, for a "
              "further stage.")
@click.option("--teacher", default=None, help="Adaptive models: static checkpoint distilled from (default: --init if static, "
              "else the shipped one).")
@click.option("--kd-weight", type=Finite(min=0), default=1.0, show_default=True,
              help="Adaptive models: weight of the logits distillation loss.")
@click.option("--budget", type=Finite(0.05, 1.0), default=None,
              help="Adaptive models (mia_, adavit_, dynamicvit_, avit_): target share of the static model's cost (MACs, or "
              "batch-1 time with --cost latency); ToMe and EViT (tome_, evit_): chooses the r or keep rate nearest it.")
@click.option("--cost", type=click.Choice(["macs", "latency"]), default="macs", show_default=True,
              help="MIA: what the budget and the reward count: MACs, or the batch-1 time predicted by a latency "
              "table measured on --device when the run starts (latency-aware controller).")
@click.option("--latency-table", default=None, help="MIA with --cost latency: a latency.json of an earlier run "
              "to train against instead of measuring one.")
@click.option("--model-kwargs", default="", help="More model arguments, saved with the weights and used again when "
              "they load: ToMe's r=8, EViT's keep_rate=0.7.")
@click.option("--rl-weight", type=Finite(min=0), default=1.0, show_default=True, help="MIA: weight of the REINFORCE loss.")
@click.option("--flops-lambda", type=Finite(min=0), default=1.0, show_default=True, help="MIA: reward = correct - lambda * cost ratio.")
def train_cmd(model: str, out: str | None, epochs: int | None, lr: float | None, budget: float | None, cost: str,
              latency_table: str | None, rl_weight: float, flops_lambda: float, teacher: str | None, kd_weight: float,
              **kw: Any) -> None:
    """Train a static ViT; or, from a trained static ViT, MIA-Former's controller and backbone (hybrid SL + RL) or a
    dynamic-ViT peer (AdaViT's decisions, DynamicViT's token scorers, A-ViT's halting), or fine-tune ToMe or EViT
    with their token reduction on."""
    from miarobust.evaluator import resolve_device
    from miarobust.models.registry import format_model_kwargs, parse_model_kwargs
    from miarobust.train.loop import TrainConfig, resolve_amp

    kw["amp"] = resolve_amp(kw["amp"], resolve_device(kw["device"]))
    model_args = parse_model_kwargs(kw["model_kwargs"])
    kw["model_kwargs"] = format_model_kwargs(model_args)  # one spelling
    if {"gate_mode", "num_classes"} & set(model_args):
        raise UserError("--model-kwargs cannot set gate_mode (training chooses the decisions it trains through) or "
                        "num_classes (use --num-classes).")
    if model.startswith("adavit_") and rl_weight:
        click.echo("AdaViT trains without MIA-Former's reinforcement-learning half: --rl-weight 0", err=True)
        rl_weight = 0.0
    mia, dynamic = model.startswith(("mia_", "adavit_")), model.startswith(("dynamicvit_", "avit_"))
    fixed = model.startswith(("tome_", "evit_"))  # fine-tuned with their token reduction on, no decision to learn
    if (mia or dynamic) and budget is None:
        raise UserError(f"{model} training needs --budget, the target share of the static model's cost (MACs, or "
                        "batch-1 time with --cost latency for MIA-Former), e.g. 0.7.")
    if not (mia or dynamic or fixed) and (budget is not None or teacher is not None):
        raise UserError("--budget and --teacher apply to the adaptive models and the token-reduction peers (mia_*, "
                        "adavit_*, dynamicvit_*, avit_*, tome_*, evit_*) only.")
    if not mia and (cost != "macs" or latency_table is not None):
        raise UserError("--cost and --latency-table apply to MIA-Former models (mia_*) only.")
    if latency_table is not None and cost != "latency":
        raise UserError("--latency-table is the table of --cost latency: add --cost latency, or leave it out.")
    adaptive = mia or dynamic or fixed
    variant = "".join(f"-{k}{v}" for k, v in sorted(model_args.items()))  # -r8
    out = out or (f"runs/{model}{variant}-{'lat' if cost == 'latency' else 'b'}{budget:g}" if budget is not None else
                  f"runs/{model}{variant}")
    extra = ({"rl_weight": rl_weight, "flops_lambda": flops_lambda, "kd_weight": kd_weight, "teacher": teacher,
              "cost": cost, "latency_table": latency_table} if mia else
             {"kd_weight": kd_weight, "teacher": teacher} if dynamic or fixed else {})
    cfg = TrainConfig(model=model, out=out, epochs=epochs or (4 if adaptive else 12), lr=lr or (5e-4 if adaptive else 1e-3),
                      budget=budget, extra=extra, **kw)
    from miarobust.distributed import distributed_context, stop_on_sigterm
    from miarobust.results import missing_folders, remove_folders

    created = missing_folders(out)
    # under torchrun: one rank per process, train/ranks.py; a kill (SIGTERM, torchrun's or a user's) is an interrupt
    with distributed_context(cfg) as (rank, world), stop_on_sigterm() as sigterm:
        try:
            if mia:
                from miarobust.train.mia import train_mia

                train_mia(cfg)
            elif model.startswith("avit_"):
                from miarobust.train.avit import train_avit

                train_avit(cfg)
            elif dynamic:
                from miarobust.train.dynamicvit import train_dynamicvit

                train_dynamicvit(cfg)
            elif fixed:
                from miarobust.train.fixed import train_fixed

                train_fixed(cfg)
            else:
                from miarobust.train.static import train_static

                train_static(cfg)
        except BaseException as e:
            sigterm.stopping = True  # first: torchrun's SIGTERM, arriving as this rank sees a lost peer, is ignored now
            unfinished = bool(created) and not (Path(out) / "state.pt").exists()  # no epoch finished: nothing to resume
            if unfinished and rank == 0:
                remove_folders(created)
            from miarobust.distributed import RankStopped, lost_a_rank

            if world > 1 and (isinstance(e, RankStopped) or lost_a_rank(e)):
                click.echo(f"rank {rank}: stopped because another rank of this torchrun failed or was killed (torchrun's "
                           "report names it); " + ("no epoch had finished: nothing to resume." if unfinished else
                           f"finished epochs are kept in {out}: run the same command again, on any number of ranks, "
                           "to resume."), err=True)
                sys.exit(143 if isinstance(e, RankStopped) else 1)
            if not isinstance(e, KeyboardInterrupt):
                raise
            if rank == 0:
                click.echo("interrupted before the first epoch finished: nothing was kept." if unfinished else
                           f"interrupted: finished epochs are kept in {out}; run the same command again to resume.",
                           err=True)
            sys.exit(130)
    if rank != 0:
        return
    click.echo(f"done: weights in {out}/model.safetensors, log in {out}/log.csv, curves in {out}/curves.png")


@cli.command("report")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", default=None, help="Folder for report.md/.csv/.tex and the plots (default: PATH).")
@click.option("--pdf", is_flag=True, help="Write every plot as PDF too.")
@click.option("--robustbench", is_flag=True, help="Also write RobustBench model-info JSON per model (robustbench/).")
def report_cmd(path: str, out: str | None, pdf: bool, robustbench: bool) -> None:
    """Tables and plots from every run folder below PATH (unfinished or corrupt runs are skipped)."""
    from miarobust.report import write_report

    rep = write_report(path, out, pdf=pdf, robustbench=robustbench)
    click.echo(f"{len(rep.runs)} runs reported, {len(rep.skipped)} skipped; wrote {len(rep.files)} files into {rep.out}:")
    for f in rep.files:
        click.echo(f"  {f.relative_to(rep.out)}")
    for s in rep.skipped:
        click.echo(f"skipped {s.folder}: {s.reason}")


@cli.command("worst")
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder that receives one worst-case folder per group of runs.")
def worst_cmd(paths: tuple[str, ...], out: str) -> None:
    """Each image's worst case over the runs below PATHS of the same model, weights, data and threat model."""
    from miarobust.worst import worst_case

    for res in worst_case(list(paths), out):
        click.echo(res.line())


@cli.command("regress")
@click.option("--baseline", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder of committed reference runs (e.g. results/baseline).")
@click.option("--runs", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder of new runs to compare (same folder names); default: re-run the baseline's configs.")
@click.option("--level", type=Finite(0, 1, min_open=True, max_open=True), default=0.01, show_default=True,
              help="Significance level of the one-sided drop test.")
@click.option("--tolerance", type=Finite(0, 1, max_open=True), default=None,
              help="Instead of the test: a regression is an accuracy drop larger than this (e.g. 0.02).")
@click.option("--out", default=None, help="Keep re-runs in this folder (default: a temporary folder).")
@click.option("--device", default=None, help="Device for re-runs (default: the recorded one).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Re-run in this many processes, the CPU threads split between them (2 on a 2-core CPU: ~1.6x faster).")
def regress_cmd(baseline: str, runs: str | None, level: float, tolerance: float | None, out: str | None,
                device: str | None, jobs: int) -> None:
    """Compare clean and robust accuracy with a baseline; exit 1 when a drop is beyond the noise."""
    from miarobust.evaluator import resolve_device
    from miarobust.regress import REGRESSED, RegressConfig, format_table, regress

    if device is not None:
        resolve_device(device)
    table = regress(RegressConfig(baseline, runs, level, tolerance, out, device, jobs))
    click.echo(format_table(table, level, tolerance))
    if (table["status"] == REGRESSED).any():
        sys.exit(1)


def main() -> None:
    """Console entry point: UserError -> one line on stderr, exit 2."""
    from miarobust.attacks.threat import ThreatModelViolation

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except ThreatModelViolation as e:
        click.echo(f"error: threat model violated, no number reported: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
