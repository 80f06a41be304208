"""The model card (a model folder's ``README.md``): one template for every model we train and
export (restoration, segmentation, keypoints, the upsampling lab).

A card is the Hub's YAML front matter, the model id as title, then labelled paragraphs in a
fixed order — task, architecture, input/output, training, measured, licence — each written by
the task from its config and the metrics its export measured, so that no figure in a card is
typed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

# The paragraphs every card has, in this order; a task may add more after "Measured".
SECTIONS = ("Task", "Architecture", "Input", "Training", "Measured", "Licence")


def front_matter(licence: str, tags: Sequence[str], datasets: Sequence[str] = ()) -> str:
    """The Hub's YAML front matter of a card (between its two ``---`` lines, both included):
    written here once for our cards and the converters' cards of ported models."""
    lines = [f"license: {licence}", "library_name: dense", f"tags: [{', '.join(tags)}]"]
    if datasets:
        lines.append(f"datasets: [{', '.join(datasets)}]")
    return "---\n" + "\n".join(lines) + "\n---\n"


def model_card(model_id: str, *, licence: str, tags: Sequence[str],
               sections: dict[str, str], datasets: Sequence[str] = (),
               extra: str = "") -> str:
    """The card of ``model_id``: ``sections`` maps a label to its Markdown text, shown in the
    order of :data:`SECTIONS` with any other labels before the licence; ``extra`` (the measured
    tables and notes) follows the "Measured" paragraph (or, without one, comes before the
    licence)."""
    others = [label for label in sections if label not in SECTIONS]
    order = [label for label in (*SECTIONS[:-1], *others, SECTIONS[-1]) if label in sections]
    before_licence = order[:-1] if order and order[-1] == SECTIONS[-1] else order
    anchor = "Measured" if "Measured" in sections else (before_licence or [None])[-1]
    parts = [] if anchor or not extra.strip() else [extra.strip()]
    for label in order:
        parts.append(f"**{label}:** {sections[label].strip()}")
        if label == anchor and extra.strip():
            parts.append(extra.strip())
    return front_matter(licence, tags, datasets) + f"# {model_id}\n\n" + "\n\n".join(parts) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` per column: "l" (default) or "r"."""
    align = align or ["l"] * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)
