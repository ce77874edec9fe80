"""`interest`: one command line for the dev stack, the worker, pushing, training and export.

Commands import their implementation lazily so `interest push` never pays for torch and the
worker never imports the training stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from interest.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _settings():  # noqa: ANN202 - typed in streams.settings
    from pydantic import ValidationError

    from streams.settings import load_settings

    try:
        return load_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise UserError(f"bad setting {where!r}: {first['msg']}") from None


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="SASRec txt, event JSONL or CSV")],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    epochs: Annotated[int | None, typer.Option(help="maximum epochs")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="training time budget")] = None,
) -> None:
    """Train the interest encoder on a behaviour log."""
    from encoder.train import train as run_train

    summary = run_train(data=data, out=out, epochs=epochs, max_minutes=max_minutes)
    print(json.dumps(summary, sort_keys=True))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="model directory written by `interest train`")],
    data: Annotated[Path, typer.Option(help="SASRec txt, event JSONL or CSV")],
) -> None:
    """Full-ranking leave-one-out metrics as one JSON object."""
    from encoder.evaluate import evaluate as run_evaluate

    print(json.dumps(run_evaluate(model_dir=model, data=data), sort_keys=True))


@app.command("export")
def export_(
    model: Annotated[Path, typer.Option(help="model directory written by `interest train`")],
    out: Annotated[Path, typer.Option(help="bundle directory to write")],
) -> None:
    """Write the ONNX bundle the worker loads (INTEREST_MODEL)."""
    from export.bundle import export_bundle

    print(export_bundle(model_dir=model, out=out))


def main() -> None:
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
