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
HEAD_FILE = "head.onnx"
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


class _Encoder(nn.Module):
    """One modality's normalisation + encoder, as a graph of its own (any length)."""

    def __init__(self, model: CroSSL, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = (x - getattr(m, f"norm_mean_{self.name}")[:, None]) / getattr(
            m, f"norm_std_{self.name}"
        )[:, None]
        for block in m.encoders[self.name].blocks:
            # the block's channel LayerNorm, written as one LayerNormalization node between
            # transposes: 5 nodes a block instead of ~30 (onnxruntime pays per node)
            x = block.conv(x).transpose(1, 2)
            w, b = block.norm_weight[:, 0], block.norm_bias[:, 0]
            x = nn.functional.layer_norm(x, (x.shape[2],), w, b, eps=1e-5).transpose(1, 2)
            x = block.act(x)
        return x


class _Head(nn.Module):
    """Aggregator + class head + softmax over modality latents."""

    def __init__(self, model: CroSSL) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model.classify(latents, visible), dim=-1)


def streaming_files(model: CroSSL) -> dict[str, str]:
    """File names of the streaming graphs: one encoder per modality, and the head."""
    return {**{n: f"encoder-{n}.onnx" for n in model.modality_names}, "": HEAD_FILE}


def export_streaming(model: CroSSL, folder: str | Path, weights_sha256: str) -> list[Path]:
    """Write the graphs ``StreamingCroSSL`` runs in onnxruntime (each encoder with dynamic
    batch and length; the head with dynamic batch) and check them: streamed windows must
    give the eager model's probabilities. CheckpointError when they differ."""
    from crossl_stream.model.streaming import StreamingCroSSL

    folder = Path(folder)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is
    files = streaming_files(model)
    batch = torch.export.Dim("batch", min=1, max=65536)
    field = model.receptive_field
    paths = []
    for m in model.modalities:
        time = torch.export.Dim("time", min=field, max=2**24)
        x = torch.randn(2, m.channels, m.samples)
        paths.append(
            _write(
                _Encoder(model, m.name),
                (x,),
                ["x"],
                ({0: batch, 2: time},),
                folder / files[m.name],
                weights_sha256,
            )
        )
    n_mod, code = len(model.modalities), model.config.code_size
    latents = torch.randn(4, n_mod, code)
    visible = torch.ones(4, n_mod, dtype=torch.bool)
    paths.append(
        _write(
            _Head(model),
            (latents, visible),
            ["latents", "visible"],
            ({0: batch}, {0: batch}),
            folder / HEAD_FILE,
            weights_sha256,
        )
    )
    # check: consecutive windows of a random stream (one sample of the slowest modality
    # apart) under every availability pattern, in one call (a chain) and one at a time
    runtime = OnnxRuntime(folder, model, weights_sha256, threads=1)
    rng = np.random.default_rng(0)
    n = 4 * 2**n_mod
    step = max(1 / m.rate_hz for m in model.modalities)
    t_ends = [model.window_s + k * step for k in range(n)]
    streams = {
        m.name: rng.normal(size=(m.channels, round(t_ends[-1] * m.rate_hz) + 1)).astype(np.float32)
        for m in model.modalities
    }
    windows = []
    for t_end in t_ends:
        ends = {m.name: round(t_end * m.rate_hz) for m in model.modalities}
        windows.append(
            {
                m.name: streams[m.name][:, ends[m.name] - m.samples : ends[m.name]]
                for m in model.modalities
            }
        )
    available = np.array([[bool((k // 4) >> j & 1) for j in range(n_mod)] for k in range(n)])
    available[~available.any(1), 0] = True
    chained = StreamingCroSSL(model, runtime)
    one_by_one = StreamingCroSSL(model, runtime)
    got = np.concatenate(
        [
            chained(["check"] * n, t_ends, windows, available),
            *(
                one_by_one(["check"], t_ends[k : k + 1], windows[k : k + 1], available[k : k + 1])
                for k in range(n)
            ),
        ]
    )
    reused = [sum(c.reused for c in s.counters.values()) for s in (chained, one_by_one)]
    if min(reused) == 0:  # the check itself went wrong: it must exercise the reuse
        raise CheckpointError(f"{folder}: the streaming check reused no features")
    with torch.inference_mode():
        stacked = {name: np.stack([w[name] for w in windows]) for name in model.modality_names}
        expected = np.tile(model(stacked, available).probs.numpy(), (2, 1))
    error = float(np.abs(got - expected).max())
    if error > 1e-4:
        for path in paths:
            path.unlink()
        raise CheckpointError(
            f"{folder}: streaming ONNX graphs differ from the model by {error:.2e}"
        )
    return paths


def _write(
    module: nn.Module,
    args: tuple,
    names: list[str],
    dynamic: tuple,
    path: Path,
    weights_sha256: str,
) -> Path:
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
            output_names=["out"],
            dynamic_shapes=dynamic,
            verbose=False,
        )
    proto = program.model_proto
    _strip_provenance(proto.graph)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=WEIGHTS_KEY, value=weights_sha256))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


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


class OnnxRuntime:
    """Owns onnxruntime sessions of the streaming graphs (``export_streaming``): the
    ``EncoderRuntime`` of ``StreamingCroSSL`` on the CPU, about 3x eager torch on the
    small inputs of a hop. One thread unless ``threads`` says otherwise (measured: one
    window every 100 ms took 2.7 ms with one thread, 3.1 ms with two, on two cores).

    Refuses graphs exported from other weights than ``weights_sha256``.
    """

    def __init__(
        self, folder: str | Path, model: CroSSL, weights_sha256: str, threads: int | None = None
    ) -> None:
        files = streaming_files(model)
        threads = threads or 1  # a hop's few samples: a second thread costs more than it gives
        self._encoders = {
            n: _session(Path(folder) / files[n], weights_sha256, threads)
            for n in model.modality_names
        }
        self._head = _session(Path(folder) / HEAD_FILE, weights_sha256, threads)
        self._head_inputs = {i.name for i in self._head.get_inputs()}

    def encode(self, name: str, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)[None]
        return self._encoders[name].run(None, {"x": x})[0][0]

    def classify(self, latents: np.ndarray, visible: np.ndarray) -> np.ndarray:
        feed = {"latents": np.ascontiguousarray(latents, dtype=np.float32), "visible": visible}
        return self._head.run(None, {k: v for k, v in feed.items() if k in self._head_inputs})[0]


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
