"""Publishers: where predictions go (JSONL file and console now; LSL and MQTT next)."""

from crossl_stream.publishers.base import Publisher
from crossl_stream.publishers.console import ConsolePublisher
from crossl_stream.publishers.jsonl import JsonlPublisher
from crossl_stream.publishers.memory import MemoryPublisher

__all__ = ["ConsolePublisher", "JsonlPublisher", "MemoryPublisher", "Publisher"]
