"""The embedded demos: props around the product, not part of it.

Tiny models, tokenizers and skills made locally in seconds (nothing is downloaded), so the
whole FuseChat run can be shown and tested on a laptop:

* `toy`: tiny random models of several architectures and toy tokenizers ('▁' and byte-level);
* `skills`: synthetic skills (arithmetic, reversal) and small models trained on them;
* `pipeline_demo`: ``fusechat-merge demo``, the shipped ``demo-pipeline.yaml`` end to end;
* `merge_demo`: ``fusechat-merge demo --merge-only``, the SCE merge alone.
"""
