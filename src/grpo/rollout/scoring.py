"""Log-probabilities of sampled completions under a model, each distinct prompt run once.

:func:`completion_logps` is the plain computation (transformers' forward, full logits); grpo.accel's
chunked LM head (:func:`grpo.accel.chunked_head.chunked_completion_logps`) computes the same numbers with
less memory, through the same :func:`shared_prompt_forward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from grpo.algo.logprobs import token_logps
from grpo.models.structure import unwrap
from grpo.rollout.sampling import prompt_positions


class PromptPrefixLayer(DynamicLayer):
    """A cache layer that holds a prompt's keys and values and hands each forward pass them joined with its
    own, keeping nothing: a pass can run twice (gradient checkpointing recomputes it) and see the same cache.
    """

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> PromptPrefixLayer:
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def checkpointing_flags(model: nn.Module, **flags: bool) -> Iterator[None]:
    """Set attributes of every module of ``model`` that takes part in gradient checkpointing (its layers and
    the model that decides ``use_cache``) for the duration of the block."""
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [{name: layer.__dict__[name] for name in flags if name in layer.__dict__} for layer in layers]
    for layer in layers:
        layer.__dict__.update(flags)
    try:
        yield
    finally:
        for layer, before in zip(layers, saved):
            for name in flags:
                layer.__dict__.pop(name, None)
            layer.__dict__.update(before)


@dataclass
class SharedPromptOutputs:
    """What the model says at each completion token's position, from :func:`shared_prompt_forward`."""

    first_logits: torch.Tensor | None  # (B, 1, V): the prompt's last position, which predicts the first token
    rest_logits: torch.Tensor | None  # (B, C − 1, V): the completion's positions that predict the rest
    hidden_states: torch.Tensor | None  # (B, C, H): the final hidden states behind those logits, if asked
    head_hidden: torch.Tensor | None = None  # (B, C, H): under ``head_free``, instead of any logits

    def token_logps(
        self, completion_ids: torch.Tensor, temperature: float, with_entropy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (B, C) of ``completion_ids`` (and entropies, with ``with_entropy``) from the
        logits. Log-probs are joined, not the (much larger) logits."""
        pieces = [token_logps(self.first_logits, completion_ids[:, :1], temperature, True, with_entropy)]
        if self.rest_logits is not None:
            rest = completion_ids[:, 1:]
            pieces.append(token_logps(self.rest_logits, rest, temperature, True, with_entropy))
        if with_entropy:
            return torch.cat([p[0] for p in pieces], dim=1), torch.cat([p[1] for p in pieces], dim=1)
        return torch.cat(pieces, dim=1)


def shared_prompt_forward(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    output_hidden_states: bool = False,
    head_free: bool = False,
    run_prompts: Callable[..., Any] | None = None,
) -> SharedPromptOutputs:
    """The forward passes behind :func:`completion_logps`: each distinct prompt run once, its key/value
    cache gathered to one row per completion, then the completion tokens against it. The first completion
    token is predicted by the prompt's last position; the last one predicts nothing we need, so it is not
    fed in. With ``output_hidden_states`` also the final hidden state at each of those positions (PPO's
    value head reads them). With ``head_free`` both passes stop before the LM head and the final hidden
    states at those positions are returned (``head_hidden``), for a caller that applies the head itself.
    ``run_prompts(runner, **kwargs)`` runs the prompt pass instead of ``runner(**kwargs)``."""
    used, local_index = torch.unique(prompt_index, return_inverse=True)
    prompt_ids, prompt_mask = prompt_ids[used], prompt_mask[used]
    positions = prompt_positions(prompt_mask)
    # The decoder alone (its final norm included) when the caller applies the head itself.
    runner = unwrap(model).get_decoder() if head_free else model
    prompt_kwargs = dict(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=output_hidden_states,
        **({} if head_free else {"logits_to_keep": 1}),
    )
    with checkpointing_flags(model, gradient_checkpointing=False):
        out = run_prompts(runner, **prompt_kwargs) if run_prompts is not None else runner(**prompt_kwargs)
    prefix = Cache(
        layers=[
            PromptPrefixLayer.holding(layer.keys[local_index], layer.values[local_index])
            for layer in out.past_key_values.layers
        ]
    )
    width = completion_ids.shape[1]
    attention_mask = torch.cat([prompt_mask[local_index], completion_mask.to(prompt_mask.dtype)], dim=1)
    completion_positions = positions[local_index, -1:] + 1 + torch.arange(width, device=positions.device)
    hidden = [out.hidden_states[-1][local_index, -1:]] if output_hidden_states else []
    head_hidden = [out.last_hidden_state[local_index, -1:]] if head_free else []
    rest_logits = None
    if width > 1:
        with checkpointing_flags(model, _can_checkpoint_with_cache=True):
            rest = runner(
                input_ids=completion_ids[:, :-1],
                attention_mask=attention_mask[:, :-1],
                position_ids=completion_positions[:, :-1],
                past_key_values=prefix,  # read whatever use_cache says
                use_cache=False,
                output_hidden_states=output_hidden_states,
            )
        if head_free:
            head_hidden.append(rest.last_hidden_state)
        else:
            rest_logits = rest.logits
        if output_hidden_states:
            hidden.append(rest.hidden_states[-1])
    return SharedPromptOutputs(
        first_logits=None if head_free else out.logits[local_index, -1:],
        rest_logits=rest_logits,
        hidden_states=torch.cat(hidden, dim=1) if hidden else None,
        head_hidden=torch.cat(head_hidden, dim=1) if head_free else None,
    )


def completion_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, C) of completions, computing each distinct prompt once (with
    ``with_entropy``, also the entropy (B, C) of the distribution each token was drawn from, no gradient).

    Completion b continues prompt ``prompt_index[b]``. The prompts this batch uses are run once, their
    key/value cache is gathered to one row per completion (a differentiable index, so gradients reach the
    prompt's activations from every completion), and only the completion tokens run again. When G
    completions share a prompt this does the prompt's work once instead of G times. Logits are divided by
    the sampling temperature so that the probabilities are those of the distribution that was sampled.

    Under gradient checkpointing the prompts (one row each, a small share of the activations) run without
    it, and the completions' layers are recomputed in the backward pass reading the same prompt cache:
    transformers' own checkpointing would drop the cache and run each prompt once per completion.
    """
    out = shared_prompt_forward(model, prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask)
    return out.token_logps(completion_ids, temperature, with_entropy)
