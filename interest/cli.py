"""`interest`: one command line for the dev stack, the worker, pushing, training and export.

Commands import their implementation lazily so `interest push` never pays for torch and the
worker never imports the training stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.errors import UserError

if TYPE_CHECKING:
    from export.runtime import EncoderRuntime
    from streams.settings import Settings
    from streams.store import StoredUser

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _settings() -> Settings:
    from pydantic import ValidationError

    from streams.settings import load_settings

    try:
        return load_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise UserError(f"bad setting {where!r}: {first['msg']}") from None


@app.command()
def up(
    kafka_port: Annotated[int, typer.Option(help="broker port; 0 picks a free one")] = 0,
    redis_port: Annotated[int, typer.Option(help="Redis port; 0 picks a free one")] = 0,
    redis_cluster: Annotated[
        bool, typer.Option(help="a local three-master Redis Cluster instead of one Redis")
    ] = False,
) -> None:
    """Start the embedded dev stack (Tansu broker + Redis on loopback) in the background."""
    from streams.stack import start_stack
    from streams.topics import ensure_topics

    settings = _settings()
    info = start_stack(
        settings.home, kafka_port=kafka_port, redis_port=redis_port, redis_cluster=redis_cluster
    )
    ensure_topics(_settings())
    print(f"bootstrap_servers={info.bootstrap_servers}")
    print(f"redis_url={info.redis_url}")
    if redis_cluster:
        print("redis_cluster=true")
    print(f"written to {settings.stack_file}; stop with `interest down`", file=sys.stderr)


@app.command()
def down() -> None:
    """Stop the embedded dev stack started by `interest up`."""
    from streams.stack import stop_stack

    info = stop_stack(_settings().home)
    print("stopped" if info else "no stack was running", file=sys.stderr)


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="synthetic users")] = 20,
    events_per_user: Annotated[int, typer.Option(help="events per user")] = 10,
) -> None:
    """Run everything on a private embedded stack: worker, sample events, recommendations."""
    from streams.demo import run_demo

    run_demo(users=users, events_per_user=events_per_user)


@app.command()
def worker(
    processes: Annotated[
        int,
        typer.Option(
            help="worker processes in the group (each takes a share of the input partitions; "
            "a dead one is restarted); at most one per core and per partition pays"
        ),
    ] = 1,
) -> None:
    """Run the Faust worker (consumer group INTEREST_GROUP_ID) until Ctrl-C or SIGTERM."""
    _at_least_one(processes, "--processes")
    settings = _settings()
    if processes == 1:  # this process is the worker, no supervisor
        from streams.worker import run_worker

        run_worker(settings)
        return
    from streams.processes import run_workers

    run_workers(settings, processes)


@app.command()
def serve() -> None:
    """Run the HTTP ingest endpoint (POST /events)."""
    from streams.http import run_http

    run_http(_settings())


@app.command()
def push(
    file: Annotated[str, typer.Argument(help="JSONL file of events, or - for stdin")] = "-",
) -> None:
    """Send JSONL events (one per line) to the input topics, keyed by user_id."""
    from tqdm import tqdm

    from streams.client import InterestClient

    if file == "-":
        stream = sys.stdin.buffer
        total = None
    else:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"no such file: {file}")
        stream = path.open("rb")
        total = path.stat().st_size
    with InterestClient(_settings()) as client, stream:
        progress = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            disable=total is None or total < 1_000_000,
            file=sys.stderr,
        )
        sent = 0
        batch: list[bytes] = []
        try:
            for line in stream:
                progress.update(len(line))
                line = line.strip()
                if line:
                    batch.append(line)
                if len(batch) >= 5000:
                    sent += client.push(batch)
                    batch.clear()
            sent += client.push(batch)
        except ValueError as exc:  # a control record: nothing of its batch was sent
            raise UserError(f"{exc} (after {sent} events were pushed)") from None
        progress.close()
    print(f"pushed {sent} events", file=sys.stderr)


@app.command()
def subscribe(
    user: Annotated[str | None, typer.Option(help="only this user's recommendations")] = None,
    limit: Annotated[int | None, typer.Option(help="stop after N events")] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after S seconds")] = None,
    from_beginning: Annotated[bool, typer.Option(help="replay the topic from the start")] = False,
) -> None:
    """Print recommendation events as JSONL."""
    from streams.client import InterestClient

    with InterestClient(_settings()) as client:
        for event in client.subscribe(user, limit, timeout, from_beginning):
            print(json.dumps(event), flush=True)


@app.command()
def forget(
    user: Annotated[str, typer.Option(help="user id")],
    forget_id: Annotated[
        str | None, typer.Option(help="retry a request: the forget_id it printed")
    ] = None,
) -> None:
    """Ask the worker to forget a user (in order with their events); prints {"forget_id": ...}
    once the broker acknowledged the request. An unknown user is not an error."""
    from streams.client import ForgetNotAcknowledged, InterestClient

    with InterestClient(_settings()) as client:
        try:
            sent = client.forget(user, forget_id)
        except (ValueError, ForgetNotAcknowledged) as exc:
            raise UserError(str(exc)) from None
    print(json.dumps({"forget_id": sent}))


def _read_user(settings: Settings, user: str) -> StoredUser | None:
    """One user's state as Redis holds it now."""
    import asyncio

    from streams.redis_client import connect
    from streams.store import StateStore

    async def read() -> StoredUser | None:
        client = connect(settings)
        try:
            return await StateStore(client, settings).read_user(user)
        finally:
            await client.aclose()

    from redis.exceptions import RedisError

    try:
        return asyncio.run(read())
    except (RedisError, OSError) as exc:
        raise UserError(
            f"cannot read Redis at {settings.redis_url} ({type(exc).__name__})"
        ) from None


