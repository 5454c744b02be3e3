"""Models registered with timm: static baselines (vit.py) and MIA-Former (mia_former.py)."""

from __future__ import annotations

from miarobust.models import mia_former, vit  # noqa: F401  (registration side effect)
from miarobust.models.registry import create, model_names  # noqa: F401
