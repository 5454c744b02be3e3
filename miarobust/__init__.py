"""miarobust: accuracy, FLOPs and adversarial robustness of input-adaptive vision transformers (MIA-Former).

The Python API (see README, "Python API"):

- `miarobust.evaluate(model, attack=..., eps=..., data=...)`: `miarobust run` for a registered name or any
  nn.Module; the same results folder, threat-model check, sanity checks and per-image MACs.
- `miarobust.Attack(name, model, eps=...)`: one registered attack as a function of (images, labels).

`import miarobust` registers the models with timm (`timm.create_model("mia_deit_s")` works after it). So that
the command line starts fast (`miarobust --help` imports neither torch nor timm), the registration runs
when timm is imported: at once if it already is, else right after timm's own import, whoever imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["Attack", "evaluate", "__version__"]


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when timm is first imported, has miarobust.models imported right after it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        loader, run = spec.loader, spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            importlib.import_module("miarobust.models")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    importlib.import_module("miarobust.models")
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "Attack"):
        from miarobust import api

        return getattr(api, name)
    raise AttributeError(f"module 'miarobust' has no attribute {name!r}")
