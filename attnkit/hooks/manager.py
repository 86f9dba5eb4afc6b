"""Hook manager: the Handle wraps one model with a list of methods and gives it back intact on remove().

What wrapping does, and what remove() undoes:

1. registers (once per process, idempotent) attnkit's attention and mask functions with
   transformers' AttentionInterface / AttentionMaskInterface under the name "attnkit";
2. sets the language sub-config's attention implementation to "attnkit" (vision towers
   keep theirs), after saving the implementation of every config in the model;
3. marks the model and each language-model attention module with its Handle (``set_attr``: so state
   is per handle, never global);
4. calls each method's ``attach`` (where a method adds the torch hooks it needs, through ``add_hook``),
   then adds its own torch hooks: a forward pre-hook on the model that checks the model still routes
   its attention through attnkit and notes whether the forward returns attention weights, and, with
   active methods, reads the forward into the ForwardState (and appends the contrast rows a method
   asks for, see branch.py); decoder-layer pre-hooks for ``select``; a forward hook for ``logits``
   (which also drops the contrast rows).

Every hook and temporary attribute goes through ``add_hook`` / ``set_attr``, so remove() takes off
exactly what the handle added, in one place. Every read of a forward's arguments goes through compat.py (the cache by type, lengths
cross-checked), so a transformers release that passes them differently raises instead of
misleading the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import warnings

import torch

from ..errors import (
    AlreadyWrappedError,
    BypassedError,
    MethodArgumentError,
    TransformersCompatError,
    UnsupportedModelError,
)
from . import capture, compat, dispatch
from .compat import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from .branch import ContrastBranch
from .context import ForwardState, View
from .kernel import KernelOptions, Roles

if TYPE_CHECKING:
    from ..methods.base import Method
    from ..models.base import Adapter


def _register_functions() -> None:
    """Register attnkit's attention and mask functions under dispatch.NAME (idempotent)."""
    AttentionInterface.register(dispatch.NAME, dispatch.attention)
    AttentionMaskInterface.register(dispatch.NAME, dispatch.mask)


def _all_configs(model: torch.nn.Module) -> list[Any]:
    """Every config object reachable from the model: nested sub-configs and each sub-model's own."""
    seen: dict[int, Any] = {}
    stack = [model.config]
    for mod in model.modules():
        if isinstance(mod, PreTrainedModel):
            stack.append(mod.config)
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return list(seen.values())


