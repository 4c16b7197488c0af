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
