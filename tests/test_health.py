"""/healthz and /metrics, served by a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from edge_agent import service
from edge_agent.agent import Agent
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.gateway import Gateway
from edge_agent.health import HealthServer, Metrics
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def test_health_and_metrics_tell_the_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = agent_config(tmp_path, device_id="health-test")  # nothing listens on its port: MQTT stays down

    async def scenario() -> None:
        async with Agent(config) as agent:
            gateway = Gateway(agent, config)
            server = HealthServer(
                "127.0.0.1", 0, lambda: service.problems(agent, gateway), service.metrics(agent, gateway)
            )
            server.start()
            base = f"http://127.0.0.1:{server.port}"
            async with running(agent):
                try:
                    await agent.submit(order("h1"))
                    await agent.submit(cmd.RejectOrder(None, "not JSON"))
                    status, body = await asyncio.to_thread(get, base + "/healthz")
                    assert (status, orjson.loads(body)) == (200, {"status": "ok", "reasons": []})  # within the budget

                    status, text = await asyncio.to_thread(get, base + "/metrics")
                    assert status == 200
                    metrics = text.decode()
                    assert "edge_agent_orders_accepted_total 1.0" in metrics
                    assert "edge_agent_orders_rejected_total 1.0" in metrics
                    assert re.search(r'edge_agent_work_items\{stage="\w+"\} 1.0', metrics)
                    assert "edge_agent_stations 3.0" in metrics
                    assert "edge_agent_mqtt_connected 0.0" in metrics
                    assert "edge_agent_commit_seconds_count" in metrics
                    assert f"edge_agent_last_seq {agent.state.last_seq}.0" in metrics

                    monkeypatch.setattr(service, "MQTT_DOWN_BUDGET_S", 0.0)
                    agent.journal.log._db.execute("PRAGMA query_only = ON")  # the disk refuses every write
                    estop = asyncio.create_task(agent.request(cmd.EngageEstop()))
                    async with asyncio.timeout(10):
                        while agent.fault is None:
                            await asyncio.sleep(0.01)  # the fault path commits nothing: no commit to wait on
                    assert not estop.done()  # kept, to be decided once the log can be written
                    status, body = await asyncio.to_thread(get, base + "/healthz")
                    answer = orjson.loads(body)
                    assert status == 503
                    assert answer["status"] == "unhealthy"
                    assert any("not writable" in reason for reason in answer["reasons"])
                    assert any("no MQTT connection" in reason for reason in answer["reasons"])
                    agent.journal.log._db.execute("PRAGMA query_only = OFF")
                    assert [type(r.event) for r in await estop] == [ev.EstopEngaged]  # healthy again but for MQTT
                    status, body = await asyncio.to_thread(get, base + "/healthz")
                    assert not any("not writable" in reason for reason in orjson.loads(body)["reasons"])
                    assert (await asyncio.to_thread(get, base + "/nope"))[0] == 404
                finally:
                    server.stop()

    asyncio.run(scenario())


# The stages a work item can be in (README, "What it is").
STAGES = [
    "New",
    "FactoryReady",
    "FactoryAccepted",
    "FactoryComplete",
    "MoveToWarehouse",
    "InventoryAvailable",
    "Failed",
    "Cancelled",
]


def work_items(metrics: str) -> dict[str, float]:
    found = re.findall(r'^edge_agent_work_items\{stage="(\w+)"\} (\S+)$', metrics, re.MULTILINE)
    return {stage: float(value) for stage, value in found}


def test_every_stage_has_a_work_items_series_that_goes_to_0_rather_than_away(tmp_path: Path) -> None:
    config = agent_config(tmp_path, device_id="stages-test")

    async def scenario() -> None:
        async with Agent(config) as agent:
            gateway = Gateway(agent, config)
            server = HealthServer("127.0.0.1", 0, lambda: [], service.metrics(agent, gateway))
            server.start()
            url = f"http://127.0.0.1:{server.port}/metrics"
            try:
                async with running(agent):
                    idle = work_items((await asyncio.to_thread(get, url))[1].decode())
                    assert idle == dict.fromkeys(STAGES, 0.0)

                    await agent.submit(order("s1", 100))
                    await agent.wait_until(lambda state: "s1" in state.work_items)
                    busy = work_items((await asyncio.to_thread(get, url))[1].decode())
                    assert sorted(busy) == sorted(STAGES)
                    assert sum(busy.values()) == 1.0

                    await agent.cancel("s1")
                    await agent.wait_until(lambda state: "s1" not in state.work_items)  # tidied up
                    after = work_items((await asyncio.to_thread(get, url))[1].decode())
                    assert after == dict.fromkeys(STAGES, 0.0)
            finally:
                server.stop()

    asyncio.run(scenario())


def quick_get(url: str) -> int:
    """The status of a GET that must be answered within a second (else it raises)."""
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=1) as response:
        response.read()
    assert time.monotonic() - started < 1
    return int(response.status)


def test_a_stuck_client_or_a_flood_of_idle_sockets_never_delays_healthz_or_metrics() -> None:
    metrics = Metrics(lambda: {"orders_accepted_total": 3.0}, lambda: {}, lambda: {})
    server = HealthServer("127.0.0.1", 0, lambda: [], metrics, max_clients=2, max_waiting=8, timeout_s=30)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    held: list[socket.socket] = []
    try:
        stuck = socket.create_connection(("127.0.0.1", server.port))
        held.append(stuck)
        stuck.sendall(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        assert quick_get(base + "/healthz") == 200
        assert quick_get(base + "/metrics") == 200

        # Idle sockets well beyond every bound: the server neither runs out of threads nor
        # turns the next client away (the oldest idle ones are closed to make room).
        held += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        assert quick_get(base + "/healthz") == 200
        assert quick_get(base + "/metrics") == 200
    finally:
        for connection in held:
            connection.close()
        server.stop()


def trickle(connections: list[socket.socket], stop: threading.Event) -> None:
    """Send each connection one more header line every half second, never the blank line."""
    while not stop.wait(0.5):  # the pace is the point: a client that is never idle for long
        for connection in connections:
            with contextlib.suppress(OSError):  # closed by the server: what one test waits for
                connection.sendall(b"X: y\r\n")


def test_clients_trickling_their_headers_never_delay_healthz_and_are_cut_off_at_the_deadline() -> None:
    metrics = Metrics(lambda: {}, lambda: {}, lambda: {})
    server = HealthServer("127.0.0.1", 0, lambda: [], metrics, max_clients=16, timeout_s=3)
    server.start()
    stop = threading.Event()
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]  # more than max_clients
    trickler = threading.Thread(target=trickle, args=(slow, stop), daemon=True)
    try:
        for connection in slow:
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
        trickler.start()
        for _ in range(3):  # while they trickle, and after several lines from each
            assert quick_get(f"http://127.0.0.1:{server.port}/healthz") == 200

        # Though never idle, each is closed once its head has not arrived within the deadline.
        started = time.monotonic()
        slow[0].settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            assert slow[0].recv(1) == b""
        assert time.monotonic() - started < 5  # 3 s from the accept; an idle cut-off never comes
    finally:
        stop.set()
        trickler.join()
        for connection in slow:
            connection.close()
        server.stop()


def test_a_request_head_over_its_bound_is_answered_431_and_closed() -> None:
    server = HealthServer("127.0.0.1", 0, lambda: [], Metrics(lambda: {}, lambda: {}, lambda: {}))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"y" * 9000 + b"\r\n")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 431 ")
    finally:
        server.stop()
