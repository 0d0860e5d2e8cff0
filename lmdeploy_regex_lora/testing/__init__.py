"""What checks need: tiny model folders, the one LMDeploy build on CPU or ``meta``, the one comparison
of a served model with merged checkpoints, and the per-request check of vision embeddings through LMDeploy's
image path (vision_check). The demo and ``verify`` use it; nothing on the serving path does.
"""