class Handle:
    """A wrapped model. Use as a context manager, or call remove() to restore the original."""

    def __init__(
        self, model: torch.nn.Module, methods: list[Method], adapter: Adapter, options: KernelOptions | None = None
    ) -> None:
        for m in methods:
            if m.families is not None and adapter.family not in m.families:
                raise UnsupportedModelError(
                    f"{m.name}: family {adapter.family!r} is not supported (supported: {', '.join(m.families)})"
                )
        if getattr(model, dispatch.HANDLE_ATTR, None) is not None:
            raise AlreadyWrappedError(
                f"{type(model).__name__} is already wrapped by attnkit; call handle.remove() before wrapping again"
            )
        self.model = model
        self.adapter = adapter
        self.methods = list(methods)
        #: tuning of the kernel (see KernelOptions); may be changed between forwards
        self.options = options if options is not None else KernelOptions()
        #: the forward in progress (written here only; methods get Views of it)
        self.state = ForwardState(
            num_layers=adapter.num_layers,
            num_heads=adapter.num_heads,
            num_kv_heads=adapter.num_kv_heads,
            head_dim=adapter.head_dim,
        )
        self._torch_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._hook_owners: list[tuple[Any, torch.nn.Module, str]] = []
        self._attrs: list[tuple[Any, str, bool, Any]] = []  # set_attr: (object, name, had it, old value)
        self._saved_impl: list[tuple[Any, Any]] = []  # every config's attention implementation before wrap()
        self._set_impl: list[tuple[Any, Any]] = []  # what wrap() left in each (remove() keeps later changes)
        self._routes: list[Roles | None] = [None] * adapter.num_layers
        self._roles: dict[tuple, Roles] = {}  # Roles per distinct list of methods
        self._layer: tuple | None = None  # during select callbacks: (decoder layer, its index, its inputs)
        self._gathered: dict = {}  # drop mode: the layer inputs gathered in this forward
        self._branch = self._contrast_rows()
        self._cache: Any = None  # the KV cache the forward in progress received (found by type)
        #: Whether the forward in progress returns attention weights (output_attentions by argument or config).
        self.want_weights = False
        #: Layers whose attention ran in the forward in progress (see dispatch._check_call).
        self.ran: set[int] = set()
        #: Layers whose cache may keep fewer keys than the sequence (sliding-window / chunked attention).
        self.windowed = self._windowed_layers()
        self.removed = False
        self._install()

    def _windowed_layers(self) -> frozenset[int]:
        types = getattr(self.adapter.text_config, "layer_types", None) or []
        out = {i for i, t in enumerate(types) if t != "full_attention"}
        for i, attn in enumerate(self.adapter.attention_modules()):
            if getattr(attn, "sliding_window", None):
                out.add(i)
        return frozenset(out)

    # -- ownership: every hook and temporary attribute goes through the handle ------------------
    def add_hook(
        self, module: torch.nn.Module, fn: Any, *, pre: bool = False, with_kwargs: bool = False, owner: Any = None
    ) -> torch.utils.hooks.RemovableHandle:
        """Register a torch forward hook (``pre=True``: a forward pre-hook) on ``module``, owned by this handle:
        remove() takes it off. ``owner`` (a method) is recorded for ``hooks()``.

        Order: hooks on one module run in the order they were added. The handle adds its own hooks (the
        forward context, token selection, logits) after every method's ``attach()``, so a method's pre-hook
        on the model runs before the handle reads the forward's inputs (it may rewrite them, as the
        vision-side pruners do). A hook added later (outside ``attach``) runs after the handle's."""
        if self.removed:
            raise RuntimeError("this handle was removed; wrap the model again")
        if pre:
            h = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            h = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._torch_hooks.append(h)
        self._hook_owners.append((owner, module, "pre" if pre else "post"))
        return h

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` until remove(), which restores the previous value (or deletes the
        attribute when there was none)."""
        had = name in getattr(obj, "__dict__", {})
        self._attrs.append((obj, name, had, obj.__dict__.get(name) if had else None))
        setattr(obj, name, value)

    def hooks(self) -> list[tuple[Any, torch.nn.Module, str]]:
        """(owner, module, "pre"|"post") for every torch hook the handle holds, in registration order
        (owner None: the handle's own)."""
        return list(self._hook_owners)

    # -- install / remove ------------------------------------------------------------------
    def _install(self) -> None:
        _register_functions()
        configs = _all_configs(self.model)
        compat.check_model(self.model, configs)
        self._saved_impl = [(cfg, compat.get_impl(cfg)) for cfg in configs]
        self._configs = [self.model.config, self.adapter.text_config]
        try:
            self.set_attr(self.model, dispatch.HANDLE_ATTR, self)
            for attn in self.adapter.attention_modules():
                self.set_attr(attn, dispatch.HANDLE_ATTR, self)
            self.model.set_attn_implementation({self.adapter.text_config_key: dispatch.NAME})
            if self.adapter.text_config._attn_implementation != dispatch.NAME:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__}: transformers would not route its language-model attention "
                    "through AttentionInterface (set_attn_implementation had no effect)"
                )
            self._set_impl = [(cfg, compat.get_impl(cfg)) for cfg, _ in self._saved_impl]
            if self._branch is not None:
                self._branch.attach(self)  # rows with images: shadows get_image_features
            for m in self.methods:
                m._states = self.state.states  # Method.state(): per-generation state, owned by the handle
                m.attach(self)
            # always: the bypass check and output_attentions; with methods also the ForwardState
            self.add_hook(self.adapter.context_module(), self._on_forward, pre=True, with_kwargs=True)
            if self.methods:
                self._route(View(self.state))
            if any(m.select is not None for m in self.methods):
                for i, layer in enumerate(self.adapter.decoder_layers()):
                    self.add_hook(layer, self._make_select_hook(i), pre=True, with_kwargs=True)
            if any(m.logits is not None for m in self.methods) or self._branch is not None:
                # on the module whose forward starts each step, so that it also runs when generate()
                # bypasses the top-level forward (InstructBLIP)
                self.add_hook(self.adapter.context_module(), self._on_output)
        except BaseException:
            self.remove()
            raise

    @property
    def bypassed(self) -> bool:
        """True when the model's language attention no longer routes through attnkit (its attention
        implementation was changed after wrap(), e.g. by ``model.set_attn_implementation``)."""
        return not self.removed and self.adapter.text_config._attn_implementation != dispatch.NAME

    @property
    def active(self) -> bool:
        """True while the methods run on every forward: not removed and not bypassed."""
        return not self.removed and not self.bypassed

    def remove(self) -> None:
        """Restore every config's attention implementation and remove every hook and mark attnkit added.

        A config whose implementation was changed after wrap() (``set_attn_implementation``) keeps
        that later choice, with a warning."""
        if self.removed:
            return
        self.removed = True
        for h in self._torch_hooks:
            h.remove()
        self._torch_hooks.clear()
        self._hook_owners.clear()
        for obj, name, had, old in reversed(self._attrs):
            if had:
                setattr(obj, name, old)
            elif name in obj.__dict__:
                delattr(obj, name)
        self._attrs.clear()
        ours = {id(cfg): impl for cfg, impl in self._set_impl}
        kept = []
        for cfg, impl in self._saved_impl:
            if id(cfg) in ours and compat.get_impl(cfg) != ours[id(cfg)]:
                kept.append(f"{type(cfg).__name__}={compat.get_impl(cfg)!r}")
                continue
            compat.set_impl(cfg, impl)
        if kept:
            warnings.warn(
                "attnkit: the attention implementation was changed after wrap(); remove() keeps that later choice "
                f"({', '.join(kept)})",
                stacklevel=2,
            )
        for m in self.methods:
            m.detach()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("bypassed" if self.bypassed else "active")
        return f"Handle({type(self.model).__name__}, methods={self.methods}, {state})"

    # -- per-forward routing ---------------------------------------------------------------
    @property
    def ctx(self) -> View:
        """A read-only view of the forward in progress (the whole sequence)."""
        return View(self.state)

    def roles_for_layer(self, layer: int) -> Roles | None:
        """The roles of the methods active at ``layer`` in the current forward, or None (fused sdpa)."""
        return self._routes[layer]

    def methods_for_layer(self, layer: int) -> list[Method]:
        roles = self._routes[layer]
        return [] if roles is None else roles.methods

    def _route(self, view: View) -> None:
        per: list[list[Method]] = [[] for _ in range(view.num_layers)]
        for m in self.methods:
            if not m.attention_callbacks():
                continue
            layers = m.layers(view)
            for i in range(view.num_layers) if layers is None else sorted(layers):
                if 0 <= i < view.num_layers:
                    per[i].append(m)
        routes: list[Roles | None] = []
        for ms in per:
            key = tuple(id(m) for m in ms)
            if ms and key not in self._roles:
                self._roles[key] = Roles(ms)
            routes.append(self._roles[key] if ms else None)
        self._routes = routes

    def _contrast_rows(self) -> ContrastBranch | None:
        """The contrast rows the methods declare (one variant per wrapped model)."""
        contrasts = list(dict.fromkeys(m.contrast for m in self.methods if m.contrast is not None))
        if not contrasts:
            return None
        if len(contrasts) > 1:
            kinds = ", ".join(c.kind for c in contrasts)
            raise MethodArgumentError(f"methods ask for different contrast rows ({kinds}); one per model")
        owners = tuple(dict.fromkeys(m.name for m in self.methods if m.contrast is not None))
        return ContrastBranch(self.adapter, contrasts[0], owners)

    def _past_len(self, cache_len: int) -> int:
        """The whole sequence's past length from the cache's (its first layer's) length: when the last
        prefill dropped tokens before layer 0, that layer's cache holds only the kept ones."""
        ctx = self.state
        if cache_len == 0 or not ctx.drops:
            return cache_len
        pos = ctx.positions_for_layer(0)
        return cache_len if pos is None else cache_len + ctx.prompt_len - pos.shape[1]

    def _pack_limit(self) -> int | None:
        """The longest packed prefill this model allows (see branch.Packed): 0 (never) with a token selection
        (its hooks see the decoder layers' hidden states) or with KernelOptions.packed_contrast off; a
        sliding-window model's window (its cache keeps only the window); else None (any length)."""
        if not self.options.packed_contrast or any(m.select is not None for m in self.methods):
            return 0
        window = getattr(self.adapter.text_config, "sliding_window", None)
        return int(window) if self.windowed and window else None

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.adapter.text_config._attn_implementation != dispatch.NAME:
            raise BypassedError(
                f"{type(self.model).__name__}: its attention implementation was changed to "
                f"{self.adapter.text_config._attn_implementation!r} after attnkit.wrap(), so attnkit's methods would "
                "not run; call handle.remove() before set_attn_implementation(), then wrap again"
            )
        self.want_weights = compat.wants_attentions(kwargs, self._configs)
        if not self.methods:
            return None
        self.ran = set()
        ctx = self.state
        seen = compat.read_forward(args, kwargs)
        input_ids, attn, q_len = seen.input_ids, seen.attention_mask, seen.q_len
        past_len = self._past_len(seen.cache_len)
        # after a prefill widened for a longer altered prompt (branch.extra), the cache holds extra padding
        # that the caller's mask does not cover (the branch adds it)
        widened = self._branch.extra if self._branch is not None and past_len else 0
        compat.check_past(seen, past_len - widened)
        changed = None
        main_batch = seen.batch
        branch = self._branch if self._branch is not None and (past_len == 0 or self._branch.decodes) else None
        self._cache = seen.cache
        if branch is not None:
            if args and "input_ids" not in kwargs:
                kwargs = dict(kwargs, input_ids=args[0])
                args = args[1:]
            kwargs = branch.expand(kwargs, past_len, seen.cache, self._pack_limit())
            changed = (args, kwargs)
            if branch.packed is not None:  # the methods see the padded-rows layout (see branch.Packed)
                input_ids, attn = branch.packed.ids, branch.packed.mask
            else:
                input_ids = kwargs.get("input_ids")
                attn = kwargs["attention_mask"]
                if past_len == 0 and branch.extra:  # the user's rows left-padded to the longer altered prompt
                    q_len += branch.extra
            ctx.batch_size = attn.shape[0]
        else:
            ctx.batch_size = main_batch
        ctx.q_len = q_len
        ctx.past_len = past_len
        ctx.attention_mask = attn.bool() if attn is not None else None
        if past_len == 0:
            ctx.is_prefill = True
            ctx.step = 0
            ctx.keep = []
            for st in ctx.states.values():  # Method.state(): a new generation (the dicts stay bound)
                st.clear()
            if input_ids is not None:
                image_mask = self.adapter.image_mask(input_ids)
            else:
                image_mask = self.adapter.image_mask_from_layout(ctx.attention_mask, ctx.batch_size, q_len)
            if image_mask is not None and ctx.attention_mask is not None:
                image_mask = image_mask & ctx.attention_mask[:, -q_len:]
            if image_mask is not None and branch is not None and branch.image_free:
                image_mask[main_batch:] = False  # the contrast rows have no image
            ctx.image_mask = image_mask
        else:
            ctx.is_prefill = False
            ctx.step += 1
        ctx.contrast_rows = main_batch if branch is not None else 0
        ctx.packed = (branch.packed.q_len, branch.packed.width) if branch is not None and branch.packed else None
        if ctx.is_prefill:
            ctx.prompt_len = q_len
            ctx.drops = []
            ctx.renumber_from = None
        ctx.begin()
        self._gathered = {}
        view = View(ctx)
        for m in self.methods:
            m.begin_forward(view)
        self._route(view)
        return changed

    def _make_select_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            ctx = self.state
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = ctx.positions_for_layer(layer)
            dropped = False
            if ctx.is_prefill:
                renumber = ctx.renumbered(layer)
                self._layer = (
                    module, layer, kwargs if pos is None else self._shrink_layer_inputs((), kwargs, None, pos, renumber)[1]
                )
                try:
                    for m in self.methods:
                        if m.select is None:
                            continue
                        keep = m.select(View(ctx, layer, attend=self._attend if self._layer else None), hidden)
                        if keep is None:
                            continue
                        if m.drops_tokens:
                            hidden = self._drop(m, layer, hidden, keep.to(hidden.device))
                            dropped = True
                            self._layer = None
                        else:
                            keep = keep.to(device=hidden.device, dtype=torch.bool)
                            ctx.keep.append((layer, self._original_keep(layer, keep)))
                finally:
                    self._layer = None
                pos = ctx.positions_for_layer(layer)
            if pos is None:
                return None
            if not ctx.is_prefill:
                # a decode step: the new tokens' rows are all kept; an attention mask's key columns need
                # the layer's compacted cache, and renumbered layers shift the new tokens' positions
                out = kwargs
                mask = kwargs.get("attention_mask")
                if mask is not None:
                    out = dict(out, attention_mask=self._gathered_input("attention_mask", mask, pos))
                if ctx.renumbered(layer):
                    out = self._renumbered_decode(layer, hidden, out, pos)
                return None if out is kwargs else (args, out)
            return self._shrink_layer_inputs(args, kwargs, hidden if dropped else None, pos, ctx.renumbered(layer))

        return hook

    def _attend(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """View.attention() in a select callback: (B, H, r, K) fp32 probabilities of the query ``rows`` that the
        layer about to run would compute for ``hidden`` (its own Q/K, mask and RoPE, and the keys masked by
        earlier mask-mode pruning). Computes no attention output and writes no cache."""
        if self._layer is None:
            raise RuntimeError("View.attention() can only be called from a select() callback, before any drop")
        module, layer, kwargs = self._layer
        keep = self.state.keep_for_layer(layer) if self.state.keep else None
        return capture.layer_attention(self.adapter.text_config, module, hidden, kwargs, rows, keep)

    # -- token dropping (later layers' views: ForwardState.seq) ----------------------------------------
    def _original_keep(self, layer: int, keep: torch.Tensor) -> torch.Tensor:
        """A mask-mode keep over the layer's (possibly compacted) keys -> over original prompt positions."""
        ctx = self.state
        keep = keep[:, : ctx.prompt_len]
        pos = ctx.positions_for_layer(layer)
        if pos is None:
            return keep
        full = keep.new_ones(keep.shape[0], ctx.prompt_len)
        return full.scatter(1, pos.to(keep.device), keep)

    def _drop(self, method: Method, layer: int, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Remove the rows of ``hidden`` that ``keep`` (B, n) bool leaves out, from ``layer`` on; or, for a
        method that renumbers positions, keep the rows ``keep`` (B, m) long lists, in that order."""
        ctx = self.state
        if ctx.contrast_rows:
            raise MethodArgumentError(
                f"{method.name}: mode='drop' cannot run with a method that adds contrast rows "
                "(PAI's cfg_gamma); use mode='mask'"
            )
        if layer < self.adapter.first_droppable_layer:
            raise MethodArgumentError(
                f"{method.name}: cannot drop tokens before layer {layer} of {self.adapter.family} "
                f"(the model adds image features to the hidden states up to layer "
                f"{self.adapter.first_droppable_layer - 1}); use a later layer or mode='mask'"
            )
        window = getattr(self.adapter.text_config, "sliding_window", None)
        types = getattr(self.adapter.text_config, "layer_types", None) or []
        if window and "sliding_attention" in types[layer:] and ctx.prompt_len >= window:
            raise UnsupportedModelError(self._window_message(method.name, window, ctx.prompt_len))
        if keep.dtype == torch.bool:
            keep = keep[:, : hidden.shape[1]]
            counts = keep.sum(1)
            if bool((counts != counts[0]).any()):
                raise MethodArgumentError(
                    f"{method.name}: rows keep different numbers of tokens ({counts.tolist()}) at layer {layer}; "
                    "drop mode needs equal counts so the batch stays rectangular"
                )
            bsz, n = keep.shape[0], int(counts[0])
            local = keep.nonzero()[:, 1].view(bsz, n)
        else:
            local = self._check_order(method, layer, keep, hidden.shape[:2])
            bsz = local.shape[0]
        cur = ctx.positions_for_layer(layer)
        if cur is None:
            cur = torch.arange(ctx.prompt_len, device=local.device).expand(bsz, -1)
        if method.renumbers_positions and ctx.renumber_from is None:
            ctx.renumber_from = layer
        ctx.drops.append((layer, cur.to(local.device).gather(1, local)))
        return hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def _check_order(method: Method, layer: int, order: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """A ``select`` result given as (B, m) row indices: only for methods that renumber positions."""
        bsz, q = shape
        if not method.renumbers_positions:
            raise MethodArgumentError(
                f"{method.name}: select() returned row indices at layer {layer}; only a method with "
                "renumbers_positions may reorder the kept tokens (return a bool keep mask)"
            )
        order = order.long()
        ok = order.dim() == 2 and order.shape[0] == bsz and bool(((order >= 0) & (order < q)).all())
        if ok and order.shape[1] > 1:
            ok = bool((order.sort(1).values.diff(dim=1) > 0).all())  # distinct rows
        if not ok:
            raise MethodArgumentError(
                f"{method.name}: select() at layer {layer} returned rows of shape {tuple(order.shape)} that are "
                f"not distinct indices in [0, {q - 1}] per batch row"
            )
        return order

    def _renumbered_decode(self, layer: int, hidden: torch.Tensor, kwargs: dict, pos: torch.Tensor) -> dict:
        """A decode step in a renumbered layer: its prompt holds ``pos.shape[1]`` tokens at 0..n-1, so the new
        tokens move down by the tokens dropped (each layer's new token follows its own length, as in the
        official code); position ids and rotary embeddings computed once per forward and drop stage."""
        ids, emb = kwargs.get("position_ids"), kwargs.get("position_embeddings")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(emb, (tuple, list)) or len(emb) != 2:
            raise TransformersCompatError(
                f"{self.adapter.family}: decoder layer {layer} received no 2-D position_ids and (cos, sin) "
                f"position_embeddings ({compat.where()}); positions='official' cannot renumber its decode steps"
            )
        tag = ("renumbered", id(emb[0]), id(pos))
        hit = self._gathered.get(tag)
        if hit is None:
            # the rotary module must give back what the layer received before it is asked for other positions
            same = self.adapter.rotary_embeddings(layer, hidden, ids)
            if not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(same, emb)):
                raise TransformersCompatError(
                    f"{self.adapter.family}: the rotary module does not reproduce the position embeddings decoder "
                    f"layer {layer} received ({compat.where()}); positions='official' cannot renumber"
                )
            shifted = ids - (self.state.prompt_len - pos.shape[1])
            hit = self._gathered[tag] = (emb, shifted, tuple(self.adapter.rotary_embeddings(layer, hidden, shifted)))
        return dict(kwargs, position_ids=hit[1], position_embeddings=hit[2])

    def _window_message(self, names: str, window: int, length: int) -> str:
        return (
            f"{names}: mode='drop' on {self.adapter.family} works only while the sequence fits in its "
            f"sliding window ({window} tokens; this one has {length}); use mode='mask'"
        )

    def _shrink_layer_inputs(
        self, args: tuple, kwargs: dict, hidden: torch.Tensor | None, pos: torch.Tensor, renumber: bool = False
    ) -> tuple[tuple, dict]:
        """The decoder layer's inputs for the kept positions: its hidden states (when this layer
        dropped rows), attention mask, rotary embeddings and position ids, each gathered once per
        forward and drop stage (``renumber``: positions 0..n-1, see ``_gather_input``)."""
        kwargs = dict(kwargs)
        if hidden is not None:
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        for key in ("attention_mask", "position_embeddings", "position_ids"):
            value = kwargs.get(key)
            if value is not None:
                kwargs[key] = self._gathered_input(key, value, pos, renumber)
        return args, kwargs

    def _gathered_input(self, key: str, value: Any, pos: torch.Tensor, renumber: bool = False) -> Any:
        """``_gather_input`` once per forward, input tensor and drop stage."""
        tag = (key, id(value), id(pos), renumber)
        hit = self._gathered.get(tag)
        if hit is None:
            # holds value: its id stays its own
            hit = self._gathered[tag] = (value, self._gather_input(key, value, pos, renumber))
        return hit[1]

    def _gather_input(self, key: str, value: Any, pos: torch.Tensor, renumber: bool = False) -> Any:
        """One layer input for the kept prompt positions ``pos`` (B, n). With ``renumber`` (prefill) the
        kept tokens take the positions of a prompt of n tokens, i.e. the first n of the whole sequence's
        (padding is never dropped and stays at the ends of its row, so those are the positions the
        shortened prompt would get), and the mask is the causal, padded mask of the layer's own order."""
        ctx = self.state
        bsz, n = pos.shape
        if key == "position_embeddings":
            return tuple(self._gather_input("rotary", v, pos, renumber) for v in value)
        if not ctx.is_prefill and key != "attention_mask":
            return value  # the new tokens are all kept: their rows are unchanged (see _renumbered_decode)
        pos = pos.to(value.device)
        if renumber and key == "rotary":
            return value[..., :n, :]
        if renumber and key == "position_ids":
            return value[..., :n]
        if renumber and ctx.is_prefill:
            # the layer's order may differ from the original one (SparseVLM's merged tokens): take the mask
            # between the sorted positions, which is causal in the new order with each row's padding
            pos = pos.sort(1).values
        if key == "rotary":  # (..., B|1, q, dim): rows along -2
            x = value.expand(*value.shape[:-3], bsz, *value.shape[-2:])
            idx = pos.view(*(1,) * (x.dim() - 3), bsz, n, 1).expand(*x.shape[:-2], n, x.shape[-1])
            return x.gather(-2, idx)
        if key == "position_ids":  # (..., B|1, q)
            x = value.expand(*value.shape[:-2], bsz, value.shape[-1])
            return x.gather(-1, pos.view(*(1,) * (x.dim() - 2), bsz, n).expand(*x.shape[:-1], n))
        # attention mask (B|1, 1|H, q, kv): rows (prefill) and key columns
        if value.dim() != 4:
            raise UnsupportedModelError(f"{self.adapter.family}: cannot drop tokens with a {value.dim()}-D attention mask")
        total = ctx.kv_len
        window = getattr(self.adapter.text_config, "sliding_window", None)
        if value.shape[-1] != total:
            if not ctx.is_prefill and ctx.q_len == 1 and value.shape[-1] < total and (not window or total <= window):
                return self._decode_mask(pos, value)
            names = ",".join(m.name for m in self.methods if m.drops_tokens)
            raise UnsupportedModelError(self._window_message(names, window or value.shape[-1], total))
        x = value.expand(bsz, *value.shape[1:])
        if ctx.is_prefill:
            x = x.gather(2, pos.view(bsz, 1, n, 1).expand(bsz, x.shape[1], n, x.shape[3]))
        cols = ctx.kv_index(pos)
        return x.gather(3, cols.view(bsz, 1, 1, -1).expand(bsz, x.shape[1], x.shape[2], cols.shape[1]))

    def _decode_mask(self, pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """A decode step's (B, 1, 1, kv) bool mask over a dropped layer's own keys, from the 2-D padding mask.
        transformers sizes each attention type's decode mask by one layer's cache (5.24: the first layer of
        that type), which after a drop may be another stage's compacted length: not this layer's columns."""
        attn = self.state.attention_mask
        if attn is None:
            return None  # every key visible (the sequence fits the window: checked by the caller)
        cols = self.state.kv_index(pos.to(attn.device))
        return attn.gather(1, cols)[:, None, None, :].to(like.device)

    def _user_positions(self, output: Any, branch: ContrastBranch) -> None:
        """After a forward widened for a longer altered prompt (branch.extra): the hidden states and attentions
        cut to the user's own positions (the padding the branch added taken off, as query rows and key columns)."""
        extra = branch.extra
        hidden = getattr(output, "hidden_states", None)
        if hidden and self.state.is_prefill:
            output.hidden_states = tuple(h[:, extra:] if h is not None and h.dim() == 3 else h for h in hidden)
        weights = getattr(output, "attentions", None)
        if weights:
            rows = extra if self.state.is_prefill else 0
            output.attentions = tuple(w[..., rows:, extra:] if w is not None else w for w in weights)

    def _on_output(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """The logits roles, then the user's rows only (the contrast rows never leave); after the prefill of a
        ``Contrast(decode=False)``, the contrast rows dropped from the KV cache."""
        state = self.state
        cache, self._cache = self._cache, None
        contrast = None
        branch = self._branch
        if branch is not None:
            branch.done()
            main = state.batch_size - state.contrast_rows
            out_cache = compat.output_cache(output)  # found by type ("past_key_values" up to 5.23, "cache" after)
            out_cache = out_cache if out_cache is not None else cache
            if branch.packed is not None:
                contrast = branch.unpack_output(output, main)
                if branch.decodes:
                    branch.unpack_cache(out_cache)  # the decode steps run the twins as rows
                else:
                    branch.crop_packed(out_cache)
            elif state.contrast_rows and state.is_prefill and not branch.decodes:
                branch.drop_rows(out_cache, main)
            if state.is_prefill and not branch.decodes and state.image_mask is not None:
                state.image_mask = state.image_mask[:main]  # the decode steps see the user's rows only
        logits = getattr(output, "logits", None)
        if logits is None:
            return output
        if state.contrast_rows and contrast is None and logits.shape[0] == state.batch_size:
            main = state.batch_size - state.contrast_rows
            logits, contrast = logits[:main], logits[main:]
            for key in ("attentions", "hidden_states"):
                per_layer = getattr(output, key, None)
                if per_layer:
                    setattr(output, key, tuple(w[:main] if w is not None else w for w in per_layer))
            if branch is not None and branch.extra:
                self._user_positions(output, branch)
                if state.is_prefill:  # the user's q positions at most (the caller's logits_to_keep may ask fewer)
                    keep = min(logits.shape[1], state.q_len - branch.extra)
                    logits, contrast = logits[:, -keep:], contrast[:, -keep:]
        view = View(state)
        for m in self.methods:
            if m.logits is not None:
                logits = m.logits(view, logits) if m.contrast is None else m.logits(view, logits, contrast)
        output.logits = logits
        return output
