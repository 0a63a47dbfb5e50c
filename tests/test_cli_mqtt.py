"""`edge-agent order submit` and `order cancel` against brokers that say no or misbehave:
a Mosquitto whose ACL refuses the order, one that refuses the password, one over TLS, one
restarted while the CLI waits, a listener that never answers, one that hangs up after its
CONNACK, and stale or foreign messages on a followed topic. The CLI runs as the console
script does, in a child process; each case ends in one line on stderr and its exit code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.agents import subprocess_env
from tests.support.brokers import Mosquitto, mosquitto
from tests.support.mqtt_rig import agent_config
from tests.support.peer import PREFIX
from tests.support.pki import make_pki, run, tls_listener
from tests.support.tools import tool

pytestmark = pytest.mark.slow

DEVICE = "cell-1"
EVENTS = f"{PREFIX}/{DEVICE}/events"
REJECTED = f"{PREFIX}/{DEVICE}/orders/rejected"
SUBMIT = ("order", "submit", "widget-a", "1", "--warehouse", "WH1")
NOT_LIVE = "cancel refused: order 'X' is not a live work item"
CONNACK_V5 = b"\x20\x03\x00\x00\x00"  # accepted, no properties


def order_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", *args, "--config", str(config)]


def cli_env() -> dict[str, str]:
    return subprocess_env(PYTHONUNBUFFERED="1")  # its "asked ..." line arrives as it is printed


def order_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS --config CONFIG`, to its end."""
    command = order_command(config, *args)
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=timeout, check=False)


def the_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr (a traceback or a second line fails the test)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


def config_for(folder: Path, port: int, **mqtt: Any) -> Path:
    return agent_config(folder / "cli", port, DEVICE, **mqtt)


def mosquitto_pub(port: int, topic: str, *lines: bytes, retain: bool = False) -> None:
    """Each of `lines` as one message (QoS 1), with the Mosquitto client."""
    flags = ["-r"] if retain else []
    command = [
        tool("mosquitto_pub", "mosquitto-clients"),
        "-p",
        str(port),
        "-V",
        "mqttv5",
        "-q",
        "1",
        *flags,
        "-t",
        topic,
        "-l",
    ]
    done = subprocess.run(command, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


# -- the broker says no ------------------------------------------------------------------


def test_an_order_or_cancel_the_broker_refuses_is_not_reported_as_sent(tmp_path: Path) -> None:
    """Under MQTT 5 Mosquitto answers a publish its ACL refuses with PUBACK 0x87 and drops
    it: the CLI says so and exits 1, rather than `submitted ...` and 0."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic read {PREFIX}/#\n", encoding="utf-8")  # anonymous clients may only read
    with mosquitto(tmp_path / "mosquitto", f"allow_anonymous true\nacl_file {acl}") as broker:
        config = config_for(tmp_path, broker.port)
        for args in (SUBMIT, (*SUBMIT, "--wait", "--timeout", "30")):
            refused = order_cli(config, *args)
            assert refused.returncode == 1, refused.stdout
            assert refused.stdout == ""
            assert the_error(refused) == (
                f"error: the broker did not accept the order on {PREFIX}/orders: Not authorized (0x87)"
            )
        cancel = order_cli(config, "order", "cancel", "X", "--wait", "--timeout", "30")
        assert cancel.returncode == 1, cancel.stdout
        assert cancel.stdout == ""
        assert the_error(cancel) == (
            f"error: the broker did not accept the cancel on {PREFIX}/{DEVICE}/cmd/cancel: Not authorized (0x87)"
        )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_right_password_is_let_in_and_a_wrong_one_is_one_line_with_the_brokers_reason(
    tmp_path: Path, protocol: str
) -> None:
    users = tmp_path / "mosquitto-passwords"
    run(tool("mosquitto_passwd", "mosquitto"), "-b", "-c", str(users), "cell", "cell-secret", cwd=tmp_path)
    right, wrong = tmp_path / "right-password", tmp_path / "wrong-password"
    right.write_text("cell-secret\n", encoding="utf-8")
    wrong.write_text("not-the-secret\n", encoding="utf-8")
    for secret in (right, wrong):
        secret.chmod(0o600)  # a password file others can read is refused before any connection
    with mosquitto(tmp_path / "mosquitto", f"password_file {users}\nallow_anonymous false") as broker:
        ours = config_for(tmp_path / "ours", broker.port, protocol=protocol, username="cell", password_file=str(right))
        sent = order_cli(ours, *SUBMIT, "--order-id", "let-in")
        assert sent.returncode == 0, sent.stderr
        assert f"submitted let-in to {PREFIX}/orders" in sent.stdout
        config = config_for(tmp_path, broker.port, protocol=protocol, username="cell", password_file=str(wrong))
        for args in (SUBMIT, ("order", "cancel", "X", "--wait")):
            refused = order_cli(config, *args)
            assert refused.returncode == 1, refused.stdout
            assert the_error(refused) == f"error: the broker at 127.0.0.1:{broker.port} refused: Not authorized"


def test_over_tls_the_configured_ca_is_trusted_and_no_other(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    stranger = make_pki(tmp_path / "another-pki")
    with mosquitto(tmp_path / "mosquitto", tls_listener(pki) + "allow_anonymous true") as broker:
        trusting = config_for(tmp_path / "ours", broker.port, tls={"ca_file": str(pki[0])})
        sent = order_cli(trusting, *SUBMIT, "--order-id", "over-tls")
        assert sent.returncode == 0, sent.stderr
        assert f"submitted over-tls to {PREFIX}/orders" in sent.stdout

        distrusting = config_for(tmp_path / "theirs", broker.port, tls={"ca_file": str(stranger[0])})
        refused = order_cli(distrusting, *SUBMIT)
        assert refused.returncode == 1, refused.stdout
        line = the_error(refused)
        assert line.startswith(f"error: cannot reach the broker at 127.0.0.1:{broker.port}: ")
        assert "certificate verify failed" in line


# -- the broker misbehaves ---------------------------------------------------------------


@contextmanager
def listener(answer: bytes | None) -> Iterator[int]:
    """A TCP port on 127.0.0.1 that reads each client's first packet (its CONNECT), then
    sends `answer` and hangs up, or (None) keeps the connection and says nothing."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # shut down: the test is over
                return
            held.append(connection)
            connection.recv(65536)
            if answer is not None:
                connection.sendall(answer)
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)
        for connection in held:
            connection.close()


