"""The training commands end to end on tiny models with the real Qwen2.5 tokenizer: `qwen25 train pretrain` (two
context stages, HF checkpoints that load back, the position-bucket table, exact resume through PackedLoader) and
`qwen25 train sft` (full and LoRA through SFTLoader and lora.py), plus the commands' help and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen25.cli import main as cli_main

TEXTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n" * 3,
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 4,
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n" * 3,
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4,
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_hf_dir, real_tokenizer) -> tuple[Path, Path]:
    from qwen25.data.pack import pack

    root = tmp_path_factory.mktemp("corpus")
    for name, texts in (("train", TEXTS * 3), ("heldout", TEXTS[::-1])):
        (root / name).mkdir()
        for i, text in enumerate(texts):
            (root / name / f"{i:02d}.txt").write_text(text + f"# {i}\n")
        pack([root / name], root / f"{name}-shards", real_tokenizer, str(tiny_hf_dir))
    return root / "train-shards", root / "heldout-shards"


def pretrain(output: Path, shards, tiny_hf_dir, *extra: str) -> int:
    return cli_main(["train", "pretrain", "--data", str(shards[0]), "--eval-data", str(shards[1]),
                     "--model-config", str(tiny_hf_dir / "config.json"), "--output", str(output),
                     "--seq-len", "16", "--batch-size", "4", "--max-steps", "6", "--stage2-steps", "4",
                     "--save-every", "2", "--save-total-limit", "2", "--lr", "3e-3", "--threads", "2",
                     "--no-progress", "--position-eval-batches", "2", *extra])


def stage_losses(run: Path, stage: str) -> list[float]:
    records = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shards, tiny_hf_dir) -> tuple[Path, str]:
    """One two-stage run (6 + 4 steps) shared by the pretraining tests, and what it printed."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("pretrain") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pretrain(run, shards, tiny_hf_dir) == 0
    return run, out.getvalue()


def test_pretrain_two_stages_write_loadable_models_and_the_position_table(pretrained):
    from qwen25.checkpoint import load

    run, out = pretrained
    for stage, theta, steps in (("stage1", 10_000.0, 6), ("stage2", 1_000_000.0, 4)):
        assert json.loads((run / stage / "config.json").read_text())["rope_theta"] == theta
        assert (run / stage / "tokenizer.json").is_file() and (run / stage / "loss.png").is_file()
        assert (run / stage / f"checkpoint-{steps}" / "model.safetensors").is_file()
        assert len(stage_losses(run, stage)) == steps
    assert stage_losses(run, "stage1")[-1] < stage_losses(run, "stage1")[0]
    checkpoint = load(run / "stage2")
    assert checkpoint.config.rope_theta == 1_000_000.0 and checkpoint.config.hidden_size == 32
    table = json.loads((run / "position_loss.json").read_text())
    assert len(table) == 2 and all(len(rows) == 5 for rows in table.values())
    assert list(table)[0].startswith("after stage1 (theta 10000, trained at 16)")
    first = next(iter(table.values()))
    assert [r["positions"] for r in first] == ["0-3", "4-7", "8-15", "16-31", "32-63"]
    assert "| positions |" in (run / "position_loss.md").read_text()
    assert "stage1: 6 steps" in out and "stage2: 4 steps" in out


def test_pretrain_resume_after_a_lost_tail_repeats_the_same_losses(pretrained, shards, tiny_hf_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained[0], run)
    shutil.rmtree(run / "stage2" / "checkpoint-4")  # as if killed in stage 2 between checkpoint-2 and the end
    assert pretrain(run, shards, tiny_hf_dir, "--resume") == 0
    for stage in ("stage1", "stage2"):  # stage 1 is restored as finished; stage 2 redoes steps 3-4 exactly
        assert stage_losses(run, stage) == stage_losses(pretrained[0], stage)
    assert (run / "stage2" / "checkpoint-4").is_dir()


def test_pretrain_refuses_an_occupied_output_and_a_resume_of_another_model(pretrained, shards, tiny_hf_dir,
                                                                           tmp_path, capsys):
    run = pretrained[0]
    before = sorted(p.name for p in (run / "stage1").iterdir())
    assert pretrain(run, shards, tiny_hf_dir) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds this run; continue it with --resume" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads((tiny_hf_dir / "config.json").read_text()), "num_hidden_layers": 3}))
    code = cli_main(["train", "pretrain", "--data", str(shards[0]), "--model-config", str(other), "--output",
                     str(run), "--seq-len", "16", "--max-steps", "3", "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "num_hidden_layers 2 there, 3 here" in err
    assert sorted(p.name for p in (run / "stage1").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    code = cli_main(["train", "pretrain", "--data", str(shards[0]), "--output", str(tmp_path / "mine"),
                     "--max-steps", "1", "--no-progress"])
    assert code == 1 and "not empty and holds no qwen25 pretraining run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"What is the secret word number {i}?"},
                          {"role": "assistant", "content": "The secret word is PAPAYA."}]} for i in range(12)]
    rows.append({"messages": [{"role": "user", "content": "no answer here"}]})  # skipped and counted
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    return root / "train.jsonl", root / "eval.jsonl"


