"""`datagen`: turn image sets into training shards. Thin: parse, call one function, print."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """Turn image sets into WebDataset shards for pre-training and fine-tuning."""


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A shard (.tar), a directory of shards, or a glob."),
    preview: Path | None = typer.Option(None, "--preview", help="Write a contact sheet PNG here."),
    samples: int = typer.Option(4, help="Samples in the preview."),
    limit: int | None = typer.Option(None, help="Read at most this many samples."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the summary as JSON."),
) -> None:
    """Sample count, members, value ranges, LiDAR density and K of shards; optional preview."""
    import json

    from shared.inspect import format_summary, summarize
    from shared.inspect import preview as write_preview

    try:
        summary, kept = summarize(str(path), limit=limit, keep=samples if preview else 0)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_summary(summary))
    if json_out:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))
    if preview:
        write_preview(kept, str(preview))
        typer.echo(f"preview written to {preview}")


if __name__ == "__main__":
    app()
