"""Small shared pieces for our nn.Modules."""

from __future__ import annotations

import torch


class DeviceDtypeMixin:
    """``device``/``dtype`` read from the module's first parameter (as diffusers models have)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]
