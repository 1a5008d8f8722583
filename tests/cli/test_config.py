"""Config, plan and CLI errors: clear, naming the problem, raised before any weight is read."""
import glob
import json
import os
import sys

import pytest
from helpers import ROOT, tiny_config

from ds_spd.cli import parse_blocks
from ds_spd.config import ConfigError, resolve_spd_config
from ds_spd.plan import Plan, PlanError, load_plan
from ds_spd.stages.lr import kl_stage_lr


def test_unknown_and_bad_keys_are_named():
    with pytest.raises(ConfigError, match=r"config key 'spd\.tp_sise': unknown key"):
        resolve_spd_config({"spd": {"tp_sise": 2}})
    with pytest.raises(ConfigError, match=r"config key 'spd\.data\.seqlen': unknown key"):
        resolve_spd_config({"spd": {"data": {"seqlen": 2}}})
    with pytest.raises(ConfigError, match=r"'spd\.tp_size'"):
        resolve_spd_config({"spd": {"tp_size": 0}})
    with pytest.raises(ConfigError, match=r"'spd\.dtype'"):
        resolve_spd_config({"spd": {"dtype": "fp8"}})
    with pytest.raises(ConfigError, match=r"'spd\.comm'"):
        resolve_spd_config({"spd": {"comm": "nccl2"}})
    with pytest.raises(ConfigError, match="not both"):
        resolve_spd_config({"spd": {"spd_blocks": [1], "plan": "p.json"}})


def test_file_loading_and_overrides(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "spd": {"tp_size": 3, "spd_blocks": [1]}}))
    cfg = resolve_spd_config(str(path), tp_size=2, data={"seq_len": 64, "dataset": None})
    assert (cfg.tp_size, cfg.spd_blocks, cfg.data.seq_len, cfg.data.dataset) == (2, [1], 64, "pydoc")
    assert resolve_spd_config(str(path), plan="x.json").spd_blocks is None  # a flag's plan replaces the list
    assert resolve_spd_config(str(path), checkpoint="ck").spd_blocks is None  # so does a checkpoint
    assert resolve_spd_config(str(path), checkpoint="ck", spd_blocks=[2]).spd_blocks == [2]  # unless both given
    # a partial section keeps its other keys' defaults: calibration's (train split, seeded), not evaluation text's
    own = resolve_spd_config({"spd": {"calibration": {"dataset": "docstrings"}, "data": {"seq_len": 64}}})
    assert (own.calibration.dataset, own.calibration.split, own.calibration.seed, own.calibration.max_samples) == \
        ("docstrings", "train", 0, 16)   # the count: SmolLM2's recipe's scan
    assert (own.data.seq_len, own.data.split, own.data.dataset) == (64, "test", "pydoc")
    gemma = resolve_spd_config({"spd": {"calibration": {"dataset": "docstrings"}}}, model="gemma3-270m")
    assert (gemma.calibration.split, gemma.calibration.max_samples) == ("train", 16)   # and the recipe's keys
    with pytest.raises(ConfigError, match="not found"):
        resolve_spd_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_spd_config(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))))
def test_shipped_configs_validate(path):
    resolve_spd_config(path)


@pytest.mark.parametrize("name", ["spd_smollm2_tp2.json", "spd_smollm2_tp2_bf16.json", "spd_smollm2_tp2_zero3.json"])
def test_smollm2_tp2_configs_run_the_recipes_kl_stage(name):
    """The tp 2 configs set the calibration corpora, which would turn the recipe's stage settings off: they say them,
    and leave the counts (the scan's 16, distillation's 64) to the recipe, so a user's count still sets both."""
    recipe = resolve_spd_config({}, model="default")
    shipped = resolve_spd_config(os.path.join(ROOT, "configs", name))
    stage = ("kl_epochs", "kl_segments", "kl_dtype", "esb_segments", "esb_segments_min_sensitivity", "segments")
    assert [getattr(shipped.distill, k) for k in stage] == [getattr(recipe.distill, k) for k in stage] == \
        [1, 512, "auto", 1024, 0.25, 64]
    assert recipe.distill.kl_lr == shipped.distill.kl_lr == 1e-4 == 2 * kl_stage_lr(shipped.distill.lr)   # said
    # and its scan: Gemma 3's, on the recipe's 16 segments (the configs leave the count to it)
    for cfg in (recipe, shipped):
        assert (cfg.scan.method, cfg.scan.metric, cfg.calibration.max_samples) == ("isolated", "kl", 16)


