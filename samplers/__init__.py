"""Few-step samplers (installed as ``fastface.samplers``)."""
