"""Block-to-block (B2B) distillation of the plan's SB and ESB blocks (docs/method.md sections 3 and 4).

Teacher: the original block (both syncs). Student: the same block in SPD form (virtual TP of the plan's tp
size), initialised from the teacher's weights, head-grouped first for ESB blocks. Loss: MSE between the
student's and the teacher's outputs on the same block inputs; only that block's parameters train.

- ``kit``: what every trainer shares (settings, student module, trainer, epoch loop, resume, result);
- ``layerwise``: the default trainer, one block resident at a time;
- ``joint``: every trained block in one DeepSpeed engine (equal to layer-wise without gradient clipping);
- ``e2e``: the optional end-to-end KL stage on the distilled blocks;
- ``run``: the ``distill`` command, from a plan file to an SPD checkpoint, safely.
"""