def sft(tmp_path, tiny_hf_dir, sft_data, *extra: str) -> int:
    return cli_main(["train", "sft", "--model", str(tiny_hf_dir), "--data", str(sft_data[0]), "--eval-data",
                     str(sft_data[1]), "--output", str(tmp_path / "sft"), "--seq-len", "64", "--batch-size", "2",
                     "--threads", "2", "--no-progress", *extra])


def test_full_sft_writes_an_hf_directory_that_loads(tmp_path, tiny_hf_dir, sft_data, capsys):
    from qwen25.checkpoint import load

    assert sft(tmp_path, tiny_hf_dir, sft_data, "--lr", "3e-3", "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "skipped no assistant 1" in out and "sft: " in out
    run = tmp_path / "sft"
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]
    trained = load(run)
    base = load(tiny_hf_dir)
    assert trained.tokenizer.chat_template == base.tokenizer.chat_template
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained.model.get_parameter(up), base.model.get_parameter(up))
    assert json.loads((run / "generation_config.json").read_text())["top_k"] == 20  # the base's defaults kept


def test_lora_sft_writes_a_peft_adapter_and_leaves_the_base_alone(tmp_path, tiny_hf_dir, sft_data):
    from qwen25.checkpoint import load
    from qwen25.train.lora import load_adapter

    assert sft(tmp_path, tiny_hf_dir, sft_data, "--lora", "--lora-r", "4", "--max-steps", "2", "--save-every", "1") == 0
    run = tmp_path / "sft"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and config["base_model_name_or_path"] == str(tiny_hf_dir)
    tensors = load_file(run / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in tensors.items())  # B left zero-init
    assert (run / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not (run / "model.safetensors").exists()
    base = load(tiny_hf_dir)
    load_adapter(base.model, run)  # loads back onto the base it was trained on


def test_sft_errors_are_one_line(tmp_path, tiny_hf_dir, sft_data, capsys):
    code = cli_main(["train", "sft", "--model", str(tmp_path / "no-such-model"), "--data", str(sft_data[0]),
                     "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("qwen25: error: ") and err.count("\n") == 0 and "no-such-model" in err
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    code = cli_main(["train", "sft", "--model", str(tiny_hf_dir), "--data", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "bad.jsonl:2" in err and err.count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_help_teaches_with_examples(capsys):
    for stage in ("pretrain", "sft"):
        with pytest.raises(SystemExit):
            cli_main(["train", stage, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "--resume" in out and "torchrun --nproc_per_node" in out
    assert cli_main(["train"]) == 2


def test_config_file_keys_are_flags_and_flags_win(tmp_path):
    from qwen25.cli import build_parser
    from qwen25.cli_args import config_from_namespace, parse_args
    from qwen25.train.sft import SFTConfig

    (tmp_path / "run.toml").write_text('data = "a.jsonl"\noutput = "out"\nlora = true\nseq-len = 128\nepochs = 3\n')
    with pytest.raises(ValueError, match="--output is required"):
        SFTConfig(data="a.jsonl")
    ns = parse_args(build_parser(), ["train", "sft", "--config", str(tmp_path / "run.toml"), "--epochs", "1"])
    cfg = config_from_namespace(SFTConfig, ns)
    assert (cfg.data, cfg.output, cfg.lora, cfg.seq_len, cfg.epochs) == ("a.jsonl", "out", True, 128, 1)
    assert cfg.lr == 1e-4 and cfg.min_lr is None and cfg.weight_decay == 0.1 and cfg.max_grad_norm == 1.0
    full = config_from_namespace(SFTConfig, parse_args(build_parser(), ["train", "sft", "--data", "a", "-o", "b"]))
    assert (full.lr, full.epochs, full.resume) == (7e-6, 2, None)
    resumed = config_from_namespace(SFTConfig, parse_args(build_parser(), ["train", "sft", "--data", "a", "-o", "b",
                                                                           "--resume"]))
    assert resumed.resume == "latest"