@pytest.mark.parametrize("tls", [False, True])
def test_a_listener_that_never_answers_the_connect_is_given_up_on_within_the_timeout(tmp_path: Path, tls: bool) -> None:
    """Also over TLS, whose handshake waits on the silent listener before MQTT begins."""
    with listener(None) as port:
        tls_settings = {"tls": {"ca_file": str(make_pki(tmp_path / "pki")[0])}} if tls else {}
        config = config_for(tmp_path, port, **tls_settings)
        started = time.monotonic()
        result = order_cli(config, *SUBMIT, "--wait", "--timeout", "1")
        took = time.monotonic() - started
    assert result.returncode == 1, result.stdout
    assert the_error(result) == f"error: no answer from the broker at 127.0.0.1:{port}"
    assert took < 4, f"{took:.1f} s for a timeout of 1 s"  # an interpreter's start, and the second


def test_a_broker_that_hangs_up_after_its_connack_is_one_line_at_once(tmp_path: Path) -> None:
    with listener(CONNACK_V5) as port:
        config = config_for(tmp_path, port)
        closed = f"error: the broker at 127.0.0.1:{port} closed the connection"
        sent = order_cli(config, *SUBMIT, timeout=20)
        assert sent.returncode == 1, sent.stdout
        # as the CLI connects, or as it waits for the PUBACK: whichever it is doing when the end comes
        unconfirmed = (
            f"{closed} before acknowledging the order; it may have been delivered: send it again with --order-id "
        )
        assert the_error(sent) == closed or the_error(sent).startswith(unconfirmed)
        waited = order_cli(config, "order", "cancel", "X", "--wait", timeout=20)
        assert waited.returncode == 1, waited.stdout
        assert the_error(waited) == closed


def waiting_cancel(config: Path, children: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """`order cancel X --wait` running, once it has subscribed and published its cancel."""
    command = order_command(config, "order", "cancel", "X", "--wait", "--timeout", "60")
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    children.append(waiting)
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == f"asked {DEVICE} to cancel X\n"
    return waiting


def test_a_broker_restarted_while_the_cli_waits_is_connected_to_again(
    tmp_path: Path, mosquitto_broker: Mosquitto, children: list[subprocess.Popen[str]]
) -> None:
    config = config_for(tmp_path, mosquitto_broker.port)
    waiting = waiting_cancel(config, children)
    mosquitto_broker.kill()
    mosquitto_broker.start()
    answer = json.dumps({"order_id": "X", "reason": NOT_LIVE}).encode()
    deadline = time.monotonic() + 30
    while waiting.poll() is None and time.monotonic() < deadline:
        mosquitto_pub(mosquitto_broker.port, REJECTED, answer)  # again until it is heard: once it has subscribed again
        try:
            waiting.wait(0.5)
        except subprocess.TimeoutExpired:
            continue
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 1, err
    assert err.strip() == f"error: order X: {NOT_LIVE}"


# -- what arrives on a followed topic ----------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_message_on_a_followed_topic_is_not_the_devices_answer(
    tmp_path: Path, mosquitto_broker: Mosquitto, protocol: str
) -> None:
    """The agent retains none of these: a retained message is stale or foreign, however
    well it fits and however big."""
    port = mosquitto_broker.port
    forged = {"device_id": DEVICE, "seq": 1, "type": "OrderCancelled", "subject": "X", "data": {}}
    mosquitto_pub(port, EVENTS, json.dumps({**forged, "pad": "x" * 8_000_000}).encode(), retain=True)
    mosquitto_pub(port, REJECTED, json.dumps({"order_id": "X", "reason": NOT_LIVE}).encode(), retain=True)
    config = config_for(tmp_path, port, protocol=protocol)
    result = order_cli(config, "order", "cancel", "X", "--wait", "--timeout", "1")
    assert result.returncode == 1, result.stdout
    assert the_error(result) == f"error: no answer from {DEVICE} about cancelling X within 1 s"


