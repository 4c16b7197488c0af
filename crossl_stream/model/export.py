"""ONNX export of a CroSSL model, and its onnxruntime session for CPU inference.

The exported graph is static: every encoder runs on every row and a row whose modality is
unavailable takes the mask token, which is what the eager model computes (it skips those rows
instead). The file records the SHA-256 of the weights it was exported from, so a stale export
is refused rather than silently used.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossl_stream.errors import CheckpointError
from crossl_stream.model.crossl import CroSSL

ONNX_FILE = "model.onnx"
STREAM_FILE = "stream.onnx"
# what earlier versions exported instead of stream.onnx: nothing reads them any more
LEGACY_FILES = ("encoder-*.onnx", "head.onnx")
WEIGHTS_KEY = "crossl_stream.weights_sha256"


class StaticCroSSL(nn.Module):
    """Owns nothing but a view of a CroSSL model: inputs one tensor per modality plus the
    availability mask, output class probabilities, no data-dependent branches."""

    def __init__(self, model: CroSSL) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        *inputs, available = args
        m = self.model
        latents = []
        for i, (name, x) in enumerate(zip(m.modality_names, inputs, strict=True)):
            mean = getattr(m, f"norm_mean_{name}")[:, None]
            std = getattr(m, f"norm_std_{name}")[:, None]
            z = m.encoders[name]((x - mean) / std).mean(dim=2)
            latents.append(torch.where(available[:, i : i + 1], z, m.mask_token[i][None]))
        embedding = m.aggregator(torch.stack(latents, dim=1), available)
        return torch.softmax(m.head(embedding), dim=-1)


def weights_digest(weights: str | Path) -> str:
    """SHA-256 of a weights file."""
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def export_onnx(model: CroSSL, path: str | Path, weights_sha256: str) -> Path:
    """Write ``model`` as ONNX (dynamic batch) to ``path`` and check it against the eager
    model on a random batch with every mask pattern; CheckpointError when they differ."""
    try:
        import onnx
    except ImportError as exc:  # the export extra: onnx, onnxscript
        raise CheckpointError(
            "ONNX export needs the 'export' extra: pip install 'crossl-stream[export]'"
        ) from exc
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is
    static = StaticCroSSL(model).eval()
    n_mod = len(model.modalities)
    batch = 2**n_mod * 2  # every availability pattern, twice
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, m.channels, m.samples, generator=g) for m in model.modalities]
    patterns = [[bool(k >> j & 1) for j in range(n_mod)] for k in range(2**n_mod)]
    available = torch.tensor(patterns * 2)
    available[~available.any(1), 0] = True  # a window with nothing available is never cut
    dim = torch.export.Dim("batch", min=1, max=65536)
    names = [*model.modality_names, "available"]
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        program = torch.onnx.export(
            static,
            (*inputs, available),
            dynamo=True,
            input_names=names,
            output_names=["probs"],
            dynamic_shapes=(tuple({0: dim} for _ in names),),  # forward(*args): one tuple
            verbose=False,
        )
    proto = program.model_proto
    _strip_provenance(proto.graph)
    entry = onnx.StringStringEntryProto(key=WEIGHTS_KEY, value=weights_sha256)
    proto.metadata_props.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    with torch.inference_mode():
        expected = model(dict(zip(model.modality_names, inputs, strict=True)), available).probs
    got = OnnxModel(path, weights_sha256, threads=1)(
        {n: x.numpy() for n, x in zip(model.modality_names, inputs, strict=True)},
        available.numpy(),
    )
    error = float(np.abs(got - expected.numpy()).max())
    if error > 1e-4:
        path.unlink()
        raise CheckpointError(f"{path}: ONNX export differs from the model by {error:.2e}")
    return path


class StreamStep(nn.Module):
    """Owns nothing but a view of a CroSSL model: one live hop of every modality and the
    head as one graph, so onnxruntime runs a hop in one call.

    Per modality (in model order) it takes the new samples [G, s, C] (time-major), each
    conv layer's kept input tail [G, k - 1, width] and ``base`` [G, D] (the running feature
    sum less the columns leaving the window); then the [G, M] visibility mask. It returns
    the probabilities, then per modality the new feature columns [G, s, D] and the new
    tails. ``StreamingCroSSL`` keeps the state between calls.
    """

    def __init__(self, model: CroSSL) -> None:
        super().__init__()
        self.model = model
        self.spans = [m.samples - model.receptive_field + 1 for m in model.modalities]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        *per, visible = args
        outputs, latents = [], []
        for j, name in enumerate(m.modality_names):
            x, *tails, base = per[5 * j : 5 * j + 5]
            h = (x - getattr(m, f"norm_mean_{name}")) / getattr(m, f"norm_std_{name}")
            for block, tail in zip(m.encoders[name].blocks, tails, strict=True):
                h = torch.cat([tail, h], dim=1)
                outputs.append(h[:, h.shape[1] - block.conv.kernel_size[0] + 1 :])
                y = block.conv(h.transpose(1, 2)).transpose(1, 2)
                w, b = block.norm_weight[:, 0], block.norm_bias[:, 0]
                y = nn.functional.layer_norm(y, (y.shape[2],), w, b, eps=1e-5)
                # one PRelu node on [rows, channels] (its slope broadcasts over the last
                # axis); written with where() it was three nodes and a third of the graph
                h = nn.functional.prelu(y.reshape(-1, y.shape[2]), block.act.weight)
                h = h.reshape(y.shape)
            outputs.insert(len(outputs) - 3, h)
            z = (base + h.sum(dim=1)) / self.spans[j]
            latents.append(torch.where(visible[:, j : j + 1], z, m.mask_token[j][None]))
        probs = torch.softmax(m.classify(torch.stack(latents, dim=1), visible), dim=-1)
        return (probs, *outputs)


def export_stream(model: CroSSL, path: str | Path, weights_sha256: str) -> Path:
    """Write ``StreamStep`` (dynamic batch and hop length) to ``path`` and check it: live
    hops streamed through it must give the eager model's probabilities."""
    from crossl_stream.model.specs import Mark
    from crossl_stream.model.streaming import StreamingCroSSL

    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    step = StreamStep(model).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    g = torch.Generator().manual_seed(0)
    args, names, dynamic = [], [], []
    for j, spec in enumerate(model.modalities):
        time = torch.export.Dim(f"time{j}", min=1, max=spec.samples)
        widths = [spec.channels] + [b.conv.out_channels for b in model.encoders[spec.name].blocks]
        args.append(torch.randn(2, 3, spec.channels, generator=g))
        names.append(f"x_{spec.name}")
        dynamic.append({0: batch, 1: time})
        for i, block in enumerate(model.encoders[spec.name].blocks):
            args.append(torch.randn(2, block.conv.kernel_size[0] - 1, widths[i], generator=g))
            names.append(f"tail{i}_{spec.name}")
            dynamic.append({0: batch})
        args.append(torch.randn(2, widths[-1], generator=g))
        names.append(f"base_{spec.name}")
        dynamic.append({0: batch})
    args.append(torch.ones(2, len(model.modalities), dtype=torch.bool))
    names.append("visible")
    dynamic.append({0: batch})
    _write(step, tuple(args), names, (tuple(dynamic),), path, weights_sha256)
    # check: subjects streamed hop by hop through the graph against the eager model
    runtime = OnnxStep(path, model, weights_sha256, threads=1)
    rng = np.random.default_rng(0)
    n, hops = 3, 6
    step_s = max(1 / m.rate_hz for m in model.modalities)
    streams = {
        m.name: rng.normal(
            size=(n, m.channels, m.samples + round(hops * step_s * m.rate_hz))
        ).astype(np.float32)
        for m in model.modalities
    }
    fused, eager = StreamingCroSSL(model, 8, step=runtime), StreamingCroSSL(model, 8)
    worst = 0.0
    for k in range(hops):
        data, marks = [], []
        for i in range(n):
            ends = {m.name: m.samples + round(k * step_s * m.rate_hz) for m in model.modalities}
            data.append(
                {
                    m.name: streams[m.name][i, :, ends[m.name] - m.samples : ends[m.name]]
                    for m in model.modalities
                }
            )
            marks.append({m.name: Mark(i + 1, ends[m.name] - m.samples) for m in model.modalities})
        every = np.ones((n, len(model.modalities)), dtype=bool)
        every[0, -1] = k % 2 == 0 or len(model.modalities) == 1  # a sensor that comes and goes
        a, b = fused(range(n), data, every, marks), eager(range(n), data, every, marks)
        worst = max(worst, float(np.abs(a - b).max()))
    if fused.fused_hops == 0 or worst > 1e-4:
        path.unlink()
        raise CheckpointError(
            f"{path}: the streaming graph differs from the model by {worst:.2e}"
            if worst > 1e-4
            else f"{path}: the streaming check ran no hop through the graph"
        )
    return path


