"""Models registered with timm: static baselines (vit.py), MIA-Former (mia_former.py) and the dynamic-ViT peers
(dynamicvit.py, avit.py, adavit.py, tome.py); the adaptive ones implement models/adaptive.py's protocol."""

from __future__ import annotations

from miarobust.models import adavit, avit, dynamicvit, evit, mia_former, tome, vit  # noqa: F401  (registration side effect)
from miarobust.models.registry import create, model_names  # noqa: F401