def test_plan_round_trip_and_mismatch(tmp_path):
    cfg = tiny_config()
    plan = Plan.from_blocks("tiny", cfg, 2, [1, 3], data="pydoc")
    path = str(tmp_path / "plan.json")
    plan.save(path)
    assert not glob.glob(path + ".tmp*")
    loaded = load_plan(path).check_compatible(cfg, 2)
    assert loaded.spd_blocks == [1, 3]
    from ds_spd.run import resolve_run
    spec = resolve_run(resolve_spd_config({"spd": {"plan": path}}), virtual_tp=2, model_config=cfg)
    assert spec.spd_blocks == (1, 3) and spec.virtual and spec.layout.tp_size == 2
    with pytest.raises(PlanError, match="tp size 2, not 3"):
        loaded.check_compatible(cfg, 3)
    with pytest.raises(PlanError, match="num_hidden_layers: plan 4 vs model 6"):
        loaded.check_compatible(tiny_config(num_hidden_layers=6), 2)
    with pytest.raises(PlanError, match="hidden_size"):
        loaded.check_compatible(tiny_config(hidden_size=48, head_dim=8), 2)
    (tmp_path / "junk.json").write_text('{"model": 1}')
    with pytest.raises(PlanError, match="not a valid ds_spd plan"):
        load_plan(str(tmp_path / "junk.json"))


def test_parse_blocks():
    assert parse_blocks("0-2,5") == [0, 1, 2, 5]
    assert parse_blocks("none") == []
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="bad block list"):
        parse_blocks("1,x")


def test_cli_errors_before_work(tiny_dir, tmp_path):
    from helpers import run_cli_batch
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"spd": {"modle": "x"}}))
    other = Plan.from_blocks("other", tiny_config(num_hidden_layers=6), 2, [1])
    other.save(str(tmp_path / "plan.json"))
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    cases = [(["eval", "--model", tiny_dir, "--tp", "2"], ("tp size 2 needs 2 ranks", "deepspeed --num_gpus 2")),
             (["eval", "--model", tiny_dir, "--virtual-tp", "4"], ("3 KV heads",)),
             (["eval", "--model", tiny_dir, "--virtual-tp", "2", "--spd-blocks", "0,9"], ("out of range",)),
             (["eval", "--config", str(bad)], ("config key 'spd.modle': unknown key",)),
             (["eval", "--model", tiny_dir, "--virtual-tp", "2", "--plan", str(tmp_path / "plan.json")],
              ("plan was made for another model",)),
             (["eval", "--model", str(tmp_path / "gpt2"), "--virtual-tp", "2"],
              ("unsupported architecture 'GPT2LMHeadModel'",))]
    for (args, patterns), res in zip(cases, run_cli_batch([c[0] for c in cases], str(tmp_path))):   # one process
        assert res["code"] == 2, (args, res["stderr"][-3000:])
        for p in patterns:
            assert p in res["stderr"], (args, res["stderr"][-3000:])


