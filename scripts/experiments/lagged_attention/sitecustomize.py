"""Experiment patch, not part of ds_spd: with DS_SPD_LAG=1 every SPD-form block's MLP input on rank r adds the other
ranks' attention output at the previous position, O_r(t-1) = sum_s Y_s(t-1) - Y_r(t-1) (zero at the first
position): docs/experiments.md, "The other ranks' attention output one position late". Virtual TP and full
sequences only (no KV cache): distill, eval and the KL check, as the experiment runs them. Loaded by Python's
site module from PYTHONPATH, so it reaches every rank the deepspeed launcher starts:

    PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1 launch/tp.sh 2 distill --model default \
        --plan docs/results/readme_path/default_tp2/plan21.json --out runs/lag21/ck
    PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1 python -m ds_spd eval --model default \
        --virtual-tp 2 --checkpoint runs/lag21/ck --text T --max-samples 32 --json

Hooks on the block's own modules (its forward unchanged): o_proj's stacked output Y ([S, B, T, d]) is kept, and
the norm in front of the MLP reads X + Y_r + O_r(t-1).
"""
import os
if os.environ.get("DS_SPD_LAG") == "1":
    import torch.nn.functional as F
    from ds_spd.core import block as _b
    _init = _b.SPDDecoderLayer.__init__

    def _patched(self, *a, **k):
        _init(self, *a, **k)
        layer = self

        def grab(mod, args, y):
            if layer.spd:
                layer._lag_y = y

        def add(mod, args):
            if layer.spd:
                y = layer._lag_y
                if y.shape[0] < 2:
                    raise RuntimeError("lag patch: virtual TP only")
                if y.shape[-2] < 2:
                    raise RuntimeError("lag patch: full sequences only")
                others = y.sum(0, keepdim=True) - y
                lag = F.pad(others[..., :-1, :], (0, 0, 1, 0))
                return (args[0] + lag.to(args[0].dtype),)
        self.self_attn.o_proj.register_forward_hook(grab)
        self.adapter.ffn_norm(self).register_forward_pre_hook(add)
    _b.SPDDecoderLayer.__init__ = _patched
    print("[lag patch active]", flush=True)
