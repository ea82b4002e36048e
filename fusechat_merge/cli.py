"""The ``fusechat-merge`` command line: read → validate → call (no logic of its own).

Start-up is cheap on purpose: at import only click, pydantic and the option dataclasses
load; every command imports its heavy parts (torch, transformers, mergekit) when it runs,
so ``--help`` answers at once. Options are generated from each stage's dataclass
(`fusechat_merge.option_forms`), the merge options from a checked static copy of
mergekit's (`fusechat_merge.mergekit_options`). Errors become messages and exit codes in
one place, `fusechat_merge.exit_codes`: a command only raises.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fusechat_merge.console import command_output, output_options, stopping_cleanly
from fusechat_merge.exit_codes import FusionGroup
from fusechat_merge.mergekit_options import add_mergekit_options
from fusechat_merge.option_forms import click_options
from fusechat_merge.pipeline_recipe import EXECUTORS, STAGES
from fusion.evaluate.lm_eval_options import LmEvalOptions
from fusion.options import OVERWRITE_HELP, AlignOptions, FusionSettings, LogitOptions

if TYPE_CHECKING:
    from mergekit.options import MergeOptions


@click.group(cls=FusionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fusechat-merge")
def main() -> None:
    """FuseChat knowledge fusion and SCE merging of chat LLMs."""


def overwrite_option(command):
    """``--overwrite``, the same for every writing command (logits and align get it from
    their option dataclasses with the same help)."""
    return click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)(command)


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
@overwrite_option
@add_mergekit_options
@output_options(short=False)
def merge_command(
    merge_options: MergeOptions,
    recipe: Path,
    out_dir: Path,
    report_dir: Path | None,
    check_only: bool,
    overwrite: bool,
    log_file: str | None,
    verbose: bool,
) -> None:
    """Merge the models of RECIPE (a mergekit YAML) into OUT_DIR.

    Takes every option of mergekit-yaml. Unlike mergekit-yaml, the recipe is checked
    before any model is loaded (unknown keys, method and parameters, per-model
    parameters mergekit would ignore, missing model paths, mismatched vocabularies),
    and OUT_DIR appears only once the merge is complete. A merge of the same recipe and
    models is left as it is; another recipe is refused naming what differs unless
    --overwrite (docs/outputs.md).
    """
    from fusechat_merge.merge_recipe import load_recipe, validate_recipe
    from fusechat_merge.merging import run_merge_checked
    from fusechat_merge.report.sce import write_sce_report
    from fusechat_merge.stats_sink import record_stats

    raw, text = load_recipe(recipe)
    if check_only:
        validate_recipe(raw, str(recipe), text=text)
        click.echo(f"{recipe}: OK")
        return
    from fusion.runtime.progress import bar

    merge_options.apply_global_options()
    verbose = verbose or merge_options.verbosity > 0
    with command_output("merge", out_dir, log_file, verbose), record_stats.collecting() as rows, bar(None, "merge"):
        out = run_merge_checked(raw, out_dir, merge_options, config_source=text, source_name=str(recipe),
                                overwrite=overwrite)
    if report_dir is not None:
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
@click_options(LogitOptions)
@output_options
def logits_command(log_file: str | None, verbose: bool, **kwargs: Any) -> None:
    """Score a conversation corpus with one model and store its top-K next-token
    log-probabilities at every trained (assistant) position.

    The store is written shard by shard; if the run is interrupted, run the same command
    again to resume. Example:

      fusechat-merge logits --model ./pivot --data chats.jsonl --out stores/pivot
    """
    from fusion.capture.logit_job import LogitJob, generate_logits
    from fusion.runtime.log_capture import echo

    with stopping_cleanly("Run the same command again to resume"), \
            command_output("logits", kwargs["out"], log_file, verbose):
        generate_logits(LogitJob(**kwargs), log=echo)


@main.command("logits-merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged store directory.")
@overwrite_option
def logits_merge_command(parts: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Combine the stores of `logits --shard i/N` runs (give them in order 0..N-1).

    A store combined from the same parts is left as it is; other parts are refused naming
    what differs unless --overwrite (docs/outputs.md)."""
    from fusion.artifacts.logit_store import merge_stores

    manifest = merge_stores(parts, out, overwrite=overwrite)
    click.echo(f"{out}: {manifest.sequences} sequences, {manifest.tokens:,} tokens")


