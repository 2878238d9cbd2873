"""Prompt templates as data, and the HF chat messages they turn an `Example` into.

The messages are rendered later by the model's own chat template (`processor.apply_chat_template`),
so this module only decides the user text and where the `{"type": "image"}` items go.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from vrl_jax.data.formats import Example, SampleFault

IMAGE_TAG = "<image>"
QUESTION_FIELD = "{question}"

# MAYE `maye/datasets/math.py` CHAT_COT_PROMPT, appended to the question (used in every paper run).
MAYE_CHAT_COT_PROMPT = (
    "\nSolve the above mathematics problem, write out the solution process according to the question, "
    "and use the same LaTeX format as the question in the solution process. Please display the final "
    "answer in the format \\boxed{}.")

# EasyR1 `examples/format_prompt/math.jinja`: "{{ content | trim }} " followed by this sentence.
R1_THINK_PROMPT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
    "MUST BE put in \\boxed{}.")

# DyME `data_utils/chart/data_collector.py` PROMPT_TEMPLATE (also A-OKVQA and GSM8K).
DYME_ANSWER_PROMPT = (
    "Your task is to answer the question below. Give step by step thinking before you answer, and "
    "when you're ready to answer, please use the format \"Answer: ..\"\n\nQuestion:\n\n{question}")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes the user turn.

    Attributes:
      name: registry name, for logs and configs.
      text: the user text with `{question}` exactly once (plain replacement, so LaTeX braces such
        as `\\boxed{}` need no escaping).
      strip_question: strip whitespace around the question first (EasyR1's `content | trim`).
      keep_image_tags: put every image first and leave a literal `<image>` in the text, as MAYE's
        code does; otherwise each `<image>` becomes an image item where it stood.
      system: optional system message text.
    """

    name: str
    text: str
    strip_question: bool = False
    keep_image_tags: bool = False
    system: str | None = None

    def __post_init__(self):
        if self.text.count(QUESTION_FIELD) != 1:
            raise ValueError(f"prompt template {self.name!r}: text must contain {QUESTION_FIELD} exactly "
                             f"once, found {self.text.count(QUESTION_FIELD)} times")


TEMPLATES: Mapping[str, PromptTemplate] = types.MappingProxyType({
    t.name: t for t in (
        PromptTemplate("maye_cot", QUESTION_FIELD + MAYE_CHAT_COT_PROMPT),
        PromptTemplate("maye_cot_verbatim", QUESTION_FIELD + MAYE_CHAT_COT_PROMPT, keep_image_tags=True),
        PromptTemplate("r1_think", QUESTION_FIELD + " " + R1_THINK_PROMPT, strip_question=True),
        PromptTemplate("dyme_answer", DYME_ANSWER_PROMPT),
        PromptTemplate("plain", QUESTION_FIELD),
    )
})


def get_template(template: str | PromptTemplate | Mapping[str, Any]) -> PromptTemplate:
    """A template by registry name, as given, or built from a config mapping of its fields."""
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; expected one of {sorted(TEMPLATES)}")
        return TEMPLATES[template]
    if isinstance(template, Mapping):
        fields = {f.name for f in dataclasses.fields(PromptTemplate)}
        unknown = set(template) - fields
        if unknown:
            raise ValueError(f"prompt template config has unknown fields {sorted(unknown)}; "
                             f"expected {sorted(fields)}")
        return PromptTemplate(**dict(template))
    raise TypeError(f"prompt template must be a name, PromptTemplate or mapping, got {type(template).__name__}")


def render_text(template: PromptTemplate, question: str) -> str:
    """The user text: the question put into the template (image tags still in it)."""
    if template.strip_question:
        question = question.strip()
    return template.text.replace(QUESTION_FIELD, question)


def user_content(text: str, num_images: int, keep_image_tags: bool = False) -> list[dict]:
    """HF content items for one user turn with `num_images` images.

    Each `<image>` in `text` becomes `{"type": "image"}` in place (empty text pieces dropped); a
    text without tags gets all images first, the layout of MAYE's and DyME's prompts.
    Raises `SampleFault('image_count_mismatch')` when some, but not all, images have a tag.
    """
    images = [{"type": "image"} for _ in range(num_images)]
    num_tags = text.count(IMAGE_TAG)
    if keep_image_tags or num_tags == 0:
        return images + [{"type": "text", "text": text}]
    if num_tags != num_images:
        raise SampleFault("image_count_mismatch",
                          f"the prompt has {num_tags} {IMAGE_TAG} tags but the sample has {num_images} images")
    content = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def build_messages(example: Example, template: str | PromptTemplate | Mapping[str, Any]) -> list[dict]:
    """Chat messages `[{"role": ..., "content": [...]}]` asking `example`'s question."""
    template = get_template(template)
    messages = []
    if template.system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": template.system}]})
    text = render_text(template, example.question)
    messages.append({"role": "user",
                     "content": user_content(text, len(example.images), template.keep_image_tags)})
    return messages
