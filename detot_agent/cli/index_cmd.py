"""`detot index build` and `detot index search`: FAISS exemplar indexes from the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from detot_agent.cli.common import console, load_index
from detot_agent.errors import ConfigError

__all__ = ["index_app"]

index_app = typer.Typer(help="Build and search FAISS exemplar indexes.", no_args_is_help=True)


@index_app.command("build")
def index_build(
    data: Annotated[Path, typer.Option(help="Data file (GSM8K JSONL, MultiArith JSON, or JSONL).")],
    out: Annotated[Path, typer.Option(help="Directory to write the index to (replaced atomically).")],
    fmt: Annotated[str | None, typer.Option("--format", help="gsm8k, multiarith or jsonl; default: detect.")] = None,
    text_field: Annotated[str, typer.Option(help="(jsonl) field to embed.")] = "question",
    answer_field: Annotated[str, typer.Option(help="(jsonl) field holding the answer.")] = "answer",
    id_field: Annotated[str | None, typer.Option(help="(jsonl) field holding a stable id.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.", min=1)] = None,
    encoder: Annotated[str | None, typer.Option(help="sentence-transformers name or path.")] = None,
) -> None:
    """Embed a data file's problems and save them as an exemplar index."""
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    records = read_exemplars(data, fmt=fmt, text_field=text_field, answer_field=answer_field, id_field=id_field)
    records = records[:limit] if limit else records
    start = time.perf_counter()
    index = ExemplarIndex(Encoder(encoder))
    index.add(records)
    index.save(out)
    stats = index.stats()
    console.print(f"indexed {stats['count']} records from {data} in {time.perf_counter() - start:.1f}s: "
                  f"{stats['index_type']} index, encoder {stats['encoder']} ({stats['dim']} dims) -> {out}")


@index_app.command("search")
def index_search(
    index_dir: Annotated[Path, typer.Argument(help="Directory written by `detot index build`.")],
    query: Annotated[str, typer.Argument(help="Query text.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Results to show.", min=1)] = 5,
    task: Annotated[str | None, typer.Option(help="A saved task embedding directory, or a task description.")] = None,
    mmr: Annotated[float | None, typer.Option(help="MMR lambda for diverse results (1 = relevance only).")] = None,
    where: Annotated[list[str] | None, typer.Option(help="Field filter FIELD=VALUE (repeatable).")] = None,
) -> None:
    """Search an exemplar index (optionally through a task embedding)."""
    from detot_agent.embedding.task_embedding import TaskEmbedding

    if not query.strip():
        raise ConfigError("the query is empty; pass the text to search for")
    index = load_index(index_dir)
    enc = index.encoder
    vec = enc.encode([query])[0]
    if task:
        te = (TaskEmbedding.load(task, encoder_name=enc.name) if Path(task).is_dir()
              else TaskEmbedding.from_description("cli", task, encoder=enc))
        vec = te.query(vec)
    filters = dict(item.split("=", 1) for item in (where or []) if "=" in item)
    hits = index.search(vec, min(k, len(index)), mmr=mmr, where=filters or None)
    # similarity is always the cosine to the query; with --mmr the order (and its score) also rewards
    # being unlike the hits above, shown apart so a diverse pick does not read as a poor match
    sims = index.vectors([h.id for h in hits]) @ vec if hits else []
    table = Table(title=f"top {len(hits)} of {len(index)} for {query!r}"
                        + (f" (MMR, lambda {mmr}: ordered by relevance and diversity)" if mmr is not None else ""))
    for col in ("rank", "id", "similarity", *(["mmr score"] if mmr is not None else []), "text"):
        table.add_column(col)
    for rank, (h, sim) in enumerate(zip(hits, sims, strict=True), 1):
        table.add_row(str(rank), h.id, f"{float(sim):.3f}", *([f"{h.score:.3f}"] if mmr is not None else []),
                      h.text[:100])
    console.print(table)
