"""Two CPU processes (torchrun, gloo) calibrate disjoint shards; the reduced sums equal one process's sums, for an
encoder classifier and for a decoder language model. A decoder is also compressed end to end under torchrun:
distillation runs data-parallel and every rank ends with the same model, which stock transformers reloads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _models import counting_texts, save_tiny_decoder
from conftest import make_text_dataset

HERE = Path(__file__).resolve().parent


def _run(model_dir, data_file, output, nproc, mode="whole"):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "distributed_calibration.py"), str(model_dir), str(data_file), str(output), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(output)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "decoder", "decoder-layerwise"])
def test_two_process_calibration_equals_single_process(kind, bert_dir, tmp_path):
    # An odd number of rows (37 texts; 13 packed blocks of 16 tokens for the decoder): even_batches-style padding
    # would have counted one twice. `decoder-layerwise`: two processes one layer at a time (each layer's sums
    # all-reduced before the next layer) against one process over the whole model.
    if kind == "encoder":
        model_dir, data = bert_dir, make_text_dataset(37, seed=3)
    else:
        model_dir, data = save_tiny_decoder(tmp_path / "decoder"), counting_texts(37, seed=3)
    data.to_csv(tmp_path / "data.csv")
    single = _run(model_dir, tmp_path / "data.csv", tmp_path / "single.pt", 1)
    double = _run(model_dir, tmp_path / "data.csv", tmp_path / "double.pt", 2,
                  "layerwise" if kind.endswith("layerwise") else "whole")
    # accelerate launch can silently start two worlds of one (DESIGN §7): check the world really had two processes.
    assert double["num_processes"] == 2 and single["num_processes"] == 1
    assert single["rows"] % 2 == 1
    assert set(double["stats"]) == set(single["stats"])
    for key, state in single["stats"].items():
        other = double["stats"][key]
        assert int(other["n_samples"].item()) == int(state["n_samples"].item()), key
        # Shards are padded to other lengths, so float32 kernels see other shapes and activations differ by float32
        # round-off (~1e-7 relative); one example counted twice would move the sums by ~1/37 ≈ 3%, far above this.
        torch.testing.assert_close(other["sum_outer"], state["sum_outer"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other["sum"], state["sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_decoder_compresses_end_to_end_under_torchrun(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_decoder(tmp_path / "decoder")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "distributed_compress.py"), str(model_dir), str(output)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(HERE))
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["widths"] == ranks[1]["widths"] and ranks[0]["stages"] == ranks[1]["stages"] >= 1
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the same weights on every rank after distillation
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert float(sum(p.detach().double().sum() for p in reloaded.parameters())) == pytest.approx(
        ranks[0]["checksum"], rel=1e-12)
