"""The exception types that mean "the user's input is wrong" (missing files, bad config, corrupt snapshots...).

Entry points (the `q0ds` CLI, launchers/train.py, `q0ds distill-ensemble`) catch exactly these and print one
line naming the problem and the fix, exit 2, no traceback; anything else is a bug and keeps its traceback.
The types stay in the modules that raise them; this module only collects them, importing lazily so that it
imports nothing at load time (no import cycle with cli.py or the trainer).
"""
from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .files import WriteFailed
    from .data import DataError
    from .model import ModelError
    from .population import PriorError
    from .runlock import LockError
    from .snapshot import SnapshotError
    from .trainer import NonFiniteLoss, ResumeError
    errs = [ConfigError, DataError, ModelError, SnapshotError, ResumeError, NonFiniteLoss, PriorError,
            LockError, WriteFailed, FileNotFoundError]
    try:
        from .lm_eval_adapter import LMEvalError
        errs.append(LMEvalError)
    except ImportError:            # lm_eval not installed: only `q0ds lm-eval` needs it
        pass
    return tuple(errs)
