"""Readers: sources of sensor chunks on the host time base (simulator now; replay, LSL and
MQTT build on the same ``Reader`` protocol)."""

from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.readers.simulate import SimulatedSensor, Simulator

__all__ = ["Chunk", "Reader", "SensorInfo", "SimulatedSensor", "Simulator"]
