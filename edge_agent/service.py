"""Running the agent as a service: the embedded broker if configured, the agent,
its MQTT gateway, systemd notification and watchdog, and the signals —
SIGINT / SIGTERM stop in order, SIGHUP reloads what can be reloaded."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import orjson

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.clock import SystemClock
from edge_agent.config import Config, changed_keys, check_files, load_config
from edge_agent.demo import demo_orders
from edge_agent.devices.profile import load_profile
from edge_agent.domain.moments import iso
from edge_agent.domain.state import Stage
from edge_agent.errors import ConfigError, LogError, LogRefused, NewerLog, StartRefused, StorageFault
from edge_agent.gateway import Gateway
from edge_agent.health import HealthServer, Metrics
from edge_agent.hooks import NO_HOOKS, Hooks
from edge_agent.lock import DataDirLock
from edge_agent.mqtt.broker import EmbeddedBroker
from edge_agent.mqtt.link import Inbound, Link, check_credentials
from edge_agent.mqtt.topics import Topics
from edge_agent.sdnotify import Notifier
from edge_agent.workflow.engine import WorkflowMismatch

log = logging.getLogger(__name__)

RELOADABLE = frozenset({"log_level", "telemetry_interval_s"})


def run_agent(config: Config, demo: int = 0, config_path: Path | None = None) -> None:
    """Run in the foreground until SIGINT or SIGTERM."""
    asyncio.run(serve(config, demo, config_path))


async def serve(config: Config, demo: int = 0, config_path: Path | None = None, hooks: Hooks = NO_HOOKS) -> None:
    profile = load_profile(config.profile)  # a bad profile stops us before any pin or the log is touched
    check_files(config)  # so do a missing certificate and a password file others can read,
    check_credentials(config.mqtt)  # and a certificate, key or password the link could not use
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # From the start: SIGHUP's default action would end the process.
    reloading: list[Gateway] = []
    in_force = [config]

    def on_hup() -> None:
        in_force[0] = reload(in_force[0], config_path, reloading[0] if reloading else None)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    async with AsyncExitStack() as stack:
        async with refusing_start(config):
            # Before anything else: a second agent on this data folder stops here, having
            # touched no pin, no port and no log; then a taken port, before the log is opened.
            lock = stack.enter_context(DataDirLock(config.data_dir))
            check_ports(config)
            if config.mqtt.embedded:
                await stack.enter_async_context(EmbeddedBroker(config.mqtt.port, config.mqtt.host))
            agent = await stack.enter_async_context(Agent(config, profile=profile, lock=lock, hooks=hooks))
        gateway = Gateway(agent, config, hooks)
        if config.http.enabled:
            health = HealthServer(
                config.http.bind, config.http.port, lambda: problems(agent, gateway), metrics(agent, gateway)
            )
            health.start()
            stack.callback(health.stop)
        reloading.append(gateway)
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(agent.run(), name="agent")
            online = tasks.create_task(gateway.run(), name="gateway")
            background = [running]
            if notifier.watchdog_interval_s is not None:
                background.append(tasks.create_task(_watchdog(notifier, notifier.watchdog_interval_s), name="watchdog"))
            notifier.ready(f"running; log at seq {agent.state.last_seq}")
            for order in demo_orders(demo, profile):
                await agent.submit(order)
            await stop.wait()
            log.info("stopping on signal")
            notifier.stopping("stopping: outputs off, going offline")
            online.cancel()  # first say offline, then stop the cell
            await asyncio.wait([online])
            for task in background:
                task.cancel()


# A start-up that cannot proceed ------------------------------------------------------

# What a restart does not mend by itself but an operator can: the disk is full, the
# file system was remounted read-only after errors, the card fails.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
STORAGE_SQLITE = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}
)
ANNOUNCE_TIMEOUT_S = 5.0  # to reach the broker and say why, before exiting


@asynccontextmanager
async def refusing_start(config: Config) -> AsyncIterator[None]:
    """Start-up: a log that cannot be taken over or a disk that cannot be written becomes a
    StartRefused (its own exit code), said on the retained `status` topic first. The
    outputs are off by then: the agent creates them off before it opens the log, and
    closes them when its start fails."""
    try:
        yield
    except (NewerLog, WorkflowMismatch) as error:
        # A newer release's log, left as it is: exit 2 as the contract says, and said on
        # the status topic too, as every start that cannot proceed is.
        newer = error
        if isinstance(error, WorkflowMismatch):
            newer = NewerLog(f"cannot take over the log {config.events_db}: {error}")
        if not config.mqtt.embedded:
            await asyncio.to_thread(announce, config, str(newer))
        if newer is error:
            raise
        raise newer from error
    except (OSError, ConfigError, LogError) as error:
        refusal = start_refusal(error, config)
        if refusal is None:
            raise
        if not config.mqtt.embedded:  # an embedded broker ends with this process: nobody would hear
            await asyncio.to_thread(announce, config, str(refusal))
        raise refusal from error


def start_refusal(error: BaseException, config: Config) -> StartRefused | None:
    """What a start-up error means to the operator (None: a config error, as it was)."""
    if _storage_cause(error):
        if isinstance(error, OSError):  # not yet put in words (the lock file's first write)
            return StorageFault(f"data_dir: cannot use {config.data_dir}: {error.strerror or error}")
        return StorageFault(str(error))
    if isinstance(error, LogError):
        return LogRefused(f"cannot take over the log {config.events_db}: {error}")
    return None


def _storage_cause(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error) and error.sqlite_errorcode & 0xFF in STORAGE_SQLITE:
            return True  # the primary code, whatever the extended one (SQLITE_IOERR_WRITE ...)
        error = error.__cause__ or error.__context__
    return False


def announce(config: Config, reason: str, timeout_s: float = ANNOUNCE_TIMEOUT_S) -> None:
    """`offline` with `reason` on the retained status topic, if the broker answers within
    `timeout_s`. As the device itself (its client id, its session kept): what the broker
    delivers meanwhile is not acknowledged, so it comes again to the next start."""
    topics = Topics(config.mqtt.topic_prefix, config.device_id, config.mqtt.shared_group)
    status = {"state": "offline", "since": iso(SystemClock().now()), "version": __version__, "error": reason}
    payload = orjson.dumps(status)
    connected = threading.Event()
    link = Link(
        config.mqtt,
        config.device_id,
        topics,
        will=payload,
        on_message=_unheard,
        on_connection=lambda up: connected.set() if up else None,
        on_published=lambda mid, refusal: None,
    )
    chatter = logging.getLogger(Link.__module__)
    level = chatter.level
    chatter.setLevel(logging.ERROR)  # retries and connections: the journal's line is the reason
    try:
        link.start()
        connected.wait(timeout_s)
        link.stop((topics.status, payload))
    finally:
        chatter.setLevel(level)


def _unheard(message: Inbound) -> None:
    """An order for an agent that is not starting: left unacknowledged, so it is redelivered."""


def check_ports(config: Config) -> None:
    """The ports this agent will listen on are free, or a ConfigError naming the key."""
    wanted = []
    if config.mqtt.embedded:
        advice = "; if a broker already runs there, use it with mqtt.embedded: false"
        wanted.append(("mqtt.port", "mqtt.host", config.mqtt.host, config.mqtt.port, advice))
    if config.http.enabled:
        wanted.append(("http.port", "http.bind", config.http.bind, config.http.port, ""))
    for key, host_key, host, port, advice in wanted:
        with socket.socket() as probe:
            # As the servers bind: SO_REUSEADDR, so only a listener (not a closing socket) counts.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{key}: {host}:{port} is taken{advice}", key=key) from error
                message = f"{host_key}: cannot listen on {host}:{port}: {error.strerror}"
                raise ConfigError(message, key=host_key) from error


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    """Pings from the event loop itself: if the loop stalls, the pings stop and systemd acts."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)


