"""A synthetic biomedical-style image set for the quickstart and tests: grey "scans", some with a bright lesion.

Each image is a noisy grey ellipse (the "body") on a dark background; half carry a bright round
lesion in one of four quadrants, of varying size. Every image comes with a closed (yes/no)
question, a four-way multiple-choice question on the lesion's position (or its absence), an open
question and a caption, so the whole pipeline (VQA training, evaluation, image generation from a
caption) has something learnable to work on. Everything is drawn from one seed.

:func:`faithfulness` measures text-to-image faithfulness on this task: for images drawn from prompts
naming a lesion's size and quadrant, :func:`locate_lesion` finds the brightest blob in the decoded
pixels, and the share whose quadrant and size both match the prompt is compared with chance (1/8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .jsonl import write_jsonl

GENERATION_PREFIX = "Generate a scan: "
POSITIONS = ("upper left", "upper right", "lower left", "lower right")
_CENTRES = {"upper left": (0.3, 0.3), "upper right": (0.7, 0.3), "lower left": (0.3, 0.7), "lower right": (0.7, 0.7)}
SIZES = ("small", "large")


@dataclass(frozen=True)
class Scan:
    """One synthetic image and its ground truth."""

    name: str
    image: Image.Image
    lesion: bool
    position: str | None  # one of POSITIONS when lesion
    size: str | None  # one of SIZES when lesion

    @property
    def caption(self) -> str:
        if not self.lesion:
            return "A grey scan with no lesion."
        return f"A grey scan with a {self.size} bright lesion in the {self.position}."

    def questions(self) -> list[dict]:
        """Closed, multiple-choice and open questions with their answers (MedMax eval fields)."""
        where = self.position if self.lesion else "no lesion"
        options = list(POSITIONS)
        letter = "ABCD"[options.index(self.position)] if self.lesion else None
        mcq = [
            {
                "question_type": "closed",
                "prompt": "Is there a lesion in this scan?",
                "answer": "yes" if self.lesion else "no",
            },
            {
                "question_type": "open",
                "prompt": "Where is the lesion located?",
                "answer": where,
            },
        ]
        if self.lesion:
            choices = " ".join(f"{'ABCD'[i]}) {opt}" for i, opt in enumerate(options))
            mcq.append({
                "question_type": "mcq",
                "prompt": f"Where is the lesion? {choices}",
                "answer": letter,
                "options": options,
            })
        return mcq


def _render(rng: np.random.Generator, size, lesion: bool, position: str | None, lesion_size: str | None) -> np.ndarray:
    """``size``: a side, or (height, width) for a non-square scan (shapes and lesions scale with each side)."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]  # (H, W) in [0, 1)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04)
    rx, ry = rng.uniform(0.40, 0.47), rng.uniform(0.40, 0.47)
    body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    level = rng.uniform(90, 130)
    img = np.where(body, level, rng.uniform(5, 20))
    img = img + rng.normal(0, rng.uniform(4, 12), img.shape)  # acquisition noise
    if lesion:
        px, py = _CENTRES[position]
        px, py = px + rng.uniform(-0.05, 0.05), py + rng.uniform(-0.05, 0.05)
        radius = rng.uniform(0.07, 0.10) if lesion_size == "small" else rng.uniform(0.13, 0.17)
        disk = (xx - px) ** 2 + (yy - py) ** 2 <= radius**2
        img = np.where(disk, rng.uniform(200, 245) + rng.normal(0, 5, img.shape), img)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scans(n: int, seed: int = 0, size: int | tuple[int, int] = 96, lesion_fraction: float = 0.5) -> list[Scan]:
    """``n`` scans of ``size`` px (a side, or (height, width)); about ``lesion_fraction`` of them carry a lesion, positions and sizes balanced."""
    rng = np.random.default_rng(seed)
    scans = []
    for i in range(n):
        lesion = bool(rng.random() < lesion_fraction)
        position = POSITIONS[int(rng.integers(4))] if lesion else None
        lesion_size = SIZES[int(rng.integers(2))] if lesion else None
        pixels = _render(rng, size, lesion, position, lesion_size)
        scans.append(Scan(f"scan_{seed}_{i:05d}", Image.fromarray(pixels, mode="L"), lesion, position, lesion_size))
    return scans


# DICOM files bundled with pydicom that the quickstart passes through the image tokenizer,
# to show real medical formats (CT, MR, ultrasound palette, multi-frame, JPEG 2000, YBR colour).
# Only files that ship inside the package: pydicom's get_testdata_file() would try to download the others.
DICOM_SAMPLES = (
    "CT_small.dcm", "MR_small.dcm", "examples_palette.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm",
    "liver_1frame.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtdose.dcm", "JPEG-lossy.dcm",
    "MR_small_jp2klossless.dcm", "SC_rgb_rle_2frame.dcm",
)


