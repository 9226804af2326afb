"""CPU speed and memory, kept apart from the plain path a reader follows.

:func:`grpo.accel.install.install` applies it to a run's models in one call and returns the
:class:`~grpo.accel.install.Speedups` the trainer asks at the few places where faster code may stand in:
the fused inference decoder (fused), oneDNN linear layers (onednn), the chunked LM head and in-place
gradients (chunked_head), leaner attention and MLP layers (lean_layers), frozen weights in a mapped file
(offload), and the allocator's settings (memory). ``accel: false`` (``--no-accel``) turns all of it off; the
results are the same to float rounding.
"""
