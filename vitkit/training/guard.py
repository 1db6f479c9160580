"""Stop a run whose loss became NaN or infinite, without making the CPU wait for the GPU every step.

The obvious guard, ``if not torch.isfinite(loss): raise``, reads a device tensor on the host: the CPU
stops until every kernel queued so far has run, and the GPU then idles while the CPU prepares the
next step. :class:`NonFiniteLossGuard` keeps the same promise (the weights never take a step computed
from a non-finite loss, and the run stops with the step, epoch and learning rate in the message)
without that wait on the fast path — one process, fused AdamW, no fp16 loss scaler, no gradient
accumulation:

1. the loss's finiteness is computed on the device and handed to the fused optimiser as
   ``found_inf``, the hook PyTorch's ``GradScaler`` uses: a non-finite step leaves the weights and the
   optimiser state untouched, decided on the device;
2. the loss is copied to the host asynchronously (into pinned memory, behind an event) and looked at
   one step later: by then that copy has long finished, so waiting for its event does not drain the
   queue (``loss.item()`` would wait for everything queued on the stream, this step's work included).
   A non-finite loss raises :class:`NonFiniteLossError` naming the step where it went bad.

In every other setting the loss is checked at once, as a plain training loop does.
"""

from __future__ import annotations

import math

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of continuing on garbage."""


def _message(loss: float, where: str) -> str:
    return (
        f"The training loss is {loss} at {where}. Training stopped so it does not continue on garbage. "
        "Try a lower --model.lr, a longer warmup, --trainer.gradient_clip_val 1.0, or "
        "bf16-mixed instead of 16-mixed precision; check the inputs for NaNs."
    )


class NonFiniteLossGuard:
    """Check each training loss; raise :class:`NonFiniteLossError` on NaN/inf (see the module doc)."""

    def __init__(self) -> None:
        # the last unchecked loss: its host copy, the event that copy is ready at, and where it came from
        self._pending: tuple[torch.Tensor, torch.Event | None, str] | None = None
        self._armed: torch.optim.Optimizer | None = None  # the optimiser whose found_inf we set

    @staticmethod
    def can_defer(optimizer: torch.optim.Optimizer | None, single_step_source: bool, scaler: object) -> bool:
        """True when a bad step can be skipped on the device: a fused Adam/AdamW, a step made from
        this one loss (one process: another rank's flag would not reach this optimiser; no gradient
        accumulation: an earlier micro-batch's would not), and no GradScaler (it owns ``found_inf``)."""
        fused = optimizer is not None and bool(optimizer.defaults.get("fused"))
        return fused and single_step_source and scaler is None

    def check(
        self, loss: torch.Tensor, where: str, optimizer: torch.optim.Optimizer | None
    ) -> torch.Tensor | None:
        """Check ``loss`` now (``optimizer`` None) or defer it to the next call, skipping the
        optimiser step on the device meanwhile (``optimizer`` given: see :meth:`can_defer`).

        Returns the newest loss already on the host, as a CPU tensor, for display: this step's when
        checked at once, the previous step's when deferred (None when there is none yet).
        """
        shown = self.flush()
        loss = loss.detach()
        if optimizer is None:
            value = loss.item()  # waits for the device: the price of checking at once
            if not math.isfinite(value):
                raise NonFiniteLossError(_message(value, where))
            return torch.tensor(value)
        optimizer.found_inf = (~torch.isfinite(loss)).float()  # read by the fused kernel: 1 = skip
        self._armed = optimizer
        ready = None
        if loss.device.type != "cpu":
            ready = torch.Event(device=loss.device)
        host = loss.to("cpu", non_blocking=True)
        if ready is not None:
            ready.record()
        self._pending = (host, ready, where)
        return shown

    def flush(self) -> torch.Tensor | None:
        """Look at the deferred loss, if any: raise if it was not finite, else return it (CPU)."""
        if self._pending is None:
            return None
        host, ready, where = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()  # that copy only (queued a step ago): not the work queued since
        value = host.item()  # a host tensor: no device involved
        if not math.isfinite(value):
            self.disarm()
            raise NonFiniteLossError(_message(value, where))
        return torch.tensor(value)

    def disarm(self) -> None:
        """Remove ``found_inf`` from the optimiser, so later steps (another fit) are not skipped."""
        if self._armed is not None and hasattr(self._armed, "found_inf"):
            del self._armed.found_inf
        self._armed = None
