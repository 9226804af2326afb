"""Learned reward models: any ``AutoModelForSequenceClassification`` checkpoint in a local directory scores a
prompt and its completion, formatted with the reward model's own tokenizer and chat template.

A model with one label gives one reward, its logit. A model with several labels scores several aspects at
once (see :mod:`grpo.rewards.core`): the function carries ``outputs`` (the labels' names) and returns
``{aspect: values}``, so that each aspect becomes a reward of its own with its own weight.

The model loads when the config entry is built, so that a wrong path fails before training starts, and once
per directory, device and dtype: entries naming the same model share one copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from grpo.errors import ModelError
from grpo.models.loading import load_tokenizer, pick_dtype, refuse_pickled_weights
from grpo.rewards.core import completion_text

DTYPES = ("auto", "float32", "bfloat16", "float16")

T = TypeVar("T")
_loaded: dict[tuple[str, ...], Any] = {}
_loading = threading.Lock()


def load_once(key: tuple[str, ...], load: Callable[[], T]) -> T:
    """``load()``'s result, computed once per key for the whole process: a model named by several reward
    entries (or several runs in one process, as in tests) takes its memory once."""
    with _loading:
        if key not in _loaded:
            _loaded[key] = load()
        return _loaded[key]


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_sequence_classifier(directory: Path, device: str, dtype: str) -> tuple[nn.Module, Any]:
    """The model (eval mode, frozen, on ``device``) and its tokenizer, with the model's pad token id set."""
    from transformers import AutoModelForSequenceClassification

    if not directory.is_dir():
        raise ModelError(f"{directory}: reward model directory not found")
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: not a model directory (no config.json)")
    refuse_pickled_weights(directory, "model")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            directory, dtype=pick_dtype(dtype), use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"{directory}: cannot load the reward model ({error})") from None
    # transformers fills weights missing from the checkpoint with random values: a causal LM's directory
    # loads "fine" with a random score head, and would give random rewards.
    missing = sorted(info["missing_keys"])
    if missing:
        raise ModelError(
            f"{directory}: the checkpoint has no weights for {', '.join(missing[:3])}; it is not a trained "
            "sequence-classification (reward) model"
        )
    tokenizer = load_tokenizer(str(directory))  # sets a pad token from eos when there is none
    # Sequence classification pools the logits of the last token that is not config.pad_token_id, so the
    # batches must be padded with exactly that id. A checkpoint that names none gets the tokenizer's.
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval().requires_grad_(False), tokenizer


class RewardModelScorer:
    """A reward function with TRL's signature that scores (prompt, completion) pairs with a classifier.

    Sequences are padded on the right whatever the tokenizer's ``padding_side``: a right-padded row keeps
    the positions it has alone (models with absolute position embeddings would score a left-padded row
    differently), and the pooled token is the last real one either way. Rows are sorted by length before
    batching, so a batch pads little.
    """

    # A learned score has no full mark: it does not decide whether an evaluated completion is solved.
    unbounded = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        batch_size: int,
        max_length: int,
        outputs: list[str] | None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.outputs = outputs
        self.pad_id: int = model.config.get_text_config().pad_token_id
        # A leading BOS (decoders) or CLS (encoders, whose head pools it) survives truncation.
        self.keep_first = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float] | dict[str, list[float]]:
        ids = [self.encode(prompt, completion) for prompt, completion in zip(prompts, completions)]
        logits = self.forward(ids)
        if not self.outputs:
            return logits[:, 0].tolist()
        return {name: logits[:, i].tolist() for i, name in enumerate(self.outputs)}

    def encode(self, prompt: str | list[dict[str, Any]], completion: Any) -> list[int]:
        """Token ids of the prompt followed by the completion, cut to ``max_length`` from the left.

        Chat prompts go through the tokenizer's chat template with the completion as the assistant's turn
        (no generation prompt); the template writes the special tokens, so none are added again. A string
        prompt is continued by the completion's text, as the policy saw it. A chat prompt for a tokenizer
        without a template becomes its messages' contents, one per line, then the completion.
        """
        text = completion_text(completion)
        if isinstance(prompt, list) and self.tokenizer.chat_template:
            messages = [*prompt, {"role": "assistant", "content": text}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            if isinstance(prompt, list):
                prompt = "".join(f"{message.get('content', '')}\n" for message in prompt)
            ids = self.tokenizer(prompt + text)["input_ids"]
        if len(ids) <= self.max_length:
            return ids
        head = ids[:1] if ids[0] in self.keep_first else []
        return head + ids[len(ids) - self.max_length + len(head) :]

    @torch.inference_mode()
    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        """The classifier's logits for each sequence, (N, num_labels) float32 on the CPU, in input order."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        logits = torch.empty(len(ids), self.model.config.num_labels)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(rows):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention_mask[row, : len(ids[i])] = 1
            output = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            logits[rows] = output.logits.float().cpu()
        return logits


def make_reward_model(
    *,
    model: str,
    batch_size: int = 8,
    max_length: int = 1024,
    outputs: list[str] | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> RewardModelScorer:
    """The ``reward_model`` kind: a sequence-classification model in the local directory ``model``.

    ``batch_size`` sequences are scored at once; each is cut to its last ``max_length`` tokens (the end of
    the completion is what a reward model judges). ``outputs`` names the labels of a multi-label model
    (default: its ``config.id2label``). ``device`` defaults to CUDA when available; ``dtype`` is ``auto``
    (bfloat16 on GPUs that support it, else float32) or a torch dtype's name.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    directory = Path(model).expanduser()
    device = default_device(device)
    classifier, tokenizer = load_once(
        ("sequence-classification", str(directory.resolve()), device, dtype),
        lambda: load_sequence_classifier(directory, device, dtype),
    )
    num_labels = classifier.config.num_labels
    if outputs is not None:
        if len(outputs) != num_labels or len(set(outputs)) != len(outputs):
            raise ValueError(
                f"outputs must name each of the {num_labels} labels of {directory} once, got {outputs}"
            )
        outputs = [str(name) for name in outputs]
    elif num_labels > 1:
        outputs = [str(classifier.config.id2label[i]) for i in range(num_labels)]
        if len(set(outputs)) != num_labels:
            raise ValueError(f"{directory}: config.id2label repeats a name ({outputs}); give outputs")
    return RewardModelScorer(
        classifier, tokenizer, batch_size=batch_size, max_length=max_length, outputs=outputs
    )
