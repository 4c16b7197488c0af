"""Inference: windows in, predictions out, in batches on the model's device.

``Predictor`` is the synchronous core (one forward pass over a batch of windows);
``InferenceWorker`` wraps it in a bounded asyncio queue with batching and a backpressure
policy.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from crossl_stream.clock import host_clock
from crossl_stream.errors import InputError
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.export import OnnxModel
from crossl_stream.model.streaming import StreamingCroSSL
from crossl_stream.windower import Window

Policy = Literal["drop_oldest", "block"]


@dataclass
class Prediction:
    """One published record: the wire contract of DESIGN.md plus coverage and states.

    A window no sensor covered is a record too: ``label`` None, ``probs`` empty, every
    ``mask`` entry False, the sensors' ``states`` saying why. ``age_ms`` is the publish time
    minus the window's end on the host clock (None on a virtual clock), so a late window
    shows as late whatever its per-stage latencies.
    """

    seq: int
    t_window_end: float
    label: str | None
    probs: dict[str, float]
    mask: dict[str, bool]  # True: the modality was used
    model: str
    latency_ms: dict[str, float]
    coverage: dict[str, float] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    subject: str = ""
    t_last_arrival: float = 0.0
    age_ms: float | None = None

    def record(self) -> dict[str, Any]:
        """The JSON-ready record (what JSONL, MQTT and the LSL marker stream carry)."""
        return {  # by hand: dataclasses.asdict deep-copies, 30x slower on this hot path
            "seq": self.seq,
            "t_window_end": self.t_window_end,
            "label": self.label,
            "probs": dict(self.probs),
            "mask": dict(self.mask),
            "model": self.model,
            "latency_ms": dict(self.latency_ms),
            "coverage": dict(self.coverage),
            "states": dict(self.states),
            "subject": self.subject,
            "age_ms": self.age_ms,
        }


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here")
    return device


class Predictor:
    """Owns the model on its device and preallocated input buffers for one batch.

    With ``streaming`` (the default in pipelines) overlapping windows share their encoder
    features and each window encodes only its new samples (``model.streaming``); otherwise
    every window is encoded whole: on CUDA from pinned staging tensors copied with
    ``non_blocking=True``, or with ``onnx`` (an exported session of the same weights) in
    onnxruntime on the CPU, about 3x eager torch one window at a time here.

    ``fallbacks`` maps a modality to a predictor of a model trained without it: a window
    missing exactly that modality goes there (its record's ``model`` names the fallback,
    its ``mask`` still says what was missing); ``fallback_windows`` counts them.
    """

    def __init__(
        self,
        model: CroSSL,
        device: str = "auto",
        max_batch: int = 32,
        model_id: str = "crossl",
        onnx: OnnxModel | None = None,
        streaming: StreamingCroSSL | None = None,
        fallbacks: Mapping[str, Predictor] | None = None,
    ) -> None:
        self.device = pick_device(device)
        if onnx is not None and self.device.type != "cpu":
            raise InputError(f"the ONNX runtime runs on the CPU here, not on {self.device}")
        self.streaming = streaming
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.max_batch = max_batch
        self.onnx = onnx
        pin = self.device.type == "cuda"
        rows = 0 if streaming is not None else max_batch  # streaming stages nothing
        self._inputs = {
            m.name: torch.zeros((rows, m.channels, m.samples)).pin_memory()
            if pin
            else torch.zeros((rows, m.channels, m.samples))
            for m in model.modalities
        }
        self._arrays = {k: v.numpy() for k, v in self._inputs.items()}  # views, for filling
        self._mask = np.zeros((max_batch, len(model.modalities)), dtype=bool)
        self._names = model.modality_names
        self._name_set = set(self._names)
        self.fallbacks = dict(fallbacks or {})
        for missing, fallback in self.fallbacks.items():
            others = [n for n in self._names if n != missing]
            if missing not in self._name_set or fallback._names != others:
                raise InputError(
                    f"fallback without {missing!r}: its modalities {fallback._names} are not "
                    f"the model's {self._names} less {missing!r}"
                )
            if fallback.model.classes != model.classes:
                raise InputError(
                    f"fallback without {missing!r}: classes {fallback.model.classes} differ "
                    f"from the model's {model.classes}"
                )
        self.fallback_windows = dict.fromkeys(self.fallbacks, 0)

    @property
    def runtime(self) -> str:
        """What runs the forward pass: ``onnxruntime`` or ``torch``, and whether windows
        share encoder features (``streaming``)."""
        if self.streaming is not None:
            if self.streaming.step is not None:
                return "onnxruntime, streaming"
            bf16 = ", bf16" if self.streaming.precision == "bf16" else ""
            return f"torch, streaming{bf16}"
        return "onnxruntime" if self.onnx is not None else "torch"

    def forget(self, subject: str) -> None:
        """Drop the encoder features kept for a subject that left."""
        if self.streaming is not None:
            self.streaming.forget(subject)
        for fallback in self.fallbacks.values():
            fallback.forget(subject)

    def check(self, window: Window) -> None:
        """Raise InputError when a window does not match the model's modalities."""
        if window.data.keys() != self._name_set:
            raise InputError(
                f"window modalities {sorted(window.data)} do not match the model's {self._names}"
            )

    @torch.inference_mode()
    def __call__(self, windows: Sequence[Window]) -> list[Prediction]:
        if self.fallbacks:
            route = [self._fallback_of(w) for w in windows]
            if any(r is not None for r in route):
                return self._routed(windows, route)
        return self._predict(windows)

    def _fallback_of(self, w: Window) -> str | None:
        """The modality whose fallback serves ``w``: the only one it misses, if any."""
        missing = [n for n in self._names if not w.available.get(n, False)]
        if len(missing) == 1 and missing[0] in self.fallbacks:
            return missing[0]
        return None

    def _routed(self, windows: Sequence[Window], route: list[str | None]) -> list[Prediction]:
        """Each window through the model its ``route`` names (None: this one), in order."""
        out: list[Prediction | None] = [None] * len(windows)
        for key in dict.fromkeys(route):
            index = [i for i, r in enumerate(route) if r == key]
            if key is None:
                preds = self._predict([windows[i] for i in index])
            else:
                preds = self.fallbacks[key]._predict([_without(windows[i], key) for i in index])
                self.fallback_windows[key] += len(index)
                for i, p in zip(index, preds, strict=True):
                    p.mask = dict(windows[i].available)
            for i, p in zip(index, preds, strict=True):
                out[i] = p
        return out  # type: ignore[return-value]

    def _predict(self, windows: Sequence[Window]) -> list[Prediction]:
        usable = [w for w in windows if any(w.available.values())]
        out: list[Prediction] = []
        for start in range(0, len(usable), self.max_batch):
            out += self._batch(usable[start : start + self.max_batch])
        if len(usable) == len(windows):
            return out
        made = iter(out)  # in window order, the empty ones as records that say so
        return [next(made) if any(w.available.values()) else self._empty(w) for w in windows]

    def _empty(self, w: Window) -> Prediction:
        """The record of a window no sensor covered: no label, every modality masked."""
        self.check(w)
        return Prediction(
            seq=w.seq,
            t_window_end=w.t_end,
            label=None,
            probs={},
            mask=dict(w.available),
            model=self.model_id,
            latency_ms={"queue": 1000 * (host_clock() - w.t_emitted)},
            coverage=dict(w.coverage),
            states={k: str(v.value) for k, v in w.states.items()},
            subject=w.subject,
            t_last_arrival=w.t_last_arrival,
        )

    def _batch(self, windows: Sequence[Window]) -> list[Prediction]:
        t0 = host_clock()
        n = len(windows)
        names = self._names
        for w in windows:
            self.check(w)
        mask = self._mask[:n]
        mask[:] = [[w.available[name] for name in names] for w in windows]
        if self.streaming is not None:
            probs = self.streaming(
                [w.subject for w in windows],
                [w.data for w in windows],
                mask,
                [w.marks for w in windows],
            )
        else:
            for name in names:  # one C loop per modality into the (pinned) staging rows
                np.stack([w.data[name] for w in windows], out=self._arrays[name][:n])
            if self.onnx is not None:
                probs = self.onnx({k: v[:n] for k, v in self._arrays.items()}, mask)
            else:
                nb = self.device.type == "cuda"
                inputs = {
                    k: v[:n].to(self.device, non_blocking=nb) for k, v in self._inputs.items()
                }
                probs = self.model(inputs, torch.from_numpy(mask).to(self.device)).probs
                probs = probs.cpu().numpy()
        t1 = host_clock()
        classes = self.model.classes
        infer = 1000 * (t1 - t0)
        preds = []
        for w, p, row in zip(windows, probs.tolist(), probs.argmax(axis=1).tolist(), strict=True):
            preds.append(
                Prediction(
                    seq=w.seq,
                    t_window_end=w.t_end,
                    label=classes[row],
                    probs=dict(zip(classes, p, strict=True)),
                    mask=dict(w.available),
                    model=self.model_id,
                    latency_ms={
                        "window": 1000 * (w.t_emitted - w.t_last_arrival),
                        "queue": 1000 * (t0 - w.t_emitted),
                        "infer": infer,
                    },
                    coverage=dict(w.coverage),
                    states={k: v.value for k, v in w.states.items()},
                    subject=w.subject,
                    t_last_arrival=w.t_last_arrival,
                )
            )
        return preds


