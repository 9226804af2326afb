"""LLM-as-judge rewards: a language model reads a rubric, the prompt and a completion, and gives a score
from 0 to ``max_score``; the reward is that score divided by ``max_score``, in [0, 1].

Two back ends:

* a local causal LM (``model``: a directory, a ``.gguf`` file or ``smollm2-135m-instruct``). It does not
  generate: after the judge prompt and ``Score:`` it reads the model's probabilities for every score's
  tokens and takes the expected score. Tiny judges rarely put most of their probability on one number, and
  the expected value uses all of it; it is also deterministic, and there is no reply to parse.
* any OpenAI-compatible chat-completions API (``base_url``, or ``GRPO_JUDGE_BASE_URL`` /
  ``OPENAI_BASE_URL``): one request per completion, ``max_concurrency`` at a time, over the standard
  library's HTTP client. The score is the first number of the reply. Connection errors, timeouts, HTTP 429
  and 5xx are retried with exponential backoff and jitter (or after the server's ``Retry-After``); other
  4xx are not, since the same request would fail again.

A completion the judge cannot score (no reply after the retries, a reply without a number) raises
:class:`JudgeError`, so the run's ``reward_failure`` policy decides what happens. The API key is best given
as ``api_key_env``, the name of the environment variable that holds it, so that no file needs it; it never
appears in an error message, even where the server echoes it back.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grpo.accel.lean_layers import make_lean
from grpo.errors import ConfigError, ModelError
from grpo.models.loading import load_causal_lm, load_tokenizer, pick_dtype, resolve_model
from grpo.rewards.core import completion_text
from grpo.rewards.model import default_device, load_once

DEFAULT_RUBRIC = (
    "Judge how correct and helpful the response is. A high score needs an accurate, complete answer that "
    "follows the user's instructions and is clear and concise. Factual or reasoning errors, ignored "
    "instructions and padding lower the score; a wrong final answer scores low however well it is written."
)
SCORE_PREFIX = "Score:"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models' scratch work, numbers and all
MAX_WAIT = 60.0  # seconds: the longest pause before a retry, whatever the backoff or a Retry-After says
MAX_LOCAL_SCORE = 100  # the local judge reads every score's tokens; more would be many forward passes
ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONVENTIONAL_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")  # what environment variables are called


class JudgeError(RuntimeError):
    """The judge gave no usable score for a completion. Not a RewardError on purpose: the scoring code
    turns it into a failure of this reward, which the run's ``reward_failure`` policy then handles."""


def judge_messages(rubric: str, max_score: float, prompt: Any, completion: Any) -> list[dict[str, str]]:
    """The chat messages that ask for a score: the rubric as the system message, the conversation so far and
    the response to judge as the user's."""
    if isinstance(prompt, list):
        prompt = "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content', '')}" for m in prompt)
    scale = f"{max_score:g}"
    return [
        {
            "role": "system",
            "content": f"You are a strict, impartial judge. {rubric}\nReply with the score only: a number "
            f"from 0 (worst) to {scale} (best).",
        },
        {
            "role": "user",
            "content": f"Conversation:\n{prompt}\n\nResponse to judge:\n{completion_text(completion)}\n\n"
            f"Score the response from 0 to {scale}.",
        },
    ]


def parse_score(reply: str, max_score: float) -> float | None:
    """The first number of a reply outside ``<think>`` blocks, clamped to [0, max_score]; None without one."""
    found = NUMBER.search(THINKING.sub("", reply))
    if found is None:
        return None
    return min(max(float(found.group()), 0.0), max_score)


# --- an OpenAI-compatible API ------------------------------------------------------------------------------
def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_WAIT)


