"""lm-evaluation-harness adapter: run the paper's zero-shot tasks on an SPD model.

    python -m ds_spd.tools.lm_eval_adapter --model ds_spd \\
        --model_args virtual_tp=2,checkpoint=runs/ckpt --tasks arc_easy,piqa,hellaswag,lambada_openai
    # tensor-parallel on real ranks: deepspeed --num_gpus 2 --module ds_spd.tools.lm_eval_adapter --model ds_spd ...

``--model_args`` takes the ``"spd"`` config keys and CLI flags: config (a DeepSpeed JSON with an "spd"
section), model, tp_size, virtual_tp, spd_blocks (ranges, ``:``-separated: ``3:4:20-29``), plan, checkpoint,
dtype, plus HFLM's own (batch_size, max_length, ...). The model is an HF causal LM whose decoder blocks are
SPD blocks, so lm_eval's HFLM scores it unchanged.
"""
from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ds_spd.config import parse_block_list, resolve_spd_config
from ds_spd.build import build_runner
from ds_spd.run import resolve_run


@register_model("ds_spd")
class SPDLM(HFLM):
    def __init__(self, config: str | None = None, model: str | None = None, tp_size: int | None = None,
                 virtual_tp: int | None = None, spd_blocks: str | None = None, plan: str | None = None,
                 checkpoint: str | None = None, dtype: str | None = None, **kwargs):
        blocks = None if spd_blocks is None else parse_block_list(str(spd_blocks).replace(":", ","))
        cfg = resolve_spd_config(config, model=model, tp_size=None if tp_size is None else int(tp_size),
                                 spd_blocks=blocks, plan=plan, checkpoint=checkpoint, dtype=dtype)
        self.spd_runner = build_runner(resolve_run(cfg, virtual_tp=None if virtual_tp is None else int(virtual_tp)))
        super().__init__(pretrained=self.spd_runner.hf_model, tokenizer=self.spd_runner.tokenizer, **kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    cli_evaluate()


if __name__ == "__main__":
    main()