@app.command()
def inspect(user: Annotated[str, typer.Option(help="user id")]) -> None:
    """Print one user's state (window oldest first, model version, update time) as JSON."""
    stored = _read_user(_settings(), user)
    if stored is None:
        raise UserError(f"no state for user {user!r}")
    state = {
        "user_id": user,
        "window": [entry.to_json() for entry in stored.state.window],
        "offsets": stored.state.offsets,
        "model_version": stored.model_version,
        "has_vector": stored.vector is not None,
        "updated_at": stored.updated_ms,
    }
    print(json.dumps(state))


@app.command()
def explain(
    user: Annotated[str, typer.Option(help="user id")],
    item: Annotated[
        str | None, typer.Option(help="explain this item (default: the --k the model ranks first)")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="how many recommended items to explain")] = 10,
    top: Annotated[int, typer.Option(help="events shown per item")] = 3,
    titles: Annotated[
        Path | None,
        typer.Option(
            help="item catalogue: MovieLens movies.dat (id::title::genres) or id<TAB>title"
        ),
    ] = None,
    item_map: Annotated[
        Path | None,
        typer.Option(help="lines 'model_item_id catalogue_id' where the catalogue's ids differ"),
    ] = None,
) -> None:
    """Which events of a user's window drove each recommendation, weighed by the model
    (INTEREST_MODEL) itself: how much the item's score drops without the event. Times in UTC."""
    from streams.explain import explain_user
    from streams.titles import load_titles, render_explanations

    settings = _settings()
    if settings.model is None:
        raise UserError("interest explain needs a model: set INTEREST_MODEL to a bundle directory")
    _at_least_one(k, "--k")
    _at_least_one(top, "--top")
    if item_map is not None and titles is None:
        raise UserError("--item-map maps ids to a catalogue's: give the catalogue with --titles")
    names = load_titles(titles, item_map) if titles is not None else {}
    stored = _read_user(settings, user)
    explained = explain_user(_runtime(settings.model), user, stored, item, k, top)
    window = stored.state.window if stored is not None else []
    print(render_explanations(explained, window, names, item))