class APIJudge:
    """Scores completions through ``POST {base_url}/chat/completions``, one request per completion."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        api_model: str,
        rubric: str,
        max_score: float,
        timeout: float,
        max_retries: int,
        max_concurrency: int,
        temperature: float,
        max_new_tokens: int,
        backoff: float,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.api_model = api_model
        self.rubric = rubric
        self.max_score = max_score
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.backoff = backoff

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        workers = max(1, min(self.max_concurrency, len(completions)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(self.score_one, index, prompt, completion)
                for index, (prompt, completion) in enumerate(zip(prompts, completions))
            ]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:  # requests not yet sent are dropped; those in flight finish
                    future.cancel()
                raise

    def score_one(self, index: int, prompt: Any, completion: Any) -> float:
        body = {
            "model": self.api_model,
            "messages": judge_messages(self.rubric, self.max_score, prompt, completion),
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
        }
        reply = self.post(index, json.dumps(body).encode())
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise JudgeError(
                f"the judge's answer for completion {index} has no choices[0].message.content: "
                f"{self.redact(json.dumps(reply))[:300]}"
            )
        value = parse_score(text, self.max_score)
        if value is None:
            raise JudgeError(
                f"the judge's reply for completion {index} holds no score: {self.redact(text)[:300]!r}"
            )
        return value / self.max_score

    def post(self, index: int, body: bytes) -> Any:
        """The decoded JSON answer to one request, retried as the module's docstring says."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = response.read()
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code}: {self.redact(error.read().decode(errors='replace'))[:300]}"
                if error.code != 429 and error.code < 500:
                    raise JudgeError(
                        f"the judge at {self.url} refused the request for completion {index} ({problem})"
                    ) from None
                wait = retry_after(error.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
                problem = self.redact(f"{type(error).__name__}: {error}")
            else:
                try:
                    return json.loads(answer)
                except ValueError:
                    raise JudgeError(
                        f"the judge at {self.url} answered the request for completion {index} with "
                        f"something other than JSON: {self.redact(answer.decode(errors='replace'))[:300]!r}"
                    ) from None
            if attempt < self.max_retries:
                # Exponential backoff with "equal jitter": the wait doubles each time, and a random half of
                # it keeps many clients that failed together from retrying together.
                delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
                time.sleep(wait if wait is not None else min(delay, MAX_WAIT))
        raise JudgeError(
            f"the judge at {self.url} gave no answer for completion {index} after {self.max_retries + 1} "
            f"attempts (last: {problem})"
        )

    def redact(self, text: str) -> str:
        """``text`` from the server (a reply, an error body) with the API key shown as ***."""
        return text.replace(self._api_key, "***") if self._api_key else text


# --- a local model -----------------------------------------------------------------------------------------
def score_tokens(tokenizer: Any, max_score: int) -> tuple[list[int], dict[tuple[int, ...], int]]:
    """The token ids that end every judge prompt (``Score:``) and, for each score 0..max_score, the tokens
    that write it after them (" 7" may be one token, two, or a space then a digit per token).

    Tokens that every score starts with (a lone space, say) move to the prompt's end: one forward pass less.
    """
    prefix = tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)
    tails = []
    for value in range(max_score + 1):
        ids = tokenizer.encode(f"{SCORE_PREFIX} {value}", add_special_tokens=False)
        if ids[: len(prefix)] != prefix:
            raise ModelError(f"the judge's tokenizer writes {SCORE_PREFIX!r} differently before a number")
        tails.append(ids[len(prefix) :])
    while all(len(tail) > 1 and tail[0] == tails[0][0] for tail in tails):
        prefix.append(tails[0][0])
        tails = [tail[1:] for tail in tails]
    return prefix, {tuple(tail): value for value, tail in enumerate(tails)}


