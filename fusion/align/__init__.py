"""Alignment: source distributions mapped onto the pivot's token positions and vocabulary.

``positions`` pairs positions (offsets, or DTW over token strings: ``dtw``), ``vocab_map``
and ``projection`` map token ids, ``job`` runs a whole store, ``stats`` counts what it did.

The names below were ``fusion.align``'s when it was one module; they stay importable from
here for one release (import them from ``fusion.align.positions``).
"""

from fusion.align.positions import (
    TokenView,
    boundary_keys,
    dtw_alignment,
    map_distribution,
    merge_distribution,
    offsets_alignment,
    reply_keys,
    token_pairs,
)

__all__ = [
    "TokenView",
    "boundary_keys",
    "dtw_alignment",
    "map_distribution",
    "merge_distribution",
    "offsets_alignment",
    "reply_keys",
    "token_pairs",
]
