"""The edge daemon as a process: SIGTERM drains within the deadline (broker down or not),
SIGHUP reloads or refuses, a full disk is a fault that shows, /healthz and /metrics answer
on loopback, systemd hears READY and the watchdog. Each test is bounded and prints what it
measured."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"


def sim_config(tmp: Path, **extra) -> dict:
    """Two simulated IMU sensors in real time through the default model, to JSONL."""
    cfg = {
        "sensors": {"acc": {"channels": 3, "rate_hz": 50}, "gyro": {"channels": 3, "rate_hz": 50}},
        "readers": [
            {
                "kind": "simulate",
                "duration_s": 120,
                "speed": 1,
                "sensors": {"acc": {"chunk_s": 0.04}, "gyro": {"chunk_s": 0.04}},
            }
        ],
        "window": {"hop_s": 0.25},
        "inference": {"model": str(MODEL)},
        "publishers": [{"kind": "jsonl", "path": str(tmp / "out.jsonl")}],
        "daemon": {"health": {"port": 0, "publisher_fail_s": 0.5}, "stop_deadline_s": 5},
    }
    cfg.update(extra)
    return cfg


class DaemonProcess:
    """``crossl-stream daemon`` in a process of its own; its JSON log lines are collected."""

    def __init__(self, config: Path, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crossl_stream.cli", "daemon", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.raw.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(line))

    def wait_for(self, text: str, timeout: float = 60.0, nth: int = 1) -> dict:
        """The ``nth`` log line whose message holds ``text``, once it is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line.get("msg", "")]
            if len(found) >= nth:
                return found[nth - 1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r}; log:\n{''.join(self.raw[-30:])}")

    @property
    def port(self) -> int:
        msg = self.wait_for("health: http://")["msg"]
        return int(msg.split("127.0.0.1:")[1].split("/")[0])

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds until it exited)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon_of(tmp_path):
    started: list[DaemonProcess] = []

    def start(cfg: dict, env: dict | None = None) -> DaemonProcess:
        path = tmp_path / "daemon.yaml"
        path.write_text(yaml.safe_dump(cfg))
        started.append(DaemonProcess(path, env))
        return started[-1]

    yield start
    for d in started:
        d.kill()


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_records(path: Path, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = records(path)
        if len(got) >= n:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} records after {timeout} s")


def test_sigterm_with_the_broker_down_drains_and_exits_0_within_the_deadline(daemon_of, tmp_path):
    dead = free_port()  # nothing listens there: the MQTT publisher never connects
    cfg = sim_config(tmp_path)
    cfg["publishers"].append(
        {"kind": "mqtt", "broker": {"port": dead}, "topic": "crossl/{subject}/predictions"}
    )
    d = daemon_of(cfg)
    wait_records(tmp_path / "out.jsonl", 8)
    rc, took = d.stop()
    got = records(tmp_path / "out.jsonl")
    print(f"SIGTERM with the broker down: exit {rc} after {took:.2f} s; {len(got)} records")
    assert rc == 0
    assert took < 5.0  # the deadline (the interpreter's exit included)
    # nothing completed was lost: every window cut is in the JSONL, in order, no gap
    assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
    lost = d.wait_for("publishers lost records")
    assert "mqtt" in lost["msg"]  # what the broker never got is counted, not hidden


def test_sighup_refuses_a_broken_config_and_applies_a_good_one_without_dropping_streams(
    daemon_of, tmp_path
):
    cfg = sim_config(tmp_path)
    d = daemon_of(cfg)
    out = tmp_path / "out.jsonl"
    wait_records(out, 4)
    config = tmp_path / "daemon.yaml"
    broken = dict(cfg, inference={"model": str(MODEL), "max_batch": 0})
    config.write_text(yaml.safe_dump(broken))
    d.proc.send_signal(signal.SIGHUP)
    refused = d.wait_for("reload refused")
    assert "inference.max_batch" in refused["msg"]
    before = len(records(out))
    wait_records(out, before + 4)  # the old pipeline goes on
    missing = dict(cfg, inference={"model": str(tmp_path / "no-model")})
    config.write_text(yaml.safe_dump(missing))
    d.proc.send_signal(signal.SIGHUP)
    assert "no-model" in d.wait_for("reload refused", 30, nth=2)["msg"]
    good = dict(cfg, inference={"model": str(MODEL), "max_batch": 8})
    config.write_text(yaml.safe_dump(good))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("daemon: reloaded")
    n = len(records(out))
    wait_records(out, n + 4)
    rc, took = d.stop()
    got = records(out)
    print(f"two refused reloads and one applied; {len(got)} records, exit {rc} in {took:.2f} s")
    assert rc == 0
    # the streams were never dropped: one run of window numbers, no restart, no gap
    assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
    ends = [r["t_window_end"] for r in got]
    assert all(abs(b - a - 0.25) < 1e-6 for a, b in zip(ends, ends[1:], strict=False))


