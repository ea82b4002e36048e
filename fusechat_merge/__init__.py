"""fusechat-merge: FuseChat knowledge fusion and SCE merging.

Importing this package is cheap on purpose (no torch, no mergekit): the ``.pth`` hook
imports it at every interpreter start. The heavy parts live in submodules.
"""

__version__ = "0.1.0"
METHOD_NAME = "fusechat_sce"
