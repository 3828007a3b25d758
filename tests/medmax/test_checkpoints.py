"""medmax.checkpoints: safetensors written one tensor at a time, released pages, outputs that appear only when complete."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medmax.checkpoints import fresh_output, release_pages, shard_plan, write_safetensors_stream, write_weights
from medmax.meta_layout import PlannedTensor


def _planned(name, value):
    return PlannedTensor(name, tuple(value.shape), value.dtype, lambda: value)


def test_a_streamed_file_loads_with_safetensors_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.bf16": torch.randn(3, 5).bfloat16(), "b.f32": torch.randn(7), "c.i64": torch.arange(3),
               "d.f16": torch.randn(2, 2, 3).half(), "e.scalar": torch.tensor(1.5), "f.bool": torch.tensor([True, False])}
    built = []

    def track(item):
        built.append(item.name)

    write_safetensors_stream(tmp_path / "x.safetensors", [_planned(k, v) for k, v in tensors.items()], track)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert built[:2] == ["c.i64", "b.f32"]  # widest dtypes first: every tensor's data is aligned
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_tensor_unlike_its_plan_stops_the_file(tmp_path):
    item = PlannedTensor("w", (2, 2), torch.float32, lambda: torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"w: built \(2, 3\) torch.float32, planned \(2, 2\)"):
        write_safetensors_stream(tmp_path / "x.safetensors", [item])


def test_weights_split_into_files_with_an_index(tmp_path):
    items = [_planned(f"t{i}", torch.full((100,), float(i))) for i in range(5)]  # 400 bytes each
    assert [len(g) for g in shard_plan(items, 1000)] == [2, 2, 1]
    names = write_weights(tmp_path, items, max_bytes=1000)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = (tmp_path / "model.safetensors.index.json").read_text()
    assert '"total_size": 2000' in index and '"t4": "model-00003-of-00003.safetensors"' in index
    assert torch.equal(load_file(str(tmp_path / names[2]))["t4"], torch.full((100,), 4.0))


def test_released_pages_of_a_memory_mapped_tensor_keep_their_values(tmp_path):
    value = torch.randn(1 << 20)
    torch.save({"w": value}, tmp_path / "w.pth")
    mapped = torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]
    total = mapped.sum()
    release_pages([mapped, torch.randn(10)])  # an ordinary tensor too: a hint, never a change of contents
    assert torch.equal(mapped, value) and mapped.sum() == total


def test_the_output_appears_only_when_the_work_completes(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with fresh_output(tmp_path / "out") as partial:
            (partial / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with fresh_output(tmp_path / "out") as partial:
        (partial / "done.bin").write_bytes(b"x")
    assert (tmp_path / "out" / "done.bin").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["done.bin"]
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with fresh_output(tmp_path / "out"):
            pass


def test_a_partial_folder_left_by_a_killed_run_is_redone_but_a_foreign_one_is_kept(tmp_path):
    left = tmp_path / "out.partial"
    left.mkdir()
    (left / ".medmax-partial").write_text("")
    (left / "half.bin").write_bytes(b"x")  # what a killed run leaves
    with fresh_output(tmp_path / "out") as partial:
        assert not (partial / "half.bin").exists()
    foreign = tmp_path / "theirs.partial"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="not written by this toolkit"):
        with fresh_output(tmp_path / "theirs"):
            pass
    assert (foreign / "data.bin").read_bytes() == b"keep"
