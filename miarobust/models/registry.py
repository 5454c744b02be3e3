"""Create a registered model by name, with weights from a local file, checked before they load.

Loading never executes code: safetensors, or `torch.load(weights_only=True)` for timm's `.pth` files.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import timm
import torch

from miarobust.errors import UserError, unknown_name
from miarobust.models.vit import shipped_checkpoint, shipped_names

#: CLI names: the static baselines, the MIA-Former models and the dynamic-ViT peers (all timm entrypoints of this
#: package), by family.
STATIC_MODELS = ("vit_fmnist", "deit_t", "deit_s", "deit_b")
MIA_MODELS = ("mia_vit_fmnist", "mia_deit_t", "mia_deit_s", "mia_deit_b")
PEER_MODELS = ("dynamicvit_vit_fmnist", "dynamicvit_deit_t", "dynamicvit_deit_s", "dynamicvit_deit_b",
               "avit_vit_fmnist", "avit_deit_t", "avit_deit_s", "avit_deit_b",
               "adavit_vit_fmnist", "adavit_deit_t", "adavit_deit_s", "adavit_deit_b",
               "tome_vit_fmnist", "tome_deit_t", "tome_deit_s", "tome_deit_b",
               "evit_vit_fmnist", "evit_deit_t", "evit_deit_s", "evit_deit_b")
FAMILIES = {"static ViT": STATIC_MODELS, "MIA-Former": MIA_MODELS, "DynamicViT": PEER_MODELS[:4],
            "A-ViT": PEER_MODELS[4:8], "AdaViT": PEER_MODELS[8:12], "ToMe": PEER_MODELS[12:16], "EViT": PEER_MODELS[16:]}


def model_names() -> list[str]:
    """Every model name `create` takes: this package's timm entrypoints."""
    import miarobust.models  # noqa: F401  (registers them)

    return [n for n in STATIC_MODELS + MIA_MODELS + PEER_MODELS if timm.is_model(n)]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (checkpoints: which weights a result was computed with)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(checkpoint: str | os.PathLike[str]) -> str:
    """The file of `checkpoint`: a path, `timm:NAME` (timm's pretrained weights from the Hugging Face cache), or the
    name of a shipped checkpoint (a file of that name wins)."""
    text = str(checkpoint)
    if text.startswith("timm:"):
        return timm_weights(text.removeprefix("timm:"))
    if text not in shipped_names() or Path(text).expanduser().exists():
        return text
    return shipped_checkpoint(f"{text}.safetensors")


