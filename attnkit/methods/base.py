"""The method contract: what a method declares and the roles the hook manager calls.

A method is a config dataclass (validated on construction, see config.py) plus a subclass of
``Method`` that defines the roles it needs. This file is all a method author has to read.

Every callback gets a ``View`` (attnkit.hooks.context): a read-only view of the forward and, in the
attention roles, of the call (``view.layer``, ``view.rows``, ``view.visible``, the layer's own
``q_len``/``kv_len``/``image_mask``/``attention_mask`` after pruning). Per-generation state lives in
one place: ``self.state(view)``, a dict emptied at every prefill and kept across its decode steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import MethodArgumentError
from .config import MethodConfig, build_config, check_int, check_range  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..hooks.context import View
    from ..hooks.manager import Handle

#: The attention-level roles: a layer runs through attnkit's kernel only where an active method has one.
ATTENTION_ROLES = ("scores", "column_stats", "probs", "columns", "observe", "head_output")
#: Every role a method may define (see Method).
ROLES = ATTENTION_ROLES + ("reweight", "select", "logits")
#: The batch variants a method may ask for as contrast rows (see Contrast).
CONTRAST_KINDS = ("no_image", "pixels", "prompt")


#: Each role's and routing call's arguments after self.
_ARGS = {
    "scores": ("view", "scores"), "column_stats": ("view", "sums", "counts"), "probs": ("view", "probs"),
    "columns": ("view",), "reweight": ("view", "p_cols", "cols"), "observe": ("view", "probs"),
    "head_output": ("view", "out"), "select": ("view", "hidden"), "logits": ("view", "logits"),
    "layers": ("view",), "rows": ("view",), "begin_forward": ("view",),
}
_ARITY = {role: len(args) for role, args in _ARGS.items()}


def _takes(fn: Any, n: int) -> bool:
    """Whether ``fn(self, *n args)`` binds (a logits role may take a third, the contrast logits)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(None, *range(n))
        return True
    except TypeError:
        return False


@dataclass(frozen=True)
class Contrast:
    """A variant of the user's batch that runs alongside it, as extra rows of the same forward with their
    own KV cache (see attnkit.hooks.branch); the method's ``logits`` role gets the variant's logits, and
    the rows never reach the user (logits, attentions, hidden states and generated tokens are the user's
    rows only). At every decode step the contrast rows receive the token the user's row received.

    ``kind="no_image"``: the same prompts without their images (the image tokens removed, the rows
    left-padded to the prompt's length), as PAI's classifier-free guidance step uses them.

    ``kind="pixels", pixels=fn``: the same prompts with altered pixel values (VCD's noised images):
    ``fn(pixel_values) -> pixel_values`` of the same shape, called with the batch's ``pixel_values`` as
    the processor gives them (the family's layout: (n, C, H, W), LLaVA-NeXT's (n, crops, C, H, W),
    Qwen-VL's flattened patches (N_i, d) one image at a time, Idefics3's (B, n, C, H, W)). While wrapped, the model's
    ``get_image_features`` encodes the batch's images followed by their altered copies.

    ``kind="prompt", prompt=fn``: an altered prompt with the same images (ICD's disturbing instruction):
    ``fn(input_ids, attention_mask) -> (input_ids, attention_mask)``, both (B, q'), each row holding as
    many image tokens as the user's row. A shorter one is left-padded to the prompt's length q; for a longer
    one (q' > q) the user's rows are left-padded to q' inside the forward (which leaves their results
    unchanged up to rounding), and every decode step's mask gets the same q' - q extra padding columns; the
    user still gets the q positions of the prompt (logits, hidden states, attentions), and the method's
    ``contrast_logits`` hold the variant's last q positions. Needs ``decode=True``.

    ``decode=False``: the rows run at prefill only. After the prefill forward the manager drops them from the
    KV cache (and from any per-batch state the family keeps, e.g. Qwen-VL's rope deltas), so decode steps
    run on the user's rows alone and cost nothing extra; the ``logits`` role then gets ``contrast=None``
    at decode steps. For methods that use the variant to decide something once (VHR's head selection).

    Families: ``pixels`` and ``prompt`` need the images to pass through the model's forward or its
    ``get_image_features`` (not InstructBLIP, which raises on wrap()); ``prompt`` needs 1-D positions (not
    the mRoPE families Qwen2/2.5/3-VL).
    """

    kind: str = "no_image"
    pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompt: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    decode: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.decode, bool):
            raise MethodArgumentError(f"Contrast(decode=...) must be True or False, got {self.decode!r}")
        if self.kind not in CONTRAST_KINDS:
            raise MethodArgumentError(
                f"contrast kind {self.kind!r} is not supported (supported: {', '.join(CONTRAST_KINDS)})"
            )
        for field in ("pixels", "prompt"):
            fn = getattr(self, field)
            if self.kind == field and not callable(fn):
                raise MethodArgumentError(f"Contrast(kind={field!r}) needs a callable {field}=, got {type(fn).__name__}")
            if self.kind != field and fn is not None:
                raise MethodArgumentError(f"Contrast(kind={self.kind!r}) takes no {field}= (only kind={field!r} does)")