def test_help_and_config_load_no_torch():
    """`ds-spd --help` and config validation import neither torch nor DeepSpeed (fast, and no CUDA init)."""
    import subprocess
    import sys
    code = ("import sys; from ds_spd.cli import build_parser; from ds_spd.config import resolve_spd_config; "
            "build_parser(); resolve_spd_config({'spd': {'tp_size': 2}}); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_default_grain_is_deepspeeds():
    from deepspeed.inference.config import DeepSpeedTPConfig

    from ds_spd.core.layout import DEFAULT_TP_GRAIN_SIZE
    assert DEFAULT_TP_GRAIN_SIZE == DeepSpeedTPConfig().tp_grain_size


def test_master_port_check_matches_how_the_store_binds():
    """A port with a listener is in use; one a finished launch left in TIME_WAIT is not (torch's TCPStore binds it
    with SO_REUSEADDR: it was refused for a minute after every run on the default port, proved below by the
    store itself binding it)."""
    import datetime
    import socket
    import time

    from torch.distributed import TCPStore

    from ds_spd.ports import port_in_use
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert port_in_use(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()   # the server side closes first: its end waits in TIME_WAIT
    time.sleep(0.2)
    client.close()
    with socket.socket() as plain:
        with pytest.raises(OSError):
            plain.bind(("", port))   # the old check's bind: refused
    assert not port_in_use(port)
    TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=5))   # and the store does bind it


def test_every_process_finds_the_same_ninja(monkeypatch):
    """Started with or without the venv on PATH, a process puts its environment's tools first (once), so DeepSpeed's
    shm op is built by one ninja: two ninja versions sharing the op's cache rebuilt it at every switch (four times,
    ~35 s of both cores each, in one test-suite run)."""
    import shutil

    from ds_spd.ranks import same_build_tools
    tools = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(tools, "ninja")):
        pytest.skip("no ninja in this Python environment")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", tools, "/bin"]))
    same_build_tools()
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/local/bin", "/usr/bin", "/bin"]
    assert shutil.which("ninja") == os.path.join(tools, "ninja")
    same_build_tools()
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/local/bin", "/usr/bin", "/bin"]