def hub_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def timm_weights(name: str) -> str:
    """The file of timm's pretrained weights `name` (e.g. deit_small_patch16_224, or with a tag: .fb_in1k): from
    the Hugging Face cache where timm keeps them, else downloaded; a UserError saying how to get them offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise UserError(f"timm has no pretrained weights named '{name}': use a name of timm.list_pretrained(), e.g. "
                        "timm:deit_small_patch16_224.")
    repo, cache = cfg.hf_hub_id, hub_cache()
    for filename in ("model.safetensors", "pytorch_model.bin"):  # the files timm's own loader tries
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(found, str):
            return found
    try:
        return hf_hub_download(repo, "model.safetensors", cache_dir=cache)
    except Exception:  # noqa: BLE001  (offline, no such file, a proxy error: each means "not here")
        folder = "models--" + repo.replace("/", "--")
        raise UserError(f"timm's {name} weights are not in the Hugging Face cache ({cache}) and cannot be downloaded "
                        f"here: on a machine with internet run python -c \"import timm; timm.create_model('{name}', "
                        f"pretrained=True)\" and copy its cache folder {folder} into {cache}.") from None


def _default_weights(model: torch.nn.Module) -> str | None:
    """The shipped weights file of a built model, if the package has it."""
    shipped = model.pretrained_cfg.get("file")
    return shipped if shipped and Path(shipped).is_file() else None


def weights_file(name: str, checkpoint: str | os.PathLike[str] | None = None) -> str | None:
    """The file `create(name, checkpoint)` loads its weights from (None: it has none and starts random)."""
    return resolve_checkpoint(checkpoint) if checkpoint else _default_weights(timm.create_model(name))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a timm/torch checkpoint, never unpickling code."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder: pass the .safetensors or .pth file inside it (a training run "
                        "keeps model.safetensors), or a shipped name.")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass --checkpoint with an existing .safetensors or .pth "
                        f"file, or a shipped name ({', '.join(shipped_names())}).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's notes on foreign pickles: the outcome is reported below
                warnings.simplefilter("ignore")
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any parse failure of a foreign file is the user's file problem)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # torch's weights_only refusal: name what it refused
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            first = f"it refers to {found.group(1)}" if found else "it holds objects other than tensors"
        raise UserError(
            f"checkpoint {path} cannot be read safely ({first}): it is truncated, corrupt, or a pickle that "
            "carries code (a whole model saved with torch.save(model)?). Use a .safetensors file, or save the "
            "state dict: torch.save(model.state_dict(), path)."
        ) from e
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors: save the model's state dict, "
                        "torch.save(model.state_dict(), path).")
    return {k.removeprefix("module."): v for k, v in sd.items()}


#: timm's pretrained DeiT of each short name: where a user gets weights for it.
TIMM_NAMES = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}


def how_to_get(name: str) -> str:
    """One sentence on getting weights for model `name` (timm's, for the DeiTs)."""
    base = re.sub(r"^(mia|dynamicvit|avit|adavit|tome|evit)_", "", name)
    if base in TIMM_NAMES:
        fetch = (f"timm's {TIMM_NAMES[base]} weights fit: --checkpoint timm:{TIMM_NAMES[base]} reads them from the "
                 f"Hugging Face cache (fetched once on a machine with internet by python -c \"import timm; "
                 f"timm.create_model('{TIMM_NAMES[base]}', pretrained=True)\")")
        if name == base or name.startswith(("tome_", "evit_")):
            return fetch
        mechanism = {"mia": "MIA-Former's controller", "dynamicvit": "DynamicViT's token scorers",
                     "avit": "A-ViT's halting", "adavit": "AdaViT's decision networks"}[name.split("_")[0]]
        return (f"{fetch}, with {mechanism} untrained; train it from them with `miarobust "
                f"train --model {name} --init timm:{TIMM_NAMES[base]} --data imagenet --data-root DIR --budget 0.7` "
                "(README: the paper's setting)")
    if name.startswith("dynamicvit_"):
        return "its token scorers need training: pass a checkpoint of it (a static one leaves them untrained)"
    if name.startswith("avit_"):
        return (f"its halting is learned: train it with `miarobust train --model {name} --init {base} --budget 0.5`, "
                "or pass a checkpoint of it trained for halting (a static checkpoint loads, and hardly halts)")
    return f"train it with `miarobust train --model {name}`, or pass a timm-format state dict of it"


def parse_model_kwargs(text: str) -> dict[str, Any]:
    """timm model arguments from "in_chans=1,patch_size=4,img_size=28": ints, floats, true/false, else text."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isidentifier() or not value:
            raise UserError(f"--model-kwargs '{part}' is not NAME=VALUE: write e.g. in_chans=1,patch_size=4,img_size=28.")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def format_model_kwargs(kwargs: dict[str, Any]) -> str:
    """Model arguments as --model-kwargs takes them, sorted by name: {"r": 8} -> "r=8"."""
    return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))


def canonical_model_kwargs(text: str) -> str:
    """One spelling of model arguments, sorted by name ("r=8,keep_rate=0.7" -> "keep_rate=0.7,r=8"): one folder."""
    return format_model_kwargs(parse_model_kwargs(text))


def saved_model_kwargs(path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The model arguments a checkpoint of model `name` was trained with (`miarobust train --model-kwargs`, kept in
    its safetensors metadata beside the model's name, e.g. ToMe's r=8): the model is built with them unless the
    caller passes others. {} for other files and for another model's checkpoint (ToMe's weights in the static ViT)."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return parse_model_kwargs(meta.get("model_kwargs", "")) if meta.get("model") == name else {}


def infer_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ViT arguments a state dict fixes: in_chans and patch_size (patch_embed.proj.weight (E, C, p, p)),
    img_size (pos_embed's patch tokens, a square grid), num_classes (head.weight); {} for what it lacks."""
    arch: dict[str, Any] = {}
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4 and proj.shape[-1] == proj.shape[-2]:
        arch["in_chans"], arch["patch_size"] = int(proj.shape[1]), int(proj.shape[-1])
        pos = sd.get("pos_embed")
        if pos is not None and pos.dim() == 3:
            prefix = int("cls_token" in sd) + int("dist_token" in sd)
            grid = math.isqrt(max(pos.shape[1] - prefix, 0))
            if grid and grid * grid == pos.shape[1] - prefix:
                arch["img_size"] = grid * arch["patch_size"]
    head = sd.get("head.weight")
    if head is not None and head.dim() == 2:
        arch["num_classes"] = int(head.shape[0])
    return arch


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `sd` into `model` after timm's filter (position-embedding resize); only controller keys may be missing,
    and those are returned (a static checkpoint in an MIA model: the controller keeps its initial weights)."""
    from timm.models.deit import checkpoint_filter_fn

    sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise UserError(
            f"checkpoint {source} is for another architecture or class count ({wrong[0]}"
            f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}): pick the matching --model or --num-classes."
        )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    controller = [k for k in missing if k.startswith("controller.")]
    missing = [k for k in missing if not k.startswith("controller.")]
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise UserError(
            f"checkpoint {source} does not match the model ({'missing' if missing else 'unexpected'} keys "
            f"{', '.join(names)}...): pick the matching --model."
        )
    return controller


def create(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> torch.nn.Module:
    """Model `name` in eval mode with weights from `checkpoint` (a file or a shipped name), else its shipped weights
    (a UserError if it has none; `pretrained=False` builds it with random weights instead).

    kwargs go to timm (num_classes, img_size, in_chans, patch_size, gate_mode, ...); None values keep the model's
    defaults. A checkpoint file's own shapes set in_chans, patch_size, img_size and num_classes where kwargs do
    not (infer_arch): a 1-channel 28x28 patch-4 DeiT-T state dict builds that model; the model arguments it was
    trained with (saved_model_kwargs, e.g. ToMe's r) apply too, unless kwargs set them.
    """
    names = model_names()
    if name not in names:
        raise unknown_name("model", name, names)
    source = resolve_checkpoint(checkpoint) if checkpoint else None
    state = read_state_dict(source) if source else None
    saved = saved_model_kwargs(source, name) if source else {}
    kwargs = {**(infer_arch(state) if state is not None else {}), **saved,
              **{k: v for k, v in kwargs.items() if v is not None}}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"cannot build {name} with {kwargs}: {e}") from e
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    size = kwargs.get("img_size")
    if patch is not None and isinstance(size, int) and size % patch[0]:  # timm would silently drop the rest
        raise UserError(f"--img-size {size} is not a multiple of {name}'s patch size {patch[0]}: use e.g. "
                        f"{max(1, round(size / patch[0])) * patch[0]}.")
    if source is None and pretrained:
        source = _default_weights(model)
        state = read_state_dict(source) if source else None
    if source is not None and state is not None:
        untrained = load_weights(model, state, source)
        if untrained and pretrained:  # evaluating, not training from a static checkpoint
            logging.getLogger(__name__).warning(
                "%s holds no controller weights (a static checkpoint?): %s runs with an untrained controller, every "
                "gate open with p = 0.95", source, name)
    elif pretrained:  # numbers from random weights mean nothing: say what to pass instead of making them
        raise UserError(f"{name} has no shipped weights and none were given: pass a checkpoint of it (.pth or "
                        f".safetensors); {how_to_get(name)}.")
    model.checkpoint = source  # recorded in config.json
    return model.eval()
