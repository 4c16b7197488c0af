"""Streaming inference: overlapping windows share their encoder features.

A window of ``T`` samples hopping by ``s`` shares ``T - s`` samples with the one before it.
The encoder has no padding, stride or recurrence, so each feature column depends on its own
``receptive_field`` input samples only: the next window needs ``s`` new columns, not ``T'``.
For 2 s windows every 100 ms that is 20x less convolution per window. The result is the
full model's, up to float rounding (pinned by tests).

Nothing here trusts the caller about continuity: a window reuses the previous window's
features only when its overlap holds exactly the same samples (compared, ~10 us), so a
dropped window, a masked sensor, a gap refilled, a new subject or an unaligned hop falls back
to encoding the whole window.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from crossl_stream.errors import InputError
from crossl_stream.model.crossl import CroSSL


class EncoderRuntime(Protocol):
    """What runs the two halves of the model: per-modality encoders and the head."""

    def encode(self, name: str, x: np.ndarray) -> np.ndarray:
        """Features [D, L - receptive_field + 1] of one modality's raw input [C, L]."""
        ...

    def classify(self, latents: np.ndarray, visible: np.ndarray) -> np.ndarray:
        """Class probabilities [B, classes] from latents [B, M, D] and a [B, M] mask."""
        ...


class TorchRuntime:
    """Owns nothing but the eager model: the runtime on CUDA, or without an ONNX export."""

    def __init__(self, model: CroSSL) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def encode(self, name: str, x: np.ndarray) -> np.ndarray:
        device = self.model.mask_token.device  # wherever the model is now
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        return self.model.encode(name, t.unsqueeze(0))[0].cpu().numpy()

    @torch.inference_mode()
    def classify(self, latents: np.ndarray, visible: np.ndarray) -> np.ndarray:
        device = self.model.mask_token.device
        z = torch.from_numpy(latents).to(device)
        v = torch.from_numpy(visible).to(device)
        return self.model.classify(z, v).softmax(dim=-1).cpu().numpy()


@dataclass
class _Kept:
    """The last window seen of one (stream, modality): its input and encoder features."""

    t_end: float
    data: np.ndarray  # [C, T], a copy
    ring: np.ndarray  # [D, T'] its features, the oldest column at ``pos``
    pos: int = 0


@dataclass
class StreamingCounters:
    """How one modality's windows were encoded: new columns only, or the whole window."""

    reused: int = 0
    full: int = 0


