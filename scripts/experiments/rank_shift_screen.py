"""Screen for a per-rank shift in an SPD block's MLP input (bias correction, not built into ds_spd): an SPD block's
MLP on rank r reads X + Y_r where the TP block's reads X + sum_s Y_s; c_r = E[sum_s Y_s - Y_r] over calibration
tokens restores the missing attention output's mean (no communication: a constant per rank).

    # zero-shot SPD blocks (or a checkpoint's, --checkpoint), c_r measured in place on the calibration corpora
    python scripts/experiments/rank_shift_screen.py zero-shot --blocks 2,4,5 --text T [--checkpoint CK] --out F
    # one block distilled alone (plain AdamW, no head grouping), once without c_r and once with it trained
    python scripts/experiments/rank_shift_screen.py train --blocks 4 --text T1,T2 --out F

Virtual tp 2, the default model; perplexities on 32 segments of each text, paired 95% bootstrap (shift over none).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def attach_shift(layer) -> None:
    """Hooks on an SPD-capable block's own modules (its forward unchanged): in SPD form, where ``layer.collect`` is set
    the stacked attention outputs Y_r ([S, B, T, d], o_proj's) are summed into it, and where ``layer.shift`` ([S, d])
    is set it is added to each rank's MLP input (the norm in front of the MLP reads X + Y_r there)."""
    if layer.adapter.block == "sandwich":
        raise SystemExit("the shift is defined for pre-norm blocks (X + Y_r before the MLP's norm), not sandwich ones")

    def collect(module, args, y):
        if layer.spd and getattr(layer, "collect", None) is not None:
            layer.collect[0] += y.detach().float().sum((1, 2))
            layer.collect[1] += y.shape[1] * y.shape[2]

    def shift(module, args):
        if layer.spd and getattr(layer, "shift", None) is not None:
            return (args[0] + layer.shift[:, None, None, :],)
    layer.self_attn.o_proj.register_forward_hook(collect)
    layer.ffn_norm.register_forward_pre_hook(shift)


def runner_for(blocks: list[int], checkpoint: str | None):
    from ds_spd.build import build_runner
    from ds_spd.config import resolve_spd_config
    from ds_spd.run import resolve_run
    kw = {"checkpoint": checkpoint} if checkpoint else {}
    cfg = resolve_spd_config(None, model="default", tp_size=2, spd_blocks=blocks, **kw)
    return cfg, build_runner(resolve_run(cfg, virtual_tp=2))


def segments(cfg, runner, text: str | None, n: int):
    from ds_spd.data import segments_for
    update = {"split": "train", "max_samples": n} if text is None else \
        {"text": [text], "split": "test", "max_samples": n}
    return segments_for(cfg.data.model_copy(update=update), runner.tokenizer)


def shifts(model, layers: list[int], calibration) -> dict:
    """c_r for each layer, from the model's own SPD forward over the calibration segments (hooks attached here)."""
    import torch
    for i in layers:
        attach_shift(model.model.layers[i])
        model.model.layers[i].collect = [0, 0]
    with torch.no_grad():
        for s in calibration.split(8):
            model(input_ids=s, use_cache=False)
    out = {}
    for i in layers:
        layer = model.model.layers[i]
        total, count = layer.collect
        mean = total / count                                   # [S, d]
        out[i] = (mean.sum(0, keepdim=True) - mean).to(layer.input_layernorm.weight.dtype)
        layer.collect = None
    return out


def zero_shot(args, texts: list[str]) -> dict:
    from ds_spd.tools.evaluation import evaluate_lm
    cfg, runner = runner_for(args.blocks, args.checkpoint)
    model = runner.hf_model
    tests = {t: segments(cfg, runner, t, 32) for t in texts}
    none = {t: evaluate_lm(model, s, progress=False) for t, s in tests.items()}
    for i, c in shifts(model, args.blocks, segments(cfg, runner, None, 32)).items():
        model.model.layers[i].shift = c
    return {"none": none, "shift": {t: evaluate_lm(model, s, progress=False) for t, s in tests.items()}}


def train(args, texts: list[str]) -> dict:
    """Block ``args.blocks[0]`` trained alone on 64 calibration segments (8 held out keep the best epoch), 8 epochs
    of AdamW at lr 1e-3 in micro-batches of 4, from the TP weights; once plain, once with c_r trained beside it."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from ds_spd.tools.evaluation import evaluate_lm
    torch.manual_seed(0)
    (index,) = args.blocks
    cfg, runner = runner_for(args.blocks, None)
    model = runner.hf_model
    layer = model.model.layers[index]
    seen = {"x": [], "y": []}

    def before(mod, a, kwargs):
        seen["x"].append(kwargs["hidden_states"] if "hidden_states" in kwargs else a[0])
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings")}

    layer.spd = False                                          # the teacher: the TP block on the original inputs
    hooks = [layer.register_forward_pre_hook(before, with_kwargs=True),
             layer.register_forward_hook(lambda mod, a, out: seen["y"].append(out))]
    with torch.no_grad():
        for s in segments(cfg, runner, None, 72).split(8):
            model(input_ids=s, use_cache=False)
    for h in hooks:
        h.remove()
    layer.spd = True
    x, y, kwargs = torch.cat(seen["x"]), torch.cat(seen["y"]), seen["kwargs"]

    def sliced(n: int) -> dict:   # the captured mask / rotary tables of a batch of 8, cut to n rows
        cut = lambda t: t[:n] if torch.is_tensor(t) and t.shape[0] == 8 else t
        return {k: tuple(map(cut, v)) if isinstance(v, tuple) else cut(v) for k, v in kwargs.items()}

    def held_out() -> float:
        with torch.no_grad():
            return F.mse_loss(layer(x[64:], **sliced(8)).float(), y[64:].float()).item()

    start = copy.deepcopy(layer.state_dict())
    calibration_shift = shifts(model, [index], segments(cfg, runner, None, 64))[index]
    tests = {t: segments(cfg, runner, t, 32) for t in texts}
    result = {}
    for variant in ("none", "shift"):
        layer.shift = None                                     # (a registered parameter: out of the state dict)
        layer.load_state_dict(start)
        if variant == "shift":
            layer.shift = torch.nn.Parameter(calibration_shift.clone())
        params = list(layer.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0)
        best = (held_out(), [p.detach().clone() for p in params])
        first = best[0]
        for _ in tqdm(range(8), desc=f"block {index}, {variant}: epochs"):
            order = torch.randperm(64)
            for j in range(0, 64, 4):
                idx = order[j:j + 4]
                loss = F.mse_loss(layer(x[idx], **sliced(4)).float(), y[idx].float())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if (v := held_out()) < best[0]:
                best = (v, [p.detach().clone() for p in params])
        with torch.no_grad():
            for p, kept in zip(params, best[1]):
                p.copy_(kept)
        result[variant] = {t: evaluate_lm(model, s, progress=False) for t, s in tests.items()}
        result[f"held_out_mse_{variant}"] = [first, best[0]]
    return result


def main() -> None:
    from ds_spd.tools.evaluation import paired_ratio_ci
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["zero-shot", "train"])
    ap.add_argument("--blocks", required=True, help="SPD blocks (train: one)")
    ap.add_argument("--text", required=True, help="comma-separated text files")
    ap.add_argument("--checkpoint", default=None, help="zero-shot mode: the blocks' distilled weights from here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.blocks = [int(b) for b in args.blocks.split(",")]
    texts = args.text.split(",")
    result = (zero_shot if args.mode == "zero-shot" else train)(args, texts)
    report = {"mode": args.mode, "blocks": args.blocks, "checkpoint": args.checkpoint,
              **{k: v for k, v in result.items() if k.startswith("held_out")}, "texts": {}}
    for t in texts:
        a, b = result["none"][t], result["shift"][t]
        report["texts"][t] = {"none": a["perplexity"], "shift": b["perplexity"],
                              "shift_over_none": paired_ratio_ci(a, b)}
        r = report["texts"][t]["shift_over_none"]
        print(f"{t}: {a['perplexity']:.4f} -> {b['perplexity']:.4f}, {100 * (r['ratio'] - 1):+.2f}% "
              f"[{100 * (r['ci95'][0] - 1):+.2f}, {100 * (r['ci95'][1] - 1):+.2f}]")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
