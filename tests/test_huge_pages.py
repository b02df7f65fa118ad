"""weights.huge_pages: a mapped file's tensor bytes on 2 MiB pages where the system allows, the bytes unchanged.

Whether a file system keeps large folios is the machine's: where it does (ext4 on recent kernels), the tests see
the PMD mappings in /proc/self/smaps_rollup; elsewhere they check the reason given."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from qwen25.weights import huge_pages
from qwen25.weights.huge_pages import HUGE_PAGE, SMAPS_ROLLUP, huge_pages_available, map_on_huge_pages

RESULTS = ("huge pages", "huge pages (page cache read again)",
           "small pages (the file system keeps this file's cache on 4 KiB pages)",
           "small pages (no transparent huge pages here)")


@pytest.mark.parametrize(("text", "available"), [("always [madvise] never\n", True), ("[always] madvise never", True),
                                                 ("always madvise [never]\n", False)])
def test_the_thp_setting_is_read(tmp_path: Path, text: str, available: bool) -> None:
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert huge_pages_available(setting) is available
    assert huge_pages_available(tmp_path / "missing") is False


def _file_on_small_pages(path: Path, size: int) -> bytes:
    """A file of random bytes on 4 KiB folios, as a file downloaded or copied has."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    _file_on_small_pages_in_place(path)
    return data


def _file_on_small_pages_in_place(path: Path) -> None:
    """Drop the file's page cache and read it back by read(): 4 KiB folios."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        while f.read(1 << 16):
            pass


def _pmd_kb() -> int:
    for line in SMAPS_ROLLUP.read_text().splitlines():
        if line.startswith("FilePmdMapped:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not SMAPS_ROLLUP.exists() or not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_tensor_bytes_go_on_huge_pages_where_the_system_allows(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    size = 8 * HUGE_PAGE + 12345
    data = _file_on_small_pages(path, size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 100_000  # a header: the tensor bytes start past it, from 2 MiB to 16 MiB in whole huge pages
        before = _pmd_kb()
        result = map_on_huge_pages(mm, path, start, size)
        assert result in RESULTS
        assert mm[:] == data  # every byte the file's
        if result.startswith("huge pages"):
            assert _pmd_kb() - before == 7 * HUGE_PAGE // 1024  # all of it mapped by PMDs
        else:
            assert _pmd_kb() == before
    if result.startswith("huge pages"):
        assert result == "huge pages (page cache read again)"  # it was on 4 KiB pages
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            assert map_on_huge_pages(mm, path, start, size) == "huge pages"  # the next mapping: nothing read


def test_opting_out_and_small_ranges_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(5 * HUGE_PAGE))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        small = map_on_huge_pages(mm, path, HUGE_PAGE + 1, 3 * HUGE_PAGE)
        assert small == "small pages (under 4 MiB of tensor bytes)" or not huge_pages_available()
        monkeypatch.setenv(huge_pages.OPT_OUT_ENV, "small")
        assert map_on_huge_pages(mm, path, 0, 5 * HUGE_PAGE) == "small pages (QWEN25_MMAP=small)"


@pytest.mark.skipif(not SMAPS_ROLLUP.exists() or not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_a_gguf_keeps_its_bytes_on_huge_pages(tmp_path: Path) -> None:
    import gguf

    from qwen25.weights.gguf import GGUFFile

    path = tmp_path / "big.gguf"
    weights = np.random.default_rng(1).standard_normal((1536, 2048)).astype(np.float32)  # 12 MiB of tensor bytes
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tensor("big.weight", weights)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _file_on_small_pages_in_place(path)
    g = GGUFFile(path, expect_arch=None)
    result = g.use_huge_pages()
    assert result in RESULTS
    if result.startswith("huge pages"):
        assert result == "huge pages (page cache read again)"
    assert np.array_equal(g.raw("big.weight").view(np.float32).reshape(weights.shape), weights)