def expected_scores(
    next_token_probs: Callable[[list[list[int]]], torch.Tensor],
    prefixes: list[list[int]],
    tails: dict[tuple[int, ...], int],
) -> torch.Tensor:
    """The expected score after each prefix, under the model's distribution over the scores' token tails.

    A walk down the tree of the tails' tokens: a node's probability splits among its children by the
    model's next-token probabilities, and a node that spells a whole score keeps what does not continue to
    a longer one (after " 1", anything but "0" reads as 1 rather than 10). A leaf keeps all its probability
    without a forward pass. Probability on tokens that start no score (words, say) is left out, and the rest
    renormalised. NaN where the model gives no score any probability. ``next_token_probs`` maps token
    sequences to (len, vocab) probabilities.
    """
    children: dict[tuple[int, ...], list[int]] = {}
    for tail in tails:
        for depth in range(len(tail)):
            children.setdefault(tail[:depth], [])
            if tail[depth] not in children[tail[:depth]]:
                children[tail[:depth]].append(tail[depth])
    values = torch.tensor([float(tails[tail]) for tail in tails], dtype=torch.float64)
    column = {tail: i for i, tail in enumerate(tails)}
    mass = torch.zeros(len(prefixes), len(tails), dtype=torch.float64)
    frontier = {(): torch.ones(len(prefixes), dtype=torch.float64)}
    while frontier:
        inner = [path for path in frontier if path in children]
        for path in frontier:
            if path not in children:  # a leaf: a whole score that nothing longer starts with
                mass[:, column[path]] += frontier[path]
        if not inner:
            break
        probs = next_token_probs([prefix + list(path) for path in inner for prefix in prefixes]).double()
        following = {}
        for block, path in enumerate(inner):
            p = probs[block * len(prefixes) : (block + 1) * len(prefixes)]
            for token in children[path]:
                following[(*path, token)] = frontier[path] * p[:, token]
            if path in column:
                mass[:, column[path]] += frontier[path] * (1 - p[:, children[path]].sum(dim=1)).clamp(min=0)
        frontier = following
    return (mass @ values) / mass.sum(dim=1)


class LocalJudge:
    """Scores completions with a local causal LM by the expected score it gives after ``Score:``."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, rubric: str, max_score: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.max_score = max_score
        self.batch_size = batch_size
        self.score_prefix, self.tails = score_tokens(tokenizer, max_score)

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        prefixes = [self.prompt_ids(prompt, completion) for prompt, completion in zip(prompts, completions)]
        expected = expected_scores(self.next_token_probs, prefixes, self.tails)
        for index, value in enumerate(expected.tolist()):
            if not math.isfinite(value):
                raise JudgeError(f"the local judge gives no score any probability for completion {index}")
        return (expected / self.max_score).tolist()

    def prompt_ids(self, prompt: Any, completion: Any) -> list[int]:
        """The judge prompt, as the start of the judge's own reply when it has a chat template, then the
        ``Score:`` tokens."""
        messages = judge_messages(self.rubric, self.max_score, prompt, completion)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer("".join(f"{m['content']}\n\n" for m in messages))["input_ids"]
        return ids + self.score_prefix

    @torch.inference_mode()
    def next_token_probs(self, sequences: list[list[int]]) -> torch.Tensor:
        """(len(sequences), vocab) probabilities of the next token, on the CPU; left-padded batches with
        position ids that start at each row's first real token, so padding changes nothing."""
        device = next(self.model.parameters()).device
        pieces = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=1,
            ).logits[:, -1]
            pieces.append(logits.float().softmax(dim=-1).cpu())
        return torch.cat(pieces)


def load_judge_model(model: str, device: str) -> tuple[nn.Module, Any]:
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    model = make_lean(load_causal_lm(path, pick_dtype("auto")))
    return model.to(device).eval().requires_grad_(False), tokenizer