def test_a_full_disk_makes_the_daemon_unhealthy_with_one_log_line_per_interval(daemon_of, tmp_path):
    cfg = sim_config(tmp_path)
    cfg["publishers"] = [{"kind": "jsonl", "path": "/dev/full", "append": True}]
    d = daemon_of(cfg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, body = d.get("/healthz")
        if code == 503:
            break
        time.sleep(0.2)
    report = json.loads(body)
    print(f"/healthz {code}: {report['reasons']}")
    assert code == 503 and report["status"] == "unhealthy"
    assert any("publisher jsonl failing" in r and "No space" in r for r in report["reasons"])
    jsonl = report["publishers"]["jsonl"]
    assert jsonl["sent"] == 0 and jsonl["failed"] == jsonl["given"] > 0
    _, metrics = d.get("/metrics")
    assert b'crossl_publisher_up{publisher="jsonl"} 0.0' in metrics
    rc, _ = d.stop()
    failures = [line for line in d.lines if "publisher jsonl failed" in line.get("msg", "")]
    print(f"{jsonl['failed']} failed writes, {len(failures)} log lines about them")
    assert len(failures) <= 2 and not any("Traceback" in line for line in d.raw)
    assert rc == 0


def test_run_exits_non_zero_when_a_publisher_wrote_nothing_it_was_given(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "crossl_stream.cli", "replay", "--duration", "30", "--out",
         "/dev/full", "--append", "--print-every", "1000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(proc.stdout[-400:], proc.stderr[-400:])
    assert proc.returncode == 1
    assert "publishers lost records" in proc.stderr and "jsonl" in proc.stderr
    assert "No space left on device" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_healthz_and_metrics_answer_on_loopback_only(daemon_of, tmp_path):
    d = daemon_of(sim_config(tmp_path))
    wait_records(tmp_path / "out.jsonl", 4)
    code, body = d.get("/healthz")
    report = json.loads(body)
    assert code == 200 and report["status"] == "ok", report
    assert report["streams"]["default"] == {"acc": "live", "gyro": "live"}
    assert report["publishers"]["jsonl"]["state"] == "ok"
    assert 0 <= report["last_record_age_s"] < 5
    assert report["fallbacks"] == ["acc", "gyro"]  # the default model's, one per sensor
    _, text = d.get("/metrics")
    for name in (
        b"crossl_windows_total",
        b'crossl_fallback_windows_total{without="gyro"}',
        b'crossl_samples_total{sensor="acc"}',
        b'crossl_latency_seconds_bucket{le="0.001",stage="infer"}',
        b'crossl_latency_seconds_count{stage="age"}',
        b"crossl_queue_depth",
    ):
        assert name in text, name
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text.decode())}  # parses
    windows = families["crossl_windows"].samples[0].value
    predicted = families["crossl_predictions"].samples[0].value
    assert windows >= predicted >= 4
    assert d.get("/nothing")[0] == 404
    listening = [
        c.laddr for c in psutil.Process(d.proc.pid).net_connections("inet") if c.status == "LISTEN"
    ]
    print(f"listening: {listening}")
    assert listening and all(a.ip == "127.0.0.1" for a in listening)
    assert d.stop()[0] == 0


def test_systemd_hears_ready_status_watchdog_and_stopping(daemon_of, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    d = daemon_of(sim_config(tmp_path), {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in seen) < 3:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    d.proc.send_signal(signal.SIGTERM)
    while True:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    d.proc.wait(10)
    sock.close()
    print(f"{len(seen)} notifications; first {seen[0]!r}")
    assert seen[0].startswith("READY=1\nSTATUS=")
    assert sum("WATCHDOG=1" in m for m in seen) >= 3
    assert any(m.startswith("STOPPING=1") for m in seen)
    assert d.proc.returncode == 0


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,) * 3])
def test_repeated_stop_signals_still_end_run_with_status_0(tmp_path, signals):
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossl_stream.cli", "run", str(ROOT / "configs" / "replay.yaml"),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_records(out, 20)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=30)
    print(stdout.splitlines()[-3:], stderr[-300:])
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "ran " in stdout


