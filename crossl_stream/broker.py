"""An MQTT broker: where it is, how to log in, and how to retry it.

Shared by the MQTT reader, the MQTT publisher and the MQTT player. ``Backoff`` is the retry
schedule all three use: exponential with jitter, so that many clients that lost the
same broker do not all come back at the same instant.
"""

from __future__ import annotations

import random
import socket
import ssl
from dataclasses import dataclass, field


class BrokerError(Exception):
    """A broker setting that cannot work (a CA file that is not PEM, a key that does not
    match its certificate): retrying would not help."""


@dataclass(frozen=True)
class Broker:
    """Where a broker is and how to log in to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # default: the system's CAs
    cert_file: str | None = None  # a client certificate, when the broker asks for one
    key_file: str | None = None
    client_id: str | None = None
    keepalive: int = 30

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (None without TLS); BrokerError names the file that is wrong."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise BrokerError(
                f"broker.ca_file: {self.ca_file} holds no usable CA certificate (PEM): {exc}"
            ) from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise BrokerError(
                    f"broker.cert_file / key_file: {self.cert_file}, {self.key_file}: not a "
                    f"PEM certificate and its key: {exc}"
                ) from None
        return context

    def client(self, will=None, clean_session: bool | None = None):
        """An aiomqtt client for this broker."""
        import aiomqtt

        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            tls_context=self.ssl_context(),
            keepalive=self.keepalive,
            will=will,
            clean_session=clean_session,
            # paho leaves Nagle on: a small publish after another would wait for an ACK
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )


class Backoff:
    """Exponential backoff with jitter: the n-th wait is uniform in [c/2, c], c = min(cap,
    first * 2**n) (never a hot loop, never two clients in lockstep); ``reset`` after a
    success.

    >>> b = Backoff(0.5, 8.0, rng=random.Random(0))
    >>> [round(b.next(), 2) for _ in range(6)]
    [0.46, 0.88, 1.42, 2.52, 6.05, 5.62]
    """

    def __init__(self, first_s: float = 0.2, cap_s: float = 10.0, rng=None) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The time to wait before the next attempt."""
        ceiling = min(self.cap_s, self.first_s * 2**self.attempts)
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
