"""The CLI stays a shell (docs/design.md): every ``cmd_*`` parses, resolves, calls a stage or tool, reports, in at
most 30 lines; what a command needs beyond that belongs to the stage or tool it calls."""
import ast
import os

from helpers import ROOT


def test_every_command_is_at_most_30_lines():
    with open(os.path.join(ROOT, "ds_spd", "cli.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body
               if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")}
    assert len(lengths) >= 9 and {k: v for k, v in lengths.items() if v > 30} == {}


def _offered(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions if a.option_strings and a.dest != "help"}


def test_each_command_offers_only_the_flags_it_honours():
    """A shared flag appears only on the commands that honour it (HONOURS); every field of the config's scan and
    distill sections is a flag of that command (generated from the config model, so the two cannot drift); a
    flag a command does not offer is refused in one line naming it, before any work."""
    from ds_spd.cli import DATA_FLAGS, HONOURS, MODEL_FLAGS, build_parser
    from ds_spd.config import DistillConfig, ScanConfig
    parser = build_parser()
    shared = set(MODEL_FLAGS) | set(DATA_FLAGS)
    for command, honours in HONOURS.items():
        assert _offered(parser, command) & shared == set(honours), command
    assert set(DistillConfig.model_fields) <= _offered(parser, "distill")
    assert set(ScanConfig.model_fields) <= _offered(parser, "scan")
    assert not {"comm", "load", "virtual_tp", "tp_size", "spd_blocks", "batch_size"} & _offered(parser, "distill")
    args = parser.parse_args(["distill", "--plan", "p.json", "--trainer", "joint", "--activation-budget", "2"])
    assert (args.trainer, args.activation_budget_gb, args.virtual_tp, args.json) == ("joint", 2.0, None, False)
    # a boolean field is --field / --no-field; absent, None: the config or the model's recipe decides
    assert [parser.parse_args(["distill", "--plan", "p.json", *f]).lag for f in ([], ["--lag"], ["--no-lag"])] == \
        [None, True, False]


def test_a_flag_the_command_does_not_offer_is_refused_by_name(capsys):
    from ds_spd.cli import main
    assert main(["bench", "--checkpoint", "ck"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ds-spd bench: error: unrecognized arguments: --checkpoint ck (ds-spd bench --help lists the "
                   "flags it honours)"]
    assert main(["generate", "--virtual-tp", "2", "--load", "full"]) == 2
    assert "--load does not apply with --virtual-tp" in capsys.readouterr().err


def test_prepare_model_takes_no_shared_flag(tiny_dir, capsys):
    """The one command without the shared flags runs (its namespace has none of them) and prints the model's path."""
    from ds_spd.cli import main
    assert main(["prepare-model", "--model", tiny_dir]) == 0
    assert capsys.readouterr().out.strip() == tiny_dir


def test_an_engine_after_a_finished_command_in_the_same_process(tiny_dir, capsys):
    """`main` shuts its process group down when a command ends; DeepSpeed's cached clone of the world group must go
    with it, or the next training engine in the same process (a test worker, a notebook) fails on the dead
    clone ("Group ... is not registered": found when the test files ran in another order)."""
    import copy

    import torch
    from helpers import CPU_ZERO2, plan_of_classes, tiny_model

    import ds_spd
    from ds_spd.cli import main
    from ds_spd.stages.distill.joint import distill
    from ds_spd.stages.distill.kit import DistillSettings

    def train():
        model = ds_spd.virtualize(tiny_model(), 2)
        segments = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(1))
        return distill(model, plan_of_classes(model, ["SB", "TP", "TP", "TP"]), segments, copy.deepcopy(CPU_ZERO2),
                       DistillSettings(epochs=1, lr=2e-3, micro_batch=4), progress=False)
    train()                                                       # an engine: DeepSpeed clones the world group
    assert main(["prepare-model", "--model", tiny_dir]) == 0     # ... and a command ends the process group
    capsys.readouterr()
    assert sorted(train().block_states) == [0]
