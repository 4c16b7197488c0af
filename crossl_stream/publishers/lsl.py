"""LSL publisher: predictions as an LSL stream, plus a marker stream of the JSON records."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher


class LslPublisher(Publisher):
    """Owns two LSL outlets: ``NAME`` (type Predictions, one float32 channel per class, labelled
    with the class names, stamped at the window end on the LSL clock; the model and classes in
    the stream's description) and ``NAME-json`` (type Markers, the JSON record of each
    prediction). Import pylsl with ``LSLAPICFG`` set as it must be on this machine.
    """

    def __init__(
        self,
        classes: Sequence[str],
        model_id: str,
        name: str = "crossl-stream",
        source_id: str | None = None,
        rate_hz: float = 0.0,
    ) -> None:
        super().__init__()
        import pylsl

        self.classes = list(classes)
        source = source_id or f"{name}@{model_id}"
        info = pylsl.StreamInfo(
            name, "Predictions", len(self.classes), rate_hz, pylsl.cf_float32, source
        )
        desc = info.desc()
        desc.append_child_value("model", model_id)
        desc.append_child_value("classes", ",".join(self.classes))
        channels = desc.append_child("channels")
        for c in self.classes:
            ch = channels.append_child("channel")
            ch.append_child_value("label", c)
            ch.append_child_value("unit", "probability")
            ch.append_child_value("type", "Probability")
        markers = pylsl.StreamInfo(
            f"{name}-json", "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string, f"{source}-json"
        )
        markers.desc().append_child_value("model", model_id)
        self._outlet = pylsl.StreamOutlet(info)
        self._markers = pylsl.StreamOutlet(markers)
        self._probs = np.zeros(len(self.classes), dtype=np.float32)

    def send(self, prediction: Prediction) -> None:
        for i, c in enumerate(self.classes):  # a window no sensor covered: NaN
            self._probs[i] = prediction.probs.get(c, np.nan)
        self._outlet.push_sample(self._probs, prediction.t_window_end)
        record = json.dumps(prediction.record(), separators=(",", ":"))
        self._markers.push_sample([record], prediction.t_window_end)

    def close(self) -> None:
        del self._outlet, self._markers