def test_each_shipped_model_gets_its_recipe_where_the_user_sets_nothing_that_overrides_it():
    gemma = resolve_spd_config({}, model="gemma3-270m")
    assert (gemma.scan.method, gemma.scan.metric, gemma.scan.ranking) == ("isolated", "kl", "zero-shot")
    assert (gemma.calibration.max_samples, gemma.distill.segments) == (16, 128)
    assert gemma.distill.epochs == 16
    smol = resolve_spd_config({}, model="default")
    # SmolLM2 scans as Gemma 3 does (each block alone, by KL, on 16 segments) and distils on 64
    assert (smol.scan.method, smol.scan.metric, smol.calibration.max_samples) == ("isolated", "kl", 16)
    assert smol.distill.segments == 64
    paper = resolve_spd_config({}, model="default", scan={"method": "cumulative"})   # the paper's scan, on 16
    assert (paper.scan.metric, paper.calibration.max_samples, paper.distill.segments) == ("ppl", 16, 64)
    # a count the user sets is what the scan and distillation read (as make demo sets them)
    own = resolve_spd_config(os.path.join(ROOT, "configs", "spd_smollm2_tp2.json"), data={"max_samples": 8},
                             data_section="calibration")
    assert (own.calibration.max_samples, own.distill.segments) == (8, None)
    assert paper.distill.esb_segments == 1024   # its ESB blocks read their own segments as the recipe's do
    assert smol.distill.epochs == 8
    # both shipped models add the end-to-end KL stage; Gemma 3's at the rule's rate (the blocks' lr / 20), SmolLM2's
    # at its recipe's 1e-4 unless the user sets the blocks' lr (then the rule's); other models add no stage
    # SmolLM2's: one epoch over its 512 segments (two where the user sets the segments: as make demo, or the stage's)
    assert (smol.distill.kl_epochs, gemma.distill.kl_epochs) == (1, 2)
    assert resolve_spd_config({}, model="default", distill={"segments": 32}).distill.kl_epochs == 2
    assert resolve_spd_config({}, model="default", distill={"kl_segments": 256}).distill.kl_epochs == 2
    assert resolve_spd_config({}, model="default", distill={"kl_epochs": 3}).distill.kl_segments == 512
    assert (smol.distill.kl_lr, gemma.distill.kl_lr) == (1e-4, None)
    assert resolve_spd_config({}, model="default", distill={"lr": 2e-3}).distill.kl_lr is None
    assert resolve_spd_config({}, model="default", distill={"segments": 32}).distill.kl_lr is None   # as make demo
    gemma_tp2 = resolve_spd_config(os.path.join(ROOT, "configs", "spd_gemma3_270m_tp2.json")).distill
    assert gemma_tp2.kl_lr == kl_stage_lr(gemma_tp2.lr) == 1e-5   # the tp 2 config says the rule's rate
    assert resolve_spd_config({}, model="/some/hf/dir").distill.kl_epochs == 0
    assert resolve_spd_config({}, model="default", distill={"kl_epochs": 0}).distill.kl_epochs == 0   # a flag wins
    # SmolLM2's stage reads 512 segments, unless the user sets how many distillation reads (Gemma 3: those)
    assert (smol.distill.kl_segments, gemma.distill.kl_segments) == (512, None)
    # SmolLM2's stage trains in bf16 where the machine is faster in it (validated there); Gemma 3's in fp32
    assert (smol.distill.kl_dtype, gemma.distill.kl_dtype) == ("auto", "float32")
    assert resolve_spd_config({}, model="default", distill={"kl_dtype": "float32"}).distill.kl_dtype == "float32"
    assert resolve_spd_config({}, model="default", distill={"segments": 32}).distill.kl_segments is None
    assert resolve_spd_config({}, model="default", data={"max_samples": 8},
                              data_section="calibration").distill.kl_segments is None
    # SmolLM2's two far most sensitive blocks read 1024 segments (Gemma 3's ESB blocks the run's count), unless the
    # user sets the trainer, the input source (it needs the layer-wise trainer on original inputs), data or counts
    assert (smol.distill.esb_segments, smol.distill.esb_segments_min_sensitivity) == (1024, 0.25)
    # SmolLM2's SPD blocks run lagged attention (pre-norm; chosen on validation); Gemma 3's sandwich blocks cannot
    assert (smol.distill.lag, gemma.distill.lag, paper.distill.lag) == (True, False, True)
    assert resolve_spd_config({}, model="default", distill={"lag": False}).distill.lag is False   # --no-lag
    assert resolve_spd_config({}, model="/some/hf/dir").distill.lag is False
    assert gemma.distill.esb_segments is gemma.distill.esb_segments_min_sensitivity is None
    for user in ({"input_source": "chain"}, {"trainer": "joint"}, {"segments": 32}, {"corpora": "pydoc"}):
        assert resolve_spd_config({}, model="default", distill=user).distill.esb_segments is None, user
    assert resolve_spd_config({}, model="default", distill={"esb_segments": 64}).distill.esb_segments_min_sensitivity \
        is None   # the user's count goes to every ESB block, as the setting says
    # every model distils on the scan's two corpora and the docstrings, unless the user gives text of their own
    assert smol.distill.corpora == gemma.distill.corpora == "pydoc+shakespeare+docstrings"
    assert resolve_spd_config({}, model="/some/hf/dir").distill.corpora == "pydoc+shakespeare+docstrings"
    own_text = resolve_spd_config({}, model="default", data={"dataset": "pydoc"}, data_section="calibration")
    assert (own_text.calibration.dataset, own_text.distill.corpora) == ("pydoc", None)
    assert resolve_spd_config({"spd": {"calibration": {"text": ["a.txt"]}}}, model="default").distill.corpora is None
    assert gemma.distill.lr is smol.distill.lr is None   # the lr rule decides for both (ds_spd.stages.lr)
    assert resolve_spd_config({}, model="gemma3-270m", distill={"epochs": 3}).distill.epochs == 3   # a flag wins
    # the user's choice of scan or data replaces the recipe's, and what the recipe tied to it
    paper = resolve_spd_config({}, model="gemma3-270m", scan={"method": "cumulative"})
    assert (paper.scan.method, paper.scan.metric) == ("cumulative", "ppl")
    assert resolve_spd_config({}, model="gemma3-270m", scan={"ranking": "distilled"}).scan.metric == "ppl"
    more = resolve_spd_config({}, model="gemma3-270m", data={"max_samples": 64}, data_section="calibration")
    assert (more.calibration.max_samples, more.distill.segments) == (64, None)
    assert resolve_spd_config({"spd": {"scan": {"metric": "ppl"}}}, model="gemma3-270m").scan.metric == "ppl"