def key_from_environment(variable: Any, given_inline: bool) -> str:
    """The judge's API key from the environment variable named by its ``api_key_env``; a ConfigError (one
    line, before anything runs) when the name is not a variable's name or the variable is not set."""
    if given_inline:
        raise ValueError("give api_key or api_key_env, not both")
    if not isinstance(variable, str) or not ENVIRONMENT_NAME.fullmatch(variable):
        # (not quoted: a key pasted here by mistake must not reach the terminal)
        raise ConfigError(
            "reward 'judge': api_key_env must be the name of an environment variable (letters, digits "
            "and _), not the key itself"
        )
    key = os.environ.get(variable)
    if not key:
        # Named only when it reads as a variable's name: a pasted key (hf_…, hex) can match the pattern too.
        named = f"{variable}, which" if CONVENTIONAL_NAME.fullmatch(variable) else "a variable that"
        raise ConfigError(
            f"reward 'judge': api_key_env names {named} is not set in the environment; set it to the "
            "judge's API key"
        )
    return key


def make_judge(
    *,
    rubric: str = DEFAULT_RUBRIC,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    api_model: str | None = None,
    max_score: float = 10.0,
    timeout: float = 30.0,
    max_retries: int = 3,
    max_concurrency: int = 4,
    temperature: float = 0.0,
    max_new_tokens: int = 16,
    backoff: float = 0.5,
    batch_size: int = 8,
    device: str | None = None,
) -> APIJudge | LocalJudge:
    """The ``judge`` kind: a local model (``model``) or an OpenAI-compatible API (``base_url``).

    For an API: ``base_url`` defaults to ``$GRPO_JUDGE_BASE_URL`` then ``$OPENAI_BASE_URL``. The key is
    read from the environment variable that ``api_key_env`` names (unset: a ConfigError, at start), else
    ``api_key`` (never written into a file), else ``$GRPO_JUDGE_API_KEY`` then ``$OPENAI_API_KEY`` (none:
    no Authorization header, as local servers want); ``api_model`` is the model name the server expects.
    ``timeout`` bounds each request (seconds without data), ``max_retries`` the retries after a first
    failure, the first ``backoff`` seconds long.
    For a local model: ``max_score`` must be a whole number up to 100; ``batch_size`` sequences go through
    it at once, on ``device`` (CUDA when available). ``temperature`` and ``max_new_tokens`` apply to the
    API only: the local judge does not generate.
    """
    if not math.isfinite(max_score) or max_score <= 0:
        raise ValueError(f"max_score must be a positive number, got {max_score}")
    if model is not None:
        if base_url is not None:
            raise ValueError("the judge is either a local model or an API: give model or base_url, not both")
        if api_key is not None or api_key_env is not None:
            raise ValueError(
                "api_key and api_key_env are for a judge behind an API; a local model takes none"
            )
        if not float(max_score).is_integer() or max_score > MAX_LOCAL_SCORE:
            raise ValueError(
                f"a local judge's max_score must be a whole number up to {MAX_LOCAL_SCORE}, got {max_score}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        device = default_device(device)
        where = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
        judge, tokenizer = load_once(("causal-lm", where, device), lambda: load_judge_model(model, device))
        return LocalJudge(judge, tokenizer, rubric=rubric, max_score=int(max_score), batch_size=batch_size)

    base_url = base_url or os.environ.get("GRPO_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ValueError(
            "the judge needs a model: model (a local directory, or smollm2-135m-instruct) or base_url (an "
            "OpenAI-compatible API, also read from GRPO_JUDGE_BASE_URL)"
        )
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    if not api_model:
        raise ValueError("a judge behind an API needs api_model, the name of the model the server runs")
    if timeout <= 0 or max_retries < 0 or max_concurrency < 1 or backoff < 0:
        raise ValueError(
            "the judge needs timeout > 0, max_retries >= 0, max_concurrency >= 1 and backoff >= 0; got "
            f"{timeout}, {max_retries}, {max_concurrency}, {backoff}"
        )
    if api_key_env is not None:
        api_key = key_from_environment(api_key_env, given_inline=api_key is not None)
    return APIJudge(
        base_url=base_url,
        api_key=api_key or os.environ.get("GRPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        api_model=api_model,
        rubric=rubric,
        max_score=float(max_score),
        timeout=timeout,
        max_retries=max_retries,
        max_concurrency=max_concurrency,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        backoff=backoff,
    )