class StreamingCroSSL:
    """Owns, per (stream key, modality), the last window's encoder features, so that a
    window shifted by whole samples encodes only what is new.

    ``__call__`` takes windows in time order per key; one key's consecutive windows in one
    call form a chain that is one encoder run per modality (a replay batch). At most
    ``max_streams`` keys are kept (the least recently seen go first).

    >>> from crossl_stream.model import ModalitySpec
    >>> spec = ModalitySpec(name="acc", channels=3, rate_hz=50, samples=100)
    >>> model = CroSSL([spec], classes=["a", "b"]).eval()
    >>> stream = np.random.default_rng(0).normal(size=(3, 200)).astype(np.float32)
    >>> windows = [{"acc": stream[:, 5 * k : 5 * k + 100]} for k in range(11)]
    >>> ends = [2.0 + 0.1 * k for k in range(11)]
    >>> sm = StreamingCroSSL(model)
    >>> probs = sm(["s1"] * 11, ends, windows, np.ones((11, 1), dtype=bool))
    >>> full = model.predict_proba({"acc": np.stack([w["acc"] for w in windows])})
    >>> bool(np.allclose(probs, full, atol=1e-5)), sm.counters["acc"]
    (True, StreamingCounters(reused=10, full=1))
    """

    def __init__(
        self, model: CroSSL, runtime: EncoderRuntime | None = None, max_streams: int = 256
    ) -> None:
        self.runtime = runtime if runtime is not None else TorchRuntime(model)
        self.names = model.modality_names
        self.field = model.receptive_field
        self.max_keys = max_streams * len(model.modalities)  # the least recently used go
        self.counters = {m.name: StreamingCounters() for m in model.modalities}
        self._specs = {m.name: m for m in model.modalities}
        self._mask_token = model.mask_token.detach().cpu().numpy().copy()
        self._kept: collections.OrderedDict[tuple[Hashable, str], _Kept] = collections.OrderedDict()

    def forget(self, key: Hashable) -> None:
        """Drop what is kept for one stream key (its subject left)."""
        for name in self.names:
            self._kept.pop((key, name), None)

    def __call__(
        self,
        keys: Sequence[Hashable],
        t_ends: Sequence[float],
        data: Sequence[dict[str, np.ndarray]],
        available: np.ndarray,
    ) -> np.ndarray:
        """Class probabilities [n, classes] of n windows.

        ``data[i][m]`` is window i's [channels, samples] array of modality m, looked at only
        where ``available[i, j]``; ``t_ends`` place one key's windows on one clock.
        """
        n = len(keys)
        available = np.asarray(available, dtype=bool)
        latents = np.repeat(self._mask_token[None], n, axis=0)
        for j, name in enumerate(self.names):
            spec = self._specs[name]
            rows: dict[Hashable, list[int]] = {}
            for i in np.flatnonzero(available[:, j]).tolist():
                x = data[i][name]
                if x.shape != (spec.channels, spec.samples) or not np.isfinite(x).all():
                    raise InputError(
                        f"window {i}, modality {name!r}: expected finite "
                        f"[{spec.channels}, {spec.samples}], got {list(x.shape)}"
                        f"{'' if x.shape != (spec.channels, spec.samples) else ' with NaN/Inf'}"
                    )
                rows.setdefault(keys[i], []).append(i)
            for key, idx in rows.items():
                xs = [data[i][name] for i in idx]
                latents[idx, j] = self._encode(key, name, [t_ends[i] for i in idx], xs)
        return self.runtime.classify(latents, available)

    def _encode(
        self, key: Hashable, name: str, t_ends: list[float], xs: list[np.ndarray]
    ) -> np.ndarray:
        """Mean-pooled latents [len(xs), D] of one key's windows of one modality, in order."""
        samples, field = self._specs[name].samples, self.field
        rate = self._specs[name].rate_hz
        span = samples - field + 1  # feature columns per window
        counters = self.counters[name]
        kept = self._kept.pop((key, name), None)  # back at the end: a failure leaves none
        prev = (kept.t_end, kept.data) if kept is not None else None
        out: list[np.ndarray] = []
        # a chain: windows that each extend the one before, encoded in one run
        pieces: list[np.ndarray] = []
        base: _Kept | None = None
        ends: list[int] = []
        for t_end, x in zip(t_ends, xs, strict=True):
            shift = _shift(prev, t_end, x, rate, span)
            if shift is None:
                if pieces:
                    out.append(self._run(name, pieces, base, ends, span)[0])
                pieces, base, ends = [x], None, [span]
                counters.full += 1
            elif not pieces:  # extends the kept window: start from its features
                pieces, base, ends = [x[:, samples - shift - field + 1 :]], kept, [span + shift]
                counters.reused += 1
            else:
                pieces.append(x[:, samples - shift :])
                ends.append(ends[-1] + shift)
                counters.reused += 1
            prev = (t_end, x)
        pooled, ring, pos = self._run(name, pieces, base, ends, span)
        out.append(pooled)
        assert prev is not None
        self._kept[(key, name)] = _Kept(prev[0], np.array(prev[1], dtype=np.float32), ring, pos)
        while len(self._kept) > self.max_keys:
            self._kept.popitem(last=False)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _run(
        self, name: str, pieces: list[np.ndarray], base: _Kept | None, ends: list[int], span: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Encode one chain: its windows' pooled latents [n, D], and the last window's
        features as a ring and the position of its oldest column."""
        x = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
        new = self.runtime.encode(name, x)
        if len(ends) == 1 and base is None:  # one whole window
            return new.mean(axis=1)[None], new, 0
        if len(ends) == 1 and base is not None:  # the live case: new columns into the ring
            ring, pos, shift = base.ring, base.pos, new.shape[1]
            first = min(shift, span - pos)
            ring[:, pos : pos + first] = new[:, :first]
            ring[:, : shift - first] = new[:, first:]
            return (ring.sum(axis=1) / span)[None], ring, (pos + shift) % span
        if base is not None:
            new = np.concatenate([base.ring[:, base.pos :], base.ring[:, : base.pos], new], axis=1)
        # many windows: sliding sums from one cumulative sum (float64: rounding stays small)
        cs = np.zeros((new.shape[0], new.shape[1] + 1))
        np.cumsum(new, axis=1, out=cs[:, 1:])
        stop = np.asarray(ends)
        pooled = ((cs[:, stop] - cs[:, stop - span]) / span).T.astype(np.float32)
        return pooled, np.ascontiguousarray(new[:, ends[-1] - span : ends[-1]]), 0


def _shift(
    prev: tuple[float, np.ndarray] | None, t_end: float, x: np.ndarray, rate: float, most: int
) -> int | None:
    """Samples by which window ``x`` extends ``prev``, its overlap verified; else None."""
    if prev is None:
        return None
    shift = round(t_end * rate) - round(prev[0] * rate)  # grid steps, as the windower cuts
    if not 1 <= shift <= most:
        return None
    samples = x.shape[1]
    if not np.array_equal(x[:, : samples - shift], prev[1][:, shift:]):
        return None
    return shift
