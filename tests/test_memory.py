"""Memory after training: each step's own peak is measured, and batches shrink as the model's activations grow."""
from __future__ import annotations

import numpy as np
import pytest

from trainer import memory
from trainer.config import make_config
from trainer.evaluate import batch_size_for, largest_activation_bytes
from trainer.models import build_model


def test_each_step_measures_its_own_peak():
    if not memory.reset_peak():
        pytest.skip("this kernel cannot restart the peak resident memory (VmHWM); steps report it as unknown")
    steps = memory.Steps(log=lambda line: None)
    with steps.step("big", 8):
        before = memory.current_gb()
        block = np.ones(300_000_000 // 8)  # 300 MB, touched
        after = memory.current_gb()
        del block
        grew, released = after - before, after - memory.current_gb()
    if grew < 0.25:
        pytest.skip(f"the 300 MB block added only {grew:.2f} GB of resident memory (swapping?)")
    if released < 0.25:  # the allocator kept the freed pages: the next step's peak rightly includes them
        pytest.skip(f"freeing the 300 MB block gave back only {released:.2f} GB of resident memory")
    with steps.step("small"):
        np.ones(1000).sum()
    big, small = steps.rows
    assert big["step"] == "big" and big["batch_size"] == 8 and small["batch_size"] is None
    assert big["peak_rss_gb"] - small["peak_rss_gb"] > 0.25, steps.rows  # the second step's peak starts afresh
    assert big["seconds"] >= 0 and small["seconds"] >= 0


def test_a_reset_that_reports_success_starts_from_the_current_size():
    block = np.ones(200_000_000 // 8)  # raise the mark 200 MB above what stays resident
    del block
    if not memory.reset_peak():
        pytest.skip("this kernel cannot restart the peak resident memory (VmHWM)")
    assert memory.peak_gb() - memory.current_gb() < 0.1  # the freed block's peak is gone


def test_batches_shrink_for_bigger_inputs_and_models():
    small = build_model(make_config("cpu"))
    assert largest_activation_bytes(small) == 4 * 48 * 48 * 32  # the stem's output
    assert batch_size_for(small) == 128  # the cpu profile keeps the batch it always had
    at_96 = build_model(make_config("gpu", model="convnext_tiny", weights="none", input_size=96))
    at_224 = build_model(make_config("gpu", model="convnext_tiny", weights="none", input_size=224))
    assert largest_activation_bytes(at_224) == 4 * 56 * 56 * 4 * 96  # first stage's MLP, 4x its 96 channels
    assert batch_size_for(at_224) < batch_size_for(at_96) <= 128
    assert batch_size_for(at_224, 512) == batch_size_for(at_224) // 2
    assert batch_size_for(at_224, 16) >= 1


def test_batched_probabilities_match_one_pass_with_a_short_last_batch():
    from trainer.evaluate import predict_probs
    model = build_model(make_config("smoke", seed=1))
    images = np.random.default_rng(0).integers(0, 256, (37, 96, 96, 3), dtype=np.uint8)
    whole = np.asarray(model(images.astype(np.float32), training=False))
    batched = predict_probs(model, images, batch_size=16)  # 16 + 16 + 5
    assert batched.shape == (37, 8)
    np.testing.assert_allclose(batched, whole, atol=1e-5)
    assert predict_probs(model, images[:0]).shape == (0, 8)
