"""The MQTT 3.1.1 retain check: what one SUBSCRIBE+UNSUBSCRIBE round trip to a local Mosquitto
costs per request, alone and with 16 workers asking at once (questions are pipelined).
Run: .venv/bin/python bench/retain_probe.py [--requests N]"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from harness import machine, percentile, table

from butler_mqtt.config import MqttConfig
from butler_mqtt.mqtt.retain_probe import RetainProbe
from butler_mqtt.ops.mosquitto import Mosquitto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    n = ap.parse_args().requests
    with tempfile.TemporaryDirectory() as d, Mosquitto(Path(d) / "broker") as broker:
        probe = RetainProbe(MqttConfig(host="127.0.0.1", port=broker.port, protocol="3.1.1"), "bench").start()
        payload = b'{"requestId": "bench", "taskId": "11111111-1111-4111-8111-111111111111"}'
        probe.retained_now("bench/start", payload)  # connect and warm up
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            probe.retained_now("bench/start", payload)
            samples.append((time.perf_counter() - t0) * 1000)
        rows = [["1", n, f"{percentile(samples, 50):.2f}", f"{percentile(samples, 95):.2f}", f"{percentile(samples, 99):.2f}", f"{n / (sum(samples) / 1000):.0f}"]]

        lat: list[float] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            for _ in range(k):
                t0 = time.perf_counter()
                probe.retained_now("bench/start", payload)
                with lock:
                    lat.append((time.perf_counter() - t0) * 1000)

        threads = [threading.Thread(target=worker, args=(n // 16,)) for _ in range(16)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append(["16", len(lat), f"{percentile(lat, 50):.2f}", f"{percentile(lat, 95):.2f}", f"{percentile(lat, 99):.2f}", f"{len(lat) / wall:.0f}"])
        probe.stop()
    print(machine())
    print(table(["workers asking", "checks", "p50 ms", "p95 ms", "p99 ms", "checks/s"], rows))


if __name__ == "__main__":
    main()
