"""The Models tab: the zoo as a table, and each model's card."""

from __future__ import annotations

import gradio as gr

from dense import zoo

COLUMNS = ["id", "task", "architecture", "params (M)", "licence", "where"]


def zoo_table() -> list[list]:
    return [[m.id, m.task, m.architecture, round(m.params / 1e6, 2), m.licence, m.location]
            for m in zoo.list_models()]


def card(model_id: str | None) -> str:
    """The model card, without its YAML front matter, or a hint when nothing is chosen."""
    if not model_id:
        return "Choose a model to read its card."
    try:
        text = zoo.model_card(model_id)
    except zoo.ModelError as err:
        return f"**{err}**"
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    return text.strip() or f"`{model_id}` has no model card."


def build() -> None:
    rows = zoo_table()
    gr.Markdown(
        "Every model below is bundled in `weights/` (Hugging Face Hub layout: `config.json`, "
        "`model.safetensors`, `README.md`), verified by sha256 before loading. From Python: "
        "`dense.load('id')`, a folder, or a Hub repo `org/name@revision`."
    )
    gr.Dataframe(value=rows, headers=COLUMNS, interactive=False, wrap=True)
    first = rows[0][0] if rows else None
    choice = gr.Dropdown([r[0] for r in rows], label="Model card", value=first)
    text = gr.Markdown(card(rows[0][0]) if rows else "")
    choice.change(card, choice, text)
