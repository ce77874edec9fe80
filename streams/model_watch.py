"""Choosing the recommender from INTEREST_MODEL, and rolling out a new bundle without downtime.

The worker checks the bundle path between batches (at most every `model_poll_seconds`); when the
manifest it points at changes (a new bundle copied in place, or a `current` symlink switched to
another bundle), the new bundle is loaded and verified in a thread and swapped in before the next
batch. No batch runs half on one model and half on the other; recommendation events carry the
version that made them; a bundle that fails to load is logged and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Executor
from pathlib import Path

from interest.errors import UserError
from streams.recommend import PopularityRecommender, Recommender
from streams.settings import Settings

log = logging.getLogger(__name__)


def _manifest_stamp(bundle: Path) -> tuple[int, int, int] | None:
    """Identity of the manifest the path resolves to now (follows symlinks)."""
    try:
        st = os.stat(bundle / "manifest.json")
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_recommender(settings: Settings) -> Recommender:
    """The encoder when INTEREST_MODEL names a bundle, else the popularity baseline."""
    if settings.model is None:
        return PopularityRecommender()
    from export.runtime import BundleError, EncoderRuntime
    from streams.encoder_recommender import EncoderRecommender

    try:
        runtime = EncoderRuntime.load(settings.model)
    except (BundleError, OSError) as exc:
        raise UserError(f"cannot load INTEREST_MODEL={settings.model}: {exc}") from None
    # Rebuilding needs the last receptive_field events plus the one before the oldest of them
    # (its time gap is a model input).
    if runtime.receptive_field >= settings.window_length:
        raise UserError(
            f"the model needs the last {runtime.receptive_field + 1} events to rebuild a "
            f"user's state but INTEREST_WINDOW_LENGTH is {settings.window_length}"
        )
    log.info("serving model %s on %s", runtime.version, runtime.provider)
    return EncoderRecommender(runtime, cache_users=settings.state_cache_users)


class ModelWatcher:
    def __init__(self, settings: Settings, current: Recommender) -> None:
        self.settings = settings
        self.current = current
        self._stamp = _manifest_stamp(settings.model) if settings.model else None
        self._checked = time.monotonic()

    async def refresh(self, executor: Executor | None) -> Recommender:
        """The recommender for the next batch: the current one, or a newly rolled-out one."""
        model = self.settings.model
        now = time.monotonic()
        if model is None or now - self._checked < self.settings.model_poll_seconds:
            return self.current
        self._checked = now
        stamp = _manifest_stamp(model)
        if stamp is None or stamp == self._stamp:
            return self.current
        loop = asyncio.get_running_loop()
        try:
            candidate = await loop.run_in_executor(executor, load_recommender, self.settings)
        except UserError as exc:
            # Not recorded as seen: a bundle caught mid-copy loads on a later poll.
            log.error("model rollout failed, still serving %s: %s", self.current.model_version, exc)
            return self.current
        self._stamp = stamp
        if candidate.model_version != self.current.model_version:
            log.warning(
                "model rollout: %s -> %s", self.current.model_version, candidate.model_version
            )
            self.current = candidate
        return self.current
