"""Choosing the recommender from INTEREST_MODEL, and rolling out a new bundle without downtime.

A task beside the worker's agent checks the bundle path every `model_poll_seconds`; when the
manifest it points at changes (a new bundle copied in place, or a `current` symlink switched to
another bundle), it loads and verifies the new bundle in a thread of its own while the current
model keeps serving; the agent swaps it in between batches, before the first batch it takes
after the load. No batch runs half on one model and half on the other; recommendation events
carry the version that made them; a bundle that fails to load is logged, the old model keeps
serving, and the bundle is tried again when it changes or after `RETRY_FAILED_SECONDS`.

Why a task and a thread of their own: a load takes seconds (the ONNX sessions, and the state
slab's memory committed up front). Loaded in the inference thread and awaited between
batches, it would hold every event that arrives meanwhile (bench/rollout.py measures the
latency around a rollout).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import UserError
from streams import metrics
from streams.recommend import PopularityRecommender, Recommender
from streams.settings import Settings

log = logging.getLogger(__name__)

# A bundle that failed to load is tried again after this long even if it does not change (a
# copy may have been caught half way), not at every poll: a load costs seconds of CPU.
RETRY_FAILED_SECONDS = 60.0


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
        return PopularityRecommender(explain=settings.explain)
    from export.runtime import BundleError, EncoderRuntime
    from streams.encoder_recommender import EncoderRecommender

    try:
        runtime = EncoderRuntime.load(
            settings.model, popularity_penalty=settings.popularity_penalty
        )
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
    return EncoderRecommender(
        runtime,
        cache_users=settings.state_cache_users,
        explain_events=settings.explain_events if settings.explain else 0,
        exclude_seen_types=settings.exclude_seen_types,
        catalogue=settings.catalogue,
        catalogue_poll_seconds=settings.model_poll_seconds,
    )


class ModelWatcher:
    def __init__(self, settings: Settings, current: Recommender) -> None:
        self.settings = settings
        self.current = current
        metrics.serving(current.model_version)
        self._stamp = _manifest_stamp(settings.model) if settings.model else None
        self._loaded: Recommender | None = None  # ready to serve from the next batch
        self._failed: tuple[tuple[int, int, int], float] | None = None  # (stamp, when)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")

    def refresh(self) -> Recommender:
        """The recommender for the next batch: a newly loaded one if there is one, else the
        current one. Never waits for a load."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.model_version != self.current.model_version:
            log.warning("model rollout: %s -> %s", self.current.model_version, loaded.model_version)
            self.current = loaded
            metrics.serving(loaded.model_version)
        return self.current

    async def watch(self) -> None:
        """Poll the bundle path and load what it points at when it changes, until cancelled
        (the agent runs it beside its batches)."""
        if self.settings.model is None:
            return
        while True:
            await asyncio.sleep(self.settings.model_poll_seconds)
            try:
                await self.check()
            except Exception:  # a dead watch would stop every later rollout, silently
                log.exception("model rollout: the check failed; trying again at the next poll")

    async def check(self) -> None:
        """One poll: load the bundle if its manifest changed since the last good load."""
        if self.settings.model is None:
            return
        # Resolved once: the stamp and every file of the load come from the same bundle even
        # if the symlink is switched again meanwhile (the next poll sees that switch).
        bundle = self.settings.model.resolve()
        stamp = _manifest_stamp(bundle)
        if stamp is None or stamp == self._stamp:
            return
        self._loaded = None  # a loaded bundle not yet swapped in is superseded
        failed = self._failed
        if failed and failed[0] == stamp and time.monotonic() - failed[1] < RETRY_FAILED_SECONDS:
            return
        log.info("model rollout: loading %s (%s)", self.settings.model, bundle)
        try:
            candidate = await asyncio.get_running_loop().run_in_executor(
                self._loader,
                load_recommender,
                self.settings.model_copy(update={"model": bundle}),
            )
        except Exception as exc:  # whatever is wrong with the bundle, the old model serves on
            self._failed = (stamp, time.monotonic())
            metrics.MODEL_ROLLOUT_FAILURES.inc()
            log.error(
                "model rollout failed, still serving %s (tried again when the bundle changes"
                " or in %.0f s): %s",
                self.current.model_version,
                RETRY_FAILED_SECONDS,
                exc,
                exc_info=not isinstance(exc, UserError),  # an unexpected one: its traceback
            )
            return
        self._failed = None
        self._stamp = stamp
        if candidate.model_version == self.current.model_version:  # e.g. a rollback in time
            log.info("model rollout: %s is the version serving already", candidate.model_version)
            return
        self._loaded = candidate
        log.warning(
            "model rollout: %s loaded; it serves from the next batch", candidate.model_version
        )

    def close(self) -> None:
        """Stop loading (shutdown): a load under way finishes in its thread, unused."""
        self._loader.shutdown(wait=False, cancel_futures=True)
