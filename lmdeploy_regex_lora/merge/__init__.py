"""``merge``: the base checkpoint with one adapter folded in (``W + scaling * B @ A``), streamed.

:mod:`.planner` resolves the adapter on the checkpoint's headers with the serving path's own rules,
:mod:`.writer` streams the shards, :mod:`.rounding` rounds float64 once to the shard's dtype. Nothing
here imports torch or LMDeploy (a ``.bin`` adapter still needs torch to be unpickled).
"""
