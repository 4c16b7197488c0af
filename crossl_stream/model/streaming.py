"""Streaming inference: overlapping windows share encoder work, batched across subjects.

A window of ``T`` samples hopping by ``s`` shares ``T - s`` samples with the one before it.
The encoder's convolutions have no padding, stride or recurrence, so a stream's features can
be computed once: each conv layer keeps the last ``kernel - 1`` columns of its input per
stream, and a hop runs the three layers over the ``s`` new samples only (20x less work than the
whole window for 2 s windows every 100 ms). The pooled latent is a running sum over a ring of
the window's feature columns (float64, and recomputed from the ring every ``RESYNC`` hops,
so rounding does not build up).

Every subject's kept state lives in one preallocated tensor per modality and layer, indexed
by a slot per subject, on the model's device. One hop of N subjects is one batched call per
layer per modality (a time-major conv as one GEMM) and one head call: the cost per subject
falls with N, on the CPU and on CUDA alike, with the same code.

Reuse is decided from marks, not assumed: a window's ``Mark`` (from the windower) names an
unbroken run of final grid points (``epoch``) and where the window starts in it. A window
reuses its stream's state only when the previous window of that stream and modality was
final, is of the same epoch, and starts 1 to ``span`` points earlier; anything else (a new
subject, a gap longer than the window's feature span, a reset, an unaligned hop, no mark)
encodes the whole window; a sensor masked for a few hops picks up from its kept state.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from crossl_stream.errors import InputError
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.specs import Mark

if TYPE_CHECKING:
    from crossl_stream.model.export import OnnxStep

Precision = Literal["fp32", "bf16"]
FIRST_SLOTS = 8  # state is allocated for this many subjects, doubled as more come
FUSED_MAX = 8  # hops of up to this many windows go through the onnxruntime hop graph
RESYNC = 64  # hops between recomputations of a slot's running sum from its ring
STAGE_ROWS = 4096  # larger groups are staged in buffers of their own, not kept (CUDA)


@dataclass
class StreamingCounters:
    """How one modality's windows were encoded: new columns only, or the whole window."""

    reused: int = 0
    full: int = 0


class _Layer:
    """One conv block on time-major activations: [G, L, C] -> [G, L - k + 1, O].

    The conv is one GEMM over the unfolded input, or for large hops a 1 x k conv2d on the
    channels-last view of the time-major tensor (oneDNN or cuDNN, no copy in or out).
    Measured on the lab model's layers, 2 threads: at 200 subjects the conv2d takes 0.5-0.75x
    the GEMM's time in fp32 and 0.3-1.1x in bf16; at 4 subjects 1.29x (fp32). In bf16
    only the conv is: torch's bf16 LayerNorm and PReLU kernels on the CPU took 1.4-20x the
    time of their fp32 ones, more than the conversions cost. Takes the layer's dtype (the
    caller casts it, as kept tails are in it), returns float32.
    """

    CONV_ROWS = 1024  # output columns in a call from which the conv2d is taken

    def __init__(self, block, dtype: torch.dtype) -> None:
        w = block.conv.weight.detach()  # [O, C, k]
        self.out, channels, self.k = w.shape
        self.weight = w.permute(2, 1, 0).reshape(self.k * channels, self.out).to(dtype)
        self.bias = block.conv.bias.detach().to(dtype)
        self.conv = w.unsqueeze(2).to(dtype).contiguous(memory_format=torch.channels_last)
        if dtype != torch.float32 and not _conv_agrees(self.conv, self.weight):
            self.conv = None  # this machine's bf16 conv2d is wrong for the layer: GEMM only
        self.norm_w = block.norm_weight.detach()[:, 0].float()
        self.norm_b = block.norm_bias.detach()[:, 0].float()
        self.prelu = block.act.weight.detach().float()
        self.dtype = dtype

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        g, length, c = h.shape
        n = length - self.k + 1
        if self.conv is not None and g * n >= self.CONV_ROWS:
            y = F.conv2d(h.permute(0, 2, 1).unsqueeze(2), self.conv, self.bias)
            y = y.squeeze(2).permute(0, 2, 1).reshape(g * n, -1)  # channels-last: a view
        else:
            cols = h.unfold(1, self.k, 1).transpose(2, 3).reshape(g * n, self.k * c)
            y = torch.addmm(self.bias, cols, self.weight)
        y = y.float()
        y = F.layer_norm(y, (y.shape[1],), self.norm_w, self.norm_b, 1e-5)
        return F.prelu(y, self.prelu).view(g, n, -1)


