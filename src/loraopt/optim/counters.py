"""Counting the steps an optimizer skipped without waiting for the device: :class:`SkippedStepCounter` (the
rate-limited warning and ``skipped_steps``) and :class:`DeferredHostRead` (a device value copied to the host
without blocking), which the PSI family also uses for its solve-fallback counters."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .checks import group_label

__all__ = ["DeferredHostRead", "SkippedStepCounter"]


class DeferredHostRead:
    """Read a device value on the host without waiting for the device.

    ``start(value)`` copies ``value`` into pinned host memory with a non-blocking copy and records a CUDA event behind
    it; ``poll()`` returns the host copy once that event has completed (``None`` before), so the caller picks the value
    up at a later step instead of stalling the launch queue now.  Values on the CPU are ready at once (there is no
    device to wait for); on other devices (no events to poll) ``start`` reads at once, which synchronises.  One copy is
    in flight at a time: ``start`` while one is pending does nothing (``pending`` tells).
    """

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None
        self._event: Optional[Any] = None
        self._ready: Optional[Tensor] = None

    @property
    def pending(self) -> bool:
        return self._event is not None

    def start(self, value: Tensor) -> None:
        if self._event is not None:
            return
        value = value.detach()
        if value.device.type == "cuda":
            if self._buffer is None or self._buffer.shape != value.shape or self._buffer.dtype != value.dtype:
                self._buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._buffer.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            return
        self._ready = value.clone() if value.device.type == "cpu" else value.to("cpu")

    def poll(self) -> Optional[Tensor]:
        """The host value of the last completed copy (once; ``None`` while it is in flight or when there is none)."""
        if self._event is not None and self._event.query():
            self._event = None
            self._ready = self._buffer.clone()
        ready, self._ready = self._ready, None
        return ready

    def wait(self) -> Optional[Tensor]:
        """The host value of the copy in flight, waiting for it (a synchronisation); ``None`` when there is none."""
        if self._event is not None:
            self._event.synchronize()
        return self.poll()


# ------------------------------------------------------------------------------------------------- skipped steps


class SkippedStepCounter:
    """Counts the steps an optimizer skipped (left parameters and state unchanged) and warns, rate-limited.

    An optimizer calls ``self._record_skipped(count, reason)`` once per ``step()`` that skipped something:
    ``count`` is an ``int`` or a 0-dim tensor (a bool or integer flag computed on the device). Device tensors are
    accumulated on the device with no host synchronisation. Every ``skip_check_interval`` calls a non-blocking copy
    of the accumulated counts to pinned host memory is started (:class:`DeferredHostRead`); every call picks up a
    copy that has completed by then (an event query, no wait). So ``step()`` never waits for the device, and a skip
    on a GPU is warned about at the first call after the copy that saw it has landed: at most about
    ``skip_check_interval`` steps late (usually the very next call after the interval), or at once when
    ``skipped_steps`` is read (which waits for the device). Host integers and CPU tensors are read at once (no
    device to wait for), so on the CPU the warning comes during the step that skipped.

    A ``RuntimeWarning`` is issued at the first skip and again when the total reaches 10, 100, 1000, ...; it names
    the reasons and their counts. ``skipped_steps`` is the total since the optimizer was built (it is not part of
    ``state_dict()``); ``skipped_steps_by_reason`` splits it by reason.
    """

    skip_check_interval: ClassVar[int] = 32
    #: CPU tensors are read at once (there is no device to wait for). ``False`` treats them like device counters
    #: (deferred, non-blocking reads): the tests check the accelerator path's absence of synchronisation that way.
    read_cpu_counts_at_once: ClassVar[bool] = True

    def _skip_init(self) -> None:
        self._skips_host: Dict[str, int] = {}
        self._skips_device: Dict[Tuple[str, str], Tensor] = {}
        self._skips_device_seen: Dict[Tuple[str, str], int] = {}
        self._skips_readers: Dict[Tuple[str, str], DeferredHostRead] = {}
        self._skip_calls = 0
        self._skip_next_warning = 1

    def _skip_ready(self) -> None:
        if "_skips_host" not in self.__dict__:
            self._skip_init()

    def _record_skipped(self, count: Union[int, bool, Tensor], reason: str) -> None:
        """Count ``count`` skipped steps (0 is allowed and does nothing) for ``reason`` (a short phrase such as
        ``"non-finite gradient"``)."""
        self._skip_ready()
        reason = str(reason) or "unspecified"
        if torch.is_tensor(count):
            if count.numel() != 1:
                raise ValueError(f"_record_skipped takes an int or a 0-dim tensor, got shape {tuple(count.shape)}")
            if count.device.type != "cpu" or not self.read_cpu_counts_at_once:
                flag = count.detach().reshape(()).to(torch.int64)
                key = (reason, str(count.device))
                acc = self._skips_device.get(key)
                self._skips_device[key] = flag.clone() if acc is None else acc.add_(flag)
                self._skip_calls += 1
                if self._skip_calls % self.skip_check_interval == 0:
                    self._sync_device_skips()
                if self._adopt_host_copies():
                    self._maybe_warn_skipped()
                return
            count = int(count.detach().reshape(()).item())
        count = int(count)
        if count < 0:
            raise ValueError(f"skipped-step count must be >= 0, got {count}")
        if count:
            self._skips_host[reason] = self._skips_host.get(reason, 0) + count
            self._maybe_warn_skipped()

    def _sync_device_skips(self) -> None:
        """Start a non-blocking copy of every device counter to the host (read by :meth:`_adopt_host_copies` once it
        has landed; at once for devices without events)."""
        for key, acc in self._skips_device.items():
            reader = self._skips_readers.get(key)
            if reader is None:
                reader = self._skips_readers[key] = DeferredHostRead()
            reader.start(acc)

    def _adopt_host_copies(self, wait: bool = False) -> bool:
        """Take the counts of the copies that have completed (all of them, waiting, with ``wait``); whether any
        count grew. Reads host memory only (the pinned copies), never the device."""
        grew = False
        for key, reader in self._skips_readers.items():
            value = reader.wait() if wait else reader.poll()
            if value is not None:
                n = int(value)
                if n > self._skips_device_seen.get(key, 0):
                    self._skips_device_seen[key] = n
                    grew = True
        return grew

    def _read_device_skips_now(self) -> None:
        """Read every device counter, waiting for the device (``skipped_steps``)."""
        self._adopt_host_copies(wait=True)
        for key, acc in self._skips_device.items():
            n = int(acc.item())
            self._skips_device_seen[key] = max(n, self._skips_device_seen.get(key, 0))

    def _known_skips(self) -> Dict[str, int]:
        out = dict(self._skips_host)
        for (reason, _), n in self._skips_device_seen.items():
            out[reason] = out.get(reason, 0) + n
        return {k: v for k, v in out.items() if v}

    def _maybe_warn_skipped(self) -> None:
        by_reason = self._known_skips()
        total = sum(by_reason.values())
        if total < self._skip_next_warning:
            return
        while self._skip_next_warning <= total:
            self._skip_next_warning *= 10
        reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        warnings.warn(
            f"{type(self).__name__} has skipped {total} step(s) so far ({reasons}); each skipped step left the "
            "parameters and the optimizer state unchanged. Check the loss, the inputs and the learning-rate schedule "
            "(a NaN/inf gradient, loss or lr). `optimizer.skipped_steps` has the count; this warning repeats at "
            f"{self._skip_next_warning} skips.",
            RuntimeWarning,
            stacklevel=4,
        )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped since this optimizer was built (reading it synchronises with the device)."""
        self._skip_ready()
        self._read_device_skips_now()
        self._maybe_warn_skipped()
        return sum(self._known_skips().values())

    @property
    def skipped_steps_by_reason(self) -> Dict[str, int]:
        """``{reason: count}`` of the skipped steps (synchronises with the device)."""
        self._skip_ready()
        self._read_device_skips_now()
        return self._known_skips()

    def _check_step_lrs(self) -> bool:
        """Step-time check of every group's lr (a scheduler may have produced it): ``False`` and one counted skip
        when an lr is NaN or infinite (the caller then leaves everything unchanged), ``ValueError`` when an lr is
        negative, ``True`` otherwise."""
        for i, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            lr = group.get("lr", 0.0)
            value = float(lr)
            if not math.isfinite(value):
                self._record_skipped(1, "non-finite lr (check the learning-rate scheduler)")
                return False
            if value < 0:
                raise ValueError(
                    f"{group_label(group, i)} has lr={value!r} < 0 at step time; nothing was changed. A learning "
                    "rate must be >= 0: check the learning-rate scheduler (or what set group['lr'])"
                )
        return True
