"""An evaluation's result: its JSON record, one-line summary, table row and place in a run folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class EvalResult:
    name: str  # G-EMA, G, or a real dataset
    step: int | None
    extractor: str
    extractor_fingerprint: str
    num_samples: int
    reference_url: str
    reference_hash: str
    num_reference: int
    metrics: dict[str, float]  # fid, kid, kid_std, is, is_std, accuracy
    classifier_accuracy: float | None  # the dataset classifier on held-out real images
    classifier_held_out: str
    world_size: int
    seconds: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def summary(self) -> str:
        m = self.metrics
        parts = [f"{self.name}" + (f" step {self.step}" if self.step is not None else "")]
        if "fid" in m:
            parts.append(f"FID {m['fid']:.2f}")
        if "kid" in m:
            parts.append(f"KID {m['kid'] * 1e3:.2f}e-3 ± {m['kid_std'] * 1e3:.2f}e-3")
        if "is" in m:
            parts.append(f"IS {m['is']:.2f} ± {m['is_std']:.2f}")
        if "accuracy" in m:
            parts.append(
                f"accuracy {100 * m['accuracy']:.1f}% (real {100 * (self.classifier_accuracy or 0):.1f}%)"
            )
        return (
            f"{', '.join(parts)} ({self.extractor}, {self.num_samples} samples vs {self.num_reference} real)"
        )


def eval_result_name(step: int, extractor: str) -> str:
    """Where an evaluation's JSON goes in a run folder, from training and from ``sagan eval`` alike."""
    return f"eval/step_{step:07d}-{extractor}.json"


def format_table(results: list[EvalResult]) -> str:
    header = ["", "step", "samples", "extractor", "FID", "KID ×1e3", "IS", "accuracy", "real acc."]
    rows = [header]
    for r in results:
        m = r.metrics
        rows.append(
            [
                r.name,
                "" if r.step is None else str(r.step),
                str(r.num_samples),
                r.extractor,
                f"{m['fid']:.2f}" if "fid" in m else "",
                f"{m['kid'] * 1e3:.2f} ± {m['kid_std'] * 1e3:.2f}" if "kid" in m else "",
                f"{m['is']:.2f} ± {m['is_std']:.2f}" if "is" in m else "",
                f"{100 * m['accuracy']:.1f}%" if "accuracy" in m else "",
                f"{100 * r.classifier_accuracy:.1f}%" if r.classifier_accuracy is not None else "",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