def _conv_agrees(conv: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the low-precision conv2d of ``_Layer`` (weights ``conv``) gives its GEMM's
    (``weight``) result, on random batches of this layer's shape as a large hop and as whole
    windows. oneDNN's bf16 conv2d on a CPU with AMX (torch 2.13) returns errors as large as
    the outputs for some few-channel layers (4 to 14 input channels; the lab model's EMG
    first layer, 8); which kernels it picks depends on the CPU and the shape. Without the
    bias and relative to the outputs' scale: LayerNorm follows, so weights of any scale
    must be judged alike."""
    out, channels, _, k = conv.shape
    gen = torch.Generator().manual_seed(0)
    for g, n in ((64, 32), (4, 400)):  # both past CONV_ROWS
        x = torch.randn((g, n + k - 1, channels), generator=gen).to(conv.device, conv.dtype)
        y = F.conv2d(x.permute(0, 2, 1).unsqueeze(2), conv).squeeze(2).permute(0, 2, 1)
        cols = x.unfold(1, k, 1).transpose(2, 3).reshape(g * n, k * channels)
        ref = torch.mm(cols, weight).view(g, n, out).float()
        if (y.float() - ref).abs().max() > 0.02 * ref.abs().max():
            return False
    return True


class _Modality:
    """Owns one modality's encoder as GEMMs and every slot's kept state: each layer's input
    tail, the ring of the window's feature columns and their running sum."""

    def __init__(self, model: CroSSL, index: int, dtype: torch.dtype) -> None:
        spec = model.modalities[index]
        self.index, self.name = index, spec.name
        self.channels, self.samples = spec.channels, spec.samples
        self.span = spec.samples - model.receptive_field + 1  # feature columns per window
        device = model.mask_token.device
        self.mean = getattr(model, f"norm_mean_{spec.name}").detach().clone()
        self.std = getattr(model, f"norm_std_{spec.name}").detach().clone()
        self.layers = [_Layer(b, dtype) for b in model.encoders[spec.name].blocks]
        self.widths = [spec.channels] + [la.out for la in self.layers]
        self.device, self.dtype = device, dtype  # the tails' (ring: float32, sums: float64)
        self.counters = StreamingCounters()
        self.hops = 0  # live hops run, to recompute a few slots' sums each hop
        self.tails: list[torch.Tensor] = []
        self.ring = self.sums = torch.zeros(0)
        self.pos = np.zeros(0, dtype=np.int64)  # ring position of the oldest column
        self.epoch = np.zeros(0, dtype=np.int64)  # the kept window's mark...
        self.start = np.zeros(0, dtype=np.int64)
        self.valid = np.zeros(0, dtype=bool)  # ...and whether the next window may reuse it
        self.resize(0)

    def resize(self, slots: int) -> None:
        """Room for ``slots`` subjects; what is kept for the first ones stays."""
        old = len(self.valid)
        dev, d = self.device, self.widths[-1]

        def grow(t: torch.Tensor | None, shape: tuple, dtype=self.dtype) -> torch.Tensor:
            new = torch.zeros((slots, *shape), dtype=dtype, device=dev)
            if t is not None and old:
                new[:old] = t[:old]
            return new

        tails = self.tails or [None] * len(self.layers)
        self.tails = [
            grow(t, (la.k - 1, w))
            for t, la, w in zip(tails, self.layers, self.widths, strict=False)
        ]
        self.ring = grow(self.ring if old else None, (self.span, d), torch.float32)
        self.sums = grow(self.sums if old else None, (d,), torch.float64)
        # numpy views of the state, for the onnxruntime hop (CPU, fp32 only)
        self.state_np = None
        if dev.type == "cpu" and self.dtype == torch.float32:
            self.state_np = ([t.numpy() for t in self.tails], self.ring.numpy(), self.sums.numpy())
        for name in ("pos", "epoch", "start", "valid"):
            arr = getattr(self, name)
            new = np.zeros(slots, dtype=arr.dtype)
            new[:old] = arr[:old]
            setattr(self, name, new)

    def absent_feed(self, n: int) -> list[np.ndarray]:
        """The hop graph's inputs for n rows without this modality: zeros (masked there)."""
        zeros = [np.zeros((n, 1, self.channels), np.float32)]
        zeros += [
            np.zeros((n, la.k - 1, w), np.float32)
            for la, w in zip(self.layers, self.widths, strict=False)
        ]
        return [*zeros, np.zeros((n, self.widths[-1]), np.float32)]

    def encode(self, x: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, list]:
        """Features [G, L', D] of raw input [G, L, C] (time-major), continuing the kept
        tails of slots ``idx`` (None: whole windows); and each layer's new input tail."""
        h = (x - self.mean) / self.std
        tails = []
        for i, layer in enumerate(self.layers):
            h = h.to(self.dtype)  # before the tail is joined: bf16 tails are kept as bf16
            if idx is not None:
                h = torch.cat([self.tails[i].index_select(0, idx), h], dim=1)
            tails.append(h[:, h.shape[1] - layer.k + 1 :])
            h = layer(h)
        return h, tails

    def hop(self, x: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
        """The live case: one window per slot, each ``x.shape[1]`` samples after the kept
        one. Pooled latents [G, D]; the slots' state moves on."""
        idx = torch.from_numpy(slots).to(self.device, non_blocking=True)
        f, tails = self.encode(x, idx)
        g, shift, d = f.shape
        cols = slots[:, None] * self.span + (self.pos[slots, None] + np.arange(shift)) % self.span
        flat = torch.from_numpy(cols.reshape(-1)).to(self.device, non_blocking=True)
        ring = self.ring.view(-1, d)
        leaving = ring.index_select(0, flat).view(g, shift, d)
        # a hop's columns summed in float32: sum(dtype=float64) copies them to float64 first,
        # a fifth of a 200-subject hop. Columns leave in other groups than they came in (a
        # window's columns are no multiple of the hop), so the rounding would build up in
        # the running sum: each slot's sum is recomputed from its ring every RESYNC hops.
        self.sums.index_add_(0, idx, f.sum(dim=1).double() - leaving.sum(dim=1).double())
        ring.index_copy_(0, flat, f.reshape(-1, d))
        due = slots[slots % RESYNC == self.hops % RESYNC]
        self.hops += 1
        if len(due):
            at = torch.from_numpy(due).to(self.device, non_blocking=True)
            self.sums[at] = self.ring.index_select(0, at).sum(dim=1, dtype=torch.float64)
        for t, new in zip(self.tails, tails, strict=True):
            t.index_copy_(0, idx, new)
        self.pos[slots] = (self.pos[slots] + shift) % self.span
        return (self.sums.index_select(0, idx) / self.span).float()

    def chain(
        self, x: torch.Tensor, slots: np.ndarray, fresh: bool, ends: np.ndarray, keep: np.ndarray
    ) -> torch.Tensor:
        """Several consecutive windows per slot (a replay batch) or whole windows: pooled
        latents [G, len(ends), D]. ``ends`` index each window's last feature column + 1 in
        the kept ring followed by the new features; rows with ``keep`` store their last
        window as the slot's state."""
        idx = torch.from_numpy(slots).to(self.device)
        f, tails = self.encode(x, None if fresh else idx)
        if not fresh:
            order = (
                slots[:, None] * self.span
                + (self.pos[slots, None] + np.arange(self.span)) % self.span
            )
            flat = torch.from_numpy(order.reshape(-1)).to(self.device)
            kept = (
                self.ring.view(-1, f.shape[2]).index_select(0, flat).view(len(slots), self.span, -1)
            )
            f = torch.cat([kept, f], dim=1)
        cs = torch.zeros(
            (f.shape[0], f.shape[1] + 1, f.shape[2]), dtype=torch.float64, device=f.device
        )
        torch.cumsum(f, dim=1, dtype=torch.float64, out=cs[:, 1:])
        stop = torch.from_numpy(ends).to(self.device)
        sums = cs[:, stop] - cs[:, stop - self.span]  # [G, n, D]
        if keep.any():
            k = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
            dest = idx[k]
            last = int(ends[-1])
            self.ring.index_copy_(0, dest, f[k, last - self.span : last])
            self.sums.index_copy_(0, dest, sums[k, -1])
            for t, new in zip(self.tails, tails, strict=True):
                t.index_copy_(0, dest, new[k])
            self.pos[slots[keep]] = 0
        return (sums / self.span).float()


def _rows(x: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """``x`` placed at ``rows`` of n rows, zeros elsewhere."""
    out = np.zeros((n, *x.shape[1:]), dtype=x.dtype)
    out[rows] = x
    return out


@dataclass
class _Group:
    """Segments of one modality with the same shape, run as one batch: ``first[g]`` is the
    index (in the call) of segment g's first window, ``rows`` every window seg-major, and
    ``x`` the staged input [G, C, L]; segments with ``keep`` leave the slot's state with the
    mark of their last window (``marks``: epoch, start, final per segment)."""

    fresh: bool
    shifts: tuple[int, ...]
    first: np.ndarray
    rows: np.ndarray
    keep: np.ndarray
    marks: np.ndarray  # [G, 3] int64
    x: np.ndarray | None = None
    staged: torch.Tensor | None = None  # x's (pinned) staging tensor, when staged


class _Segment:
    """Consecutive windows of one stream, encoded in one run: from the kept state, or fresh
    (the first window whole)."""

    __slots__ = ("fresh", "first", "rows", "shifts", "last", "mark")

    def __init__(self, fresh: bool, first: int, row: int, shift: int) -> None:
        self.fresh, self.first, self.rows, self.shifts = fresh, first, [row], [shift]
        self.last, self.mark = True, (0, 0, 0)


class StreamingCroSSL:
    """Owns, per subject (a slot) and modality, the encoder state of the last window, so
    that a hop of many subjects costs one batched encoder call per modality.

    ``__call__`` takes windows in time order per key; one key's consecutive windows in one
    call are encoded in one run (a replay batch). At most ``max_streams`` keys are kept (the
    least recently seen go first, counted in ``evicted``). ``precision="bf16"`` runs the
    convolutions in bfloat16 (check its outputs against fp32 with ``tools/bench_scale.py
    --check``). With ``step`` (an onnxruntime session of ``StreamStep``, CPU only) a live hop
    of at most ``FUSED_MAX`` windows is one onnxruntime call: less overhead than the ~60
    torch ops of a hop, the latency path; larger hops batch better in torch.

    >>> from crossl_stream.model import ModalitySpec
    >>> spec = ModalitySpec(name="acc", channels=3, rate_hz=50, samples=100)
    >>> model = CroSSL([spec], classes=["a", "b"]).eval()
    >>> stream = np.random.default_rng(0).normal(size=(3, 200)).astype(np.float32)
    >>> windows = [{"acc": stream[:, 5 * k : 5 * k + 100]} for k in range(11)]
    >>> marks = [{"acc": Mark(epoch=1, start=5 * k)} for k in range(11)]
    >>> sm = StreamingCroSSL(model)
    >>> probs = sm(["s1"] * 11, windows, np.ones((11, 1), dtype=bool), marks)
    >>> full = model.predict_proba({"acc": np.stack([w["acc"] for w in windows])})
    >>> bool(np.allclose(probs, full, atol=1e-5)), sm.counters["acc"]
    (True, StreamingCounters(reused=10, full=1))
    """

    def __init__(
        self,
        model: CroSSL,
        max_streams: int = 256,
        precision: Precision = "fp32",
        step: OnnxStep | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise InputError(f"precision must be fp32 or bf16, got {precision!r}")
        if step is not None and (model.mask_token.device.type != "cpu" or precision != "fp32"):
            raise InputError("the onnxruntime hop graph runs in fp32 on the CPU only")
        self.step = step
        self.fused_hops = 0  # calls run as one onnxruntime call
        self.model = model.eval()
        self.precision = precision
        self.max_streams = max_streams
        self.names = model.modality_names
        self.device = model.mask_token.device
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self._mods = [_Modality(model, j, dtype) for j in range(len(model.modalities))]
        self.counters = {m.name: m.counters for m in self._mods}
        self.evicted = 0
        self._slots: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._free: list[int] = []
        self._mask_token = model.mask_token.detach()
        self._staging = self.device.type == "cuda"  # reused host buffers, pinned on CUDA
        self._stage_buffers: dict[tuple, torch.Tensor] = {}
        self._staged: set[tuple] = set()  # buffers this call has filled

    @property
    def streams(self) -> int:
        """Keys (subjects) whose state is kept."""
        return len(self._slots)

    def forget(self, key: Hashable) -> None:
        """Drop what is kept for one stream key (its subject left)."""
        slot = self._slots.pop(key, None)
        if slot is not None:
            for m in self._mods:
                m.valid[slot] = False
            self._free.append(slot)

    @torch.inference_mode()
    def __call__(
        self,
        keys: Sequence[Hashable],
        data: Sequence[Mapping[str, np.ndarray]],
        available: np.ndarray,
        marks: Sequence[Mapping[str, Mark | None]] | None = None,
    ) -> np.ndarray:
        """Class probabilities [n, classes] of n windows.

        ``data[i][m]`` is window i's [channels, samples] array of modality m, looked at only
        where ``available[i, j]``; ``marks[i][m]`` places it in its stream (None, or no
        ``marks``: the window is encoded whole).
        """
        n = len(keys)
        available = np.asarray(available, dtype=bool)
        if self.step is not None and marks is not None and 0 < n <= FUSED_MAX:
            probs = self._hop_fast(keys, data, available, marks)
            if probs is not None:
                return probs
        if len(dict.fromkeys(keys)) > self.max_streams:  # in parts of max_streams keys
            cut, seen = 0, set()
            while len(seen) < self.max_streams:
                seen.add(keys[cut])
                cut += 1
            while keys[cut] in seen:
                cut += 1
            parts = (slice(0, cut), slice(cut, n))
            return np.concatenate(
                [
                    self(keys[p], data[p], available[p], None if marks is None else marks[p])
                    for p in parts
                ]
            )
        self._staged.clear()  # the last call ended in a synchronising copy
        groups = [
            self._plan(m, keys, data, available[:, j], marks) for j, m in enumerate(self._mods)
        ]
        slots = self._assign(keys)  # after every check: a refused call changes nothing
        try:
            probs = self._run_torch(groups, slots, available)
        except BaseException:  # state half moved on: these slots start over from whole windows
            self._invalidate(slots)
            raise
        for m, plan in zip(self._mods, groups, strict=True):
            for group in plan:
                full = len(group.first) if group.fresh else 0  # each segment's first window
                m.counters.full += full
                m.counters.reused += len(group.rows) - full
                kept = slots[group.first[group.keep]]
                epoch, start, final = group.marks[group.keep].T
                m.valid[kept], m.epoch[kept], m.start[kept] = final.astype(bool), epoch, start
        return probs

    def _invalidate(self, slots: np.ndarray) -> None:
        """No reuse of what ``slots`` keep (a call failed part-way through)."""
        for m in self._mods:
            if len(m.valid):
                m.valid[np.unique(slots[slots >= 0])] = False

    def _run_torch(
        self, groups: list[list[_Group]], slots: np.ndarray, available: np.ndarray
    ) -> np.ndarray:
        """Every group through the torch layers, then the head: any shape, any device."""
        latents = self._mask_token.unsqueeze(0).expand(len(available), -1, -1).clone()
        for m, plan in zip(self._mods, groups, strict=True):
            for group in sorted(plan, key=lambda g: g.fresh):  # fresh ones may overwrite state
                self._run(m, group, slots, latents)
        visible = torch.from_numpy(available).to(self.device)
        probs = self.model.classify(latents, visible).softmax(dim=-1)
        return probs.float().cpu().numpy()

    def _hop_fast(
        self,
        keys: Sequence[Hashable],
        data: Sequence[Mapping[str, np.ndarray]],
        available: np.ndarray,
        marks: Sequence[Mapping[str, Mark | None]],
    ) -> np.ndarray | None:
        """A small live hop, checked in plain Python (no planning arrays) and run as one
        onnxruntime call: the latency path. None when any window does not simply continue
        its stream by one shift per modality; the general path then plans it (and refuses
        bad input with the error it deserves)."""
        n = len(keys)
        slots = [self._slots.get(k) for k in keys]
        if None in slots or len(set(keys)) != n:
            return None
        jobs: list[tuple | None] = []
        for j, m in enumerate(self._mods):
            rows, xs, shift = [], [], 0
            for i in range(n):
                if not available[i, j]:
                    continue
                mk, slot, x = marks[i].get(m.name), slots[i], data[i][m.name]
                if mk is None or not m.valid[slot] or m.epoch[slot] != mk.epoch:
                    return None
                s = mk.start - int(m.start[slot])
                if (
                    x.shape != (m.channels, m.samples)
                    or not 1 <= s <= m.span
                    or shift not in (0, s)
                ):
                    return None
                shift = s
                rows.append(i)
                xs.append(x[:, m.samples - s :])
            if not rows:
                jobs.append(None)
                continue
            one = len(xs) == 1 and xs[0].dtype == np.float32  # a view; copied once, in _fused
            x = xs[0][None] if one else np.stack(xs, dtype=np.float32)
            if not np.isfinite(x).all():
                return None
            at = np.array([slots[i] for i in rows], dtype=np.int64)
            jobs.append((m, np.array(rows), at, shift, x.transpose(0, 2, 1)))
        try:
            probs = self._fused(jobs, available)
        except BaseException:
            self._invalidate(np.array(slots, dtype=np.int64))
            raise
        for job in jobs:
            if job is None:
                continue
            m, rows, at = job[:3]
            m.counters.reused += len(rows)
            for i, slot in zip(rows.tolist(), at.tolist(), strict=True):
                mk = marks[i][m.name]
                m.valid[slot], m.epoch[slot], m.start[slot] = mk.final, mk.epoch, mk.start
        for key in keys:
            self._slots.move_to_end(key)
        return probs

    def _fused(self, jobs: list[tuple | None], available: np.ndarray) -> np.ndarray:
        """Run one live hop in the hop graph. A job per modality: (modality, rows, slots,
        shift, new samples [G, shift, C]) or None; the state is read and written here, in
        numpy."""
        assert self.step is not None
        n, feed, jobs = len(available), [], list(jobs)
        if n == 1:
            return self._fused_one(jobs, available)
        for j, (m, job) in enumerate(zip(self._mods, jobs, strict=True)):
            d = m.widths[-1]
            if job is None:  # no window has this modality: zeros, masked in the graph
                feed += m.absent_feed(n)
                continue
            _, rows, at, shift, x = job
            every = len(rows) == n
            feed.append(np.ascontiguousarray(x) if every else _rows(x, rows, n))
            tails_np, ring_np, sums_np = m.state_np
            for t in tails_np:
                kept = t[at]
                feed.append(kept if every else _rows(kept, rows, n))
            cols = at[:, None] * m.span + (m.pos[at, None] + np.arange(shift)) % m.span
            leaving = ring_np.reshape(-1, d)[cols.reshape(-1)]
            base = sums_np[at] - leaving.reshape(len(at), shift, d).sum(axis=1, dtype=np.float64)
            base32 = base.astype(np.float32)
            feed.append(base32 if every else _rows(base32, rows, n))
            jobs[j] = (*job, cols, base)
        feed.append(available)
        out = self.step(feed)
        for j, job in enumerate(jobs):
            if job is None:
                continue
            m, rows, at, _, _, cols, base = job
            f, *tails = out[1 + 4 * j : 5 + 4 * j]
            f = f[rows] if len(rows) != n else f
            d = f.shape[2]
            tails_np, ring_np, sums_np = m.state_np
            ring_np.reshape(-1, d)[cols.reshape(-1)] = f.reshape(-1, d)
            sums_np[at] = base + f.sum(axis=1, dtype=np.float64)
            for t, new in zip(tails_np, tails, strict=True):
                t[at] = new[rows] if len(rows) != n else new
            m.pos[at] = (m.pos[at] + f.shape[1]) % m.span
        self.fused_hops += 1
        return out[0]

    def _fused_one(self, jobs: list[tuple | None], available: np.ndarray) -> np.ndarray:
        """``_fused`` for one window, the latency case: the slot's state is read and
        written through slices (the ring's columns wrap at most once), not index arrays."""
        assert self.step is not None
        feed, spans = [], []
        for m, job in zip(self._mods, jobs, strict=True):
            if job is None:
                feed += m.absent_feed(1)
                spans.append(None)
                continue
            _, _, at, shift, x = job
            slot = int(at[0])
            tails, ring, sums = m.state_np
            feed.append(np.ascontiguousarray(x))
            feed += [t[slot : slot + 1] for t in tails]
            pos = int(m.pos[slot])
            cut = min(shift, m.span - pos)  # columns before the ring wraps
            base = sums[slot] - ring[slot, pos : pos + cut].sum(axis=0, dtype=np.float64)
            if cut < shift:
                base -= ring[slot, : shift - cut].sum(axis=0, dtype=np.float64)
            feed.append(base.astype(np.float32)[None])
            spans.append((slot, pos, shift, cut, base))
        feed.append(available)
        out = self.step(feed)
        for j, (m, span) in enumerate(zip(self._mods, spans, strict=True)):
            if span is None:
                continue
            slot, pos, shift, cut, base = span
            f, *tails = out[1 + 4 * j : 5 + 4 * j]
            f = f[0]  # [shift, D]
            kept_tails, ring, sums = m.state_np
            ring[slot, pos : pos + cut] = f[:cut]
            ring[slot, : shift - cut] = f[cut:]
            sums[slot] = base + f.sum(axis=0, dtype=np.float64)
            for t, new in zip(kept_tails, tails, strict=True):
                t[slot] = new[0]
            m.pos[slot] = (pos + shift) % m.span
        self.fused_hops += 1
        return out[0]

    def _plan(
        self,
        m: _Modality,
        keys: Sequence[Hashable],
        data: Sequence[Mapping[str, np.ndarray]],
        rows: np.ndarray,
        marks: Sequence[Mapping[str, Mark | None]] | None,
    ) -> list[_Group]:
        """Check one modality's windows, group them by shape and stage their input;
        InputError names the first bad window."""
        idx = np.flatnonzero(rows)
        if not len(idx):
            return []
        xs = [data[i][m.name] for i in idx.tolist()]
        expected = (m.channels, m.samples)
        if any(x.shape != expected for x in xs):
            i = next(i for i, x in zip(idx.tolist(), xs, strict=True) if x.shape != expected)
            raise InputError(
                f"window {i}, modality {m.name!r}: expected [{m.channels}, {m.samples}], "
                f"got {list(data[i][m.name].shape)}"
            )
        mks = [marks[i].get(m.name) for i in idx.tolist()] if marks is not None else None
        keyed = [keys[i] for i in idx.tolist()]
        if mks is not None and None not in mks and len(set(keyed)) == len(keyed):
            groups = self._plan_hop(m, idx, keyed, mks)
        else:
            groups = self._plan_segments(m, idx, keys, mks)
        for group in groups:
            group.x = self._stage(m, group, data)
            if not np.isfinite(group.x).all():
                bad = ~np.isfinite(group.x).reshape(len(group.x), -1).all(axis=1)
                first = group.first[np.flatnonzero(bad)[0]]
                raise InputError(
                    f"window {first} (or one after it of the same stream), modality "
                    f"{m.name!r}: NaN or Inf in its samples"
                )
        return groups

    def _plan_hop(
        self, m: _Modality, idx: np.ndarray, keyed: list[Hashable], mks: list[Mark]
    ) -> list[_Group]:
        """The live case, vectorised: one marked window per stream."""
        # fromiter: np.array of a list of tuples took 6x as long (0.18 ms for 200 windows)
        flat = itertools.chain.from_iterable(mks)
        marked = np.fromiter(flat, np.int64, 3 * len(mks)).reshape(len(mks), 3)
        slot = np.array([self._slots.get(k, -1) for k in keyed], dtype=np.int64)
        known = slot >= 0
        at = np.where(known, slot, 0) if len(m.valid) else np.zeros(0, np.int64)
        shift = marked[:, 1] - (m.start[at] if len(m.valid) else 0)
        reuse = known & (shift >= 1) & (shift <= m.span)
        if len(m.valid):
            reuse &= m.valid[at] & (m.epoch[at] == marked[:, 0])
        else:
            reuse[:] = False
        groups = []
        for s in np.unique(shift[reuse]).tolist():
            pick = reuse & (shift == s)
            groups.append(
                _Group(False, (s,), idx[pick], idx[pick], np.ones(pick.sum(), bool), marked[pick])
            )
        if not reuse.all():
            pick = ~reuse
            groups.append(
                _Group(True, (0,), idx[pick], idx[pick], np.ones(pick.sum(), bool), marked[pick])
            )
        return groups

    def _plan_segments(
        self,
        m: _Modality,
        idx: np.ndarray,
        keys: Sequence[Hashable],
        mks: list[Mark | None] | None,
    ) -> list[_Group]:
        """Any order: each stream's consecutive windows become a segment, run in one go."""
        open_seg: dict[Hashable, _Segment] = {}
        last: dict[Hashable, tuple[int, int, int]] = {}  # key -> epoch, start, final
        segments: list[_Segment] = []
        first_of: dict[Hashable, int] = {}
        for n, i in enumerate(idx.tolist()):
            key = keys[i]
            first_of.setdefault(key, i)
            mk = mks[n] if mks is not None else None
            if key in last:
                prev = last[key]
            else:
                slot = self._slots.get(key)
                ok = slot is not None and m.valid[slot]
                prev = (int(m.epoch[slot]), int(m.start[slot]), 1) if ok else None
            shift = mk.start - prev[1] if mk is not None and prev is not None else 0
            reuse = mk is not None and prev is not None and prev[2] and prev[0] == mk.epoch
            reuse = reuse and 1 <= shift <= m.span
            seg = open_seg.get(key)
            if reuse and seg is not None:
                seg.rows.append(i)
                seg.shifts.append(shift)
            else:
                if seg is not None:
                    seg.last = False
                seg = _Segment(not reuse, first_of[key], i, shift)
                open_seg[key] = seg
                segments.append(seg)
            last[key] = (mk.epoch, mk.start, int(mk.final)) if mk is not None else (0, 0, 0)
            seg.mark = last[key]
        by_shape: dict[tuple, list[_Segment]] = {}
        for seg in segments:
            by_shape.setdefault((seg.fresh, tuple(seg.shifts)), []).append(seg)
        return [
            _Group(
                fresh,
                shifts,
                np.array([s.first for s in segs]),
                np.array([r for s in segs for r in s.rows]),
                np.array([s.last for s in segs]),
                np.array([s.mark for s in segs], dtype=np.int64).reshape(len(segs), 3),
            )
            for (fresh, shifts), segs in by_shape.items()
        ]

    def _assign(self, keys: Sequence[Hashable]) -> np.ndarray:
        """Slot of each window's key, by index of the key's first window in ``keys``."""
        slots = np.full(len(keys), -1, dtype=np.int64)
        wanted = dict.fromkeys(keys)
        seen: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                slots[i] = slots[seen[key]]
                continue
            seen[key] = i
            slot = self._slots.get(key)
            if slot is None:
                slot = self._new_slot(wanted)
                self._slots[key] = slot
            else:
                self._slots.move_to_end(key)
            slots[i] = slot
        return slots

    def _new_slot(self, wanted: Mapping[Hashable, None]) -> int:
        if self._free:
            slot = self._free.pop()
        elif len(self._slots) < self.max_streams:
            slot = len(self._slots)
            room = len(self._mods[0].valid)
            if slot >= room:
                size = min(self.max_streams, max(FIRST_SLOTS, 2 * room))
                for m in self._mods:
                    m.resize(size)
        else:  # the least recently seen key not in this call
            old = next(k for k in self._slots if k not in wanted)
            slot = self._slots.pop(old)
            self.evicted += 1
        for m in self._mods:
            m.valid[slot] = False
        return slot

    def _stage(
        self, m: _Modality, group: _Group, data: Sequence[Mapping[str, np.ndarray]]
    ) -> np.ndarray:
        """A group's input [G, C, L]: each segment's new samples (the first window whole
        when fresh), in a pinned buffer on CUDA."""
        n_win, name = len(group.shifts), m.name
        rows = group.rows.reshape(-1, n_win).tolist()
        if n_win == 1:
            keep = m.samples - group.shifts[0] if not group.fresh else 0
            pieces = [data[r[0]][name][:, keep:] for r in rows]
        else:
            pieces = []
            for r in rows:
                cut = [
                    data[i][name][:, m.samples - s :] for i, s in zip(r, group.shifts, strict=True)
                ]
                if group.fresh:
                    cut[0] = data[r[0]][name]
                pieces.append(np.concatenate(cut, axis=1))
        if not self._staging:
            return np.stack(pieces, dtype=np.float32)
        g, (c, length) = len(pieces), pieces[0].shape
        key = (name, c, length)
        if key in self._staged or g > STAGE_ROWS:  # staged into already, or too big to keep
            return np.stack(pieces, dtype=np.float32)
        self._staged.add(key)
        buf = self._stage_buffers.get(key)
        if buf is None or buf.shape[0] < g:
            size = max(g, 2 * (0 if buf is None else buf.shape[0]))
            buf = torch.empty((size, c, length))
            buf = self._stage_buffers[key] = (
                buf.pin_memory() if buf.device.type == "cpu" and torch.cuda.is_available() else buf
            )
        group.staged = buf[:g]  # the pinned tensor: its copy to the GPU is asynchronous
        return np.stack(pieces, out=group.staged.numpy(), casting="same_kind")

    def _run(self, m: _Modality, group: _Group, slots: np.ndarray, latents: torch.Tensor) -> None:
        """Encode one group and put its pooled latents in place."""
        x = group.staged if group.staged is not None else torch.from_numpy(group.x)
        x = x.to(self.device, non_blocking=True).transpose(1, 2)
        seg_slots = slots[group.first]
        if not group.fresh and len(group.shifts) == 1:
            pooled = m.hop(x, seg_slots)
        else:
            steps = np.cumsum([0, *group.shifts[1:]] if group.fresh else group.shifts)
            ends = m.span + steps
            pooled = m.chain(x, seg_slots, group.fresh, ends, group.keep)
            pooled = pooled.reshape(len(group.rows), -1)
        rows = torch.from_numpy(group.rows).to(self.device, non_blocking=True)
        latents[:, m.index].index_copy_(0, rows, pooled)