MQTT_DOWN_BUDGET_S = 60.0  # past this, a lost broker connection makes the agent unhealthy


def problems(agent: Agent, gateway: Gateway) -> list[str]:
    """Why the agent is not healthy (empty: it is)."""
    found = []
    fault = agent.fault
    if fault is not None:
        found.append(f"the event log is not writable, no orders taken: {fault}")
    refusal = gateway.link.refusal
    down_since = gateway.link.down_since
    if down_since is not None and refusal is not None:
        found.append(refusal)  # at once: retrying does not help until someone changes something
    elif down_since is not None and time.monotonic() - down_since > MQTT_DOWN_BUDGET_S:
        found.append(f"no MQTT connection for {time.monotonic() - down_since:.0f} s")
    if gateway.outbox.refusal is not None:
        found.append(f"{gateway.outbox.refusal}; not delivered, retrying")
    return found


def metrics(agent: Agent, gateway: Gateway) -> Metrics:
    def counters() -> dict[str, float]:
        state = agent.state
        return {
            "orders_accepted": state.accepted,
            "orders_duplicate": agent.workflow.duplicates,
            "orders_rejected": state.rejected,
            "mqtt_reconnects": gateway.link.reconnects,
            "publish_refused": gateway.link.refused,
            "log_compactions": agent.retention.counts.compactions,
            "log_events_removed": agent.retention.counts.events_removed,
            "log_archives_removed": agent.retention.counts.archives_removed,
            "log_checkpoints_busy": agent.retention.counts.checkpoints_busy,
        }

    def gauges() -> dict[str, float]:
        state = agent.state
        return {
            "stations_busy": sum(1 for s in state.stations if s.order_id is not None),
            "stations": len(state.stations),
            "last_seq": state.last_seq,
            "outbox_lag": state.last_seq - gateway.outbox.acked,
            "estop": int(state.estop),
            "mqtt_connected": int(gateway.link.connected),
            **_log_sizes(agent),
        }

    def stages() -> dict[str, int]:
        # Every stage, 0 when empty: a series that disappears reads as "no data", not "none".
        counts = Counter(str(item.stage) for item in agent.state.work_items.values())
        return {str(stage): counts[str(stage)] for stage in Stage}

    result = Metrics(counters, gauges, stages)
    agent.add_observer(lambda commit: result.commit_seconds.observe(commit.seconds))
    return result


