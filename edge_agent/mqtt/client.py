"""A short-lived MQTT client for the CLI: publish one order or cancel, optionally follow
what the device says of it.

aiomqtt, where the agent keeps paho (`link.py`): this client only follows topics, so
aiomqtt's acknowledging on receipt is right here, and a CLI command is one short
`asyncio.run` that reads with `async for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any, TypeVar

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.config import MqttConfig, check_files
from edge_agent.errors import EdgeAgentError
from edge_agent.mqtt.link import describe, read_password, tls_context

CONNECT_TIMEOUT_S = 10.0  # to connect and subscribe
CLOSE_TIMEOUT_S = 2.0
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0

T = TypeVar("T")

# QoS 1, and (MQTT 5) no retained message at subscribe: what is followed is what the
# device says from now on. Under 3.1.1 the broker sends them, and they are skipped.
_FRESH_ONLY = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)

# aiomqtt hands its logger to paho, which logs a lost socket at ERROR: with no handler
# Python would print that on stderr, beside the CLI's own one line about it.
log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())


class BrokerUnreachable(EdgeAgentError):
    """The broker could not be reached, refused us or closed the connection."""


class PublishUnconfirmed(BrokerUnreachable):
    """The connection went, or the time ran out, before the broker acknowledged a publish:
    the message may or may not have reached it."""


class PublishRefused(EdgeAgentError):
    """The broker answered a publish with a failure reason code (MQTT 5), such as an ACL's
    Not authorized (0x87): it does not deliver the message."""

    def __init__(self, what: str, topic: str, reason: str) -> None:
        super().__init__(f"the broker did not accept the {what} on {topic}: {reason}")
        self.topic = topic
        self.reason = reason


class _Lost(Exception):
    """The connection went while a step waited for the broker."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping what aiomqtt 2.x does not pass on: the reason code of the
    broker's last PUBACK (under MQTT 5 a broker refuses a publish there and only there), and
    that the connection is gone (aiomqtt says so only to a reader of `messages`; a wait for
    a PUBACK or SUBACK would last until its timeout), and the CONNACK's reason code (paho
    may report a refusal and the connection it then closes before aiomqtt's connect has
    started to wait for either). All come through aiomqtt's private paho callbacks (hence
    aiomqtt pinned below 3)."""

    connack: ReasonCode | None = None
    puback: ReasonCode | None = None

    @cached_property
    def lost(self) -> asyncio.Event:
        return asyncio.Event()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.connack = reason_code
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        self.puback = reason_code  # before the waiting publish() is woken
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.lost.set()
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


def _quietly(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of errors nobody awaits: aiomqtt leaves some once the broker has
    closed the connection (a disconnection nobody read, a socket closed before paho's write
    callback ran). The CLI's one error line says what happened; these go to the debug log,
    anything else to asyncio's own handler."""
    error = context.get("exception")
    if isinstance(error, aiomqtt.MqttError | OSError):
        log.debug("%s: %s", context.get("message"), error)
    else:
        loop.default_exception_handler(context)


