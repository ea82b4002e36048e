"""The ``fusechat-merge`` command line: read → validate → call (no logic of its own)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from mergekit.options import MergeOptions, add_merge_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fusechat-merge")
def main() -> None:
    """FuseChat knowledge fusion and SCE merging of chat LLMs."""


@main.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write fusechat_sce's per-tensor coefficients, selected and erased fractions "
    "(sce_report.csv) to this directory.",
)
@click.option(
    "--check-only",
    is_flag=True,
    help="Check the recipe (keys, method, parameters, model paths) and exit.",
)
@add_merge_options
def merge_command(
    merge_options: MergeOptions,
    recipe: Path,
    out_dir: Path,
    report_dir: Path | None,
    check_only: bool,
) -> None:
    """Merge the models of RECIPE (a mergekit YAML) into OUT_DIR.

    Takes every option of mergekit-yaml. Unlike mergekit-yaml, the recipe is checked
    before any model is loaded (unknown keys, method and parameters, per-model
    parameters mergekit would ignore, missing model paths, mismatched vocabularies),
    and OUT_DIR appears only once the merge is complete.
    """
    from fusechat_merge.merging import run_merge_checked
    from fusechat_merge.recipe_check import RecipeError, load_recipe, validate_recipe
    from fusechat_merge.report import write_sce_report
    from fusechat_merge.stats_sink import record_stats

    try:
        raw, text = load_recipe(recipe)
        validate_recipe(raw, str(recipe))
    except RecipeError as err:
        raise click.ClickException(str(err)) from err
    if check_only:
        click.echo(f"{recipe}: OK")
        return
    merge_options.apply_global_options()
    if report_dir is None:
        out = run_merge_checked(raw, out_dir, merge_options, config_source=text, source_name=str(recipe))
    else:
        with record_stats.collecting() as rows:
            out = run_merge_checked(
                raw, out_dir, merge_options, config_source=text, source_name=str(recipe)
            )
        csv_path = write_sce_report(rows, report_dir)
        click.echo(f"SCE report: {csv_path}")
    click.echo(f"merged model: {out}")


@main.command("logits")
@click.option("--model", required=True, help="Model directory (or hub id) to score the corpus with.")
@click.option(
    "--data",
    required=True,
    help="Conversations: a local .json/.jsonl/.parquet file or directory, or a hub dataset "
    "name. Rows hold `conversations: [{from, value}]` (FuseChat-Mixture) or "
    "`messages: [{role, content}]`.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store directory.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="hf: transformers, any device. vllm: vllm.LLM with prompt_logprobs (CUDA).")
@click.option("--top-k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Entries kept per position (K).")
@click.option("--max-length", type=click.IntRange(2), default=2048, show_default=True,
              help="Tokens per conversation; longer ones are truncated.")
@click.option("--template", type=click.Choice(["own", "shared"]), default="own", show_default=True,
              help="own: each model's chat template. shared: one role text for all models "
              "(FuseChat's OpenChat-style template), as the reference code does.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences per forward pass (length-sorted, padded per batch).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True, help="Model dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--device", default="auto", show_default=True, help="hf backend: auto, cpu or cuda[:N].")
@click.option("--shard", default="0/1", show_default=True,
              help="i/N: score only the i-th of N contiguous blocks of rows (one per machine or "
              "GPU); combine the stores with `fusechat-merge logits-merge`.")
@click.option("--rows-per-shard", type=click.IntRange(1), default=1024, show_default=True,
              help="Sequences per store file; the unit of resumption.")
@click.option("--strict", is_flag=True, help="Fail on the first malformed row instead of skipping it.")
@click.option("--tensor-parallel-size", type=click.IntRange(1), default=1, show_default=True,
              help="vllm backend: GPUs per model.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 1.0), default=0.9,
              show_default=True, help="vllm backend: fraction of GPU memory vLLM may take.")
@click.option("--cache-dir", default=None, help="datasets cache directory.")
def logits_command(**kwargs) -> None:
    """Score a conversation corpus with one model and store its top-K next-token
    log-probabilities at every trained (assistant) position.

    The store is written shard by shard; if the run is interrupted, run the same command
    again to resume. Example:

      fusechat-merge logits --model ./pivot --data chats.jsonl --out stores/pivot
    """
    from fusion.logits import LogitJob, generate_logits
    from fusion.store import StoreError

    try:
        generate_logits(LogitJob(**kwargs), log=click.echo)
    except (StoreError, ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err


@main.command("logits-merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged store directory.")
def logits_merge_command(parts: tuple[str, ...], out: str) -> None:
    """Combine the stores of `logits --shard i/N` runs (give them in order 0..N-1)."""
    from fusion.store import StoreError, merge_stores

    try:
        manifest = merge_stores(parts, out)
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{out}: {manifest.sequences} sequences, {manifest.tokens:,} tokens")


@main.command("align")
@click.option("--pivot", required=True, type=click.Path(file_okay=False), help="The pivot's logit store.")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="A source's logit store (same corpus).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Aligned store directory.")
@click.option("--method", type=click.Choice(["offsets", "dtw"]), default="offsets", show_default=True,
              help="offsets: exact, from the stored character spans. dtw: the paper's edit-distance "
              "DTW over token strings.")
@click.option("--vocab-map", type=click.Path(dir_okay=False), default=None,
              help="A saved source→pivot vocabulary map (refused if made for other tokenizers); "
              "by default one is built from this corpus and saved in OUT.")
@click.option("--vocab-mode", type=click.Choice(["ms", "em", "mined"]), default="ms", show_default=True,
              help="ms: mapping statistics (FuseChat). em: exact match. mined: minimum edit distance.")
def align_command(**kwargs) -> None:
    """Map a source model's top-K distributions onto the pivot's positions and vocabulary.

    Writes the pivot's store plus the aligned source distribution per position; sources
    with the pivot's tokenizer are copied through without alignment. Resumable.
    """
    from fusion.align_job import AlignJob, align_stores
    from fusion.store import StoreError

    try:
        align_stores(AlignJob(**kwargs), log=click.echo)
    except (StoreError, ValueError) as err:
        raise click.ClickException(str(err)) from err


@main.command("demo")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-work"),
    show_default=True,
    help="Where the tiny models, the recipe and the merged model are written.",
)
@click.option("--select-topk", type=float, default=0.1, show_default=True, help="SCE τ.")
def demo_command(work_dir: Path, select_topk: float) -> None:
    """Build three tiny random models locally and merge them with fusechat_sce.

    Nothing is downloaded: a tokenizer is trained on a built-in corpus, a tiny Llama
    pivot is initialised at random, and two "targets" are the pivot plus noise.
    """
    from fusechat_merge.demo import run_demo

    run_demo(work_dir, select_topk=select_topk, echo=click.echo)


if __name__ == "__main__":
    sys.exit(main())
