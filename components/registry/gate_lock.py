"""A lock around the promotion gate, held in the registry itself, with a lease a crashed holder cannot keep.

Why: the gate reads the champion, decides and moves the alias. Two gates that overlap (parallel
Kubeflow runs, a `dvc exp` queue with several workers) can read the same champion, and the one that
writes last wins even when it is the worse model. MLflow has no compare-and-set on an alias, but
creating a registered model is atomic in every backend store (a unique name in SQLite or
PostgreSQL, and the same behind a tracking server, which passes the store's "already exists" on):
of several concurrent creates of one name exactly one succeeds. So the lock is a registered model
named `<name>.gate-lock`, created to take the lock and deleted to release it. It is written by hand
because no registry client offers one; it needs nothing but the registry every registration already
talks to.

Its tags name the owner and when the lease ends. A registration that waits and finds the lease
ended (its holder was killed between taking and releasing) breaks it by renaming the lock model
away (one rename wins) and deleting it. The limit: a holder that outlives its lease (a gate slower
than `lock_lease_s`, which takes seconds) can overlap the next one, so the lease is set far above a
gate's duration.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from zhclip.components.core.errors import ZhclipError

LOCK_SUFFIX = ".gate-lock"
POLL_S = 0.5


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def _already_exists(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _try_take(client, lock: str, owner: str, lease_s: float) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock,
            tags={"zhclip.lock_owner": owner, "zhclip.lease_ends": f"{time.time() + lease_s:.3f}"},
            description="zhclip's promotion-gate lock: held while a registration moves `champion` (seconds)",
        )
    except MlflowException as err:
        # "does not exist": the store's look-up after a failed insert ran just as the holder released
        if _already_exists(err) or _not_found(err):
            return False
        raise
    return True


def _break_if_expired(client, lock: str) -> str | None:
    """Remove the lock when its lease has ended; returns the owner it broke, or None."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
        if _lease_end(tags) > time.time():
            return None
        broken = f"{lock}.expired-{uuid.uuid4().hex[:8]}"
        client.rename_registered_model(lock, broken)  # fails for every waiter but one
        if client.get_registered_model(broken).tags.get("zhclip.lock_owner") != tags.get("zhclip.lock_owner"):
            # between the read and the rename another waiter broke it and a new holder took it: give it back
            client.rename_registered_model(broken, lock)
            return None
        client.delete_registered_model(broken)
    except MlflowException as err:
        if _not_found(err) or _already_exists(err):
            return None  # released meanwhile, or another waiter broke it first
        raise
    return tags.get("zhclip.lock_owner")


def _lease_end(tags: dict[str, str]) -> float:
    """When the holder's lease ends; a lock without a readable lease counts as expired."""
    try:
        return float(tags["zhclip.lease_ends"])
    except (KeyError, ValueError):
        return 0.0


@contextmanager
def gate_lock(client, model_name: str, lease_s: float, wait_s: float) -> Iterator[str]:
    """Hold the gate lock of `model_name` for the block; yields this holder's owner id. Waits up to
    `wait_s` seconds for another holder, breaking a lease that ended; raises ZhclipError after that."""
    from mlflow.exceptions import MlflowException

    lock = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while not _try_take(client, lock, owner, lease_s):
        broken = _break_if_expired(client, lock)
        if broken:
            print(f"register: broke the gate lock of {broken}, whose lease had ended", file=sys.stderr, flush=True)
            continue
        if time.monotonic() > deadline:
            raise ZhclipError(
                f"the promotion gate of {model_name!r} stayed locked for {wait_s:.0f} s (registered model "
                f"{lock!r}, held by another registration); retry, or raise register.lock_wait_s"
            )
        time.sleep(POLL_S * (0.5 + random.random()))  # jittered, so waiters do not poll in step
    try:
        yield owner
    finally:
        try:
            if client.get_registered_model(lock).tags.get("zhclip.lock_owner") == owner:
                client.delete_registered_model(lock)
        except MlflowException as err:
            if not _not_found(err):  # broken after our lease ended: nothing of ours to release
                raise
