"""The key manager: modes, rollout, consistency check, fallback and the migration runbook."""

from plings_hsm.manager.config import KeyManagementMode, ManagerSettings, parse_mode
from plings_hsm.manager.gates import GateLimits, GateReading, read_gate
from plings_hsm.manager.key_manager import KeyManager, ServedKeys
from plings_hsm.manager.metrics import ManagerMetrics
from plings_hsm.manager.migration import (
    REMOVE_CONFIRMATION,
    ROLLOUT_STEPS,
    Runbook,
    RunResult,
    open_state,
    roll_back,
)
from plings_hsm.manager.notify import MigrationNotice, Notifier
from plings_hsm.manager.rollout import Rollout, bucket_of

__all__ = [
    "REMOVE_CONFIRMATION",
    "ROLLOUT_STEPS",
    "GateLimits",
    "GateReading",
    "KeyManagementMode",
    "KeyManager",
    "ManagerMetrics",
    "ManagerSettings",
    "MigrationNotice",
    "Notifier",
    "Rollout",
    "RunResult",
    "Runbook",
    "ServedKeys",
    "bucket_of",
    "open_state",
    "parse_mode",
    "read_gate",
    "roll_back",
]