def bundled_dicom_folder():
    """The folder of DICOM test files that ships inside the pydicom package (no download)."""
    from pathlib import Path

    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def training_rows(scan: Scan, image_path: str, generation: bool = True) -> list[dict]:
    """MedMax-format rows (``text`` with ``<image>`` and ``<reserved08706>``) for one training scan.

    One row per question (image, question, end of turn, answer: ``medmax.prompting``'s one layout), and with ``generation`` one
    image-generation row (caption, end of turn, the image as the answer, so its codes carry loss).
    """
    from .prompting import place_images
    from .vocab import END_OF_TURN, IMAGE_PLACEHOLDER

    rows = [
        {"text": f"{place_images(q['prompt'], 1)}{END_OF_TURN}{q['answer']}", "image_path": image_path,
         "source": "synthetic", "task": f"vqa_{q['question_type']}"}
        for q in scan.questions()
    ]
    if generation:
        rows.append({"text": f"{generation_prompt(scan)}{END_OF_TURN}{IMAGE_PLACEHOLDER}",
                     "image_path": image_path, "source": "synthetic", "task": "image_generation"})
    return rows


def eval_rows(scan: Scan, image_path: str, task_names: dict[str, str]) -> list[dict]:
    """Rows in MedMax's eval schema (task_name, question_type, prompt, answer, image_path)."""
    return [
        {"task_name": task_names[q["question_type"]], "question_type": q["question_type"], "prompt": q["prompt"],
         "answer": q["answer"], "image_path": image_path}
        for q in scan.questions()
    ]


