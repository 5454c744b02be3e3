"""miarobust: accuracy, FLOPs and adversarial robustness of input-adaptive vision transformers (MIA-Former).

Import `miarobust.models` to register the models with timm (kept out of here so the CLI starts fast).
"""

from __future__ import annotations

__version__ = "0.1.0"
