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
