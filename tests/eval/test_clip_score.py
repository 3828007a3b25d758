"""CLIP similarity from a local tiny random CLIPModel folder (nothing downloaded), captioning and image generation end to end."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

import eval.run as run
from medmax.clip_score import ClipScorer


def _main(argv):
    """Run the program as a user would; -> its results.json (None when it wrote none)."""
    assert run.main(argv) == 0
    path = Path(argv[argv.index("--output") + 1]) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def clip_dir(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    vocab = tiny_tokenizer.get_vocab_size(with_added_tokens=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, eos_token_id=2, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    return folder


def test_clip_scores(clip_dir):
    scorer = ClipScorer.from_dir(clip_dir)
    a, b = Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (40, 60), (10, 200, 90))
    assert scorer.pixels(a).shape == (3, 32, 32)
    same = scorer.image_image([a, b], [a, b])
    assert same == pytest.approx([1.0, 1.0], abs=1e-5)
    cross = scorer.image_image([a], [b])[0]
    assert -1.0 <= cross < 0.9999
    texts = scorer.image_text([a, a], ["a round lesion", "a CT scan of the liver"])
    assert all(-1.0 <= t <= 1.0 for t in texts) and texts[0] != texts[1]
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face CLIP folder"):
        ClipScorer.from_dir(clip_dir / "nope")


def test_captioning_and_image_generation_end_to_end(tiny_model_dir, clip_dir, tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (64, 64), (120, 60, 30)).save(data / "img" / "0.png")
    rows = [{"task_name": "image_captioning", "question_type": "report", "prompt": "Describe the image.", "answer": "x", "image_path": "img/0.png"},
            {"task_name": "image_generation", "question_type": "quilt", "prompt": "a pathology slide", "answer": "", "image_path": None}]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "out"), "--device", "cpu",
            "--max-new-tokens", "6", "--tasks", "image_captioning_report,image_generation_quilt", "--clip-model", str(clip_dir)]
    results = _main(argv)
    for key, n in (("image_captioning_report", 1), ("image_generation_quilt", 1)):
        assert results[key]["metric"] == "clip_similarity" and results[key]["n"] == n
        assert -1.0 <= results[key]["score"] <= 1.0
    rows = [json.loads(l) for l in (tmp_path / "out" / "predictions" / "image_generation_quilt.jsonl").read_text().splitlines()]
    with Image.open(tmp_path / "out" / rows[0]["output_image"]) as im:
        assert im.size == (64, 64)