@main.command("align")
@click.option("--pivot", required=True, type=click.Path(file_okay=False), help="The pivot's logit store.")
@click.option("--source", required=True, type=click.Path(file_okay=False), help="A source's logit store (same corpus).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Aligned store directory.")
@click.option("--pivot-model", default=None, help="Where the pivot's tokenizer is now (default: the model "
              "folder its store records; give it when that moved).")
@click.option("--source-model", default=None, help="Where the source's tokenizer is now (default: the model "
              "folder its store records; give it when that moved).")
@click_options(AlignOptions)
@output_options
def align_command(log_file: str | None, verbose: bool, **kwargs: Any) -> None:
    """Map a source model's top-K distributions onto the pivot's positions and vocabulary.

    Writes the pivot's store plus the aligned source distribution per position; sources
    with the pivot's tokenizer are copied through without alignment. Resumable.
    """
    from fusion.align.job import StoreAlignment, align_stores
    from fusion.runtime.log_capture import echo

    with stopping_cleanly("Run the same command again to resume"), \
            command_output("align", kwargs["out"], log_file, verbose):
        align_stores(StoreAlignment(**kwargs), log=echo)


@main.command(
    "fuse",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--pivot", required=True, help="The pivot model directory (initialisation and tokenizer).")
@click.option("--aligned", "aligned", multiple=True, required=True, type=click.Path(file_okay=False),
              help="An aligned store (repeat for several sources: the multi-source fusion).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: the target model (checkpoints in OUT/checkpoints).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="YAML of training options (TrainingArguments fields, lm_weight, fuse_temperature, "
              "fusion, fuse_loss_type), e.g. recipes/fusechat-7b-fuse.yaml; flags override it.")
@click_options(FusionSettings, overrides=True,
               aliases={"lm_weight": ["--lambda"], "fuse_temperature": ["--temperature"],
                        "fuse_loss_type": ["--loss-type"]})
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in OUT/checkpoints: "
              "the default now (kept so that older scripts work).")
@overwrite_option
@output_options
@click.pass_context
def fuse_command(ctx: click.Context, pivot: str, aligned: tuple[str, ...], out: str, config_file: str | None,
                 resume: bool, overwrite: bool, log_file: str | None, verbose: bool, **flags: Any) -> None:
    """Fine-tune the pivot on aligned stores: one target LLM per call.

    Any other option is a transformers TrainingArguments option, named as there
    (--max-steps, --num-train-epochs, --learning-rate, --per-device-train-batch-size,
    --gradient-accumulation-steps, --bf16, --gradient-checkpointing, --lr-scheduler-type,
    --warmup-ratio, ...). FuseChat-7B's settings are in recipes/fusechat-7b-fuse.yaml. The
    stores must have been made with this pivot's tokenizer (checked before training).
    Precedence: defaults, then --config, then flags. Like every writing command, a run with
    the same inputs and options resumes from its last complete checkpoint, another is
    refused naming what changed unless --overwrite (docs/outputs.md).
    """
    from fusion.errors import InputError
    from fusion.train.config import parse_fusion_config
    from fusion.train.trainer import train_fusion

    from_file: dict[str, Any] = {}
    if config_file:
        from fusechat_merge.recipe_keys import RecipeFileError, read_recipe_file

        try:
            from_file, _ = read_recipe_file(config_file, "a training config", empty_ok=True)
        except RecipeFileError as err:
            raise InputError(f"invalid training config {config_file}: {err}", file=config_file) from err
    try:  # transformers' HfArgumentParser says what is wrong with a ValueError: named here
        config = parse_fusion_config(out, from_file, ctx.args,
                                     {k: v for k, v in flags.items() if v is not None})
    except ValueError as err:
        raise InputError(f"{config_file or 'training options'}: {err}", file=config_file) from err
    with stopping_cleanly("Run the same command again to continue from it"), \
            command_output("fuse", out, log_file, verbose):
        result = train_fusion(pivot, list(aligned), out, config, overwrite=overwrite)
    click.echo(f"target model: {result}")


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Where every stage writes (relative recipe paths resolve here). With --executor "
              "ray, on a filesystem every node sees.")
@click.option("--from", "from_stage", type=click.Choice(STAGES),
              default=None, help="Redo this stage and all after it, even if up to date.")
