"""``fusechat_sce``: the SCE kernel of `fusechat_merge.sce` as a mergekit 0.1.5 method.

A thin adapter: it validates the parameters (through the signature, which mergekit
turns into pydantic-checked `ParameterSpec`s), hands the tensors to `sce_merge`, and
names the tensor and model in any error. `register` makes it available by name.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethod, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator

from fusechat_merge import METHOD_NAME
from fusechat_merge.sce import SCEInputError, sce_merge_with_stats, validate_parameters
from fusechat_merge.stats_sink import record_stats


def _check_select_topk(value: float) -> float:
    validate_parameters(value, "weights", True)
    return value


@merge_method(
    name=METHOD_NAME,
    pretty_name="FuseChat SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def fusechat_sce(
    group: TensorGroup,
    select_topk: Annotated[float, AfterValidator(_check_select_topk)] = 1.0,
    select_scope: Literal["weights", "deltas"] = "weights",
    normalize: bool = True,
) -> torch.Tensor:
    """Select salient elements by variance, Calculate per-matrix coefficients, Erase
    sign-minority elements (see `fusechat_merge.sce` for the exact definition)."""
    base = group.base
    targets = group.non_base
    try:
        merged, stats = sce_merge_with_stats(
            base.tensor,
            [entry.tensor for entry in targets],
            select_topk=select_topk,
            select_scope=select_scope,
            normalize=normalize,
            collect_stats=record_stats.active(),
        )
    except SCEInputError as err:
        who = base.id if err.index == -1 else targets[err.index].id if err.index is not None else None
        model = f" (model {who})" if who is not None else ""
        raise ValueError(f"{METHOD_NAME}: tensor {group.metadata.name!r}{model}: {err}") from err
    if stats is not None:
        record_stats(group.metadata.name, [str(entry.id) for entry in targets], stats)
    return merged


def register() -> MergeMethod:
    """Register ``fusechat_sce`` with mergekit once; later calls are no-ops."""
    try:
        return registry.get(METHOD_NAME)
    except RuntimeError:
        registry.register(fusechat_sce)
        return fusechat_sce


_hook = sys.modules.get("fusechat_merge._hook")
if _hook is not None and _hook.installed():  # imported before mergekit.merge_methods: the hook left it here
    register()
