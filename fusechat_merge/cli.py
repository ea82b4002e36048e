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
