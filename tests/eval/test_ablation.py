"""--ablate-image (issue 28): the no-image, blank and shuffled controls, their summary and the flag rule."""

import json

from PIL import Image
from scipy import stats as sps

import eval.run as run
from eval import ablation
from eval.data import EvalRecord


def _rec(i, image="a.png", options=None):
    return EvalRecord(uid=f"f:{i}", task_name="vqa_rad", question_type="closed", prompt=f"q{i}", answer="yes",
                      image_path=image, options=options)


def test_shuffled_partners_are_seeded_and_never_the_row_s_own_image():
    recs = [_rec(i, f"{i % 5}.png") for i in range(20)]
    a = ablation.shuffle_partners(recs, 0, "vqa_rad_closed")
    assert a == ablation.shuffle_partners(recs, 0, "vqa_rad_closed")
    assert a != ablation.shuffle_partners(recs, 1, "vqa_rad_closed")
    assert all(a[r.uid].image_path != r.image_path for r in recs)
    assert len({p.uid for p in a.values()}) > 5  # not one partner for everybody
    same = ablation.shuffle_partners([_rec(i) for i in range(3)], 0, "k")
    assert set(same.values()) == {None}
    embedded = [EvalRecord("e:0", "t", "closed", "q", "yes", "x.png", image_bytes=b"1"),
                EvalRecord("e:1", "t", "closed", "q", "yes", "x.png", image_bytes=b"2")]
    assert ablation.shuffle_partners(embedded, 0, "k")["e:0"].uid == "e:1"  # same name, other content


def test_each_condition_sends_the_prompt_it_names():
    real = Image.new("RGB", (40, 30), (200, 10, 10))
    other = Image.new("RGB", (64, 64), (0, 200, 0))
    recs = [_rec(0, "0.png"), _rec(1, "1.png")]
    partners = {"f:0": recs[1], "f:1": None}
    items = [(rec, ["text", real, "end"], real, {"output": "yes", "correct": True}) for rec in recs]
    sent = []

    def generate(prompts):
        sent.append(prompts)
        return [type("Out", (), {"text": "no"})() for _ in prompts]

    ablation.add_conditions("closed", items, partners, lambda rec: other, generate,
                            lambda rec, out: {"output": out.text, "correct": out.text == rec.answer})
    none, blank, shuffled = sent
    assert none == [["text", "end"], ["text", "end"]]
    assert blank[0][1].size == (40, 30) and blank[0][1].getpixel((3, 3)) == ablation.BLANK_GREY
    assert shuffled == [["text", other, "end"]]  # row 1 had no partner
    row0, row1 = items[0][3], items[1][3]
    assert row0["ablation"]["shuffled"] == {"output": "no", "score": 0.0, "answer": "no"}
    assert row0["ablation"]["real"]["answer"] == "yes"
    assert "no other image" in row1["ablation"]["shuffled"]["error"]


def _rows(real, shuffled):
    return [{"uid": str(i), "output": "yes" if r else "no", "correct": r,
             "ablation": {"real": {"answer": "yes" if r else "no"},
                          "none": {"score": 0.0, "answer": "no"}, "blank": {"score": 0.0, "answer": "no"},
                          "shuffled": {"score": float(s), "answer": "yes" if s else "no"}}}
            for i, (r, s) in enumerate(zip(real, shuffled))]


def test_summary_tests_real_against_shuffled_and_flags_a_score_that_does_not_move():
    looks = ablation.summarize("closed", _rows([True] * 30, [i % 2 == 0 for i in range(30)]), "k")
    assert looks["real"]["score"] == 1.0 and looks["shuffled"]["score"] == 0.5
    assert looks["mcnemar_real_vs_shuffled"]["b"] == 15
    assert looks["mcnemar_real_vs_shuffled"]["p_value"] == sps.binomtest(15, 15).pvalue
    assert looks["shuffled"]["same_as_real"] == 0.5 and looks["shuffled"]["ci95"]["method"] == "wilson"
    assert not looks["flagged"] and ablation.flag_line("k", looks) is None
    blind = [i % 3 != 0 for i in range(30)]
    ignores = ablation.summarize("closed", _rows(blind, blind), "k")
    assert ignores["flagged"] and ignores["shuffled"]["same_as_real"] == 1.0
    assert ablation.flag_line("k", ignores).startswith("k: the score barely moves")


def test_eval_run_reports_the_ablation_and_fingerprints_it(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (48, 40), (60 * i, 90, 30)).save(data / f"{i}.png")
        rows.append({"task_name": "vqa_rad", "question_type": "closed", "prompt": "Is it normal?", "answer": "yes",
                     "image_path": f"{i}.png"})
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--tasks", "vqa_rad_closed",
            "--max-new-tokens", "2", "--device", "cpu", "--ablate-image"]
    assert run.main(argv) == 0
    entry = json.loads((out / "results.json").read_text())["vqa_rad_closed"]["image_ablation"]
    assert set(entry) >= {"real", "none", "blank", "shuffled", "mcnemar_real_vs_shuffled", "flagged"}
    assert entry["shuffled"]["n"] == 4 and entry["flagged"]  # a random tiny model does not look
    preds = [json.loads(line) for line in (out / "predictions" / "vqa_rad_closed.jsonl").read_text().splitlines()]
    assert all(set(p["ablation"]) == {"real", "none", "blank", "shuffled"} for p in preds)
    assert json.loads((out / "fingerprint.json").read_text())["settings"]["ablate_image"] is True
    report = (out / "report.md").read_text()
    assert "## Image ablation" in report and "FLAGGED" in report and "barely moves" in report
