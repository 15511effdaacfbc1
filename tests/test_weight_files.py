"""weight_files.py: the files from_pretrained reads from a folder and their bytes (issue 33 item 1), on
folders of a few bytes with other weight-like files beside the loaded ones, and on real tiny checkpoints
loaded by transformers (which file wins when two could)."""

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swift_gradpruner.tiny import build_model
from swift_gradpruner.weight_files import loaded_weight_bytes, loaded_weight_files

KEY = "model.layers.0.mlp.up_proj.weight"


def safetensors(path, data_bytes: int) -> None:
    """A real safetensors file holding ``data_bytes`` bytes of tensor data (one uint8 tensor)."""
    save_file({"w": torch.zeros(data_bytes, dtype=torch.uint8)}, str(path))


def write(path, size: int) -> None:
    path.write_bytes(b"x" * size)


def index(path, shards: dict[str, str], total_size: int | None) -> None:
    metadata = {} if total_size is None else {"total_size": total_size}
    path.write_text(json.dumps({"metadata": metadata, "weight_map": shards}))


def test_safetensors_wins_over_a_bin_beside_it(tmp_path):
    safetensors(tmp_path / "model.safetensors", 100)
    write(tmp_path / "pytorch_model.bin", 5000)
    assert loaded_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert loaded_weight_bytes(tmp_path) == 100  # the tensor data, not the .bin nor the header


def test_consolidated_safetensors_beside_an_index_is_not_counted(tmp_path):
    """Mistral's layout: consolidated.safetensors (native format) beside the HF shards and their index."""
    write(tmp_path / "consolidated.safetensors", 9000)
    safetensors(tmp_path / "model-00002-of-00002.safetensors", 30)
    safetensors(tmp_path / "model-00001-of-00002.safetensors", 20)
    shards = {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors",
              "c": "model-00001-of-00002.safetensors"}  # fmt: skip
    index(tmp_path / "model.safetensors.index.json", shards, total_size=12345)
    assert loaded_weight_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                             tmp_path / "model-00002-of-00002.safetensors"]  # fmt: skip
    assert loaded_weight_bytes(tmp_path) == 12345  # the index's own total
    index(tmp_path / "model.safetensors.index.json", shards, total_size=None)
    assert loaded_weight_bytes(tmp_path) == 50  # without it: the shards' tensor data


def test_trainer_files_and_gguf_are_never_weights(tmp_path):
    for name in ("optimizer.pt", "training_args.bin", "model.gguf", "scheduler.pt", "rng_state.pth"):
        write(tmp_path / name, 7000)
    assert loaded_weight_files(tmp_path) == [] and loaded_weight_bytes(tmp_path) == 0
    safetensors(tmp_path / "model.safetensors", 64)
    assert loaded_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert loaded_weight_bytes(tmp_path) == 64


def test_a_bin_only_sharded_checkpoint(tmp_path):
    write(tmp_path / "pytorch_model-00001-of-00002.bin", 300)
    write(tmp_path / "pytorch_model-00002-of-00002.bin", 200)
    write(tmp_path / "training_args.bin", 4000)
    shards = {"x": "pytorch_model-00002-of-00002.bin", "y": "pytorch_model-00001-of-00002.bin"}
    index(tmp_path / "pytorch_model.bin.index.json", shards, total_size=None)
    assert loaded_weight_files(tmp_path) == [tmp_path / "pytorch_model-00001-of-00002.bin",
                                             tmp_path / "pytorch_model-00002-of-00002.bin"]  # fmt: skip
    assert loaded_weight_bytes(tmp_path) == 500  # .bin files count whole
    index(tmp_path / "pytorch_model.bin.index.json", shards, total_size=480)
    assert loaded_weight_bytes(tmp_path) == 480


def test_config_transformers_weights_names_the_file(tmp_path):
    """config.json's ``transformers_weights`` overrides the order (as from_pretrained reads it)."""
    safetensors(tmp_path / "model.safetensors", 10)
    safetensors(tmp_path / "other.safetensors", 40)
    (tmp_path / "config.json").write_text(json.dumps({"transformers_weights": "other.safetensors"}))
    assert loaded_weight_files(tmp_path) == [tmp_path / "other.safetensors"] and loaded_weight_bytes(tmp_path) == 40


def data_bytes(paths) -> int:
    """Bytes of all tensors in safetensors files, read tensor by tensor."""
    total = 0
    for path in paths:
        with safe_open(path, "pt") as f:
            total += sum(f.get_tensor(key).nbytes for key in list(f.keys()))
    return total


def test_a_real_checkpoint_counts_its_tensor_data(tmp_path):
    """save_pretrained's single file: the count is the tensors' bytes (file size less the 8-byte length and
    the JSON header, so that it means what an index's total_size means); sharded: the index's total_size,
    which equals the same tensors' bytes."""
    model = build_model("llama", num_layers=2, vocab_size=64, seed=1)
    model.save_pretrained(tmp_path / "single")
    single = tmp_path / "single" / "model.safetensors"
    tensors = data_bytes([single])
    assert loaded_weight_files(tmp_path / "single") == [single]
    assert loaded_weight_bytes(tmp_path / "single") == tensors
    header = int.from_bytes(single.read_bytes()[:8], "little")
    assert tensors == os.path.getsize(single) - 8 - header and header > 0
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = loaded_weight_files(tmp_path / "sharded")
    assert len(files) > 2 and files == sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert loaded_weight_bytes(tmp_path / "sharded") == data_bytes(files) == tensors


def test_the_file_it_names_is_the_one_transformers_loads(tmp_path):
    """Two copies with different weights in one folder: from_pretrained loads the one loaded_weight_files
    names (model.safetensors over pytorch_model.bin, over a safetensors index)."""
    from transformers import AutoModelForCausalLM

    first = build_model("llama", num_layers=2, vocab_size=64, seed=1)
    second = build_model("llama", num_layers=2, vocab_size=64, seed=2)
    folder = tmp_path / "model"
    first.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(first.state_dict(), folder / "pytorch_model.bin")
    assert loaded_weight_files(folder) == [folder / "pytorch_model.bin"]
    second.save_pretrained(tmp_path / "second")
    shutil.copy(tmp_path / "second" / "model.safetensors", folder / "model.safetensors")
    first.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for path in (tmp_path / "sharded").glob("model*"):
        shutil.copy(path, folder / path.name)
    assert loaded_weight_files(folder) == [folder / "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.state_dict()[KEY], second.state_dict()[KEY])
    assert not torch.equal(loaded.state_dict()[KEY], first.state_dict()[KEY])
