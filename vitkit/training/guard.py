"""Stop a run whose loss became NaN or infinite, without making the CPU wait for the GPU every step.

The obvious guard, ``if not torch.isfinite(loss): raise``, reads a device tensor on the host: the CPU
stops until every kernel queued so far has run, and the GPU then idles while the CPU prepares the
next step. :class:`NonFiniteLossGuard` keeps the same promise (the weights never take a step computed
from a non-finite loss, and the run stops with the step, epoch and learning rate in the message)
without that wait on the fast path — fused AdamW and no fp16 loss scaler:

1. the loss's finiteness is computed on the device and handed to the fused optimiser as
   ``found_inf``, the hook PyTorch's ``GradScaler`` uses: a non-finite step leaves the weights and the
   optimiser state untouched, decided on the device;
2. the loss is copied to the host asynchronously (into pinned memory, behind an event) and looked at
   one step later: by then that copy has long finished, so waiting for its event does not drain the
   queue (``loss.item()`` would wait for everything queued on the stream, this step's work included).
   A non-finite loss raises :class:`NonFiniteLossError` naming the step where it went bad.

Gradient accumulation changes nothing: a bad micro-batch that is not the last of its step is
reported at the next micro-batch, before the step that would apply it; the last one's own flag
skips the step.

In every other setting the loss is checked at once, as a plain training loop does.

With several processes (DDP) the flag "this process's loss is not finite" is all-reduced (max)
before it is used, on the device and without a wait: every process then skips the same step and
stops at the same point. A process that stopped alone would leave the others waiting forever in
the next collective (the gradient all-reduce, a checkpoint's barrier).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of continuing on garbage."""


def _message(loss: float, where: str) -> str:
    what = "The training loss of another process" if math.isfinite(loss) else f"The training loss is {loss}"
    return (
        f"{what} at {where}. Training stopped so it does not continue on garbage. "
        "Try a lower --model.lr, a longer warmup, --trainer.gradient_clip_val 1.0, or "
        "bf16-mixed instead of 16-mixed precision; check the inputs for NaNs."
    )


def any_process(flag: torch.Tensor) -> torch.Tensor:
    """The maximum of ``flag`` over all processes of the default group (1 if any has 1), in place.

    An all-reduce queued on the device: with NCCL the host does not wait for it.
    """
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


class NonFiniteLossGuard:
    """Check each training loss; raise :class:`NonFiniteLossError` on NaN/inf (see the module doc)."""

    def __init__(self) -> None:
        # the last unchecked step: host copies of its loss and of its (all-processes) bad-step flag, the
        # event those copies are ready at, and where the step was
        self._pending: tuple[torch.Tensor, torch.Event | None, str] | None = None
        self._armed: torch.optim.Optimizer | None = None  # the optimiser whose found_inf we set

    @staticmethod
    def can_defer(optimizer: torch.optim.Optimizer | None, scaler: object) -> bool:
        """True when a bad step can be skipped on the device: a fused Adam/AdamW and no GradScaler
        (it owns ``found_inf``)."""
        fused = optimizer is not None and bool(optimizer.defaults.get("fused"))
        return fused and scaler is None

    def check(
        self,
        loss: torch.Tensor,
        where: str,
        optimizer: torch.optim.Optimizer | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Check ``loss`` now (``optimizer`` None) or defer it to the next call, skipping the
        optimiser step on the device meanwhile (``optimizer`` given: see :meth:`can_defer`).
        ``reduce`` combines the bad-step flag (a 0-d float, 1 = not finite) over processes, e.g.
        :func:`any_process`; every process must call this at the same steps.

        Returns the newest loss already on the host, as a CPU tensor, for display: this step's when
        checked at once, the previous step's when deferred (None when there is none yet).
        """
        shown = self.flush()
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).float()
        if reduce is not None:
            bad = reduce(bad)
        pair = torch.stack([loss.float(), bad])
        if optimizer is None:
            value, stop = pair.tolist()  # waits for the device: the price of checking at once
            if stop:
                raise NonFiniteLossError(_message(value, where))
            return torch.tensor(value)
        optimizer.found_inf = bad  # read by the fused kernel: 1 = skip this step
        self._armed = optimizer
        ready = None
        if pair.device.type != "cpu":
            ready = torch.Event(device=pair.device)
        host = pair.to("cpu", non_blocking=True)
        if ready is not None:
            ready.record()
        self._pending = (host, ready, where)
        return shown

    def flush(self) -> torch.Tensor | None:
        """Look at the deferred step, if any: raise if its loss (on any process) was not finite,
        else return the loss (CPU)."""
        if self._pending is None:
            return None
        host, ready, where = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()  # that copy only (queued a step ago): not the work queued since
        value, stop = host.tolist()  # a host tensor: no device involved
        if stop:
            self.disarm()
            raise NonFiniteLossError(_message(value, where))
        return torch.tensor(value)

    def disarm(self) -> None:
        """Remove ``found_inf`` from the optimiser, so later steps (another fit) are not skipped."""
        if self._armed is not None and hasattr(self._armed, "found_inf"):
            del self._armed.found_inf
        self._armed = None