def _write(
    module: nn.Module, args: tuple, names: list[str], dynamic: tuple, path: Path, digest: str
) -> Path:
    """Export ``module`` to ONNX at ``path``, stamped with the weights' digest."""
    import onnx

    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            input_names=names,
            dynamic_shapes=dynamic,
            verbose=False,
        )
    proto = program.model_proto
    _strip_provenance(proto.graph)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=WEIGHTS_KEY, value=digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


class OnnxStep:
    """Owns an onnxruntime session of ``StreamStep``: a live hop of G subjects in one call
    (``StreamingCroSSL(step=...)`` keeps the state). One thread unless told otherwise: a
    hop's few samples do not pay for a second."""

    def __init__(
        self, path: str | Path, model: CroSSL, weights_sha256: str, threads: int | None = None
    ) -> None:
        self.session = _session(Path(path), weights_sha256, threads or 1)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feed: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities, then per modality new features and tails (``StreamStep``)."""
        return self.session.run(None, dict(zip(self.input_names, feed, strict=True)))


def _strip_provenance(graph) -> None:
    """Drop the exporter's per-node notes (stack traces with this machine's file paths, fx
    names): they do not change what the graph computes and must not ship."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.g.node:
                _strip_provenance(attr.g)
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in values:
            del v.metadata_props[:]


class OnnxModel:
    """Owns an onnxruntime CPU session of an exported model.

    Refuses a file exported from other weights than ``weights_sha256``.
    """

    def __init__(self, path: str | Path, weights_sha256: str, threads: int | None = None) -> None:
        self.session = _session(Path(path), weights_sha256, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray], available: np.ndarray) -> np.ndarray:
        """Class probabilities [batch, classes] for float32 inputs and a bool mask."""
        feed = dict(inputs)
        feed["available"] = available
        return self.session.run(None, {k: feed[k] for k in self.input_names})[0]


def _session(path: Path, weights_sha256: str, threads: int | None):
    """An onnxruntime CPU session of ``path``, refused unless exported from these weights."""
    import onnxruntime as ort

    if not path.is_file():
        raise CheckpointError(f"{path}: no ONNX export; run `crossl-stream export`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: spinning took CPU from the readers and the
    # other processes of a live setup (p99 of one window 3.5 -> 1.0 ms on two cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: not a loadable ONNX model ({exc})") from exc
    if session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY) != weights_sha256:
        raise CheckpointError(
            f"{path} was exported from other weights than the checkpoint's; run "
            "`crossl-stream export` again"
        )
    return session
