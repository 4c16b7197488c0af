"""Console publisher: a concise live view of the latest prediction."""

from __future__ import annotations

import sys
from typing import TextIO

from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher


class ConsolePublisher(Publisher):
    """Owns a text stream and writes one line per prediction (or every ``every``-th).

    Each line: window end, label and its probability, the mask (``+`` used, ``-`` masked),
    stream states when not all live, and total latency.
    """

    def __init__(self, stream: TextIO | None = None, every: int = 1) -> None:
        super().__init__()
        self.stream = stream or sys.stdout
        self.every = max(1, every)

    def send(self, prediction: Prediction) -> None:
        if prediction.seq % self.every:
            return
        mask = " ".join(f"{'+' if used else '-'}{m}" for m, used in prediction.mask.items())
        states = {m: s for m, s in prediction.states.items() if s != "live"}
        note = f" [{', '.join(f'{m} {s}' for m, s in states.items())}]" if states else ""
        if prediction.label is None:
            what = f"{'(no sensor)':<15}"
        else:
            what = f"{prediction.label:<10}{prediction.probs[prediction.label]:5.2f}"
        late = prediction.latency_ms.get("total", prediction.age_ms or 0.0)
        self.stream.write(
            f"#{prediction.seq:<5} t={prediction.t_window_end:10.2f}  {what}  {mask}{note}"
            f"  {late:6.2f} ms\n"
        )
        self.stream.flush()
