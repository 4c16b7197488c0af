"""An MQTT broker: where it is, how to log in, and how to retry it.

Shared by the MQTT reader, the MQTT publisher and the MQTT player. ``Backoff`` is the retry
schedule all three use: exponential with jitter, so that many clients that lost the
same broker do not all come back at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass, field

from crossl_stream.errors import ConfigError
from crossl_stream.logs import RateLimited

# paho's own lines ("failed to receive on socket: Connection reset by peer" at ERROR each
# time a broker goes away) repeat what Link says once, in words: kept quiet unless asked
PAHO_LOG = logging.getLogger("crossl_stream.paho")
PAHO_LOG.setLevel(logging.CRITICAL)


# A broker that is merely away (refused connection, lost link) is retried at least this often,
# so predictions flow again within about this long of its return; a broker that refuses the
# login waits up to the Backoff's own cap.
UNREACHABLE_CAP_S = 2.0


class BrokerError(ConfigError):
    """A broker setting that cannot work (a CA file that is not PEM, a key that does not
    match its certificate): retrying would not help. A ConfigError: one line, no traceback."""


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

    def client(self, will=None, clean_session: bool | None = None, **kwargs):
        """An aiomqtt client for this broker (``kwargs``: more aiomqtt.Client arguments);
        BrokerError when its TLS files cannot be used."""
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
            **{"logger": PAHO_LOG, **kwargs},
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

    def next(self, cap_s: float | None = None) -> float:
        """The time to wait before the next attempt (``cap_s``: a lower cap for this one)."""
        cap = self.cap_s if cap_s is None else min(cap_s, self.cap_s)
        ceiling = min(cap, self.first_s * 2 ** min(self.attempts, 64))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start the schedule over (after a connection that held)."""
        self.attempts = 0

    def after(self, exc: BaseException, stable: bool = False) -> float:
        """The wait after a failed or lost connection: the schedule starts over after a
        ``stable`` one, and a broker that is merely away is retried within
        UNREACHABLE_CAP_S (a refused login waits up to the full cap)."""
        if stable:
            self.reset()
        away = why_failed(exc)[0] in ("unreachable", "lost")
        return self.next(UNREACHABLE_CAP_S if away else None)


# -- what a failed connection means ----------------------------------------------------

# CONNACK refusals: MQTT 3.1.1 return codes and the MQTT 5 reason codes paho maps them to
_REFUSED = {
    1: "the broker does not speak this MQTT version",
    2: "the client id was refused (check broker.client_id)",
    3: "the broker is unavailable",
    4: "bad username or password (check broker.username / password_env)",
    5: "not authorized (check broker.username / password_env)",
    132: "the broker does not speak this MQTT version",
    133: "the client id was refused (check broker.client_id)",
    134: "bad username or password (check broker.username / password_env)",
    135: "not authorized (check broker.username / password_env)",
    136: "the broker is unavailable",
    137: "the broker is busy",
    138: "this client is banned",
}
# (text in the error, state, why): OSErrors reach us as their text only (aiomqtt wraps them)
_BY_TEXT = (
    ("certificate verify failed", "refused", "TLS: the broker's certificate is not trusted"),
    ("hostname mismatch", "refused", "TLS: the broker's certificate names another host"),
    ("wrong_version_number", "refused", "TLS handshake failed (is the port a TLS listener?)"),
    ("alert", "refused", "TLS: the broker refused the handshake"),
    ("ssl", "refused", "TLS failed"),
    ("connection refused", "unreachable", "connection refused (no broker listening there)"),
    ("timed out", "unreachable", "timed out"),
    ("name or service not known", "unreachable", "unknown host"),
    ("temporary failure in name resolution", "unreachable", "unknown host"),
    ("no route to host", "unreachable", "no route to host"),
    ("network is unreachable", "unreachable", "network unreachable"),
    ("disconnect", "lost", "connection lost"),
    ("connection was lost", "lost", "connection lost"),
    ("not currently connected", "lost", "connection lost"),
    ("connection reset", "lost", "connection lost"),
    ("broken pipe", "lost", "connection lost"),
)
_HINTS = {
    "TLS: the broker's certificate is not trusted": " (check broker.ca_file)",
    "TLS: the broker's certificate names another host": " (check broker.host)",
    "TLS: the broker refused the handshake": " (does it want a client certificate: "
    "broker.cert_file / key_file?)",
}