def _runtime(bundle: Path) -> EncoderRuntime:
    from export.runtime import BundleError, EncoderRuntime

    try:
        return EncoderRuntime.load(bundle)
    except (BundleError, OSError) as exc:
        raise UserError(f"cannot load INTEREST_MODEL={bundle}: {exc}") from None


def _at_least_one(value: int, name: str) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1, not {value}")


@app.command()
def stats() -> None:
    """Live quality per model version: how often an event was in the recommendation before it."""
    import asyncio

    from streams.redis_client import connect
    from streams.store import StateStore

    settings = _settings()

    async def read() -> dict[str, int]:
        client = connect(settings)
        try:
            return await StateStore(client, settings).online_counters()
        finally:
            await client.aclose()

    counters = asyncio.run(read())
    versions = sorted({name.split(":", 1)[1] for name in counters})
    rows = {}
    for version in versions:
        events = counters.get(f"events:{version}", 0)
        hits = counters.get(f"hits:{version}", 0)
        rate = round(hits / events, 4) if events else None
        rows[version] = {"events": events, "hits": hits, f"hit_rate@{settings.top_k}": rate}
    print(json.dumps(rows))


@app.command()
def lag(
    watch: Annotated[bool, typer.Option(help="redraw every interval until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between readings (--watch)")] = 2.0,
    group: Annotated[
        list[str] | None, typer.Option(help="consumer group (repeatable; default: the worker's)")
    ] = None,
) -> None:
    """Committed offset, end offset and lag per input topic/partition of the worker group;
    with --watch also lag in time, partition status, rates, latency and models, as
    `interest monitor` shows them."""
    from rich.console import Console
    from rich.table import Table

    from streams.lag import consumer_lag

    settings = _settings()
    groups = group or [settings.group_id]
    if watch:
        from streams.monitor.terminal import watch as watch_lag

        watch_lag(settings, groups, _positive(interval, "--interval"))
        return
    for name in groups:
        table = Table("topic", "partition", "committed", "end", "lag", title=name)
        rows = consumer_lag(settings.model_copy(update={"group_id": name}))
        for row in rows:
            committed = "-" if row.committed is None else str(row.committed)
            table.add_row(row.topic, str(row.partition), committed, str(row.end), str(row.lag))
        table.add_section()
        table.add_row("total", "", "", "", str(sum(row.lag for row in rows)))
        Console().print(table)


@app.command()
def monitor(
    host: Annotated[str, typer.Option(help="address to serve on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to serve on")] = 8089,
    interval: Annotated[float, typer.Option(help="seconds between snapshots")] = 2.0,
    group: Annotated[
        list[str] | None, typer.Option(help="consumer group (repeatable; default: the worker's)")
    ] = None,
) -> None:
    """The live operations page (lag, partition status, rates, latency, models) and its
    Prometheus metrics, at http://HOST:PORT/."""
    from streams.monitor.server import run_monitor

    settings = _settings()
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {port}")
    run_monitor(
        settings, group or [settings.group_id], host, port, _positive(interval, "--interval")
    )


