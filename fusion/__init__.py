"""Everything before the merge: FuseChat's pairwise knowledge fusion and its evaluation.

The package is laid out as the pipeline runs, one room per stage:

* ``data``: conversations parsed, rendered with each model's chat template, batched;
* ``capture``: a model scores the corpus and its top-K distributions are stored
  (``backends``: transformers or vLLM);
* ``align``: source distributions mapped onto the pivot's positions and vocabulary;
* ``train``: the pivot fine-tuned against the fused distributions (HF ``Trainer``);
* ``evaluate``: held-out reply loss, lm-evaluation-harness, the transfer measure;
* ``artifacts``: the formats on disk and the one lifecycle every writer follows;
* ``runtime``: what any stage needs while it runs (progress, log capture, stopping,
  memory faults, remote code).

Beside them: ``options`` (every stage's options, declared once), ``errors`` (the error
family the command line maps to exit codes) and ``names`` (what a model or dataset name
refers to: a local path, or a hub id). The merge stage lives in ``fusechat_merge``, which
this package never imports.
"""
