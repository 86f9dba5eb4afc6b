"""ICD: contrast the next-token logits with those of the same prompt under a disturbing instruction.

Wang, Chen, Shao, Zeng, Ma, Liu. "Mitigating Hallucinations in Large Vision-Language Models with
Instruction Contrastive Decoding." Findings of ACL 2024. Official code: github.com/p1k0pan/ICD.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import MethodArgumentError
from .base import Contrast, MethodConfig
from .registry import register
from .vcd import ContrastiveDecoding, _check_contrastive

#: The official disturbance instruction.
DISTURBANCE = "You are a confused objects detector to provide a fuzzy overview or impression of the image."


@dataclasses.dataclass
class ICDConfig(MethodConfig):
    """alpha: contrast strength (0 = off); beta: plausibility cutoff; disturbance: the instruction (tokenised
    by the ``processor`` given to ICD itself, a Python-only argument); disturbance_ids: the instruction's token
    ids instead (no processor needed)."""

    alpha: float = MethodConfig.option(1.0, help="contrast strength: (1 + alpha) l - alpha l_disturbed (0 = off)", lo=0.0)
    beta: float = MethodConfig.option(0.1, help="plausibility cutoff: keep tokens with p >= beta x the top p", lo=0.0, hi=1.0)
    disturbance: str = MethodConfig.option(DISTURBANCE, help="the disturbing instruction (tokenised by ICD(processor=...))")
    disturbance_ids: list[int] | None = MethodConfig.option(None, help="the instruction's token ids (no processor needed)", lo=0)

    def validate(self) -> None:
        _check_contrastive("icd", self.alpha, self.beta)
        if not isinstance(self.disturbance, str) or not self.disturbance.strip():
            raise MethodArgumentError(f"icd: disturbance={self.disturbance!r} must be a non-empty string")
        if self.disturbance_ids is not None:
            ids = self.disturbance_ids
            if not (isinstance(ids, (list, tuple)) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise MethodArgumentError(f"icd: disturbance_ids={ids!r} must be a non-empty list of token ids (ints >= 0)")
            self.disturbance_ids = list(ids)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


@register
class ICD(ContrastiveDecoding):
    """Instruction Contrastive Decoding (Wang et al., Findings of ACL 2024).

    The same prompts and images with a disturbing instruction inserted run as contrast rows of the same
    forward (``Contrast("prompt")``, their own KV cache rows, fed the user's token at every decode step);
    the next-token logits are VCD's: ``(1 + alpha) * l - alpha * l_disturbed`` on the raw logits of the last
    position, every token whose own logit is below ``log(beta)`` + its top logit set to -inf. Earlier
    positions keep the user's logits. Greedy and sampling see the rewrite; beam search raises InputError.

    Where the instruction goes (each row, left padding skipped):

    - ``processor=...`` (the model's processor, or its tokenizer): ``disturbance`` is tokenised without
      special tokens and inserted right after the row's last image token and the wrapper token that closes
      the image (``<end_of_image>``, ``</img>``, ``<fake_token_around_image>``; LLaVA has none), i.e. just
      before the user's text in the chat templates attnkit ships; a row with no image token gets it after
      its first token.
    - ``disturbance_ids=[...]`` (for models used without a processor): those ids are inserted right after
      the row's first real token (the BOS token, or the template's first token).

    The official code puts the instruction into the system / user prompt text before templating; here it
    is spliced into the token sequence (no retokenisation of the user's text, works on any batch), so
    the tokens around the splice can differ from a prompt written with it. The disturbed prompt is longer
    than the user's: the user's rows are left-padded to its length inside the forward (attnkit's contrast
    rows, see attnkit.hooks.branch), which leaves their results unchanged.

    ``alpha=0`` is the neutral setting: no contrast rows and no cutoff (neither processor nor ids needed);
    otherwise ``wrap()`` raises MethodArgumentError when neither is given (e.g. ``--method icd`` on the CLI
    without ``--icd.disturbance-ids``).
    Defaults: alpha=1, beta=0.1 and the official disturbance instruction. Families: 1-D positions and
    images that can be repeated (not InstructBLIP, not the mRoPE Qwen-VL families).
    """

    name = "icd"
    Config = ICDConfig
    families = ("llava", "llava_next", "llava_onevision", "internvl", "gemma3", "idefics3")

    def __init__(self, config: ICDConfig | None = None, *, processor: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._adapter: Any = None
        ids = self.config.disturbance_ids
        if processor is not None and ids is not None:
            raise MethodArgumentError("icd: pass processor= or disturbance_ids=, not both")
        self.ids = ids
        if ids is None and processor is not None:
            self.use_processor(processor)
        self.after_image = self.config.disturbance_ids is None
        self.contrast = self._contrast_or_none(Contrast("prompt", prompt=self.disturbed))

    def use_processor(self, processor: Any) -> None:
        """Tokenise ``disturbance`` with the model's processor (or tokenizer), unless ids are set already."""
        if self.ids is not None or processor is None:
            return
        ids = list(_tokenizer(processor)(self.config.disturbance, add_special_tokens=False)["input_ids"])
        if not ids:
            raise MethodArgumentError(f"icd: the processor tokenises disturbance={self.config.disturbance!r} to no token")
        self.ids = ids

    def attach(self, handle: Any) -> None:
        if self.contrast is not None and self.ids is None:
            raise MethodArgumentError(
                "icd: needs processor= (to tokenise the disturbance instruction) or disturbance_ids= (its token ids)"
            )
        self._adapter = handle.adapter

    def detach(self) -> None:
        self._adapter = None

    def insert_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        """Per row, the position the instruction goes to (see the class docstring)."""
        out = []
        real = attention_mask.bool()
        image = self._adapter.image_mask(input_ids) & real if self.after_image and self._adapter is not None else None
        wrap = getattr(self._adapter, "wrap_after", 0) if self._adapter is not None else 0
        for r in range(input_ids.shape[0]):
            first = int(real[r].long().argmax())  # left padding: the first real token
            at = first + 1
            if image is not None and bool(image[r].any()):
                last = int(image[r].nonzero().max())
                at = min(last + 1 + wrap, input_ids.shape[1])
            out.append(at)
        return out

    def disturbed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The contrast rows' prompt: ``self.ids`` inserted in every row (where ``insert_at`` says); (B, q + n)."""
        add = torch.tensor(self.ids, dtype=input_ids.dtype, device=input_ids.device)
        rows = []
        for r, at in enumerate(self.insert_at(input_ids, attention_mask)):
            rows.append(torch.cat([input_ids[r, :at], add, input_ids[r, at:]]))
        # the inserted tokens are real: each row keeps its left padding and grows by n real tokens
        ones = attention_mask.new_ones(attention_mask.shape[0], len(self.ids))
        mask = torch.cat([ones, attention_mask], dim=1).sort(dim=1).values
        return torch.stack(rows), mask