def why_failed(exc: BaseException) -> tuple[str, str]:
    """What a failed or lost connection means: ``(state, why)``, ``state`` one of refused
    (the login, the TLS handshake or a setting: retrying alone will not help), unreachable,
    lost, error; ``why`` one line for people.

    >>> why_failed(ConnectionRefusedError(111, "Connection refused"))
    ('unreachable', 'connection refused (no broker listening there)')
    """
    if isinstance(exc, BrokerError):
        return "refused", str(exc)
    rc = getattr(exc, "rc", None)
    if rc is not None and type(exc).__name__ == "MqttConnectError":  # a CONNACK refusal
        code = getattr(rc, "value", rc)
        if isinstance(code, int) and code in _REFUSED:
            return "refused", _REFUSED[code]
        return "refused", f"the broker refused the connection ({exc})"
    texts = [str(exc)]
    if exc.__cause__ is not None:
        texts.append(str(exc.__cause__))
    text = " ".join(t for t in texts if t).strip() or type(exc).__name__
    low = text.lower()
    for needle, state, why in _BY_TEXT:
        if needle in low:
            detail = f": {_short(text)}" if why.startswith("TLS") or state == "lost" else ""
            return state, f"{why}{_HINTS.get(why, '')}{detail}"
    return "error", _short(f"{type(exc).__name__}: {text}")


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.asynccontextmanager
async def session(client):
    """``async with client``, except that a connect cancelled midway also closes the
    half-open socket (aiomqtt leaves it and its keepalive task running).

    aiomqtt's disconnect callback asks its cancelled connect future for its exception,
    which raises inside the event loop's socket callbacks (a logged traceback) when the
    socket closes later; it is unhooked first, as nobody waits for that disconnect."""
    try:
        await client.__aenter__()
    except asyncio.CancelledError:
        paho = client._client  # noqa: SLF001 - paho: close it, stop its tasks
        with contextlib.suppress(Exception):
            paho.on_disconnect = None
            paho.disconnect()
        raise
    try:
        yield client
    except BaseException as exc:
        await client.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await client.__aexit__(None, None, None)


STABLE_S = 5.0


class Link:
    """Owns where one client stands with its broker (``state``, ``why``, since when) and the
    log lines about it: one per cause per ``every_s`` (a retry every few seconds does not
    flood the log), and one when the connection comes back.

    States: connecting (not yet tried), connected, and the ``why_failed`` ones: refused
    (a login, a certificate, a setting), unreachable, lost, error.
    """

    def __init__(
        self, broker: Broker, who: str, logger: logging.Logger, every_s: float = 30.0
    ) -> None:
        self.broker = broker
        self.who = who
        self.state = "connecting"
        self.why: str | None = None
        self.since = time.monotonic()
        self.failures = 0  # in a row
        self._log = logger
        self._limited = RateLimited(logger, every_s)

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    @property
    def stable(self) -> bool:
        """Connected for ``STABLE_S`` at least: after it, retries start over from the first
        step (a broker that takes a login and drops it at once is not hammered)."""
        return self.connected and time.monotonic() - self.since >= STABLE_S

    def up(self) -> None:
        """Connected (and subscribed, where there is something to subscribe)."""
        if self.failures:
            self._log.info(
                "%s: connected to %s again after %d failed attempt%s",
                self.who,
                self.broker.address,
                self.failures,
                "s" * (self.failures != 1),
            )
        else:
            self._log.info("%s: connected to %s", self.who, self.broker.address)
        self.state, self.why, self.since, self.failures = "connected", None, time.monotonic(), 0

    def down(self, exc: BaseException, retry_s: float | None) -> str:
        """A connection failed or was lost: note why, log it (rate-limited); the text."""
        state, why = why_failed(exc)
        if state != self.state:
            self.since = time.monotonic()
        self.state, self.why = state, why
        self.failures += 1
        level = logging.WARNING if state in ("unreachable", "lost") else logging.ERROR
        then = "" if retry_s is None else f"; retrying in {retry_s:.{2 if retry_s < 1 else 1}f} s"
        self._limited.log(
            level, f"{state}:{why}", "%s: broker %s: %s%s", self.who, self.broker.address, why, then
        )
        return f"broker {self.broker.address}: {why}"

    def health(self) -> dict[str, object]:
        """``state``, ``why`` (None when connected) and how long it has been so."""
        return {
            "state": self.state,
            "why": self.why,
            "for_s": round(time.monotonic() - self.since, 3),
        }