def test_serve_and_bench_flags_are_generated_from_their_settings(monkeypatch):
    """Each serve / bench / bench-serve setting is declared once (a field with default, bound and help): every field is a flag with
    that default, the parsed flags build the settings, a value out of its bound is refused naming the flag (a
    secret's value never shown), and the API key's default comes from the environment."""
    from dataclasses import fields

    from ds_spd.cli import build_parser
    from ds_spd.errors import SPDInputError
    from ds_spd.serve.settings import ServeSettings
    from ds_spd.settings import flag_of, from_args
    from ds_spd.tools.settings import BenchServeSettings, BenchSettings
    monkeypatch.setenv("DS_SPD_API_KEY", "sk-from-env")
    parser = build_parser()
    for command, cls in (("serve", ServeSettings), ("bench", BenchSettings), ("bench-serve", BenchServeSettings)):
        args = parser.parse_args([command])
        built = from_args(cls, args)
        for f in fields(cls):
            if f.metadata.get("cli", True):
                assert flag_of(f) in parser._subparsers._group_actions[0].choices[command].format_help(), f.name
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        assert {k: v for k, v in vars(built).items() if k != "api_key"} == \
            {k: v for k, v in defaults.items() if k != "api_key"}
    assert from_args(ServeSettings, parser.parse_args(["serve"])).api_key == "sk-from-env"
    assert from_args(BenchServeSettings, parser.parse_args(["bench-serve"])).api_key == "sk-from-env"
    args = parser.parse_args(["serve", "--served-model-name", "m", "--max-seqs", "3", "--max-step-tokens", "3"])
    with pytest.raises(SPDInputError, match=r"--max-step-tokens 3 is out of range: more than --max-seqs"):
        from_args(ServeSettings, args)
    with pytest.raises(SPDInputError, match=r"^--api-key is out of range: not empty$"):
        from_args(ServeSettings, parser.parse_args(["serve", "--api-key", "  "]))
    bench = from_args(BenchSettings, parser.parse_args(["bench", "--fractions", "0,0.5", "--decode-batches", "2"]))
    assert bench.fractions == (0.0, 0.5) and bench.decode_batches == (2,)
    with pytest.raises(SPDInputError, match=r"--fractions \(0.0, 1.5\) is out of range: each in \[0, 1\]"):
        from_args(BenchSettings, parser.parse_args(["bench", "--fractions", "0,1.5"]))


def test_a_work_dir_from_before_a_setting_existed_still_resumes():
    """A setting added later and left unset (None) is left out of the run's fingerprint: a work dir written before
    it existed (its stored settings lack the key) compares equal; set, it differs, naming the key."""
    from ds_spd.config import DataConfig
    from ds_spd.stages.distill.kit import DistillSettings
    from ds_spd.workdir import comparable, differences, run_fingerprint
    data = DataConfig(dataset="pydoc", max_samples=8)

    def fingerprint(settings: dict) -> dict:
        return run_fingerprint(model="m", model_fingerprint={}, plan_digest="p", tp_size=2, tp_grain_size=64,
                               dtype="float32", calibration=data, settings=settings, ds_config={}, ranks=2,
                               launcher="deepspeed")
    now = DistillSettings().knobs()
    older = {k: v for k, v in now.items() if k != "esb_segments"}   # as a run before the key wrote it
    assert comparable(fingerprint(older)) == fingerprint(now)
    changed = fingerprint({**now, "esb_segments": 256})
    assert differences(comparable(fingerprint(older)), changed) == ["settings.esb_segments: None -> 256"]