def _without(w: Window, missing: str) -> Window:
    """``w`` as a window of a model that lacks ``missing``."""
    return replace(
        w,
        data={k: v for k, v in w.data.items() if k != missing},
        available={k: v for k, v in w.available.items() if k != missing},
        marks={k: v for k, v in w.marks.items() if k != missing},
    )


@dataclass
class WorkerCounters:
    windows_in: int = 0
    dropped: int = 0  # oldest windows dropped by the drop_oldest policy
    predictions: int = 0
    batches: int = 0


class InferenceWorker:
    """Owns a bounded queue of windows and the task that turns them into predictions.

    ``drop_oldest`` (live use) never makes the producer wait and counts what it drops;
    ``block`` (replay) makes ``put`` wait for room. A batch is every queued window, up to
    ``max_batch``; ``max_wait_ms`` > 0 waits that long for more when the queue is short
    (throughput over latency).
    """

    def __init__(
        self,
        predictor: Predictor,
        queue_size: int = 64,
        max_wait_ms: float = 0.0,
        policy: Policy = "drop_oldest",
    ) -> None:
        if policy not in ("drop_oldest", "block"):
            raise ValueError(f"unknown backpressure policy {policy!r}")
        self.predictor = predictor
        self.queue_size = queue_size
        self.max_wait = max_wait_ms / 1000
        self.policy = policy
        self.counters = WorkerCounters()
        self._queue: collections.deque[Window] = collections.deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._forget: set[str] = set()  # subjects that left, forgotten once their windows pass

    async def put(self, window: Window) -> None:
        """Queue a window, under the backpressure policy."""
        self.predictor.check(window)
        self.counters.windows_in += 1
        if self.policy == "block":
            while len(self._queue) >= self.queue_size:
                self._room.clear()
                await self._room.wait()
        elif len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.counters.dropped += 1
        self._queue.append(window)
        self._ready.set()

    def swap(self, other: InferenceWorker) -> None:
        """Take ``other``'s predictor and settings (a reloaded model); queued windows stay
        and go to the new predictor, which counts on from this one's fallback windows."""
        for missing, n in self.predictor.fallback_windows.items():
            if missing in other.predictor.fallback_windows:
                other.predictor.fallback_windows[missing] += n
        self.predictor = other.predictor
        self.queue_size = other.queue_size
        self.max_wait = other.max_wait
        self.policy = other.policy
        self._room.set()

    def forget(self, subject: str) -> None:
        """Drop what the model keeps for a subject that left, once the windows of it still
        queued are predicted (they would make it anew)."""
        if any(w.subject == subject for w in self._queue):
            self._forget.add(subject)
        else:
            self.predictor.forget(subject)

    def depth(self) -> int:
        """Windows waiting for the model."""
        return len(self._queue)

    def close(self) -> None:
        """No more windows: ``predictions`` ends once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def predictions(self):
        """Yield predictions in window order until closed and drained."""
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if self.max_wait and len(self._queue) < self.predictor.max_batch and not self._closed:
                await asyncio.sleep(self.max_wait)  # let a batch gather
            n = min(len(self._queue), self.predictor.max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._room.set()
            preds = self.predictor(batch)
            if self._forget:
                for subject in self._forget - {w.subject for w in self._queue}:
                    self._forget.discard(subject)
                    self.predictor.forget(subject)
            self.counters.batches += 1
            self.counters.predictions += len(preds)
            for p in preds:
                yield p