def _write_csv(path, img_paths: list[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_path"])
        writer.writerows([[p] for p in img_paths])


def write_dataset(folder, n_train: int, n_test: int, seed: int = 0, n_dicom: int = 0,
                  task_names: dict[str, str] | None = None, generation_every: int = 2) -> dict:
    """Write the quickstart's data folder and return the paths of what it wrote.

    ``folder/images/*.png`` and ``folder/dicom/*.dcm``; ``images.csv`` (``img_path``, relative to the
    folder) for the image tokenizer; ``train_images.csv``, the training scans alone (what a VQGAN may be
    trained on, so that held-out scans stay unseen by every step); ``train.jsonl`` and ``heldout.jsonl`` in MedMax's training
    format (shuffled; every ``generation_every``-th scan also gets an image-generation row (not every scan, since
    its 64 image codes cost as much training time as several questions)); ``eval/eval.jsonl`` in
    MedMax's eval schema (held-out scans only) with its images. The returned ``heldout_lesions`` lists each
    held-out scan with a lesion: its generation prompt, the lesion's position and size, and its image.
    """
    import shutil
    from pathlib import Path

    folder = Path(folder)
    task_names = task_names or {"closed": "synthetic", "mcq": "synthetic", "open": "synthetic"}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "eval" / "images").mkdir(parents=True, exist_ok=True)
    scans = make_scans(n_train + n_test, seed=seed)
    paths, train, heldout, evalset, lesions = [], [], [], [], []
    for i, scan in enumerate(scans):
        rel = f"images/{scan.name}.png"
        scan.image.save(folder / rel)
        paths.append(rel)
        rows = training_rows(scan, rel, generation=generation_every > 0 and i % generation_every == 0)
        if i < n_train:
            train += rows
        else:
            heldout += rows
            scan.image.save(folder / "eval" / rel)
            evalset += eval_rows(scan, rel, task_names)
            if scan.lesion:
                lesions.append({"prompt": generation_prompt(scan), "position": scan.position, "size": scan.size,
                                "image_path": rel})
    dicoms = []
    if n_dicom:
        (folder / "dicom").mkdir(exist_ok=True)
        for name in DICOM_SAMPLES[:n_dicom]:
            shutil.copy(bundled_dicom_folder() / name, folder / "dicom" / name)
            dicoms.append(f"dicom/{name}")
    _write_csv(folder / "images.csv", paths + dicoms)
    _write_csv(folder / "train_images.csv", paths[:n_train])
    np.random.default_rng(seed).shuffle(train)
    write_jsonl(folder / "train.jsonl", train, sort_keys=False)
    write_jsonl(folder / "heldout.jsonl", heldout, sort_keys=False)
    write_jsonl(folder / "eval" / "eval.jsonl", evalset, sort_keys=False)
    return {
        "images_csv": folder / "images.csv",
        "train_images_csv": folder / "train_images.csv",
        "train_jsonl": folder / "train.jsonl",
        "heldout_jsonl": folder / "heldout.jsonl",
        "eval_dir": folder / "eval",
        "n_images": len(paths),
        "n_dicom": len(dicoms),
        "n_train_rows": len(train),
        "n_eval_rows": len(evalset),
        "heldout_lesions": lesions,
    }


# ------------------------------------------------------------------------------ text-to-image faithfulness
SIZE_BOUNDARY = 0.115  # lesion radius / image width: small lesions are drawn at 0.07-0.10, large at 0.13-0.17
MIN_CONTRAST = 40.0  # grey levels the brightest blob must stand above the body to count as a lesion


def _smooth(a: np.ndarray) -> np.ndarray:
    """3x3 box mean (edges replicated), so a single noisy pixel is not the brightest blob."""
    p = np.pad(a, 1, mode="edge")
    return sum(p[dy : dy + a.shape[0], dx : dx + a.shape[1]] for dy in range(3) for dx in range(3)) / 9.0


def _blob(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` containing ``seed``: (N, 2) pixel coordinates."""
    seen = np.zeros_like(mask)
    stack, pixels = [seed], []
    seen[seed] = True
    while stack:
        y, x = stack.pop()
        pixels.append((y, x))
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                stack.append((ny, nx))
    return np.array(pixels)


def _brightest_blob(image: Image.Image) -> tuple[np.ndarray, int, int] | None:
    """(N, 2) pixels of the brightest blob (see :func:`locate_lesion`) and the image's (H, W); None without one."""
    a = _smooth(np.asarray(image.convert("L"), dtype=np.float64))  # (H, W)
    h, w = a.shape
    body = float(np.median(a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]))
    peak_at = np.unravel_index(int(np.argmax(a)), a.shape)
    if a[peak_at] - body < MIN_CONTRAST:
        return None
    return _blob(a >= (body + a[peak_at]) / 2, peak_at), h, w


def locate_lesion(image: Image.Image) -> tuple[str, str] | None:
    """Where the brightest blob lies and how large it is: (position, size) from POSITIONS x SIZES, or None.

    The blob is the connected region around the brightest (smoothed) pixel that is brighter than half
    way between the body's grey level and that peak; its centroid gives the quadrant, its area the
    radius (small below SIZE_BOUNDARY of the side; of sqrt(height x width) for a non-square image). A peak less than MIN_CONTRAST above the body
    is no lesion. Works on decoded (blurry) images as well as on the rendered scans.
    """
    found = _brightest_blob(image)
    if found is None:
        return None
    pixels, h, w = found
    cy, cx = pixels.mean(axis=0) / np.array([h, w])
    position = f"{'upper' if cy < 0.5 else 'lower'} {'left' if cx < 0.5 else 'right'}"
    radius = np.sqrt(len(pixels) / np.pi / (h * w))  # of the side for a square; of the geometric mean side otherwise
    return position, SIZES[0] if radius < SIZE_BOUNDARY else SIZES[1]


def lesion_box(image: Image.Image, margin: float = 0.03) -> list[float] | None:
    """The brightest blob's bounding box (as :func:`locate_lesion` finds it), [x0, y0, x1, y1] in fractions
    of the image, widened by ``margin``; None when there is no lesion. The region MMedPO-style noising covers."""
    found = _brightest_blob(image)
    if found is None:
        return None
    (ys, xs), h, w = found[0].T, found[1], found[2]
    return [float(max(0.0, xs.min() / w - margin)), float(max(0.0, ys.min() / h - margin)),
            float(min(1.0, (xs.max() + 1) / w + margin)), float(min(1.0, (ys.max() + 1) / h + margin))]


def generation_prompt(scan: Scan) -> str:
    """The text a training row asks to draw ``scan`` with; it names the lesion's size and quadrant."""
    return f"{GENERATION_PREFIX}{scan.caption}"


def faithfulness(images: list[Image.Image], targets: list[tuple[str, str]]) -> dict:
    """Share of images whose brightest blob matches the requested (position, size), against chance 1/8.

    Also the shares for position alone (chance 1/4) and size alone (chance 1/2), and what was found per image.
    """
    found = [locate_lesion(im) for im in images]
    both = [f == tuple(t) for f, t in zip(found, targets)]
    where = [f is not None and f[0] == t[0] for f, t in zip(found, targets)]
    size = [f is not None and f[1] == t[1] for f, t in zip(found, targets)]
    n = max(len(targets), 1)
    return {"n": len(targets), "match": sum(both) / n, "chance": 1 / (len(POSITIONS) * len(SIZES)),
            "position_match": sum(where) / n, "size_match": sum(size) / n, "no_lesion_found": found.count(None),
            "found": [list(f) if f else None for f in found]}
