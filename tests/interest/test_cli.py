"""The `interest` command line as users run it, against the real embedded stack."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from common.errors import UserError
from streams.client import InterestClient
from streams.settings import Settings
from streams.stack import StackInfo, _pid_alive
from streams.titles import load_titles, render_explanations
from tests.conftest import WorkerProcess, interest, read_records, wait_for
from tests.streams.test_http import explained_here, history, store_user


def test_up_prints_addresses_records_them_and_down_leaves_no_process(tmp_path: Path) -> None:
    env = {"INTEREST_HOME": str(tmp_path)}
    up = interest("up", env=env)
    assert up.returncode == 0, up.stderr.decode()
    lines = dict(line.split("=", 1) for line in up.stdout.decode().split())
    info = StackInfo.read(tmp_path / "stack.json")
    assert info is not None
    assert lines == {"bootstrap_servers": info.bootstrap_servers, "redis_url": info.redis_url}
    assert _pid_alive(info.broker_pid) and _pid_alive(info.redis_pid)

    again = interest("up", env=env)
    assert again.returncode == 2
    assert b"already running" in again.stderr and b"Traceback" not in again.stderr

    down = interest("down", env=env)
    assert down.returncode == 0
    assert not (tmp_path / "stack.json").exists()
    wait_for(
        lambda: not _pid_alive(info.broker_pid) and not _pid_alive(info.redis_pid),
        timeout=10,
        what="stack processes to exit",
    )


def test_up_on_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = interest("up", "--kafka-port", str(port), env={"INTEREST_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.decode().strip() == (
        f"error: port {port} for the broker is in use; choose another or pass 0"
    )


def test_bad_setting_and_missing_file_are_one_line_errors(service_env: dict[str, str]) -> None:
    bad = interest("lag", env={"INTEREST_WINDOW_LENGTH": "zero"})
    assert bad.returncode == 2
    assert bad.stderr.decode().startswith("error: bad setting 'window_length'")
    missing = interest("push", "/no/such/file.jsonl")
    assert missing.returncode == 2
    assert missing.stderr.decode().strip() == "error: no such file: /no/such/file.jsonl"


def test_push_subscribe_inspect_and_lag(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    events = [
        {
            "event_id": f"e{i}",
            "user_id": "ana",
            "item_id": f"i{i}",
            "event_type": "click",
            "timestamp": 1_767_225_600_000 + i,
        }
        for i in range(3)
    ] + [
        {
            "event_id": "b1",
            "user_id": "bo",
            "item_id": "i0",
            "event_type": "purchase",
            "timestamp": "2026-01-01T00:00:00Z",
        }
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    pushed = interest("push", str(path))
    assert pushed.returncode == 0, pushed.stderr.decode()
    assert b"pushed 4 events" in pushed.stderr

    start_worker()
    sub = interest(
        "subscribe",
        "--user",
        "ana",
        "--limit",
        "3",
        "--timeout",
        "60",
        "--from-beginning",
        timeout=90,
    )
    assert sub.returncode == 0, sub.stderr.decode()
    recs = [json.loads(line) for line in sub.stdout.decode().splitlines()]
    assert [r["trigger_event_id"] for r in recs] == ["e0", "e1", "e2"]
    assert all(r["user_id"] == "ana" for r in recs)

    state = json.loads(interest("inspect", "--user", "ana").stdout)
    assert [w["item_id"] for w in state["window"]] == ["i0", "i1", "i2"]
    assert state["updated_at"] > 0
    unknown = interest("inspect", "--user", "nobody")
    assert unknown.returncode == 2 and b"no state for user" in unknown.stderr

    def lag_is_zero() -> bool:
        out = interest("lag").stdout.decode()
        return "total" in out and re.findall(r"\d+", out.split("total")[1]) == ["0"]

    wait_for(lag_is_zero, timeout=30, what="committed offsets to catch up", interval=1)
    table = interest("lag").stdout.decode()
    assert settings.topic_clicks in table and settings.topic_purchases in table


def test_forget_prints_the_forget_id_and_sends_a_copy_per_input_topic(settings: Settings) -> None:
    with InterestClient(settings) as client:
        client.push(
            [
                {"user_id": "ana", "item_id": "i1", "event_type": kind, "timestamp": 1}
                for kind in ("click", "purchase")
            ]
        )
    first = interest("forget", "--user", "ana")
    assert first.returncode == 0, first.stderr.decode()
    forget_id = json.loads(first.stdout)["forget_id"]
    assert first.stdout.decode() == json.dumps({"forget_id": forget_id}) + "\n"
    retry = interest("forget", "--user", "ana", "--forget-id", forget_id)
    assert retry.returncode == 0, retry.stderr.decode()
    assert json.loads(retry.stdout) == {"forget_id": forget_id}

    for topic in settings.input_topics:
        records = read_records(settings, topic, 3)
        event, *forgets = sorted(records, key=lambda r: r.offset)
        assert [(r.key, r.partition) for r in forgets] == [(b"ana", event.partition)] * 2
        values = [json.loads(r.value) for r in forgets]
        assert [(v["control"], v["user_id"], v["forget_id"]) for v in values] == [
            ("forget", "ana", forget_id)
        ] * 2


def test_forget_with_a_bad_id_is_a_one_line_error_and_sends_nothing(settings: Settings) -> None:
    short = {"INTEREST_MAX_ID_LENGTH": "8"}
    cases = {
        ("--user", "  "): "error: user_id must not be empty",
        ("--user", "x" * 9): "error: user_id is longer than 8 characters",
        # An argument that is not UTF-8 arrives as a lone surrogate (surrogateescape).
        ("--user", "\udcff"): "error: user_id is not valid Unicode",
        ("--user", "ana", "--forget-id", ""): "error: forget_id must not be empty",
    }
    for args, message in cases.items():
        result = interest("forget", *args, env=short)
        assert (result.returncode, result.stderr.decode(), result.stdout) == (
            2,
            message + "\n",
            b"",
        ), args
    with InterestClient(settings) as client:
        client.forget("marker")  # once the marker is on the topics, anything sent would be too
    for topic in settings.input_topics:
        assert [r.key for r in read_records(settings, topic, 1)] == [b"marker"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported model over item-0 .. item-29 (tests/streams/test_encoder_stream.py)."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from tests.streams.test_encoder_stream import make_bundle

    return make_bundle(tmp_path_factory.mktemp("explain"), seed=4)[1]


def test_explain_prints_each_items_events_with_titles(
    settings: Settings, bundle: Path, tmp_path: Path
) -> None:
    window = history(6)
    store_user(settings, "ana", window)
    # A MovieLens catalogue (latin-1) under ids of its own, and the map from the model's ids.
    catalogue = tmp_path / "movies.dat"
    catalogue.write_bytes(
        "".join(f"{100 + i}::Café {i} ({1990 + i})::Drama\n" for i in range(30)).encode("latin-1")
    )
    item_map = tmp_path / "items.txt"
    item_map.write_text("".join(f"item-{i} {100 + i}\n" for i in range(30)))
    env = {"INTEREST_MODEL": str(bundle)}
    titles = load_titles(catalogue, item_map)

    shown = interest(
        "explain", "--user", "ana", "--k", "4", "--top", "2",
        "--titles", str(catalogue), "--item-map", str(item_map), env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr.decode()
    explained = explained_here(settings, bundle, "ana", None, 4, 2)
    text = shown.stdout.decode()
    assert text == render_explanations(explained, window, titles) + "\n"
    lines = text.splitlines()
    assert lines[0] == f"user ana, model {explained['model_version']}: top 4 now"
    number = int(explained["items"][0]["item_id"].removeprefix("item-"))
    assert lines[1].startswith(f"1. Café {number} ({1990 + number}) [item-{number}]  score ")
    assert re.fullmatch(
        r"     because: Café \d+ \(\d{4}\) \[item-\d+\] (clicked|viewed|purchased) "
        r"2026-01-01 00:0\d  [+-]\d\.\d{3}",
        lines[2],
    ), lines[2]

    one = interest("explain", "--user", "ana", "--item", "item-3", "--top", "1", env=env)
    assert one.returncode == 0, one.stderr.decode()
    explained = explained_here(settings, bundle, "ana", "item-3", 10, 1)
    assert one.stdout.decode() == render_explanations(explained, window, {}, "item-3") + "\n"


def test_explain_bad_input_is_a_one_line_error(
    settings: Settings, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTEREST_MODEL", raising=False)
    store_user(settings, "ana", history(3))
    with pytest.raises(UserError) as unknown_user:
        explained_here(settings, bundle, "nobody", None, 10, 3)
    model = {"INTEREST_MODEL": str(bundle)}
    cases = [
        (("--user", "nobody"), model, f"error: {unknown_user.value}"),
        (("--user", "ana", "--item", "nope"), model, "error: unknown item 'nope': the model "),
        (("--user", "ana"), {}, "error: interest explain needs a model: set INTEREST_MODEL"),
        (("--user", "ana", "--k", "0"), model, "error: --k must be at least 1, not 0"),
        (("--user", "ana", "--top", "-2"), model, "error: --top must be at least 1, not -2"),
        (("--user", "ana", "--item-map", "m.txt"), model, "error: --item-map maps ids"),
        (("--user", "ana", "--titles", str(tmp_path / "none")), model, "error: cannot read"),
        (
            ("--user", "ana"),
            {"INTEREST_MODEL": str(tmp_path)},
            f"error: cannot load INTEREST_MODEL={tmp_path}",
        ),
    ]
    for args, env, message in cases:
        result = interest("explain", *args, env=env)
        stderr = result.stderr.decode()
        assert result.returncode == 2, (args, stderr)
        assert stderr.startswith(message) and stderr.count("\n") == 1, (args, stderr)
        assert result.stdout == b"", args
