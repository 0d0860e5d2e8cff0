"""The serving path: what runs inside LMDeploy's engine process when it loads ``--adapters``.

Data flows one way: :mod:`.config` and :mod:`.weights` read an adapter, :mod:`.matching` applies
PEFT's rules to the names :mod:`.model_map` lists, :mod:`.plan` resolves it all into plain data, and
:mod:`.slots` (with :mod:`.lm_head` for the LM head, :mod:`.vision` for vision towers and projectors, as
:mod:`.vision_policy` decides) fills LMDeploy's modules from the plan.
:mod:`.loader` runs those steps in place of LMDeploy's ``add_adapters``; :mod:`.hook` puts it (and
the :mod:`.cli_guard` handlers) there.
"""
