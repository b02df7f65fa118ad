"""What a training run reports: `metrics.jsonl`, the progress bar, the loss-curve PNG and TensorBoard.

Only rank 0 reports (`MetricsLog(enabled=False)` on the others does nothing). One JSON object per optimizer
step is appended and flushed to `<output>/metrics.jsonl`: `step`, `epoch`, `loss` (mean token CE of the step's
global batch), `lr` (the rate that step used), `grad_norm` (global L2 norm before clipping), `tokens` (input
tokens of the global batch, padding included), `tokens_per_s`, `elapsed_s`; eval records carry `eval_loss`
instead. The same records are kept in memory (`history`): a checkpoint stores them, and a resumed run rewrites
metrics.jsonl from them, dropping the lines a killed run wrote after its last checkpoint.

The loss curve (`loss.png`, matplotlib's Agg backend) is redrawn with every checkpoint. TensorBoard
(`--report-to tensorboard`: every number of a record as a scalar, `train/<key>` — loss, lr, grad_norm,
tokens_per_s and a stage's extras such as GRPO's reward and kl — or `eval/<key>` for `eval_<key>`) is imported
only when asked for. The progress bar shows loss, lr, tokens/s and, when a record has one, the reward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LOSS_LABEL", "MetricsLog", "plot_loss", "read_metrics"]

LOSS_LABEL = "loss (mean token CE, nats)"  # the y-axis of loss.png unless the objective names its own


class MetricsLog:
    def __init__(self, output: Path, *, enabled: bool = True, report_to: str = "none", total_steps: int = 0,
                 progress: bool = True, history: list[dict[str, Any]] | None = None, description: str = "train",
                 ) -> None:
        self.output = Path(output)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = list(history or [])
        self.path = self.output / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._warned_plot = False
        if not enabled:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))  # a resume drops later lines
        self._file = self.path.open("a", encoding="utf-8")
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
            self._tb = SummaryWriter(log_dir=str(self.output / "tensorboard"))
        elif report_to != "none":
            raise ValueError(f"--report-to {report_to!r}: use none or tensorboard")
        if progress:
            from tqdm import tqdm

            done = max((r["step"] for r in self.history if "loss" in r), default=0)
            self._bar = tqdm(total=total_steps or None, initial=done, desc=description, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a train step or an eval) to the history, metrics.jsonl, TensorBoard and the bar."""
        self.history.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():  # train/<key> or eval/<key without eval_>, every number
                if key in ("step", "epoch", "elapsed_s") or isinstance(value, bool) or \
                        not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}", value, step)
        if self._bar is not None:
            if "loss" in record:
                self._bar.update(1)
                extra = {"reward": f"{record['reward']:.3f}"} if "reward" in record else {}
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      tok_s=f"{record['tokens_per_s']:.0f}", **extra, refresh=False)
            else:
                self._bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}")

    def plot(self, title: str = "", loss_label: str = LOSS_LABEL) -> Path | None:
        if not self.enabled:
            return None
        path = self.output / "loss.png"
        try:
            plot_loss(self.history, path, title=title, loss_label=loss_label)
        except ImportError:  # training never fails for want of a picture
            if not self._warned_plot:
                print("loss.png skipped: matplotlib is not installed (pip install 'qwen25[train]')", flush=True)
                self._warned_plot = True
            return None
        if self._tb is not None:
            self._tb.flush()
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (complete lines only: a killed writer may leave a partial last one)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def plot_loss(history: list[dict[str, Any]], path: str | Path, title: str = "", loss_label: str = LOSS_LABEL) -> None:
    """Train loss (and eval loss where present) against step, as a PNG; written to a temp name, then renamed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(loss_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