def test_an_lsl_producer_killed_and_restarted_every_window_accounted_for(daemon_of, tmp_path):
    """`play --to lsl` killed for 3 s: the daemon publishes every window position through
    the outage (empty ones say so) and reads the producer again within two hops of its
    return (a prediction needs 80% of a window covered: 1.6 s more)."""
    cfg = yaml.safe_load((ROOT / "configs" / "lab-lsl.yaml").read_text())
    cfg["inference"]["model"] = str(MODEL)
    cfg["publishers"] = [{"kind": "jsonl", "path": str(tmp_path / "out.jsonl")}]
    cfg["daemon"] = {"health": {"port": None}}
    play = [sys.executable, "-m", "crossl_stream.cli", "play", "--to", "lsl", "--duration", "20"]
    player = subprocess.Popen([*play, "--start", "100"], stdout=subprocess.PIPE, text=True)
    d = daemon_of(cfg)
    out = tmp_path / "out.jsonl"
    try:
        wait_records(out, 6)
        player.kill()
        player.wait()
        killed = time.monotonic()
        time.sleep(3.0)
        player = subprocess.Popen([*play, "--start", "120"], stdout=subprocess.PIPE, text=True)
        player.stdout.readline()  # "playing ...": its outlets exist
        back = time.monotonic()
        n = len(records(out))
        refound = resumed = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and resumed is None:
            fresh = records(out)[n:]
            if refound is None and any(max(r["coverage"].values()) > 0 for r in fresh):
                refound = time.monotonic() - back  # its samples are in a window again
            if any(r["label"] is not None for r in fresh):
                resumed = time.monotonic() - back
            time.sleep(0.01)
        wait_records(out, len(records(out)) + 4)
    finally:
        player.kill()
        player.wait()
    rc, _ = d.stop()
    assert refound is not None and resumed is not None, "the producer was never read again"
    got = records(out)
    ends = np.array([r["t_window_end"] for r in got])
    empty = [r for r in got if r["label"] is None]
    print(
        f"outage {back - killed:.1f} s: {len(empty)} empty records; after the producer's "
        f"return its samples were in a window again in {refound:.2f} s, a prediction (80% of "
        f"a 2 s window covered) in {resumed:.2f} s; {len(got)} records, exit {rc}"
    )
    assert rc == 0
    assert np.allclose(np.diff(ends), 0.5)  # every window position, none missing
    assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
    for r in empty:
        assert r["probs"] == {} and not any(r["mask"].values())
    # published while the sensors were away (states then: stale or lost), not after
    away = [r for r in empty if set(r["states"].values()) <= {"stale", "lost"}]
    assert len(away) >= 3 and all(r["age_ms"] < 1000 for r in away)
    assert refound <= 2 * 0.5 + 0.2  # found again within two hops (+ the player's start-up)


def test_a_bad_config_or_a_ca_file_that_is_not_pem_is_one_line_not_a_traceback(tmp_path):
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    cfg = sim_config(tmp_path)
    cfg["publishers"].append({"kind": "mqtt", "broker": {"tls": True, "ca_file": str(bad_ca)}})
    unknown = sim_config(tmp_path, daemon={"health": {"prot": 9000}})
    for raw, where in (
        (cfg, "publishers.1.broker.ca_file"),
        (unknown, "daemon.health.prot: unknown key"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        for command in ("daemon", "run"):
            proc = subprocess.run(
                [sys.executable, "-m", "crossl_stream.cli", command, str(path)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            print(command, proc.returncode, proc.stderr.strip()[-200:])
            assert proc.returncode == 2 and where in proc.stderr
            assert "Traceback" not in proc.stderr


def test_sighup_that_changes_the_windows_restarts_the_pipeline_and_appends(daemon_of, tmp_path):
    cfg = sim_config(tmp_path)
    d = daemon_of(cfg)
    out = tmp_path / "out.jsonl"
    wait_records(out, 4)
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump(dict(cfg, window={"hop_s": 0.5})))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("pipeline restarted")
    n = len(records(out))
    wait_records(out, n + 3)  # the same file, appended to by the new pipeline
    # two reloads in a row, each adding a publisher: both are applied, in order
    two = dict(cfg, window={"hop_s": 0.5})
    two["publishers"] = [*cfg["publishers"], {"kind": "jsonl", "path": str(tmp_path / "b.jsonl")}]
    config.write_text(yaml.safe_dump(two))
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.05)
    three = dict(two, publishers=[*two["publishers"], {"kind": "console", "every": 1000}])
    config.write_text(yaml.safe_dump(three))
    d.proc.send_signal(signal.SIGHUP)
    last = d.wait_for("daemon: reloaded", nth=2)
    assert "'jsonl', 'jsonl-2', 'console'" in last["msg"], last["msg"]
    wait_records(tmp_path / "b.jsonl", 3)
    code, body = d.get("/healthz")
    report = json.loads(body)
    assert sorted(report["publishers"]) == ["console", "jsonl", "jsonl-2"]
    assert report["reloads"] == {"applied": 2, "refused": 0, "restarts": 1}
    rc, took = d.stop()
    got = records(out)
    hops = np.diff([r["t_window_end"] for r in got])
    print(f"{len(got)} records in one file across a restart; hops {sorted(set(hops.round(2)))}")
    assert rc == 0 and not [line for line in d.lines if line.get("level") == "error"]
    assert hops[0] == 0.25 and hops[-1] == 0.5  # the old windows, then the new ones
