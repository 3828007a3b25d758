"""The task registry: MedMax's 12 VQA tasks plus captioning, image generation, visual chat and mm_out, and the
benchmarks beyond MedMax's suite (VLMEvalKit TSVs, GMAI-MMBench, MMMU's health subjects, MedXpertQA-MM).

A task is one (task_name, question_type) of MedMax's eval schema; its key in results.json is
MedMax's ``"{task}_{type}"`` (``vqa_rad_closed``, ``image_captioning_pmc_oa``). The keys match MedMax's,
but the numbers compare with MedMax's paper only under ``--protocol medmax`` (eval/medmax_protocol.py):
the default toolkit protocol scores with other rules and a longer answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from medmax.errors import UserError

# kind -> default generation length (new tokens). Closed and MCQ get a short answer, not MedMax's single token.
DEFAULT_MAX_NEW_TOKENS = {
    "closed": 8,
    "mcq": 8,
    "probmed": 8,
    "open": 32,
    "captioning": 96,
    "image_generation": 0,  # decided by the VQGAN grid
    "visual_chat": 256,
    "mm_out": 256,
    "image_editing": 0,  # one image (eval/editing.py)
}


@dataclass(frozen=True)
class Task:
    name: str  # MedMax task_name
    type: str | None  # MedMax question_type; None: every question_type of this task_name
    kind: str  # scoring rule, a key of DEFAULT_MAX_NEW_TOKENS

    @property
    def key(self) -> str:
        return f"{self.name}_{self.type}" if self.type else self.name

    @property
    def needs_clip(self) -> bool:
        return self.kind in ("captioning", "image_generation")

    def matches(self, task_name: str, question_type: str) -> bool:
        return task_name == self.name and (self.type is None or question_type == self.type)


VQA_TASKS = [
    Task("vqa_rad", "closed", "closed"),
    Task("slake", "closed", "closed"),
    Task("pathvqa", "closed", "closed"),
    Task("quilt_vqa", "closed", "closed"),
    Task("vqa_rad", "open", "open"),
    Task("slake", "open", "open"),
    Task("pathvqa", "open", "open"),
    Task("quilt_vqa", "open", "open"),
    Task("pmc_vqa", "mcq", "mcq"),
    Task("omnimed_vqa", "mcq", "mcq"),
    Task("path_mmu", "mcq", "mcq"),
    Task("probmed", "closed", "probmed"),
]
CAPTION_SOURCES = ("pmc_oa", "quilt", "report")
TASKS: list[Task] = (
    VQA_TASKS
    + [Task("image_captioning", s, "captioning") for s in CAPTION_SOURCES]
    + [Task("image_generation", s, "image_generation") for s in CAPTION_SOURCES]
    + [Task("visual_chat", None, "visual_chat"), Task("mm_out", None, "mm_out")]
)
# Benchmarks beyond MedMax's suite, read by eval/data.py's converters. Part of `all`, but reported apart from
# MedMax's tasks (results.json's "suite": "beyond_medmax", their own table in report.md), never averaged with them.
BENCHMARK_TASKS: list[Task] = [
    Task("vlmeval_tsv", "mcq", "mcq"), Task("vlmeval_tsv", "closed", "closed"), Task("gmai_mmbench", "mcq", "mcq"),
    Task("mmmu_health", "mcq", "mcq"), Task("mmmu_health", "open", "open"), Task("medxpertqa_mm", "mcq", "mcq"),
]
# Selectable by name but not part of `all`: the quickstart's held-out synthetic scans (medmax.synthetic), M3D-VQA.
EXTRA_TASKS: list[Task] = [Task("synthetic", t, t) for t in ("closed", "mcq", "open")] + [
    Task("m3d_vqa", "mcq", "mcq"), Task("m3d_vqa", "open", "open"),  # 3D volumes (eval.data.convert_m3d_vqa)
]
# Image editing / modality translation (eval/editing.py): any rows named image_editing, and the synthetic edits
# of medmax.synthetic_edits (bench/edit_evidence.py).
EXTRA_TASKS += [Task("image_editing", None, "image_editing"), Task("synthetic_edit", None, "image_editing")]
KNOWN_TASKS: list[Task] = TASKS + BENCHMARK_TASKS + EXTRA_TASKS
MEDMAX_KEYS = frozenset(t.key for t in TASKS)
TASKS_BY_KEY = {t.key: t for t in KNOWN_TASKS}


def select_tasks(spec: str) -> list[Task]:
    """``all``, or comma-separated keys (``vqa_rad_closed``) or task names (``vqa_rad`` = both of its types)."""
    if spec.strip() == "all":
        return list(TASKS + BENCHMARK_TASKS)
    chosen: list[Task] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [t for t in KNOWN_TASKS if t.key == item or t.name == item]
        if not hits:
            raise UserError(f"--tasks: unknown task {item!r}; known: {', '.join(sorted(TASKS_BY_KEY))}")
        chosen += [t for t in hits if t not in chosen]
    if not chosen:
        raise UserError("--tasks: no task named")
    return chosen


def task_for(task_name: str, question_type: str) -> Task | None:
    for task in KNOWN_TASKS:
        if task.matches(task_name, question_type):
            return task
    return None
