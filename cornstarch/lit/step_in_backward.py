"""The optimizer step fused into the backward pass: each parameter is updated as soon as its gradient is complete.

A train step normally holds every gradient at once (after ``backward``, until ``optimizer.step()``). Stepping each
parameter from its post-accumulate-grad hook, then dropping its gradient, keeps at most a few gradients alive:
peak memory falls by about the size of the trainable parameters. The optimizer object, its param groups, state,
learning-rate schedule and checkpoints stay exactly as they are: the hook calls the same ``optimizer.step()``
while only that parameter has a gradient, so the update is the same (the same kernel on fewer tensors).

Not compatible with what needs all gradients at once: gradient clipping by global norm, gradient accumulation
over batches, data-parallel gradient reduction (DDP/FSDP).

>>> model = torch.nn.Linear(4, 2)
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
>>> with StepInBackward(optimizer):
...     model(torch.ones(1, 4)).sum().backward()   # parameters updated here; no gradient left behind
>>> model.weight.grad is None
True
"""

from __future__ import annotations

from typing import Any

import torch


class StepInBackward:
    """Hooks that step ``optimizer`` for each of its parameters during backward.

    Use as a context manager around the forward/backward, or :meth:`attach`/:meth:`detach` for a whole run;
    call :meth:`attach` again after ``add_param_group`` to hook the new parameters.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose ``step()`` skips parameters without a gradient (all of
            torch's do).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._handles: dict[int, Any] = {}

    def _step(self, param: torch.Tensor) -> None:
        self.optimizer.step()  # only ``param`` has a gradient now: the others were stepped and cleared
        param.grad = None

    def attach(self) -> "StepInBackward":
        """Hook every parameter of the optimizer not hooked yet (dropping any gradient it holds already, which
        the next hook's ``step()`` would otherwise apply early)."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in self._handles:
                    param.grad = None
                    self._handles[id(param)] = param.register_post_accumulate_grad_hook(self._step)
        return self

    def detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "StepInBackward":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()
