"""The lessons' comparisons, read from the zoo's recorded runs (never from a live quick run).

A lesson that compares detectors shows :func:`seed_table` (mean ± sample std over the trained
seeds), :func:`claim` (what the recorded numbers do and do not support) and the recorded training
curves (:func:`loss_curve`, :func:`val_curve`, drawn by ``labkit.viz.recorded``).

:data:`LESSON_CLAIMS` lists every comparison a notebook's text makes, with the verdict the text
states; ``tests/test_zoo_claims.py`` re-derives each verdict from ``data/zoo/MANIFEST.json``, so a
new seed that changes a verdict fails the suite until the text is updated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from labkit import zoo
from labkit.data import CocoDetection

__all__ = [
    "Claim",
    "LESSON_CLAIMS",
    "LessonClaim",
    "claim",
    "loss_curve",
    "object_sizes",
    "seed_table",
    "val_curve",
]

ABOVE = "above"
WITHIN_NOISE = "within noise"
TOO_FEW_SEEDS = "too few seeds"


@dataclass(frozen=True)
class Claim:
    """What the recorded seeds say about ``first`` against ``second`` on ``metric``.

    ``verdict`` is ``"above"`` (first's mean exceeds second's by more than the seed spread, the
    sum of the two sample standard deviations), ``"below"`` (the reverse), ``"within noise"``
    or ``"too few seeds"`` (fewer than two seeds on either side: no spread, no claim).
    """

    first: str
    second: str
    metric: str
    n_first: int
    n_second: int
    mean_first: float | None
    mean_second: float | None
    difference: float | None
    spread: float | None
    verdict: str

    @property
    def sentence(self) -> str:
        """The verdict in words, with its numbers."""
        if self.verdict == TOO_FEW_SEEDS:
            return (
                f"{self.first} vs {self.second}: {self.n_first} and {self.n_second} recorded "
                f"seed(s); at least two each are needed before a difference means anything"
            )
        detail = (
            f"{self.metric} {self.mean_first:.3f} vs {self.mean_second:.3f} (n = "
            f"{self.n_first}, {self.n_second}): difference {self.difference:+.3f}, seed spread "
            f"{self.spread:.3f}"
        )
        if self.verdict == WITHIN_NOISE:
            return f"{self.first} vs {self.second}: within noise; {detail}"
        return f"{self.first} is {self.verdict} {self.second}; {detail}"


def claim(first: str, second: str, metric: str = "AP", root: Path | None = None) -> Claim:
    """Compare two zoo names over their recorded seeds (see :class:`Claim` for the rule)."""
    a, b = zoo.compare([first, second], metric, root)
    if a["n"] < 2 or b["n"] < 2:
        return Claim(first, second, metric, a["n"], b["n"], a["mean"], b["mean"], None, None,
                     TOO_FEW_SEEDS)  # fmt: skip
    difference = a["mean"] - b["mean"]
    spread = a["std"] + b["std"]
    if abs(difference) <= spread:
        verdict = WITHIN_NOISE
    else:
        verdict = ABOVE if difference > 0 else "below"
    return Claim(first, second, metric, a["n"], b["n"], a["mean"], b["mean"], difference, spread,
                 verdict)  # fmt: skip


def seed_table(
    names: list[str], metrics: tuple[str, ...] = ("AP", "AP50"), root=None, every_seed: bool = False
) -> str:
    """A text table: per zoo name, the number of seeds and mean ± std of each metric, then every
    seed's value of the first metric. Untrained names show ``-``.

    With ``every_seed`` each name's row is instead followed by one row per seed (``  seed S``)
    giving that seed's value of every metric, under the metric's column."""
    head = f"{'model':<24} {'seeds':>5}" + "".join(f" {m + ' mean ± std':>19}" for m in metrics)
    lines = [head if every_seed else head + f"   per seed ({metrics[0]})"]
    for name in names:
        columns = [zoo.compare([name], metric, root)[0] for metric in metrics]
        cols = columns[0]
        text = f"{name:<24} {cols['n']:>5}"
        for c in columns:
            if c["n"] == 0:
                text += f" {'-':>19}"
            elif c["std"] is None:
                text += f" {c['mean']:>10.3f} ± {'n/a':<6}"
            else:
                text += f" {c['mean']:>10.3f} ± {c['std']:<6.3f}"
        if every_seed:
            lines.append(text.rstrip() if cols["n"] else text + "   not trained")
            by_seed = [dict(zip(c["seeds"], c["values"], strict=True)) for c in columns]
            for seed in cols["seeds"]:
                values = "".join(
                    f" {v[seed]:>10.3f}{'':<9}" if seed in v else f" {'-':>10}{'':<9}"
                    for v in by_seed
                )
                lines.append(f"{'  seed ' + str(seed):<24} {'':>5}{values}".rstrip())
            continue
        per_seed = ", ".join(
            f"s{s}: {v:.3f}" for s, v in zip(cols["seeds"], cols["values"], strict=True)
        )
        lines.append(text + f"   {per_seed or 'not trained'}")
    return "\n".join(lines)


def _log(name: str, seed: int, root: Path | None) -> list[dict]:
    path = (root or zoo.zoo_dir()) / f"{name}-seed{seed}.log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"name, seed: no recorded log {path} (labkit zoo train {name})")
    return zoo.log_records(path)


def loss_curve(name: str, seed: int, key: str = "loss", root=None) -> tuple[list, list]:
    """``(iterations, values)`` of a logged training quantity of zoo run ``name``/``seed``."""
    rows = [r for r in _log(name, seed, root) if r["mode"] == "train" and key in r]
    return [r["iter"] for r in rows], [float(r[key]) for r in rows]


def val_curve(name: str, seed: int, metric: str = "AP", root=None) -> tuple[list, list]:
    """``(iterations, values)`` of a validation metric of zoo run ``name``/``seed`` (per epoch)."""
    rows = [r for r in _log(name, seed, root) if r["mode"] == "val"]
    return [r["iter"] for r in rows], [float(r[metric]) for r in rows]


@dataclass(frozen=True)
class LessonClaim:
    """A comparison a notebook's text states: ``claim(first, second, metric).verdict == verdict``,
    in the words of ``phrase``, which appears verbatim in the notebook's markdown."""

    notebook: str
    first: str
    second: str
    metric: str
    verdict: str
    phrase: str


