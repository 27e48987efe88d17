"""Test-only fault injection, read from the environment: Q0DS_FAULT="nan_at_step=5,crash_in_snapshot=1".

Points: nan_at_step=S (the loss of step S becomes NaN), preempt_at_step=S (as if SIGUSR1 arrived),
crash_at_step=S (SIGKILL after step S), crash_in_snapshot=C (SIGKILL with cycle C's weights half-written),
crash_in_checkpoint=S (SIGKILL after DeepSpeed wrote checkpoint S but before it was marked complete),
sleep_in_cycle_end=S (every cycle end's snapshot write takes S seconds longer on rank 0: a slow event).
Unset in normal runs; each check is one dict lookup.
"""
import os
import signal
import time


def fault(name: str):
    for item in filter(None, os.environ.get("Q0DS_FAULT", "").split(",")):
        key, _, value = item.partition("=")
        if key == name:
            return int(value)
    return None


def crash_if(name: str, value) -> None:
    """SIGKILL this process (no cleanup, like kill -9 or a node failure) when the fault is armed for `value`."""
    armed = fault(name)
    if armed is not None and armed == value:      # unarmed (None) never matches, not even a value of None
        os.kill(os.getpid(), signal.SIGKILL)


def sleep_if(name: str) -> None:
    """Sleep the armed number of seconds (a slow filesystem or event, for timing tests)."""
    s = fault(name)
    if s:
        time.sleep(s)
