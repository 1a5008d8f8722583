"""Experiment patch, not part of ds_spd: with DS_SPD_LAG=1 every SPD-form block's MLP input on rank r adds the other
ranks' attention output at the previous position, O_r(t-1) = sum_s Y_s(t-1) - Y_r(t-1), zero at the first position;
with DS_SPD_LAG=first the first position reads its own O_r(0), which a prefill has from its sync
(docs/experiments.md, "The other ranks' attention output one position late"). Virtual TP and full sequences only
(no KV cache): distill, eval and the KL check, as the experiment runs them. Loaded by Python's site module from
PYTHONPATH, so it reaches every rank the deepspeed launcher starts:

    PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1 launch/tp.sh 2 distill --model default \
        --plan docs/results/readme_path/default_tp2/plan21.json --out runs/lag21/ck
    PYTHONPATH=scripts/experiments/lagged_attention DS_SPD_LAG=1 python -m ds_spd eval --model default \
        --virtual-tp 2 --checkpoint runs/lag21/ck --text T --max-samples 32 --json

Hooks on the block's own modules (its forward unchanged): o_proj's stacked output Y ([S, B, T, d]) is kept, and
the norm in front of the MLP reads X + Y_r + O_r(t-1).
"""
import os
MODE = os.environ.get("DS_SPD_LAG")
if MODE in ("1", "first"):
    import torch.nn.functional as F
    from ds_spd.core import block as _b
    _init = _b.SPDDecoderLayer.__init__

    def enter(layer, args, kwargs):
        layer._lag_active, layer._lag_y = True, None

    def leave(layer, args, out):
        layer._lag_active, layer._lag_y = False, None

    def grab(mod, args, y):
        if mod._lag_owner._lag_active:
            mod._lag_owner._lag_y = y

    def add(mod, args):
        layer = mod._lag_owner
        if layer._lag_active and layer.spd and layer.lag:
            y = layer._lag_y
            if y is None or y.shape[0] < 2:
                raise RuntimeError("lag patch: virtual TP only")
            if y.shape[-2] < 2:
                raise RuntimeError("lag patch: full sequences only")
            others = y.sum(0, keepdim=True) - y
            lag = F.pad(others[..., :-1, :], (0, 0, 1, 0))
            if MODE == "first":   # the first position reads its own (a forward that holds it is a prefill, synced)
                lag[..., 0, :] = others[..., 0, :]
            return (args[0] + lag.to(args[0].dtype),)

    def _patched(self, *a, **k):
        _init(self, *a, **k)
        self.lag = True   # compare.py turns it off on the model it measures without the lag
        self._lag_active, self._lag_y = False, None
        # the hooks act only inside the block's own forward (head grouping and neuron matching call its modules
        # alone) and find their block through the module (a plain attribute, not a submodule): a deep copy of
        # the block (the distillation's student) carries hooks that act on the copy, not on its original
        for mod in (self.self_attn.o_proj, self.adapter.ffn_norm(self)):
            object.__setattr__(mod, "_lag_owner", self)
        self.register_forward_pre_hook(enter, with_kwargs=True)
        self.register_forward_hook(leave)
        self.self_attn.o_proj.register_forward_hook(grab)
        self.adapter.ffn_norm(self).register_forward_pre_hook(add)

    _b.SPDDecoderLayer.__init__ = _patched
    print("[lag patch active]", flush=True)
