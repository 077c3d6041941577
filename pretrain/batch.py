"""A training batch: named tensors, the keyword arguments of the model's forward (input_ids or
images, and labels). Data makes them, tasks mix them, engines feed them to the model."""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]