class Session:
    """A connection (made again if lost while following) whose followed topics the caller
    reads with `received`."""

    def __init__(self, config: MqttConfig, subscribe: list[str], max_message_bytes: int) -> None:
        """`max_message_bytes`: the largest message the broker may send us (MQTT 5 only: a
        3.1.1 broker sends whatever comes); bigger ones are not for us and are dropped by it."""
        check_files(config, "mqtt.")
        self._config = config
        self._max_message_bytes = max_message_bytes
        self._password = read_password(config) if config.username is not None else None
        self._tls = tls_context(config)  # verifies the broker's certificate and host name
        self._subscribe = subscribe
        self._where = f"{config.host}:{config.port}"
        self._connection = contextlib.AsyncExitStack()
        self._client: _Client | None = None

    def _new_client(self, timeout_s: float) -> _Client:
        """A new aiomqtt client for each connection: clean session, a throwaway client id."""
        v5 = self._config.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            properties.MaximumPacketSize = self._max_message_bytes
        client = _Client(
            self._config.host,
            self._config.port,
            identifier=f"edge-agent-cli-{uuid.uuid4().hex[:12]}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else True,  # MQTT 5 has clean_start instead (paho: its default, else an error)
            clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            username=self._config.username,
            password=self._password,
            tls_context=self._tls,
            keepalive=self._config.keepalive_s,
            timeout=math.inf,  # every wait is bounded here, each with its own message
            properties=properties,
            logger=log,
        )
        # paho opens the socket and does the TLS handshake in one blocking call on the loop,
        # which no asyncio timeout can interrupt: it gets the command's time of its own.
        client._client.connect_timeout = timeout_s
        return client

    @property
    def client(self) -> _Client:
        assert self._client is not None, "not connected"
        return self._client

    async def connect(self, timeout_s: float) -> None:
        """Connect and subscribe, both within `timeout_s`: nothing is published before what
        answers it is followed."""
        self._client = client = self._new_client(timeout_s)
        granted: list[ReasonCode] | tuple[int, ...] = []
        try:
            async with asyncio.timeout(timeout_s):
                await self._unless_lost(self._connection.enter_async_context(client))
                if self._subscribe:
                    granted = await self._unless_lost(client.subscribe(self._topics()))
        except TimeoutError:
            raise BrokerUnreachable(f"no answer from the broker at {self._where}") from None
        except (_Lost, aiomqtt.MqttCodeError):  # a CONNACK that refuses (and hangs up), or the connection lost
            if client.connack is not None and client.connack.is_failure:
                raise BrokerUnreachable(f"the broker at {self._where} refused: {client.connack}") from None
            raise BrokerUnreachable(f"the broker at {self._where} closed the connection") from None
        except aiomqtt.MqttError as error:  # the socket could not be opened (paho's OSError)
            raise BrokerUnreachable(f"cannot reach the broker at {self._where}: {error}") from None
        for reason in granted:
            if isinstance(reason, ReasonCode) and reason.is_failure:
                raise BrokerUnreachable(f"the broker at {self._where} refused: {reason}")

    def _topics(self) -> list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]:
        if self._config.protocol == "5":
            return [(topic, _FRESH_ONLY) for topic in self._subscribe]
        return [(topic, 1) for topic in self._subscribe]

    async def _unless_lost(self, step: Awaitable[T]) -> T:
        """`step`'s result, or _Lost as soon as the connection is gone."""
        doing = asyncio.ensure_future(step)
        gone = asyncio.ensure_future(self.client.lost.wait())
        try:
            await asyncio.wait((doing, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (doing, gone):
                task.cancel()
        if not doing.done() or doing.cancelled():
            raise _Lost
        return doing.result()

    async def close(self) -> None:
        # A connection already gone, or a broker too slow to take the DISCONNECT: nothing to wait for.
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._connection.aclose()

    async def publish(self, topic: str, payload: bytes, timeout_s: float, what: str = "order") -> None:
        """Publish `what` at QoS 1 and wait for the broker's acknowledgement; under MQTT 5 a
        refusal in it (PUBACK reason >= 0x80) is PublishRefused, not a success."""
        client = self.client
        client.puback = None
        try:
            await self._unless_lost(client.publish(topic, payload, qos=1, timeout=timeout_s))
        except (_Lost, aiomqtt.MqttCodeError):  # gone before the PUBACK, or (paho) before it was sent
            closed = f"the broker at {self._where} closed the connection"
            raise PublishUnconfirmed(f"{closed} before acknowledging the {what}") from None
        except aiomqtt.MqttError:
            raise PublishUnconfirmed(f"the broker did not acknowledge the {what} within {timeout_s:g} s") from None
        if client.puback is not None and client.puback.is_failure:
            raise PublishRefused(what, topic, describe(client.puback))

    async def received(self, timeout_s: float) -> AsyncIterator[tuple[str, Any]]:
        """(topic, JSON payload) of each message on the followed topics, for `timeout_s`
        seconds; one that is not JSON is skipped (not ours to judge). A lost connection is
        made again (a clean session: what came meanwhile is not seen) until then."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        messages = self.client.messages
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await anext(messages)
            except TimeoutError:
                return
            except aiomqtt.MqttError:
                if not await self._reconnect(deadline):
                    return
                messages = self.client.messages
                continue
            # Retained: not the device's answer (it retains none of these), something stale or foreign.
            if not message.retain and isinstance(message.payload, bytes | bytearray):
                with contextlib.suppress(orjson.JSONDecodeError):
                    yield message.topic.value, orjson.loads(message.payload)

    async def _reconnect(self, deadline: float) -> bool:
        """Connect and subscribe again, backing off, until `deadline` (False: not by then)."""
        loop = asyncio.get_running_loop()
        pause = RECONNECT_FIRST_S
        while (left := deadline - loop.time()) > 0:
            await self.close()
            try:
                await self.connect(left)
            except BrokerUnreachable:
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
                pause = min(pause * 2, RECONNECT_MAX_S)
                continue
            return True
        return False


@asynccontextmanager
async def session(
    config: MqttConfig, subscribe: list[str], max_message_bytes: int, timeout_s: float = CONNECT_TIMEOUT_S
) -> AsyncIterator[Session]:
    """Connect (clean session, a throwaway client id) and subscribe before anything is
    published, within `timeout_s`; see `Session` for `max_message_bytes`."""
    # The loop is the command's own (`asyncio.run`): what aiomqtt leaves unawaited after a
    # lost connection may surface until the loop is gone, so the handler stays.
    asyncio.get_running_loop().set_exception_handler(_quietly)
    result = Session(config, subscribe, max_message_bytes)
    try:
        await result.connect(timeout_s)
        yield result
    finally:
        await result.close()
