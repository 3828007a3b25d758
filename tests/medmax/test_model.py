import json

import pytest
import torch
from transformers import ChameleonForConditionalGeneration

from medmax.model import MedMaxChameleon, load_model_dir


def test_image_code_logits_are_not_masked_and_loss_is_finite(tiny_model_dir, tiny_vocab):
    bundle = load_model_dir(tiny_model_dir)
    codes = torch.arange(10, 74)
    ids = torch.cat([torch.tensor([tiny_vocab.bos_id, tiny_vocab.boi_id]), tiny_vocab.codes_to_ids(codes)])[None]
    out = bundle.model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    image_logits = out.logits[0, :, tiny_vocab.image_id_tensor()]
    assert image_logits.min() > torch.finfo(image_logits.dtype).min / 2
    # transformers' own class masks them: the reason MedMaxChameleon exists
    plain = ChameleonForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert plain(input_ids=ids).logits[0, :, tiny_vocab.image_id_tensor()].max() == torch.finfo(torch.float32).min


def test_training_on_image_codes_lowers_the_loss(tiny_model_dir, tiny_vocab):
    model = load_model_dir(tiny_model_dir).model.train()
    ids = torch.cat([torch.tensor([tiny_vocab.bos_id, tiny_vocab.boi_id]), tiny_vocab.codes_to_ids(torch.arange(64) % 7)])[None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda x: x == x and x < 1e4, losses))
    assert losses[-1] < losses[0] * 0.5


def test_model_folder_is_a_standard_chameleon_checkpoint(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["ChameleonForConditionalGeneration"]
    plain = ChameleonForConditionalGeneration.from_pretrained(tiny_model_dir)
    ours = MedMaxChameleon.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 9000, 9001, 9002]])
    text = slice(8712, None)  # text logits agree; only the image-code mask differs
    torch.testing.assert_close(plain(input_ids=ids).logits[..., text], ours(input_ids=ids).logits[..., text])


def test_labelled_positions_loss_equals_the_full_head_loss(tiny_model_dir, tiny_vocab):
    model = MedMaxChameleon.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    ids = torch.randint(8712, tiny_vocab.size, (3, 40))
    labels = ids.clone()
    labels[:, :25] = -100  # loss on the answers only
    labels[1, 30:] = -100
    model.eval()
    full = model(input_ids=ids, labels=labels).loss
    full.backward()
    grad_full = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.train()  # dropout is 0 in these configs, so train mode changes nothing but the head path
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, full, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, grad_full, rtol=1e-4, atol=1e-7)
    # with Trainer's num_items_in_batch (gradient accumulation) the sum is divided by that count
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(summed, full * (labels[:, 1:] != -100).sum() / 100, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ memory check
def test_parameter_estimate_matches_the_real_count(tiny_tokenizer):
    from medmax.model import estimate_parameter_bytes
    from medmax.model import chameleon_config
    from medmax.presets import VQGAN_PRESETS

    for preset, vq in (("tiny", "tiny"), ("small", "tiny"), ("7b", "chameleon")):
        config = chameleon_config(preset, tiny_tokenizer, VQGAN_PRESETS[vq])
        with torch.device("meta"):  # counts without allocating
            real = sum(p.numel() for p in MedMaxChameleon(config).parameters())
        assert abs(estimate_parameter_bytes(config, torch.bfloat16) / 2 - real) < 0.01 * real, preset


def _folder_with(tiny_model_dir, tmp_path, **sizes):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **sizes}))
    return folder


def test_an_absurd_config_is_refused_before_allocating(tiny_model_dir, tmp_path):
    import time

    from medmax.model import ModelTooLargeError

    folder = _folder_with(tiny_model_dir, tmp_path, num_hidden_layers=100000, hidden_size=4096, intermediate_size=11008)
    start = time.perf_counter()
    try:
        load_model_dir(folder)
    except ModelTooLargeError as err:
        message = str(err)
    else:
        raise AssertionError("an 8-TB model was loaded")
    assert time.perf_counter() - start < 10
    assert f"{folder / 'config.json'}" in message and "100000 layers" in message and "--skip-memory-check" in message


def test_the_check_uses_available_memory_and_can_be_overridden(tiny_model_dir, monkeypatch, caplog):
    import medmax.model
    from medmax.model import ModelTooLargeError

    monkeypatch.setattr(medmax.model, "_available_bytes", lambda device=None: 1 << 20)  # 1 MiB free
    with pytest.raises(ModelTooLargeError, match="only 1.0 MiB"):
        load_model_dir(tiny_model_dir)
    assert load_model_dir(tiny_model_dir, skip_memory_check=True).model is not None
    assert "the check was overridden" in caplog.text


def test_saving_a_model_folder_on_a_cpu_machine_prints_no_deepspeed_probe(tiny_model_dir, tmp_path):
    """save_pretrained's unwrap (accelerate) imports an installed DeepSpeed only for an isinstance check; its
    accelerator probe then printed "Setting accelerator to CPU" in export, convert and quickstart."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("the probe only warns without CUDA")
    code = ("import sys; from medmax.model import load_model_dir, save_model_dir; b = load_model_dir(sys.argv[1]); "
            "save_model_dir(sys.argv[2], b.model, b.tokenizer, b.vqgan); import deepspeed.accelerator as a; "
            "print(type(a.get_accelerator()).__name__)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(tmp_path / "saved")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Setting accelerator" not in done.stderr + done.stdout
    assert done.stdout.strip() == "CPU_Accelerator" and "DS_ACCELERATOR" not in env
    load_model_dir(tmp_path / "saved")


def test_forward_passes_no_deprecated_argument_and_returns_the_cache(tiny_model_dir, tiny_vocab):
    """Issue 23: every forward warned that `past_key_values` is deprecated (transformers' name is `cache`)."""
    import warnings

    from transformers import DynamicCache

    model = load_model_dir(tiny_model_dir).model
    ids = torch.tensor([[tiny_vocab.bos_id, 5, 6, 7]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        cached = model(input_ids=ids, use_cache=True, cache=DynamicCache(config=model.config))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert cached.cache.get_seq_length() == 4
