"""Modality specifications: what one sensor stream looks like inside a window."""

from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModalitySpec(BaseModel):
    """One modality as the model sees it: channels x samples at a fixed rate.

    >>> acc = ModalitySpec(name="acc", channels=3, rate_hz=50.0, samples=100)
    >>> acc.window_s
    2.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    channels: int = Field(gt=0)
    rate_hz: float = Field(gt=0)
    samples: int = Field(gt=0, description="samples per window at rate_hz")
    channel_names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _names_match_channels(self) -> ModalitySpec:
        if self.channel_names is not None and len(self.channel_names) != self.channels:
            raise ValueError(
                f"modality {self.name!r}: {len(self.channel_names)} channel_names "
                f"for {self.channels} channels"
            )
        return self

    @property
    def window_s(self) -> float:
        """Window length in seconds."""
        return self.samples / self.rate_hz


class Mark(NamedTuple):
    """Where one modality's window lies in its stream (the windower stamps each window).

    ``epoch`` names an unbroken run of grid points that never change once made (a reset or
    a skipped silence starts a new one); ``start`` is the grid index of the window's first
    point; ``final`` says no later sample can change any point of this window. Two windows
    of one epoch hold the same values where they overlap: streaming inference reuses the
    first one's encoder features on that promise.
    """

    epoch: int
    start: int
    final: bool = True