@click.option("--only", type=click.Choice(STAGES), default=None,
              help="Run only this stage (the earlier ones must be done).")
@click.option("--dry-run", is_flag=True, help="Print the plan (what runs, what is skipped, why).")
@click.option("--plan", "print_plan", is_flag=True,
              help="Print the plan as JSON (id, kind, after, status, resources of every stage) and exit.")
@click.option("--stage", "stage_id", default=None, metavar="ID",
              help="Run exactly this stage (an id of --plan); refused until the stages it waits for are done.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="local: stage after stage in this process. ray: every ready stage at once as a "
              "Ray task (pip install 'fusechat-merge[ray]').")
@click.option("--ray-address", default=None,
              help="The Ray cluster to use (auto, HOST:6379, ray://HOST:10001); default: start a local one.")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="With --executor ray: how often a stage lost with its worker or node (OOM kill, "
              "preemption) is submitted again, resuming [default: the recipe's retries, 2].")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the libraries' output live too (it always goes to WORK/logs/<stage>.log).")
def run_command(recipe: str, work_dir: str, from_stage: str | None, only: str | None, dry_run: bool,
                print_plan: bool, stage_id: str | None, executor: str, ray_address: str | None,
                retries: int | None, verbose: bool) -> None:
    """Run a whole FuseChat recipe: logits → align → fuse → merge → evaluate.

    Stages whose inputs and options did not change since the last run are skipped;
    interrupted ones resume. On SIGTERM or Ctrl-C the running stage stops at its next safe
    point (training saves a checkpoint) and the run exits with 143 (SIGTERM) or 130 (SIGINT);
    running it again resumes. See recipes/fusechat-7b.yaml, the demo's recipe
    (fusechat_merge/demo/demo-pipeline.yaml), and docs/cluster.md for one node, a Ray
    cluster, and a SLURM job array (--plan, --stage).
    """
    import json

    from fusechat_merge.pipeline import MemoryFitError, pipeline_runner, run_pipeline
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe, unavailable_models

    if ray_address and executor != "ray":
        raise click.UsageError("--ray-address needs --executor ray")
    if retries is not None and executor != "ray":
        raise click.UsageError("--retries needs --executor ray (a local run, or a scheduler's --stage, "
                               "is retried by running it again: it resumes)")
    if sum(map(bool, (print_plan, stage_id, dry_run))) > 1 or ((print_plan or stage_id) and (from_stage or only)):
        raise click.UsageError("--plan, --stage and --dry-run go alone (not with each other, --from or --only)")
    parsed = load_pipeline_recipe(recipe, work_dir)
    if dry_run or print_plan:  # planned where the hub may not answer: said, not refused (a run refuses)
        for why in unavailable_models(parsed, work_dir).values():
            click.echo(f"warning: {why}; a run here refuses to start the stages that read it", err=True)
    again = "The finished stages and what this one completed are kept; run the same command again to resume"
    with stopping_cleanly(again):
        if print_plan:  # with each stage's memory per device; then refused if one cannot fit
            runner = pipeline_runner(parsed, work_dir, memory=True)
            click.echo(json.dumps(runner.plan(), indent=2))
            if runner.memory_problems:
                raise MemoryFitError(runner.memory_problems)
        elif stage_id:
            if executor != "local":
                raise click.UsageError("--stage runs the stage in this process (the scheduler placed it)")
            runner = pipeline_runner(parsed, work_dir, log=click.echo, verbose=verbose, memory=True,
                                     unavailable=unavailable_models(parsed, work_dir))
            mine = [p for p in runner.memory_problems if p.split()[1] == stage_id]
            if mine:
                raise MemoryFitError(mine)
            runner.run_one(stage_id)
        else:
            run_pipeline(parsed, work_dir, log=click.echo, from_stage=from_stage, only=only, dry_run=dry_run,
                         executor=executor, ray_address=ray_address, verbose=verbose, retries=retries)


