"""The connection to the broker: one paho-mqtt client, the one module that touches paho.

paho-mqtt 2.x rather than aiomqtt: an order may be acknowledged (PUBACK) only
after its accepted-or-rejected event is committed, and aiomqtt 2.5 acknowledges
on receipt; paho has `manual_ack=True` and `Client.ack(mid, qos)`. paho runs its
network loop on a thread of its own; the callbacks given here run on that thread.

The session is persistent (fixed client id, clean start off, a session expiry
on MQTT 5), so the broker keeps QoS 1 orders while the device is away. Lost
connections are retried with capped exponential backoff and jitter.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttConfig, TlsConfig, blame, check_files
from edge_agent.errors import ConfigError
from edge_agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_INFLIGHT = 100  # our own unacknowledged publishes
# Unacknowledged orders the broker may send us (MQTT 5 Receive Maximum): the most there is.
# Every order is committed and acknowledged promptly (the log is the queue), so a burst
# only waits briefly; what the broker cannot send at once it queues, and past its queue
# limit (Mosquitto's default `max_queued_messages 1000`) it drops orders it acknowledged
# to their sender. Sent on to us they are not dropped: TCP paces them.
RECEIVE_MAXIMUM = 65535


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from the broker, to be acknowledged with `Link.ack(mid, qos)` once handled."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection it came on: a PUBACK belongs on that one only
    dup: bool = False  # the broker says it sent this before (a redelivery)


_READ_AHEAD_BYTES = 65536


class ReadAhead:
    """A plain TCP socket read ahead: one recv takes whatever has arrived, and paho's small
    reads are served from it. paho reads every packet's header a byte at a time (a system
    call each) and selects before every packet; under a stream of orders that was an eighth
    of the agent's time. paho asks a socket with `pending()` for buffered bytes before it
    selects (its own TLS and WebSocket sockets have them), so nothing waits in the buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._at = 0

    def recv(self, size: int) -> bytes:
        at = self._at
        if at == len(self._buffer):
            self._buffer = self._sock.recv(_READ_AHEAD_BYTES)  # BlockingIOError when nothing has come
            at = 0
        self._at = min(at + size, len(self._buffer))
        return self._buffer[at : self._at]

    def pending(self) -> int:
        return len(self._buffer) - self._at

    def send(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._sock.close()


class ReadAheadClient(paho.Client):
    """paho's client, reading ahead. paho 2.x makes each connection's socket in
    `_create_socket`, a private method (hence paho-mqtt pinned below 3)."""

    def _create_socket(self) -> paho.SocketLike:
        sock = super()._create_socket()
        # Only a plain TCP socket: TLS and WebSocket ones have buffers of their own.
        return ReadAhead(sock) if type(sock) is socket.socket else sock


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Seconds before reconnect attempt `attempt` (0, 1, ...): doubling, capped, with jitter
    so that a fleet does not reconnect in step after a broker restart."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**attempt) * rng.uniform(0.5, 1.0)


class Link:
    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        topics: Topics,
        *,
        will: bytes,
        on_message: Callable[[Inbound], object],
        on_connection: Callable[[bool], object],
        on_published: Callable[[int, str | None], object],
    ) -> None:
        self._config = config
        self._topics = topics
        self._on_message = on_message
        self._on_connection = on_connection
        self._on_published = on_published
        self._stopping = threading.Event()
        self._lost = threading.Event()  # the connection is gone (or we are stopping)
        self._connection = 0  # counts successful connections
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.connected = False
        self.down_since: float | None = time.monotonic()  # not connected since then (None: connected)
        self._was_up = False
        self.reconnects = 0
        self.refused = 0  # publishes the broker acknowledged with a failure code
        # Why the broker turned the last connection attempt away (credentials, TLS), None
        # once connected: a refusal is not a network hiccup and must be seen at once.
        self.refusal: str | None = None
        self._turned_away = False  # this attempt was refused, not lost
        v5 = config.protocol == "5"
        self._client = ReadAheadClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            reconnect_on_failure=False,  # reconnects are ours: with jitter, and logged
            manual_ack=True,
        )
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.will_set(topics.status, will, qos=1, retain=True)
        secure(self._client, config)
        self._tls = bool(config.tls.ca_file or config.tls.cert_file or config.tls.key_file)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        self._errors = _Errors()
        self._client.enable_logger(self._errors)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt supervisor", daemon=True)
        self._thread.start()

    def stop(self, farewell: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish `farewell` (topic, payload; retained) if connected, then disconnect."""
        self._stopping.set()
        if farewell is not None and self.connected:
            info = self._client.publish(farewell[0], farewell[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                log.warning("could not publish %s before stopping", farewell[0])
        self._client.disconnect()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 1)

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._connect()
            except (OSError, ValueError) as error:
                delay = backoff_s(attempt, self._rng)
                if isinstance(error, ssl.SSLError):
                    self._refused(f"the TLS handshake with the broker failed: {_tls_text(str(error))}")
                    log.error("%s; retrying in %.1f s", self.refusal, delay)
                else:
                    log.warning(
                        "cannot reach the broker at %s:%d (%s); retrying in %.1f s",
                        self._config.host,
                        self._config.port,
                        error,
                        delay,
                    )
                attempt += 1
                self._stopping.wait(delay)
                continue
            # paho's own network thread (loop_start), so that publish() and ack() from the event
            # loop only queue packets: with a thread of our own running loop_forever, paho would
            # write from both threads at once, and two writers corrupt a TLS connection.
            self._client.loop_start()
            self._lost.wait()
            self._client.loop_stop()
            self._lost.clear()
            if self._stopping.is_set():
                return
            if self._was_up:  # the connection had worked: start the backoff afresh
                attempt, self._was_up = 0, False
            delay = backoff_s(attempt, self._rng)
            attempt += 1
            self.reconnects += 1
            if self._turned_away:
                log.error("%s; retrying in %.1f s", self.refusal, delay)
            else:
                log.warning("connection to the broker lost; reconnecting in %.1f s", delay)
            self._stopping.wait(delay)

    def _connect(self) -> None:
        self._errors.last = None
        self._turned_away = False
        if self._config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._config.session_expiry_s
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            self._client.connect(
                self._config.host, self._config.port, self._config.keepalive_s, clean_start=False, properties=properties
            )
        else:
            self._client.connect(self._config.host, self._config.port, self._config.keepalive_s)

    # -- paho callbacks (on paho's thread) ---------------------------------------

    def _connected(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            self._refused(f"the broker refused the connection: {describe(reason)}")
            self._lost.set()
            return
        self.refusal = None
        self.connected = self._was_up = True
        self.down_since = None
        self._connection += 1
        log.info("connected to the broker at %s:%d", self._config.host, self._config.port)
        topics = self._topics
        client.subscribe([(topics.orders, 1), (topics.device_orders, 1), (topics.commands, 1)])
        self._on_connection(True)

    def _disconnected(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.down_since = time.monotonic()
        elif self._tls and not self._turned_away:  # lost before any CONNACK: the broker would not take our TLS
            cause = _tls_text(self._errors.last or "no reason given")
            if self._config.tls.cert_file is None and "certificate" not in cause:
                cause += "; no client certificate is configured (mqtt.tls.cert_file)"
            self._refused(f"the broker closed the TLS connection before accepting it: {cause}")
        self._lost.set()
        if was_connected:
            self._on_connection(False)

    def _message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        inbound = Inbound(
            message.topic, bytes(message.payload), message.mid, message.qos, self._connection, bool(message.dup)
        )
        self._on_message(inbound)

    def _published(self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode, props: object) -> None:
        # MQTT 5 lets the broker refuse a QoS 1 publish (PUBACK reason >= 0x80, e.g. 0x87 Not
        # authorized by its ACL): that message was not delivered. MQTT 3.1.1 has no such answer.
        if reason.is_failure:
            self.refused += 1
            self._on_published(mid, describe(reason))
        else:
            self._on_published(mid, None)

    def _refused(self, refusal: str) -> None:
        """The broker turned this connection attempt away: why (logged with the retry)."""
        self.refusal = refusal
        self._turned_away = True

    # -- use (thread-safe) --------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Send a message; its mid, or None if not connected. The broker's answer comes to
        `on_published(mid, refusal)`: `refusal` is None for a delivery, else the broker's reason."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def ack(self, message: Inbound) -> None:
        """Acknowledge an inbound message: only once its outcome is committed. A message from
        an earlier connection is not acknowledged on this one (its id may now name another
        message); the broker sends it again, and it is then recognised by its order id."""
        if message.qos > 0 and message.connection == self._connection:
            self._client.ack(message.mid, message.qos)


def describe(reason: ReasonCode) -> str:
    """A broker's reason code as a person reads it: `Not authorized (0x87)`."""
    return f"{reason} (0x{reason.value:02x})"


_SSL_ERROR = re.compile(r"(\[SSL: \w+\] )?(?P<text>[^(\[]+?) \(_ssl\.c:\d+\)")


def _tls_text(error: str) -> str:
    """An OpenSSL error as a person reads it, without its file and line: `tlsv13 alert
    certificate required (the broker wants a client certificate: mqtt.tls.cert_file)`."""
    found = _SSL_ERROR.search(error)
    text = (found.group("text") if found else error).removeprefix("failed to receive on socket: ")
    if "certificate required" in text:
        text += " (the broker wants a client certificate: mqtt.tls.cert_file and key_file)"
    return text


class _Errors(logging.Logger):
    """Given to paho as its logger, to keep its last error: paho's only report of why a
    socket failed (under TLS 1.3 a broker refuses a client certificate after the handshake,
    so it shows as a connection lost before the CONNACK). A logger that formats nothing
    below ERROR: paho logs every packet at DEBUG."""

    def __init__(self) -> None:
        super().__init__(__name__, logging.ERROR)
        self.last: str | None = None

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            self.last = str(msg) % args if args else str(msg)


def secure(client: paho.Client, config: MqttConfig) -> None:
    """Credentials and TLS, as configured (each file checked first: a ConfigError naming its key)."""
    check_files(config, "mqtt.")
    if config.username is not None:
        client.username_pw_set(config.username, read_password(config))
    context = tls_context(config)
    if context is not None:
        client.tls_set_context(context)  # verifies the broker's certificate and host name


def check_credentials(config: MqttConfig) -> None:
    """Everything `secure` will load, loaded now: run at start-up, before the log is opened,
    so that a bad certificate or password file is a config error, not a crash later."""
    check_files(config, "mqtt.")
    read_password(config)
    tls_context(config)


def read_password(config: MqttConfig) -> str | None:
    if config.password_file is None:
        return None
    try:
        password = config.password_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        problem = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise blame(
            config, "password_file", "mqtt.password_file", f"cannot read {config.password_file}: {problem}"
        ) from error
    if not password:  # sent as is, an empty password fails as a bad one, far from its cause
        raise blame(config, "password_file", "mqtt.password_file", f"{config.password_file} is empty")
    return password


class _Encrypted(Exception):
    """The private key asks for a passphrase (the agent has none to give)."""


def _no_passphrase() -> str:
    raise _Encrypted  # without a callback, OpenSSL would prompt on the terminal


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context the link uses (None: plain TCP), as paho's `tls_set` would build it,
    every file loaded: one that is not a certificate or key, a certificate without its key,
    a key that does not match it, is a ConfigError naming the key and the path."""
    tls = config.tls
    if tls.ca_file is None and tls.cert_file is None and tls.key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    if tls.ca_file is None:
        context.load_default_certs()
    else:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except ssl.SSLError as error:
            raise _bad(tls, "ca_file", f"{tls.ca_file} holds no PEM certificate") from error
        except OSError as error:
            raise _bad(tls, "ca_file", f"cannot read {tls.ca_file}: {error.strerror}") from error
    if tls.cert_file is None:
        if tls.key_file is not None:
            raise _bad(tls, "key_file", f"{tls.key_file} is set without mqtt.tls.cert_file, its certificate")
        return context
    if b"-----BEGIN CERTIFICATE-----" not in _read(tls, "cert_file"):
        raise _bad(tls, "cert_file", f"{tls.cert_file} holds no PEM certificate")
    holder = "key_file" if tls.key_file is not None else "cert_file"
    if b"PRIVATE KEY-----" not in _read(tls, holder):
        if tls.key_file is None:
            raise _bad(tls, "cert_file", f"{tls.cert_file} holds no private key; set mqtt.tls.key_file")
        raise _bad(tls, "key_file", f"{tls.key_file} holds no PEM private key")
    key_path = tls.key_file or tls.cert_file
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None, _no_passphrase)
    except _Encrypted:
        raise _bad(tls, holder, f"{key_path} is encrypted; the agent needs the key without a passphrase") from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise _bad(tls, holder, f"{key_path} does not match the certificate in {tls.cert_file}") from error
        raise _bad(tls, holder, f"cannot load {key_path}: {_tls_text(str(error))}") from error
    return context


def _read(tls: TlsConfig, name: str) -> bytes:
    path: Path = getattr(tls, name)
    try:
        return path.read_bytes()
    except OSError as error:
        raise _bad(tls, name, f"cannot read {path}: {error.strerror}") from error


def _bad(tls: TlsConfig, name: str, problem: str) -> ConfigError:
    return blame(tls, name, f"mqtt.tls.{name}", problem)
