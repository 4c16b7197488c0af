"""Pipeline: reader -> windower -> inference worker -> publishers, as two asyncio tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from crossl_stream.errors import InputError
from crossl_stream.inference import InferenceWorker
from crossl_stream.publishers.base import Publisher
from crossl_stream.readers.base import Reader
from crossl_stream.windower import Windower

log = logging.getLogger(__name__)


@dataclass
class PipelineCounters:
    chunks: int = 0
    bad_chunks: int = 0  # refused with an InputError (wrong shape, unknown sensor, ...)
    windows: int = 0
    predictions: int = 0


async def run_pipeline(
    reader: Reader,
    windower: Windower,
    worker: InferenceWorker,
    publishers: Sequence[Publisher],
) -> PipelineCounters:
    """Run until the reader ends, then drain: every window cut is predicted and published.

    A bad chunk is logged with its sensor and counted; it never stops the pipeline.
    """
    counters = PipelineCounters()

    async def ingest() -> None:
        try:
            async for chunk in reader.chunks():
                counters.chunks += 1
                try:
                    windower.push(
                        chunk.sensor, chunk.values, chunk.timestamps, chunk.arrival, chunk.received
                    )
                except InputError as exc:
                    counters.bad_chunks += 1
                    log.warning("chunk refused: %s", exc)
                    continue
                for window in windower.poll(now=chunk.arrival):
                    counters.windows += 1
                    await worker.put(window)
            for window in windower.flush():
                counters.windows += 1
                await worker.put(window)
        finally:
            worker.close()

    async def publish() -> None:
        async for prediction in worker.predictions():
            counters.predictions += 1
            for publisher in publishers:
                publisher.publish(prediction)

    try:
        await asyncio.gather(ingest(), publish())
    finally:
        for publisher in publishers:
            publisher.close()
    return counters