@main.command("status")
@click.argument("work_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (for scripts).")
def status_command(work_dir: str, recipe: str | None, as_json: bool) -> None:
    """Where the run in WORK_DIR stands, from its stage records (nothing runs): done,
    running (where, since when, last progress), interrupted, failed, stale (its record is
    unreadable, or, with the RECIPE, its key no longer matches the recipe or another version
    made it: it reruns) and, with the RECIPE, waiting. Works the same for a run on
    a Ray cluster or a SLURM array (the records are in WORK_DIR/stages)."""
    import json

    from fusechat_merge.pipeline import WorkDir, pipeline_runner
    from fusechat_merge.pipeline.status import format_status, recorded_status, stage_status
    from fusechat_merge.pipeline_recipe import load_pipeline_recipe

    if recipe is None:
        rows = recorded_status(WorkDir(Path(work_dir).absolute()))
        if not rows and not as_json:
            click.echo(f"no stage of the run in {work_dir} has started yet (give the recipe to see its stages)")
            return
    else:
        rows = stage_status(pipeline_runner(load_pipeline_recipe(recipe, work_dir), work_dir))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for line in format_status(rows):
            click.echo(line)


@main.command("demo")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the tiny models, data, stores, targets, merges and the report go "
    "[default: demo-work, or demo-merge-work with --merge-only].",
)
@click.option("--seeds", type=click.IntRange(1, 10), default=None,
              help="Number of seeds (default: the recipe's, 3).")
@click.option("--merge-only", is_flag=True,
              help="Only build three tiny random models and merge them with fusechat_sce.")
@click.option("--select-topk", type=float, default=0.1, show_default=True, help="SCE τ (--merge-only).")
@click.option("--split", type=click.Choice(["heldout", "validation"]), default="heldout", show_default=True,
              help="Evaluate on the held-out prompts (the reported numbers) or on the validation prompts "
                   "(where the recipe's settings were chosen; use another --work-dir).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the libraries' output live too (it always goes to WORK/logs/).")
def demo_command(work_dir: Path | None, seeds: int | None, merge_only: bool, select_topk: float,
                 split: str, verbose: bool) -> None:
    """The whole FuseChat run at toy scale on CPU, nothing downloaded.

    Builds a Llama-style pivot and three sources of other architectures and tokenizers
    (Qwen2-style with a byte-level tokenizer that learns arithmetic, Mistral-style with
    another '▁' tokenizer that learns string reversal, Qwen2-style with another byte-level
    tokenizer that learns pick, where five to seven replies are right), then runs its
    demo-pipeline.yaml: logits → align → fuse (one target per source) → merge (SCE and
    mergekit's baselines) → evaluate (with the transfer to each source), and prints the
    comparison table. Re-running reuses what is done.
    """
    if merge_only:
        from fusechat_merge.demo.merge_demo import run_demo

        run_demo(work_dir or Path("demo-merge-work"), select_topk=select_topk, echo=click.echo)
        return
    from fusechat_merge.demo.pipeline_demo import run_pipeline_demo

    with stopping_cleanly("The finished stages and what this one completed are kept; run the same command "
                          "again to resume"):
        run_pipeline_demo(work_dir or Path("demo-work"), seeds=list(range(seeds)) if seeds else None,
                          split=split, echo=click.echo, verbose=verbose)


# --------------------------------------------------------------------------- eval (lm-eval)


@main.command("eval")
@click.option("--model", required=True, help="A saved model folder or a hub id.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write lm-eval's results JSON.")
@click_options(LmEvalOptions)
@output_options
def eval_command(model: str, out: Path, log_file: str | None, verbose: bool, **options) -> None:
    """Score a model on lm-evaluation-harness tasks (any task lm-eval knows, or local YAML
    tasks with --include-path); write lm-eval's results JSON to --out, print its table.

    \b
      fusechat-merge eval --model ./merged --tasks fusechat_skills \\
        --include-path demo-work/data/lm_eval --apply-chat-template --out scores.json

    lm-eval's and transformers' own output goes to the log (--log, default OUT.log), live with -v.
    Needs the eval extra: pip install 'fusechat-merge[eval]'.
    """
    from fusion.evaluate.lm_eval_results import format_table, write_results
    from fusion.evaluate.lm_eval_runner import require_lm_eval, run_lm_eval
    from fusion.runtime.progress import bar

    require_lm_eval()
    parsed = LmEvalOptions(**options)
    parsed.check()
    with command_output("eval", out, log_file, verbose), bar(None, "eval"):
        results = run_lm_eval(model, parsed)
    click.echo(format_table(results))
    click.echo(f"results: {write_results(results, out)}")


if __name__ == "__main__":
    sys.exit(main())
