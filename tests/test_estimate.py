"""The cost bound: every field that changes what the upstream may produce is counted."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.domain.estimate import CHAT, COMPLETIONS, EMBEDDINGS, BoundError, request_bound

CHAT_BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bound(kind: str, **body: Any) -> tuple[int, int, tuple[str, int] | None, dict[str, Any]]:
    b = {**CHAT_BODY, **body} if kind == CHAT else {"model": "m", **body}
    result = request_bound(kind, b, default_cap=100, image_tokens=50)
    return result.prompt, result.completion, result.inject, b


def test_no_cap_injects_the_default_on_the_field_the_api_knows() -> None:
    _, out, inject, _ = bound(CHAT)
    assert (out, inject) == (100, ("max_completion_tokens", 100))
    _, out, inject, _ = bound(COMPLETIONS, prompt="x")
    assert (out, inject) == (100, ("max_tokens", 100))


def test_client_cap_is_the_bound_and_nothing_is_injected() -> None:
    assert bound(CHAT, max_tokens=7)[1:3] == (7, None)
    assert bound(CHAT, max_completion_tokens=9)[1:3] == (9, None)
    # both: the upstream honours one of them, so the larger bounds it
    assert bound(CHAT, max_tokens=7, max_completion_tokens=9)[1:3] == (9, None)


def test_n_best_of_and_prompt_lists_multiply_the_output() -> None:
    assert bound(CHAT, max_tokens=10, n=3)[1] == 30
    assert bound(COMPLETIONS, prompt="a", max_tokens=10, n=2, best_of=5)[1] == 50
    assert bound(COMPLETIONS, prompt=["a", "b", "c"], max_tokens=10, n=2)[1] == 60
    assert bound(COMPLETIONS, prompt=[[1, 2], [3]], max_tokens=10)[1] == 20
    # one tokenized prompt is one prompt
    assert bound(COMPLETIONS, prompt=[1, 2, 3], max_tokens=10)[1] == 10


def test_numeric_strings_are_forwarded_as_the_integer_the_bound_used() -> None:
    _, out, _, body = bound(CHAT, max_tokens="250", n="2")
    assert out == 500
    assert body["max_tokens"] == 250
    assert body["n"] == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 1.5),
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("max_tokens", "lots"),
        ("max_tokens", 10**12),
        ("max_completion_tokens", [1]),
        ("n", 0),
        ("n", 129),
        ("n", 1000),
        ("best_of", 500),
    ],
)
def test_values_the_bound_cannot_trust_are_refused_naming_the_field(field: str, value: Any) -> None:
    kind = COMPLETIONS if field == "best_of" else CHAT
    with pytest.raises(BoundError) as caught:
        bound(kind, **{field: value})
    assert caught.value.field == field


def test_embeddings_produce_no_output_and_images_count_their_bound() -> None:
    assert bound(EMBEDDINGS, input=["abc", "de"])[:3] == (16 + 5, 0, None)
    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    prompt = bound(CHAT, messages=[{"role": "user", "content": [image, image]}])[0]
    assert prompt == 16 + 8 + len(b"user") + 2 * 50


def test_predicted_output_counts_as_output() -> None:
    _, out, _, _ = bound(CHAT, max_tokens=10, prediction={"type": "content", "content": "x" * 40})
    assert out == 50


def test_files_count_their_inline_bytes_or_the_configured_bound() -> None:
    """Review finding 10: a file sent by id counted only the bytes of its id."""
    by_id = {"type": "file", "file": {"file_id": "file-abc"}}
    inline = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64," + "A" * 900},
    }
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": [by_id, inline]}]}
    bound = request_bound(CHAT, body, default_cap=10, image_tokens=50, file_tokens=70_000)
    assert bound.prompt >= 70_000 + 900