# Every comparison the notebooks' text makes from recorded runs. Change a verdict here only
# together with the sentence in the notebook that states it.
LESSON_CLAIMS: tuple[LessonClaim, ...] = (
    LessonClaim("02_assignment.ipynb", "atss", "retinanet", "AP", ABOVE,
                "ATSS is above RetinaNet by more than the seed spread"),
    LessonClaim("02_assignment.ipynb", "paa", "retinanet", "AP", ABOVE,
                "and so is PAA (0.173 against 0.036)"),
    LessonClaim("02_assignment.ipynb", "paa", "atss", "AP", WITHIN_NOISE,
                "PAA and ATSS are within noise of each other"),
    LessonClaim("03_fcos_centerness.ipynb", "fcos", "fcos_no_centerness", "AP", WITHIN_NOISE,
                "FCOS with and without centerness are within noise on AP"),
    LessonClaim("03_fcos_centerness.ipynb", "fcos", "fcos_no_centerness", "AP75", WITHIN_NOISE,
                "the difference is also within noise on AP75"),
    LessonClaim("03_fcos_centerness.ipynb", "fcos_uniform_giou_bf16", "fcos_bf16", "AP",
                WITHIN_NOISE, "the two weightings are within noise"),
    LessonClaim("06_codetr_auxiliary_queries.ipynb", "co_deformable_detr_atss", "deformable_detr",
                "AP", ABOVE,
                "Both Co-DETRs are above Deformable-DETR++ by more than the seed spread"),
    LessonClaim("06_codetr_auxiliary_queries.ipynb", "co_deformable_detr", "deformable_detr",
                "AP", ABOVE, "Both Co-DETRs are above Deformable-DETR++ by more than the seed spread"),
    LessonClaim("06_codetr_auxiliary_queries.ipynb", "co_deformable_detr",
                "co_deformable_detr_atss", "AP", WITHIN_NOISE,
                "Between the two Co-DETRs the difference is within noise"),
)  # fmt: skip


def mean_of(name: str, metric: str = "AP", root=None) -> float | None:
    """The mean of ``metric`` over the recorded seeds of ``name`` (``None`` when untrained)."""
    return zoo.compare([name], metric, root)[0]["mean"]


def object_sizes(dataset: CocoDetection, small_area: float = 32.0**2, side: float = 16.0) -> dict:
    """How small the objects of a COCO-format ``dataset`` are, as COCO evaluation counts them.

    Over the non-crowd annotations of the dataset's images, returns ``{"objects": n,
    "coco_small": share whose annotation ``area`` is below ``small_area`` (COCO's "small", the
    objects APs is computed on), "under_side": share whose box side sqrt(w * h) is below
    ``side`` px}``, shares in [0, 1] (``0.0`` when there are no objects).
    """
    images = set(dataset.image_ids)
    anns = [a for a in dataset.coco.dataset["annotations"]
            if a["image_id"] in images and not a.get("iscrowd", 0)]  # fmt: skip
    n = len(anns)
    small = sum(a["area"] < small_area for a in anns)
    tiny = sum(math.sqrt(a["bbox"][2] * a["bbox"][3]) < side for a in anns)
    return {"objects": n, "coco_small": small / max(n, 1), "under_side": tiny / max(n, 1)}
