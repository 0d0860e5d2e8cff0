"""What checks need: tiny model folders, the one LMDeploy build on CPU or ``meta``, the one comparison
of a served model with merged checkpoints. The demo and ``verify`` use it; nothing on the serving path does.
"""