def test_messages_that_are_not_json_objects_on_a_followed_topic_are_passed_over(
    tmp_path: Path, mosquitto_broker: Mosquitto, children: list[subprocess.Popen[str]]
) -> None:
    config = config_for(tmp_path, mosquitto_broker.port)
    waiting = waiting_cancel(config, children)
    noise = [b"\xff\xfe not UTF-8", b"{not json", b"null", b"[1, 2]", b'"X"', b"{}", b'{"order_id": ["X"]}']
    mosquitto_pub(mosquitto_broker.port, REJECTED, *noise, json.dumps({"order_id": "X", "reason": NOT_LIVE}).encode())
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1, err
    assert err.strip() == f"error: order X: {NOT_LIVE}"


def test_the_wait_follows_only_well_formed_events_each_once_and_prints_them_escaped(
    tmp_path: Path, mosquitto_broker: Mosquitto, children: list[subprocess.Popen[str]]
) -> None:
    """What arrives on a device's `events` topic may come from anyone: a message that is not
    an event as the agent sends it is passed over, an event sent again after an agent's
    restart (same device and seq) is one event, and what is printed cannot steer the terminal."""
    config = config_for(tmp_path, mosquitto_broker.port)
    command = order_command(config, *SUBMIT, "--order-id", "W-1", "--device", DEVICE, "--wait", "--timeout", "60")
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    children.append(waiting)
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == f"submitted W-1 to {PREFIX}/{DEVICE}/orders\n"

    def event(seq: int, type_: str, **data: object) -> dict[str, object]:
        return {
            "device_id": DEVICE,
            "seq": seq,
            "ts": "2026-01-01T00:00:00Z",
            "type": type_,
            "subject": "W-1",
            "data": data,
        }

    accepted = event(7, "OrderAccepted", order_id="W-1")
    malformed = [
        {**event(8, "OrderFailed"), "data": None},
        {**event(8, "OrderFailed"), "data": ["reason"]},
        {key: value for key, value in event(8, "OrderFailed").items() if key != "data"},
        {key: value for key, value in event(8, "OrderFailed").items() if key != "device_id"},
        {**event(8, "OrderFailed"), "seq": "8"},
    ]
    issued = event(9, "InventoryIssued", order_id="W-1", inventory_id="INV-1\x1b]0;pwned\x07", warehouse="WH\u202e1")
    bodies = [accepted, *malformed, accepted, issued]
    mosquitto_pub(mosquitto_broker.port, EVENTS, *(json.dumps(body).encode() for body in bodies))
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out.splitlines() == [f"accepted by {DEVICE}", "inventory INV-1\\x1b]0;pwned\\x07 in WH\\u202e1"]


def test_a_huge_message_on_a_followed_topic_is_not_taken_into_memory(
    tmp_path: Path, mosquitto_broker: Mosquitto, children: list[subprocess.Popen[str]]
) -> None:
    """Under MQTT 5 the CLI tells the broker the largest message an agent would send it; a
    bigger one (here 64 MB on the events topic) is dropped by the broker, not read."""
    config = config_for(tmp_path, mosquitto_broker.port)
    # The CLI as the only child of a fresh interpreter: its peak memory is that child's.
    measure = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
    measure += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
    command = [
        sys.executable,
        "-c",
        measure,
        *order_command(config, "order", "cancel", "X", "--wait", "--timeout", "60"),
    ]
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    children.append(waiting)
    assert waiting.stdout is not None
    assert waiting.stdout.readline() == f"asked {DEVICE} to cancel X\n"
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"order_id": "X", "pad": "x" * 64_000_000}), encoding="utf-8")
    publish = [tool("mosquitto_pub", "mosquitto-clients"), "-p", str(mosquitto_broker.port), "-V", "mqttv5", "-q", "1"]
    subprocess.run([*publish, "-t", EVENTS, "-f", str(huge)], capture_output=True, timeout=60, check=True)
    mosquitto_pub(mosquitto_broker.port, REJECTED, json.dumps({"order_id": "X", "reason": NOT_LIVE}).encode())
    _, err = waiting.communicate(timeout=60)
    *said, peak_kb = err.strip().splitlines()
    assert said == [f"error: order X: {NOT_LIVE}"]
    assert int(peak_kb) < 64_000, f"the CLI's peak memory was {int(peak_kb) // 1000} MB"
