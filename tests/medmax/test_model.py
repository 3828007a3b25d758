import json

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