def _positive(value: float, name: str) -> float:
    if not value > 0:
        raise UserError(f"{name} must be more than 0, not {value}")
    return value


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="SASRec txt, event JSONL or CSV")],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    epochs: Annotated[int | None, typer.Option(help="maximum epochs")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="training time budget")] = None,
    exclude_seen_types: Annotated[
        str | None,
        typer.Option(help="validation's seen-items rule (default INTEREST_EXCLUDE_SEEN_TYPES)"),
    ] = None,
) -> None:
    """Train the interest encoder on a behaviour log."""
    from encoder.train import train as run_train

    rule = _seen_types(exclude_seen_types)
    summary = run_train(
        data=data, out=out, epochs=epochs, max_minutes=max_minutes, exclude_seen_types=rule
    )
    print(json.dumps(summary, sort_keys=True))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="model directory written by `interest train`")],
    data: Annotated[Path, typer.Option(help="SASRec txt, event JSONL or CSV")],
    popularity_penalty: Annotated[
        float, typer.Option(help="re-rank as INTEREST_POPULARITY_PENALTY does (0: off)")
    ] = 0.0,
    report: Annotated[
        Path | None,
        typer.Option(help="also write who-is-served-well: report.html, report.json, PNGs"),
    ] = None,
    penalties: Annotated[
        str | None,
        typer.Option(help="the report's trade-off curve: penalties, comma-separated"),
    ] = None,
    users: Annotated[
        Path | None, typer.Option(help="MovieLens users.dat: gender and age groups in the report")
    ] = None,
    user_map: Annotated[
        Path | None, typer.Option(help="`data_user_id users_dat_id` per line, when ids differ")
    ] = None,
    exclude_seen_types: Annotated[
        str | None,
        typer.Option(help="seen items of these types are not ranked (default: the setting)"),
    ] = None,
) -> None:
    """Full-ranking leave-one-out metrics as one JSON object; with --report, the model and
    the popularity baseline side by side on accuracy, exposure and user groups."""
    from encoder.evaluate import evaluate as run_evaluate

    if report is None:
        if users is not None or user_map is not None:
            raise UserError("--users and --user-map are read by --report only")
        result = run_evaluate(
            model_dir=model,
            data=data,
            popularity_penalty=popularity_penalty,
            exclude_seen_types=_seen_types(exclude_seen_types),
        )
        print(json.dumps(result, sort_keys=True))
        return
    from encoder.report import PENALTIES, build_report
    from encoder.report_page import write_report_page

    curve = PENALTIES if penalties is None else _floats(penalties, "--penalties")
    numbers = build_report(
        model, data, popularity_penalty, curve, users, user_map, _seen_types(exclude_seen_types)
    )
    page = write_report_page(numbers, report)
    print(json.dumps({**_flat(numbers["systems"]["model"]), "report": str(page)}, sort_keys=True))


def _seen_types(value: str | None) -> tuple[str, ...]:
    """--exclude-seen-types, else INTEREST_EXCLUDE_SEEN_TYPES: the rule the worker applies."""
    from encoder.features import parse_event_types

    if value is None:
        return tuple(_settings().exclude_seen_types)
    try:
        return tuple(parse_event_types(value))
    except ValueError as exc:
        raise UserError(f"--exclude-seen-types: {exc}") from None


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{name} takes numbers separated by commas, not {text!r}") from None


def _flat(system: dict[str, dict[str, object]]) -> dict[str, object]:
    return {key: value for part in system.values() for key, value in part.items()}


@app.command("export")
def export_(
    model: Annotated[Path, typer.Option(help="model directory written by `interest train`")],
    out: Annotated[Path, typer.Option(help="bundle directory to write")],
) -> None:
    """Write the ONNX bundle the worker loads (INTEREST_MODEL)."""
    from export.bundle import export_bundle

    print(export_bundle(model_dir=model, out=out))


@app.command("catalogue")
def catalogue_(
    catalogue: Annotated[
        Path,
        typer.Option(
            help="items and their text: JSONL {item_id, text, ...}, MovieLens movies.dat or "
            "item_id<TAB>text"
        ),
    ],
    out: Annotated[Path, typer.Option(help="content vectors file to write (INTEREST_CATALOGUE)")],
    item_map: Annotated[
        Path | None,
        typer.Option(help="lines 'log_item_id catalogue_id' where the catalogue's ids differ"),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="model directory: fit its content map (then `interest export` it)"),
    ] = None,
) -> None:
    """Embed every catalogue item's text with the packaged sentence model; with --model, fit
    the map from content to that model's item space, so items it never saw can be ranked."""
    from encoder.catalogue_build import build_catalogue

    summary = build_catalogue(catalogue, out, item_map, model)
    print(json.dumps(summary, sort_keys=True))


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