def _log_sizes(agent: Agent) -> dict[str, float]:
    """The disk the log takes, read from the files (the scrape's thread never touches SQLite)."""
    db, wal = agent.journal.log.sizes()
    return {"log_bytes": db, "log_wal_bytes": wal, "log_archive_bytes": agent.retention.archive_bytes()}


def reload(config: Config, path: Path | None, gateway: Gateway | None) -> Config:
    """SIGHUP: apply the log level and the telemetry interval, and name what needs a
    restart; the config now in force is returned."""
    try:
        fresh = load_config(path)
    except ConfigError as error:
        log.error("reload refused, nothing changed: %s", error)
        return config
    changed = set(changed_keys(config, fresh))  # dotted: `mqtt.port`, not the whole section
    logging.getLogger().setLevel(fresh.log_level.upper())
    log.debug("logging at %s", fresh.log_level)  # seen only if that level is now in force
    if gateway is not None:
        gateway.telemetry_interval_s = fresh.telemetry_interval_s
    applied = sorted(changed & RELOADABLE)
    pending = sorted(changed - RELOADABLE)
    log.info("reloaded: %s", ", ".join(applied) or "nothing changed that can be reloaded")
    if pending:
        log.warning("these take effect only after a restart: %s", ", ".join(pending))
    return config.model_copy(update={key: getattr(fresh, key) for key in RELOADABLE})