class Method:
    """A training-free intervention. Subclasses set ``name``, ``Config`` and define the roles they need.

    Declarations (class attributes; instances may override):
    ``neutral`` config arguments with which the method changes nothing; ``families`` the supported
    model families (None = all); ``contrast`` a Contrast to run as extra rows (None = none);
    ``drops_tokens`` / ``renumbers_positions`` for token selection (below).

    Routing: ``layers(view)`` the layers whose attention the roles need in this forward (None = all) and
    ``rows(view)`` the query rows that need probabilities at ``view.layer`` (sorted distinct indices
    among the forward's new tokens; None = all; a decode step's single row is always computed). Other
    layers and rows keep the fused sdpa kernel.

    Attention roles (all optional; a role left as None is not called). Shapes: B batch (contrast rows
    included), H query heads, r the rows of the call (``view.rows``), K' <= ``view.kv_len`` the key
    columns [0, K') the rows can see at all (slice per-column masks with ``[..., :K']``), D head dim.
    The kernel calls them in this order, for every block of rows:

    1. ``scores(view, scores) -> scores``: pre-softmax logits (B, H, r, K'), mask applied (masked columns
       hold the dtype's minimum). May rewrite in place.
    2. ``column_stats(view, sums, counts) -> None``: read-only statistics over every requested row of the
       layer, given before any ``probs`` rewrite of the layer: ``sums`` (B, H, K') fp32, the probability
       each key column gets summed over the rows (rows that see no key add 0); ``counts`` (B|1, 1, K')
       fp32, how many of the rows see each column. Called once per layer and forward.
    3. ``probs(view, probs) -> probs``: post-softmax probabilities (B, H, r, K'), each visible row summing
       to 1. May rewrite in place. Rows that see no key are set to 0 afterwards (as sdpa gives them).
       Or, for a rewrite that changes only a few key columns, declare it in column form instead
       (define ``columns`` and ``reweight``, not ``probs``):
       ``columns(view) -> cols | None``: (n,) long sorted distinct key columns shared by the batch (None
       or empty: nothing changes), asked once per layer after ``column_stats``;
       ``reweight(view, p_cols, cols) -> (factor, new)``: with ``p_cols`` (B, H, r, n) fp32 the rows'
       probabilities at those columns (0 where a row cannot see one), the rewrite is
       P'[i, j] = factor_i * P[i, j] off ``cols`` and ``new[i, j]`` on them; ``factor`` (B, H, r, 1),
       ``new`` (B, H, r, n). The kernel derives the full-row rewrite from it, and a fast form that never
       materialises the rows' probabilities for long prefills (both tested equal).
    4. ``observe(view, probs) -> None``: read-only look at the final probabilities (clone what you keep).
    5. ``head_output(view, out) -> out``: per-head attention output (B, r, H, D) before o_proj (may be
       rewritten in place). A layer whose methods define only this role keeps fused sdpa: the roles get
       its output, every row of the forward, never eager attention.

    Token selection: ``select(view, hidden) -> keep | None``, at prefill before decoder layer
    ``view.layer`` with its input hidden states (B, q, d); ``view.attention(hidden, rows)`` gives that
    layer's attention probabilities for ranking. A (B, q) bool keep says which prompt positions stay from
    this layer on: masked as keys of this and every later layer, or, with ``drops_tokens``, removed
    (hidden states, mask, rotary embeddings, position ids and the later layers' KV cache shrink; every
    row must keep the same count; later views describe the compacted sequence). With
    ``renumbers_positions`` the kept tokens are renumbered 0..n-1 from the drop on (the official code of
    PyramidDrop and SparseVLM), and ``select`` may return a (B, n) long tensor of rows in a new order.

    Decoding: ``logits(view, logits) -> logits`` rewrites the output logits (B, q, V) of the user's rows;
    a method with a ``contrast`` gets ``logits(view, logits, contrast_logits)``, the variant's logits
    (B, q, V) for the same rows (None in the decode steps of a ``Contrast(decode=False)``).

    Contrast rows in the attention roles: while a forward carries them, the tensors hold ``view.batch_size``
    rows, the user's ``view.main_batch`` first and the contrast rows after them (row ``b`` and row
    ``main_batch + b`` are the two versions of one prompt, both left-padded to ``view.q_len``).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Config arguments with which the method changes nothing (its zero strength, e.g. PAI alpha=0): the
    #: common test suite checks that the wrapped model then equals the unwrapped one. None: no such setting.
    neutral: ClassVar[dict[str, Any] | None] = None
    #: The model families the method supports (None = every family); wrap() raises UnsupportedModelError
    #: for the others.
    families: ClassVar[tuple[str, ...] | None] = None
    #: The batch variant to run as contrast rows (None: none).
    contrast: Contrast | None = None
    #: False where KV-cached decoding differs from a full recomputation by design (say why in the docstring;
    #: the common suite then skips that check).
    cache_exact: ClassVar[bool] = True
    #: Set when ``select`` removes tokens (drop mode) instead of masking them.
    drops_tokens: bool = False
    #: Set (with ``drops_tokens``) to renumber the kept tokens' positions after a drop (see ``select``).
    renumbers_positions: bool = False

    scores = None
    column_stats = None
    probs = None
    columns = None
    reweight = None
    observe = None
    head_output = None
    select = None
    logits = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for role, n in _ARITY.items():
            fn = cls.__dict__.get(role)
            if callable(fn) and not _takes(fn, n):
                args = ", ".join(_ARGS[role])
                raise TypeError(
                    f"{cls.__name__}.{role} must take ({args}): the layer is view.layer (see attnkit/methods/base.py)"
                )
        if (cls.columns is None) != (cls.reweight is None):
            raise TypeError(f"{cls.__name__}: a column rewrite needs both columns() and reweight()")
        if cls.columns is not None and cls.probs is not None:
            raise TypeError(f"{cls.__name__}: define probs() or the column form (columns/reweight), not both")

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise MethodArgumentError(f"{self.name}: pass either a config object or keyword arguments, not both")
        if config is None:
            config = build_config(self.Config, self.name, kwargs)
        elif not isinstance(config, self.Config):
            raise MethodArgumentError(
                f"{self.name}: config must be {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # -- lifecycle -------------------------------------------------------------------------
    def use_processor(self, processor: Any) -> None:
        """Called before wrap() by code that holds the model's processor (the eval runner, ``attnkit eval``,
        ``attnkit demo``): a method that needs the tokenizer (ICD) takes it here unless it was given one.
        Default: nothing."""

    def attach(self, handle: Handle) -> None:
        """Called once by wrap(): ``handle.adapter`` gives the model's family knowledge and geometry;
        ``handle.add_hook`` registers any torch hook the method needs (removed by the handle)."""

    def detach(self) -> None:
        """Called by Handle.remove(): drop any per-model state."""

    def begin_forward(self, view: View) -> None:
        """Called at the start of every top-level forward (prefill or decode step)."""

    # -- state -------------------------------------------------------------------------------
    def state(self, view: View | None = None) -> dict[str, Any]:
        """This method's per-generation state: one dict per wrapped model, emptied at every prefill and
        kept across the decode steps that follow. Without a view (e.g. a report after generate()), the
        last generation's."""
        states = getattr(self, "_states", None)
        if states is None:
            raise RuntimeError(f"{self.name}: not attached to a wrapped model")
        out = states.get(self)
        if out is None:
            out = states[self] = {}
        return out

    # -- routing ---------------------------------------------------------------------------
    @classmethod
    def roles(cls) -> frozenset[str]:
        """The roles this method defines."""
        return frozenset(r for r in ROLES if getattr(cls, r, None) is not None)

    @classmethod
    def attention_callbacks(cls) -> bool:
        return any(getattr(cls, r, None) is not None for r in ATTENTION_ROLES)

    def layers(self, view: View) -> set[int] | None:
        """Layers whose attention the roles need in this forward (None = all layers)."""
        return None if self.attention_callbacks() else set()

    def rows(self, view: View) -> torch.Tensor | None:
        """Query rows at ``view.layer`` that need probabilities (sorted distinct indices); None = all."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({args})"
