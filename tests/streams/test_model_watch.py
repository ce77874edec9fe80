"""ModelWatcher: a rolled-out bundle loads beside the serving model and swaps in between
batches. The loader is replaced by a fake (pure logic); the end-to-end rollout on the real
broker and Redis is tests/streams/test_encoder_stream.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

import streams.model_watch as model_watch
from common.errors import UserError
from streams.model_watch import ModelWatcher
from streams.recommend import Recommender
from streams.settings import Settings


def recommender(version: str) -> Recommender:
    return cast(Recommender, SimpleNamespace(model_version=version))


def bundle_dir(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "a"}')
    return bundle


def roll_out(bundle: Path, version: str) -> None:
    """A new manifest in place (another inode, as a copy-and-rename leaves it)."""
    new = bundle / "manifest.json.new"
    new.write_text(f'{{"version": "{version}", "padding": "{version * 10}"}}')
    new.replace(bundle / "manifest.json")


def loader(outcomes: list[Exception | Recommender]) -> Callable[[Settings], Recommender]:
    """A load_recommender that gives (or raises) the outcomes in turn."""

    def load(settings: Settings) -> Recommender:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return load


def test_serves_the_old_model_while_the_new_one_loads_then_swaps_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = bundle_dir(tmp_path)
    release = threading.Event()
    calls: list[Path] = []

    def slow_load(settings: Settings) -> Recommender:
        calls.append(settings.model)
        assert release.wait(10)
        return recommender("b")

    monkeypatch.setattr(model_watch, "load_recommender", slow_load)
    watcher = ModelWatcher(Settings(model=bundle), recommender("a"))

    async def scenario() -> None:
        await watcher.check()  # manifest unchanged: nothing to load
        assert calls == []
        roll_out(bundle, "b")
        loading = asyncio.create_task(watcher.check())
        for _ in range(5):  # batches go on, on the old model, while B loads
            await asyncio.sleep(0.01)
            assert watcher.refresh().model_version == "a"
        release.set()
        await loading
        assert watcher.refresh().model_version == "b"
        assert watcher.refresh().model_version == "b"
        await watcher.check()  # the same manifest again: not loaded twice
        assert len(calls) == 1

    asyncio.run(scenario())


def test_a_bundle_that_fails_to_load_keeps_the_old_model_and_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = bundle_dir(tmp_path)
    outcomes: list[Exception | Recommender] = [
        UserError("incomplete bundle, step.onnx is missing"),  # caught mid-copy
        RuntimeError("an unexpected failure"),
        recommender("b"),
    ]

    monkeypatch.setattr(model_watch, "load_recommender", loader(outcomes))
    watcher = ModelWatcher(Settings(model=bundle), recommender("a"))
    roll_out(bundle, "b")

    async def scenario() -> None:
        await watcher.check()  # fails
        await watcher.check()  # the same bundle, too soon: not loaded again
        assert len(outcomes) == 2
        assert watcher.refresh().model_version == "a"
        monkeypatch.setattr(model_watch, "RETRY_FAILED_SECONDS", 0.0)
        await watcher.check()  # the retry after the back-off fails unexpectedly
        assert watcher.refresh().model_version == "a"
        roll_out(bundle, "b")  # changed again: tried at once
        monkeypatch.setattr(model_watch, "RETRY_FAILED_SECONDS", 3600.0)
        await watcher.check()
        assert watcher.refresh().model_version == "b"

    asyncio.run(scenario())
    assert outcomes == []


def test_a_loaded_bundle_superseded_before_it_served_is_never_swapped_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = bundle_dir(tmp_path)
    outcomes: list[Exception | Recommender] = [recommender("b"), UserError("bad bundle c")]

    monkeypatch.setattr(model_watch, "load_recommender", loader(outcomes))
    watcher = ModelWatcher(Settings(model=bundle), recommender("a"))

    async def scenario() -> None:
        roll_out(bundle, "b")
        await watcher.check()  # B loaded, but no batch came to swap it in
        roll_out(bundle, "c")  # the operator moves on (or back) before that
        await watcher.check()  # C fails to load
        assert watcher.refresh().model_version == "a"  # not B: the path no longer names it

    asyncio.run(scenario())


def test_a_symlink_switched_during_a_load_is_loaded_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each load reads one bundle: the one the path resolved to when the check began."""
    bundles = {}
    for name in ("a", "b", "c"):
        bundles[name] = tmp_path / name
        bundles[name].mkdir()
        (bundles[name] / "manifest.json").write_text(f'{{"version": "{name}"}}')
    current = tmp_path / "current"
    current.symlink_to(bundles["a"])
    loaded_from: list[Path] = []

    def load(settings: Settings) -> Recommender:
        assert settings.model is not None
        loaded_from.append(settings.model)
        if len(loaded_from) == 1:  # the operator switches again while B loads
            switch = tmp_path / "current.new"
            switch.symlink_to(bundles["c"])
            switch.replace(current)
        return recommender(settings.model.name)

    monkeypatch.setattr(model_watch, "load_recommender", load)
    watcher = ModelWatcher(Settings(model=current), recommender("a"))

    async def scenario() -> None:
        switch = tmp_path / "current.new"
        switch.symlink_to(bundles["b"])
        switch.replace(current)
        await watcher.check()
        assert watcher.refresh().model_version == "b"
        await watcher.check()  # the switch made during the load
        assert watcher.refresh().model_version == "c"

    asyncio.run(scenario())
    assert loaded_from == [bundles["b"].resolve(), bundles["c"].resolve()]


def test_the_watch_survives_a_failing_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = ModelWatcher(
        Settings(model=bundle_dir(tmp_path), model_poll_seconds=0.01), recommender("a")
    )
    checks = 0

    async def flaky_check() -> None:
        nonlocal checks
        checks += 1
        raise OSError("the filesystem went away for a moment")

    monkeypatch.setattr(watcher, "check", flaky_check)

    async def scenario() -> None:
        watching = asyncio.create_task(watcher.watch())
        await asyncio.sleep(0.2)
        assert not watching.done()
        watching.cancel()

    asyncio.run(scenario())
    assert checks > 1
    watcher.close()


def test_without_a_model_there_is_nothing_to_watch() -> None:
    watcher = ModelWatcher(Settings(model=None), recommender("popularity"))
    asyncio.run(asyncio.wait_for(watcher.watch(), 1))  # returns at once
    assert watcher.refresh().model_version == "popularity"


def test_the_loaded_recommender_carries_the_workers_settings(tmp_path: Path) -> None:
    """The settings that change what the encoder recommends reach it from the environment
    the worker reads (a setting parsed but never passed on would change nothing)."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from streams.encoder_recommender import EncoderRecommender
    from tests.streams.test_encoder_stream import make_bundle

    _, bundle = make_bundle(tmp_path, seed=3)
    settings = Settings(model=bundle, exclude_seen_types="purchase", explain=True)
    loaded = model_watch.load_recommender(settings)
    assert isinstance(loaded, EncoderRecommender)
    assert loaded.exclude_seen_types == frozenset({"purchase"})
    assert loaded.explain_events == settings.explain_events
    plain = model_watch.load_recommender(Settings(model=bundle))
    assert isinstance(plain, EncoderRecommender) and plain.exclude_seen_types is None
