"""LoRA SFT on the real 0.5B teaches a made-up fact (issue 14): `scripts/sft_new_fact.py` end to end through
`qwen25 train sft --lora` and `LLM(..., lora=)`. Slow: ~15-30 min on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sft_new_fact.py"


def test_lora_sft_teaches_a_made_up_fact_without_breaking_the_rest(tmp_path, real_gguf):  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("sft_new_fact", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    status = demo.main(["--model", str(real_gguf), "--output", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["before"]["held_out_accuracy"] == 0.0  # the base model cannot know it
    assert report["after"]["held_out_accuracy"] >= 0.8  # held-out paraphrases, none of them trained on
    assert report["after"]["control_accuracy"] >= report["before"]["control_accuracy"]
    assert report["loss_first_last"][1] < report["loss_first_last"][0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert status == 0

    # the trained adapter, loaded by peft onto transformers' model of the same (dequantized) base: same logits
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qwen25.checkpoint import load
    from qwen25.cli import main as cli_main
    from qwen25.train.lora import load_adapter

    base_dir = tmp_path / "base-hf"
    assert cli_main(["export", str(real_gguf), "-o", str(base_dir), "--dtype", "f32"]) == 0
    checkpoint = load(real_gguf)
    ours = checkpoint.model  # fp32, the weights the export wrote
    load_adapter(ours, tmp_path / "run" / "adapter")
    ours.eval()
    ids = torch.tensor([checkpoint.tokenizer.encode("<|im_start|>user\nWho is the mayor of Quillbrook?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
        adapted, mine = theirs(ids).logits, ours(ids)
    assert (adapted - base_logits).abs().max().item() > 1e-1  # the adapter matters
    assert (adapted - mine).abs().max().item() < 1e-4  # measured: 0.0 (same fp32 ops)
