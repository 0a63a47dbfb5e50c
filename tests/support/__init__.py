"""What the tests and the benchmarks share: the one home of their helpers.

Brokers and ports, the agent in-process and in child processes (the modules run with
`python -m tests.support.<name>`), MQTT peers, orders, configs, logs to start from,
a failing disk and the lock-step machine of the chaos tests. Fixtures stay in
tests/conftest.py.
"""

import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: where `python -m tests.support.<name>` runs
PROFILE = ROOT / "device_profiles" / "simulated.yaml"  # the cell every test agent runs on
WAIT_S = 20.0  # generous: a loaded 2-core machine; it only bounds a failing test's wait


def chaos_seed() -> int:
    """A chaos run's random seed, printed: CHAOS_SEED=... runs it again."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} to run it again)")
    return seed
